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
