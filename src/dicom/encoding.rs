//! Transfer syntax → byte-level encoding of the data set (PS3.5 §10, Annex A), and the byte order
//! helpers of that encoding.
//!
//! Reading and writing elements needs to know two things about a transfer syntax: whether VRs are explicit
//! (PS3.5 §7.1.2) or implicit (§7.1.3), and the byte order (§7.3). Encapsulated (compressed)
//! transfer syntaxes all encode the data set itself as Explicit VR Little Endian (PS3.5 A.4), so
//! they map to [`Encoding::ExplicitLittle`].

use super::uids;

/// How the elements of a data set are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Implicit VR Little Endian (PS3.5 A.1): tag + 4-byte length, no VR.
    ImplicitLittle,
    /// Explicit VR Little Endian (PS3.5 A.2) and every encapsulated transfer syntax (A.4).
    ExplicitLittle,
    /// Explicit VR Big Endian (PS3.5 A.3, retired but still received).
    ExplicitBig,
}

/// Whether an explicit VR has the long header form: 2 reserved bytes and a 4-byte length
/// (PS3.5 §7.1.2, Table 7.1-1); every other VR has a 2-byte length.
pub fn has_long_length(vr: &[u8; 2]) -> bool {
    matches!(
        vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

/// Transfer syntaxes whose data set after the file meta information is deflated
/// (PS3.5 A.5 Deflated Explicit VR Little Endian, A.7 JPIP Referenced Deflate,
/// A.12 JPIP HTJ2K Referenced Deflate). The splitter works on the inflated stream.
const DEFLATED: [&str; 3] = [
    uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    uids::JPIP_REFERENCED_DEFLATE,
    uids::JPIP_HTJ2K_REFERENCED_DEFLATE,
];

/// UIDs are padded to even length with a trailing NUL (PS3.5 §9.1); some senders pad with a space.
fn trim_uid(uid: &str) -> &str {
    uid.trim_end_matches(['\0', ' '])
}

/// True if the data set of this transfer syntax is deflated (see [`Encoding::from_transfer_syntax`],
/// which returns `None` for exactly these). After inflating, such a data set is Explicit VR Little
/// Endian.
pub fn is_deflated_transfer_syntax(uid: &str) -> bool {
    DEFLATED.contains(&trim_uid(uid))
}

impl Encoding {
    /// Encoding of the data set for a transfer syntax UID (trailing NUL/space padding ignored).
    ///
    /// `1.2.840.10008.1.2` is Implicit VR Little Endian, `1.2.840.10008.1.2.2` Explicit VR Big
    /// Endian, and every other transfer syntax (native Explicit VR Little Endian and all
    /// encapsulated ones, PS3.5 A.4) Explicit VR Little Endian. Deflated transfer syntaxes
    /// ([`is_deflated_transfer_syntax`]) give `None`: the caller inflates first and then splits
    /// with [`Encoding::ExplicitLittle`].
    pub fn from_transfer_syntax(uid: &str) -> Option<Encoding> {
        match trim_uid(uid) {
            uids::IMPLICIT_VR_LITTLE_ENDIAN => Some(Encoding::ImplicitLittle),
            uids::EXPLICIT_VR_BIG_ENDIAN => Some(Encoding::ExplicitBig),
            u if DEFLATED.contains(&u) => None,
            _ => Some(Encoding::ExplicitLittle),
        }
    }

    /// True for the explicit VR encodings (PS3.5 §7.1.2).
    pub fn is_explicit(self) -> bool {
        !matches!(self, Encoding::ImplicitLittle)
    }

    /// True for Explicit VR Big Endian (PS3.5 §7.3).
    pub fn is_big_endian(self) -> bool {
        matches!(self, Encoding::ExplicitBig)
    }

    /// Encoding of the contents of an undefined-length value with this explicit VR (`None`:
    /// implicit VR, or an item): an explicit `UN` holds Implicit VR Little Endian whatever the
    /// transfer syntax (PS3.5 §6.2.2 note); everything else keeps the encoding it is in.
    #[inline]
    pub fn inside(self, vr: Option<[u8; 2]>) -> Encoding {
        if vr == Some(*b"UN") {
            Encoding::ImplicitLittle
        } else {
            self
        }
    }

    #[inline]
    pub fn u16(self, b: [u8; 2]) -> u16 {
        if self.is_big_endian() {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    #[inline]
    pub fn u32(self, b: [u8; 4]) -> u32 {
        if self.is_big_endian() {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    #[inline]
    pub fn u16_bytes(self, v: u16) -> [u8; 2] {
        if self.is_big_endian() {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }

    #[inline]
    pub fn u32_bytes(self, v: u32) -> [u8; 4] {
        if self.is_big_endian() {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }
}
