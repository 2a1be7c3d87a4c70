//! The archive: what the services do with instances, over the ledger and the object store.
//!
//! - [`ingest`]: a received data set split, its pixel object stored, its entry committed;
//! - [`retrieve`]: an instance loaded from both halves, checked and rebuilt byte for byte;
//! - [`outbound`]: one checked instance sent to a peer (C-MOVE, C-GET and forwarding).

pub mod ingest;
pub mod outbound;
pub mod retrieve;
