//! Errors of the split and of the reassembly plan.
//!
//! Every error raised while splitting names the byte offset in the data set (counted from the
//! first byte fed to the splitter, i.e. after the file meta information / as received over the
//! network) and the tag concerned, so that the message can go straight into a DIMSE Error Comment
//! (0000,0902) for the sending PACS administrator. Messages are short; the caller may still
//! truncate them to the 64 characters of an LO value.

use std::fmt;

/// A data element tag (group, element), displayed the DICOM way: `(7FE0,0010)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(pub u16, pub u16);

impl Tag {
    pub(crate) fn from_u32(t: u32) -> Tag {
        Tag((t >> 16) as u16, t as u16)
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({:04X},{:04X})", self.0, self.1)
    }
}

/// Two VR bytes as received: shown as text when printable ASCII, else as hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VrBytes(pub [u8; 2]);

impl fmt::Display for VrBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b] = self.0;
        if a.is_ascii_graphic() && b.is_ascii_graphic() {
            write!(f, "{}{}", a as char, b as char)
        } else {
            write!(f, "0x{a:02X}{b:02X}")
        }
    }
}

/// Why a data set could not be split, or a splice list could not be used to rebuild one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// Explicit VR encodings: the two VR bytes are none of the 34 VRs of PS3.5 §6.2.
    #[error("invalid VR {vr} in {tag} at byte {offset}")]
    InvalidVr { offset: u64, tag: Tag, vr: VrBytes },

    /// Undefined length (FFFFFFFFH) on an explicit VR that can't carry it (PS3.5 §7.1.2:
    /// only SQ, UN and, for encapsulated pixel data, OB/OW).
    #[error("undefined length not allowed for VR {vr} in {tag} at byte {offset}")]
    UndefinedLength { offset: u64, tag: Tag, vr: VrBytes },

    /// Items, delimiters and elements nested the wrong way (PS3.5 §7.5, A.4).
    #[error("{problem}: {tag} at byte {offset}")]
    Structure {
        offset: u64,
        tag: Tag,
        problem: &'static str,
    },

    /// The data set ended in the middle of an element header.
    #[error("data set ends inside an element header at byte {offset}")]
    TruncatedHeader { offset: u64 },

    /// The data set ended before the end of a defined-length value.
    #[error("data set ends {missing} bytes short in {tag} at byte {offset}")]
    TruncatedValue { offset: u64, tag: Tag, missing: u64 },

    /// The data set ended inside an undefined-length sequence, item or encapsulated pixel data
    /// (no delimiter, PS3.5 §7.5).
    #[error("data set ends in unterminated {what} {tag} at byte {offset}")]
    Unterminated {
        offset: u64,
        tag: Tag,
        what: &'static str,
    },

    /// A splice list that does not describe the metadata it goes with (corrupt record).
    #[error("invalid splice #{index}: {problem}")]
    BadSplice { index: usize, problem: &'static str },

    /// The bulk bytes do not have the total length the splices call for.
    #[error("bulk data is {actual} bytes, splices need {expected}")]
    BulkLength { expected: u64, actual: u64 },
}
