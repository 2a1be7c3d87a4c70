//! The DICOM network side: listener, associations, DIMSE messages and services.
//!
//! - [`listener`]: the accept loop (pending pool, TLS handshake, TCP_NODELAY, graceful shutdown);
//! - [`admission`]: who gets in and when: the pending pool, per-source rates, association caps;
//! - [`establish`]: the A-ASSOCIATE-RQ read, and answered with AC or RJ;
//! - [`rejections`]: rejected associations summed up per source for the audit trail;
//! - [`connection`]: PDU I/O on one socket with dicom-ul's PDU codec, strict size limit, timeouts;
//! - [`negotiate`]: which associations and presentation contexts we accept (pure);
//! - [`command`]: the DIMSE command set codec (pure);
//! - [`service`]: one association's message loop: C-ECHO and C-STORE (feeding `ingest`), and the
//!   requests [`qr`] answers beside it (C-FIND, C-MOVE, C-GET);
//! - [`scu`]: the node as requestor, for C-MOVE sub-operations;
//! - [`status`]: every DIMSE status we send, and the one mapping from errors to statuses.

pub mod admission;
pub mod command;
pub mod connection;
pub mod listener;
pub mod negotiate;
pub mod scu;
pub mod status;
pub mod tls;
