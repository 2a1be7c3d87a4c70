//! The Part 10 file header (PS3.10 §7.1): the 128-byte preamble, "DICM" and the File Meta
//! Information group (0002,xxxx), always Explicit VR Little Endian. Reading takes the UIDs that
//! matter here and where the data set starts; writing produces the header our exports and
//! retrievals put in front of the data set bytes.

use super::element::{padded, read_header, read_tag, write_element};
use super::encoding::Encoding;
use super::uids;

/// Preamble and "DICM": the meta group starts at this offset.
pub const META_START: usize = 132;

/// The File Meta Information of a Part 10 file that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part10Header {
    pub transfer_syntax: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// Where the data set starts.
    pub dataset_offset: usize,
}

/// Why the start of a file is not a usable Part 10 header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Part10Error {
    #[error("not a DICOM Part 10 file (no \"DICM\" after the 128-byte preamble)")]
    NotPart10,
    /// The bytes end inside a group 0002 element header.
    #[error("file meta information cut short")]
    CutShort,
    /// The bytes end inside a group 0002 value.
    #[error("file meta information cut short (or longer than 64 KiB)")]
    ValueCutShort,
    #[error("no Transfer Syntax UID (0002,0010) in the file meta")]
    NoTransferSyntax,
    #[error("no Media Storage SOP Class UID (0002,0002)")]
    NoSopClass,
    #[error("no Media Storage SOP Instance UID (0002,0003)")]
    NoSopInstance,
}

/// Reads the preamble, "DICM" and the group 0002 elements from the start of a file. `head`
/// must hold the whole meta group; the group ends at the first element of another group.
pub fn read(head: &[u8]) -> Result<Part10Header, Part10Error> {
    if head.len() < META_START || &head[128..META_START] != b"DICM" {
        return Err(Part10Error::NotPart10);
    }
    let enc = Encoding::ExplicitLittle;
    let mut pos = META_START;
    let (mut ts, mut class, mut instance) = (None, None, None);
    let text = |v: &[u8]| {
        String::from_utf8_lossy(v)
            .trim_end_matches(['\0', ' '])
            .to_string()
    };
    while pos + 8 <= head.len() && read_tag(&head[pos..], enc).is_ok_and(|t| t >> 16 == 0x0002) {
        let h = read_header(&head[pos..], enc).map_err(|_| Part10Error::CutShort)?;
        let start = pos + h.size;
        let value = head
            .get(start..start + h.length as usize)
            .ok_or(Part10Error::ValueCutShort)?;
        match h.tag & 0xFFFF {
            0x0002 => class = Some(text(value)),
            0x0003 => instance = Some(text(value)),
            0x0010 => ts = Some(text(value)),
            _ => {}
        }
        pos = start + value.len();
    }
    if pos + 8 > head.len() && head.get(pos..pos + 2) == Some(&[2, 0][..]) {
        return Err(Part10Error::CutShort);
    }
    Ok(Part10Header {
        transfer_syntax: ts.ok_or(Part10Error::NoTransferSyntax)?,
        sop_class_uid: class.ok_or(Part10Error::NoSopClass)?,
        sop_instance_uid: instance.ok_or(Part10Error::NoSopInstance)?,
        dataset_offset: pos,
    })
}

/// Appends one File Meta Information element (0002,`elem`), Explicit VR Little Endian.
pub fn meta_element(out: &mut Vec<u8>, elem: u16, vr: &[u8; 2], value: &[u8]) {
    write_element(
        out,
        Encoding::ExplicitLittle,
        0x0002_0000 | u32::from(elem),
        vr,
        value,
    );
}

/// Encodes a Part 10 header (PS3.10 §7.1): 128-byte preamble, "DICM", and the File Meta
/// Information group with its group length, version, the three UIDs, our implementation class
/// UID and version name, and the source AE title when known. The data set bytes follow
/// unchanged.
pub fn write(
    sop_class_uid: &str,
    sop_instance_uid: &str,
    transfer_syntax: &str,
    source_ae: &str,
) -> Vec<u8> {
    let mut group = Vec::new();
    meta_element(&mut group, 0x0001, b"OB", &[0, 1]);
    for (elem, vr, value) in [
        (0x0002, b"UI", sop_class_uid),
        (0x0003, b"UI", sop_instance_uid),
        (0x0010, b"UI", transfer_syntax),
        (0x0012, b"UI", uids::IMPLEMENTATION_CLASS_UID),
        (0x0013, b"SH", uids::IMPLEMENTATION_VERSION_NAME),
    ] {
        meta_element(&mut group, elem, vr, &padded(vr, value.as_bytes()));
    }
    if !source_ae.is_empty() {
        meta_element(
            &mut group,
            0x0016,
            b"AE",
            &padded(b"AE", source_ae.as_bytes()),
        );
    }
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta_element(&mut out, 0x0000, b"UL", &(group.len() as u32).to_le_bytes());
    out.extend_from_slice(&group);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_headers_read_back() {
        let mut f = write(
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3",
            uids::EXPLICIT_VR_BIG_ENDIAN,
            "SCU",
        );
        let offset = f.len();
        f.extend_from_slice(&[0x00, 0x08, 0x00, 0x16]);
        let h = read(&f).unwrap();
        assert_eq!(h.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(h.sop_instance_uid, "1.2.3");
        assert_eq!(h.transfer_syntax, uids::EXPLICIT_VR_BIG_ENDIAN);
        assert_eq!(h.dataset_offset, offset);
        // Even lengths: "1.2.3" got a NUL, "SCU" a space.
        assert!(f.windows(6).any(|w| w == b"1.2.3\0"));
        assert!(f.windows(4).any(|w| w == b"SCU "));
        // The group length counts the bytes after it.
        let group_len = u32::from_le_bytes(f[140..144].try_into().unwrap()) as usize;
        assert_eq!(144 + group_len, offset);
    }

    #[test]
    fn truncated_or_foreign_headers_are_refused() {
        let f = write("1.2", "1.3", uids::IMPLICIT_VR_LITTLE_ENDIAN, "");
        assert_eq!(read(b"hello"), Err(Part10Error::NotPart10));
        assert_eq!(read(&f[..138]), Err(Part10Error::CutShort));
        assert_eq!(read(&f[..140]), Err(Part10Error::ValueCutShort));
        // A cut inside an element is an error; one between elements may pass (the group
        // simply ends there) but only with every UID read.
        for cut in META_START..f.len() {
            if let Ok(h) = read(&f[..cut]) {
                assert_eq!(h.transfer_syntax, uids::IMPLICIT_VR_LITTLE_ENDIAN);
                assert!(h.dataset_offset <= cut);
            }
        }
        let mut no_ts = vec![0u8; 128];
        no_ts.extend_from_slice(b"DICM");
        meta_element(&mut no_ts, 0x0002, b"UI", b"1.2\0");
        meta_element(&mut no_ts, 0x0003, b"UI", b"1.3\0");
        assert_eq!(read(&no_ts), Err(Part10Error::NoTransferSyntax));
    }

    /// What the `dicom_header` fuzz target does (fuzz/ is built apart, by cargo-fuzz): walk the
    /// headers after a Part 10 header, or from the start, re-encoding each one.
    fn walk(data: &[u8], enc: Encoding) {
        use crate::dicom::{read_header, write_header, write_item};
        let mut pos = 0usize;
        while pos < data.len() {
            let h = match read_header(&data[pos..], enc) {
                Ok(h) => h,
                Err(crate::dicom::NeedMore(n)) => {
                    assert!(n > data.len() - pos && n <= 12);
                    return;
                }
            };
            let mut again = Vec::new();
            match h.vr {
                Some(vr) => write_header(&mut again, enc, h.tag, &vr, h.length),
                None => write_item(&mut again, enc, h.tag, h.length),
            }
            assert_eq!(read_header(&again, enc), Ok(h));
            let skip = match h.value_length() {
                Some(len) if !h.is_item_tag() => len as usize,
                _ => 0,
            };
            pos = pos.saturating_add(h.size).saturating_add(skip);
        }
    }

    proptest::proptest! {
        #[test]
        fn fuzz_target_paths_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            sel in 0usize..3,
            dicm in proptest::bool::ANY,
        ) {
            let enc = [Encoding::ImplicitLittle, Encoding::ExplicitLittle, Encoding::ExplicitBig][sel];
            let data = if dicm {
                let mut f = write("1.2", "1.3", uids::EXPLICIT_VR_LITTLE_ENDIAN, "");
                f.extend_from_slice(&bytes);
                f
            } else {
                bytes
            };
            match read(&data) {
                Ok(h) => {
                    let enc = Encoding::from_transfer_syntax(&h.transfer_syntax).unwrap_or(enc);
                    walk(&data[h.dataset_offset..], enc);
                }
                Err(_) => walk(&data, enc),
            }
        }
    }
}
