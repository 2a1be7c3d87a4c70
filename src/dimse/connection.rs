//! PDU I/O on one association's socket (PS3.8 §9.3), using dicom-ul's PDU codec.
//!
//! Reading is header-first: the 6-byte PDU header gives the length, which is checked against our
//! announced maximum *before* any body byte is buffered (a peer that exceeds it is aborted, so a
//! hostile length cannot make us allocate), then the body is read in one go and decoded.
//!
//! P-DATA-TF PDUs, which carry every byte of every data set, are parsed here in place
//! ([`PData`]): each PDV's data is a range of the PDU's own buffer, which goes back to the
//! connection for the next PDU ([`Connection::recycle`]), and the body is read into the
//! buffer's spare capacity without zero-filling it first. dicom-ul's reader copies each PDV
//! twice (into `Bytes`, then into a `Vec`): with the zero-fill and the copy out of the socket's
//! read buffer, a 512x512 CT image crossed memory five times on its way in, now once. Other
//! PDUs, small and rare, go through dicom-ul's codec.

use std::time::Duration;

use std::ops::Range;

use bytes::BufMut;
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

/// One read of at least a byte within `limit`, cancel-safe; end of stream is
/// [`ConnError::Closed`].
async fn read_some(
    read: impl std::future::Future<Output = std::io::Result<usize>>,
    limit: Duration,
) -> Result<usize, ConnError> {
    match tokio::time::timeout(limit, read).await {
        Err(_) => Err(ConnError::Timeout(limit)),
        Ok(Ok(0)) => Err(ConnError::Closed),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ConnError::Closed),
        Ok(Err(e)) => Err(e.into()),
    }
}

/// Bound on non-data PDUs (A-ASSOCIATE-RQ with many presentation contexts, etc.).
const MAX_CONTROL_PDU: u32 = 1024 * 1024;

/// The socket's read buffer. Large: one read takes whatever has arrived, often several PDUs,
/// at the cost of one copy of a PDU body into its own buffer (docs/PERFORMANCE.md compares it
/// with a buffer small enough for tokio's `BufReader` to bypass).
const READ_BUFFER: usize = 256 * 1024;

const P_DATA_TF: u8 = 0x04;

/// A P-DATA-TF PDU (PS3.8 §9.3.5) with its presentation data value items parsed in place.
pub struct PData {
    /// The whole PDU, header included.
    bytes: Vec<u8>,
    items: Vec<Item>,
}

struct Item {
    context_id: u8,
    /// The message control header: bit 0 command, bit 1 last fragment (PS3.8 §E.2).
    control: u8,
    data: Range<usize>,
}

/// One presentation data value of a [`PData`].
pub struct Pdv<'a> {
    pub presentation_context_id: u8,
    pub value_type: PDataValueType,
    pub is_last: bool,
    pub data: &'a [u8],
}

impl PData {
    /// Parses the items of a complete P-DATA-TF PDU (its 6-byte header included): each has a
    /// 4-byte length of at least 2 (context id and control header), which must fit the PDU.
    fn parse(bytes: Vec<u8>) -> Result<PData, ConnError> {
        let mut items = Vec::new();
        let mut at = 6;
        while at < bytes.len() {
            let Some(head) = bytes.get(at..at + 6) else {
                return Err(ConnError::Malformed(
                    "P-DATA-TF: truncated presentation data value item".into(),
                ));
            };
            let length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if length < 2 || length - 2 > bytes.len() - at - 6 {
                return Err(ConnError::Malformed(format!(
                    "P-DATA-TF: presentation data value item length {length} does not fit the PDU"
                )));
            }
            items.push(Item {
                context_id: head[4],
                control: head[5],
                data: at + 6..at + 4 + length,
            });
            at += 4 + length;
        }
        Ok(PData { bytes, items })
    }

    pub fn values(&self) -> impl Iterator<Item = Pdv<'_>> {
        self.items.iter().map(|i| Pdv {
            presentation_context_id: i.context_id,
            value_type: if i.control & 0x01 != 0 {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last: i.control & 0x02 != 0,
            data: &self.bytes[i.data.clone()],
        })
    }

    /// The PDU in dicom-ul's form (copies the data), for callers that want owned values.
    fn to_pdu(&self) -> Pdu {
        Pdu::PData {
            data: self
                .values()
                .map(|v| PDataValue {
                    presentation_context_id: v.presentation_context_id,
                    value_type: v.value_type,
                    is_last: v.is_last,
                    data: v.data.to_vec(),
                })
                .collect(),
        }
    }
}

/// What [`Connection::receive_data`] read: a P-DATA-TF PDU parsed in place, or any other PDU.
pub enum Received {
    Data(PData),
    Other(Pdu),
}

/// One association's socket.
pub struct Connection {
    socket: BufReader<Box<dyn Stream>>,
    /// The PDU being read: its header (`got` bytes of it so far), then header and body in
    /// `buf`, which holds what has been read of the PDU (up to `want` bytes).
    header: [u8; 6],
    got: usize,
    buf: Vec<u8>,
    want: usize,
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
            socket: BufReader::with_capacity(READ_BUFFER, Box::new(socket) as Box<dyn Stream>),
            header: [0; 6],
            got: 0,
            buf: Vec::new(),
            want: 0,
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
        Ok(match self.receive_data(wait).await? {
            Received::Data(p) => {
                let pdu = p.to_pdu();
                self.recycle(p);
                pdu
            }
            Received::Other(pdu) => pdu,
        })
    }

    /// [`Connection::receive`], with a P-DATA-TF PDU parsed in place; hand it back with
    /// [`Connection::recycle`] when done, so that its buffer takes the next PDU.
    pub async fn receive_data(&mut self, wait: Duration) -> Result<Received, ConnError> {
        while self.got < 6 {
            let limit = if self.got == 0 { wait } else { self.io_timeout };
            let n = read_some(self.socket.read(&mut self.header[self.got..]), limit).await?;
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
                let max = if self.header[0] == P_DATA_TF {
                    self.max_receive
                } else {
                    MAX_CONTROL_PDU
                };
                if length > max {
                    self.got = 0;
                    return Err(ConnError::TooLarge { length, max });
                }
                self.buf.clear();
                self.buf.reserve_exact(6 + length as usize);
                self.buf.extend_from_slice(&self.header);
                self.want = 6 + length as usize;
            }
        }
        while self.buf.len() < self.want {
            let rest = self.want - self.buf.len();
            // Into the buffer's spare capacity, without zero-filling it first; cancel-safe
            // (`read_buf` reads nothing unless it completes).
            let mut spare = (&mut self.buf).limit(rest);
            read_some(self.socket.read_buf(&mut spare), self.io_timeout).await?;
        }
        self.got = 0;
        crate::ops::metrics::global()
            .bytes_in
            .fetch_add(self.buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if self.header[0] == P_DATA_TF {
            return PData::parse(std::mem::take(&mut self.buf)).map(Received::Data);
        }
        let length = (self.buf.len() - 6) as u32;
        // The length was checked above; the codec's own bound is the protocol maximum.
        let bound = length.clamp(
            dicom_ul::pdu::MINIMUM_PDU_SIZE,
            dicom_ul::pdu::MAXIMUM_PDU_SIZE,
        );
        match dicom_ul::pdu::read_pdu(&self.buf[..], bound, true) {
            Ok(Some(pdu)) => Ok(Received::Other(pdu)),
            Ok(None) => Err(ConnError::Malformed("incomplete PDU".into())),
            Err(e) => Err(ConnError::Malformed(e.to_string())),
        }
    }

    /// Takes back a P-DATA-TF PDU's buffer for the next one.
    pub fn recycle(&mut self, pdata: PData) {
        if self.buf.capacity() < pdata.bytes.capacity() {
            self.buf = pdata.bytes;
        }
    }

    pub async fn send(&mut self, pdu: &Pdu) -> Result<(), ConnError> {
        self.write_buf.clear();
        dicom_ul::pdu::write_pdu(&mut self.write_buf, pdu)
            .map_err(|e| ConnError::Malformed(e.to_string()))?;
        let buf = std::mem::take(&mut self.write_buf);
        let sent = self.write_out(&mut &buf[..]).await;
        self.write_buf = buf;
        sent
    }

    /// Sends a P-DATA-TF PDU of one PDV: its two headers and `data` go to the socket in one
    /// gathered write, without being copied together first.
    async fn send_pdv(
        &mut self,
        context_id: u8,
        control: u8,
        data: &[u8],
    ) -> Result<(), ConnError> {
        let item = data.len() as u32 + 2;
        let mut head = [0u8; 12];
        head[0] = P_DATA_TF;
        head[2..6].copy_from_slice(&(item + 4).to_be_bytes());
        head[6..10].copy_from_slice(&item.to_be_bytes());
        head[10] = context_id;
        head[11] = control;
        let mut out = bytes::Buf::chain(&head[..], data);
        self.write_out(&mut out).await
    }

    async fn write_out(&mut self, out: &mut impl bytes::Buf) -> Result<(), ConnError> {
        let length = out.remaining() as u64;
        let socket = self.socket.get_mut();
        match tokio::time::timeout(self.io_timeout, socket.write_all_buf(out)).await {
            Err(_) => Err(ConnError::Timeout(self.io_timeout)),
            Ok(r) => {
                r?;
                crate::ops::metrics::global()
                    .bytes_out
                    .fetch_add(length, std::sync::atomic::Ordering::Relaxed);
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
        // Command, last fragment (PS3.8 §E.2).
        self.send_pdv(context_id, 0x03, &command).await
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
            // Data set, last fragment or not (PS3.8 §E.2).
            let control = if last && tail.is_empty() { 0x02 } else { 0x00 };
            self.send_pdv(context_id, control, piece).await?;
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

/// The name of a PDU type, for logs and abort reasons.
pub fn pdu_name(pdu: &Pdu) -> &'static str {
    match pdu {
        Pdu::Unknown { .. } => "unknown PDU",
        Pdu::AssociationRQ(_) => "A-ASSOCIATE-RQ",
        Pdu::AssociationAC(_) => "A-ASSOCIATE-AC",
        Pdu::AssociationRJ(_) => "A-ASSOCIATE-RJ",
        Pdu::PData { .. } => "P-DATA-TF",
        Pdu::ReleaseRQ => "A-RELEASE-RQ",
        Pdu::ReleaseRP => "A-RELEASE-RP",
        Pdu::AbortRQ { .. } => "A-ABORT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn encode(pdu: &Pdu) -> Vec<u8> {
        let mut out = Vec::new();
        dicom_ul::pdu::write_pdu(&mut out, pdu).unwrap();
        out
    }

    /// A P-DATA-TF PDU of the given PDVs (context id, control header, data), as a peer sends it.
    fn p_data(pdvs: &[(u8, u8, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (ctx, control, data) in pdvs {
            body.extend_from_slice(&(data.len() as u32 + 2).to_be_bytes());
            body.extend_from_slice(&[*ctx, *control]);
            body.extend_from_slice(data);
        }
        let mut pdu = vec![P_DATA_TF, 0];
        pdu.extend_from_slice(&(body.len() as u32).to_be_bytes());
        pdu.extend_from_slice(&body);
        pdu
    }

    fn owned(p: &PData) -> Vec<(u8, bool, bool, Vec<u8>)> {
        p.values()
            .map(|v| {
                let command = matches!(v.value_type, PDataValueType::Command);
                (
                    v.presentation_context_id,
                    command,
                    v.is_last,
                    v.data.to_vec(),
                )
            })
            .collect()
    }

    #[test]
    fn pdvs_are_parsed_in_place_as_dicom_ul_parses_them() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let cases: Vec<Vec<(u8, u8, &[u8])>> = vec![
            vec![(1, 0x03, b"command!")],
            vec![(3, 0x00, &data[..]), (3, 0x02, b"")],
            vec![(1, 0x01, b"cmd"), (1, 0x03, b"end"), (5, 0x02, &data[..10])],
            vec![],
        ];
        for pdvs in cases {
            let bytes = p_data(&pdvs);
            let ours = owned(&PData::parse(bytes.clone()).unwrap());
            let Some(Pdu::PData { data: theirs }) =
                dicom_ul::pdu::read_pdu(&bytes[..], dicom_ul::pdu::MAXIMUM_PDU_SIZE, true).unwrap()
            else {
                panic!("dicom-ul did not read a P-DATA-TF PDU");
            };
            let theirs: Vec<_> = theirs
                .into_iter()
                .map(|v| {
                    let command = matches!(v.value_type, PDataValueType::Command);
                    (v.presentation_context_id, command, v.is_last, v.data)
                })
                .collect();
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn a_pdv_item_that_does_not_fit_its_pdu_is_malformed() {
        let good = p_data(&[(1, 0x02, b"abcd")]);
        // Item length 1: no room for the context id and the control header.
        let mut short = good.clone();
        short[6..10].copy_from_slice(&1u32.to_be_bytes());
        // Item length past the end of the PDU.
        let mut long = good.clone();
        long[6..10].copy_from_slice(&7u32.to_be_bytes());
        // A second item cut off inside its header.
        let mut cut = good.clone();
        cut.extend_from_slice(&[0, 0, 0]);
        let n = (cut.len() - 6) as u32;
        cut[2..6].copy_from_slice(&n.to_be_bytes());
        for bad in [short, long, cut] {
            assert!(matches!(PData::parse(bad), Err(ConnError::Malformed(_))));
        }
        assert!(PData::parse(good).is_ok());
    }

    /// PDUs written in small pieces with pauses, larger than the socket's read buffer, and the
    /// receive cancelled again and again mid-PDU (as the association loop's `select!` does):
    /// every PDU arrives whole and in order, through a recycled buffer.
    #[tokio::test]
    async fn pdus_arrive_whole_through_cancelled_receives_and_recycled_buffers() {
        let (ours, mut peer) = tokio::io::duplex(4096);
        let mut conn = Connection::new(ours, 1 << 20, Duration::from_secs(5));
        let big: Vec<u8> = (0..3 * READ_BUFFER as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let pdus = vec![
            p_data(&[(1, 0x03, b"command")]),
            p_data(&[(1, 0x00, &big[..]), (1, 0x02, &big[..100])]),
            encode(&Pdu::ReleaseRQ),
            p_data(&[(3, 0x02, &big[5..])]),
        ];
        let sent = pdus.clone();
        let writer = tokio::spawn(async move {
            for pdu in sent {
                for piece in pdu.chunks(1000) {
                    peer.write_all(piece).await.unwrap();
                    tokio::task::yield_now().await;
                }
            }
            peer
        });
        let mut got = Vec::new();
        let mut cancelled = 0;
        while got.len() < pdus.len() {
            // A receive dropped after a moment keeps what it read.
            let r = tokio::select! {
                r = conn.receive_data(Duration::from_secs(5)) => Some(r),
                _ = tokio::task::yield_now() => None,
            };
            match r {
                None => cancelled += 1,
                Some(Ok(Received::Data(p))) => {
                    got.push(p_data(
                        &p.values()
                            .map(|v| {
                                let control =
                                    u8::from(matches!(v.value_type, PDataValueType::Command))
                                        | (u8::from(v.is_last) << 1);
                                (v.presentation_context_id, control, v.data)
                            })
                            .collect::<Vec<_>>(),
                    ));
                    conn.recycle(p);
                }
                Some(Ok(Received::Other(pdu))) => {
                    got.push(encode(&pdu));
                }
                Some(Err(e)) => panic!("{e}"),
            }
        }
        assert!(cancelled > 0, "no receive was ever cancelled mid-way");
        assert_eq!(got, pdus);
        drop(writer.await.unwrap());
    }

    /// What `send_pdv` writes is the P-DATA-TF PDU dicom-ul would write for the same PDV.
    #[tokio::test]
    async fn sent_pdvs_are_what_dicom_ul_writes() {
        let (ours, mut peer) = tokio::io::duplex(1 << 20);
        let mut conn = Connection::new(ours, 1 << 20, Duration::from_secs(5));
        conn.send_command(1, b"command".to_vec()).await.unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        conn.send_data(3, &data, true, 4096).await.unwrap();
        drop(conn);
        let mut wire = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut peer, &mut wire)
            .await
            .unwrap();
        let mut want = encode(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: 1,
                value_type: PDataValueType::Command,
                is_last: true,
                data: b"command".to_vec(),
            }],
        });
        // Fragments of at most 4096 - 6 bytes, even, the last one marked.
        let pieces: Vec<&[u8]> = data.chunks(4090).collect();
        for (i, piece) in pieces.iter().enumerate() {
            want.extend(encode(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: 3,
                    value_type: PDataValueType::Data,
                    is_last: i + 1 == pieces.len(),
                    data: piece.to_vec(),
                }],
            }));
        }
        assert_eq!(wire, want);
    }
}
