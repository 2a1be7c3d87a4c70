//! The S3 backend: MinIO or any S3-compatible server, through the `minio` crate (0.4).
//!
//! # Writes
//! The object name is a digest known only once the whole instance has been received, so an
//! [`upload::S3Upload`] cannot start a request under its final key.
//! - Below `part_size` (the common case: a CT slice's pixel data is 512 KiB) the bytes stay in memory and
//!   [`upload::S3Upload::commit`] sends a single PutObject under the final name.
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

pub mod reader;
pub mod upload;

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
#[path = "../../../tests/support/s3server.rs"]
mod s3server;

#[cfg(test)]
mod tests;
