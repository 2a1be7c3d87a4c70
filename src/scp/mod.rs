//! The DICOM services the node provides as SCP, over the wire layer of [`crate::dimse`]:
//!
//! - [`context`]: what every association task shares;
//! - [`establish`]: an A-ASSOCIATE-RQ checked against access control and answered (AC or RJ);
//! - [`rejections`]: rejected associations summed up per source for the audit trail;
//! - [`status`]: the one mapping from the services' errors to DIMSE statuses;
//! - [`association`]: one association's message loop: C-ECHO and C-STORE (feeding
//!   [`crate::archive::ingest`]), and the Query/Retrieve requests that run beside it:
//! - [`qr`]: what those share (SOP classes, services, requests, messages to the loop);
//! - [`find`]: C-FIND, answered from the ledger's index;
//! - [`suboperations`]: the one sub-operation driver of C-MOVE and C-GET;
//! - [`retrieve_ops`]: C-MOVE (to the move destination) and C-GET (to the requestor) over it.

pub mod association;
pub mod context;
pub mod establish;
pub mod find;
pub mod qr;
pub mod rejections;
pub mod retrieve_ops;
pub mod status;
mod suboperations;
