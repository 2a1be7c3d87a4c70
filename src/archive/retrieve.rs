//! Reconstruction: the mirror image of ingest. The ledger entry names the instance key; the key
//! finds the metadata record and the pixel object; the two are spliced back into exactly the
//! received data set, and every digest is checked on the way: the record against the instance key,
//! the pixel bytes against the record, the rebuilt data set against the record. The digests are
//! only known at the end, so callers write into something they can discard (export: a temp file
//! that is renamed only when `rebuild` returned Ok).

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::instance::ObjectKey;
use crate::instance::{self, Digest32, MetadataRecord};
use crate::ledger::{Entry, Ledger, LedgerError, Reason};
use crate::split::{self, Segment};
use crate::store::{ObjectReader, Store, StoreError};

/// Why an instance could not be rebuilt. `Integrity` means the halves no longer match the ledger.
#[derive(Debug, thiserror::Error)]
pub enum RetrieveError {
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("object store: {0}")]
    Store(#[from] StoreError),
    #[error("integrity check failed: {1}")]
    Integrity(Reason, String),
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
    /// The instance was erased (not damage: nothing of it is left to send).
    #[error("the instance of ledger entry {seq} was erased by entry {by}")]
    Erased { seq: u64, by: u64 },
}

impl RetrieveError {
    /// What failed, when the instance no longer matches the ledger (as opposed to an outage).
    pub fn integrity_reason(&self) -> Option<Reason> {
        match self {
            RetrieveError::Integrity(r, _) => Some(*r),
            _ => None,
        }
    }
}

fn integrity(reason: Reason, msg: impl Into<String>) -> RetrieveError {
    RetrieveError::Integrity(reason, msg.into())
}

/// What rebuilding an instance needs besides the object store: its checked metadata record
/// and the key record of its pixel object (none when it has no pixel object).
pub struct Instance {
    pub record: MetadataRecord,
    pub object_key: Option<ObjectKey>,
}

/// [`load_record`] and the key record of the entry's pixel object.
pub fn load_instance(ledger: &Ledger, entry: &Entry) -> Result<Instance, RetrieveError> {
    let record = load_record(ledger, entry)?;
    let object_key = if entry.object_name.is_empty() {
        None
    } else {
        ledger.object_key(&entry.object_name)?
    };
    // Without its key record an object cannot be opened: erased, or damage.
    if object_key.is_none() && !entry.object_name.is_empty() {
        if let Some(by) = ledger.erased_by(entry.seq)? {
            return Err(RetrieveError::Erased { seq: entry.seq, by });
        }
        return Err(integrity(
            Reason::Pixel,
            format!(
                "the key record of pixel object {} is missing",
                entry.object_name
            ),
        ));
    }
    Ok(Instance { record, object_key })
}

/// What looks like damage may be an erasure that happened while the instance was being read
/// (its object deleted, its key record gone): the erasure entry, if the ledger (caught up with
/// the node when this is a read-only view) now says the instance was erased.
pub fn erased_meanwhile(ledger: &Ledger, entry: &Entry, e: &RetrieveError) -> Option<u64> {
    if let RetrieveError::Erased { by, .. } = e {
        return Some(*by);
    }
    e.integrity_reason()?;
    ledger.catch_up();
    ledger.erased_by(entry.seq).ok().flatten()
}

/// A read error of a pixel object: one that fails authentication is damage, not an outage.
fn read_error(e: StoreError) -> RetrieveError {
    match e {
        StoreError::Damaged { name, reason } => {
            integrity(Reason::Pixel, format!("pixel object {name}: {reason}"))
        }
        e => e.into(),
    }
}

/// Most bytes of a deflated data set inflated for indexing and matching: the attributes the index
/// keeps sit at its start, so the rest is never inflated (and a deflate bomb costs at most this).
pub const MAX_INFLATED: u64 = 4 * 1024 * 1024;

/// Inflates up to [`MAX_INFLATED`] bytes of a deflated data set; says whether that was the whole
/// stream.
pub fn inflate_start(deflated: &[u8]) -> std::io::Result<(Vec<u8>, bool)> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(deflated)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut out)?;
    let complete = out.len() as u64 <= MAX_INFLATED;
    out.truncate(MAX_INFLATED as usize);
    Ok((out, complete))
}

/// Loads and checks the metadata record an entry commits to.
pub fn load_record(ledger: &Ledger, entry: &Entry) -> Result<MetadataRecord, RetrieveError> {
    let Some(raw) = ledger.record_of(entry)? else {
        if let Some(by) = ledger.erased_by(entry.seq)? {
            return Err(RetrieveError::Erased { seq: entry.seq, by });
        }
        return Err(integrity(
            Reason::Metadata,
            format!("metadata of ledger entry {} is missing", entry.seq),
        ));
    };
    if instance::instance_key(&raw) != entry.instance_key {
        return Err(integrity(
            Reason::Metadata,
            format!(
                "metadata of ledger entry {} does not match its instance key",
                entry.seq
            ),
        ));
    }
    let record =
        MetadataRecord::decode(&raw).map_err(|e| integrity(Reason::Metadata, e.to_string()))?;
    if record.pixel_sha256 != entry.pixel_sha256 || record.dataset_sha256 != entry.dataset_sha256 {
        return Err(integrity(
            Reason::Metadata,
            format!("ledger entry {} disagrees with its metadata", entry.seq),
        ));
    }
    Ok(record)
}

/// Rebuilds the data set of `entry` into `out` (any `std::io::Write`) from its `instance`, which
/// the caller got from [`load_instance`] (already checked against the instance key), checking the
/// pixel and data set digests on the way. On error, `out` may hold partial data: callers must
/// discard it.
pub async fn rebuild<W: std::io::Write + Send>(
    store: &Store,
    entry: &Entry,
    instance: &Instance,
    out: &mut W,
) -> Result<(), RetrieveError> {
    rebuild_into(store, entry, instance, &mut WriteSink(out)).await
}

/// Where rebuilt bytes go.
pub trait Sink {
    fn put(
        &mut self,
        bytes: &[u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

struct WriteSink<'w, W>(&'w mut W);

impl<W: std::io::Write + Send> Sink for WriteSink<'_, W> {
    async fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_all(bytes)
    }
}

/// Sends the rebuilt bytes in chunks of `size` over a channel, so a large instance streams to
/// its destination while it is read; the last chunk is sent by [`ChunkSink::finish`].
pub struct ChunkSink {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    size: usize,
}

impl ChunkSink {
    pub fn new(tx: tokio::sync::mpsc::Sender<Vec<u8>>, size: usize) -> ChunkSink {
        ChunkSink {
            tx,
            buf: Vec::with_capacity(size),
            size: size.max(2),
        }
    }

    pub async fn finish(self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.tx.send(self.buf).await.map_err(|_| gone())?;
        }
        Ok(())
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "receiver gone")
}

impl Sink for ChunkSink {
    async fn put(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let n = (self.size - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == self.size {
                let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.size));
                self.tx.send(full).await.map_err(|_| gone())?;
            }
        }
        Ok(())
    }
}

/// [`rebuild`] into any [`Sink`]. The digests are known only at the end: a caller streaming the
/// bytes onwards must hold back the end of the data set until this returns Ok.
pub async fn rebuild_into<S: Sink>(
    store: &Store,
    entry: &Entry,
    instance: &Instance,
    out: &mut S,
) -> Result<(), RetrieveError> {
    let record = &instance.record;
    let key = instance.object_key.as_ref();
    // One digest over everything sent: the data set digest covers the pixel bytes too, so the
    // pixel digest is computed only to name the damaged part once the data set one fails.
    let mut dataset_hash = Sha256::new();
    let segments = split::plan(record.meta.len() as u64, &record.splices)
        .map_err(|e| integrity(Reason::Metadata, format!("splices: {e}")))?;
    let mut reader = match (record.pixel_length, entry.object_name.as_str()) {
        (0, _) => None,
        (_, "") => {
            return Err(integrity(
                Reason::Metadata,
                "entry has pixel data but no object name",
            ))
        }
        (_, name) => {
            let key = key.ok_or_else(|| {
                integrity(
                    Reason::Pixel,
                    format!("the key record of pixel object {name} is missing"),
                )
            })?;
            match store.open_read(name, key).await {
                Ok(r) => Some(BulkReader::new(r)),
                Err(StoreError::NotFound { name }) => {
                    return Err(integrity(
                        Reason::MissingObject,
                        format!("pixel object {name} is missing"),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    for seg in segments {
        match seg {
            Segment::Meta { start, end } => {
                let b = &record.meta[start as usize..end as usize];
                dataset_hash.update(b);
                out.put(b).await?;
            }
            Segment::Bulk { start, end } => {
                let reader = reader
                    .as_mut()
                    .ok_or_else(|| integrity(Reason::Metadata, "bulk segment without object"))?;
                let mut left = end - start;
                while left > 0 {
                    let chunk = reader.take(left).await?;
                    dataset_hash.update(&chunk);
                    out.put(&chunk).await?;
                    left -= chunk.len() as u64;
                }
            }
        }
    }
    if let Some(r) = reader.as_mut() {
        if !r.at_end().await? {
            return Err(integrity(
                Reason::Pixel,
                "pixel object is longer than recorded",
            ));
        }
    }
    let dataset: Digest32 = dataset_hash.finalize().into();
    if dataset != record.dataset_sha256 {
        if record.pixel_length > 0 && !pixel_object_matches(store, entry, instance).await {
            return Err(integrity(
                Reason::Pixel,
                "pixel data does not match the ledger (SHA-256 differs)",
            ));
        }
        return Err(integrity(
            Reason::Dataset,
            "rebuilt data set does not match the ledger (SHA-256 differs)",
        ));
    }
    Ok(())
}

/// Whether the pixel object still hashes to the recorded pixel digest (read again: only after
/// a failed data set check, to say which half is damaged).
async fn pixel_object_matches(store: &Store, entry: &Entry, instance: &Instance) -> bool {
    let record = &instance.record;
    let Some(key) = &instance.object_key else {
        return false;
    };
    let Ok(r) = store.open_read(&entry.object_name, key).await else {
        return false;
    };
    let mut reader = BulkReader::new(r);
    let mut hash = Sha256::new();
    let mut left = record.pixel_length;
    while left > 0 {
        match reader.take(left).await {
            Ok(chunk) if !chunk.is_empty() => {
                hash.update(&chunk);
                left -= chunk.len() as u64;
            }
            _ => return false,
        }
    }
    let digest: Digest32 = hash.finalize().into();
    digest == record.pixel_sha256
}

/// Pulls exact byte counts out of an object's chunk stream.
struct BulkReader {
    reader: ObjectReader,
    pending: Bytes,
}

impl BulkReader {
    fn new(reader: ObjectReader) -> Self {
        BulkReader {
            reader,
            pending: Bytes::new(),
        }
    }

    /// Up to `max` next bytes (at least one); an integrity error at a premature end.
    async fn take(&mut self, max: u64) -> Result<Bytes, RetrieveError> {
        while self.pending.is_empty() {
            match self.reader.next_chunk().await.map_err(read_error)? {
                Some(c) => self.pending = c,
                None => {
                    return Err(integrity(
                        Reason::Pixel,
                        "pixel object is shorter than recorded",
                    ))
                }
            }
        }
        let n = (max as usize).min(self.pending.len());
        Ok(self.pending.split_to(n))
    }

    async fn at_end(&mut self) -> Result<bool, RetrieveError> {
        while self.pending.is_empty() {
            match self.reader.next_chunk().await.map_err(read_error)? {
                Some(c) => self.pending = c,
                None => return Ok(true),
            }
        }
        Ok(false)
    }
}

/// Encodes a Part 10 header (PS3.10 §7.1): 128-byte preamble, "DICM", and the File Meta
/// Information group in Explicit VR Little Endian. The data set bytes follow unchanged.
pub fn part10_header(record: &MetadataRecord, source_ae: &str) -> Vec<u8> {
    crate::dicom::part10::write(
        &record.sop_class_uid,
        &record.sop_instance_uid,
        &record.transfer_syntax,
        source_ae,
    )
}
