//! The DICOM listener as peers see it: C-ECHO, association policy, PDU limits, and C-STORE
//! failures that leave the association usable.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use dicom_ul::pdu::{AssociationRQ, Pdu, PresentationContextProposed, UserVariableItem};

use crate::support::{self, assert_ok, Node, Scu, AE};

#[test]
fn echoscu_succeeds_and_a_wrong_called_ae_is_rejected() {
    let node = Node::start();
    assert_ok(&node.echoscu(), "echoscu");
    let out = Scu::echoscu().called("NOTUS").run(node.port);
    assert!(
        !out.status.success(),
        "a wrong called AE title must be rejected"
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.to_lowercase()
            .contains("called ae title not recognized"),
        "{text}"
    );
}

#[test]
fn the_called_ae_check_can_be_turned_off() {
    let node = Node::start_with_env(&[("DICOMCHAIN__NODE__CHECK_CALLED_AE", "false")]);
    let out = Scu::echoscu().called("ANYTHING").run(node.port);
    assert_ok(&out, "echoscu with another called AE");
}

pub(crate) fn associate(port: u16, max_pdu: u32) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&association_rq(max_pdu)).unwrap();
    let mut header = [0u8; 6];
    s.read_exact(&mut header).unwrap();
    assert_eq!(header[0], 0x02, "expected A-ASSOCIATE-AC");
    let len = u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    s
}

/// An A-ASSOCIATE-RQ for CT Image Storage in Implicit VR Little Endian (context 1).
fn association_rq(max_pdu: u32) -> Vec<u8> {
    let rq = Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "RAWTEST".into(),
        called_ae_title: AE.into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: "1.2.840.10008.5.1.4.1.1.2".into(),
            transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
        }],
        user_variables: vec![UserVariableItem::MaxLength(max_pdu)],
    });
    let mut buf = Vec::new();
    dicom_ul::write_pdu(&mut buf, &rq).unwrap();
    buf
}

/// Sends an A-ASSOCIATE-RQ and returns the whole answer PDU (header and body).
pub(crate) fn request_association(port: u16) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&association_rq(16384)).unwrap();
    read_pdu(&mut s)
        .map(|(t, body)| {
            let mut pdu = vec![t, 0];
            pdu.extend_from_slice(&(body.len() as u32).to_be_bytes());
            pdu.extend_from_slice(&body);
            pdu
        })
        .expect("an answer to the association request")
}

/// The next PDU (type, body), or `None` when the node closed the connection.
pub(crate) fn read_pdu(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 6];
    s.read_exact(&mut header).ok()?;
    let len = u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((header[0], body))
}

/// A command set in Implicit VR Little Endian, with its group length, fields in tag order.
pub(crate) fn command(fields: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    let mut fields = fields.to_vec();
    fields.sort_by_key(|f| f.0);
    for (tag, mut value) in fields {
        if value.len() % 2 == 1 {
            value.push(0);
        }
        body.extend_from_slice(&implicit(tag, &value));
    }
    let mut out = implicit(0x0000_0000, &(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// An Implicit VR Little Endian element.
fn implicit(tag: u32, value: &[u8]) -> Vec<u8> {
    implicit_header(tag, value.len() as u32)
        .into_iter()
        .chain(value.iter().copied())
        .collect()
}

fn implicit_header(tag: u32, len: u32) -> Vec<u8> {
    let mut out = ((tag >> 16) as u16).to_le_bytes().to_vec();
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out
}

/// Sends one PDV in one P-DATA-TF PDU.
pub(crate) fn pdv(s: &mut TcpStream, context: u8, is_command: bool, last: bool, data: &[u8]) {
    let header = u8::from(is_command) | (u8::from(last) << 1);
    let mut pdu = vec![0x04, 0];
    pdu.extend_from_slice(&(data.len() as u32 + 6).to_be_bytes());
    pdu.extend_from_slice(&(data.len() as u32 + 2).to_be_bytes());
    pdu.push(context);
    pdu.push(header);
    pdu.extend_from_slice(data);
    s.write_all(&pdu).unwrap();
}

#[test]
fn a_pdu_larger_than_announced_aborts_the_association() {
    let node = Node::start();
    let mut s = associate(node.port, 16384);
    // A P-DATA-TF header announcing 65537 bytes, one more than our maximum.
    let mut pdu = vec![0x04, 0x00];
    pdu.extend_from_slice(&65537u32.to_be_bytes());
    pdu.extend_from_slice(&[0u8; 1024]);
    s.write_all(&pdu).unwrap();
    let mut header = [0u8; 6];
    s.read_exact(&mut header).unwrap();
    assert_eq!(
        header[0], 0x07,
        "expected A-ABORT, got PDU type {:#x}",
        header[0]
    );
    // The node is still serving.
    assert_ok(&node.echoscu(), "echoscu after abort");
}

#[test]
fn garbage_instead_of_an_association_request_does_not_hurt_the_node() {
    let node = Node::start();
    let mut s = TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_ok(&node.echoscu(), "echoscu after garbage");
}

/// Writes a Part 10 file whose data set bytes are given verbatim.
fn write_part10(path: &PathBuf, sop_class: &str, sop_instance: &str, dataset: &[u8]) {
    fn el(out: &mut Vec<u8>, elem: u16, vr: &[u8; 2], v: &[u8]) {
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&elem.to_le_bytes());
        out.extend_from_slice(vr);
        if vr == b"OB" {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(v);
    }
    let pad = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        v
    };
    let mut group = Vec::new();
    el(&mut group, 1, b"OB", &[0, 1]);
    el(&mut group, 2, b"UI", &pad(sop_class));
    el(&mut group, 3, b"UI", &pad(sop_instance));
    el(&mut group, 0x10, b"UI", &pad("1.2.840.10008.1.2.1"));
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    el(&mut out, 0, b"UL", &(group.len() as u32).to_le_bytes());
    out.extend_from_slice(&group);
    out.extend_from_slice(dataset);
    std::fs::write(path, out).unwrap();
}

/// An Explicit VR LE element.
fn ex(group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == b"UI" { 0 } else { b' ' });
    }
    let mut out = Vec::new();
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    out.extend_from_slice(&v);
    out
}

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const MR: &str = "1.2.840.10008.5.1.4.1.1.4";

fn dataset(sop_class: &str, sop_instance: &str) -> Vec<u8> {
    [
        ex(0x0008, 0x0016, b"UI", sop_class.as_bytes()),
        ex(0x0008, 0x0018, b"UI", sop_instance.as_bytes()),
        ex(0x0010, 0x0020, b"LO", b"PID1"),
        ex(0x0020, 0x000D, b"UI", b"1.2.3.4.100"),
        ex(0x0020, 0x000E, b"UI", b"1.2.3.4.100.1"),
    ]
    .concat()
}

#[test]
fn bad_data_sets_get_failure_statuses_and_the_association_stays_usable() {
    let node = Node::start();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // 1. Truncated in the middle of an element: C000-range.
    let mut truncated = dataset(CT, "1.2.3.4.1");
    truncated.extend_from_slice(&[0x28, 0x00, 0x10, 0x00, b'U', b'S', 0x02]);
    write_part10(&p("a.dcm"), CT, "1.2.3.4.1", &truncated);
    // 2. Command says CT, data set says MR: A900.
    write_part10(&p("b.dcm"), CT, "1.2.3.4.2", &dataset(MR, "1.2.3.4.2"));
    // 3. An element with an invalid VR: C000-range.
    let mut bad_vr = dataset(CT, "1.2.3.4.3");
    bad_vr.extend_from_slice(&[0x28, 0x00, 0x10, 0x00, b'Z', b'Z', 0x02, 0x00, 0x00, 0x02]);
    write_part10(&p("c.dcm"), CT, "1.2.3.4.3", &bad_vr);
    // 4. A good one, on the same association, afterwards.
    write_part10(&p("d.dcm"), CT, "1.2.3.4.4", &dataset(CT, "1.2.3.4.4"));
    let files = vec![p("a.dcm"), p("b.dcm"), p("c.dcm"), p("d.dcm")];
    let results = node.send_exact(&files);
    let status: Vec<_> = results.iter().map(|(s, _)| *s).collect();
    assert_eq!(status.len(), 4, "{results:?}");
    assert!(
        matches!(status[0], Some(s) if (0xC000..=0xCFFF).contains(&s)),
        "{status:?}"
    );
    assert_eq!(status[1], Some(0xA900));
    assert!(
        matches!(status[2], Some(s) if (0xC000..=0xCFFF).contains(&s)),
        "{status:?}"
    );
    assert_eq!(status[3], Some(0x0000), "{status:?}\n{}", node.log());
    // Nothing of the failed ones is on the ledger or in the store; the good one exports.
    let out = tempfile::tempdir().unwrap();
    for uid in ["1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3"] {
        assert!(!node
            .export(&["--instance", uid], out.path())
            .status
            .success());
    }
    assert_ok(
        &node.export(&["--instance", "1.2.3.4.4"], out.path()),
        "export",
    );
    let got = support::read_part10(&out.path().join("1.2.3.4.4.dcm")).unwrap();
    assert_eq!(got.dataset, dataset(CT, "1.2.3.4.4"));
    let staged = support::files_under(&node.dir.join("objects/tmp"));
    assert!(staged.is_empty(), "staged uploads left behind: {staged:?}");
}

#[test]
fn a_data_set_beyond_the_metadata_bound_gets_a700_and_nothing_is_kept() {
    let node = Node::start_with_env(&[("DICOMCHAIN__NODE__MAX_METADATA_BYTES", "262144")]);
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB of private OB data: metadata, not pixel data, so it would have to sit in memory.
    let mut big = dataset(CT, "1.2.3.9.1");
    big.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
    big.extend_from_slice(&(1024u32 * 1024).to_le_bytes());
    big.extend(std::iter::repeat_n(0xAB, 1024 * 1024));
    write_part10(&dir.path().join("big.dcm"), CT, "1.2.3.9.1", &big);
    write_part10(
        &dir.path().join("ok.dcm"),
        CT,
        "1.2.3.9.2",
        &dataset(CT, "1.2.3.9.2"),
    );
    let res = node.send_exact(&[dir.path().join("big.dcm"), dir.path().join("ok.dcm")]);
    assert_eq!(
        res.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![Some(0xA700), Some(0)],
        "{}",
        node.log()
    );
    let out = tempfile::tempdir().unwrap();
    assert!(!node
        .export(&["--instance", "1.2.3.9.1"], out.path())
        .status
        .success());
}

/// How an exchange on a raw association ended.
#[derive(Debug, PartialEq)]
enum Ending {
    /// A DIMSE response with this status.
    Status(u16),
    /// An A-ABORT from the node.
    Abort,
    /// The node closed the connection.
    Closed,
}

/// Reads until the node answers with a response command, aborts, or closes.
fn ending(s: &mut TcpStream) -> Ending {
    loop {
        match read_pdu(s) {
            None => return Ending::Closed,
            Some((0x07, _)) => return Ending::Abort,
            Some((0x04, body)) => {
                // One PDV per PDU from the node: length(4), context(1), header(1), data.
                if body.len() > 6 && body[5] & 1 == 1 {
                    return Ending::Status(status_of(&body[6..]));
                }
            }
            Some(_) => {}
        }
    }
}

/// Status (0000,0900) of an Implicit VR LE command set.
fn status_of(cmd: &[u8]) -> u16 {
    let mut pos = 0;
    while pos + 8 <= cmd.len() {
        let tag = u32::from(u16::from_le_bytes([cmd[pos], cmd[pos + 1]])) << 16
            | u32::from(u16::from_le_bytes([cmd[pos + 2], cmd[pos + 3]]));
        let len = u32::from_le_bytes(cmd[pos + 4..pos + 8].try_into().unwrap()) as usize;
        if tag == 0x0000_0900 {
            return u16::from_le_bytes([cmd[pos + 8], cmd[pos + 9]]);
        }
        pos += 8 + len;
    }
    panic!("no status in the response");
}

/// A C-STORE-RQ command set (PS3.7 §9.3.1.1) for CT Image Storage instance `uid`, with a data set.
pub(crate) fn store_command(uid: &str) -> Vec<u8> {
    command(&[
        (0x0000_0002, CT.as_bytes().to_vec()),
        (0x0000_0100, 1u16.to_le_bytes().to_vec()),
        (0x0000_0110, 5u16.to_le_bytes().to_vec()),
        (0x0000_0700, 0u16.to_le_bytes().to_vec()),
        (0x0000_0800, 0u16.to_le_bytes().to_vec()),
        (0x0000_1000, uid.as_bytes().to_vec()),
    ])
}

/// The start of an Implicit VR LE CT data set.
fn implicit_start(uid: &str) -> Vec<u8> {
    let pad = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        v
    };
    [
        implicit(0x0008_0016, &pad(CT)),
        implicit(0x0008_0018, &pad(uid)),
        implicit(0x0020_000D, &pad("1.2.3.77")),
        implicit(0x0020_000E, &pad("1.2.3.77.1")),
    ]
    .concat()
}

/// Appends `depth` undefined-length sequences, each with an item of undefined length open
/// inside it: nesting that only as many delimiters would close.
fn open_sequences(data: &mut Vec<u8>, depth: usize) {
    for _ in 0..depth {
        data.extend_from_slice(&implicit_header(0x0040_A730, u32::MAX));
        data.extend_from_slice(&implicit_header(0xFFFE_E000, u32::MAX));
    }
}

/// A C-STORE on a fresh association of `data` (sent in PDVs of at most 16 KiB); how it ended.
fn store_raw(port: u16, uid: &str, data: &[u8]) -> Ending {
    let mut s = associate(port, 16384);
    pdv(&mut s, 1, true, true, &store_command(uid));
    let chunks: Vec<&[u8]> = data.chunks(16000).collect();
    for (i, c) in chunks.iter().enumerate() {
        pdv(&mut s, 1, false, i + 1 == chunks.len(), c);
    }
    ending(&mut s)
}

fn is_failure(e: &Ending) -> bool {
    match e {
        Ending::Status(s) => *s != 0 && !(0xFF00..=0xFF01).contains(s) && (*s & 0xF000) != 0xB000,
        Ending::Abort | Ending::Closed => true,
    }
}

#[test]
fn malformed_input_ends_in_an_abort_or_a_failure_and_the_node_keeps_serving() {
    let node = Node::start_with_env(&[("DICOMCHAIN__NODE__IO_TIMEOUT_SECS", "5")]);
    let port = node.port;
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    };
    let mut cases: Vec<(&str, Ending)> = Vec::new();

    // Before any association.
    let mut s = connect();
    s.write_all(&[0x0A, 0, 0, 0, 0, 4, 1, 2, 3, 4]).unwrap();
    cases.push(("unknown PDU type before association", ending(&mut s)));
    let mut s = connect();
    pdv(&mut s, 1, true, true, &store_command("1.2.3.77.0"));
    cases.push(("P-DATA before association", ending(&mut s)));
    let mut s = connect();
    let mut huge = vec![0x01, 0];
    huge.extend_from_slice(&(1024u32 * 1024 + 1).to_be_bytes());
    s.write_all(&huge).unwrap();
    cases.push(("association PDU over its bound", ending(&mut s)));

    // Inside an association, at the PDU level.
    let mut s = associate(port, 16384);
    let mut truncated = vec![0x04, 0];
    truncated.extend_from_slice(&1000u32.to_be_bytes());
    truncated.extend_from_slice(&[0u8; 10]);
    s.write_all(&truncated).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    cases.push(("truncated PDU", ending(&mut s)));
    let mut s = associate(port, 16384);
    s.write_all(&[0x0A, 0, 0, 0, 0, 2, 0, 0]).unwrap();
    cases.push(("unknown PDU type in an association", ending(&mut s)));
    let mut s = associate(port, 16384);
    pdv(&mut s, 99, true, true, &store_command("1.2.3.77.1"));
    cases.push(("wrong presentation context ID", ending(&mut s)));
    let mut s = associate(port, 16384);
    let mut bad_pdv = vec![0x04, 0, 0, 0, 0, 10];
    bad_pdv.extend_from_slice(&100u32.to_be_bytes());
    bad_pdv.extend_from_slice(&[1, 3, 0, 0]);
    s.write_all(&bad_pdv).unwrap();
    cases.push(("PDV longer than its PDU", ending(&mut s)));

    // Command sets.
    let mut s = associate(port, 16384);
    let bare = command(&[
        (0x0000_0100, 1u16.to_le_bytes().to_vec()),
        (0x0000_0800, 0x0101u16.to_le_bytes().to_vec()),
    ]);
    pdv(&mut s, 1, true, true, &bare);
    cases.push(("C-STORE-RQ without mandatory fields", ending(&mut s)));
    let mut s = associate(port, 16384);
    pdv(&mut s, 1, true, true, &[0xFF; 37]);
    cases.push(("undecodable command set", ending(&mut s)));

    // Data sets.
    let mut cut = implicit_start("1.2.3.77.2");
    cut.extend_from_slice(&implicit_header(0x0010_0010, 20));
    cut.extend_from_slice(b"DOE^");
    cases.push((
        "data set cut mid-element",
        store_raw(port, "1.2.3.77.2", &cut),
    ));
    let mut beyond = implicit_start("1.2.3.77.3");
    beyond.extend_from_slice(&implicit_header(0x0010_0010, 0x7FFF_0000));
    beyond.extend_from_slice(b"DOE^JOHN");
    cases.push((
        "element length beyond the data set",
        store_raw(port, "1.2.3.77.3", &beyond),
    ));
    // 200 000 undefined-length sequences and items opened inside each other, never closed (3 MB).
    let mut bomb = implicit_start("1.2.3.77.4");
    open_sequences(&mut bomb, 200_000);
    cases.push((
        "undefined-length sequence bomb",
        store_raw(port, "1.2.3.77.4", &bomb),
    ));
    // 10 000 levels of nesting, every one closed: well formed, but deeper than anyone needs.
    let mut deep = implicit_start("1.2.3.77.5");
    open_sequences(&mut deep, 10_000);
    for _ in 0..10_000 {
        deep.extend_from_slice(&implicit_header(0xFFFE_E00D, 0));
        deep.extend_from_slice(&implicit_header(0xFFFE_E0DD, 0));
    }
    cases.push(("10 000-deep nesting", store_raw(port, "1.2.3.77.5", &deep)));

    let log = node.log();
    // A connection that just closed may be a connection task that panicked: none may.
    assert!(!log.contains("panicked"), "{log}");
    for (what, e) in &cases {
        assert!(is_failure(e), "{what}: {e:?}\n{log}");
    }
    // The C-STOREs with a bad data set got statuses (the association survived them).
    for (what, e) in &cases[9..] {
        assert!(
            matches!(e, Ending::Status(s) if *s >= 0xA000),
            "{what}: {e:?}"
        );
    }
    // Nothing of it was stored, memory stayed bounded, and the node serves others.
    let out = tempfile::tempdir().unwrap();
    for uid in ["1.2.3.77.2", "1.2.3.77.3", "1.2.3.77.4", "1.2.3.77.5"] {
        assert!(!node
            .export(&["--instance", uid], out.path())
            .status
            .success());
    }
    let rss = support::peak_rss_mib(node.pid().unwrap());
    assert!(rss < 256, "peak RSS {rss} MiB");
    assert_ok(&node.echoscu(), "echoscu after the malformed input");
    let good = [
        implicit_start("1.2.3.77.9"),
        implicit(0x7FE0_0010, &[1u8; 512]),
    ]
    .concat();
    assert_eq!(
        store_raw(port, "1.2.3.77.9", &good),
        Ending::Status(0),
        "{}",
        node.log()
    );
}
