//! PDU I/O on one association's socket (PS3.8 §9.3), using dicom-ul's PDU codec.
//!
//! Reading is header-first: the 6-byte PDU header gives the length, which is checked against our
//! announced maximum *before* any body byte is buffered (a peer that exceeds it is aborted, so a
//! hostile length cannot make us allocate), then the body is read in one go and decoded.

use std::time::Duration;

use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, PDataValue, PDataValueType, Pdu};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

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

/// Bound on non-data PDUs (A-ASSOCIATE-RQ with many presentation contexts, etc.).
const MAX_CONTROL_PDU: u32 = 1024 * 1024;

/// One association's socket.
pub struct Connection {
    socket: BufReader<TcpStream>,
    buf: Vec<u8>,
    write_buf: Vec<u8>,
    max_receive: u32,
    io_timeout: Duration,
}

impl Connection {
    pub fn new(socket: TcpStream, max_receive: u32, io_timeout: Duration) -> Connection {
        Connection {
            socket: BufReader::with_capacity(256 * 1024, socket),
            buf: Vec::new(),
            write_buf: Vec::new(),
            max_receive,
            io_timeout,
        }
    }

    /// Waits up to `wait` for the next PDU to start, then up to the I/O timeout for its body.
    pub async fn receive(&mut self, wait: Duration) -> Result<Pdu, ConnError> {
        let mut header = [0u8; 6];
        match tokio::time::timeout(wait, self.socket.read_exact(&mut header)).await {
            Err(_) => return Err(ConnError::Timeout(wait)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ConnError::Closed)
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
        let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        // The announced maximum bounds P-DATA-TF PDUs (PS3.8 §D.1); association PDUs may be
        // longer (many presentation contexts) but are still bounded.
        let max = if header[0] == 0x04 {
            self.max_receive
        } else {
            MAX_CONTROL_PDU
        };
        if length > max {
            return Err(ConnError::TooLarge { length, max });
        }
        self.buf.clear();
        self.buf.extend_from_slice(&header);
        self.buf.resize(6 + length as usize, 0);
        match tokio::time::timeout(self.io_timeout, self.socket.read_exact(&mut self.buf[6..]))
            .await
        {
            Err(_) => return Err(ConnError::Timeout(self.io_timeout)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ConnError::Closed)
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
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
            Ok(r) => Ok(r?),
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

    /// Sends an A-ABORT (best effort) and closes.
    pub async fn abort(mut self, reason: AbortRQServiceProviderReason) {
        let pdu = Pdu::AbortRQ {
            source: AbortRQSource::ServiceProvider(reason),
        };
        let _ = self.send(&pdu).await;
        let _ = self.socket.get_mut().shutdown().await;
    }

    /// Closes the socket after a release or rejection.
    pub async fn close(mut self) {
        let _ = self.socket.get_mut().shutdown().await;
    }
}
