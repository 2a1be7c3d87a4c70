//! The committer's write batch: it hands RocksDB each column family's point writes in key order.
//!
//! The committer is bound by memtable inserts (see docs/PERFORMANCE.md). With
//! `allow_concurrent_memtable_write` off, RocksDB's skip list remembers where its previous insert
//! went (its "splice") and tries that spot first: a key that lands right after the previous one
//! costs a few comparisons instead of a search from the top. A group's instances mostly arrive
//! series by series, so once sorted, its `sop`, `study`, `series` and `patient` keys, its entries
//! and its tree rows are mostly such neighbours.
//!
//! Reordering is sound because a batch is applied atomically: only the order of writes to the
//! same key can change what it leaves, and the sort is stable, so those keep their order. A
//! column family that received a range deletion is left in the order it was written (a range
//! and a point write may overlap).

use std::ops::Range;

use rocksdb::{ColumnFamily, WriteBatch};

/// Point and range writes collected for one atomic write, their bytes in one buffer.
pub(super) struct SortedBatch<'a> {
    bytes: Vec<u8>,
    ops: Vec<Op<'a>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Put,
    Delete,
    DeleteRange,
}

struct Op<'a> {
    cf: &'a ColumnFamily,
    kind: Kind,
    key: Range<usize>,
    /// The value of a put, the end key of a range deletion, empty for a deletion.
    value: Range<usize>,
}

impl<'a> SortedBatch<'a> {
    /// A batch with room for about `bytes` bytes of keys and values.
    pub(super) fn with_capacity_bytes(bytes: usize) -> SortedBatch<'a> {
        SortedBatch {
            bytes: Vec::with_capacity(bytes),
            ops: Vec::with_capacity(bytes / 128),
        }
    }

    fn push(&mut self, cf: &'a ColumnFamily, kind: Kind, key: &[u8], value: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(key);
        self.bytes.extend_from_slice(value);
        let mid = start + key.len();
        self.ops.push(Op {
            cf,
            kind,
            key: start..mid,
            value: mid..self.bytes.len(),
        });
    }

    pub(super) fn put_cf(
        &mut self,
        cf: &'a ColumnFamily,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) {
        self.push(cf, Kind::Put, key.as_ref(), value.as_ref());
    }

    pub(super) fn delete_cf(&mut self, cf: &'a ColumnFamily, key: impl AsRef<[u8]>) {
        self.push(cf, Kind::Delete, key.as_ref(), &[]);
    }

    /// Deletes `[from, to)`.
    pub(super) fn delete_range_cf(
        &mut self,
        cf: &'a ColumnFamily,
        from: impl AsRef<[u8]>,
        to: impl AsRef<[u8]>,
    ) {
        self.push(cf, Kind::DeleteRange, from.as_ref(), to.as_ref());
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The writes as RocksDB takes them: grouped by column family, each family's point writes
    /// in key order (stable), a family with a range deletion in the order written.
    pub(super) fn into_write_batch(self) -> WriteBatch {
        let SortedBatch { bytes, mut ops } = self;
        let cf_id = |op: &Op| op.cf as *const ColumnFamily as usize;
        let mut unsorted: Vec<usize> = ops
            .iter()
            .filter(|op| op.kind == Kind::DeleteRange)
            .map(cf_id)
            .collect();
        unsorted.sort_unstable();
        unsorted.dedup();
        ops.sort_by(|a, b| {
            cf_id(a).cmp(&cf_id(b)).then_with(|| {
                if unsorted.binary_search(&cf_id(a)).is_ok() {
                    std::cmp::Ordering::Equal
                } else {
                    bytes[a.key.clone()].cmp(&bytes[b.key.clone()])
                }
            })
        });
        let mut batch = WriteBatch::with_capacity_bytes(bytes.len() + ops.len() * 24 + 12);
        for op in &ops {
            let (key, value) = (&bytes[op.key.clone()], &bytes[op.value.clone()]);
            match op.kind {
                Kind::Put => batch.put_cf(op.cf, key, value),
                Kind::Delete => batch.delete_cf(op.cf, key),
                Kind::DeleteRange => batch.delete_range_cf(op.cf, key, value),
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rocksdb::{IteratorMode, Options, DB};

    /// One write: column family (0 or 1), kind (0 put, 1 delete, 2 range deletion), key, and
    /// the value or the range's end.
    type W = (usize, u8, Vec<u8>, Vec<u8>);

    fn open(dir: &std::path::Path) -> DB {
        let mut o = Options::default();
        o.create_if_missing(true);
        o.create_missing_column_families(true);
        o.set_allow_concurrent_memtable_write(false);
        DB::open_cf(&o, dir, ["a", "b"]).unwrap()
    }

    type KeyValue = (Box<[u8]>, Box<[u8]>);

    /// Everything in both column families.
    fn contents(db: &DB) -> Vec<Vec<KeyValue>> {
        ["a", "b"]
            .iter()
            .map(|n| {
                db.iterator_cf(db.cf_handle(n).unwrap(), IteratorMode::Start)
                    .map(|kv| kv.unwrap())
                    .collect()
            })
            .collect()
    }

    /// Applies `before` as plain batches, then `writes` once as RocksDB's own batch in the order
    /// given and once through [`SortedBatch`]: both databases must end up the same.
    fn same_as_in_order(before: &[W], writes: &[W]) {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (plain, sorted) = (open(d1.path()), open(d2.path()));
        for db in [&plain, &sorted] {
            let cfs = [db.cf_handle("a").unwrap(), db.cf_handle("b").unwrap()];
            let mut b = WriteBatch::default();
            for (cf, _, k, v) in before {
                b.put_cf(cfs[*cf], k, v);
            }
            db.write(b).unwrap();
        }
        let cfs = [plain.cf_handle("a").unwrap(), plain.cf_handle("b").unwrap()];
        let mut b = WriteBatch::default();
        for (cf, kind, k, v) in writes {
            match kind {
                0 => b.put_cf(cfs[*cf], k, v),
                1 => b.delete_cf(cfs[*cf], k),
                _ => b.delete_range_cf(cfs[*cf], k, v),
            }
        }
        plain.write(b).unwrap();
        let cfs = [
            sorted.cf_handle("a").unwrap(),
            sorted.cf_handle("b").unwrap(),
        ];
        let mut b = SortedBatch::with_capacity_bytes(16);
        for (cf, kind, k, v) in writes {
            match kind {
                0 => b.put_cf(cfs[*cf], k, v),
                1 => b.delete_cf(cfs[*cf], k),
                _ => b.delete_range_cf(cfs[*cf], k, v),
            }
        }
        sorted.write(b.into_write_batch()).unwrap();
        assert_eq!(contents(&plain), contents(&sorted));
    }

    fn w(cf: usize, kind: u8, k: &[u8], v: &[u8]) -> W {
        (cf, kind, k.to_vec(), v.to_vec())
    }

    #[test]
    fn writes_to_one_key_keep_their_order() {
        // Put, delete, put again: the last put wins; delete after put: gone.
        same_as_in_order(
            &[w(0, 0, b"k", b"old")],
            &[
                w(0, 0, b"z", b"1"),
                w(0, 0, b"k", b"a"),
                w(1, 0, b"k", b"other family"),
                w(0, 1, b"k", b""),
                w(0, 0, b"k", b"b"),
                w(0, 0, b"m", b"x"),
                w(0, 1, b"m", b""),
            ],
        );
    }

    #[test]
    fn a_family_with_a_range_deletion_keeps_the_written_order() {
        // Sorted by key, the put of "c" would come before the range that deletes it; in the
        // order written it comes after and survives.
        same_as_in_order(
            &[w(0, 0, b"b", b"old"), w(1, 0, b"b", b"old")],
            &[
                w(0, 2, b"a", b"d"),
                w(0, 0, b"c", b"new"),
                w(0, 0, b"e", b"kept"),
                w(1, 0, b"c", b"sorted family"),
                w(1, 0, b"a", b"sorted family"),
            ],
        );
        // And the other way round: a put the range written after it deletes.
        same_as_in_order(
            &[],
            &[
                w(0, 0, b"c", b"gone"),
                w(0, 2, b"a", b"d"),
                w(0, 0, b"b", b"new"),
            ],
        );
    }

    #[test]
    fn writes_come_out_grouped_and_in_key_order() {
        let d = tempfile::tempdir().unwrap();
        let db = open(d.path());
        let (a, b) = (db.cf_handle("a").unwrap(), db.cf_handle("b").unwrap());
        let mut batch = SortedBatch::with_capacity_bytes(0);
        for k in [b"3", b"1", b"2"] {
            batch.put_cf(a, k, b"");
            batch.put_cf(b, k, b"");
        }
        assert!(!batch.is_empty());
        let out = batch.into_write_batch();
        assert_eq!(out.len(), 6);
        // The batch's own encoding lists the writes in the order RocksDB applies them.
        let data = out.data();
        let keys: Vec<u8> = [b'1', b'2', b'3']
            .iter()
            .map(|k| data.iter().position(|c| c == k).unwrap() as u8)
            .collect();
        assert!(keys.windows(2).all(|p| p[0] < p[1]), "{keys:?}");
    }

    fn write() -> impl Strategy<Value = W> {
        (
            0..2usize,
            prop_oneof![4 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8)],
            proptest::collection::vec(0..4u8, 0..3),
            proptest::collection::vec(0..4u8, 0..3),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn any_batch_leaves_what_the_written_order_leaves(
            before in proptest::collection::vec(write(), 0..12),
            writes in proptest::collection::vec(write(), 0..24),
        ) {
            // A range deletion with its end before its start is an error in RocksDB either way.
            let writes: Vec<W> = writes
                .into_iter()
                .filter(|(_, kind, k, v)| *kind != 2 || k <= v)
                .collect();
            same_as_in_order(&before, &writes);
        }
    }
}
