//! Writes to S3: an [`S3Upload`] keeps a small object in memory for one PutObject, and streams a
//! large one as a multipart upload under a staging key, completed and copied to its final name
//! on commit (see the parent module).

use super::*;

/// A staged write; see the module documentation.
pub struct S3Upload {
    pub(super) store: S3Store,
    /// Bytes not yet sent: the whole object while it is small, else the part being filled.
    pub(super) buf: Vec<u8>,
    pub(super) multipart: Option<Multipart>,
    /// Set while a `write` is in progress and left set if it fails or is cancelled, because the
    /// staged bytes are then incomplete and must never be committed.
    pub(super) poisoned: bool,
}

/// A multipart upload under a staging key. Dropped while still open (a cancelled commit, an
/// upload dropped without commit or abort), it aborts itself in the background.
pub(super) struct Multipart {
    pub(super) store: S3Store,
    pub(super) key: String,
    pub(super) upload_id: String,
    /// Parts uploaded so far, in order.
    pub(super) parts: Vec<PartInfo>,
    /// The part being uploaded in the background, if any (at most one, to bound memory).
    pub(super) in_flight: Option<JoinHandle<Result<PartInfo, StoreError>>>,
    pub(super) next_part: u16,
    /// Whether the upload still exists on the server and needs an abort if abandoned.
    pub(super) open: bool,
}

impl S3Store {
    /// Starts a staged upload. No request is made until there is data to send.
    pub async fn begin(&self) -> Result<S3Upload, StoreError> {
        Ok(S3Upload {
            store: self.clone(),
            buf: Vec::new(),
            multipart: None,
            poisoned: false,
        })
    }
}

impl S3Upload {
    /// Bytes held in memory: the buffer of the part being filled (the whole object while it is
    /// small), allocated capacity included, and the part being uploaded in the background.
    pub fn buffered(&self) -> usize {
        let sending = self
            .multipart
            .as_ref()
            .filter(|m| m.in_flight.is_some())
            .map_or(0, |_| self.store.inner.part_size);
        self.buf.capacity() + sending
    }

    /// Appends bytes to the staged object.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(self.poisoned_error());
        }
        self.poisoned = true;
        self.write_inner(data).await?;
        self.poisoned = false;
        Ok(())
    }

    async fn write_inner(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        let part_size = self.store.inner.part_size;
        while !data.is_empty() {
            // A part is sent only once more data follows it, so an object of exactly
            // `part_size` bytes still goes up as one PutObject and the last part is never empty.
            if self.buf.len() == part_size {
                let part = Bytes::from(std::mem::replace(
                    &mut self.buf,
                    Vec::with_capacity(part_size),
                ));
                let multipart = match &mut self.multipart {
                    Some(m) => m,
                    None => self.multipart.insert(Multipart::start(&self.store).await?),
                };
                multipart.send_part(part).await?;
            }
            let n = (part_size - self.buf.len()).min(data.len());
            reserve(&mut self.buf, n, part_size);
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        Ok(())
    }

    /// Makes the object visible under `name`. Committing the same bytes twice leaves one object
    /// (S3 overwrites).
    pub async fn commit(mut self, name: &str) -> Result<(), StoreError> {
        if self.poisoned {
            let error = self.poisoned_error();
            self.abort_staged().await;
            return Err(error);
        }
        let last = Bytes::from(std::mem::take(&mut self.buf));
        match self.multipart.take() {
            None => self.store.put_object(name, last).await,
            Some(multipart) => multipart.finish(last, name).await,
        }
    }

    /// Discards the staged bytes. Best effort: failures are logged.
    pub async fn abort(mut self) {
        self.abort_staged().await;
    }

    async fn abort_staged(&mut self) {
        self.buf = Vec::new();
        if let Some(multipart) = self.multipart.take() {
            multipart.abort().await;
        }
    }

    fn poisoned_error(&self) -> StoreError {
        StoreError::S3 {
            what: format!(
                "upload to {} at {}",
                self.store.inner.bucket, self.store.inner.endpoint
            ),
            message: "an earlier write of this upload failed or was cancelled; the staged object is incomplete".into(),
        }
    }
}

impl Multipart {
    async fn start(store: &S3Store) -> Result<Multipart, StoreError> {
        let key = staging_key();
        let upload_id = store.create_multipart(&key).await?;
        Ok(Multipart {
            store: store.clone(),
            key,
            upload_id,
            parts: Vec::new(),
            in_flight: None,
            next_part: 1,
            open: true,
        })
    }

    /// Uploads the next part in the background, after waiting for the previous one.
    async fn send_part(&mut self, data: Bytes) -> Result<(), StoreError> {
        // One part in flight at most: memory stays at about two parts.
        self.join_in_flight().await?;
        let number = self.next_number()?;
        let (store, key, upload_id) =
            (self.store.clone(), self.key.clone(), self.upload_id.clone());
        self.in_flight = Some(tokio::spawn(async move {
            store.upload_part(&key, &upload_id, number, data).await
        }));
        Ok(())
    }

    async fn join_in_flight(&mut self) -> Result<(), StoreError> {
        if let Some(in_flight) = self.in_flight.take() {
            let part = in_flight.await.map_err(|e| StoreError::S3 {
                what: self.store.what("UploadPart", &self.key),
                message: format!("the part upload task failed: {e}"),
            })??;
            self.parts.push(part);
        }
        Ok(())
    }

    fn next_number(&mut self) -> Result<u16, StoreError> {
        if self.next_part > MAX_MULTIPART_COUNT {
            return Err(StoreError::S3 {
                what: self.store.what("UploadPart", &self.key),
                message: format!(
                    "the object exceeds {MAX_MULTIPART_COUNT} parts of {} bytes; raise store.s3.part_size",
                    self.store.inner.part_size
                ),
            });
        }
        let number = self.next_part;
        self.next_part += 1;
        Ok(number)
    }

    /// Uploads the last part, completes the staging object, copies it to `name` and deletes it.
    async fn finish(mut self, last: Bytes, name: &str) -> Result<(), StoreError> {
        if let Err(error) = self.upload_rest(last).await {
            self.abort().await;
            return Err(error);
        }
        let store = self.store.clone();
        let parts = std::mem::take(&mut self.parts);
        let part_count = parts.len();
        let completed = store
            .complete_multipart(&self.key, &self.upload_id, parts)
            .await;
        if let Err(error) = completed {
            // If the server did complete (and only the answer was lost), the abort fails and the
            // staging object exists: delete it too.
            let key = self.key.clone();
            self.abort().await;
            store.delete_staging(&key).await;
            return Err(error);
        }
        // The upload id is consumed: from here on cleanup is a DeleteObject.
        self.open = false;
        let copied = store.copy(&self.key, name, part_count).await;
        store.delete_staging(&self.key).await;
        copied
    }

    async fn upload_rest(&mut self, last: Bytes) -> Result<(), StoreError> {
        self.join_in_flight().await?;
        // Non-empty by construction (see `write_inner`); an empty part would only be legal as the
        // sole part anyway.
        if !last.is_empty() || self.parts.is_empty() {
            let number = self.next_number()?;
            let part = self
                .store
                .upload_part(&self.key, &self.upload_id, number, last)
                .await?;
            self.parts.push(part);
        }
        Ok(())
    }

    /// Best effort: aborts the upload, logging failures.
    async fn abort(mut self) {
        self.open = false;
        let in_flight = self.in_flight.take();
        abort_upload(
            self.store.clone(),
            self.key.clone(),
            self.upload_id.clone(),
            in_flight,
        )
        .await;
    }
}

impl Drop for Multipart {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        // Abandoned (cancelled commit, upload dropped without commit or abort): abort in the
        // background so that the parts do not linger on the server.
        let in_flight = self.in_flight.take();
        let (store, key, upload_id) = (
            self.store.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.upload_id),
        );
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(abort_upload(store, key, upload_id, in_flight));
            }
            Err(_) => {
                tracing::warn!(staging_key = %key, "S3 multipart upload abandoned outside a runtime; its parts stay until a lifecycle rule removes them");
            }
        }
    }
}

/// Aborts a multipart upload once its part in flight has settled: a part landing after the abort
/// could otherwise outlive it on servers that do not refuse late parts. The part upload has its
/// own timeout, so this wait is bounded.
async fn abort_upload(
    store: S3Store,
    key: String,
    upload_id: String,
    in_flight: Option<JoinHandle<Result<PartInfo, StoreError>>>,
) {
    if let Some(in_flight) = in_flight {
        let _ = in_flight.await;
    }
    if let Err(error) = store.abort_multipart(&key, &upload_id).await {
        tracing::warn!(%error, staging_key = %key, "could not abort an S3 multipart upload; its parts stay until a lifecycle rule removes them");
    }
}

/// Grows `buf` for `n` more bytes without overshooting `limit`: small objects stay small, and a
/// buffer that reaches a part is exactly one part.
fn reserve(buf: &mut Vec<u8>, n: usize, limit: usize) {
    let needed = buf.len() + n;
    if needed > buf.capacity() {
        let target = needed
            .max(buf.capacity().saturating_mul(2))
            .min(limit)
            .max(needed);
        buf.reserve_exact(target - buf.len());
    }
}

/// `staging/` and 128 random bits in hex. The bits come from std's per-process random SipHash keys
/// mixed with a counter, the process id and the time, so they are unique within and across runs
/// without another dependency.
pub(super) fn staging_key() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut digest = Sha256::new();
    for salt in 0..2u8 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u8(salt);
        digest.update(hasher.finish().to_le_bytes());
    }
    digest.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    digest.update(std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    digest.update(now.as_nanos().to_le_bytes());
    format!("{STAGING_PREFIX}{}", hex::encode(&digest.finalize()[..16]))
}
