//! The DICOM listener as peers see it: C-ECHO, association policy, PDU limits, and C-STORE
//! failures that leave the association usable.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use dicom_ul::pdu::{AssociationRQ, Pdu, PresentationContextProposed, UserVariableItem};

use crate::support::{self, assert_ok, Node, AE};

#[test]
fn echoscu_succeeds_and_a_wrong_called_ae_is_rejected() {
    let node = Node::start();
    assert_ok(&node.echoscu(), "echoscu");
    let out = std::process::Command::new("/usr/bin/echoscu")
        .args(["-aec", "NOTUS", "127.0.0.1", &node.port.to_string()])
        .output()
        .unwrap();
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
    let out = std::process::Command::new("/usr/bin/echoscu")
        .args(["-aec", "ANYTHING", "127.0.0.1", &node.port.to_string()])
        .output()
        .unwrap();
    assert_ok(&out, "echoscu with another called AE");
}

fn associate(port: u16, max_pdu: u32) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
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
    s.write_all(&buf).unwrap();
    let mut header = [0u8; 6];
    s.read_exact(&mut header).unwrap();
    assert_eq!(header[0], 0x02, "expected A-ASSOCIATE-AC");
    let len = u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    s
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
