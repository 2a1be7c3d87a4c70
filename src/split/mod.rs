//! The split: separating a received data set into metadata and bulk pixel data, and putting it back.
//!
//! **Bulk data** is the value of a top-level (depth 0) element of the Pixel Data family —
//! (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data, (7FE0,0010) Pixel Data — native
//! (defined length) or encapsulated (undefined length: the offset table item, the fragment items and
//! the sequence delimitation item, kept exactly as they came). **Metadata** is every other received
//! byte, element headers of the pixel elements included. [`Splice`]s record where each bulk value
//! goes back, so that `reconstruct(metadata, splices, bulk)` is exactly the received data set.
//!
//! The splitter is a pure, incremental state machine (no I/O): it is fed the data set as it comes
//! off the network, in chunks of any size, and never buffers more than one element header.

mod error;
mod piece;
mod plan;
mod splitter;

#[cfg(test)]
mod corpus_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;

pub use crate::dicom::{has_long_length, is_deflated_transfer_syntax, Encoding};
pub use error::{SplitError, Tag, VrBytes};
pub use piece::{Piece, Splice};
pub use plan::{bulk_total, plan, reconstruct, Segment};
pub use splitter::Splitter;
