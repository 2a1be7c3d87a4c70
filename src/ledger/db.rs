//! The RocksDB database under the ledger: its column families, their options, and the few reads
//! every part of the ledger shares (the chain head, one entry, keys under a prefix).
//!
//! Column families (byte layouts in docs/LEDGER.md):
//! - `entries`: u64 BE sequence number → encoded [`Entry`] (the chain);
//! - `meta`: u64 BE sequence number → the encoded metadata record of that entry (apart from the
//!   chain, which only holds its hash, so that an erasure can delete it). Keyed by sequence
//!   number, a group's records are appended where the memtable and the table files end;
//! - `index`: lookups by SOP Instance UID, study, series, patient and C-FIND attribute (see
//!   [`super::index`]), and the marks written by acl, erase and unacked;
//! - `tree`: the Merkle tree over the entries (see [`super::tree`]), written in the same batch
//!   as the entries, so the tree always covers exactly the chain;
//! - `checkpoints`: tree size u64 BE → signed checkpoint note (see [`super::checkpoint`]); all
//!   are kept;
//! - `forward`: the store-and-forward queue (see [`super::forward`]);
//! - `pending`: notes for pixel objects about to be committed (see [`super::notes`]);
//! - `keys`: object name → key record of a sealed pixel object, and the master key's check value.

use std::time::{SystemTime, UNIX_EPOCH};

use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, DB};

use super::damage::read_error;
use super::entry::Entry;
use super::error::LedgerError;
use crate::instance::Digest32;

pub(super) const CF_ENTRIES: &str = "entries";
pub(super) const CF_META: &str = "meta";
pub(super) const CF_INDEX: &str = "index";
pub(super) const CF_TREE: &str = "tree";
pub(super) const CF_CHECKPOINTS: &str = "checkpoints";
pub(super) const CF_FORWARD: &str = "forward";
pub(super) const CF_PENDING: &str = "pending";
/// Object name → key record of a sealed pixel object (see `store::sealed`): erasable.
pub(super) const CF_KEYS: &str = "keys";

pub(super) const ALL_CFS: [&str; 8] = [
    CF_ENTRIES,
    CF_META,
    CF_INDEX,
    CF_TREE,
    CF_CHECKPOINTS,
    CF_FORWARD,
    CF_PENDING,
    CF_KEYS,
];

pub use crate::memory::{MEMTABLE_BYTES, RECORD_COPIES_AFTER_STORE};
/// The block cache all column families share.
pub(super) const BLOCK_CACHE_BYTES: usize = 32 * 1024 * 1024;
/// The metadata family's memtable size. Reopening replays the WAL into memtables of this size,
/// flushing each as it fills: a small one bounds that replay's memory by one memtable and one
/// record rather than by the WAL's size.
pub(super) const META_WRITE_BUFFER_BYTES: usize = 16 * 1024 * 1024;
/// Metadata records this large or larger are kept in blob files rather than table blocks.
pub(super) const BLOB_MIN_BYTES: u64 = 512 * 1024;

/// Whether an open error means another process (the running node) holds the ledger.
pub fn is_locked(e: &rocksdb::Error) -> bool {
    let text = e.to_string();
    text.contains("lock") && text.contains("Resource temporarily unavailable")
}

pub(super) fn cf_descriptors() -> Vec<ColumnFamilyDescriptor> {
    // One cache for all families: RocksDB otherwise gives each family its own 32 MiB.
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    ALL_CFS
        .into_iter()
        .map(|name| {
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            // Every new instance looks up its SOP Instance UID, which is usually absent: a bloom
            // filter answers that without reading index blocks.
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            table.set_block_cache(&cache);
            o.set_block_based_table_factory(&table);
            o.set_write_buffer_size(64 * 1024 * 1024);
            if name == CF_META {
                o.set_write_buffer_size(META_WRITE_BUFFER_BYTES);
                // A large record (a big private element) goes to a blob file as its memtable is
                // flushed, uncompressed: a flush or compaction that kept it in a table block would
                // hold it once per input file, plus the block being built and its compressed copy.
                o.set_enable_blob_files(true);
                o.set_min_blob_size(BLOB_MIN_BYTES);
                // Every compaction moves the live blobs of the files it reads, so that an erased
                // record leaves the blob files with the compaction after its erasure (see
                // `erase`); only records of at least `BLOB_MIN_BYTES` pay for the rewrite.
                o.set_enable_blob_gc(true);
                o.set_blob_gc_age_cutoff(1.0);
            }
            ColumnFamilyDescriptor::new(name, o)
        })
        .collect()
}

pub(super) fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // Ledger writes are synced per group; keep the WAL fsync honest and bounded in size.
    o.set_max_total_wal_size(256 * 1024 * 1024);
    // All memtables together are bounded (eight families of 64 MiB, two each, could hold
    // 1 GiB): past the bound the largest is flushed, and writes wait while it is.
    o.set_write_buffer_manager(&rocksdb::WriteBufferManager::new_write_buffer_manager(
        MEMTABLE_BYTES,
        true,
    ));
    o.increase_parallelism(2);
    // The committer is the only steady writer: inserting its batches one at a time lets the
    // memtable start each insert where the previous one went (see `batch`).
    o.set_allow_concurrent_memtable_write(false);
    o
}

/// Keys of `cf` that start with `prefix`, with the prefix removed, in key order.
pub(super) fn keys_under(
    db: &DB,
    cf: &rocksdb::ColumnFamily,
    prefix: &[u8],
) -> Result<Vec<Vec<u8>>, LedgerError> {
    let mut out = Vec::new();
    for item in db.iterator_cf(cf, IteratorMode::From(prefix, Direction::Forward)) {
        let (k, _) = item.map_err(read_error(db))?;
        if !k.starts_with(prefix) {
            break;
        }
        out.push(k[prefix.len()..].to_vec());
    }
    Ok(out)
}

pub(super) fn read_head(db: &DB) -> Result<Option<(u64, Digest32)>, LedgerError> {
    let cf = db
        .cf_handle(CF_ENTRIES)
        .ok_or_else(|| LedgerError::Corrupt("missing entries".into()))?;
    match db.iterator_cf(cf, IteratorMode::End).next() {
        None => Ok(None),
        Some(item) => {
            let (_, v) = item.map_err(read_error(db))?;
            let e =
                Entry::decode(&v).map_err(|e| LedgerError::Corrupt(format!("last entry: {e}")))?;
            Ok(Some((e.seq, e.hash())))
        }
    }
}

pub(super) fn read_entry(db: &DB, seq: u64) -> Result<Option<Entry>, LedgerError> {
    let cf = db
        .cf_handle(CF_ENTRIES)
        .ok_or_else(|| LedgerError::Corrupt("missing entries".into()))?;
    db.get_cf(cf, seq.to_be_bytes())
        .map_err(read_error(db))?
        .map(|b| Entry::decode(&b).map_err(|e| LedgerError::Corrupt(e.to_string())))
        .transpose()
}

pub(super) fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
