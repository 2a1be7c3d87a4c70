//! The S3 backend: MinIO or any S3-compatible server, through the `minio` crate (0.4).
//!
//! # Writes
//! The object name is a digest known only once the whole instance has been received, so an
//! [`S3Upload`] cannot start a request under its final key.
//! - Below `part_size` (the common case: a CT slice's pixel data is 512 KiB) the bytes stay in memory and
//!   [`S3Upload::commit`] sends a single PutObject under the final name.
//! - When more than `part_size` bytes arrive, a multipart upload starts under a staging key
//!   (`staging/<128-bit random hex>`) and each full part is uploaded in the background while the
//!   next one fills, so memory stays bounded to about two parts whatever the object size. `commit`
//!   uploads the last part, completes the staging object, copies it server-side to the final name
//!   and deletes the staging object. Copies above 5 GiB (the CopyObject limit) go through
//!   UploadPartCopy (`compose_object`), so the limit is S3's 5 TiB object size, and 10 000 parts of
//!   `part_size` (156 GiB at the 16 MiB default).
//! - A crash between "complete" and "delete" leaves garbage under `staging/` (never a wrong object);
//!   an operator can expire that prefix with a bucket lifecycle rule, together with incomplete
//!   multipart uploads.
//!
//! # Failures
//! Every network operation runs under the store timeout ([`StoreError::Timeout`]), so an
//! unreachable or hung server fails the C-STORE promptly instead of holding the association.
//! `minio` 0.4 does not retry (except once on a region redirect for HEAD), and `reqwest` has no
//! timeout of its own, so the timeout here is the only bound. Completing and copying a multipart
//! object get the timeout once per part, since the server's work grows with the object.
//!
//! Object names are opaque hex strings and are used as keys verbatim. Object contents are never
//! logged; credentials never appear in errors or in `Debug`.

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use minio::s3::builders::{ComposeSource, MAX_MULTIPART_COUNT, MAX_PART_SIZE, MIN_PART_SIZE};
use minio::s3::client::{ConnectionPoolConfig, MinioClient, MinioClientBuilder};
use minio::s3::creds::StaticProvider;
use minio::s3::error::{Error as MinioError, S3ServerError};
use minio::s3::http::BaseUrl;
use minio::s3::minio_error_response::MinioErrorCode;
use minio::s3::response_traits::HasEtagFromHeaders;
use minio::s3::segmented_bytes::SegmentedBytes;
use minio::s3::types::{BucketName, PartInfo, Region, S3Api};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use super::error::StoreError;
use crate::config::S3StoreConfig;

/// First wait before retrying a failed request; doubled after each further failure.
const RETRY_INITIAL: Duration = Duration::from_millis(200);

/// Key prefix of in-progress multipart uploads (see the module documentation).
const STAGING_PREFIX: &str = "staging/";

/// A cheap, cloneable handle on one bucket of one S3 server.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

struct Inner {
    client: MinioClient,
    endpoint: String,
    bucket: String,
    part_size: usize,
    timeout: Duration,
    /// Retries of a request that failed in a way that may pass.
    retries: u32,
}

// Hand-written: the client's Debug would print the credential provider.
impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("endpoint", &self.inner.endpoint)
            .field("bucket", &self.inner.bucket)
            .field("part_size", &self.inner.part_size)
            .field("timeout", &self.inner.timeout)
            .finish()
    }
}

/// A staged write; see the module documentation.
pub struct S3Upload {
    store: S3Store,
    /// Bytes not yet sent: the whole object while it is small, else the part being filled.
    buf: Vec<u8>,
    multipart: Option<Multipart>,
    /// Set while a `write` is in progress and left set if it fails or is cancelled, because the
    /// staged bytes are then incomplete and must never be committed.
    poisoned: bool,
}

/// A multipart upload under a staging key. Dropped while still open (a cancelled commit, an
/// upload dropped without commit or abort), it aborts itself in the background.
struct Multipart {
    store: S3Store,
    key: String,
    upload_id: String,
    /// Parts uploaded so far, in order.
    parts: Vec<PartInfo>,
    /// The part being uploaded in the background, if any (at most one, to bound memory).
    in_flight: Option<JoinHandle<Result<PartInfo, StoreError>>>,
    next_part: u16,
    /// Whether the upload still exists on the server and needs an abort if abandoned.
    open: bool,
}

/// A streaming read of one object.
pub struct S3Reader {
    stream: Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>,
    what: String,
    timeout: Duration,
    /// Content-Length announced by the server, checked at the end of the body.
    expected: u64,
    received: u64,
    done: bool,
}

impl S3Store {
    /// Builds the client and makes sure the bucket exists, creating it if missing.
    pub async fn open(cfg: &S3StoreConfig, timeout: Duration) -> Result<S3Store, StoreError> {
        let mut base_url: BaseUrl = cfg.endpoint.parse().map_err(|e| {
            StoreError::Config(format!("store.s3.endpoint `{}`: {e}", cfg.endpoint))
        })?;
        // A region on the base URL is used for every request without asking the server.
        // (`skip_region_lookup(true)` would also skip the lookup, but force us-east-1.)
        base_url.region = Region::new(cfg.region.as_str())
            .map_err(|e| StoreError::Config(format!("store.s3.region `{}`: {e}", cfg.region)))?;
        BucketName::new(cfg.bucket.as_str())
            .map_err(|e| StoreError::Config(format!("store.s3.bucket: {e}")))?;
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&cfg.part_size) {
            return Err(StoreError::Config(format!(
                "store.s3.part_size {} is outside S3's part size range {MIN_PART_SIZE}..={MAX_PART_SIZE}",
                cfg.part_size
            )));
        }
        let part_size = usize::try_from(cfg.part_size).map_err(|_| {
            StoreError::Config(format!(
                "store.s3.part_size {} does not fit in memory",
                cfg.part_size
            ))
        })?;
        let access_key = cfg
            .resolved_access_key()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let secret_key = cfg
            .resolved_secret_key()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        // No keys at all means anonymous requests (a public bucket); otherwise SigV4.
        let provider = if access_key.is_empty() && secret_key.is_empty() {
            None
        } else {
            Some(StaticProvider::new(&access_key, &secret_key, None))
        };
        let client = MinioClientBuilder::new(base_url)
            .provider(provider)
            .connection_pool_config(ConnectionPoolConfig::default().tcp_nodelay(true))
            .build()
            .map_err(|e| {
                StoreError::Config(format!(
                    "cannot build the S3 client for {}: {}",
                    cfg.endpoint,
                    describe(&e)
                ))
            })?;
        let store = S3Store {
            inner: Arc::new(Inner {
                client,
                endpoint: cfg.endpoint.clone(),
                bucket: cfg.bucket.clone(),
                part_size,
                timeout,
                retries: cfg.retries,
            }),
        };
        store.ensure_bucket().await?;
        Ok(store)
    }

    /// Starts a staged upload. No request is made until there is data to send.
    pub async fn begin(&self) -> Result<S3Upload, StoreError> {
        Ok(S3Upload {
            store: self.clone(),
            buf: Vec::new(),
            multipart: None,
            poisoned: false,
        })
    }

    /// Opens an object for a streaming read; [`StoreError::NotFound`] if there is none.
    pub async fn open_read(&self, name: &str) -> Result<S3Reader, StoreError> {
        let what = self.what("GetObject", name);
        let inner = &self.inner;
        let response = self
            .timed(&what, inner.timeout, || async {
                inner
                    .client
                    .get_object(&inner.bucket, name)?
                    .build()
                    .send()
                    .await
            })
            .await?;
        let response = match response {
            Ok(r) => r,
            Err(e) if is_code(&e, &MinioErrorCode::NoSuchKey) => {
                return Err(StoreError::NotFound {
                    name: name.to_string(),
                })
            }
            Err(e) => return Err(s3_error(what, &e)),
        };
        // The body streams from the socket as the caller pulls chunks.
        let (stream, expected) = response
            .into_boxed_stream()
            .map_err(|e| s3_error(what.clone(), &e))?;
        Ok(S3Reader {
            stream,
            what,
            timeout: inner.timeout,
            expected,
            received: 0,
            done: false,
        })
    }

    /// Whether an object exists under this name.
    pub async fn exists(&self, name: &str) -> Result<bool, StoreError> {
        let what = self.what("HeadObject", name);
        let inner = &self.inner;
        let response = self
            .timed(&what, inner.timeout, || async {
                inner
                    .client
                    .stat_object(&inner.bucket, name)?
                    .build()
                    .send()
                    .await
            })
            .await?;
        match response {
            Ok(_) => Ok(true),
            Err(e) if is_code(&e, &MinioErrorCode::NoSuchKey) => Ok(false),
            Err(e) => Err(s3_error(what, &e)),
        }
    }

    /// Names of every object in the bucket, staging keys (`staging/…`) included: they are
    /// garbage an audit should report too. One ListObjectsV2 request per page of 1000, each under
    /// the store's timeout.
    pub async fn list(&self) -> Result<Vec<String>, StoreError> {
        use minio::s3::types::ToStream;
        let what = format!("ListObjectsV2 {}", self.inner.bucket);
        let inner = &self.inner;
        let builder = inner
            .client
            .list_objects(&inner.bucket)
            .map_err(|e| StoreError::S3 {
                what: what.clone(),
                message: e.to_string(),
            })?
            .recursive(true)
            .build();
        let mut pages = builder.to_stream().await;
        let mut names = Vec::new();
        loop {
            let page = tokio::time::timeout(inner.timeout, pages.next())
                .await
                .map_err(|_| StoreError::Timeout {
                    what: what.clone(),
                    after: inner.timeout,
                })?;
            match page {
                None => return Ok(names),
                Some(Ok(page)) => names.extend(
                    page.contents
                        .into_iter()
                        .filter(|e| !e.is_prefix)
                        .map(|e| e.name),
                ),
                Some(Err(e)) => return Err(s3_error(what, &e)),
            }
        }
    }

    /// Deletes an object; a missing object is not an error (S3 itself answers 204 for it).
    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let what = self.what("DeleteObject", name);
        let inner = &self.inner;
        let response = self
            .timed(&what, inner.timeout, || async {
                inner
                    .client
                    .delete_object(&inner.bucket, name)?
                    .build()
                    .send()
                    .await
            })
            .await?;
        match response {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, &MinioErrorCode::NoSuchKey) => Ok(()),
            Err(e) => Err(s3_error(what, &e)),
        }
    }

    /// Checks that the bucket exists and creates it if not.
    async fn ensure_bucket(&self) -> Result<(), StoreError> {
        if self.bucket_exists().await? {
            return Ok(());
        }
        let inner = &self.inner;
        let what = format!("CreateBucket {} at {}", inner.bucket, inner.endpoint);
        let created = self
            .timed(&what, inner.timeout, || async {
                inner
                    .client
                    .create_bucket(&inner.bucket)?
                    .build()
                    .send()
                    .await
            })
            .await?;
        match created {
            Ok(_) => {
                tracing::info!(bucket = %inner.bucket, endpoint = %inner.endpoint, "created the object store bucket");
                Ok(())
            }
            // Another node may have created it between our check and our request.
            Err(e) => match self.bucket_exists().await {
                Ok(true) => Ok(()),
                _ => Err(s3_error(what, &e)),
            },
        }
    }

    async fn bucket_exists(&self) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let what = format!("HeadBucket {} at {}", inner.bucket, inner.endpoint);
        let response = self
            .timed(&what, inner.timeout, || async {
                inner
                    .client
                    .bucket_exists(&inner.bucket)?
                    .build()
                    .send()
                    .await
            })
            .await?;
        response.map(|r| r.exists()).map_err(|e| s3_error(what, &e))
    }

    /// One PutObject of the whole (small) object.
    async fn put_object(&self, name: &str, data: Bytes) -> Result<(), StoreError> {
        let what = self.what("PutObject", name);
        let inner = &self.inner;
        let response = self
            .timed(&what, inner.timeout, || async {
                inner
                    .client
                    .put_object(&inner.bucket, name, SegmentedBytes::from(data.clone()))?
                    .build()
                    .send()
                    .await
            })
            .await?;
        response.map(drop).map_err(|e| s3_error(what, &e))
    }

    /// Starts a multipart upload of `key`; returns its upload id.
    async fn create_multipart(&self, key: &str) -> Result<String, StoreError> {
        let what = self.what("CreateMultipartUpload", key);
        let inner = &self.inner;
        let response = self
            .timed(&what, inner.timeout, || async {
                let response = inner
                    .client
                    .create_multipart_upload(&inner.bucket, key)?
                    .build()
                    .send()
                    .await?;
                Ok(response.upload_id().await?)
            })
            .await?;
        let upload_id = response.map_err(|e| s3_error(what, &e))?;
        Ok(upload_id.into_inner())
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u16,
        data: Bytes,
    ) -> Result<PartInfo, StoreError> {
        let what = format!("{} (part {number})", self.what("UploadPart", key));
        let size = data.len() as u64;
        let inner = &self.inner;
        let response = self
            .timed(&what, inner.timeout, || async {
                let response = inner
                    .client
                    .upload_part(
                        &inner.bucket,
                        key,
                        upload_id,
                        number,
                        SegmentedBytes::from(data.clone()),
                    )?
                    .build()
                    .send()
                    .await?;
                Ok(response.etag()?)
            })
            .await?;
        let etag = response.map_err(|e| s3_error(what, &e))?;
        Ok(PartInfo::new(number, etag, size, None))
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<PartInfo>,
    ) -> Result<(), StoreError> {
        let what = self.what("CompleteMultipartUpload", key);
        let inner = &self.inner;
        let after = self.scaled_timeout(parts.len());
        let response = self
            .timed(&what, after, || async {
                inner
                    .client
                    .complete_multipart_upload(&inner.bucket, key, upload_id, parts.clone())?
                    .build()
                    .send()
                    .await
            })
            .await?;
        match response {
            Ok(_) => Ok(()),
            // A retry after a completion whose answer was lost: the upload is gone because it
            // became the (randomly named, so ours) staging object.
            Err(e) if has_code(&e, "nosuchupload") && self.exists(key).await? => Ok(()),
            Err(e) => Err(s3_error(what, &e)),
        }
    }

    /// Server-side copy of `source` to `name`, in the same bucket.
    async fn copy(&self, source: &str, name: &str, parts: usize) -> Result<(), StoreError> {
        let what = format!("{} from {source}", self.what("CopyObject", name));
        let inner = &self.inner;
        let response = self
            .timed(&what, self.scaled_timeout(parts), || async {
                // `compose_object` with one source is a plain CopyObject up to 5 GiB and switches
                // to UploadPartCopy above. (`copy_object` itself is unusable above 5 GiB in
                // minio 0.4: that path composes onto the *source* key.)
                let source = ComposeSource::new(inner.bucket.as_str(), source)?;
                inner
                    .client
                    .compose_object(&inner.bucket, name, vec![source])?
                    .build()
                    .send()
                    .await
            })
            .await?;
        response.map(drop).map_err(|e| s3_error(what, &e))
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        let what = self.what("AbortMultipartUpload", key);
        let inner = &self.inner;
        let response = self
            .timed(&what, inner.timeout, || async {
                inner
                    .client
                    .abort_multipart_upload(&inner.bucket, key, upload_id)?
                    .build()
                    .send()
                    .await
            })
            .await?;
        response.map(drop).map_err(|e| s3_error(what, &e))
    }

    /// Best effort: a leftover staging object is garbage, not a wrong object, so failing to delete
    /// it must not fail the commit.
    async fn delete_staging(&self, key: &str) {
        if let Err(error) = self.delete(key).await {
            tracing::warn!(%error, staging_key = %key, "could not delete an S3 staging object");
        }
    }

    /// Runs one network operation under a time limit, retrying it while it fails in a way that
    /// may pass (no connection, a reset, a 5xx, SlowDown) — at most `retries` more times, waiting
    /// [`RETRY_INITIAL`] doubled after each failure — as long as the next attempt can start
    /// before the limit. The outer error is the timeout; the inner result is the client's last
    /// answer, for the caller to classify (NotFound, …).
    async fn timed<T, F, Fut>(
        &self,
        what: &str,
        after: Duration,
        mut attempt: F,
    ) -> Result<Result<T, MinioError>, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, MinioError>>,
    {
        let deadline = tokio::time::Instant::now() + after;
        let mut wait = RETRY_INITIAL;
        let mut retries_left = self.inner.retries;
        loop {
            let result = tokio::time::timeout_at(deadline, attempt())
                .await
                .map_err(|_| StoreError::Timeout {
                    what: what.to_string(),
                    after,
                })?;
            match result {
                Err(e)
                    if retries_left > 0
                        && is_transient(&e)
                        && tokio::time::Instant::now() + wait < deadline =>
                {
                    tracing::debug!(operation = %what, error = %describe(&e), retry_in = ?wait, "S3 request failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    retries_left -= 1;
                }
                result => return Ok(result),
            }
        }
    }

    /// The time limit for an operation whose server-side work grows with the number of parts.
    fn scaled_timeout(&self, parts: usize) -> Duration {
        let parts = u32::try_from(parts.max(1)).unwrap_or(u32::MAX);
        self.inner.timeout.saturating_mul(parts)
    }

    /// How errors name an operation: what, which object, where.
    fn what(&self, operation: &str, key: &str) -> String {
        format!(
            "{operation} {}/{key} at {}",
            self.inner.bucket, self.inner.endpoint
        )
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

impl S3Reader {
    /// The next chunk of the object, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, StoreError> {
        while !self.done {
            let next = tokio::time::timeout(self.timeout, self.stream.next())
                .await
                .map_err(|_| StoreError::Timeout {
                    what: self.what.clone(),
                    after: self.timeout,
                });
            match next {
                Ok(Some(Ok(chunk))) => {
                    // Callers may take an empty chunk for the end: never hand one out.
                    if chunk.is_empty() {
                        continue;
                    }
                    self.received += chunk.len() as u64;
                    return Ok(Some(chunk));
                }
                Ok(Some(Err(e))) => {
                    self.done = true;
                    return Err(StoreError::S3 {
                        what: self.what.clone(),
                        message: error_chain(&e),
                    });
                }
                Ok(None) => {
                    self.done = true;
                    if self.received != self.expected {
                        return Err(StoreError::S3 {
                            what: self.what.clone(),
                            message: format!(
                                "the body ended after {} of {} bytes",
                                self.received, self.expected
                            ),
                        });
                    }
                }
                Err(timeout) => {
                    self.done = true;
                    return Err(timeout);
                }
            }
        }
        Ok(None)
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
fn staging_key() -> String {
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

/// Whether the server answered with this S3 error code.
/// Whether a failed request may succeed if sent again: the server was unreachable or the
/// connection broke, or the server says it is busy or failed internally (HTTP 5xx).
fn is_transient(error: &MinioError) -> bool {
    use minio::s3::error::{NetworkError, ValidationErr};
    match error {
        MinioError::Network(NetworkError::ServerError(status)) => *status >= 500,
        MinioError::Network(NetworkError::ReqwestError(_)) => true,
        // Where minio 0.4 puts a request that could not be sent (connection refused, reset).
        MinioError::Validation(ValidationErr::HttpError(e)) => {
            e.is_connect() || e.is_request() || e.is_timeout() || e.is_body()
        }
        MinioError::Validation(ValidationErr::IOError(_)) => true,
        MinioError::S3Server(S3ServerError::S3Error(response)) => {
            // Codes minio 0.4 has no variant for arrive lowercased in `OtherError`.
            let code = response.code().to_string().to_ascii_lowercase();
            matches!(
                code.as_str(),
                "internalerror" | "slowdown" | "serviceunavailable" | "requesttimeout"
            ) || code.starts_with("http 5")
        }
        MinioError::S3Server(S3ServerError::HttpError(status, _)) => *status >= 500,
        MinioError::S3Server(S3ServerError::InvalidServerResponse {
            http_status_code, ..
        }) => *http_status_code >= 500,
        _ => false,
    }
}

/// Whether the server answered with this S3 error code (lowercase), for the codes minio 0.4 has
/// no [`MinioErrorCode`] variant for.
fn has_code(error: &MinioError, code: &str) -> bool {
    matches!(error, MinioError::S3Server(S3ServerError::S3Error(response))
        if response.code().to_string().eq_ignore_ascii_case(code))
}

fn is_code(error: &MinioError, code: &MinioErrorCode) -> bool {
    matches!(error, MinioError::S3Server(S3ServerError::S3Error(response)) if response.code() == *code)
}

fn s3_error(what: String, error: &MinioError) -> StoreError {
    StoreError::S3 {
        what,
        message: describe(error),
    }
}

/// A one-line description of a client error. minio's top-level messages are bare ("Validation
/// error occurred", "Network error occurred"): the cause (e.g. "Connection refused") is in the
/// source chain, and the server's S3 error code and message are in the response.
fn describe(error: &MinioError) -> String {
    match error {
        MinioError::S3Server(S3ServerError::S3Error(response)) => {
            let mut message = response.code().to_string();
            if let Some(text) = response.message() {
                message.push_str(": ");
                message.push_str(text);
            }
            if !response.request_id().is_empty() {
                message.push_str(&format!(" (request id {})", response.request_id()));
            }
            message
        }
        MinioError::S3Server(other) => error_chain(other),
        MinioError::DriveIo(e) => error_chain(e),
        MinioError::Network(e) => error_chain(e),
        MinioError::Validation(e) => error_chain(e),
    }
}

/// An error and its sources on one line, skipping sources whose text is already included.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
#[path = "../../tests/support/s3server.rs"]
mod s3server;

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::s3server::S3Server;
    use super::*;

    const MIB: usize = 1024 * 1024;

    fn config(server: &S3Server) -> S3StoreConfig {
        S3StoreConfig {
            endpoint: server.endpoint.clone(),
            bucket: server.bucket.clone(),
            region: "us-east-1".into(),
            access_key: server.access_key.clone(),
            secret_key: server.secret_key.clone(),
            part_size: 5 * MIB as u64,
            ..S3StoreConfig::default()
        }
    }

    async fn open(server: &S3Server) -> S3Store {
        S3Store::open(&config(server), Duration::from_secs(10))
            .await
            .unwrap()
    }

    /// Deterministic, non-repeating-looking bytes, so that a misplaced part is detected.
    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    async fn put(store: &S3Store, name: &str, data: &[u8]) {
        let mut upload = store.begin().await.unwrap();
        upload.write(data).await.unwrap();
        upload.commit(name).await.unwrap();
    }

    async fn read_all(store: &S3Store, name: &str) -> Vec<u8> {
        let mut reader = store.open_read(name).await.unwrap();
        let mut out = Vec::new();
        while let Some(chunk) = reader.next_chunk().await.unwrap() {
            assert!(!chunk.is_empty());
            out.extend_from_slice(&chunk);
        }
        out
    }

    /// s3s-fs keeps multipart parts as `.upload_id-*` files in its root.
    fn pending_parts(server: &S3Server) -> Vec<String> {
        std::fs::read_dir(server.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload_id-"))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn small_object_round_trips_as_one_put() {
        let dir = tempfile::tempdir().unwrap();
        let server = S3Server::start(dir.path());
        let store = open(&server).await;
        let data = pattern(512 * 1024 + 7, 1);
        let mut upload = store.begin().await.unwrap();
        for chunk in data.chunks(16 * 1024 + 3) {
            upload.write(chunk).await.unwrap();
        }
        upload.commit("3fa9c0de").await.unwrap();
        assert_eq!(read_all(&store, "3fa9c0de").await, data);
        assert_eq!(server.object_names(), vec!["3fa9c0de".to_string()]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn empty_object_and_exactly_one_part() {
        let dir = tempfile::tempdir().unwrap();
        let server = S3Server::start(dir.path());
        let store = open(&server).await;
        let upload = store.begin().await.unwrap();
        upload.commit("e0").await.unwrap();
        assert_eq!(read_all(&store, "e0").await, Vec::<u8>::new());
        let data = pattern(5 * MIB, 2);
        put(&store, "e1", &data).await;
        assert_eq!(read_all(&store, "e1").await, data);
        assert!(pending_parts(&server).is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn multipart_object_round_trips_and_leaves_no_staging_object() {
        let dir = tempfile::tempdir().unwrap();
        let server = S3Server::start(dir.path());
        let store = open(&server).await;
        let data = pattern(12 * MIB, 3);
        let mut upload = store.begin().await.unwrap();
        // Odd chunk sizes so that part boundaries fall inside writes.
        let sizes = [1, 4093, 65_537, 1_000_003, 777_777, 3 * MIB + 11];
        let (mut offset, mut i) = (0, 0);
        while offset < data.len() {
            let end = (offset + sizes[i % sizes.len()]).min(data.len());
            upload.write(&data[offset..end]).await.unwrap();
            offset = end;
            i += 1;
        }
        // 12 MiB at 5 MiB parts: two full parts are staged, the third is still buffered.
        assert!(upload.multipart.is_some());
        upload.commit("ab12").await.unwrap();
        assert_eq!(read_all(&store, "ab12").await, data);
        assert_eq!(server.object_names(), vec!["ab12".to_string()]);
        assert!(pending_parts(&server).is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn committing_the_same_bytes_twice_leaves_one_object() {
        let dir = tempfile::tempdir().unwrap();
        let server = S3Server::start(dir.path());
        let store = open(&server).await;
        let small = pattern(1000, 4);
        put(&store, "cafe", &small).await;
        put(&store, "cafe", &small).await;
        let large = pattern(11 * MIB, 5);
        put(&store, "beef", &large).await;
        put(&store, "beef", &large).await;
        assert_eq!(read_all(&store, "cafe").await, small);
        assert_eq!(read_all(&store, "beef").await, large);
        assert_eq!(
            server.object_names(),
            vec!["beef".to_string(), "cafe".to_string()]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_uploads_share_one_store() {
        let dir = tempfile::tempdir().unwrap();
        let server = S3Server::start(dir.path());
        let store = open(&server).await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64u32 {
            let store = store.clone();
            tasks.spawn(async move {
                let name = format!("{i:04x}");
                let data = pattern(20_000 + i as usize * 1000, i);
                put(&store, &name, &data).await;
                assert_eq!(read_all(&store, &name).await, data);
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
        assert_eq!(server.object_names().len(), 64);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn exists_delete_and_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let server = S3Server::start(dir.path());
        let store = open(&server).await;
        assert!(!store.exists("d00d").await.unwrap());
        match store.open_read("d00d").await {
            Err(StoreError::NotFound { name }) => assert_eq!(name, "d00d"),
            Err(e) => panic!("expected NotFound, got {e}"),
            Ok(_) => panic!("expected NotFound, got a reader"),
        }
        put(&store, "d00d", b"x").await;
        assert!(store.exists("d00d").await.unwrap());
        store.delete("d00d").await.unwrap();
        assert!(!store.exists("d00d").await.unwrap());
        // Deleting a missing object is not an error.
        store.delete("d00d").await.unwrap();
        assert!(server.object_names().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn abort_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let server = S3Server::start(dir.path());
        let store = open(&server).await;
        let mut small = store.begin().await.unwrap();
        small.write(&pattern(1000, 6)).await.unwrap();
        small.abort().await;
        let mut large = store.begin().await.unwrap();
        large.write(&pattern(11 * MIB, 7)).await.unwrap();
        assert!(large.multipart.is_some());
        large.abort().await;
        assert!(server.object_names().is_empty());
        assert!(pending_parts(&server).is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_dropped_upload_aborts_itself() {
        let dir = tempfile::tempdir().unwrap();
        let server = S3Server::start(dir.path());
        let store = open(&server).await;
        let mut upload = store.begin().await.unwrap();
        upload.write(&pattern(11 * MIB, 8)).await.unwrap();
        drop(upload);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(pending_parts(&server).is_empty() && server.object_names().is_empty()) {
            assert!(
                Instant::now() < deadline,
                "the abandoned upload was not aborted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_request_is_retried_until_the_server_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = S3Server::start(dir.path());
        let store = open(&server).await;
        server.stop();
        // Back after the first two retries (200 + 400 ms): the third gets through.
        let back = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(450));
            server.restart();
            server
        });
        put(&store, "0a", b"after the outage").await;
        let server = back.join().unwrap();
        assert_eq!(read_all(&store, "0a").await, b"after the outage");
        // With no retries the same outage fails at once.
        let mut server = server;
        server.stop();
        let cfg = S3StoreConfig {
            retries: 0,
            ..config(&server)
        };
        let once = S3Store {
            inner: Arc::new(Inner {
                retries: cfg.retries,
                ..clone_inner(&store)
            }),
        };
        let started = Instant::now();
        let mut up = once.begin().await.unwrap();
        up.write(b"x").await.unwrap();
        let err = up.commit("0b").await.unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(150), "{err}");
        assert!(matches!(err, StoreError::S3 { .. }), "{err}");
    }

    fn clone_inner(store: &S3Store) -> Inner {
        Inner {
            client: store.inner.client.clone(),
            endpoint: store.inner.endpoint.clone(),
            bucket: store.inner.bucket.clone(),
            part_size: store.inner.part_size,
            timeout: store.inner.timeout,
            retries: store.inner.retries,
        }
    }

    #[test]
    fn only_failures_that_may_pass_are_transient() {
        let http =
            |status: u16| MinioError::S3Server(S3ServerError::HttpError(status, String::new()));
        assert!(is_transient(&http(503)));
        assert!(is_transient(&http(500)));
        assert!(!is_transient(&http(404)));
        assert!(!is_transient(&http(403)));
        let response = |status: u16| {
            MinioError::S3Server(S3ServerError::S3Error(Box::new(
                minio::s3::minio_error_response::MinioErrorResponse::from_status_and_message(
                    status,
                    String::new(),
                ),
            )))
        };
        assert!(is_transient(&response(502)));
        let coded = |code: &str| {
            let body = format!("<Error><Code>{code}</Code><Message>m</Message></Error>");
            MinioError::S3Server(S3ServerError::S3Error(Box::new(
                minio::s3::minio_error_response::MinioErrorResponse::new_from_body(
                    Bytes::from(body),
                    Default::default(),
                )
                .unwrap(),
            )))
        };
        assert!(is_transient(&coded("SlowDown")));
        assert!(is_transient(&coded("InternalError")));
        assert!(!is_transient(&coded("AccessDenied")));
        assert!(has_code(&coded("NoSuchUpload"), "nosuchupload"));
        assert!(!is_transient(&response(404)));
        assert!(!is_transient(&response(400)));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn open_creates_a_missing_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let server = S3Server::start(dir.path());
        let cfg = S3StoreConfig {
            bucket: "fresh-bucket".into(),
            ..config(&server)
        };
        let store = S3Store::open(&cfg, Duration::from_secs(10)).await.unwrap();
        assert!(server.root().join("fresh-bucket").is_dir());
        put(&store, "01", b"one").await;
        assert_eq!(read_all(&store, "01").await, b"one");
        // Opening again finds it.
        S3Store::open(&cfg, Duration::from_secs(10)).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn wrong_credentials_are_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let server = S3Server::start(dir.path());
        let cfg = S3StoreConfig {
            secret_key: "not-the-secret".into(),
            ..config(&server)
        };
        let error = S3Store::open(&cfg, Duration::from_secs(10))
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, StoreError::S3 { .. }), "{text}");
        assert!(
            text.contains(&server.bucket) && text.contains(&server.endpoint),
            "{text}"
        );
        assert!(!text.contains("not-the-secret"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn unreachable_endpoint_fails_within_the_timeout() {
        // A port that was just free: connections are refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = S3StoreConfig {
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: "dicomchain".into(),
            access_key: "a".into(),
            secret_key: "b".into(),
            part_size: 5 * MIB as u64,
            ..S3StoreConfig::default()
        };
        let timeout = Duration::from_secs(3);
        let started = Instant::now();
        let error = S3Store::open(&cfg, timeout).await.unwrap_err();
        assert!(
            started.elapsed() < timeout + Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let text = error.to_string();
        assert!(matches!(error, StoreError::S3 { .. }), "{text}");
        assert!(
            text.contains(&cfg.endpoint) && text.contains("dicomchain"),
            "{text}"
        );
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_server_that_never_answers_times_out() {
        // The kernel accepts connections into the backlog; nobody ever answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = S3StoreConfig {
            endpoint: format!("http://{}", listener.local_addr().unwrap()),
            ..S3StoreConfig::default()
        };
        let timeout = Duration::from_secs(1);
        let started = Instant::now();
        let error = S3Store::open(&cfg, timeout).await.unwrap_err();
        assert!(
            started.elapsed() < timeout + Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(error, StoreError::Timeout { .. }), "{error}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_outage_fails_promptly_and_the_store_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = S3Server::start(dir.path());
        let cfg = config(&server);
        let timeout = Duration::from_secs(5);
        let store = S3Store::open(&cfg, timeout).await.unwrap();
        put(&store, "aa", b"before").await;

        server.stop();
        let started = Instant::now();
        let mut upload = store.begin().await.unwrap();
        upload.write(b"during").await.unwrap();
        let error = upload.commit("bb").await.unwrap_err();
        assert!(
            started.elapsed() < timeout + Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(error, StoreError::S3 { .. }), "{error}");
        assert!(store.open_read("aa").await.is_err());

        server.restart();
        assert_eq!(read_all(&store, "aa").await, b"before");
        put(&store, "bb", b"after").await;
        assert_eq!(read_all(&store, "bb").await, b"after");
    }

    /// Compile-time check: the node runs these futures on a multi-thread runtime.
    #[allow(dead_code)]
    fn handles_and_futures_are_send(store: S3Store, mut upload: S3Upload, mut reader: S3Reader) {
        fn send<T: Send>(_: T) {}
        send(S3Store::open(
            &S3StoreConfig::default(),
            Duration::from_secs(1),
        ));
        send(store.begin());
        send(store.open_read("x"));
        send(store.exists("x"));
        send(store.delete("x"));
        send(upload.write(b"x"));
        send(reader.next_chunk());
        send(upload.commit("x"));
        send(store.clone());
        send(reader);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn staging_keys_are_distinct() {
        let keys: std::collections::HashSet<String> = (0..1000).map(|_| staging_key()).collect();
        assert_eq!(keys.len(), 1000);
        let key = keys.iter().next().unwrap();
        assert!(key.starts_with(STAGING_PREFIX) && key.len() == STAGING_PREFIX.len() + 32);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn debug_does_not_show_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let server = S3Server::start(dir.path());
        let store = open(&server).await;
        let shown = format!("{store:?}");
        assert!(
            !shown.contains(&server.secret_key) && !shown.contains(&server.access_key),
            "{shown}"
        );
    }
}
