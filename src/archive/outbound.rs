//! Sending one checked instance to a peer: used by C-MOVE, C-GET and forwarding.
//!
//! An instance is rebuilt from its ledger record and pixel object with every digest verified
//! (instance key, pixel SHA-256, data set SHA-256) before its first byte leaves ([`Outbound::prepare_entry`]).
//! A small one is rebuilt whole in memory; one larger than `stream_above` streams: its pieces go
//! out while they are read from the object store and the last is held back until the whole data
//! set has passed its check. A failed check is logged and recorded on the ledger as a security
//! event naming the [`Requester`].
//!
//! The presentation context is then chosen among those the peer accepted ([`place`]): the
//! stored syntax (byte-exact), or for uncompressed data another uncompressed syntax the instance
//! is converted to. [`Outbound::connect`] opens an association proposing contexts that make the
//! byte-exact choice possible ([`proposals`]), and [`send`] stores a placed instance over it.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::archive::retrieve;
use crate::config::PeerConfig;
use crate::dicom::uids;
use crate::dimse::scu::{CheckFailure, Scu, ScuError, StreamError};
use crate::ledger::{Entry, Ledger, SpooledEvent};
use crate::store::Store;

/// Longest wait for a C-STORE response from a peer (and for an association to it to open).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

/// Piece size of a streamed instance.
const STREAM_CHUNK: usize = 1024 * 1024;

/// The uncompressed transfer syntaxes, converted between when a peer accepts only another one:
/// Explicit VR Little Endian, Implicit VR Little Endian, Explicit VR Big Endian.
const NATIVE: [&str; 3] = [
    uids::EXPLICIT_VR_LITTLE_ENDIAN,
    uids::IMPLICIT_VR_LITTLE_ENDIAN,
    uids::EXPLICIT_VR_BIG_ENDIAN,
];

/// An accepted presentation context: (context ID, abstract syntax, transfer syntax).
pub type Accepted = (u8, String, String);

/// What sending instances needs from the node. Cheap to clone.
#[derive(Clone)]
pub struct Outbound {
    pub ledger: Ledger,
    pub store: Store,
    /// Where security events about instances that fail their check are spooled for the ledger.
    pub event_spool: PathBuf,
    /// Instances larger than this stream (`node.max_retrieve_buffer_bytes`).
    pub stream_above: u64,
    /// Our AE title, calling the peers.
    pub ae_title: String,
    pub max_pdu_length: u32,
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
}

/// An instance rebuilt and checked against the ledger, ready to go.
pub struct Ready {
    pub uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    pub body: Body,
}

/// The data set of a [`Ready`] instance.
pub enum Body {
    /// Rebuilt and checked in memory.
    Whole(Vec<u8>),
    /// Being rebuilt: pieces arrive on `chunks`, the last one only after the check passed;
    /// `verified` gives the check's outcome.
    Stream {
        chunks: mpsc::Receiver<Vec<u8>>,
        verified: oneshot::Receiver<Result<(), CheckFailure>>,
    },
}

/// Why an instance cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// It fails its ledger check (recorded as a security event): never send it.
    #[error("{0}")]
    Integrity(String),
    /// It cannot be rebuilt now (object store or ledger unavailable): may work later.
    #[error("{0}")]
    Unavailable(String),
    /// It was erased meanwhile: nothing to send, ever.
    #[error("{0}")]
    Erased(String),
}

/// A [`Ready`] instance on the context chosen for it, its data set in that context's syntax.
pub struct Placed {
    pub context_id: u8,
    pub uid: String,
    pub sop_class_uid: String,
    pub body: Body,
}

/// Why an instance was not sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No accepted context carries it (or converting it failed): not performed, the association
    /// is fine.
    #[error("{0}")]
    NoContext(String),
    /// A streamed instance could not be completed (its check failed or its rebuild stopped):
    /// the association was left mid-data-set and must be aborted.
    #[error("instance could not be completed: {0}")]
    Check(CheckFailure),
    /// The association failed while sending.
    #[error("{0}")]
    Peer(ScuError),
}

impl From<StreamError> for SendError {
    fn from(e: StreamError) -> SendError {
        match e {
            StreamError::Check(f) => SendError::Check(f),
            StreamError::Peer(e) => SendError::Peer(e),
        }
    }
}

/// Why an instance could not be converted between uncompressed syntaxes.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("unknown source syntax")]
    UnknownSource,
    #[error("unknown target syntax")]
    UnknownTarget,
    #[error("{0}")]
    Read(Box<dicom_object::ReadError>),
    #[error("{0}")]
    Write(Box<dicom_object::WriteError>),
}

impl Outbound {
    /// Rebuilds the latest version of one instance and checks it; `None` (and a logged, recorded
    /// failure) when it cannot be sent.
    pub async fn prepare(&self, uid: &str, requester: &Requester) -> Option<Ready> {
        let entry = match self.ledger.latest(uid) {
            Ok(Some(e)) => e,
            Ok(None) => return None,
            Err(e) => {
                warn!(error = %e, "ledger read failed during retrieval");
                return None;
            }
        };
        self.prepare_entry(entry, Some(uid), requester).await.ok()
    }

    /// Rebuilds the instance of one stored entry and checks it. A failed check is logged and
    /// recorded as a security event. `uid` is the SOP Instance UID to send it under (by default
    /// the one in its metadata record).
    pub async fn prepare_entry(
        &self,
        entry: Entry,
        uid: Option<&str>,
        requester: &Requester,
    ) -> Result<Ready, PrepareError> {
        let instance = match retrieve::load_instance(&self.ledger, &entry) {
            Ok(r) => r,
            Err(e) => return Err(self.failed_check(&entry, &e, requester)),
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
        if dataset_length > self.stream_above {
            return Ok(ready(self.stream(entry, instance, requester.clone())));
        }
        let mut bytes = Vec::with_capacity(dataset_length as usize);
        match retrieve::rebuild(&self.store, &entry, &instance, &mut bytes).await {
            Ok(()) => Ok(ready(Body::Whole(bytes))),
            Err(e) => Err(self.failed_check(&entry, &e, requester)),
        }
    }

    /// Rebuilds an instance on its own task, its pieces streaming out as they are read.
    fn stream(&self, entry: Entry, instance: retrieve::Instance, requester: Requester) -> Body {
        let (tx, chunks) = mpsc::channel(2);
        let (done, verified) = oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let mut sink = retrieve::ChunkSink::new(tx, STREAM_CHUNK);
            let result =
                match retrieve::rebuild_into(&this.store, &entry, &instance, &mut sink).await {
                    Ok(()) => sink.finish().await.map_err(retrieve::RetrieveError::from),
                    Err(e) => Err(e),
                };
            match &result {
                // The sender gave up on this instance (no context for it): not a failure of it.
                Err(retrieve::RetrieveError::Io(e))
                    if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) => {
                    this.failed_check(&entry, e, &requester);
                }
                Ok(()) => {}
            }
            let _ = done.send(result.map_err(|e| CheckFailure {
                integrity: e.integrity_reason().is_some(),
                why: e.to_string(),
            }));
        });
        Body::Stream { chunks, verified }
    }

    /// Logs a rebuild failure; one that is an integrity failure becomes a security event.
    fn failed_check(
        &self,
        entry: &Entry,
        e: &retrieve::RetrieveError,
        requester: &Requester,
    ) -> PrepareError {
        if retrieve::erased_meanwhile(&self.ledger, entry, e).is_some() {
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
            if let Err(e) = ev.write(&self.event_spool) {
                warn!(error = %e, "cannot record the security event");
            }
            PrepareError::Integrity(reason.describe().to_string())
        } else {
            warn!(seq = entry.seq, error = %e, "instance cannot be rebuilt");
            PrepareError::Unavailable(e.to_string())
        }
    }

    /// Opens an association to `peer` proposing contexts for instances of these (SOP class,
    /// stored syntax) pairs (see [`proposals`]).
    pub async fn connect(
        &self,
        peer: &PeerConfig,
        pairs: &[(String, String)],
    ) -> Result<Scu, ScuError> {
        Scu::connect(
            &peer.host,
            peer.port,
            &self.ae_title,
            &peer.ae_title,
            &proposals(pairs),
            self.max_pdu_length,
            RESPONSE_TIMEOUT,
        )
        .await
    }
}

/// The contexts an association to a peer accepted.
pub fn accepted(scu: &Scu) -> Vec<Accepted> {
    scu.contexts
        .iter()
        .map(|c| (c.id, c.abstract_syntax.clone(), c.transfer_syntax.clone()))
        .collect()
}

/// Puts an instance on an accepted context: its SOP class in its stored syntax, or for
/// uncompressed data in another uncompressed syntax, converted. A streamed instance is never
/// converted (that would need it whole in memory); when it has no context its rebuild is
/// stopped.
pub fn place(ready: Ready, contexts: &[Accepted]) -> Result<Placed, SendError> {
    let Ready {
        uid,
        sop_class_uid,
        transfer_syntax,
        body,
    } = ready;
    let placed = |context_id, body| Placed {
        context_id,
        uid,
        sop_class_uid: sop_class_uid.clone(),
        body,
    };
    match body {
        Body::Stream { .. } => {
            let ctx = contexts
                .iter()
                .find(|c| c.1 == sop_class_uid && c.2 == transfer_syntax)
                .map(|c| c.0);
            match ctx {
                Some(ctx) => Ok(placed(ctx, body)),
                None => Err(SendError::NoContext(format!(
                    "the destination accepted no context for SOP class {sop_class_uid} in {transfer_syntax}"
                ))),
            }
        }
        Body::Whole(whole) => {
            let Some((ctx, ts)) = choose_context(contexts, &sop_class_uid, &transfer_syntax) else {
                return Err(SendError::NoContext(format!(
                    "destination accepted no context for SOP class {sop_class_uid} in {transfer_syntax} or an uncompressed syntax it converts to"
                )));
            };
            if ts == transfer_syntax {
                return Ok(placed(ctx, Body::Whole(whole)));
            }
            match convert(&whole, &transfer_syntax, &ts) {
                Ok(b) => {
                    info!(from = %transfer_syntax, to = %ts, "instance converted for the destination");
                    Ok(placed(ctx, Body::Whole(b)))
                }
                Err(e) => Err(SendError::NoContext(format!("conversion failed: {e}"))),
            }
        }
    }
}

/// Places `ready` on one of `contexts` and stores it over `scu` (with the C-MOVE originator, if
/// any); returns the peer's status. After [`SendError::Check`] or [`SendError::Peer`] the
/// association must be aborted.
pub async fn send(
    scu: &mut Scu,
    contexts: &[Accepted],
    ready: Ready,
    originator: Option<(&str, u16)>,
) -> Result<u16, SendError> {
    let placed = place(ready, contexts)?;
    let (ctx, class, uid) = (placed.context_id, &placed.sop_class_uid, &placed.uid);
    match placed.body {
        Body::Whole(bytes) => scu
            .store(ctx, class, uid, bytes, originator, RESPONSE_TIMEOUT)
            .await
            .map_err(SendError::Peer),
        Body::Stream {
            mut chunks,
            verified,
        } => Ok(scu
            .store_streamed(
                ctx,
                class,
                uid,
                &mut chunks,
                verified,
                originator,
                RESPONSE_TIMEOUT,
            )
            .await?),
    }
}

/// How an instance goes out on the contexts the peer accepted: as stored, or converted between
/// the uncompressed syntaxes. `None` when no accepted context can carry it faithfully.
fn choose_context(contexts: &[Accepted], sop_class: &str, ts: &str) -> Option<(u8, String)> {
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
pub fn proposals(pairs: &[(String, String)]) -> Vec<(String, Vec<String>)> {
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
fn convert(bytes: &[u8], from: &str, to: &str) -> Result<Vec<u8>, ConvertError> {
    use dicom_encoding::TransferSyntaxIndex;
    use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
    let from_ts = TransferSyntaxRegistry
        .get(from)
        .ok_or(ConvertError::UnknownSource)?;
    let to_ts = TransferSyntaxRegistry
        .get(to)
        .ok_or(ConvertError::UnknownTarget)?;
    let obj = dicom_object::InMemDicomObject::read_dataset_with_ts(bytes, from_ts)
        .map_err(|e| ConvertError::Read(Box::new(e)))?;
    let mut out = Vec::with_capacity(bytes.len());
    obj.write_dataset_with_ts(&mut out, to_ts)
        .map_err(|e| ConvertError::Write(Box::new(e)))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
    const JPEG_LOSSLESS: &str = "1.2.840.10008.1.2.4.70";

    fn ready(syntax: &str, body: Body) -> Ready {
        Ready {
            uid: "1.2.3".into(),
            sop_class_uid: CT.into(),
            transfer_syntax: syntax.into(),
            body,
        }
    }

    fn accepted(list: &[(u8, &str)]) -> Vec<Accepted> {
        list.iter()
            .map(|(id, ts)| (*id, CT.to_string(), ts.to_string()))
            .collect()
    }

    /// (0008,0018) SOP Instance UID "1.2.3" in Explicit VR Little Endian.
    fn explicit_le() -> Vec<u8> {
        let mut b = vec![0x08, 0x00, 0x18, 0x00, b'U', b'I', 6, 0];
        b.extend_from_slice(b"1.2.3\0");
        b
    }

    #[test]
    fn uncompressed_data_gets_a_fallback_context_compressed_data_does_not() {
        let pairs = vec![
            (CT.to_string(), EXPLICIT_LE.to_string()),
            (CT.to_string(), JPEG_LOSSLESS.to_string()),
        ];
        let p = proposals(&pairs);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].1, vec![EXPLICIT_LE.to_string()]);
        assert_eq!(p[1].1, vec![JPEG_LOSSLESS.to_string()]);
        assert_eq!(p[2].1.len(), 2);
        assert!(!p[2].1.contains(&EXPLICIT_LE.to_string()));
    }

    #[test]
    fn the_stored_syntax_is_chosen_when_accepted() {
        let contexts = accepted(&[(1, IMPLICIT_LE), (3, EXPLICIT_LE)]);
        let placed = place(ready(EXPLICIT_LE, Body::Whole(explicit_le())), &contexts).unwrap();
        assert_eq!(placed.context_id, 3);
        assert!(matches!(placed.body, Body::Whole(b) if b == explicit_le()));
    }

    #[test]
    fn uncompressed_data_is_converted_when_only_another_syntax_is_accepted() {
        let contexts = accepted(&[(5, IMPLICIT_LE)]);
        let placed = place(ready(EXPLICIT_LE, Body::Whole(explicit_le())), &contexts).unwrap();
        assert_eq!(placed.context_id, 5);
        let Body::Whole(b) = placed.body else {
            panic!("converted whole")
        };
        // Implicit VR: tag, then a 4-byte length, no VR.
        assert_eq!(&b[..8], &[0x08, 0x00, 0x18, 0x00, 6, 0, 0, 0]);
    }

    #[test]
    fn compressed_or_streamed_data_is_never_converted() {
        let contexts = accepted(&[(1, IMPLICIT_LE)]);
        let r = place(ready(JPEG_LOSSLESS, Body::Whole(vec![])), &contexts);
        assert!(matches!(r, Err(SendError::NoContext(_))));
        let (_tx, chunks) = mpsc::channel(1);
        let (_done, verified) = oneshot::channel();
        let r = place(
            ready(EXPLICIT_LE, Body::Stream { chunks, verified }),
            &contexts,
        );
        assert!(matches!(r, Err(SendError::NoContext(_))));
    }
}
