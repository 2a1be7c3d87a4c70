//! Decoding text values under a Specific Character Set (0008,0005), PS3.5 §6.1 and PS3.3
//! C.12.1.1.2, including ISO 2022 code extensions (escape sequences switching between ASCII,
//! JIS X 0201/0208/0212, KS X 1001, GB 2312 and the ISO 8859 parts).
//!
//! Matching needs Unicode on both sides: a query in UTF-8 must find a name stored in
//! ISO 2022 IR 87, and the other way round. Responses never re-encode: they copy the stored bytes
//! together with the stored Specific Character Set, so only decoding is needed here.
//!
//! The tables come from `encoding_rs` (EUC-JP, EUC-KR, GBK, Shift_JIS, ISO 8859-x): a JIS X 0208
//! pair in G0 is its EUC-JP pair with the high bits set, a KS X 1001 or GB 2312 pair in G1 is
//! already its EUC-KR/GBK pair.

use encoding_rs::Encoding;

/// The graphic sets a byte can be interpreted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum G0 {
    Ascii,
    /// JIS X 0208 (ISO 2022 IR 87), two bytes per character.
    JisX0208,
    /// JIS X 0212 (ISO 2022 IR 159), two bytes per character.
    JisX0212,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum G1 {
    None,
    /// ISO 8859-1: bytes map to the same code points.
    Latin1,
    /// Another single-byte upper half (ISO 8859-x, TIS 620).
    Single(&'static Encoding),
    /// JIS X 0201 katakana (ISO 2022 IR 13).
    Katakana,
    /// KS X 1001 (ISO 2022 IR 149), two bytes per character, as EUC-KR.
    KsX1001,
    /// GB 2312 (ISO 2022 IR 58), two bytes per character, as EUC-CN.
    Gb2312,
}

/// A parsed Specific Character Set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// A single-byte or multi-byte character set without code extensions.
    Plain(PlainSet),
    /// ISO 2022 code extensions: the initial G0/G1 designations, restored at every delimiter.
    Iso2022 { g0: G0Set, g1: G1Set },
}

/// Public wrappers keep the set enums private while letting [`Charset`] be `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct G0Set(G0);
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct G1Set(G1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainSet {
    /// The default repertoire; bytes above 0x7F are not valid but are read as ISO 8859-1 rather
    /// than lost.
    Default,
    Latin1,
    Single(&'static Encoding),
    /// ISO_IR 13 without extensions: JIS X 0201 (romaji + katakana).
    JisX0201,
    Utf8,
    Gb18030,
    Gbk,
}

impl Charset {
    /// The character set named by the raw value of (0008,0005). Unknown terms fall back to the
    /// default repertoire (read as ISO 8859-1), which keeps ASCII exact.
    pub fn from_value(raw: &[u8]) -> Charset {
        let text = String::from_utf8_lossy(raw);
        let terms: Vec<&str> = text.split('\\').map(|t| t.trim()).collect();
        let extensions = terms.len() > 1 || terms.iter().any(|t| t.starts_with("ISO 2022"));
        if !extensions {
            return Charset::Plain(plain(terms.first().copied().unwrap_or("")));
        }
        // Value 1 gives the initial designations (PS3.3 C.12.1.1.2).
        let (g0, g1) = match terms.first().copied().unwrap_or("") {
            "" | "ISO 2022 IR 6" => (G0::Ascii, G1::None),
            "ISO 2022 IR 87" => (G0::JisX0208, G1::None),
            "ISO 2022 IR 159" => (G0::JisX0212, G1::None),
            other => (G0::Ascii, g1_for_term(other)),
        };
        Charset::Iso2022 {
            g0: G0Set(g0),
            g1: G1Set(g1),
        }
    }

    /// Decodes one text value (all of its `\`-separated values). `pn` selects the Person Name
    /// delimiters (`^` and `=`) as points where the initial designations come back.
    pub fn decode(&self, bytes: &[u8], pn: bool) -> String {
        match *self {
            Charset::Plain(p) => decode_plain(p, bytes),
            Charset::Iso2022 { g0, g1 } => decode_2022(g0.0, g1.0, bytes, pn),
        }
    }
}

fn plain(term: &str) -> PlainSet {
    match term {
        "ISO_IR 100" => PlainSet::Latin1,
        "ISO_IR 13" => PlainSet::JisX0201,
        "ISO_IR 192" => PlainSet::Utf8,
        "GB18030" => PlainSet::Gb18030,
        "GBK" => PlainSet::Gbk,
        other => match single_byte(other.trim_start_matches("ISO_IR ")) {
            Some(e) => PlainSet::Single(e),
            None => PlainSet::Default,
        },
    }
}

/// ISO 8859 parts and TIS 620 by their ISO-IR registration number.
fn single_byte(ir: &str) -> Option<&'static Encoding> {
    Some(match ir {
        "101" => encoding_rs::ISO_8859_2,
        "109" => encoding_rs::ISO_8859_3,
        "110" => encoding_rs::ISO_8859_4,
        "144" => encoding_rs::ISO_8859_5,
        "127" => encoding_rs::ISO_8859_6,
        "126" => encoding_rs::ISO_8859_7,
        "138" => encoding_rs::ISO_8859_8,
        // ISO 8859-9; encoding_rs (like the WHATWG standard) serves it as windows-1254, which
        // agrees on every graphic character of 8859-9.
        "148" => encoding_rs::WINDOWS_1254,
        "203" => encoding_rs::ISO_8859_15,
        "166" => encoding_rs::WINDOWS_874,
        _ => return None,
    })
}

fn g1_for_term(term: &str) -> G1 {
    match term {
        "ISO 2022 IR 100" => G1::Latin1,
        "ISO 2022 IR 13" => G1::Katakana,
        "ISO 2022 IR 149" => G1::KsX1001,
        "ISO 2022 IR 58" => G1::Gb2312,
        other => single_byte(other.trim_start_matches("ISO 2022 IR "))
            .map(G1::Single)
            .unwrap_or(G1::None),
    }
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

fn decode_with(e: &'static Encoding, bytes: &[u8]) -> String {
    e.decode_without_bom_handling(bytes).0.into_owned()
}

fn decode_plain(p: PlainSet, bytes: &[u8]) -> String {
    match p {
        PlainSet::Default | PlainSet::Latin1 => latin1(bytes),
        PlainSet::Single(e) => decode_with(e, bytes),
        PlainSet::JisX0201 => bytes.iter().map(|&b| jis_x0201(b)).collect(),
        PlainSet::Utf8 => String::from_utf8_lossy(bytes).into_owned(),
        PlainSet::Gb18030 => decode_with(encoding_rs::GB18030, bytes),
        PlainSet::Gbk => decode_with(encoding_rs::GBK, bytes),
    }
}

/// JIS X 0201: ASCII in the lower half (as DICOM readers treat IR 14), half-width katakana at
/// 0xA1–0xDF.
fn jis_x0201(b: u8) -> char {
    match b {
        0xA1..=0xDF => char::from_u32(0xFF61 + u32::from(b - 0xA1)).unwrap_or('\u{FFFD}'),
        0x80..=0xFF => '\u{FFFD}',
        _ => b as char,
    }
}

fn decode_2022(init_g0: G0, init_g1: G1, bytes: &[u8], pn: bool) -> String {
    let (mut g0, mut g1) = (init_g0, init_g1);
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == 0x1B {
            let (next, designation) = escape(&bytes[i..]);
            match designation {
                Some(Designation::Set0(s)) => g0 = s,
                Some(Designation::Set1(s)) => g1 = s,
                None => out.push('\u{FFFD}'),
            }
            i += next;
            continue;
        }
        if b < 0x80 {
            let two_byte = g0 != G0::Ascii && b > 0x20 && b < 0x7F;
            if two_byte {
                let Some(&b2) = bytes.get(i + 1) else {
                    out.push('\u{FFFD}');
                    break;
                };
                let euc: &[u8] = &[
                    if g0 == G0::JisX0212 { 0x8F } else { 0 },
                    b | 0x80,
                    b2 | 0x80,
                ];
                let euc = if g0 == G0::JisX0212 { euc } else { &euc[1..] };
                out.push_str(&decode_with(encoding_rs::EUC_JP, euc));
                i += 2;
                continue;
            }
            // Delimiters bring back the initial designations (PS3.5 §6.1.2.5.3).
            let delimiter = matches!(b, b'\r' | b'\n' | b'\t' | 0x0C | b'\\')
                || (pn && matches!(b, b'^' | b'='));
            if delimiter {
                g0 = init_g0;
                g1 = init_g1;
            }
            out.push(b as char);
            i += 1;
            continue;
        }
        match g1 {
            G1::None | G1::Latin1 => out.push(b as char),
            G1::Single(e) => out.push_str(&decode_with(e, &[b])),
            G1::Katakana => out.push(jis_x0201(b)),
            G1::KsX1001 | G1::Gb2312 => {
                let Some(&b2) = bytes.get(i + 1) else {
                    out.push('\u{FFFD}');
                    break;
                };
                let e = if g1 == G1::KsX1001 {
                    encoding_rs::EUC_KR
                } else {
                    encoding_rs::GBK
                };
                out.push_str(&decode_with(e, &[b, b2]));
                i += 2;
                continue;
            }
        }
        i += 1;
    }
    out
}

enum Designation {
    Set0(G0),
    Set1(G1),
}

/// Reads the escape sequence at the start of `b`; returns its length and what it designates.
fn escape(b: &[u8]) -> (usize, Option<Designation>) {
    let seq = |n: usize| b.get(1..1 + n);
    use Designation::*;
    let three = match seq(2) {
        Some(s) => s,
        None => return (b.len(), None),
    };
    let d = match three {
        b"(B" | b"(J" => Some(Set0(G0::Ascii)),
        b"$B" | b"$@" => Some(Set0(G0::JisX0208)),
        b")I" => Some(Set1(G1::Katakana)),
        b"-A" => Some(Set1(G1::Latin1)),
        [b'-', f] => {
            let ir = match f {
                b'B' => "101",
                b'C' => "109",
                b'D' => "110",
                b'F' => "126",
                b'G' => "127",
                b'H' => "138",
                b'L' => "144",
                b'M' => "148",
                b'T' => "166",
                b'b' => "203",
                _ => "",
            };
            single_byte(ir).map(|e| Set1(G1::Single(e)))
        }
        _ => None,
    };
    if d.is_some() {
        return (3, d);
    }
    match seq(3) {
        Some(b"$(D") => (4, Some(Set0(G0::JisX0212))),
        Some(b"$)C") => (4, Some(Set1(G1::KsX1001))),
        Some(b"$)A") => (4, Some(Set1(G1::Gb2312))),
        _ => (1, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_sets() {
        let latin = Charset::from_value(b"ISO_IR 100");
        assert_eq!(latin.decode(b"Buc^J\xe9r\xf4me", true), "Buc^Jérôme");
        let utf8 = Charset::from_value(b"ISO_IR 192");
        assert_eq!(
            utf8.decode("Wang^XiaoDong=王^小東".as_bytes(), true),
            "Wang^XiaoDong=王^小東"
        );
        let greek = Charset::from_value(b"ISO_IR 126");
        assert_eq!(
            greek.decode(b"\xc4\xe9\xef\xed\xf5\xf3\xe9\xef\xf2", true),
            "Διονυσιος"
        );
        assert_eq!(Charset::from_value(b"").decode(b"ABC", false), "ABC");
    }

    /// PS3.5 Annex H.3.1 (Japanese, ISO 2022 IR 87) example.
    #[test]
    fn japanese_iso_2022() {
        let cs = Charset::from_value(b"\\ISO 2022 IR 87");
        let raw =
            b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B";
        assert_eq!(cs.decode(raw, true), "Yamada^Tarou=山田^太郎=やまだ^たろう");
    }

    /// PS3.5 Annex I.2 (Korean, ISO 2022 IR 149) example.
    #[test]
    fn korean_iso_2022() {
        let cs = Charset::from_value(b"\\ISO 2022 IR 149");
        let raw = b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf";
        assert_eq!(cs.decode(raw, true), "Hong^Gildong=洪^吉洞=홍^길동");
    }

    #[test]
    fn katakana_and_damage() {
        let cs = Charset::from_value(b"ISO 2022 IR 13\\ISO 2022 IR 87");
        assert_eq!(cs.decode(b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3", true), "ﾔﾏﾀﾞ^ﾀﾛｳ");
        // Truncated escapes and pairs decode to replacement characters, never panic.
        for raw in [&b"\x1b"[..], b"\x1b$", b"\x1b$B;", b"\x1bZZ"] {
            let _ = cs.decode(raw, true);
        }
    }
}
