//! What the C-FIND index keeps of an instance: the attributes of [`INDEXED`], each decoded with
//! the data set's character set and normalised (person names upper-cased, dates without
//! separators) so that one index entry serves exact and case-insensitive matching. Written at
//! ingest, read by the planner; pure.

use super::charset::Charset;
use super::dataset::{self, Element};
use super::matching::{
    text, trim_pn_group, uses_charset, INDEXED, MODALITY, PATIENT_BIRTH_DATE, PATIENT_ID,
    PATIENT_NAME, SPECIFIC_CHARACTER_SET, STUDY_DATE,
};
use crate::split::Encoding;

/// The normalised index values of a data set (for [`matching::INDEXED`]) and its Modality.
/// Reading never fails an ingest: what cannot be parsed is not indexed.
pub fn index_values(bytes: &[u8], enc: Encoding, partial: bool) -> (String, Vec<(u32, String)>) {
    let elements = dataset::parse(bytes, enc, partial)
        .or_else(|_| dataset::parse(bytes, enc, true))
        .unwrap_or_default();
    let charset = dataset::find(&elements, SPECIFIC_CHARACTER_SET)
        .map(|e| Charset::from_value(e.bytes()))
        .unwrap_or(Charset::from_value(b""));
    let mut values = Vec::new();
    for tag in INDEXED {
        let Some(e) = dataset::find(&elements, tag) else {
            if tag == PATIENT_ID {
                values.push((tag, String::new()));
            }
            continue;
        };
        let v = index_value(e, &charset);
        if !v.is_empty() || tag == PATIENT_ID {
            values.push((tag, v));
        }
    }
    let modality = dataset::find(&elements, MODALITY)
        .map(|e| text(e.bytes()))
        .unwrap_or_default();
    (modality, values)
}

/// How an attribute's value is kept in the index: decoded, trimmed; person names upper-cased
/// with each component group trimmed (so one index serves exact and case-insensitive queries);
/// dates without the old `.` separators.
pub fn index_value(e: &Element<'_>, charset: &Charset) -> String {
    let pn = &e.vr == b"PN" || e.tag == PATIENT_NAME;
    let decoded = if uses_charset(&e.vr) || pn {
        charset.decode(e.bytes(), pn)
    } else {
        String::from_utf8_lossy(e.bytes()).into_owned()
    };
    let v = decoded.trim_end_matches(['\0', ' ']).trim_start();
    if pn {
        return pn_index_form(v);
    }
    if e.tag == STUDY_DATE || e.tag == PATIENT_BIRTH_DATE {
        return v.replace('.', "");
    }
    v.to_string()
}

fn pn_index_form(v: &str) -> String {
    let groups: Vec<String> = v.split('=').map(trim_pn_group).collect();
    groups.join("=").to_uppercase()
}

#[cfg(test)]
mod tests {
    use super::super::dataset::Value;
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn index_forms() {
        let pn = Element {
            tag: PATIENT_NAME,
            vr: *b"PN",
            value: Value::Bytes(Cow::Borrowed(b"Buc^J\xe9r\xf4me^^ ")),
        };
        assert_eq!(
            index_value(&pn, &Charset::from_value(b"ISO_IR 100")),
            "BUC^JÉRÔME"
        );
        let da = Element {
            tag: STUDY_DATE,
            vr: *b"DA",
            value: Value::Bytes(Cow::Borrowed(b"2020.01.02")),
        };
        assert_eq!(index_value(&da, &Charset::from_value(b"")), "20200102");
    }
}
