//! Pure DICOM encoding, shared by every module that reads or writes data elements: the byte-level
//! [`Encoding`] of a transfer syntax, one element header reader ([`read_header`], on a slice, able
//! to say "need more bytes" so that the incremental splitter uses it too), one element writer
//! ([`write_header`], [`write_element`]), the Part 10 file header ([`part10`]) and the UIDs the
//! crate names ([`uids`]).
//!
//! It imports nothing else of the crate. Data sets are never decoded into typed values here: the
//! callers (split, instance index, query data sets, import, retrieve) decide what to do with the
//! value bytes.

mod element;
mod encoding;
pub mod part10;
pub mod uids;

pub use element::{
    is_known_vr, padded, read_header, read_tag, swap_units, swap_units_in_place, value_unit,
    write_element, write_header, write_item, Header, NeedMore, ITEM, ITEM_DELIMITATION,
    SEQUENCE_DELIMITATION, UNDEFINED_LENGTH,
};
pub use encoding::{has_long_length, is_deflated_transfer_syntax, Encoding};
