//! Test helpers: a small data set writer (PS3.5 §7), a data set tree used by the property tests,
//! and a driver that splits a byte string fed in given chunk sizes and checks the invariants
//! every split must satisfy.

use super::{reconstruct, Encoding, Piece, Splice, SplitError, Splitter};

pub const ITEM: u32 = 0xFFFE_E000;
pub const ITEM_DELIM: u32 = 0xFFFE_E00D;
pub const SEQ_DELIM: u32 = 0xFFFE_E0DD;
pub const UNDEF: u32 = 0xFFFF_FFFF;
pub const PIXEL: u32 = 0x7FE0_0010;

pub fn is_pixel(tag: u32) -> bool {
    matches!(tag, 0x7FE0_0008 | 0x7FE0_0009 | 0x7FE0_0010)
}

pub fn put16(enc: Encoding, out: &mut Vec<u8>, v: u16) {
    if enc.is_big_endian() {
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub fn put32(enc: Encoding, out: &mut Vec<u8>, v: u32) {
    if enc.is_big_endian() {
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub fn tag_bytes(enc: Encoding, tag: u32) -> Vec<u8> {
    let mut v = Vec::new();
    put16(enc, &mut v, (tag >> 16) as u16);
    put16(enc, &mut v, tag as u16);
    v
}

pub fn is_long_vr(vr: &[u8; 2]) -> bool {
    super::has_long_length(vr)
}

/// Element header; `vr` is ignored in implicit VR.
pub fn header(enc: Encoding, out: &mut Vec<u8>, tag: u32, vr: &[u8; 2], len: u32) {
    out.extend_from_slice(&tag_bytes(enc, tag));
    if !enc.is_explicit() {
        put32(enc, out, len);
    } else if is_long_vr(vr) {
        out.extend_from_slice(vr);
        out.extend_from_slice(&[0, 0]);
        put32(enc, out, len);
    } else {
        out.extend_from_slice(vr);
        put16(enc, out, u16::try_from(len).expect("short VR length"));
    }
}

/// Item or delimiter header (no VR in any encoding, PS3.5 §7.5).
pub fn item(enc: Encoding, out: &mut Vec<u8>, tag: u32, len: u32) {
    out.extend_from_slice(&tag_bytes(enc, tag));
    put32(enc, out, len);
}

pub fn elem(enc: Encoding, out: &mut Vec<u8>, tag: u32, vr: &[u8; 2], value: &[u8]) {
    header(enc, out, tag, vr, value.len() as u32);
    out.extend_from_slice(value);
}

/// A data set as a tree, for generated tests.
#[derive(Debug, Clone)]
pub enum Node {
    /// Defined-length element.
    Prim {
        tag: u32,
        vr: [u8; 2],
        value: Vec<u8>,
    },
    /// SQ, defined or undefined length.
    Seq {
        tag: u32,
        undefined: bool,
        items: Vec<Item>,
    },
    /// Explicit UN of undefined length, content in Implicit VR LE (a plain sequence in implicit).
    Un { tag: u32, items: Vec<Item> },
    /// Native pixel-family element (bulk at the top level only).
    Native {
        tag: u32,
        vr: [u8; 2],
        value: Vec<u8>,
    },
    /// Encapsulated pixel data: optional offset table item, then fragments.
    Encap {
        bot: Option<Vec<u8>>,
        fragments: Vec<Vec<u8>>,
    },
}

#[derive(Debug, Clone)]
pub struct Item {
    pub undefined: bool,
    pub nodes: Vec<Node>,
}

pub fn write_items(enc: Encoding, items: &[Item], out: &mut Vec<u8>) {
    for it in items {
        let mut body = Vec::new();
        write_nodes(enc, &it.nodes, &mut body);
        if it.undefined {
            item(enc, out, ITEM, UNDEF);
            out.extend_from_slice(&body);
            item(enc, out, ITEM_DELIM, 0);
        } else {
            item(enc, out, ITEM, body.len() as u32);
            out.extend_from_slice(&body);
        }
    }
}

/// The value of encapsulated pixel data: items and the sequence delimiter (PS3.5 A.4).
pub fn encap_value(enc: Encoding, bot: &Option<Vec<u8>>, fragments: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in bot.iter().chain(fragments) {
        item(enc, &mut out, ITEM, f.len() as u32);
        out.extend_from_slice(f);
    }
    item(enc, &mut out, SEQ_DELIM, 0);
    out
}

pub fn write_nodes(enc: Encoding, nodes: &[Node], out: &mut Vec<u8>) {
    for n in nodes {
        match n {
            Node::Prim { tag, vr, value } | Node::Native { tag, vr, value } => {
                elem(enc, out, *tag, vr, value)
            }
            Node::Seq {
                tag,
                undefined,
                items,
            } => {
                let mut body = Vec::new();
                write_items(enc, items, &mut body);
                if *undefined {
                    header(enc, out, *tag, b"SQ", UNDEF);
                    out.extend_from_slice(&body);
                    item(enc, out, SEQ_DELIM, 0);
                } else {
                    elem(enc, out, *tag, b"SQ", &body);
                }
            }
            Node::Un { tag, items } => {
                let inner = if enc.is_explicit() {
                    Encoding::ImplicitLittle
                } else {
                    enc
                };
                header(enc, out, *tag, b"UN", UNDEF);
                write_items(inner, items, out);
                item(inner, out, SEQ_DELIM, 0);
            }
            Node::Encap { bot, fragments } => {
                header(enc, out, PIXEL, b"OB", UNDEF);
                out.extend_from_slice(&encap_value(enc, bot, fragments));
            }
        }
    }
}

/// Bulk bytes the splitter must produce for these top-level nodes, and the number of splices.
pub fn expected_bulk(enc: Encoding, nodes: &[Node]) -> (Vec<u8>, usize) {
    let mut bulk = Vec::new();
    let mut count = 0;
    for n in nodes {
        match n {
            Node::Native { value, .. } => {
                bulk.extend_from_slice(value);
                count += 1;
            }
            Node::Encap { bot, fragments } => {
                bulk.extend_from_slice(&encap_value(enc, bot, fragments));
                count += 1;
            }
            _ => {}
        }
    }
    (bulk, count)
}

/// Everything a split produced.
#[derive(Debug)]
pub struct Split {
    pub meta: Vec<u8>,
    pub bulk: Vec<u8>,
    pub splices: Vec<Splice>,
    pub meta_pieces: usize,
    pub bulk_pieces: usize,
}

/// Split `data` fed in chunks of the given sizes (cycled; empty = one chunk), checking the
/// invariants that hold whatever the input: pieces are contiguous sub-slices in stream order,
/// counters agree, and on success reconstruct() is the identity.
pub fn split_chunks(enc: Encoding, data: &[u8], sizes: &[usize]) -> Result<Split, SplitError> {
    let mut s = Splitter::new(enc);
    let mut meta = Vec::new();
    let mut bulk = Vec::new();
    let mut all = Vec::new();
    let (mut meta_pieces, mut bulk_pieces) = (0, 0);
    let mut pos = 0;
    let mut i = 0;
    let mut result = Ok(());
    while pos < data.len() {
        let n = if sizes.is_empty() {
            data.len()
        } else {
            sizes[i % sizes.len()].max(1)
        };
        i += 1;
        let chunk = &data[pos..(pos + n).min(data.len())];
        pos += chunk.len();
        let mut emitted = 0;
        result = s.feed(chunk, |p| match p {
            Piece::Meta(b) => {
                assert!(!b.is_empty());
                meta.extend_from_slice(b);
                all.extend_from_slice(b);
                emitted += b.len();
                meta_pieces += 1;
            }
            Piece::Bulk(b) => {
                assert!(!b.is_empty());
                bulk.extend_from_slice(b);
                all.extend_from_slice(b);
                emitted += b.len();
                bulk_pieces += 1;
            }
        });
        if result.is_err() {
            break;
        }
        assert_eq!(emitted, chunk.len(), "every byte of a chunk is emitted");
    }
    if let Err(e) = result {
        // A dead splitter keeps failing.
        assert_eq!(s.feed(b"x", |_| {}), Err(e.clone()));
        assert_eq!(s.finish(), Err(e.clone()));
        return Err(e);
    }
    assert_eq!(all, data, "pieces are the input in order");
    assert_eq!(s.bytes_in(), data.len() as u64);
    assert_eq!(s.meta_len(), meta.len() as u64);
    assert_eq!(s.bulk_len(), bulk.len() as u64);
    let splices = s.finish()?;
    assert_eq!(
        reconstruct(&meta, &splices, &bulk).expect("splitter output must reconstruct"),
        data
    );
    Ok(Split {
        meta,
        bulk,
        splices,
        meta_pieces,
        bulk_pieces,
    })
}

pub fn split_whole(enc: Encoding, data: &[u8]) -> Result<Split, SplitError> {
    split_chunks(enc, data, &[])
}
