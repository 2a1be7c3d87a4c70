//! Hand-written tests, one or more per parsing rule of PS3.5 §7 / A.4 the splitter relies on.

use super::testutil::*;
use super::*;

const ALL: [Encoding; 3] = [
    Encoding::ImplicitLittle,
    Encoding::ExplicitLittle,
    Encoding::ExplicitBig,
];

/// Split whole, in 1-byte chunks and in a few odd chunkings; all must agree.
fn split_all_ways(enc: Encoding, data: &[u8]) -> Result<testutil::Split, SplitError> {
    let whole = split_whole(enc, data);
    for sizes in [&[1usize][..], &[2], &[3, 7], &[5, 1, 11, 13], &[4096]] {
        let s = split_chunks(enc, data, sizes);
        match (&whole, &s) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.meta, b.meta);
                assert_eq!(a.bulk, b.bulk);
                assert_eq!(a.splices, b.splices);
            }
            (Err(a), Err(b)) => assert_eq!(a, b),
            _ => panic!("chunking changed the outcome: {whole:?} vs {s:?}"),
        }
    }
    whole
}

fn patient(enc: Encoding, out: &mut Vec<u8>) {
    elem(enc, out, 0x0008_0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0");
    elem(enc, out, 0x0010_0010, b"PN", b"DOE^JOHN");
    elem(enc, out, 0x0028_0010, b"US", &[0, 2]);
}

#[test]
fn transfer_syntaxes() {
    use Encoding::*;
    assert_eq!(
        Encoding::from_transfer_syntax("1.2.840.10008.1.2"),
        Some(ImplicitLittle)
    );
    assert_eq!(
        Encoding::from_transfer_syntax("1.2.840.10008.1.2\0"),
        Some(ImplicitLittle)
    );
    assert_eq!(
        Encoding::from_transfer_syntax("1.2.840.10008.1.2.1"),
        Some(ExplicitLittle)
    );
    assert_eq!(
        Encoding::from_transfer_syntax("1.2.840.10008.1.2.2 "),
        Some(ExplicitBig)
    );
    for jpeg in [
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.70\0",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.100",
        "1.2.840.10008.1.2.4.107",
        "1.2.840.10008.1.2.1.98",
    ] {
        assert_eq!(
            Encoding::from_transfer_syntax(jpeg),
            Some(ExplicitLittle),
            "{jpeg}"
        );
    }
    for deflated in [
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.1.99\0",
        "1.2.840.10008.1.2.4.95",
        "1.2.840.10008.1.2.4.205",
    ] {
        assert_eq!(Encoding::from_transfer_syntax(deflated), None);
        assert!(is_deflated_transfer_syntax(deflated));
    }
    assert!(!is_deflated_transfer_syntax("1.2.840.10008.1.2.1"));
}

#[test]
fn implicit_le_native_pixel_data() {
    let enc = Encoding::ImplicitLittle;
    let mut d = Vec::new();
    patient(enc, &mut d);
    let header_offset = d.len() as u64;
    let pixels: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    elem(enc, &mut d, PIXEL, b"OW", &pixels);
    let s = split_all_ways(enc, &d).unwrap();
    assert_eq!(s.bulk, pixels);
    assert_eq!(s.meta, d[..d.len() - pixels.len()]);
    assert_eq!(
        s.splices,
        vec![Splice {
            header_offset,
            value_offset: header_offset + 8,
            length: 1000
        }]
    );
    assert_eq!(
        &s.meta[header_offset as usize..][..8],
        &[0xE0, 0x7F, 0x10, 0, 0xE8, 3, 0, 0]
    );
}

#[test]
fn explicit_le_short_and_long_vrs() {
    let enc = Encoding::ExplicitLittle;
    let mut d = Vec::new();
    patient(enc, &mut d);
    elem(enc, &mut d, 0x0018_9999, b"UT", b"long text, 4-byte length");
    elem(enc, &mut d, 0x0019_0010, b"LO", b"PRIVATE CREATOR"); // odd length, private
    elem(enc, &mut d, 0x0019_1001, b"UN", &[1, 2, 3]);
    elem(enc, &mut d, 0x0028_0000, b"UL", &[0, 0, 0, 0]); // group length: passed through
    let header_offset = d.len() as u64;
    elem(enc, &mut d, PIXEL, b"OB", &[9; 7]);
    let s = split_all_ways(enc, &d).unwrap();
    assert_eq!(s.bulk, vec![9; 7]);
    assert_eq!(
        s.splices,
        vec![Splice {
            header_offset,
            value_offset: header_offset + 12,
            length: 7
        }]
    );
}

#[test]
fn explicit_be() {
    let enc = Encoding::ExplicitBig;
    let mut d = Vec::new();
    patient(enc, &mut d);
    let mut body = Vec::new();
    elem(enc, &mut body, 0x0008_0100, b"SH", b"CODE");
    let mut items = Vec::new();
    item(enc, &mut items, ITEM, UNDEF);
    items.extend_from_slice(&body);
    item(enc, &mut items, ITEM_DELIM, 0);
    header(enc, &mut d, 0x0040_A730, b"SQ", UNDEF);
    d.extend_from_slice(&items);
    item(enc, &mut d, SEQ_DELIM, 0);
    let header_offset = d.len() as u64;
    elem(enc, &mut d, PIXEL, b"OW", &[1, 2, 3, 4]);
    assert_eq!(&d[header_offset as usize..][..6], b"\x7F\xE0\x00\x10OW");
    let s = split_all_ways(enc, &d).unwrap();
    assert_eq!(s.bulk, vec![1, 2, 3, 4]);
    assert_eq!(s.splices[0].value_offset, header_offset + 12);
}

/// Undefined-length SQ / items nested two deep (PS3.5 §7.5.2), in every encoding.
#[test]
fn nested_undefined_length_sequences() {
    for enc in ALL {
        let inner = Node::Seq {
            tag: 0x0008_1115,
            undefined: true,
            items: vec![
                Item {
                    undefined: true,
                    nodes: vec![Node::Prim {
                        tag: 0x0008_1150,
                        vr: *b"UI",
                        value: b"1.2.3".to_vec(),
                    }],
                },
                Item {
                    undefined: true,
                    nodes: vec![],
                },
            ],
        };
        let outer = Node::Seq {
            tag: 0x0008_1140,
            undefined: true,
            items: vec![Item {
                undefined: true,
                nodes: vec![inner],
            }],
        };
        let nodes = vec![
            outer,
            Node::Native {
                tag: PIXEL,
                vr: *b"OW",
                value: vec![7; 10],
            },
        ];
        let mut d = Vec::new();
        write_nodes(enc, &nodes, &mut d);
        let s = split_all_ways(enc, &d).unwrap();
        assert_eq!(s.bulk, vec![7; 10], "{enc:?}");
        assert_eq!(s.splices.len(), 1);
    }
}

/// Defined-length SQ and items are skipped without inspection: content that would be an error
/// if parsed (an invalid VR, a stray delimiter) is fine inside them.
#[test]
fn defined_length_items_are_not_inspected() {
    let enc = Encoding::ExplicitLittle;
    let garbage = b"\x08\x00\x10\x00ZZ\x02\x00ab\xFE\xFF\xDD\xE0\x00\x00\x00\x00";
    let mut items = Vec::new();
    item(enc, &mut items, ITEM, garbage.len() as u32);
    items.extend_from_slice(garbage);
    // An undefined-length SQ with a defined-length item.
    let mut d = Vec::new();
    header(enc, &mut d, 0x0008_1140, b"SQ", UNDEF);
    d.extend_from_slice(&items);
    item(enc, &mut d, SEQ_DELIM, 0);
    // A defined-length SQ.
    elem(enc, &mut d, 0x0008_1115, b"SQ", &items);
    elem(enc, &mut d, PIXEL, b"OB", &[1, 2]);
    let s = split_all_ways(enc, &d).unwrap();
    assert_eq!(s.bulk, vec![1, 2]);
}

/// Explicit UN of undefined length holds Implicit VR LE content (PS3.5 §6.2.2), also under
/// Explicit VR Big Endian; the encoding switches back after its sequence delimiter.
#[test]
fn explicit_un_undefined_length_has_implicit_content() {
    for enc in [Encoding::ExplicitLittle, Encoding::ExplicitBig] {
        let imp = Encoding::ImplicitLittle;
        let mut d = Vec::new();
        patient(enc, &mut d);
        header(enc, &mut d, 0x0029_1010, b"UN", UNDEF);
        item(imp, &mut d, ITEM, UNDEF);
        // Implicit content: would be an invalid VR "\x05\0" if read as explicit.
        elem(imp, &mut d, 0x0029_1011, b"??", b"hello");
        // A nested undefined-length sequence inside the implicit content.
        header(imp, &mut d, 0x0029_1012, b"??", UNDEF);
        item(imp, &mut d, ITEM, UNDEF);
        elem(imp, &mut d, 0x0029_1013, b"??", &[1, 2, 3]);
        item(imp, &mut d, ITEM_DELIM, 0);
        item(imp, &mut d, SEQ_DELIM, 0);
        item(imp, &mut d, ITEM_DELIM, 0);
        item(imp, &mut d, SEQ_DELIM, 0);
        // Back in `enc`.
        elem(enc, &mut d, 0x0029_1020, b"LO", b"after");
        elem(enc, &mut d, PIXEL, b"OW", &[5, 6]);
        let s = split_all_ways(enc, &d).unwrap();
        assert_eq!(s.bulk, vec![5, 6], "{enc:?}");
    }
}

/// Encapsulated pixel data (PS3.5 A.4): everything after the header, sequence delimiter
/// included, is bulk, whether or not the offset table has entries.
#[test]
fn encapsulated_pixel_data() {
    type Case = (Option<Vec<u8>>, Vec<Vec<u8>>);
    let cases: Vec<Case> = vec![
        (Some(vec![]), vec![vec![0xFF, 0xD8, 0xFF, 0xD9]]),
        (
            Some(vec![0, 0, 0, 0, 12, 0, 0, 0, 30, 0, 0, 0]),
            vec![vec![1; 4], vec![2; 10], vec![3; 3]],
        ),
        (Some(vec![]), vec![vec![]; 3]),
        (None, vec![]), // no items at all: tolerated
    ];
    for enc in ALL {
        for (bot, fragments) in &cases {
            let mut d = Vec::new();
            patient(enc, &mut d);
            let header_offset = d.len() as u64;
            let nodes = vec![Node::Encap {
                bot: bot.clone(),
                fragments: fragments.clone(),
            }];
            write_nodes(enc, &nodes, &mut d);
            elem(enc, &mut d, 0xFFFC_FFFC, b"OB", &[0; 4]); // trailing padding
            let s = split_all_ways(enc, &d).unwrap();
            let value = encap_value(enc, bot, fragments);
            assert_eq!(s.bulk, value);
            let hlen = if enc.is_explicit() { 12 } else { 8 };
            assert_eq!(
                s.splices,
                vec![Splice {
                    header_offset,
                    value_offset: header_offset + hlen,
                    length: value.len() as u64
                }]
            );
            assert_eq!(s.meta.len(), d.len() - value.len());
            // One bulk piece when fed whole: the items are contiguous.
            assert_eq!(s.bulk_pieces, 1);
        }
    }
}

#[test]
fn undefined_length_fragment_is_an_error() {
    let enc = Encoding::ExplicitLittle;
    let mut d = Vec::new();
    header(enc, &mut d, PIXEL, b"OB", UNDEF);
    item(enc, &mut d, ITEM, 0);
    item(enc, &mut d, ITEM, UNDEF);
    let e = split_all_ways(enc, &d).unwrap_err();
    assert!(matches!(e, SplitError::Structure { offset: 20, .. }), "{e}");
}

/// Pixel Data inside a sequence (e.g. Icon Image Sequence) is ordinary metadata, native or
/// encapsulated.
#[test]
fn nested_pixel_data_stays_meta() {
    for enc in ALL {
        let icon = Node::Seq {
            tag: 0x0088_0200,
            undefined: true,
            items: vec![Item {
                undefined: true,
                nodes: vec![
                    Node::Native {
                        tag: PIXEL,
                        vr: *b"OB",
                        value: vec![1; 16],
                    },
                    Node::Encap {
                        bot: Some(vec![]),
                        fragments: vec![vec![2; 6]],
                    },
                ],
            }],
        };
        let defined = Node::Seq {
            tag: 0x0088_0200,
            undefined: false,
            items: vec![Item {
                undefined: false,
                nodes: vec![Node::Native {
                    tag: PIXEL,
                    vr: *b"OW",
                    value: vec![3; 4],
                }],
            }],
        };
        let mut d = Vec::new();
        write_nodes(enc, &[icon, defined], &mut d);
        let s = split_all_ways(enc, &d).unwrap();
        assert!(s.bulk.is_empty());
        assert!(s.splices.is_empty());
        assert_eq!(s.meta, d);
    }
}

/// Elements after the pixel data — Digital Signatures Sequence (FFFA,FFFA), Data Set Trailing
/// Padding (FFFC,FFFC) — are metadata.
#[test]
fn trailing_elements_after_pixel_data() {
    for enc in ALL {
        let nodes = vec![
            Node::Native {
                tag: PIXEL,
                vr: *b"OW",
                value: vec![9; 6],
            },
            Node::Seq {
                tag: 0xFFFA_FFFA,
                undefined: true,
                items: vec![Item {
                    undefined: true,
                    nodes: vec![Node::Prim {
                        tag: 0x0400_0120,
                        vr: *b"OB",
                        value: vec![0xAA; 5],
                    }],
                }],
            },
            Node::Prim {
                tag: 0xFFFC_FFFC,
                vr: *b"OB",
                value: vec![0; 8],
            },
        ];
        let mut d = Vec::new();
        write_nodes(enc, &nodes, &mut d);
        let s = split_all_ways(enc, &d).unwrap();
        assert_eq!(s.bulk, vec![9; 6]);
        assert_eq!(s.meta.len(), d.len() - 6);
        assert_eq!(&s.meta[s.meta.len() - 8..], &[0; 8]);
    }
}

/// Float (7FE0,0008) OF and Double Float (7FE0,0009) OD Pixel Data are bulk; several top-level
/// pixel elements give several splices; a zero-length one gives a zero-length splice.
#[test]
fn float_double_and_multiple_pixel_elements() {
    for enc in ALL {
        let mut d = Vec::new();
        patient(enc, &mut d);
        elem(enc, &mut d, 0x7FE0_0008, b"OF", &[1; 8]);
        elem(enc, &mut d, 0x7FE0_0009, b"OD", &[2; 16]);
        elem(enc, &mut d, 0x7FE0_0010, b"OW", &[]);
        elem(enc, &mut d, 0x7FE0_0020, b"OW", &[4; 2]); // Coefficients SDVN: not pixel data
        let s = split_all_ways(enc, &d).unwrap();
        let lengths: Vec<u64> = s.splices.iter().map(|s| s.length).collect();
        assert_eq!(lengths, vec![8, 16, 0]);
        let mut bulk = vec![1; 8];
        bulk.extend_from_slice(&[2; 16]);
        assert_eq!(s.bulk, bulk);
        for sp in &s.splices {
            assert_eq!(
                &s.meta[sp.header_offset as usize..][..2],
                &tag_bytes(enc, 0x7FE0_0000)[..2]
            );
        }
    }
}

#[test]
fn empty_data_set() {
    for enc in ALL {
        let s = split_all_ways(enc, &[]).unwrap();
        assert!(s.meta.is_empty() && s.bulk.is_empty() && s.splices.is_empty());
    }
}

#[test]
fn truncated_streams() {
    let enc = Encoding::ExplicitLittle;
    let mut full = Vec::new();
    patient(enc, &mut full);
    let start = full.len();
    header(enc, &mut full, 0x0008_1140, b"SQ", UNDEF);
    item(enc, &mut full, ITEM, UNDEF);
    elem(enc, &mut full, 0x0008_1150, b"UI", b"1.2");
    item(enc, &mut full, ITEM_DELIM, 0);
    item(enc, &mut full, SEQ_DELIM, 0);
    let px = full.len();
    header(enc, &mut full, PIXEL, b"OB", UNDEF);
    item(enc, &mut full, ITEM, 0);
    item(enc, &mut full, ITEM, 4);
    full.extend_from_slice(&[1, 2, 3, 4]);
    item(enc, &mut full, SEQ_DELIM, 0);
    let ok = split_all_ways(enc, &full).unwrap();
    assert_eq!(ok.splices.len(), 1);
    // Every proper prefix that doesn't end on a top-level element boundary is an error.
    let boundaries = [0, 34, 50, start, px, full.len()];
    for cut in 0..full.len() {
        let r = split_all_ways(enc, &full[..cut]);
        assert_eq!(r.is_ok(), boundaries.contains(&cut), "cut at {cut}: {r:?}");
    }
    let e = |cut: usize| split_whole(enc, &full[..cut]).unwrap_err();
    assert_eq!(
        e(start + 5),
        SplitError::TruncatedHeader {
            offset: start as u64
        }
    );
    assert_eq!(
        e(start + 9),
        SplitError::TruncatedHeader {
            offset: start as u64
        }
    );
    assert!(matches!(
        e(start + 12),
        SplitError::Unterminated {
            what: "sequence",
            ..
        }
    ));
    assert!(matches!(
        e(start + 20),
        SplitError::Unterminated { what: "item", .. }
    ));
    assert!(matches!(
        e(start + 29),
        SplitError::TruncatedValue { missing: 2, .. }
    ));
    assert!(matches!(
        e(px + 12),
        SplitError::Unterminated {
            what: "pixel data",
            ..
        }
    ));
    assert!(matches!(
        e(full.len() - 10),
        SplitError::TruncatedValue { missing: 2, .. }
    ));
    let msg = e(px + 12).to_string();
    assert_eq!(
        msg,
        format!("data set ends in unterminated pixel data (7FE0,0010) at byte {px}")
    );
}

#[test]
fn invalid_vr_is_an_error() {
    for enc in [Encoding::ExplicitLittle, Encoding::ExplicitBig] {
        let mut d = Vec::new();
        patient(enc, &mut d);
        let at = d.len() as u64;
        d.extend_from_slice(&tag_bytes(enc, 0x0009_0010));
        d.extend_from_slice(b"XY\x00\x02ab");
        let e = split_all_ways(enc, &d).unwrap_err();
        assert_eq!(
            e,
            SplitError::InvalidVr {
                offset: at,
                tag: Tag(0x0009, 0x0010),
                vr: VrBytes(*b"XY")
            }
        );
        assert_eq!(
            e.to_string(),
            format!("invalid VR XY in (0009,0010) at byte {at}")
        );
    }
    let e = split_whole(
        Encoding::ExplicitLittle,
        b"\x10\x00\x10\x00\x00\x01\x02\x00ab",
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "invalid VR 0x0001 in (0010,0010) at byte 0");
}

#[test]
fn undefined_length_on_a_non_sequence_vr_is_an_error() {
    let enc = Encoding::ExplicitLittle;
    let mut d = Vec::new();
    header(enc, &mut d, 0x0018_9999, b"UT", UNDEF);
    let e = split_whole(enc, &d).unwrap_err();
    assert!(
        matches!(e, SplitError::UndefinedLength { offset: 0, .. }),
        "{e}"
    );
}

#[test]
fn structural_errors() {
    for enc in ALL {
        let check = |d: &[u8], offset: u64, tag: u32| {
            let e = split_all_ways(enc, d).unwrap_err();
            match e {
                SplitError::Structure {
                    offset: o, tag: t, ..
                } => {
                    assert_eq!((o, t), (offset, Tag::from_u32(tag)), "{e}")
                }
                other => panic!("{enc:?}: expected structure error, got {other}"),
            }
        };
        // Item at depth 0.
        let mut d = Vec::new();
        patient(enc, &mut d);
        let at = d.len() as u64;
        item(enc, &mut d, ITEM, 0);
        check(&d, at, ITEM);
        // Item delimiter / sequence delimiter at depth 0.
        check(
            &{
                let mut d = Vec::new();
                item(enc, &mut d, ITEM_DELIM, 0);
                d
            },
            0,
            ITEM_DELIM,
        );
        check(
            &{
                let mut d = Vec::new();
                item(enc, &mut d, SEQ_DELIM, 0);
                d
            },
            0,
            SEQ_DELIM,
        );
        // Unknown (FFFE,xxxx).
        check(
            &{
                let mut d = Vec::new();
                item(enc, &mut d, 0xFFFE_0001, 0);
                d
            },
            0,
            0xFFFE_0001,
        );
        // Non-item directly inside a sequence.
        let mut d = Vec::new();
        header(enc, &mut d, 0x0008_1140, b"SQ", UNDEF);
        elem(enc, &mut d, 0x0008_1150, b"UI", b"12");
        check(&d, if enc.is_explicit() { 12 } else { 8 }, 0x0008_1150);
        // Item delimiter directly inside a sequence; sequence delimiter inside an item.
        let mut d = Vec::new();
        header(enc, &mut d, 0x0008_1140, b"SQ", UNDEF);
        let sq = d.len() as u64;
        item(enc, &mut d, ITEM_DELIM, 0);
        check(&d, sq, ITEM_DELIM);
        let mut d = Vec::new();
        header(enc, &mut d, 0x0008_1140, b"SQ", UNDEF);
        item(enc, &mut d, ITEM, UNDEF);
        item(enc, &mut d, SEQ_DELIM, 0);
        check(&d, sq + 8, SEQ_DELIM);
        // Item inside an item (where an element is expected).
        let mut d = Vec::new();
        header(enc, &mut d, 0x0008_1140, b"SQ", UNDEF);
        item(enc, &mut d, ITEM, UNDEF);
        item(enc, &mut d, ITEM, 0);
        check(&d, sq + 8, ITEM);
        // Element inside encapsulated pixel data.
        let mut d = Vec::new();
        header(enc, &mut d, PIXEL, b"OB", UNDEF);
        elem(enc, &mut d, 0x0008_1150, b"UI", b"12");
        check(&d, sq, 0x0008_1150);
    }
}

/// A sequence delimiter with a non-zero length is tolerated: its 4 length bytes are part of it
/// and nothing more is consumed; the bytes are kept, so reassembly is exact.
#[test]
fn sequence_delimiter_with_nonzero_length_is_tolerated() {
    for enc in ALL {
        let mut d = Vec::new();
        header(enc, &mut d, 0x0008_1140, b"SQ", UNDEF);
        item(enc, &mut d, ITEM, UNDEF);
        item(enc, &mut d, ITEM_DELIM, 4);
        item(enc, &mut d, SEQ_DELIM, 0x1234);
        header(enc, &mut d, PIXEL, b"OB", UNDEF);
        item(enc, &mut d, ITEM, 0);
        item(enc, &mut d, SEQ_DELIM, 7);
        elem(enc, &mut d, 0x0010_0010, b"PN", b"X^Y ");
        let s = split_all_ways(enc, &d).unwrap();
        assert_eq!(s.bulk.len(), 16);
    }
}

/// A CT-sized native Pixel Data value goes out as one bulk piece per input chunk, and the
/// metadata as a handful of pieces, not element by element.
#[test]
fn bulk_passes_in_large_slices() {
    let enc = Encoding::ExplicitLittle;
    let mut d = Vec::new();
    for i in 0..200u32 {
        elem(enc, &mut d, 0x0009_1000 + i, b"LO", b"some value");
    }
    let pixels = vec![0x5A; 512 * 1024];
    elem(enc, &mut d, PIXEL, b"OW", &pixels);
    elem(enc, &mut d, 0xFFFC_FFFC, b"OB", &[0; 2]);
    let s = split_whole(enc, &d).unwrap();
    assert_eq!((s.meta_pieces, s.bulk_pieces), (2, 1));
    let s = split_chunks(enc, &d, &[64 * 1024]).unwrap();
    assert_eq!(s.bulk, pixels);
    assert!(s.bulk_pieces <= 9, "{}", s.bulk_pieces);
    assert!(s.meta_pieces <= 3, "{}", s.meta_pieces);
}

#[test]
fn plan_and_reconstruct() {
    let sp = |h, v, l| Splice {
        header_offset: h,
        value_offset: v,
        length: l,
    };
    assert_eq!(plan(0, &[]).unwrap(), vec![]);
    assert_eq!(
        plan(5, &[]).unwrap(),
        vec![Segment::Meta { start: 0, end: 5 }]
    );
    assert_eq!(
        plan(40, &[sp(0, 12, 100), sp(12, 20, 0), sp(20, 28, 5)]).unwrap(),
        vec![
            Segment::Meta { start: 0, end: 12 },
            Segment::Bulk { start: 0, end: 100 },
            Segment::Meta { start: 12, end: 20 },
            Segment::Meta { start: 20, end: 28 },
            Segment::Bulk {
                start: 100,
                end: 105
            },
            Segment::Meta { start: 28, end: 40 },
        ]
    );
    let bad = |meta_len, s: &[Splice]| plan(meta_len, s).unwrap_err();
    assert!(matches!(
        bad(40, &[sp(20, 28, 1), sp(10, 18, 1)]),
        SplitError::BadSplice { index: 1, .. }
    ));
    assert!(matches!(
        bad(40, &[sp(0, 12, 1), sp(8, 20, 1)]),
        SplitError::BadSplice { index: 1, .. }
    ));
    assert!(matches!(
        bad(40, &[sp(36, 48, 1)]),
        SplitError::BadSplice { index: 0, .. }
    ));
    assert!(matches!(
        bad(40, &[sp(0, 5, 1)]),
        SplitError::BadSplice { index: 0, .. }
    ));
    assert!(matches!(
        bad(40, &[sp(5, 0, 1)]),
        SplitError::BadSplice { index: 0, .. }
    ));
    assert!(matches!(
        bad(40, &[sp(0, 8, u64::MAX), sp(8, 16, 1)]),
        SplitError::BadSplice { index: 1, .. }
    ));
    let meta = b"01234567abcdefgh";
    assert_eq!(
        reconstruct(meta, &[sp(0, 8, 3)], b"XYZ").unwrap(),
        b"01234567XYZabcdefgh"
    );
    assert_eq!(
        reconstruct(meta, &[sp(0, 8, 3)], b"XY").unwrap_err(),
        SplitError::BulkLength {
            expected: 3,
            actual: 2
        }
    );
    assert!(reconstruct(meta, &[], b"X").is_err());
    assert_eq!(reconstruct(meta, &[], b"").unwrap(), meta);
}

/// Messages for the DIMSE Error Comment: short and specific.
#[test]
fn error_messages_are_short() {
    let errors = [
        SplitError::InvalidVr {
            offset: 123_456_789,
            tag: Tag(0x7FE0, 0x0010),
            vr: VrBytes([0, 1]),
        },
        SplitError::Structure {
            offset: 123_456_789,
            tag: Tag(0xFFFE, 0xE0DD),
            problem: "sequence delimiter outside a sequence",
        },
        SplitError::TruncatedHeader {
            offset: 123_456_789,
        },
        SplitError::TruncatedValue {
            offset: 123_456_789,
            tag: Tag(0x7FE0, 0x0010),
            missing: 4_000_000,
        },
        SplitError::Unterminated {
            offset: 123_456_789,
            tag: Tag(0x7FE0, 0x0010),
            what: "pixel data",
        },
    ];
    for e in errors {
        let m = e.to_string();
        assert!(m.len() <= 72, "{} chars: {m}", m.len());
    }
}

/// Undefined-length sequences nested up to the limit split; one more is refused.
#[test]
fn nesting_beyond_the_limit_is_refused() {
    for enc in ALL {
        let nest = |depth: usize| {
            let mut d = Vec::new();
            patient(enc, &mut d);
            for _ in 0..depth {
                header(enc, &mut d, 0x0040_A730, b"SQ", UNDEF);
                item(enc, &mut d, ITEM, UNDEF);
            }
            for _ in 0..depth {
                item(enc, &mut d, 0xFFFE_E00D, 0);
                item(enc, &mut d, 0xFFFE_E0DD, 0);
            }
            d
        };
        let ok = nest(splitter::MAX_SEQUENCE_DEPTH);
        assert_eq!(split_whole(enc, &ok).unwrap().meta, ok);
        let e = split_whole(enc, &nest(splitter::MAX_SEQUENCE_DEPTH + 1)).unwrap_err();
        assert!(matches!(e, SplitError::Structure { .. }), "{e}");
        assert!(e.to_string().contains("nested more than 64 deep"), "{e}");
    }
}
