//! What the splitter produces: the pieces of the input, each for the metadata or the bulk
//! stream, and the splices that record where each bulk value goes back.

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
