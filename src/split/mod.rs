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
pub use plan::{bulk_total, plan, reconstruct, Segment};
pub use splitter::Splitter;

/// Where one top-level pixel value was cut out of the metadata stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Splice {
    /// Offset in the metadata stream of the pixel element's header (its tag).
    pub header_offset: u64,
    /// Offset in the metadata stream where the bulk value goes back (just after the header).
    pub value_offset: u64,
    /// Number of bulk bytes of this value (for encapsulated pixel data: the items and the
    /// sequence delimitation item, PS3.5 A.4).
    pub length: u64,
}

/// A contiguous piece of the input, destined for the metadata or the bulk stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Meta(&'a [u8]),
    Bulk(&'a [u8]),
}
