//! Query/Retrieve operations that run beside their association: C-FIND (matches stream out as
//! pending responses), C-MOVE (sub-operations over an association we open to the destination)
//! and C-GET (sub-operations over the requesting association). Each runs as a task that hands
//! the association loop [`Outgoing`] messages; the loop sends them, routes C-CANCEL to the
//! shared flag and, for C-GET, the requestor's C-STORE responses back to the task.
//!
//! Retrieval sends only what was checked: every instance is rebuilt from its ledger record and
//! pixel object with every digest verified (instance key, pixel SHA-256, data set SHA-256)
//! before its first byte leaves. A mismatch fails that sub-operation and is recorded on the
//! ledger as a security event. The next instance is rebuilt while the current one is sent, and
//! at most [`PREFETCH`] instances wait in memory, so a study of any size streams through a few
//! instances' worth of memory.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::dimse::command::{field, store_rq, tag, Command, CommandBuilder, NO_DATA_SET};
use crate::dimse::scu::Scu;
use crate::dimse::status::{self, Failure};
use crate::acl::Permission;
use crate::config::PeerConfig;
use crate::query::{self, dataset, matching, FindError, FindOptions};
use crate::ledger::{Entry, Ledger, SpooledEvent};
use crate::archive::retrieve;
use crate::split::Encoding;
use crate::store::Store;

/// Instances rebuilt ahead of the one being sent.
const PREFETCH: usize = 1;
/// Longest wait for a C-STORE response from a destination.
pub(crate) const SUBOP_TIMEOUT: Duration = Duration::from_secs(120);
/// Command Data Set Type for "a data set follows" (any value but 0x0101, PS3.7 §E.2).
const DATA_SET_PRESENT: u16 = 0x0001;

pub use crate::dicom::uids::{PATIENT_ROOT_GET, PATIENT_ROOT_MOVE, STUDY_ROOT_GET, STUDY_ROOT_MOVE};

const NATIVE: [&str; 3] = [
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.2",
];

/// The information model of a MOVE or GET SOP class.
pub fn retrieve_model(sop_class: &str) -> Option<matching::Model> {
    match sop_class {
        PATIENT_ROOT_MOVE | PATIENT_ROOT_GET => Some(matching::Model::PatientRoot),
        STUDY_ROOT_MOVE | STUDY_ROOT_GET => Some(matching::Model::StudyRoot),
        _ => None,
    }
}

/// What an operation asks the association loop to send.
pub enum Outgoing {
    /// A command with its whole data set, if any. `last`: the final response, the operation is
    /// over.
    Message {
        context_id: u8,
        command: Vec<u8>,
        data: Option<Vec<u8>>,
        last: bool,
    },
    /// A command whose data set follows in [`Outgoing::Data`] pieces (a streamed instance).
    Command { context_id: u8, command: Vec<u8> },
    /// A piece of a data set; `last` ends it.
    Data {
        context_id: u8,
        bytes: Vec<u8>,
        last: bool,
    },
    /// End the association with an A-ABORT: a streamed instance failed its check after part of
    /// it was sent, and only an abort keeps the requestor from completing it.
    Abort(String),
}

fn message(context_id: u8, command: Vec<u8>, data: Option<Vec<u8>>, last: bool) -> Outgoing {
    Outgoing::Message {
        context_id,
        command,
        data,
        last,
    }
}

/// What the C-FIND, C-MOVE and C-GET tasks need from the node.
#[derive(Clone)]
pub struct Services {
    pub ledger: Ledger,
    pub store: Store,
    pub ae_title: String,
    pub max_pdu_length: u32,
    pub peers: Vec<PeerConfig>,
    pub event_spool: PathBuf,
    /// Instances larger than this stream: sent while they are read from the object store, the
    /// end held back until the whole data set has passed its check
    /// (`node.max_retrieve_buffer_bytes`).
    pub stream_above: u64,
    /// Access rules, checked again before every sub-operation (a revocation stops a retrieval
    /// in progress).
    pub acl: Arc<crate::acl::LiveAcl>,
}

/// The request a retrieval answers.
pub struct Request {
    pub context_id: u8,
    pub message_id: u16,
    pub sop_class_uid: String,
    /// Encoding of the request's context, for the identifier of the final response.
    pub encoding: Encoding,
    pub calling_ae: String,
    /// The requesting association's peer address.
    pub peer: String,
}

/// On whose behalf an instance is rebuilt: named in the security event when it fails its
/// check, so that the alert says who asked for the damaged instance and from where.
#[derive(Debug, Clone)]
pub struct Requester {
    /// What found it: `c-move`, `c-get`, `forward`.
    pub detector: &'static str,
    /// The requesting association's calling AE title; empty when the node itself asked.
    pub calling_ae: String,
    /// Its peer address (empty as `calling_ae`).
    pub peer: String,
}

impl Requester {
    /// The node itself (forwarding).
    pub fn node(detector: &'static str) -> Requester {
        Requester {
            detector,
            calling_ae: String::new(),
            peer: String::new(),
        }
    }

    /// The association that sent `req`.
    fn of(detector: &'static str, req: &Request) -> Requester {
        Requester {
            detector,
            calling_ae: req.calling_ae.clone(),
            peer: req.peer.clone(),
        }
    }
}

fn response(req: &Request, command_field: u16) -> CommandBuilder {
    CommandBuilder::new()
        .uid(tag::AFFECTED_SOP_CLASS_UID, &req.sop_class_uid)
        .u16(tag::COMMAND_FIELD, command_field)
        .u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, req.message_id)
}

/// C-FIND on a blocking thread (RocksDB reads): each match is a pending response.
pub fn run_find(
    services: &Services,
    req: &Request,
    q: &matching::Query,
    opts: &FindOptions,
    cancel: &AtomicBool,
    out: &mpsc::Sender<Outgoing>,
) {
    let started = Instant::now();
    let mut sent = 0usize;
    let result = query::run(
        &services.ledger,
        q,
        opts,
        req.encoding,
        cancel,
        |identifier| {
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            sent += 1;
            let command = response(req, field::C_FIND_RSP)
                .u16(tag::COMMAND_DATA_SET_TYPE, DATA_SET_PRESENT)
                .u16(tag::STATUS, status::PENDING)
                .encode();
            out.blocking_send(message(req.context_id, command, Some(identifier), false))
                .is_ok()
        },
    );
    let (code, comment) = match &result {
        Ok(_) if cancel.load(Ordering::Relaxed) => (status::CANCEL, None),
        Ok(_) => (status::SUCCESS, None),
        Err(FindError::Cancelled) => (status::CANCEL, None),
        Err(e) => {
            let f = super::status::find_error(e);
            (f.status, Some(f.comment))
        }
    };
    info!(
        level = q.level.name(),
        matches = sent,
        status = format!("{code:04X}"),
        ms = started.elapsed().as_millis() as u64,
        "C-FIND answered"
    );
    let mut rsp = response(req, field::C_FIND_RSP)
        .u16(tag::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
        .u16(tag::STATUS, code);
    if let Some(c) = comment {
        rsp = rsp.text(tag::ERROR_COMMENT, &c, status::ERROR_COMMENT_MAX);
    }
    let _ = out.blocking_send(message(req.context_id, rsp.encode(), None, true));
}

/// Sub-operation counts (PS3.4 C.4.2.1.6).
#[derive(Default)]
struct Counts {
    remaining: u16,
    completed: u16,
    failed: u16,
    warning: u16,
    failed_uids: Vec<String>,
    /// Sub-operations done so far, uncapped (the counts above saturate at 65 535).
    attempted: usize,
}

impl Counts {
    fn put(&self, b: CommandBuilder, remaining: bool) -> CommandBuilder {
        let b = if remaining {
            b.u16(tag::REMAINING_SUBOPERATIONS, self.remaining)
        } else {
            b
        };
        b.u16(tag::COMPLETED_SUBOPERATIONS, self.completed)
            .u16(tag::FAILED_SUBOPERATIONS, self.failed)
            .u16(tag::WARNING_SUBOPERATIONS, self.warning)
    }

    /// Ends a retrieval that was not cancelled: whatever was not attempted (a destination
    /// that went away, a requestor that left) counts as failed.
    fn close(&mut self, uids: &[String], cancelled: bool) {
        if cancelled {
            return;
        }
        for uid in uids.iter().skip(self.attempted) {
            self.fail(uid);
        }
        self.remaining = 0;
    }

    fn fail(&mut self, uid: &str) {
        self.failed = self.failed.saturating_add(1);
        self.failed_uids.push(uid.to_string());
        self.attempted += 1;
    }
}

/// An instance rebuilt and checked against the ledger, ready to go.
pub(crate) struct Ready {
    pub(crate) uid: String,
    pub(crate) sop_class_uid: String,
    pub(crate) transfer_syntax: String,
    pub(crate) body: Body,
}

/// Why an instance cannot be sent.
#[derive(Debug)]
pub(crate) enum PrepareError {
    /// It fails its ledger check (recorded as a security event): never send it.
    Integrity(String),
    /// It cannot be rebuilt now (object store or ledger unavailable): may work later.
    Unavailable(String),
    /// It was erased meanwhile: nothing to send, ever.
    Erased(String),
}

/// Piece size of a streamed instance.
const STREAM_CHUNK: usize = 1024 * 1024;

pub(crate) enum Body {
    /// Rebuilt and checked in memory.
    Whole(Vec<u8>),
    /// Being rebuilt: pieces arrive on `chunks`, the last one only after the check passed;
    /// `verified` gives the check's outcome.
    Stream {
        chunks: mpsc::Receiver<Vec<u8>>,
        verified: tokio::sync::oneshot::Receiver<Result<(), crate::dimse::scu::CheckFailure>>,
    },
}

/// Rebuilds the latest version of one instance and checks it; `None` (and a logged, recorded
/// failure) when it cannot be sent.
async fn prepare(services: &Services, uid: &str, requester: &Requester) -> Option<Ready> {
    let entry = match services.ledger.latest(uid) {
        Ok(Some(e)) => e,
        Ok(None) => return None,
        Err(e) => {
            warn!(error = %e, "ledger read failed during retrieval");
            return None;
        }
    };
    prepare_entry(services, entry, Some(uid), requester)
        .await
        .ok()
}

/// Rebuilds the instance of one stored entry and checks it. A failed check is logged and
/// recorded as a security event. `uid` is the SOP Instance UID to send it under (by default the
/// one in its metadata record).
pub(crate) async fn prepare_entry(
    services: &Services,
    entry: Entry,
    uid: Option<&str>,
    requester: &Requester,
) -> Result<Ready, PrepareError> {
    let instance = match retrieve::load_instance(&services.ledger, &entry) {
        Ok(r) => r,
        Err(e) => return Err(failed_check(services, &entry, &e, requester)),
    };
    let (class, syntax) = (entry.sop_class_uid.clone(), entry.transfer_syntax.clone());
    let uid = uid.map_or_else(|| instance.record.sop_instance_uid.clone(), str::to_string);
    let ready = move |body| Ready {
        uid,
        sop_class_uid: class,
        transfer_syntax: syntax,
        body,
    };
    let dataset_length = instance.record.dataset_length;
    if dataset_length > services.stream_above {
        let (tx, chunks) = mpsc::channel(2);
        let (done, verified) = tokio::sync::oneshot::channel();
        let services = services.clone();
        let requester = requester.clone();
        tokio::spawn(async move {
            let mut sink = retrieve::ChunkSink::new(tx, STREAM_CHUNK);
            let result =
                match retrieve::rebuild_into(&services.store, &entry, &instance, &mut sink).await {
                    Ok(()) => sink.finish().await.map_err(retrieve::RetrieveError::from),
                    Err(e) => Err(e),
                };
            match &result {
                // The sender gave up on this instance (no context for it): not a failure of it.
                Err(retrieve::RetrieveError::Io(e))
                    if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) => {
                    failed_check(&services, &entry, e, &requester);
                }
                Ok(()) => {}
            }
            let _ = done.send(result.map_err(|e| crate::dimse::scu::CheckFailure {
                integrity: e.integrity_reason().is_some(),
                why: e.to_string(),
            }));
        });
        return Ok(ready(Body::Stream { chunks, verified }));
    }
    let mut bytes = Vec::with_capacity(dataset_length as usize);
    match retrieve::rebuild(&services.store, &entry, &instance, &mut bytes).await {
        Ok(()) => Ok(ready(Body::Whole(bytes))),
        Err(e) => Err(failed_check(services, &entry, &e, requester)),
    }
}

/// Logs a rebuild failure; one that is an integrity failure becomes a security event.
fn failed_check(
    services: &Services,
    entry: &Entry,
    e: &retrieve::RetrieveError,
    requester: &Requester,
) -> PrepareError {
    if retrieve::erased_meanwhile(&services.ledger, entry, e).is_some() {
        info!(seq = entry.seq, "instance erased; not sent");
        return PrepareError::Erased(e.to_string());
    }
    if let Some(reason) = e.integrity_reason() {
        warn!(seq = entry.seq, error = %e, calling = %requester.calling_ae, peer = %requester.peer, "instance fails its ledger check; not sent");
        let ev = SpooledEvent {
            subject_seq: entry.seq,
            reason,
            detector: requester.detector.into(),
            calling_ae: requester.calling_ae.clone(),
            peer: requester.peer.clone(),
        };
        if let Err(e) = ev.write(&services.event_spool) {
            warn!(error = %e, "cannot record the security event");
        }
        PrepareError::Integrity(reason.describe().to_string())
    } else {
        warn!(seq = entry.seq, error = %e, "instance cannot be rebuilt");
        PrepareError::Unavailable(e.to_string())
    }
}

/// Rebuilds `uids` in order on a separate task, at most [`PREFETCH`] ahead of the sender.
fn prefetch(
    services: Services,
    uids: Vec<String>,
    requester: Requester,
    cancel: Arc<AtomicBool>,
) -> mpsc::Receiver<(String, Option<Ready>)> {
    let (tx, rx) = mpsc::channel(PREFETCH);
    tokio::spawn(async move {
        for uid in uids {
            if cancel.load(Ordering::Relaxed) {
                break;
            }
            let ready = prepare(&services, &uid, &requester).await;
            if tx.send((uid, ready)).await.is_err() {
                break;
            }
        }
    });
    rx
}

/// How an instance goes out on the contexts the peer accepted: as stored, or converted between
/// the uncompressed syntaxes. `None` when no accepted context can carry it faithfully.
fn choose_context(
    contexts: &[(u8, String, String)],
    sop_class: &str,
    ts: &str,
) -> Option<(u8, String)> {
    let same_class = || contexts.iter().filter(|c| c.1 == sop_class);
    if let Some(c) = same_class().find(|c| c.2 == ts) {
        return Some((c.0, c.2.clone()));
    }
    if NATIVE.contains(&ts) {
        for native in NATIVE {
            if let Some(c) = same_class().find(|c| c.2 == native) {
                return Some((c.0, c.2.clone()));
            }
        }
    }
    None
}

/// The presentation contexts to propose for instances of these (SOP class, stored syntax) pairs:
/// per pair, one context offering only the stored syntax, so that an acceptor which takes it
/// cannot pick another, and for uncompressed data one offering the other uncompressed syntaxes
/// as a fallback (converted on the way). At most 128 (the PS3.8 limit).
pub(crate) fn proposals(pairs: &[(String, String)]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for (class, ts) in pairs {
        out.push((class.clone(), vec![ts.clone()]));
    }
    for (class, ts) in pairs {
        if NATIVE.contains(&ts.as_str()) {
            let others: Vec<String> = NATIVE
                .iter()
                .filter(|n| **n != ts)
                .map(|n| n.to_string())
                .collect();
            if !out.iter().any(|(c, t)| c == class && *t == others) {
                out.push((class.clone(), others));
            }
        }
    }
    out.truncate(128);
    out
}

/// Re-encodes a data set between uncompressed transfer syntaxes.
fn convert(bytes: &[u8], from: &str, to: &str) -> Result<Vec<u8>, String> {
    use dicom_encoding::TransferSyntaxIndex;
    use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
    let from_ts = TransferSyntaxRegistry
        .get(from)
        .ok_or("unknown source syntax")?;
    let to_ts = TransferSyntaxRegistry
        .get(to)
        .ok_or("unknown target syntax")?;
    let obj = dicom_object::InMemDicomObject::read_dataset_with_ts(bytes, from_ts)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(bytes.len());
    obj.write_dataset_with_ts(&mut out, to_ts)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// The final response of a C-MOVE or C-GET, with the Failed SOP Instance UID List when needed.
fn final_response(
    req: &Request,
    command_field: u16,
    counts: &Counts,
    cancelled: bool,
    refused: Option<Failure>,
) -> Outgoing {
    let mut b = response(req, command_field);
    let code = match (&refused, cancelled) {
        (Some(f), _) => {
            b = b.text(tag::ERROR_COMMENT, &f.comment, status::ERROR_COMMENT_MAX);
            f.status
        }
        (None, true) => status::CANCEL,
        // Every sub-operation failed: a failure, not a warning (PS3.4 C.4.2.1.5).
        (None, false) if counts.failed > 0 && counts.completed == 0 && counts.warning == 0 => {
            b = b.text(
                tag::ERROR_COMMENT,
                "no sub-operation succeeded",
                status::ERROR_COMMENT_MAX,
            );
            status::UNABLE_TO_PERFORM_SUBOPERATIONS
        }
        (None, false) if counts.failed > 0 || counts.warning > 0 => status::SUBOPERATIONS_FAILED,
        (None, false) => status::SUCCESS,
    };
    b = counts.put(b.u16(tag::STATUS, code), cancelled);
    let data = (!counts.failed_uids.is_empty() && code != status::SUCCESS).then(|| {
        // A UI value has a 2-byte length in explicit VR: list as many as fit.
        let mut list = String::new();
        for uid in &counts.failed_uids {
            if list.len() + uid.len() + 1 > 0xFFF0 {
                break;
            }
            if !list.is_empty() {
                list.push('\\');
            }
            list.push_str(uid);
        }
        let el = dataset::Element {
            tag: 0x0008_0058,
            vr: *b"UI",
            value: dataset::Value::Bytes(dataset::padded(b"UI", list.as_bytes()).into()),
        };
        let mut out = Vec::new();
        dataset::write(&[el], req.encoding, &mut out);
        out
    });
    b = b.u16(
        tag::COMMAND_DATA_SET_TYPE,
        if data.is_some() {
            DATA_SET_PRESENT
        } else {
            NO_DATA_SET
        },
    );
    message(req.context_id, b.encode(), data, true)
}

fn pending(req: &Request, command_field: u16, counts: &Counts) -> Outgoing {
    let b = response(req, command_field)
        .u16(tag::STATUS, status::PENDING)
        .u16(tag::COMMAND_DATA_SET_TYPE, NO_DATA_SET);
    message(req.context_id, counts.put(b, true).encode(), None, false)
}

/// Resolves the identifier to the instances to send (blocking ledger reads).
async fn resolve(
    services: &Services,
    q: matching::Query,
    cancel: &Arc<AtomicBool>,
) -> Result<Vec<String>, Failure> {
    let ledger = services.ledger.clone();
    let cancel = cancel.clone();
    match tokio::task::spawn_blocking(move || query::instances(&ledger, &q, &cancel)).await {
        Ok(Ok(uids)) => Ok(uids),
        Ok(Err(e)) => Err(super::status::find_error(&e)),
        Err(e) => Err(Failure::new(
            status::UNABLE_TO_PROCESS,
            format!("query failed: {e}"),
        )),
    }
}

/// C-MOVE: resolve, open an association to the destination, send every instance by C-STORE.
pub async fn run_move(
    services: Services,
    req: Request,
    destination: String,
    q: matching::Query,
    cancel: Arc<AtomicBool>,
    out: mpsc::Sender<Outgoing>,
) {
    let started = Instant::now();
    let mut counts = Counts::default();
    let Some(peer) = services
        .peers
        .iter()
        .find(|p| p.ae_title.trim() == destination.trim())
        .cloned()
    else {
        info!(destination = %destination, "C-MOVE to an unknown destination refused");
        let f = Failure::new(status::MOVE_DESTINATION_UNKNOWN, "move destination unknown");
        let _ = out
            .send(final_response(
                &req,
                field::C_MOVE_RSP,
                &counts,
                false,
                Some(f),
            ))
            .await;
        return;
    };
    let uids = match resolve(&services, q, &cancel).await {
        Ok(u) => u,
        Err(f) => {
            let _ = out
                .send(final_response(
                    &req,
                    field::C_MOVE_RSP,
                    &counts,
                    false,
                    Some(f),
                ))
                .await;
            return;
        }
    };
    counts.remaining = uids.len().min(u16::MAX as usize) as u16;
    if uids.is_empty() {
        let _ = out
            .send(final_response(
                &req,
                field::C_MOVE_RSP,
                &counts,
                false,
                None,
            ))
            .await;
        return;
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    for uid in &uids {
        if let Ok(Some(e)) = services.ledger.latest(uid) {
            let pair = (e.sop_class_uid.clone(), e.transfer_syntax.clone());
            if !pairs.contains(&pair) {
                pairs.push(pair);
            }
        }
    }
    let proposals = proposals(&pairs);
    let connect = || {
        Scu::connect(
            &peer.host,
            peer.port,
            &services.ae_title,
            &peer.ae_title,
            &proposals,
            services.max_pdu_length,
            SUBOP_TIMEOUT,
        )
    };
    let mut scu = match connect().await {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(destination = %peer.ae_title, error = %e, "cannot open the association for C-MOVE");
            for uid in &uids {
                counts.fail(uid);
            }
            counts.remaining = 0;
            let f = Failure::new(
                status::UNABLE_TO_PERFORM_SUBOPERATIONS,
                "cannot reach the move destination",
            );
            let _ = out
                .send(final_response(
                    &req,
                    field::C_MOVE_RSP,
                    &counts,
                    false,
                    Some(f),
                ))
                .await;
            return;
        }
    };
    let requester = Requester::of("c-move", &req);
    let mut ready = prefetch(services.clone(), uids.clone(), requester, cancel.clone());
    let mut unreachable = false;
    let mut revoked = None;
    while let Some((uid, instance)) = ready.recv().await {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        revoked = revocation(
            &services,
            &[
                (&req.calling_ae, "requester"),
                (&peer.ae_title, "destination"),
            ],
            Permission::Move,
        );
        if revoked.is_some() {
            break;
        }
        counts.remaining = counts.remaining.saturating_sub(1);
        // A destination that aborted (it may refuse one instance that way) gets a new
        // association for the rest.
        if scu.is_none() {
            match connect().await {
                Ok(s) => scu = Some(s),
                Err(e) => {
                    warn!(destination = %peer.ae_title, error = %e, "cannot reopen the association for C-MOVE");
                    counts.fail(&uid);
                    unreachable = true;
                    break;
                }
            }
        }
        let Some(assoc) = scu.as_mut() else { break };
        let contexts: Vec<(u8, String, String)> = assoc
            .contexts
            .iter()
            .map(|c| (c.id, c.abstract_syntax.clone(), c.transfer_syntax.clone()))
            .collect();
        let originator = Some((req.calling_ae.as_str(), req.message_id));
        match instance {
            None => counts.fail(&uid),
            Some(Ready {
                sop_class_uid,
                transfer_syntax,
                body:
                    Body::Stream {
                        mut chunks,
                        verified,
                    },
                ..
            }) => {
                let Some(ctx) = stream_context(&contexts, &sop_class_uid, &transfer_syntax) else {
                    chunks.close();
                    drop(verified);
                    info!("sub-operation not performed: the destination did not accept the stored syntax of a streamed instance");
                    counts.fail(&uid);
                    if out
                        .send(pending(&req, field::C_MOVE_RSP, &counts))
                        .await
                        .is_err()
                    {
                        unreachable = true;
                        break;
                    }
                    continue;
                };
                match assoc
                    .store_streamed(
                        ctx,
                        &sop_class_uid,
                        &uid,
                        &mut chunks,
                        verified,
                        originator,
                        SUBOP_TIMEOUT,
                    )
                    .await
                {
                    Ok(code) => tally(&mut counts, &uid, code),
                    Err(e) => {
                        warn!(destination = %peer.ae_title, error = %e, "streamed sub-operation failed; association aborted");
                        counts.fail(&uid);
                        if let Some(s) = scu.take() {
                            s.abort().await;
                        }
                    }
                }
            }
            Some(mut r) => {
                let whole = take_whole(&mut r);
                match send_one(&r, whole, &contexts, |ctx, bytes| {
                    assoc.store(
                        ctx,
                        &r.sop_class_uid,
                        &r.uid,
                        bytes,
                        originator,
                        SUBOP_TIMEOUT,
                    )
                })
                .await
                {
                    Ok(code) => tally(&mut counts, &uid, code),
                    Err(SendError::NoContext(why)) => {
                        info!(reason = %why, "sub-operation not performed");
                        counts.fail(&uid)
                    }
                    Err(SendError::Peer(e)) => {
                        warn!(destination = %peer.ae_title, error = %e, "C-MOVE destination failed on an instance");
                        counts.fail(&uid);
                        if let Some(s) = scu.take() {
                            s.abort().await;
                        }
                    }
                }
            }
        }
        if out
            .send(pending(&req, field::C_MOVE_RSP, &counts))
            .await
            .is_err()
        {
            unreachable = true;
            break;
        }
    }
    let cancelled = cancel.load(Ordering::Relaxed) && !unreachable;
    counts.close(&uids, cancelled);
    if let Some(s) = scu {
        s.release(Duration::from_secs(10)).await;
    }
    info!(
        destination = %peer.ae_title,
        completed = counts.completed,
        failed = counts.failed,
        warning = counts.warning,
        ms = started.elapsed().as_millis() as u64,
        "C-MOVE done"
    );
    let _ = out
        .send(final_response(
            &req,
            field::C_MOVE_RSP,
            &counts,
            cancelled,
            revoked,
        ))
        .await;
}

/// Checked before every sub-operation: a failure (0124) when one of `who` lost `what` since
/// the retrieval started; the remaining sub-operations are then not performed.
fn revocation(services: &Services, who: &[(&str, &str)], what: Permission) -> Option<Failure> {
    let (ae, role) = who.iter().find(|(ae, _)| !services.acl.allows(ae, what))?;
    info!(ae = %ae, role, permission = what.name(), "retrieval stopped: permission revoked");
    Some(Failure::new(
        status::NOT_AUTHORIZED,
        format!("permission {} of the {role} {ae} was revoked", what.name()),
    ))
}

pub(crate) enum SendError {
    NoContext(String),
    Peer(String),
}

/// Picks the context for one instance (converting between uncompressed syntaxes if needed) and
/// sends it with `store`.
pub(crate) async fn send_one<F, Fut, E>(
    r: &Ready,
    whole: Vec<u8>,
    contexts: &[(u8, String, String)],
    store: F,
) -> Result<u16, SendError>
where
    F: FnOnce(u8, Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<u16, E>>,
    E: std::fmt::Display,
{
    let Some((ctx, ts)) = choose_context(contexts, &r.sop_class_uid, &r.transfer_syntax) else {
        return Err(SendError::NoContext(format!(
            "destination accepted no context for SOP class {} in {} or an uncompressed syntax it converts to",
            r.sop_class_uid, r.transfer_syntax
        )));
    };
    let bytes = if ts == r.transfer_syntax {
        whole
    } else {
        match convert(&whole, &r.transfer_syntax, &ts) {
            Ok(b) => {
                info!(from = %r.transfer_syntax, to = %ts, "instance converted for the destination");
                b
            }
            Err(e) => return Err(SendError::NoContext(format!("conversion failed: {e}"))),
        }
    };
    store(ctx, bytes)
        .await
        .map_err(|e| SendError::Peer(e.to_string()))
}

pub(crate) fn take_whole(r: &mut Ready) -> Vec<u8> {
    match std::mem::replace(&mut r.body, Body::Whole(Vec::new())) {
        Body::Whole(b) => b,
        Body::Stream { .. } => Vec::new(),
    }
}

/// The accepted context that carries a streamed instance: its SOP class in its stored syntax
/// (a streamed instance is never converted: that would need it whole in memory).
pub(crate) fn stream_context(
    contexts: &[(u8, String, String)],
    sop_class: &str,
    syntax: &str,
) -> Option<u8> {
    contexts
        .iter()
        .find(|c| c.1 == sop_class && c.2 == syntax)
        .map(|c| c.0)
}

/// Waits for the requestor's C-STORE-RSP to message `id`.
async fn store_response(replies: &mut mpsc::Receiver<Command>, id: u16) -> Result<u16, String> {
    match tokio::time::timeout(SUBOP_TIMEOUT, wait_store_response(replies, id)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no C-STORE response within {SUBOP_TIMEOUT:?}")),
    }
}

async fn wait_store_response(
    replies: &mut mpsc::Receiver<Command>,
    id: u16,
) -> Result<u16, String> {
    loop {
        let Some(rsp) = replies.recv().await else {
            return Err("association closed".to_string());
        };
        if rsp
            .u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, "id")
            .ok()
            .flatten()
            == Some(id)
        {
            return rsp
                .u16(tag::STATUS, "Status")
                .ok()
                .flatten()
                .ok_or_else(|| "C-STORE-RSP without status".to_string());
        }
    }
}

/// C-GET of a streamed instance over the requesting association: pieces go out as they are
/// rebuilt, the last one only once the check passed; a failed check aborts the association.
#[allow(clippy::too_many_arguments)]
async fn stream_to_requestor(
    out: &mpsc::Sender<Outgoing>,
    replies: &mut mpsc::Receiver<Command>,
    ctx: u8,
    id: u16,
    sop_class_uid: &str,
    uid: &str,
    chunks: &mut mpsc::Receiver<Vec<u8>>,
    verified: tokio::sync::oneshot::Receiver<Result<(), crate::dimse::scu::CheckFailure>>,
) -> Result<u16, String> {
    let closed = |_| "association closed".to_string();
    let command = store_rq(sop_class_uid, uid, id, None);
    out.send(Outgoing::Command {
        context_id: ctx,
        command,
    })
    .await
    .map_err(closed)?;
    let mut held: Option<Vec<u8>> = None;
    while let Some(chunk) = chunks.recv().await {
        if let Some(prev) = held.replace(chunk) {
            out.send(Outgoing::Data {
                context_id: ctx,
                bytes: prev,
                last: false,
            })
            .await
            .map_err(closed)?;
        }
    }
    match verified.await {
        Ok(Ok(())) => {
            out.send(Outgoing::Data {
                context_id: ctx,
                bytes: held.unwrap_or_default(),
                last: true,
            })
            .await
            .map_err(closed)?;
            store_response(replies, id).await
        }
        Ok(Err(_)) | Err(_) => {
            let why = "instance failed its ledger check while streaming".to_string();
            let _ = out.send(Outgoing::Abort(why.clone())).await;
            Err(why)
        }
    }
}

fn tally(counts: &mut Counts, uid: &str, code: u16) {
    match code {
        status::SUCCESS => {
            counts.completed = counts.completed.saturating_add(1);
            counts.attempted += 1;
        }
        c if status::store_kept(c) => {
            counts.warning = counts.warning.saturating_add(1);
            counts.attempted += 1;
        }
        _ => counts.fail(uid),
    }
}

/// C-GET: resolve, then send every instance by C-STORE over the requesting association, on the
/// storage contexts the requestor offered to receive on (SCP role). `replies` brings the
/// requestor's C-STORE responses.
#[allow(clippy::too_many_arguments)]
pub async fn run_get(
    services: Services,
    req: Request,
    q: matching::Query,
    contexts: Vec<(u8, String, String)>,
    cancel: Arc<AtomicBool>,
    out: mpsc::Sender<Outgoing>,
    mut replies: mpsc::Receiver<Command>,
) {
    let started = Instant::now();
    let mut counts = Counts::default();
    let uids = match resolve(&services, q, &cancel).await {
        Ok(u) => u,
        Err(f) => {
            let _ = out
                .send(final_response(
                    &req,
                    field::C_GET_RSP,
                    &counts,
                    false,
                    Some(f),
                ))
                .await;
            return;
        }
    };
    counts.remaining = uids.len().min(u16::MAX as usize) as u16;
    let requester = Requester::of("c-get", &req);
    let mut ready = prefetch(services.clone(), uids.clone(), requester, cancel.clone());
    let mut message_id: u16 = 1;
    let mut gone = false;
    let mut revoked = None;
    while let Some((uid, instance)) = ready.recv().await {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        revoked = revocation(
            &services,
            &[(&req.calling_ae, "requester")],
            Permission::Get,
        );
        if revoked.is_some() {
            break;
        }
        counts.remaining = counts.remaining.saturating_sub(1);
        match instance {
            None => counts.fail(&uid),
            Some(Ready {
                sop_class_uid,
                transfer_syntax,
                body:
                    Body::Stream {
                        mut chunks,
                        verified,
                    },
                ..
            }) => {
                let id = message_id;
                message_id = message_id.wrapping_add(1).max(1);
                let Some(ctx) = stream_context(&contexts, &sop_class_uid, &transfer_syntax) else {
                    chunks.close();
                    info!("sub-operation not performed: the requestor did not accept the stored syntax of a streamed instance");
                    counts.fail(&uid);
                    continue;
                };
                match stream_to_requestor(
                    &out,
                    &mut replies,
                    ctx,
                    id,
                    &sop_class_uid,
                    &uid,
                    &mut chunks,
                    verified,
                )
                .await
                {
                    Ok(code) => tally(&mut counts, &uid, code),
                    Err(e) => {
                        warn!(error = %e, "streamed C-GET sub-operation failed");
                        counts.fail(&uid);
                        gone = true;
                        break;
                    }
                }
            }
            Some(mut r) => {
                let id = message_id;
                message_id = message_id.wrapping_add(1).max(1);
                let (class, instance_uid) = (r.sop_class_uid.clone(), r.uid.clone());
                let whole = take_whole(&mut r);
                let result = send_one(&r, whole, &contexts, |ctx, bytes| {
                    let out = &out;
                    let replies = &mut replies;
                    async move {
                        let command = store_rq(&class, &instance_uid, id, None);
                        out.send(message(ctx, command, Some(bytes), false))
                            .await
                            .map_err(|_| "association closed".to_string())?;
                        store_response(replies, id).await
                    }
                })
                .await;
                match result {
                    Ok(code) => tally(&mut counts, &uid, code),
                    Err(SendError::NoContext(why)) => {
                        info!(reason = %why, "sub-operation not performed");
                        counts.fail(&uid)
                    }
                    Err(SendError::Peer(e)) => {
                        warn!(error = %e, "C-GET sub-operation failed");
                        counts.fail(&uid);
                        gone = true;
                        break;
                    }
                }
            }
        }
        if out
            .send(pending(&req, field::C_GET_RSP, &counts))
            .await
            .is_err()
        {
            gone = true;
            break;
        }
    }
    let cancelled = cancel.load(Ordering::Relaxed) && !gone;
    counts.close(&uids, cancelled);
    info!(
        completed = counts.completed,
        failed = counts.failed,
        warning = counts.warning,
        ms = started.elapsed().as_millis() as u64,
        "C-GET done"
    );
    let _ = out
        .send(final_response(
            &req,
            field::C_GET_RSP,
            &counts,
            cancelled,
            revoked,
        ))
        .await;
}
