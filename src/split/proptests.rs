//! Property tests: generated data set trees (nested defined/undefined-length sequences and
//! items, explicit UN with implicit content, odd lengths, private tags, native and encapsulated
//! pixel data at the top level and nested) in all three encodings, split with random chunk
//! boundaries; plus arbitrary and mutated bytes, which must never panic.

use super::testutil::*;
use super::*;
use proptest::prelude::*;

const VRS: [&[u8; 2]; 34] = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB",
    b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
    b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV",
];

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![
        Just(Encoding::ImplicitLittle),
        Just(Encoding::ExplicitLittle),
        Just(Encoding::ExplicitBig),
    ]
}

/// Any tag but items/delimiters and the pixel family; odd groups are private.
fn tag() -> impl Strategy<Value = u32> {
    prop_oneof![
        (0u16..0x60, any::<u16>()),
        (any::<u16>(), any::<u16>()),
        Just((0xFFFC, 0xFFFC)),
        Just((0x7FE0, 0x0020)),
    ]
    .prop_map(|(g, e)| {
        let g = if g == 0xFFFE { 0xFFFC } else { g };
        let t = (u32::from(g) << 16) | u32::from(e);
        if is_pixel(t) {
            t | 0x0100
        } else {
            t
        }
    })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn leaf() -> impl Strategy<Value = Node> {
    prop_oneof![
        4 => (tag(), prop::sample::select(&VRS[..]), bytes(40)).prop_map(|(tag, vr, value)| Node::Prim {
            tag,
            vr: *vr,
            value
        }),
        1 => prop_oneof![
            Just((0x7FE0_0008u32, *b"OF")),
            Just((0x7FE0_0009, *b"OD")),
            Just((PIXEL, *b"OB")),
            Just((PIXEL, *b"OW")),
        ]
        .prop_flat_map(|(tag, vr)| bytes(300).prop_map(move |value| Node::Native { tag, vr, value })),
        1 => (
            prop::option::of(prop::collection::vec(any::<u32>(), 0..4)),
            prop::collection::vec(bytes(60), 0..5)
        )
            .prop_map(|(bot, fragments)| Node::Encap {
                bot: bot.map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                fragments
            }),
    ]
}

fn node() -> impl Strategy<Value = Node> {
    leaf().prop_recursive(4, 48, 4, |inner| {
        let items = prop::collection::vec(
            (any::<bool>(), prop::collection::vec(inner, 0..4))
                .prop_map(|(undefined, nodes)| Item { undefined, nodes }),
            0..3,
        );
        prop_oneof![
            (tag(), any::<bool>(), items.clone()).prop_map(|(tag, undefined, items)| Node::Seq {
                tag,
                undefined,
                items
            }),
            (tag(), items).prop_map(|(tag, items)| Node::Un { tag, items }),
        ]
    })
}

fn data_set() -> impl Strategy<Value = Vec<Node>> {
    prop::collection::vec(node(), 0..8)
}

fn chunks() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        prop::collection::vec(1usize..8, 1..8),
        prop::collection::vec(1usize..100, 1..8),
        prop::collection::vec(1usize..5000, 1..4),
    ]
}

proptest! {
    // No regression file: it would be written outside src/split (proptest-regressions/ at the
    // crate root); a failure prints the minimal input, which is what a new unit test needs.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn generated_data_sets_split_and_reconstruct(
        nodes in data_set(), enc in encoding(), sizes in chunks()
    ) {
        let mut d = Vec::new();
        write_nodes(enc, &nodes, &mut d);
        // split_chunks checks reconstruct() == d, contiguity and the counters.
        let s = split_chunks(enc, &d, &sizes).expect("valid data set must split");
        let (bulk, count) = expected_bulk(enc, &nodes);
        prop_assert_eq!(&s.bulk, &bulk);
        prop_assert_eq!(s.meta.len(), d.len() - bulk.len());
        prop_assert_eq!(s.splices.len(), count);
        for sp in &s.splices {
            let h = sp.header_offset as usize;
            let rd = |b: [u8; 2]| if enc.is_big_endian() { u16::from_be_bytes(b) } else { u16::from_le_bytes(b) };
            let t = (u32::from(rd([s.meta[h], s.meta[h + 1]])) << 16) | u32::from(rd([s.meta[h + 2], s.meta[h + 3]]));
            prop_assert!(is_pixel(t));
        }
        // Same result fed whole.
        let w = split_whole(enc, &d).expect("valid data set must split");
        prop_assert_eq!(w.splices, s.splices);
        prop_assert!(w.bulk_pieces <= count);
    }

    #[test]
    fn mutated_data_sets_never_panic(
        nodes in data_set(),
        enc in encoding(),
        sizes in chunks(),
        mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut d = Vec::new();
        write_nodes(enc, &nodes, &mut d);
        if !d.is_empty() {
            for (i, b) in mutations {
                let i = i.index(d.len());
                d[i] = b;
            }
            if let Some(c) = cut {
                d.truncate(c.index(d.len()));
            }
        }
        // On success split_chunks asserts reconstruct() is the identity.
        let _ = split_chunks(enc, &d, &sizes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(d in bytes(600), enc in encoding(), sizes in chunks()) {
        let _ = split_chunks(enc, &d, &sizes);
    }

    #[test]
    fn plan_never_panics(
        meta_len in any::<u64>(),
        raw in prop::collection::vec((any::<u64>(), 0u64..16, any::<u64>()), 0..5),
        small in any::<bool>(),
    ) {
        let splices: Vec<Splice> = raw
            .iter()
            .map(|&(h, d, l)| {
                let (h, l) = if small { (h % 64, l % 64) } else { (h, l) };
                Splice { header_offset: h, value_offset: h.saturating_add(d), length: l }
            })
            .collect();
        let meta_len = if small { meta_len % 128 } else { meta_len };
        if let Ok(segs) = plan(meta_len, &splices) {
            // Segments tile the metadata and the bulk stream exactly, in order.
            let (mut m, mut b) = (0, 0);
            for s in segs {
                match s {
                    Segment::Meta { start, end } => { prop_assert!(start == m && end > start); m = end; }
                    Segment::Bulk { start, end } => { prop_assert!(start == b && end > start); b = end; }
                }
            }
            prop_assert_eq!(m, meta_len);
            prop_assert_eq!(b, bulk_total(&splices));
        }
        let meta = vec![0u8; (meta_len % 128) as usize];
        let _ = reconstruct(&meta, &splices, &[1, 2, 3]);
    }
}
