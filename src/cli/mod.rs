//! The `dicomchain` commands other than `serve`, one file each.

pub mod audit;
pub mod client;
pub mod export;
pub mod import;
pub mod verify;
