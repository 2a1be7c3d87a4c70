//! dicomchain's integration tests: one binary, real sockets, real DICOM clients (DCMTK's
//! echoscu/storescu, pynetdicom), the real `dicomchain` binary and a real S3 server over HTTP.

mod support;

mod access;
mod cli;
mod find;
mod forward;
mod hardening;
mod layering;
mod ledger;
mod lockout;
mod memory;
mod network;
mod ops;
mod privacy;
mod reliability;
mod retrieve;
mod rollback;
mod roundtrip;
mod s3;
mod tls;
