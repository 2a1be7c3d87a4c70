//! A C-FIND identifier turned into a query: the level, the keys with their matching kind, and the
//! matching rules of PS3.4 C.2.2.2. Pure: no storage access.

use super::charset::Charset;
use super::dataset::{self, Element, Value};

pub const SPECIFIC_CHARACTER_SET: u32 = 0x0008_0005;
pub const QUERY_RETRIEVE_LEVEL: u32 = 0x0008_0052;
pub const RETRIEVE_AE_TITLE: u32 = 0x0008_0054;
pub const INSTANCE_AVAILABILITY: u32 = 0x0008_0056;
pub const MODALITIES_IN_STUDY: u32 = 0x0008_0061;
pub const SOP_CLASSES_IN_STUDY: u32 = 0x0008_0062;
pub const STUDY_DATE: u32 = 0x0008_0020;
pub const STUDY_TIME: u32 = 0x0008_0030;
pub const ACCESSION_NUMBER: u32 = 0x0008_0050;
pub const MODALITY: u32 = 0x0008_0060;
pub const SOP_CLASS_UID: u32 = 0x0008_0016;
pub const SOP_INSTANCE_UID: u32 = 0x0008_0018;
pub const PATIENT_NAME: u32 = 0x0010_0010;
pub const PATIENT_ID: u32 = 0x0010_0020;
pub const PATIENT_BIRTH_DATE: u32 = 0x0010_0030;
pub const STUDY_INSTANCE_UID: u32 = 0x0020_000D;
pub const SERIES_INSTANCE_UID: u32 = 0x0020_000E;
pub const STUDY_ID: u32 = 0x0020_0010;
pub const PATIENT_RELATED_STUDIES: u32 = 0x0020_1200;
pub const PATIENT_RELATED_SERIES: u32 = 0x0020_1202;
pub const PATIENT_RELATED_INSTANCES: u32 = 0x0020_1204;
pub const STUDY_RELATED_SERIES: u32 = 0x0020_1206;
pub const STUDY_RELATED_INSTANCES: u32 = 0x0020_1208;
pub const SERIES_RELATED_INSTANCES: u32 = 0x0020_1209;

/// The attributes the index keeps, besides the hierarchy (PS3.4 C.6 "usual keys").
pub const INDEXED: [u32; 8] = [
    PATIENT_ID,
    PATIENT_NAME,
    PATIENT_BIRTH_DATE,
    STUDY_DATE,
    ACCESSION_NUMBER,
    STUDY_ID,
    SERIES_INSTANCE_UID,
    MODALITY,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Patient = 0,
    Study = 1,
    Series = 2,
    Image = 3,
}

impl Level {
    pub fn parse(text: &str) -> Option<Level> {
        Some(match text {
            "PATIENT" => Level::Patient,
            "STUDY" => Level::Study,
            "SERIES" => Level::Series,
            "IMAGE" => Level::Image,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Patient => "PATIENT",
            Level::Study => "STUDY",
            Level::Series => "SERIES",
            Level::Image => "IMAGE",
        }
    }
}

/// The information model of the SOP class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    PatientRoot,
    StudyRoot,
}

use crate::dicom::uids::{PATIENT_ROOT_FIND, STUDY_ROOT_FIND};

impl Model {
    pub fn of_sop_class(uid: &str) -> Option<Model> {
        match uid {
            PATIENT_ROOT_FIND => Some(Model::PatientRoot),
            STUDY_ROOT_FIND => Some(Model::StudyRoot),
            _ => None,
        }
    }
}

/// The level an attribute belongs to in the Patient Root model (PS3.4 C.6.1.1); Study Root
/// folds the patient level into the study level.
pub fn level_of(tag: u32, model: Model) -> Level {
    let level = match tag {
        // Patient-related attributes that describe the patient at the time of the study.
        0x0010_1010 | 0x0010_1020 | 0x0010_1030 | 0x0010_2180 | 0x0010_21B0 | 0x0010_21C0 => {
            Level::Study
        }
        t if t >> 16 == 0x0010 => Level::Patient,
        PATIENT_RELATED_STUDIES | PATIENT_RELATED_SERIES | PATIENT_RELATED_INSTANCES => {
            Level::Patient
        }
        STUDY_DATE
        | STUDY_TIME
        | ACCESSION_NUMBER
        | 0x0008_0051
        | MODALITIES_IN_STUDY
        | SOP_CLASSES_IN_STUDY
        | 0x0008_0063
        | 0x0008_0090
        | 0x0008_0096
        | 0x0008_1030
        | 0x0008_1032
        | 0x0008_1048
        | 0x0008_1049
        | 0x0008_1060
        | 0x0008_1062
        | 0x0008_1080
        | 0x0008_1084
        | STUDY_INSTANCE_UID
        | STUDY_ID
        | STUDY_RELATED_SERIES
        | STUDY_RELATED_INSTANCES
        | 0x0032_1032
        | 0x0032_1033
        | 0x0032_1060
        | 0x0032_4000 => Level::Study,
        0x0008_0021
        | 0x0008_0031
        | MODALITY
        | 0x0008_0064
        | 0x0008_0070
        | 0x0008_0080
        | 0x0008_0081
        | 0x0008_103E
        | 0x0008_1010
        | 0x0008_1040
        | 0x0008_1050
        | 0x0008_1052
        | 0x0008_1070
        | 0x0008_1072
        | 0x0008_1090
        | 0x0008_1111
        | 0x0018_0015
        | 0x0018_1000
        | 0x0018_1030
        | 0x0018_5100
        | SERIES_INSTANCE_UID
        | 0x0020_0011
        | 0x0020_0060
        | SERIES_RELATED_INSTANCES
        | 0x0040_0244
        | 0x0040_0245
        | 0x0040_0253
        | 0x0040_0254
        | 0x0040_0275 => Level::Series,
        _ => Level::Image,
    };
    if model == Model::StudyRoot && level == Level::Patient {
        Level::Study
    } else {
        level
    }
}

/// The unique key of a level.
pub fn unique_key(level: Level) -> u32 {
    match level {
        Level::Patient => PATIENT_ID,
        Level::Study => STUDY_INSTANCE_UID,
        Level::Series => SERIES_INSTANCE_UID,
        Level::Image => SOP_INSTANCE_UID,
    }
}

/// How one key matches (PS3.4 C.2.2.2).
#[derive(Debug, Clone, PartialEq)]
pub enum Matcher {
    /// Empty value or `*`: everything matches; the attribute is returned.
    Universal,
    /// List of UIDs (C.2.2.2.2): any equal.
    Uids(Vec<String>),
    /// Text patterns, any of which may match (one unless the query lists several): single
    /// value or wildcard (C.2.2.2.1, C.2.2.2.4).
    Text(Vec<Pattern>),
    /// Person Name: per component group, `None` where the query leaves a group out.
    PersonName(Vec<Option<Pattern>>),
    /// Date, time or date-time range (C.2.2.2.5), bounds normalised for string comparison.
    Range {
        lo: String,
        hi: String,
        kind: RangeKind,
    },
    /// Combined date and time range (C.2.2.2.5.1): this key is the date, `time_tag` the time.
    DateTime {
        lo: String,
        hi: String,
        time_tag: u32,
    },
    /// Binary values compared byte for byte.
    Bytes(Vec<u8>),
    /// Sequence matching (C.2.2.2.6): some item matches every sub-key.
    Sequence(Vec<Key>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeKind {
    Date,
    Time,
    DateTime,
}

/// A text pattern: literal characters and wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    chars: Vec<char>,
    wild: bool,
}

impl Pattern {
    pub fn new(text: &str) -> Pattern {
        Pattern {
            chars: text.chars().collect(),
            wild: text.contains(['*', '?']),
        }
    }

    /// The literal start, up to the first wildcard.
    pub fn literal_prefix(&self) -> String {
        self.chars
            .iter()
            .take_while(|c| **c != '*' && **c != '?')
            .collect()
    }

    pub fn is_exact(&self) -> bool {
        !self.wild
    }

    pub fn matches(&self, value: &str, fold: bool) -> bool {
        let v: Vec<char> = if fold {
            value.chars().flat_map(char::to_uppercase).collect()
        } else {
            value.chars().collect()
        };
        let p: Vec<char> = if fold {
            self.chars.iter().flat_map(|c| c.to_uppercase()).collect()
        } else {
            self.chars.clone()
        };
        if !self.wild {
            return p == v;
        }
        wildcard(&p, &v)
    }
}

/// `*` any run, `?` one character; iterative with one backtrack point (linear-ish, no recursion).
fn wildcard(p: &[char], v: &[char]) -> bool {
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == v[vi])) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, vi));
            pi += 1;
        } else if let Some((sp, sv)) = star {
            pi = sp + 1;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// One key of the identifier.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub tag: u32,
    pub vr: [u8; 2],
    pub matcher: Matcher,
    /// The requested sub-keys of a sequence key (empty: return whole items).
    pub sub_keys: Vec<Key>,
}

/// A parsed C-FIND request identifier.
#[derive(Debug, Clone)]
pub struct Query {
    pub model: Model,
    pub level: Level,
    pub keys: Vec<Key>,
}

/// Why an identifier is refused; each maps to a C-FIND failure status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("{0}")]
    Malformed(String),
    #[error("Query/Retrieve Level (0008,0052) missing")]
    NoLevel,
    #[error("unknown Query/Retrieve Level {0:?}")]
    BadLevel(String),
    #[error("{0}")]
    NotInModel(String),
}

/// Options that change matching.
#[derive(Debug, Clone, Copy, Default)]
pub struct MatchOptions {
    /// Person names compared ignoring case (the standard's default is exact).
    pub case_insensitive_names: bool,
    /// Combined date-time range matching negotiated (extended negotiation byte 2).
    pub combined_datetime: bool,
}

/// Date/time pairs that combined matching joins (PS3.4 C.2.2.2.5.1).
const DATE_TIME_PAIRS: [(u32, u32); 6] = [
    (0x0008_0020, 0x0008_0030),
    (0x0008_0021, 0x0008_0031),
    (0x0008_0022, 0x0008_0032),
    (0x0008_0023, 0x0008_0033),
    (0x0010_0030, 0x0010_0032),
    (0x0040_0244, 0x0040_0245),
];

impl Query {
    /// Builds a query from the parsed identifier of a C-FIND-RQ.
    pub fn parse(
        elements: &[Element<'_>],
        model: Model,
        opts: MatchOptions,
    ) -> Result<Query, QueryError> {
        let charset = dataset::find(elements, SPECIFIC_CHARACTER_SET)
            .map(|e| Charset::from_value(e.bytes()))
            .unwrap_or(Charset::from_value(b""));
        let level_text = match dataset::find(elements, QUERY_RETRIEVE_LEVEL) {
            Some(e) => text(e.bytes()),
            None => return Err(QueryError::NoLevel),
        };
        let level = Level::parse(&level_text).ok_or(QueryError::BadLevel(level_text))?;
        if model == Model::StudyRoot && level == Level::Patient {
            return Err(QueryError::NotInModel(
                "PATIENT level is not in the Study Root model".into(),
            ));
        }
        let mut keys = Vec::new();
        for e in elements {
            // Group lengths and command-group elements are not keys.
            if matches!(e.tag, SPECIFIC_CHARACTER_SET | QUERY_RETRIEVE_LEVEL)
                || e.tag >> 16 == 0
                || e.tag & 0xFFFF == 0
            {
                continue;
            }
            keys.push(parse_key(e, &charset, 0)?);
        }
        if opts.combined_datetime {
            combine_date_time(&mut keys);
        }
        Ok(Query { model, level, keys })
    }

    /// The keys that take part in matching at the query level.
    pub fn matching_keys(&self) -> impl Iterator<Item = &Key> {
        self.keys.iter().filter(|k| {
            level_of(k.tag, self.model) <= self.level
                && k.matcher != Matcher::Universal
                // Return keys only: a value copied from an earlier response must not filter.
                && !matches!(k.tag, RETRIEVE_AE_TITLE | INSTANCE_AVAILABILITY)
        })
    }

    pub fn key(&self, tag: u32) -> Option<&Key> {
        self.keys.iter().find(|k| k.tag == tag)
    }
}

fn combine_date_time(keys: &mut [Key]) {
    for (date, time) in DATE_TIME_PAIRS {
        let d = keys.iter().position(|k| k.tag == date);
        let t = keys.iter().position(|k| k.tag == time);
        let (Some(d), Some(t)) = (d, t) else { continue };
        let (
            Matcher::Range {
                lo: dlo, hi: dhi, ..
            },
            Matcher::Range {
                lo: tlo, hi: thi, ..
            },
        ) = (&keys[d].matcher, &keys[t].matcher)
        else {
            continue;
        };
        let lo = format!("{dlo}{tlo}");
        let hi = format!("{dhi}{thi}");
        keys[d].matcher = Matcher::DateTime {
            lo,
            hi,
            time_tag: time,
        };
        keys[t].matcher = Matcher::Universal;
    }
}

/// Trims the padding of a text value (NUL and spaces at the end, spaces at the start).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches(['\0', ' '])
        .trim_start()
        .to_string()
}

fn is_text_vr(vr: &[u8; 2]) -> bool {
    matches!(
        vr,
        b"AE"
            | b"AS"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"ST"
            | b"TM"
            | b"UC"
            | b"UI"
            | b"UR"
            | b"UT"
    )
}

/// VRs whose value is decoded with the Specific Character Set.
pub fn uses_charset(vr: &[u8; 2]) -> bool {
    matches!(vr, b"LO" | b"LT" | b"PN" | b"SH" | b"ST" | b"UC" | b"UT")
}

fn parse_key(e: &Element<'_>, charset: &Charset, depth: usize) -> Result<Key, QueryError> {
    // An explicit identifier gives the VR; an implicit one (or UN) takes the dictionary's.
    let vr = if &e.vr == b"UN" {
        dataset::dictionary_vr(e.tag)
    } else {
        e.vr
    };
    if let Value::Items(items) = &e.value {
        let mut sub_keys = Vec::new();
        match items.as_slice() {
            [] => {}
            [item] => {
                for sub in item {
                    if depth >= 4 {
                        return Err(QueryError::Malformed(
                            "sequence keys nested too deeply".into(),
                        ));
                    }
                    sub_keys.push(parse_key(sub, charset, depth + 1)?);
                }
            }
            _ => {
                return Err(QueryError::Malformed(format!(
                    "sequence key ({:04X},{:04X}) has more than one item",
                    e.tag >> 16,
                    e.tag & 0xFFFF
                )))
            }
        }
        let matching: Vec<Key> = sub_keys
            .iter()
            .filter(|k| k.matcher != Matcher::Universal)
            .cloned()
            .collect();
        let matcher = if matching.is_empty() {
            Matcher::Universal
        } else {
            Matcher::Sequence(matching)
        };
        return Ok(Key {
            tag: e.tag,
            vr: *b"SQ",
            matcher,
            sub_keys,
        });
    }
    let raw = e.bytes();
    let matcher = if raw.iter().all(|b| *b == b' ' || *b == 0) {
        Matcher::Universal
    } else if !is_text_vr(&vr) {
        Matcher::Bytes(raw.to_vec())
    } else {
        let value = if uses_charset(&vr) {
            charset.decode(raw, &vr == b"PN")
        } else {
            String::from_utf8_lossy(raw).into_owned()
        };
        let value = value.trim_end_matches(['\0', ' ']).trim_start().to_string();
        text_matcher(&vr, &value).map_err(|m| {
            QueryError::Malformed(format!("({:04X},{:04X}): {m}", e.tag >> 16, e.tag & 0xFFFF))
        })?
    };
    Ok(Key {
        tag: e.tag,
        vr,
        matcher,
        sub_keys: Vec::new(),
    })
}

fn text_matcher(vr: &[u8; 2], value: &str) -> Result<Matcher, String> {
    if value == "*" {
        return Ok(Matcher::Universal);
    }
    Ok(match vr {
        b"UI" => Matcher::Uids(
            value
                .split('\\')
                .map(|u| u.trim_matches(['\0', ' ']).to_string())
                .filter(|u| !u.is_empty())
                .collect(),
        ),
        b"DA" | b"TM" | b"DT" => {
            let kind = match vr {
                b"DA" => RangeKind::Date,
                b"TM" => RangeKind::Time,
                _ => RangeKind::DateTime,
            };
            let (lo, hi) = match split_range(value, kind) {
                Some((lo, hi)) => (lo, hi),
                None => (value, value),
            };
            // The value is not echoed: Error Comments reach the log, and dates can be PHI.
            let bad = || format!("not a valid {} value or range", String::from_utf8_lossy(vr));
            let lo = normalize(lo, kind, false).ok_or_else(bad)?;
            let hi = normalize(hi, kind, true).ok_or_else(bad)?;
            Matcher::Range { lo, hi, kind }
        }
        b"PN" => Matcher::PersonName(
            value
                .split('=')
                .map(|g| {
                    let g = trim_pn_group(g);
                    (!g.is_empty() && g != "*").then(|| Pattern::new(&g))
                })
                .collect(),
        ),
        _ => Matcher::Text(value.split('\\').map(|v| Pattern::new(v.trim())).collect()),
    })
}

/// The range separator of a DA/TM/DT value: DT values may carry a `-ZZXX` offset, so the
/// separator is the `-` after which a value of at least a year starts, or a leading/trailing one.
fn split_range(value: &str, kind: RangeKind) -> Option<(&str, &str)> {
    if kind != RangeKind::DateTime {
        return value.split_once('-');
    }
    let positions: Vec<usize> = value.match_indices('-').map(|(i, _)| i).collect();
    positions
        .iter()
        .copied()
        .find(|&i| i == 0 || i == value.len() - 1 || value[i + 1..].len() >= 4 && i >= 4)
        .map(|i| (&value[..i], &value[i + 1..]))
}

/// Normalises a date/time bound or stored value to a fixed-width digit string: `upper` pads with
/// 9s (so "2020" ends the year and "12" includes 12:59), otherwise with 0s. Empty stays empty for
/// an open lower bound, and becomes all 9s for an open upper bound.
pub fn normalize(v: &str, kind: RangeKind, upper: bool) -> Option<String> {
    let v = v.trim();
    if !v.is_ascii() {
        return None;
    }
    let width = match kind {
        RangeKind::Date => 8,
        RangeKind::Time => 12,
        RangeKind::DateTime => 20,
    };
    // Offsets (DT) are not applied: values compare as given.
    let v = match kind {
        RangeKind::DateTime => v.split(['+', '&']).next().unwrap_or(""),
        _ => v,
    };
    let v = if kind == RangeKind::DateTime && v.len() > 14 && v[4..].contains('-') {
        &v[..4 + v[4..].find('-').unwrap_or(0)]
    } else {
        v
    };
    let mut digits = String::with_capacity(width);
    for c in v.chars() {
        match c {
            '0'..='9' => digits.push(c),
            '.' | ':' => {}
            _ => return None,
        }
    }
    if digits.len() > width {
        digits.truncate(width);
    }
    while digits.len() < width {
        digits.push(if upper { '9' } else { '0' });
    }
    Some(digits)
}

pub fn trim_pn_group(g: &str) -> String {
    g.trim().trim_end_matches(['^', ' ']).to_string()
}

/// Does a stored text value match `matcher`? `stored` is `None` when the attribute is absent.
pub fn matches(
    matcher: &Matcher,
    stored: Option<&Element<'_>>,
    charset: &Charset,
    fold_names: bool,
) -> bool {
    match matcher {
        Matcher::Universal => true,
        Matcher::Sequence(sub) => match stored.map(|e| &e.value) {
            Some(Value::Items(items)) => items.iter().any(|item| {
                sub.iter()
                    .all(|k| matches(&k.matcher, dataset::find(item, k.tag), charset, fold_names))
            }),
            _ => false,
        },
        Matcher::Bytes(b) => stored.is_some_and(|e| e.bytes() == b.as_slice()),
        Matcher::DateTime { .. } => false, // needs two attributes: see `matches_date_time`
        _ => {
            let Some(e) = stored else { return false };
            if e.is_empty() {
                return false;
            }
            let decoded = if uses_charset(&e.vr) || &e.vr == b"UN" {
                charset.decode(e.bytes(), &e.vr == b"PN")
            } else {
                String::from_utf8_lossy(e.bytes()).into_owned()
            };
            matches_text(matcher, &decoded, fold_names)
        }
    }
}

/// Matching of a decoded stored value (all its values, `\`-separated).
pub fn matches_text(matcher: &Matcher, decoded: &str, fold_names: bool) -> bool {
    let values = decoded
        .split('\\')
        .map(|v| v.trim_end_matches(['\0', ' ']).trim_start());
    match matcher {
        Matcher::Universal => true,
        Matcher::Uids(list) => values.into_iter().any(|v| list.iter().any(|u| u == v)),
        Matcher::Text(patterns) => {
            let vs: Vec<&str> = values.collect();
            vs.iter()
                .any(|v| patterns.iter().any(|p| p.matches(v, false)))
        }
        Matcher::PersonName(groups) => values.into_iter().any(|v| {
            let stored: Vec<String> = v.split('=').map(trim_pn_group).collect();
            groups.iter().enumerate().all(|(i, g)| match g {
                None => true,
                Some(p) => p.matches(stored.get(i).map(String::as_str).unwrap_or(""), fold_names),
            })
        }),
        Matcher::Range { lo, hi, kind } => values.into_iter().any(|v| {
            normalize(v, *kind, false).is_some_and(|n| !v.is_empty() && lo <= &n && &n <= hi)
        }),
        Matcher::DateTime { .. } | Matcher::Bytes(_) | Matcher::Sequence(_) => false,
    }
}

/// Combined date-time matching: date and time of the stored object joined.
pub fn matches_date_time(
    lo: &str,
    hi: &str,
    date: Option<&Element<'_>>,
    time: Option<&Element<'_>>,
) -> bool {
    let Some(d) = date.map(|e| text(e.bytes())).filter(|d| !d.is_empty()) else {
        return false;
    };
    let t = time.map(|e| text(e.bytes())).unwrap_or_default();
    let (Some(d), Some(t)) = (
        normalize(&d, RangeKind::Date, false),
        normalize(&t, RangeKind::Time, false),
    ) else {
        return false;
    };
    let v = format!("{d}{t}");
    lo <= v.as_str() && v.as_str() <= hi
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(vr: &[u8; 2], q: &str) -> Matcher {
        text_matcher(vr, q).unwrap()
    }

    #[test]
    fn wildcards() {
        let p = Pattern::new("Sm?th*");
        assert!(p.matches("Smith^John", false));
        assert!(p.matches("Smyth", false));
        assert!(!p.matches("Smth", false));
        assert!(!p.matches("smith", false));
        assert!(p.matches("smith", true));
        assert!(Pattern::new("*a*b*").matches("xxaxxbxx", false));
        assert!(!Pattern::new("*a*b").matches("xxaxxbxx", false));
        assert!(Pattern::new("**").matches("", false));
        assert_eq!(Pattern::new("AB*C").literal_prefix(), "AB");
    }

    #[test]
    fn dates_times_and_ranges() {
        let q = m(b"DA", "20200101-20200131");
        assert!(matches_text(&q, "20200115", false));
        assert!(matches_text(&q, "2020.01.31", false));
        assert!(!matches_text(&q, "20200201", false));
        assert!(!matches_text(&q, "", false));
        let open = m(b"DA", "-20191231");
        assert!(matches_text(&open, "19500101", false));
        assert!(!matches_text(&open, "20200101", false));
        let after = m(b"DA", "2020-");
        assert!(matches_text(&after, "20200101", false));
        let tm = m(b"TM", "1000-12");
        assert!(matches_text(&tm, "125959.123", false));
        assert!(matches_text(&tm, "10", false));
        assert!(!matches_text(&tm, "130000", false));
        let single = m(b"TM", "10");
        assert!(matches_text(&single, "103000", false));
        assert!(!matches_text(&single, "113000", false));
        let dt = m(b"DT", "20200101120000-20200102");
        assert!(matches_text(&dt, "20200101130000", false));
        assert!(!matches_text(&dt, "20200101110000", false));
        assert!(text_matcher(b"DA", "2020x").is_err());
    }

    #[test]
    fn person_names_by_group() {
        let q = m(b"PN", "Yamada^Tarou");
        assert!(matches_text(
            &q,
            "Yamada^Tarou=山田^太郎=やまだ^たろう",
            false
        ));
        assert!(matches_text(&q, "Yamada^Tarou^^", false));
        assert!(!matches_text(&q, "YAMADA^TAROU", false));
        assert!(matches_text(&q, "YAMADA^TAROU", true));
        let ideographic = m(b"PN", "=山田*");
        assert!(matches_text(&ideographic, "Yamada^Tarou=山田^太郎", false));
        assert!(!matches_text(&ideographic, "Yamada^Tarou", false));
    }

    #[test]
    fn uid_lists_and_multi_values() {
        let q = m(b"UI", "1.2.3\\1.2.4");
        assert!(matches_text(&q, "1.2.4", false));
        assert!(!matches_text(&q, "1.2.5", false));
        let cs = m(b"CS", "DERIVED");
        assert!(matches_text(&cs, "ORIGINAL\\DERIVED", false));
        let list = m(b"CS", "CT\\MR");
        assert!(matches_text(&list, "MR", false));
        assert_eq!(m(b"LO", "*"), Matcher::Universal);
    }

    #[test]
    fn combined_date_time() {
        let mut keys = vec![
            Key {
                tag: STUDY_DATE,
                vr: *b"DA",
                matcher: m(b"DA", "20200101-20200102"),
                sub_keys: vec![],
            },
            Key {
                tag: STUDY_TIME,
                vr: *b"TM",
                matcher: m(b"TM", "2200-0200"),
                sub_keys: vec![],
            },
        ];
        combine_date_time(&mut keys);
        let Matcher::DateTime { lo, hi, .. } = &keys[0].matcher else {
            panic!()
        };
        assert_eq!(keys[1].matcher, Matcher::Universal);
        let el = |tag, v: &'static [u8]| Element {
            tag,
            vr: *b"DA",
            value: Value::Bytes(v.into()),
        };
        // 2020-01-01 23:00 is inside the combined range although 2300 is outside 2200-0200 as a time of day... and inside as combined.
        assert!(matches_date_time(
            lo,
            hi,
            Some(&el(STUDY_DATE, b"20200101")),
            Some(&el(STUDY_TIME, b"230000"))
        ));
        assert!(!matches_date_time(
            lo,
            hi,
            Some(&el(STUDY_DATE, b"20200102")),
            Some(&el(STUDY_TIME, b"030000"))
        ));
        assert!(!matches_date_time(
            lo,
            hi,
            Some(&el(STUDY_DATE, b"20200101")),
            Some(&el(STUDY_TIME, b"210000"))
        ));
    }

    #[test]
    fn non_ascii_dates_are_refused_not_a_panic() {
        assert!(text_matcher(b"DT", "abc\u{FFFD}0000000000000").is_err());
        assert_eq!(normalize("2020é", RangeKind::Date, false), None);
    }

    #[test]
    fn return_only_keys_never_filter() {
        let el = |tag, vr: &[u8; 2], v: &'static [u8]| Element {
            tag,
            vr: *vr,
            value: Value::Bytes(v.into()),
        };
        let q = Query::parse(
            &[
                el(0x0008_0000, b"UL", &[4, 0, 0, 0]),
                el(QUERY_RETRIEVE_LEVEL, b"CS", b"STUDY "),
                el(RETRIEVE_AE_TITLE, b"AE", b"OTHERAE "),
                el(INSTANCE_AVAILABILITY, b"CS", b"ONLINE"),
                el(PATIENT_ID, b"LO", b"P1"),
            ],
            Model::StudyRoot,
            MatchOptions::default(),
        )
        .unwrap();
        let tags: Vec<u32> = q.matching_keys().map(|k| k.tag).collect();
        assert_eq!(tags, vec![PATIENT_ID]);
        assert!(q.key(0x0008_0000).is_none());
    }

    #[test]
    fn levels() {
        assert_eq!(level_of(PATIENT_NAME, Model::PatientRoot), Level::Patient);
        assert_eq!(level_of(PATIENT_NAME, Model::StudyRoot), Level::Study);
        assert_eq!(level_of(0x0010_1010, Model::PatientRoot), Level::Study);
        assert_eq!(level_of(MODALITY, Model::StudyRoot), Level::Series);
        assert_eq!(level_of(0x0020_0013, Model::StudyRoot), Level::Image);
    }
}
