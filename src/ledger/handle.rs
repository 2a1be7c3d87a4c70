//! [`Ledger`], the cheap cloneable handle every other module holds: the database, the channel to
//! the committer, the background scrub, and how requests are handed over and answered.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use rocksdb::DB;
use tokio::sync::oneshot;

use super::damage;
use super::db::ALL_CFS;
use super::error::LedgerError;
use super::notes::NoteBook;
use super::request::{ForwardUpdate, Job, StoreOutcome, StoreRequest};
use super::scrub;

/// Longest an association waits for its ledger write.
const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// A cheap, cloneable handle on the ledger.
#[derive(Clone)]
pub struct Ledger {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) db: Arc<DB>,
    pub(super) path: PathBuf,
    pub(super) tx: Mutex<Option<mpsc::Sender<Job>>>,
    pub(super) committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(super) secondary: bool,
    /// Woken after a commit that queued something for forwarding.
    pub(super) forward_wakeup: Arc<tokio::sync::Notify>,
    /// The pending-object notes not settled yet (the writer only).
    pub(super) notes: Option<Arc<Mutex<NoteBook>>>,
    /// Damage found in the ledger's files since it was opened, by the read-back or by any read
    /// (see [`damage`]).
    pub(super) damage: Arc<damage::DamageBook>,
    /// The background scrub: its stop flag and thread (stopped before the committer).
    pub(super) scrubber: Mutex<Option<Scrubber>>,
    /// The scratch directory of a read-only view made by [`Ledger::open_read_only`], held to be
    /// removed on drop, after the database (declared before it) is closed.
    pub(super) _scratch: Option<tempfile::TempDir>,
}

/// The background scrub's stop flag and thread.
pub(super) type Scrubber = (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
);

impl Ledger {
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A read-only view reads what the node wrote since it was opened; no-op for the writer.
    pub fn catch_up(&self) {
        if self.inner.secondary {
            if let Err(e) = self.inner.db.try_catch_up_with_primary() {
                tracing::debug!(error = %e, "cannot catch up with the node's ledger");
            }
        }
    }

    /// Records a stored instance; returns once the entry is durable (or was a duplicate).
    pub async fn store(&self, req: StoreRequest) -> Result<StoreOutcome, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Job::Store { req, reply }, rx).await
    }

    /// Records forwarding progress (see [`ForwardUpdate`]); returns once it is durable, with the
    /// number of queue items it changed.
    pub async fn forward(&self, update: ForwardUpdate) -> Result<u64, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Job::Forward { update, reply }, rx).await
    }

    /// Hands `job` to the committer and waits for its answer on `rx`, at most [`STORE_WAIT`]:
    /// a stalled disk must not hold associations forever (they get A700 and may resend; a
    /// resend of what did land is then recognised as a duplicate).
    pub(super) async fn ask<T>(
        &self,
        job: Job,
        rx: oneshot::Receiver<Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        match tokio::time::timeout(STORE_WAIT, self.ask_until_done(job, rx)).await {
            Ok(r) => r,
            Err(_) => Err(LedgerError::Timeout(STORE_WAIT)),
        }
    }

    /// Hands `job` to the committer and waits for its answer however long it takes: for changes
    /// that must not become durable after they were reported as failed (the committer always
    /// answers).
    pub(super) async fn ask_until_done<T>(
        &self,
        job: Job,
        rx: oneshot::Receiver<Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        if self.inner.secondary {
            return Err(LedgerError::ReadOnly);
        }
        self.submit(job)?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    pub(super) fn submit(&self, job: Job) -> Result<(), LedgerError> {
        let tx = self.inner.tx.lock().map_err(|_| LedgerError::Closed)?;
        tx.as_ref()
            .ok_or(LedgerError::Closed)?
            .send(job)
            .map_err(|_| LedgerError::Closed)
    }

    /// Notified after every commit that put something on the forward queue.
    pub fn forward_wakeup(&self) -> Arc<tokio::sync::Notify> {
        self.inner.forward_wakeup.clone()
    }

    /// Stops the committer after it has finished the requests already queued, and flushes.
    pub fn close(&self) {
        self.inner.stop_scrub();
        if let Ok(mut tx) = self.inner.tx.lock() {
            tx.take();
        }
        if let Some(handle) = self.inner.committer.lock().ok().and_then(|mut c| c.take()) {
            let _ = handle.join();
        }
        if !self.inner.secondary {
            let _ = self.inner.db.flush_wal(true);
        }
    }

    pub(super) fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, LedgerError> {
        self.inner
            .db
            .cf_handle(name)
            .ok_or_else(|| LedgerError::Corrupt(format!("missing column family {name}")))
    }

    /// Reads every column family back in a thread of its own (see [`scrub`]); damage found is
    /// logged, recorded on the ledger as a security alert and reported by [`Ledger::damage`].
    pub fn scrub_in_background(&self) {
        let Ok(mut slot) = self.inner.scrubber.lock() else {
            return;
        };
        if self.inner.secondary || slot.is_some() {
            return;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let db = self.inner.db.clone();
        let damage = self.inner.damage.clone();
        let flag = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("ledger-scrub".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let scan = scrub::scan(&db, &ALL_CFS, &flag);
                if scan.stopped {
                    return;
                }
                if scan.damage.is_empty() {
                    tracing::info!(
                        keys = scan.keys,
                        secs = started.elapsed().as_secs_f64(),
                        "ledger read back: every block's checksum intact"
                    );
                    return;
                }
                for d in scan.damage {
                    damage.note(d, "the read-back after the start");
                }
            });
        match spawned {
            Ok(handle) => *slot = Some((stop, handle)),
            Err(e) => tracing::warn!(error = %e, "cannot start the ledger scrub"),
        }
    }

    /// Damage found in the ledger's files since it was opened (empty when none).
    pub fn damage(&self) -> Vec<scrub::Damage> {
        self.inner.damage.all()
    }

    /// Reads every column family back now (for `verify`, on a read-only view).
    pub fn scrub(&self) -> scrub::Scan {
        scrub::scan(
            &self.inner.db,
            &ALL_CFS,
            &std::sync::atomic::AtomicBool::new(false),
        )
    }
}

impl Inner {
    /// Stops the background scrub, which would otherwise read a large ledger to its end after
    /// the node was told to stop.
    pub(super) fn stop_scrub(&self) {
        if let Some((stop, handle)) = self.scrubber.lock().ok().and_then(|mut s| s.take()) {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = handle.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_scrub();
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(handle) = self.committer.lock().ok().and_then(|mut c| c.take()) {
            let _ = handle.join();
        }
    }
}
