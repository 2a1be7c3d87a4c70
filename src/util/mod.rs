//! Small helpers below everything else: they import nothing of the crate.
//!
//! - [`bytes`]: a bounds-checked big-endian cursor for the node's own binary records;
//! - [`escape`]: peer-supplied text made safe to print on one line;
//! - [`perms`]: file modes of the node's state, and secret files created private;
//! - [`time`]: timestamps printed and parsed (UTC, microseconds).

pub mod bytes;
pub mod escape;
pub mod perms;
pub mod time;
