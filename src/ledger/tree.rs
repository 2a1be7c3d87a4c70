//! The Merkle tree's storage in the `tree` column family: leaf index u64 BE → the hashes of the
//! complete subtrees appending that leaf created (its own hash, then one per level it
//! completed; see [`node_slot`]), written in the batch of the entry. Reading nodes, planning the
//! nodes of new leaves, and bringing a lagging tree up to the chain at open
//! ([`backfill_tree`]). The tree arithmetic itself is [`super::merkle`]'s.

use rocksdb::{Direction, IteratorMode, WriteOptions, DB};
// Group-local maps keyed by our own numbers: no need for SipHash.
use rustc_hash::FxHashMap as HashMap;

use super::batch;
use super::damage::read_error;
use super::db::{CF_ENTRIES, CF_TREE};
use super::error::LedgerError;
use super::merkle;
use crate::instance::Digest32;

/// The `tree` key of the nodes leaf `leaf` completed (its own hash first, then one per level).
pub(super) fn tree_key(leaf: u64) -> [u8; 8] {
    leaf.to_be_bytes()
}

/// Where node (level, index) is stored: under the leaf that completed it, the last one it
/// covers, at position `level` of that leaf's value.
pub(super) fn node_slot(level: u8, index: u64) -> Option<u64> {
    let width = 1u64.checked_shl(u32::from(level))?;
    index.checked_add(1)?.checked_mul(width)?.checked_sub(1)
}

pub(super) fn read_node(
    db: &DB,
    cf: &rocksdb::ColumnFamily,
    level: u8,
    index: u64,
) -> Result<Digest32, LedgerError> {
    let missing =
        || LedgerError::Corrupt(format!("Merkle tree node ({level}, {index}) is missing"));
    let leaf = node_slot(level, index).ok_or_else(missing)?;
    let at = usize::from(level) * 32;
    db.get_pinned_cf(cf, tree_key(leaf))
        .map_err(read_error(db))?
        .and_then(|v| {
            v.get(at..at + 32)
                .and_then(|h| <Digest32>::try_from(h).ok())
        })
        .ok_or_else(missing)
}

/// The tree nodes that appending `leaf` as leaf number `index` creates: siblings come from
/// `pending` (nodes planned but not yet written) or the database. Nothing is written.
pub(super) fn plan_tree_nodes(
    db: &DB,
    cf_tree: &rocksdb::ColumnFamily,
    pending: &HashMap<(u8, u64), Digest32>,
    index: u64,
    leaf: Digest32,
) -> Result<Vec<(u8, u64, Digest32)>, LedgerError> {
    merkle::append_nodes(index, leaf, |level, i| match pending.get(&(level, i)) {
        Some(h) => Ok(*h),
        None => read_node(db, cf_tree, level, i),
    })
}

/// Puts the nodes one leaf's append created into a batch, as one value under that leaf (see
/// [`tree_key`]), and remembers them as pending.
pub(super) fn put_tree_nodes<'a>(
    batch: &mut batch::SortedBatch<'a>,
    cf_tree: &'a rocksdb::ColumnFamily,
    pending: &mut HashMap<(u8, u64), Digest32>,
    nodes: Vec<(u8, u64, Digest32)>,
) {
    let Some(&(_, leaf, _)) = nodes.first() else {
        return;
    };
    let mut value = Vec::with_capacity(nodes.len() * 32);
    for (level, index, hash) in nodes {
        debug_assert_eq!(node_slot(level, index), Some(leaf));
        value.extend_from_slice(&hash);
        pending.insert((level, index), hash);
    }
    batch.put_cf(cf_tree, tree_key(leaf), value);
}

/// The tree as the committer reads it.
pub(super) struct DbNodes<'a>(pub(super) &'a DB);

impl merkle::NodeSource for DbNodes<'_> {
    type Error = LedgerError;
    fn node(&self, level: u8, index: u64) -> Result<Digest32, LedgerError> {
        let cf = self
            .0
            .cf_handle(CF_TREE)
            .ok_or_else(|| LedgerError::Corrupt("missing tree".into()))?;
        read_node(self.0, cf, level, index)
    }
}

/// Makes the Merkle tree cover every entry. Leaves are appended in order, so the tree covers a
/// prefix of the chain; a tree that lags the chain (its newest leaves lost) gets the missing
/// leaves added from the entries here, in synced batches of [`BACKFILL_CHUNK`] leaves. A tree
/// with leaves past the last entry refuses to open.
pub(super) fn backfill_tree(db: &DB, entries: u64) -> Result<(), LedgerError> {
    let cf_tree = db
        .cf_handle(CF_TREE)
        .ok_or_else(|| LedgerError::Corrupt("missing tree".into()))?;
    let lo = leaves_held(entries, |i| {
        db.get_pinned_cf(cf_tree, tree_key(i))
            .map(|v| v.is_some())
            .map_err(read_error(db))
    })?;
    if lo == entries {
        return Ok(());
    }
    tracing::warn!(
        from = lo,
        to = entries,
        "Merkle tree behind the chain: adding the missing leaves"
    );
    // Written in leaf order, a synced batch every BACKFILL_CHUNK leaves (memory stays bounded
    // on a large ledger; after a crash the search above resumes where the leaves stop).
    let mut batch = batch::SortedBatch::with_capacity_bytes(0);
    let mut new_nodes: HashMap<(u8, u64), Digest32> = HashMap::default();
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    for_each_entry_from(db, lo, entries, |i, raw| {
        let created = plan_tree_nodes(db, cf_tree, &new_nodes, i, merkle::leaf_hash(raw))?;
        put_tree_nodes(&mut batch, cf_tree, &mut new_nodes, created);
        if (i + 1 - lo) % BACKFILL_CHUNK == 0 {
            let full = std::mem::replace(&mut batch, batch::SortedBatch::with_capacity_bytes(0));
            db.write_opt(full.into_write_batch(), &wo)
                .map_err(LedgerError::Write)?;
            new_nodes.clear();
        }
        Ok(())
    })?;
    db.write_opt(batch.into_write_batch(), &wo)
        .map_err(LedgerError::Write)
}

/// How many leaves the tree holds, counted from leaf 0 (they are always a prefix), given whether
/// it holds leaf i. Tree and entries are written in one batch: a leaf past
/// the last entry means entries were cut from the end of the chain.
pub(super) fn leaves_held(
    entries: u64,
    has_leaf: impl Fn(u64) -> Result<bool, LedgerError>,
) -> Result<u64, LedgerError> {
    if has_leaf(entries)? {
        return Err(LedgerError::Corrupt(format!(
            "the Merkle tree has leaves beyond the chain's {entries} entries: entries were removed"
        )));
    }
    if entries == 0 || has_leaf(entries - 1)? {
        return Ok(entries);
    }
    // The first leaf index without a node.
    let (mut lo, mut hi) = (0u64, entries - 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if has_leaf(mid)? {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Leaves per synced batch when the tree is (re)built at open.
pub(super) const BACKFILL_CHUNK: u64 = 65_536;

/// Calls `f(leaf index, entry bytes)` for entries seq `from + 1` ..= `to`, in order; a missing
/// entry is an error.
pub(super) fn for_each_entry_from(
    db: &DB,
    from: u64,
    to: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), LedgerError>,
) -> Result<(), LedgerError> {
    let cf_entries = db
        .cf_handle(CF_ENTRIES)
        .ok_or_else(|| LedgerError::Corrupt("missing entries".into()))?;
    let start = (from + 1).to_be_bytes();
    let mut it = db.iterator_cf(cf_entries, IteratorMode::From(&start, Direction::Forward));
    for i in from..to {
        let (key, raw) = it
            .next()
            .transpose()
            .map_err(read_error(db))?
            .ok_or_else(|| LedgerError::Corrupt(format!("entry {} is missing", i + 1)))?;
        if key[..] != (i + 1).to_be_bytes() {
            return Err(LedgerError::Corrupt(format!("entry {} is missing", i + 1)));
        }
        f(i, &raw)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_chain_cut_from_its_end_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        for i in 0..5u8 {
            ledger
                .store(request(&format!("4.{i}"), "4", i + 1))
                .await
                .unwrap();
        }
        let cf = ledger.cf(CF_ENTRIES).unwrap();
        ledger.inner.db.delete_cf(cf, 5u64.to_be_bytes()).unwrap();
        ledger.close();
        drop(ledger);
        match Ledger::open(dir.path()) {
            Err(LedgerError::Corrupt(m)) => assert!(m.contains("beyond the chain"), "{m}"),
            other => panic!("opened a cut chain: {:?}", other.is_ok()),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_merkle_tree_follows_the_chain_across_groups_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..37u32 {
            let l = ledger.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = request(&format!("4.{i}"), "5", 0);
                r.instance_key = Sha256::digest(i.to_le_bytes()).into();
                l.store(r).await.unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        ledger.close();
        drop(ledger);
        let ledger = Ledger::open(dir.path()).unwrap();
        let leaves: Vec<Digest32> = (1..=37)
            .map(|s| merkle::leaf_hash(&ledger.entry(s).unwrap().unwrap().encode()))
            .collect();
        for size in [1u64, 2, 5, 16, 37] {
            let root = ledger.tree_root(size).unwrap();
            for seq in [1, size / 2 + 1, size] {
                let p = ledger.inclusion_proof(seq, size).unwrap();
                assert!(merkle::verify_inclusion(
                    &leaves[seq as usize - 1],
                    seq - 1,
                    size,
                    &p,
                    &root
                ));
            }
            let c = ledger.consistency_proof(3.min(size), size).unwrap();
            assert!(merkle::verify_consistency(
                3.min(size),
                size,
                &ledger.tree_root(3.min(size)).unwrap(),
                &root,
                &c
            ));
        }
        assert!(ledger.inclusion_proof(38, 37).is_err());
        // A ledger whose tree lags the chain (its newest leaves lost) is repaired at open.
        let root = ledger.tree_root(37).unwrap();
        {
            let cf = ledger.cf(CF_TREE).unwrap();
            let keys: Vec<_> = ledger
                .inner
                .db
                .iterator_cf(cf, IteratorMode::Start)
                .map(|kv| kv.unwrap().0)
                .collect();
            for k in keys
                .iter()
                .filter(|k| u64::from_be_bytes(k[..].try_into().unwrap()) >= 20)
            {
                ledger.inner.db.delete_cf(cf, k).unwrap();
            }
        }
        ledger.close();
        drop(ledger);
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.tree_root(37).unwrap(), root);
    }
}
