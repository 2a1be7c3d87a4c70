//! Reassembly: turning (metadata, splices, bulk) back into the received data set.
//!
//! [`plan`] is pure arithmetic on offsets so that a reader can stream the segments from wherever
//! metadata and bulk are stored (ledger, object store, ranged reads) without holding the whole
//! instance; [`reconstruct`] is the in-memory convenience built on it.

use super::error::SplitError;
use super::piece::Splice;

/// One contiguous run of the rebuilt data set: a byte range of the metadata or of the bulk
/// stream (`start..end`, end exclusive). Empty ranges are never produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Meta { start: u64, end: u64 },
    Bulk { start: u64, end: u64 },
}

/// Ordered segments that rebuild the data set from metadata of `meta_len` bytes and the bulk
/// stream described by `splices`.
///
/// Checks that the splices are what [`Splitter`](super::splitter::Splitter) produces: in order, each
/// pixel header (8 or 12 bytes, PS3.5 §7.1.2) lying after the previous splice point and within
/// the metadata, and the total bulk length representable. The total bulk length expected is the
/// `end` of the last `Bulk` segment (0 if none).
pub fn plan(meta_len: u64, splices: &[Splice]) -> Result<Vec<Segment>, SplitError> {
    let mut segments = Vec::with_capacity(2 * splices.len() + 1);
    let mut meta_pos = 0u64;
    let mut bulk_pos = 0u64;
    for (index, s) in splices.iter().enumerate() {
        let bad = |problem| SplitError::BadSplice { index, problem };
        if s.header_offset < meta_pos {
            return Err(bad("out of order"));
        }
        if !matches!(s.value_offset.checked_sub(s.header_offset), Some(8 | 12)) {
            return Err(bad("header is not 8 or 12 bytes"));
        }
        if s.value_offset > meta_len {
            return Err(bad("beyond the end of the metadata"));
        }
        let bulk_end = bulk_pos
            .checked_add(s.length)
            .ok_or(bad("bulk length overflows"))?;
        // value_offset > header_offset >= meta_pos, so this Meta segment is never empty.
        segments.push(Segment::Meta {
            start: meta_pos,
            end: s.value_offset,
        });
        if s.length > 0 {
            segments.push(Segment::Bulk {
                start: bulk_pos,
                end: bulk_end,
            });
        }
        meta_pos = s.value_offset;
        bulk_pos = bulk_end;
    }
    if meta_len > meta_pos {
        segments.push(Segment::Meta {
            start: meta_pos,
            end: meta_len,
        });
    }
    Ok(segments)
}

/// Total bulk length the splices describe (saturating; [`plan`] rejects overflow).
pub fn bulk_total(splices: &[Splice]) -> u64 {
    splices
        .iter()
        .fold(0u64, |acc, s| acc.saturating_add(s.length))
}

/// Rebuild the data set in memory. Errors if the splices don't fit `meta` (see [`plan`]) or if
/// `bulk` is not exactly as long as the splices' lengths added up.
pub fn reconstruct(meta: &[u8], splices: &[Splice], bulk: &[u8]) -> Result<Vec<u8>, SplitError> {
    let segments = plan(meta.len() as u64, splices)?;
    let expected = bulk_total(splices);
    if expected != bulk.len() as u64 {
        return Err(SplitError::BulkLength {
            expected,
            actual: bulk.len() as u64,
        });
    }
    let mut out = Vec::with_capacity(meta.len() + bulk.len());
    for seg in segments {
        // plan() bounded every range by meta.len() / the checked bulk total, so the casts are
        // lossless and the slicing in bounds.
        match seg {
            Segment::Meta { start, end } => {
                out.extend_from_slice(&meta[start as usize..end as usize])
            }
            Segment::Bulk { start, end } => {
                out.extend_from_slice(&bulk[start as usize..end as usize])
            }
        }
    }
    Ok(out)
}
