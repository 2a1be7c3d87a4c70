//! The DICOM services the node provides as SCP, over the wire layer of [`crate::dimse`]:
//!
//! - [`context`]: what every association task shares;
//! - [`establish`]: an A-ASSOCIATE-RQ checked against access control and answered (AC or RJ);
//! - [`rejections`]: rejected associations summed up per source for the audit trail;
//! - [`status`]: the one mapping from the services' errors to DIMSE statuses;
//! - [`association`]: one association's message loop: C-ECHO and C-STORE (feeding
//!   [`crate::archive::ingest`]), and the requests [`qr`] answers beside it (C-FIND, C-MOVE, C-GET).

pub mod association;
pub mod context;
pub mod establish;
pub mod qr;
pub mod rejections;
pub mod status;
