//! Reads from S3: one object's body streamed under the store timeout, its length checked
//! against the Content-Length the server announced.

use super::*;

/// A streaming read of one object.
pub struct S3Reader {
    pub(super) stream: Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>,
    pub(super) what: String,
    pub(super) timeout: Duration,
    /// Content-Length announced by the server, checked at the end of the body.
    pub(super) expected: u64,
    pub(super) received: u64,
    pub(super) done: bool,
}

impl S3Store {
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
