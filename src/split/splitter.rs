//! The incremental splitter: a state machine over the data set byte stream.
//!
//! It reads element headers (PS3.5 §7.1) and skips every defined-length value without looking
//! at it, so its cost is proportional to the number of elements, not to the number of bytes.
//! Only the bytes of one header (at most 12) are ever copied, to parse it across chunk
//! boundaries; all other bytes are handed to `emit` as sub-slices of the caller's chunk, and
//! consecutive bytes going to the same side are coalesced into one slice, so a native Pixel
//! Data value goes out as one slice per input chunk.
//!
//! Undefined-length constructs are tracked on an explicit stack (no recursion, so hostile
//! nesting cannot overflow the call stack; each level costs at least 16 input bytes), and more
//! than [`MAX_SEQUENCE_DEPTH`] undefined-length sequences inside each other is refused, as the
//! index parser refuses it (`instance::MAX_DEPTH`): no real object nests that deep.
//!
//! Choices where the standard leaves room or input is malformed:
//! - A delimiter item, (FFFE,E00D) or (FFFE,E0DD), whose length field is not 0 (PS3.5 §7.5.2
//!   says it shall be 0) is tolerated: the length is ignored, the delimiter is its 8 bytes and
//!   nothing after it is consumed as its value. The bytes are passed through as received, so
//!   reassembly is exact either way.
//! - Encapsulated pixel data with no item at all (not even the Basic Offset Table, PS3.5 A.4)
//!   is tolerated: its bulk value is just the 8-byte sequence delimiter.
//! - An explicit VR that is not one of the 34 of PS3.5 §6.2 is an error, never a guess; so is
//!   undefined length on an explicit VR other than SQ, UN, OB, OW.
//! - Any other (FFFE,xxxx) tag, an item outside a sequence, an element directly inside a
//!   sequence, a fragment of undefined length, or a delimiter that closes nothing is an error.

/// Most undefined-length sequences open inside each other.
pub const MAX_SEQUENCE_DEPTH: usize = 64;

use super::error::{SplitError, Tag, VrBytes};
use super::piece::{Piece, Splice};
use crate::dicom::{
    is_known_vr, read_header, Encoding, NeedMore, ITEM, ITEM_DELIMITATION as ITEM_DELIM,
    SEQUENCE_DELIMITATION as SEQ_DELIM, UNDEFINED_LENGTH as UNDEFINED,
};

/// (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data, (7FE0,0010) Pixel Data.
fn is_pixel(tag: u32) -> bool {
    matches!(tag, 0x7FE0_0008 | 0x7FE0_0009 | 0x7FE0_0010)
}

/// An open undefined-length construct.
#[derive(Clone, Copy)]
struct Frame {
    kind: FrameKind,
    /// Encoding of the contents: differs from the parent inside an explicit `UN` of undefined
    /// length, whose content is Implicit VR Little Endian (PS3.5 §6.2.2 note).
    enc: Encoding,
    /// Tag and stream offset of the header that opened it, for error messages.
    tag: u32,
    start: u64,
}

#[derive(Clone, Copy)]
enum FrameKind {
    /// Undefined-length sequence (or nested encapsulated value): expects items, then (FFFE,E0DD).
    Sequence,
    /// Undefined-length item: expects elements, then (FFFE,E00D).
    Item,
    /// Top-level encapsulated pixel data (PS3.5 A.4): items of defined length, then (FFFE,E0DD),
    /// all of it bulk.
    Encapsulated {
        header_offset: u64,
        value_offset: u64,
        bulk_start: u64,
    },
}

#[derive(Clone, Copy)]
enum State {
    /// Reading an element / item header into `hdr`.
    Header,
    /// Passing through `remaining` bytes of a defined-length value.
    Value { remaining: u64, bulk: bool },
}

/// Splits a data set byte stream into metadata and bulk pixel data; see the module docs.
pub struct Splitter {
    base: Encoding,
    state: State,
    hdr: [u8; 12],
    hdr_len: usize,
    /// 8, or 12 once an explicit VR with a 4-byte length has been seen.
    hdr_need: usize,
    /// Stream offset and metadata offset where the current header started.
    hdr_in: u64,
    hdr_meta: u64,
    /// Tag and header offset of the value being passed through (for truncation errors).
    val_tag: u32,
    val_in: u64,
    stack: Vec<Frame>,
    splices: Vec<Splice>,
    bytes_in: u64,
    meta_len: u64,
    bulk_len: u64,
    /// After an error the stream position is meaningless: every later call repeats the error.
    failed: Option<SplitError>,
}

/// Coalesces consecutive bytes of the same side into one `emit` call.
struct Runs<'a, F: FnMut(Piece<'a>)> {
    input: &'a [u8],
    start: usize,
    pos: usize,
    bulk: bool,
    emit: F,
}

impl<'a, F: FnMut(Piece<'a>)> Runs<'a, F> {
    fn take(&mut self, n: usize, bulk: bool) {
        if bulk != self.bulk {
            self.flush();
            self.bulk = bulk;
        }
        self.pos += n;
    }

    fn flush(&mut self) {
        if self.pos > self.start {
            let s = &self.input[self.start..self.pos];
            (self.emit)(if self.bulk {
                Piece::Bulk(s)
            } else {
                Piece::Meta(s)
            });
        }
        self.start = self.pos;
    }
}

impl Splitter {
    /// A splitter for a data set in `encoding`, positioned at its first byte.
    pub fn new(encoding: Encoding) -> Splitter {
        Splitter {
            base: encoding,
            state: State::Header,
            hdr: [0; 12],
            hdr_len: 0,
            hdr_need: 8,
            hdr_in: 0,
            hdr_meta: 0,
            val_tag: 0,
            val_in: 0,
            stack: Vec::new(),
            splices: Vec::new(),
            bytes_in: 0,
            meta_len: 0,
            bulk_len: 0,
            failed: None,
        }
    }

    /// Bytes fed so far.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in
    }

    /// Metadata bytes emitted so far.
    pub fn meta_len(&self) -> u64 {
        self.meta_len
    }

    /// Bulk bytes emitted so far.
    pub fn bulk_len(&self) -> u64 {
        self.bulk_len
    }

    /// Feed the next chunk of the data set (any size, including 1 byte or 0). `emit` receives
    /// contiguous pieces in stream order: concatenating all `Meta` pieces gives the metadata,
    /// all `Bulk` pieces the bulk data. Pieces are sub-slices of `input`.
    ///
    /// On error, the pieces before the offending header have been emitted; the splitter is then
    /// dead and every later `feed`/`finish` returns the same error.
    pub fn feed<'a>(
        &mut self,
        input: &'a [u8],
        emit: impl FnMut(Piece<'a>),
    ) -> Result<(), SplitError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut runs = Runs {
            input,
            start: 0,
            pos: 0,
            bulk: false,
            emit,
        };
        let result = self.run(&mut runs);
        runs.flush();
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    fn run<'a, F: FnMut(Piece<'a>)>(&mut self, runs: &mut Runs<'a, F>) -> Result<(), SplitError> {
        let input = runs.input;
        while runs.pos < input.len() {
            let avail = input.len() - runs.pos;
            match self.state {
                State::Value { remaining, bulk } => {
                    // `n <= avail`, so the cast back to usize is lossless.
                    let n = remaining.min(avail as u64) as usize;
                    self.count(n, bulk);
                    runs.take(n, bulk);
                    let remaining = remaining - n as u64;
                    self.state = if remaining == 0 {
                        State::Header
                    } else {
                        State::Value { remaining, bulk }
                    };
                }
                State::Header => {
                    if self.hdr_len == 0 {
                        self.hdr_in = self.bytes_in;
                        self.hdr_meta = self.meta_len;
                    }
                    let n = (self.hdr_need - self.hdr_len).min(avail);
                    self.hdr[self.hdr_len..self.hdr_len + n]
                        .copy_from_slice(&input[runs.pos..runs.pos + n]);
                    self.hdr_len += n;
                    // Item headers inside top-level encapsulated pixel data are bulk (they are
                    // part of the value, PS3.5 A.4); every other header is metadata.
                    let bulk = matches!(
                        self.stack.last(),
                        Some(Frame {
                            kind: FrameKind::Encapsulated { .. },
                            ..
                        })
                    );
                    self.count(n, bulk);
                    runs.take(n, bulk);
                    if self.hdr_len == self.hdr_need {
                        self.on_header()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn count(&mut self, n: usize, bulk: bool) {
        let n = n as u64;
        self.bytes_in += n;
        if bulk {
            self.bulk_len += n;
        } else {
            self.meta_len += n;
        }
    }

    fn enc(&self) -> Encoding {
        self.stack.last().map_or(self.base, |f| f.enc)
    }

    /// `hdr[..hdr_need]` is filled: decode it, or learn that 4 more bytes follow (an explicit
    /// VR with a 4-byte length, PS3.5 §7.1.2).
    fn on_header(&mut self) -> Result<(), SplitError> {
        let h = match read_header(&self.hdr[..self.hdr_need], self.enc()) {
            Ok(h) => h,
            Err(NeedMore(n)) => {
                self.hdr_need = n;
                return Ok(());
            }
        };
        if let Some(vr) = h.vr {
            // The 34 VRs of PS3.5 §6.2 Table 6.2-1; anything else is rejected, not guessed.
            if !is_known_vr(&vr) {
                return Err(SplitError::InvalidVr {
                    offset: self.hdr_in,
                    tag: Tag::from_u32(h.tag),
                    vr: VrBytes(vr),
                });
            }
        }
        self.hdr_len = 0;
        self.hdr_need = 8;
        if h.is_item_tag() {
            self.on_item_tag(h.tag, h.length)
        } else {
            self.on_element(h.tag, h.vr, h.length)
        }
    }

    fn structure(&self, tag: u32, problem: &'static str) -> SplitError {
        SplitError::Structure {
            offset: self.hdr_in,
            tag: Tag::from_u32(tag),
            problem,
        }
    }

    fn skip(&mut self, tag: u32, len: u32, bulk: bool) {
        if len > 0 {
            self.val_tag = tag;
            self.val_in = self.hdr_in;
            self.state = State::Value {
                remaining: u64::from(len),
                bulk,
            };
        }
    }

    fn push(&mut self, kind: FrameKind, enc: Encoding, tag: u32) {
        self.stack.push(Frame {
            kind,
            enc,
            tag,
            start: self.hdr_in,
        });
    }

    /// An (FFFE,xxxx) header: item or delimiter (PS3.5 §7.5).
    fn on_item_tag(&mut self, tag: u32, len: u32) -> Result<(), SplitError> {
        let top = self.stack.last().copied();
        match (tag, top) {
            (
                ITEM,
                Some(
                    f @ Frame {
                        kind: FrameKind::Sequence,
                        ..
                    },
                ),
            ) => {
                if len == UNDEFINED {
                    self.push(FrameKind::Item, f.enc, tag);
                } else {
                    // Defined-length item: skipped whole, never inspected (PS3.5 §7.5.1).
                    self.skip(tag, len, false);
                }
                Ok(())
            }
            (
                ITEM,
                Some(Frame {
                    kind: FrameKind::Encapsulated { .. },
                    ..
                }),
            ) => {
                if len == UNDEFINED {
                    // Offset table and fragments always have an explicit length (PS3.5 A.4).
                    return Err(self.structure(tag, "fragment of undefined length"));
                }
                self.skip(tag, len, true);
                Ok(())
            }
            (ITEM, _) => Err(self.structure(tag, "item outside a sequence")),
            // The delimiters' length should be 0 (PS3.5 §7.5.2); a non-zero value is tolerated
            // and ignored (the 4 length bytes belong to the delimiter, nothing follows), as
            // common toolkits do. The bytes are kept as received, so reassembly is unaffected.
            (
                ITEM_DELIM,
                Some(Frame {
                    kind: FrameKind::Item,
                    ..
                }),
            ) => {
                self.stack.pop();
                Ok(())
            }
            (ITEM_DELIM, _) => Err(self.structure(tag, "item delimiter outside an item")),
            (
                SEQ_DELIM,
                Some(Frame {
                    kind: FrameKind::Sequence,
                    ..
                }),
            ) => {
                self.stack.pop();
                Ok(())
            }
            (
                SEQ_DELIM,
                Some(Frame {
                    kind:
                        FrameKind::Encapsulated {
                            header_offset,
                            value_offset,
                            bulk_start,
                        },
                    ..
                }),
            ) => {
                self.stack.pop();
                self.splices.push(Splice {
                    header_offset,
                    value_offset,
                    length: self.bulk_len - bulk_start,
                });
                Ok(())
            }
            (SEQ_DELIM, _) => Err(self.structure(tag, "sequence delimiter outside a sequence")),
            _ => Err(self.structure(tag, "unknown item/delimiter tag")),
        }
    }

    /// A data element header (not an item or delimiter).
    fn on_element(&mut self, tag: u32, vr: Option<[u8; 2]>, len: u32) -> Result<(), SplitError> {
        // Directly inside a sequence or encapsulated pixel data only items may appear
        // (PS3.5 §7.5.2, A.4).
        if let Some(Frame {
            kind: FrameKind::Sequence | FrameKind::Encapsulated { .. },
            ..
        }) = self.stack.last()
        {
            return Err(self.structure(tag, "element where an item was expected"));
        }
        // Explicit UN of undefined length: content is Implicit VR Little Endian whatever the
        // transfer syntax (PS3.5 §6.2.2 note). Applies to encapsulated pixel data received as
        // UN too (only matters under Explicit VR Big Endian).
        let inner = self.enc().inside(vr);
        if self.stack.is_empty() && is_pixel(tag) {
            // Top-level pixel data: the value is bulk, the header stays metadata.
            if len == UNDEFINED {
                // Encapsulated (PS3.5 A.4): everything up to and including the sequence
                // delimitation item is bulk; the splice is recorded when it ends.
                let kind = FrameKind::Encapsulated {
                    header_offset: self.hdr_meta,
                    value_offset: self.meta_len,
                    bulk_start: self.bulk_len,
                };
                self.push(kind, inner, tag);
            } else {
                // Native. Zero-length values get a zero-length splice too: one splice per
                // top-level pixel element, reassembly is the identity either way.
                self.splices.push(Splice {
                    header_offset: self.hdr_meta,
                    value_offset: self.meta_len,
                    length: u64::from(len),
                });
                self.skip(tag, len, true);
            }
            return Ok(());
        }
        if len == UNDEFINED {
            match vr {
                // Implicit VR: only sequences have undefined length (PS3.5 §7.5.1), and nested
                // encapsulated pixel data (e.g. an icon) has the same item structure. SQ and UN:
                // §7.5.1, §6.2.2. OB/OW: encapsulated pixel data nested in a sequence, which is
                // plain metadata but has to be walked to find its end (PS3.5 A.4).
                None | Some([b'S', b'Q'] | [b'U', b'N'] | [b'O', b'B'] | [b'O', b'W']) => {
                    let open = self
                        .stack
                        .iter()
                        .filter(|f| matches!(f.kind, FrameKind::Sequence))
                        .count();
                    if open >= MAX_SEQUENCE_DEPTH {
                        return Err(self.structure(tag, "sequences nested more than 64 deep"));
                    }
                    self.push(FrameKind::Sequence, inner, tag);
                    Ok(())
                }
                Some(vr) => Err(SplitError::UndefinedLength {
                    offset: self.hdr_in,
                    tag: Tag::from_u32(tag),
                    vr: VrBytes(vr),
                }),
            }
        } else {
            // Defined length: passed through uninspected, sequences included (PS3.5 §7.5.1).
            self.skip(tag, len, false);
            Ok(())
        }
    }

    /// End of the data set: the stream must end between two top-level elements (PS3.5 §7.1).
    /// Returns the splices, one per top-level pixel element, in stream order.
    pub fn finish(self) -> Result<Vec<Splice>, SplitError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if let State::Value { remaining, .. } = self.state {
            return Err(SplitError::TruncatedValue {
                offset: self.val_in,
                tag: Tag::from_u32(self.val_tag),
                missing: remaining,
            });
        }
        if self.hdr_len > 0 {
            return Err(SplitError::TruncatedHeader {
                offset: self.hdr_in,
            });
        }
        if let Some(f) = self.stack.last() {
            return Err(SplitError::Unterminated {
                offset: f.start,
                tag: Tag::from_u32(f.tag),
                what: match f.kind {
                    FrameKind::Sequence => "sequence",
                    FrameKind::Item => "item",
                    FrameKind::Encapsulated { .. } => "pixel data",
                },
            });
        }
        Ok(self.splices)
    }
}
