//! PDU I/O on one association's socket (PS3.8 §9.3), using dicom-ul's PDU codec.
//!
//! Reading is header-first: the 6-byte PDU header gives the length, which is checked against our
//! announced maximum *before* any body byte is buffered (a peer that exceeds it is aborted, so a
//! hostile length cannot make us allocate), then the body is read in one go and decoded.

use std::time::Duration;

use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, PDataValue, PDataValueType, Pdu};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// What an association runs over: a TCP socket, or TLS over one.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// PDU-level failures; every one ends the association.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("peer closed the connection")]
    Closed,
    #[error("no PDU within {0:?}")]
    Timeout(Duration),
    #[error("PDU of {length} bytes exceeds our maximum of {max}")]
    TooLarge { length: u32, max: u32 },
    #[error("malformed PDU: {0}")]
    Malformed(String),
    #[error("network error: {0}")]
    Io(#[from] std::io::Error),
}

/// One read of at least a byte, cancel-safe; end of stream is [`ConnError::Closed`].
async fn read_some(
    socket: &mut BufReader<Box<dyn Stream>>,
    buf: &mut [u8],
    limit: Duration,
) -> Result<usize, ConnError> {
    match tokio::time::timeout(limit, socket.read(buf)).await {
        Err(_) => Err(ConnError::Timeout(limit)),
        Ok(Ok(0)) => Err(ConnError::Closed),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ConnError::Closed),
        Ok(Err(e)) => Err(e.into()),
    }
}

/// Bound on non-data PDUs (A-ASSOCIATE-RQ with many presentation contexts, etc.).
const MAX_CONTROL_PDU: u32 = 1024 * 1024;

/// One association's socket.
pub struct Connection {
    socket: BufReader<Box<dyn Stream>>,
    /// The PDU being read: its header, then header and body in `buf`; `got` bytes so far.
    header: [u8; 6],
    got: usize,
    buf: Vec<u8>,
    write_buf: Vec<u8>,
    max_receive: u32,
    io_timeout: Duration,
}

impl Connection {
    pub fn new(
        socket: impl Stream + 'static,
        max_receive: u32,
        io_timeout: Duration,
    ) -> Connection {
        Connection {
            socket: BufReader::with_capacity(256 * 1024, Box::new(socket) as Box<dyn Stream>),
            header: [0; 6],
            got: 0,
            buf: Vec::new(),
            write_buf: Vec::new(),
            max_receive,
            io_timeout,
        }
    }

    /// Waits up to `wait` for the next PDU to start, then up to the I/O timeout for each further
    /// read of it.
    ///
    /// Cancel-safe: what was read of a PDU is kept in `self`, so the association loop can wait
    /// for a PDU and for query results at once and drop this future when results come first.
    pub async fn receive(&mut self, wait: Duration) -> Result<Pdu, ConnError> {
        while self.got < 6 {
            let limit = if self.got == 0 { wait } else { self.io_timeout };
            let n = read_some(&mut self.socket, &mut self.header[self.got..], limit).await?;
            self.got += n;
            if self.got == 6 {
                let length = u32::from_be_bytes([
                    self.header[2],
                    self.header[3],
                    self.header[4],
                    self.header[5],
                ]);
                // The announced maximum bounds P-DATA-TF PDUs (PS3.8 §D.1); association PDUs
                // may be longer (many presentation contexts) but are still bounded.
                let max = if self.header[0] == 0x04 {
                    self.max_receive
                } else {
                    MAX_CONTROL_PDU
                };
                if length > max {
                    self.got = 0;
                    return Err(ConnError::TooLarge { length, max });
                }
                self.buf.clear();
                self.buf.extend_from_slice(&self.header);
                self.buf.resize(6 + length as usize, 0);
            }
        }
        while self.got < self.buf.len() {
            let n = read_some(&mut self.socket, &mut self.buf[self.got..], self.io_timeout).await?;
            self.got += n;
        }
        self.got = 0;
        crate::metrics::global()
            .bytes_in
            .fetch_add(self.buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let length = (self.buf.len() - 6) as u32;
        // The length was checked above; the codec's own bound is the protocol maximum.
        let bound = length.clamp(
            dicom_ul::pdu::MINIMUM_PDU_SIZE,
            dicom_ul::pdu::MAXIMUM_PDU_SIZE,
        );
        match dicom_ul::pdu::read_pdu(&self.buf[..], bound, true) {
            Ok(Some(pdu)) => Ok(pdu),
            Ok(None) => Err(ConnError::Malformed("incomplete PDU".into())),
            Err(e) => Err(ConnError::Malformed(e.to_string())),
        }
    }

    pub async fn send(&mut self, pdu: &Pdu) -> Result<(), ConnError> {
        self.write_buf.clear();
        dicom_ul::pdu::write_pdu(&mut self.write_buf, pdu)
            .map_err(|e| ConnError::Malformed(e.to_string()))?;
        let socket = self.socket.get_mut();
        match tokio::time::timeout(self.io_timeout, socket.write_all(&self.write_buf)).await {
            Err(_) => Err(ConnError::Timeout(self.io_timeout)),
            Ok(r) => {
                r?;
                crate::metrics::global().bytes_out.fetch_add(
                    self.write_buf.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                Ok(())
            }
        }
    }

    /// Sends a complete command set as one PDV.
    pub async fn send_command(
        &mut self,
        context_id: u8,
        command: Vec<u8>,
    ) -> Result<(), ConnError> {
        self.send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: context_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command,
            }],
        })
        .await
    }

    /// Sends a command and its data set, the data set in as many P-DATA-TF PDUs as the peer's
    /// maximum length requires (PS3.8 §9.3.5: the maximum covers the PDV items, each of which
    /// adds 6 bytes to its data).
    pub async fn send_message(
        &mut self,
        context_id: u8,
        command: Vec<u8>,
        data: Vec<u8>,
        peer_max_pdu: u32,
    ) -> Result<(), ConnError> {
        self.send_command(context_id, command).await?;
        self.send_data(context_id, &data, true, peer_max_pdu).await
    }

    /// Sends a piece of a data set as PDVs no larger than the peer accepts; with `last`, the
    /// final PDV ends the data set.
    pub async fn send_data(
        &mut self,
        context_id: u8,
        data: &[u8],
        last: bool,
        peer_max_pdu: u32,
    ) -> Result<(), ConnError> {
        // Even fragments: DICOM values are even, and peers (DCMTK) refuse odd PDVs mid-stream.
        let chunk = ((peer_max_pdu as usize).saturating_sub(6) & !1).max(2);
        let mut rest = data;
        loop {
            let n = rest.len().min(chunk);
            let (piece, tail) = rest.split_at(n);
            self.send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: context_id,
                    value_type: PDataValueType::Data,
                    is_last: last && tail.is_empty(),
                    data: piece.to_vec(),
                }],
            })
            .await?;
            if tail.is_empty() {
                return Ok(());
            }
            rest = tail;
        }
    }

    /// Sends an A-ABORT (best effort) and closes.
    pub async fn abort(mut self, reason: AbortRQServiceProviderReason) {
        let pdu = Pdu::AbortRQ {
            source: AbortRQSource::ServiceProvider(reason),
        };
        let _ = self.send(&pdu).await;
        // Bounded: over TLS a shutdown flushes to a peer that may have stopped reading.
        let _ = tokio::time::timeout(self.io_timeout, self.socket.get_mut().shutdown()).await;
    }

    /// Closes the socket after a release or rejection.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(self.io_timeout, self.socket.get_mut().shutdown()).await;
    }
}
