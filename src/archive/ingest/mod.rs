//! The ingest pipeline: one received data set in, two durable halves out.
//!
//! `network → dimse → ingest → {store, ledger}`. The DIMSE layer hands over the data set bytes as
//! they arrive ([`Incoming::feed`]); they are split on the fly, the bulk pixel bytes stream into a
//! staged object-store upload, everything is hashed on the way, and only the metadata is kept in
//! memory. [`Incoming::finish`] then parses the metadata for the index, derives the instance key,
//! places the pixel object under its opaque name, and makes the object and the ledger entry
//! durable at the same time. It returns success only when both halves are durable. A failure
//! before the entry leaves none; an object that fails to become durable after its entry was
//! written leaves the entry recorded as unacknowledged (see `ledger::unacked`).

use std::collections::HashSet;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::instance::{self, IndexAttrs, Layout, MetadataRecord, ParseError};
use crate::ledger::{Ledger, LedgerError, NoteId, RecordSummary, StoreOutcome, StoreRequest};
use crate::split::{Encoding, Piece, SplitError, Splitter};
use crate::store::{Store, StoreError, Upload};

/// How long an object's sync waits for the ledger's group commit before it starts anyway (the
/// order only lets both share a journal commit; see `Incoming::finish_inner`).
const SYNC_AFTER_LEDGER_WAIT: Duration = Duration::from_millis(500);

pub use crate::memory::COPIES;

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
    #[error("node is receiving too much at once: {max} bytes held across associations (node.max_bytes_in_flight); try again later")]
    MemoryBudget { max: usize },
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

/// Permits of the [`Budget`] held by one data set, shown in the `bytes_in_flight` gauge.
struct Charge(tokio::sync::OwnedSemaphorePermit);

impl Charge {
    fn bytes(&self) -> usize {
        self.0.num_permits()
    }

    fn grow(&mut self, more: tokio::sync::OwnedSemaphorePermit) {
        gauge(more.num_permits() as i64);
        self.0.merge(more);
    }

    fn shrink(&mut self, less: usize) {
        if let Some(given_back) = self.0.split(less) {
            gauge(-(given_back.num_permits() as i64));
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        gauge(-(self.0.num_permits() as i64));
    }
}

fn gauge(delta: i64) {
    crate::ops::metrics::global()
        .bytes_in_flight
        .fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
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
    budget: Option<std::sync::Arc<Budget>>,
}

/// The bytes of incoming data sets all associations may hold in memory together: each
/// [`Incoming`] holds permits for what it keeps (its metadata, and pixel bytes an S3 upload
/// has not sent yet), taken as it grows and given back as it shrinks or ends.
#[derive(Debug)]
pub struct Budget {
    bytes: std::sync::Arc<tokio::sync::Semaphore>,
    max: usize,
    /// Longest a data set waits for its share before its C-STORE fails.
    wait: Duration,
}

impl Budget {
    pub fn new(max: usize, wait: Duration) -> Budget {
        Budget {
            bytes: std::sync::Arc::new(tokio::sync::Semaphore::new(max)),
            max,
            wait,
        }
    }

    /// Bytes held right now.
    pub fn held(&self) -> usize {
        self.max - self.bytes.available_permits()
    }
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
            budget: None,
        }
    }

    /// Bounds the bytes held in memory by all data sets being received at once.
    pub fn with_budget(mut self, budget: Budget) -> Pipeline {
        self.budget = Some(std::sync::Arc::new(budget));
        self
    }

    /// The memory budget, if any (for metrics).
    pub fn budget(&self) -> Option<std::sync::Arc<Budget>> {
        self.budget.clone()
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
            upload: None,
            pixel_hash: Sha256::new(),
            pixel_length: 0,
            dataset_hash: Sha256::new(),
            dataset_length: 0,
            charge: None,
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
    upload: Option<Upload>,
    pixel_hash: Sha256,
    pixel_length: u64,
    dataset_hash: Sha256,
    dataset_length: u64,
    /// This data set's share of the pipeline's [`Budget`].
    charge: Option<Charge>,
}

/// Makes room for `more` bytes of metadata: by doubling, as a `Vec` grows, but not past `max`
/// unless the bytes need it. The [`Budget`] charges capacity, so a data set just under the
/// limit is not charged for twice its size.
fn make_room(meta: &mut Vec<u8>, more: usize, max: usize) {
    let need = meta.len() + more;
    if need > meta.capacity() {
        let target = (meta.capacity() * 2).min(max).max(need);
        meta.reserve_exact(target - meta.len());
    }
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
                make_room(&mut self.meta, data.len(), max);
                self.meta.extend_from_slice(data);
                return self.account().await;
            }
            Mode::Split(s) => s,
        };
        // The bulk pieces are slices of `data`: hashed and handed to the store without a copy.
        let mut bulk: Vec<&[u8]> = Vec::new();
        let meta = &mut self.meta;
        splitter.feed(data, |piece| match piece {
            Piece::Meta(b) => {
                make_room(meta, b.len(), max);
                meta.extend_from_slice(b)
            }
            Piece::Bulk(b) => bulk.push(b),
        })?;
        // Checked per chunk: the overshoot is at most one PDU.
        if self.meta.len() > max {
            return Err(IngestError::MetadataTooLarge { max });
        }
        if bulk.is_empty() {
            return self.account().await;
        }
        for piece in &bulk {
            self.pixel_hash.update(piece);
            self.pixel_length += piece.len() as u64;
        }
        if self.upload.is_none() {
            let store = self.pipeline.store.clone();
            self.upload = Some(self.pipeline.timed("begin upload", store.begin()).await?);
        }
        if let Some(upload) = self.upload.as_mut() {
            let pipeline = &self.pipeline;
            for piece in bulk {
                pipeline.timed("write object", upload.write(piece)).await?;
            }
        }
        self.account().await
    }

    /// Brings this data set's share of the budget to what it holds now (allocated capacity,
    /// so growth by doubling counts): more permits when it grew, some given back when it shrank.
    /// Only a data set that holds nothing yet waits for its share (in arrival order, up to the
    /// budget's wait); one that already holds some and needs more fails at once when the bytes
    /// are not free, so that data sets never wait on each other while holding memory.
    async fn account(&mut self) -> Result<(), IngestError> {
        let Some(budget) = &self.pipeline.budget else {
            return Ok(());
        };
        let held = COPIES * self.meta.capacity() + self.upload.as_ref().map_or(0, Upload::buffered);
        let charged = self.charge.as_ref().map_or(0, Charge::bytes);
        if held > charged {
            let max = budget.max;
            if held > max {
                return Err(IngestError::MemoryBudget { max });
            }
            let more =
                u32::try_from(held - charged).map_err(|_| IngestError::MemoryBudget { max })?;
            let got = if charged == 0 {
                tokio::time::timeout(budget.wait, budget.bytes.clone().acquire_many_owned(more))
                    .await
                    .ok()
                    .and_then(Result::ok)
            } else {
                budget.bytes.clone().try_acquire_many_owned(more).ok()
            };
            match got {
                Some(permit) => match &mut self.charge {
                    Some(c) => c.grow(permit),
                    None => {
                        gauge(permit.num_permits() as i64);
                        self.charge = Some(Charge(permit));
                    }
                },
                None => return Err(IngestError::MemoryBudget { max }),
            }
        } else if held < charged {
            if let Some(c) = &mut self.charge {
                c.shrink(charged - held);
            }
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
        // Placing and syncing a large object (an S3 multipart completion and server-side copy;
        // the tail of a large file) takes time in proportion to its size: one timeout per
        // started 16 MiB.
        let scale = 1 + (record.pixel_length / (16 * 1024 * 1024)) as u32;
        let (object_name, object_key, note, placed) = match upload {
            Some(upload) => {
                let (name, object_key) = upload.name_for(&key);
                // Noted before the object becomes visible: a crash from here until the object
                // and the entry are both durable leaves the object findable by `reconcile` at
                // the next start.
                let note = match self.pipeline.ledger.intend_object(&name, &key).await {
                    Ok(note) => note,
                    Err(e) => return Err((e.into(), Some(upload))),
                };
                let p = &self.pipeline;
                let placed = p
                    .timed_scaled("commit object", scale, upload.place(&name))
                    .await
                    .map_err(|e| (IngestError::from(e), None))?;
                (Some(name), Some(object_key), Some(note), Some(placed))
            }
            None => (None, None, None, None),
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
            object_name: object_name.clone(),
            object_key,
            attrs: attrs.clone(),
            forward_to,
        };
        // The encoded copy travels on; the metadata need not stay in memory twice meanwhile.
        drop(record);
        let outcome = self
            .pipeline
            .commit(req, placed, scale, object_name.as_deref(), note)
            .await
            .map_err(|e| (e, None))?;
        Ok(Stored {
            outcome,
            instance_key: key,
            attrs,
            dataset_length,
        })
    }
}

impl Pipeline {
    /// Commits the entry and syncs the object, and settles what the outcome leaves: a duplicate's
    /// new object is discarded, an entry whose object did not become durable is recorded as
    /// unacknowledged (and the C-STORE fails), a durable one's note is released.
    async fn commit(
        &self,
        req: StoreRequest,
        placed: Option<crate::store::Placed>,
        scale: u32,
        object_name: Option<&str>,
        note: Option<NoteId>,
    ) -> Result<StoreOutcome, IngestError> {
        // The response waits for the entry's group commit and the object's sync. Until both are
        // done the note stays: a crash between them leaves an entry whose object `reconcile`
        // checks at the next start (see `ledger::unacked`).
        //
        // The ledger goes first, and the object's sync after it: on a journaling file system
        // (ext4, XFS) the object's allocation and directory entry were made before the entry
        // was written, so the WAL's sync commits them in the same journal transaction, and the
        // object's own sync then finds little or nothing left to commit. Started at once, the
        // object's sync could commit a transaction just before the WAL grew, and the WAL's
        // sync then needed a second commit after it (docs/PERFORMANCE.md). The order is only for speed:
        // a ledger slower than `SYNC_AFTER_LEDGER_WAIT` has the object synced meanwhile.
        let sync = async {
            match placed {
                Some(p) => self.timed_scaled("sync object", scale, p.sync()).await,
                None => Ok(()),
            }
        };
        let stored = self.ledger.store(req);
        tokio::pin!(stored);
        let (synced, outcome) =
            match tokio::time::timeout(SYNC_AFTER_LEDGER_WAIT, &mut stored).await {
                Ok(outcome) => (sync.await, outcome),
                Err(_) => tokio::join!(sync, stored),
            };
        let outcome = outcome?;
        if let (StoreOutcome::Duplicate { seq }, Some(name), Some(note)) =
            (outcome, object_name, note)
        {
            self.discard_duplicate_object(seq, name, note).await;
        }
        // An object that did not become durable fails the C-STORE. Its entry is recorded as
        // unacknowledged at once, so the sender's retry is stored as a new version rather than
        // taken for a duplicate of an entry whose object may be lost; the note stays for
        // `reconcile`, which deletes the object at the next start.
        if let Err(e) = synced {
            if let StoreOutcome::Stored { seq, .. } = outcome {
                if let Err(le) = self.ledger.record_unacknowledged(seq).await {
                    tracing::error!(seq, error = %le, "cannot record an entry whose object did not become durable; the next start checks it");
                }
            }
            return Err(IngestError::from(e));
        }
        if let (StoreOutcome::Stored { .. }, Some(note)) = (outcome, note) {
            self.ledger.object_durable(note);
        }
        Ok(outcome)
    }

    /// A re-sent instance was a duplicate: the object just committed for it is named by no
    /// entry (a sealed object has its own name), so it goes, and then its pending note. If the
    /// deletion fails the note stays and [`reconcile`] deletes it at the next start.
    async fn discard_duplicate_object(&self, seq: u64, name: &str, note: NoteId) {
        let ledger = self.ledger.clone();
        let kept = tokio::task::spawn_blocking(move || ledger.entry(seq)).await;
        // Deleted only when the entry is known to name another object; otherwise the note stays
        // for `reconcile`, which checks at the next start.
        let other = match kept {
            Ok(Ok(Some(e))) => e.object_name != name,
            _ => return,
        };
        if other {
            if let Err(e) = self
                .timed("delete duplicate object", self.store.delete(name))
                .await
            {
                tracing::warn!(object = %name, error = %e, "cannot delete the object of a duplicate C-STORE; deleted at the next start");
                return;
            }
        }
        if let Err(e) = self.ledger.clear_note(note) {
            tracing::warn!(object = %name, error = %e, "cannot clear a pending-object note");
        }
    }
}

/// The node master key for a writer (the node, `import`), held to the ledger: a key file that
/// does not match the check value the ledger keeps, or a missing one while the ledger holds
/// sealed objects, stops the start (a new key would make every stored object unreadable). A
/// new key is created only for a ledger without sealed objects.
pub fn master_key(
    ledger: &Ledger,
    path: &std::path::Path,
) -> Result<crate::store::MasterKey, String> {
    let check = ledger.master_check().map_err(|e| e.to_string())?;
    let key = match crate::store::MasterKey::load(path)? {
        Some(k) => k,
        None if check.is_some() || ledger.has_sealed_objects().map_err(|e| e.to_string())? => {
            return Err(format!(
                "{} is missing, but this ledger holds objects sealed under a master key: restore \
                 that key file (a new key would leave every stored object unreadable)",
                path.display()
            ))
        }
        None => crate::store::MasterKey::load_or_create(path)?,
    };
    matches_check(check.as_deref(), &key, path)?;
    if check.is_none() {
        ledger
            .set_master_check(&key.check_value())
            .map_err(|e| e.to_string())?;
    }
    Ok(key)
}

/// Err unless `key` matches the check value the ledger keeps (if it keeps one yet).
fn matches_check(
    check: Option<&[u8]>,
    key: &crate::store::MasterKey,
    path: &std::path::Path,
) -> Result<(), String> {
    match check {
        Some(c) if c != key.check_value() => Err(format!(
            "{} is not the master key this ledger's objects are sealed with: restore the right \
             key file",
            path.display()
        )),
        _ => Ok(()),
    }
}

/// The master key for a reader beside the node (export, verify): `None` when the file does not
/// exist (then no object can be read, and each says why not); an error
/// when it is not the key the ledger's objects are sealed with.
pub fn read_master_key(
    ledger: &Ledger,
    path: &std::path::Path,
) -> Result<Option<std::sync::Arc<crate::store::MasterKey>>, String> {
    let Some(key) = crate::store::MasterKey::load(path)? else {
        return Ok(None);
    };
    let check = ledger.master_check().map_err(|e| e.to_string())?;
    matches_check(check.as_deref(), &key, path)?;
    Ok(Some(std::sync::Arc::new(key)))
}

/// How far back from the head `reconcile` looks for the entries of recorded notes.
const RECONCILE_WITHIN: u64 = 1_000_000;

/// Startup reconciliation after a crash: every pixel object that was about to be committed
/// when the node stopped ([`Ledger::pending_objects`]) is deleted if the ledger does not record
/// its instance (its C-STORE never got a success response). One it records is checked against
/// its entry: ingest makes the object and the entry durable at the same time, so a crash can
/// leave an entry whose object is missing or incomplete; that entry is recorded as
/// unacknowledged (see `ledger::unacked`) and the object deleted. Each deletion is logged by
/// opaque object name; a note the store cannot answer for now stays for the next start.
/// Returns how many objects were deleted.
pub async fn reconcile(ledger: &Ledger, store: &Store) -> Result<usize, IngestError> {
    let pending = {
        let ledger = ledger.clone();
        tokio::task::spawn_blocking(move || ledger.pending_objects())
            .await
            .map_err(|e| LedgerError::Corrupt(e.to_string()))??
    };
    let entries = {
        let ledger = ledger.clone();
        let names: Vec<String> = pending
            .iter()
            .filter(|p| p.recorded)
            .map(|p| p.name.clone())
            .collect();
        tokio::task::spawn_blocking(move || {
            let names = names.iter().map(String::as_str).collect();
            ledger.entries_naming(&names, RECONCILE_WITHIN)
        })
        .await
        .map_err(|e| LedgerError::Corrupt(e.to_string()))??
    };
    let mut deleted = 0;
    // An object can have two notes (its own, and one a crash kept from deletion): once is enough.
    let mut handled = HashSet::new();
    for p in pending {
        let name = &p.name;
        if handled.contains(name) {
            ledger.clear_pending_object(&p)?;
            continue;
        }
        let lost = match (p.recorded, entries.get(name)) {
            (false, _) => true,
            // Further back than the entries looked at ([`RECONCILE_WITHIN`]): kept unchecked,
            // never deleted on a guess.
            (true, None) => false,
            (true, Some(entry)) if ledger.is_unacknowledged(entry.seq)? => true,
            (true, Some(entry)) => {
                let Some(key) = ledger.object_key(name)? else {
                    // Erased meanwhile: its note stays for the next start.
                    continue;
                };
                match store.digest(name, &key).await {
                    Ok((len, digest))
                        if len == entry.pixel_length && digest == entry.pixel_sha256 =>
                    {
                        false
                    }
                    Ok(_) | Err(StoreError::NotFound { .. }) | Err(StoreError::Damaged { .. }) => {
                        let event = ledger.record_unacknowledged(entry.seq).await?;
                        tracing::warn!(seq = entry.seq, event, object = %name, "the pixel object of an entry did not survive a crash before its C-STORE was acknowledged; recorded on the ledger (a re-send stores it again)");
                        true
                    }
                    Err(e) => {
                        tracing::warn!(object = %name, error = %e, "cannot check the object of an interrupted C-STORE; checked at the next start");
                        continue;
                    }
                }
            }
        };
        if lost {
            if let Err(e) = store.delete(name).await {
                // Kept noted: the next start tries again.
                tracing::warn!(object = %name, error = %e, "cannot delete the object of an interrupted C-STORE");
                continue;
            }
            tracing::warn!(object = %name, "deleted a pixel object of a C-STORE interrupted before its success response");
            deleted += 1;
        }
        ledger.clear_pending_object(&p)?;
        handled.insert(p.name);
    }
    Ok(deleted)
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
            (attrs.modality, attrs.find_values) =
                crate::query::index::index_values(prefix, enc, false);
            attrs
        }
        None => {
            let (inflated, complete) = super::retrieve::inflate_start(&record.meta)
                .map_err(|e| IngestError::Deflate(e.to_string()))?;
            // The inflated form is Explicit VR Little Endian (PS3.5 §A.5).
            let enc = Encoding::ExplicitLittle;
            let mut attrs = instance::index_attrs(&inflated, enc, fallback, !complete)?;
            (attrs.modality, attrs.find_values) =
                crate::query::index::index_values(&inflated, enc, !complete);
            attrs
        }
    };
    Ok(attrs)
}

#[cfg(test)]
mod tests;
