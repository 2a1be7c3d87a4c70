//! The ingest pipeline: one received data set in, two durable halves out.
//!
//! `network → dimse → ingest → {store, ledger}`. The DIMSE layer hands over the data set bytes as
//! they arrive ([`Incoming::feed`]); they are split on the fly, the bulk pixel bytes stream into a
//! staged object-store upload, everything is hashed on the way, and only the metadata is kept in
//! memory. [`Incoming::finish`] then parses the metadata for the index, derives the instance key,
//! commits the pixel object under its opaque name and records the instance on the ledger. It
//! returns success only when both halves are durable; any failure leaves no ledger entry.

use std::io::Read;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::instance::{self, IndexAttrs, Layout, MetadataRecord, ParseError};
use crate::ledger::{Ledger, LedgerError, RecordSummary, StoreOutcome, StoreRequest};
use crate::split::{Encoding, Piece, SplitError, Splitter};
use crate::store::{Store, StoreError, Upload};

/// Deflated Explicit VR Little Endian (PS3.5 §A.5).
pub const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";
/// Most bytes of a deflated data set inflated for indexing: the attributes we index sit at its
/// start, so the rest is never inflated (and a deflate bomb costs at most this much).
const MAX_INFLATED: u64 = 4 * 1024 * 1024;

/// Why an instance was not stored. Mapped to DIMSE statuses in `dimse::status`, nowhere else.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    Split(#[from] SplitError),
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("deflated data set cannot be inflated: {0}")]
    Deflate(String),
    #[error("SOP Class UID {dataset} in the data set differs from {command} in the command")]
    SopClassMismatch { command: String, dataset: String },
    #[error("data set exceeds {max} bytes of metadata (node.max_metadata_bytes)")]
    MetadataTooLarge { max: usize },
    #[error("object store: {0}")]
    Store(#[from] StoreError),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
}

/// Who sent the instance and what the command said it is.
#[derive(Debug, Clone)]
pub struct StoreContext {
    pub calling_ae: String,
    /// The AE title the sender called us by (for forward rules).
    pub called_ae: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
}

/// The result of a successful ingest.
#[derive(Debug, Clone)]
pub struct Stored {
    pub outcome: StoreOutcome,
    pub instance_key: instance::Digest32,
    pub attrs: IndexAttrs,
    pub dataset_length: u64,
}

/// How busy ingest is: data sets being received now, and when the last one began or ended.
/// Background work (forwarding) reads it to give way to incoming instances.
#[derive(Debug)]
pub struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds since `epoch` of the last begin or end.
    last_ms: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            in_flight: Default::default(),
            last_ms: Default::default(),
            epoch: std::time::Instant::now(),
        }
    }
}

impl Activity {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a data set is being received, or one began or ended within `quiet`.
    pub fn busy(&self, quiet: Duration) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.in_flight.load(Relaxed) > 0 {
            return true;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_ms.load(Relaxed)) < quiet.as_millis() as u64
            && self.last_ms.load(Relaxed) > 0
    }
}

/// Counts one data set in flight for as long as it lives.
struct InFlight(std::sync::Arc<Activity>);

impl InFlight {
    fn new(a: std::sync::Arc<Activity>) -> InFlight {
        a.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        a.touch();
        InFlight(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.0.touch();
    }
}

/// The shared pipeline: a cheap handle.
#[derive(Clone)]
pub struct Pipeline {
    ledger: Ledger,
    store: Store,
    store_timeout: Duration,
    max_metadata: usize,
    router: std::sync::Arc<crate::forward::Router>,
    activity: std::sync::Arc<Activity>,
}

impl Pipeline {
    /// `max_metadata` bounds the bytes of one data set held in memory (everything but the bulk
    /// pixel data, which streams to the store).
    pub fn new(
        ledger: Ledger,
        store: Store,
        store_timeout: Duration,
        max_metadata: usize,
    ) -> Pipeline {
        Pipeline {
            ledger,
            store,
            store_timeout,
            max_metadata,
            router: Default::default(),
            activity: Default::default(),
        }
    }

    /// How busy this pipeline is (shared with whoever should give way to it).
    pub fn activity(&self) -> std::sync::Arc<Activity> {
        self.activity.clone()
    }

    /// Queues every stored instance that matches a rule of `router` for forwarding.
    pub fn with_router(mut self, router: crate::forward::Router) -> Pipeline {
        self.router = std::sync::Arc::new(router);
        self
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Starts receiving one data set encoded in `transfer_syntax`.
    pub fn begin(&self, transfer_syntax: &str) -> Incoming {
        let ts = transfer_syntax.trim_end_matches(['\0', ' ']).to_string();
        let mode = match Encoding::from_transfer_syntax(&ts) {
            Some(enc) => Mode::Split(Box::new(Splitter::new(enc))),
            None => Mode::Whole,
        };
        Incoming {
            _in_flight: InFlight::new(self.activity.clone()),
            pipeline: self.clone(),
            transfer_syntax: ts,
            mode,
            meta: Vec::new(),
            bulk: Vec::new(),
            upload: None,
            pixel_hash: Sha256::new(),
            pixel_length: 0,
            dataset_hash: Sha256::new(),
            dataset_length: 0,
        }
    }

    async fn timed<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.timed_scaled(what, 1, fut).await
    }

    async fn timed_scaled<T>(
        &self,
        what: &str,
        scale: u32,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let after = self.store_timeout * scale;
        match tokio::time::timeout(after, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout {
                what: what.to_string(),
                after,
            }),
        }
    }
}

enum Mode {
    Split(Box<Splitter>),
    /// Kept whole: see [`Layout::Whole`].
    Whole,
}

/// One data set being received.
pub struct Incoming {
    _in_flight: InFlight,
    pipeline: Pipeline,
    transfer_syntax: String,
    mode: Mode,
    meta: Vec<u8>,
    /// Bulk bytes of the current chunk, reused between chunks.
    bulk: Vec<u8>,
    upload: Option<Upload>,
    pixel_hash: Sha256,
    pixel_length: u64,
    dataset_hash: Sha256,
    dataset_length: u64,
}

impl Incoming {
    /// Takes the next chunk of the data set. On error the caller must [`Incoming::abort`].
    pub async fn feed(&mut self, data: &[u8]) -> Result<(), IngestError> {
        self.dataset_hash.update(data);
        self.dataset_length += data.len() as u64;
        let max = self.pipeline.max_metadata;
        let splitter = match &mut self.mode {
            Mode::Whole => {
                if self.meta.len() + data.len() > max {
                    return Err(IngestError::MetadataTooLarge { max });
                }
                self.meta.extend_from_slice(data);
                return Ok(());
            }
            Mode::Split(s) => s,
        };
        self.bulk.clear();
        let (meta, bulk) = (&mut self.meta, &mut self.bulk);
        splitter.feed(data, |piece| match piece {
            Piece::Meta(b) => meta.extend_from_slice(b),
            Piece::Bulk(b) => bulk.extend_from_slice(b),
        })?;
        // Checked per chunk: the overshoot is at most one PDU.
        if self.meta.len() > max {
            return Err(IngestError::MetadataTooLarge { max });
        }
        if self.bulk.is_empty() {
            return Ok(());
        }
        self.pixel_hash.update(&self.bulk);
        self.pixel_length += self.bulk.len() as u64;
        if self.upload.is_none() {
            let store = self.pipeline.store.clone();
            self.upload = Some(self.pipeline.timed("begin upload", store.begin()).await?);
        }
        if let Some(upload) = self.upload.as_mut() {
            let pipeline = &self.pipeline;
            pipeline
                .timed("write object", upload.write(&self.bulk))
                .await?;
        }
        Ok(())
    }

    /// Discards a data set that will not be stored.
    pub async fn abort(mut self) {
        if let Some(u) = self.upload.take() {
            u.abort().await;
        }
    }

    /// Completes the data set: index, key, object commit, ledger entry.
    pub async fn finish(mut self, ctx: &StoreContext) -> Result<Stored, IngestError> {
        let upload = self.upload.take();
        match self.finish_inner(ctx, upload).await {
            Ok(s) => Ok(s),
            Err((e, Some(upload))) => {
                upload.abort().await;
                Err(e)
            }
            Err((e, None)) => Err(e),
        }
    }

    async fn finish_inner(
        self,
        ctx: &StoreContext,
        upload: Option<Upload>,
    ) -> Result<Stored, (IngestError, Option<Upload>)> {
        if self.dataset_length == 0 {
            return Err((
                IngestError::Parse(ParseError::Missing("any data set bytes")),
                upload,
            ));
        }
        let (layout, splices) = match self.mode {
            Mode::Split(s) => match s.finish() {
                Ok(splices) => (Layout::Split, splices),
                Err(e) => return Err((e.into(), upload)),
            },
            Mode::Whole => (Layout::Whole, Vec::new()),
        };
        let mut record = MetadataRecord {
            layout,
            transfer_syntax: self.transfer_syntax,
            sop_class_uid: String::new(),
            sop_instance_uid: String::new(),
            splices,
            pixel_length: self.pixel_length,
            pixel_sha256: self.pixel_hash.finalize().into(),
            dataset_length: self.dataset_length,
            dataset_sha256: self.dataset_hash.finalize().into(),
            meta: self.meta,
        };
        let attrs = match index_record(&record, (&ctx.sop_class_uid, &ctx.sop_instance_uid)) {
            Ok(a) => a,
            Err(e) => return Err((e, upload)),
        };
        if attrs.sop_class_uid != ctx.sop_class_uid {
            let e = IngestError::SopClassMismatch {
                command: ctx.sop_class_uid.clone(),
                dataset: attrs.sop_class_uid.clone(),
            };
            return Err((e, upload));
        }
        if attrs.sop_instance_uid != ctx.sop_instance_uid {
            // Real files carry a File Meta SOP Instance UID that differs from the data set's, and
            // senders put the former in the command. The data set is what is stored and indexed.
            tracing::warn!("SOP Instance UID of the data set differs from the command's; indexing the data set's");
        }
        record.sop_class_uid = attrs.sop_class_uid.clone();
        record.sop_instance_uid = attrs.sop_instance_uid.clone();
        let encoded = record.encode();
        let key = instance::instance_key(&encoded);
        let object_name = match upload {
            Some(upload) => {
                let name = instance::object_name(&key);
                // Committing a large object (an S3 multipart completion and server-side copy)
                // takes time in proportion to its size: one timeout per started 16 MiB.
                let p = &self.pipeline;
                let scale = 1 + (record.pixel_length / (16 * 1024 * 1024)) as u32;
                p.timed_scaled("commit object", scale, upload.commit(&name))
                    .await
                    .map_err(|e| (IngestError::from(e), None))?;
                Some(name)
            }
            None => None,
        };
        let dataset_length = record.dataset_length;
        let forward_to = self.pipeline.router.destinations(&crate::forward::Route {
            calling_ae: &ctx.calling_ae,
            called_ae: &ctx.called_ae,
            modality: &attrs.modality,
            sop_class_uid: &attrs.sop_class_uid,
        });
        let req = StoreRequest {
            calling_ae: ctx.calling_ae.clone(),
            instance_key: key,
            summary: RecordSummary::of(&record),
            record: encoded,
            object_name,
            attrs: attrs.clone(),
            forward_to,
        };
        // The encoded copy travels on; the metadata need not stay in memory twice meanwhile.
        drop(record);
        let outcome = self
            .pipeline
            .ledger
            .store(req)
            .await
            .map_err(|e| (IngestError::from(e), None))?;
        Ok(Stored {
            outcome,
            instance_key: key,
            attrs,
            dataset_length,
        })
    }
}

/// Reads the index attributes of a record (inflating the start of a deflated data set first).
/// `fallback` is the command's (SOP Class UID, SOP Instance UID), used where the data set lacks
/// them.
pub fn index_record(
    record: &MetadataRecord,
    fallback: (&str, &str),
) -> Result<IndexAttrs, IngestError> {
    let attrs = match Encoding::from_transfer_syntax(&record.transfer_syntax) {
        Some(enc) => {
            let prefix = record.indexable_prefix();
            let mut attrs = instance::index_attrs(prefix, enc, fallback, false)?;
            (attrs.modality, attrs.find_values) = crate::find::index_values(prefix, enc, false);
            attrs
        }
        None => {
            let (inflated, complete) = inflate_start(&record.meta)?;
            // The inflated form is Explicit VR Little Endian (PS3.5 §A.5).
            let enc = Encoding::ExplicitLittle;
            let mut attrs = instance::index_attrs(&inflated, enc, fallback, !complete)?;
            (attrs.modality, attrs.find_values) =
                crate::find::index_values(&inflated, enc, !complete);
            attrs
        }
    };
    Ok(attrs)
}

/// Inflates up to [`MAX_INFLATED`] bytes; says whether that was the whole stream.
pub(crate) fn inflate_start(deflated: &[u8]) -> Result<(Vec<u8>, bool), IngestError> {
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(deflated)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut out)
        .map_err(|e| IngestError::Deflate(e.to_string()))?;
    let complete = out.len() as u64 <= MAX_INFLATED;
    out.truncate(MAX_INFLATED as usize);
    Ok((out, complete))
}
