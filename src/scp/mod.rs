//! The DICOM services the node provides as SCP, over the wire layer of [`crate::dimse`]:
//!
//! - [`establish`]: an A-ASSOCIATE-RQ checked against access control and answered (AC or RJ);
//! - [`rejections`]: rejected associations summed up per source for the audit trail;
//! - [`association`]: one association's message loop: C-ECHO and C-STORE (feeding
//!   [`crate::archive::ingest`]), and the requests [`qr`] answers beside it (C-FIND, C-MOVE, C-GET).

pub mod association;
pub mod establish;
pub mod qr;
pub mod rejections;
