//! Reading the whole ledger back to find damaged table files.
//!
//! RocksDB checks a block's checksum when it reads the block, not when it opens the file, so a
//! damaged table file goes unnoticed until a query happens to need that block (a C-FIND that
//! fails, a C-GET that sends nothing). The node therefore reads every column family once after
//! it opens the ledger, in the background ([`super::Ledger::scrub_in_background`]); `verify`
//! does the same before it checks anything else. Damage found is reported by column family,
//! with RocksDB's message (which names the file and the offset), and the scan goes on with the
//! next column family: one bad block must not hide another. What becomes of the damage found
//! is [`super::damage`]'s.

use std::sync::atomic::{AtomicBool, Ordering};

use rocksdb::{ReadOptions, DB};

/// One column family that could not be read to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Empty when not known (a read that failed names only the file).
    pub column_family: String,
    /// RocksDB's message ("Corruption: block checksum mismatch … in …/000012.sst …").
    pub error: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.column_family.as_str() {
            "" => f.write_str(&self.error),
            cf => write!(f, "column family {cf}: {}", self.error),
        }
    }
}

/// What a scan read.
#[derive(Debug, Default)]
pub struct Scan {
    pub keys: u64,
    pub damage: Vec<Damage>,
    /// Stopped before the end (the ledger is closing).
    pub stopped: bool,
}

/// Reads every key and value of the column families `names` with checksums verified, past
/// the block cache (a scan must not evict what queries use), until `stop` is set.
pub(super) fn scan(db: &DB, names: &[&str], stop: &AtomicBool) -> Scan {
    let mut out = Scan::default();
    for name in names {
        let Some(cf) = db.cf_handle(name) else {
            continue;
        };
        let mut ro = ReadOptions::default();
        ro.set_verify_checksums(true);
        ro.fill_cache(false);
        ro.set_readahead_size(2 * 1024 * 1024);
        let mut it = db.raw_iterator_cf_opt(cf, ro);
        it.seek_to_first();
        while it.valid() {
            // Reading the value makes RocksDB load its block (and check it).
            let _ = it.value();
            out.keys += 1;
            if out.keys % 4096 == 0 && stop.load(Ordering::Relaxed) {
                out.stopped = true;
                return out;
            }
            it.next();
        }
        if let Err(e) = it.status() {
            out.damage.push(Damage {
                column_family: name.to_string(),
                error: e.into_string(),
            });
        }
    }
    out
}

/// Whether a RocksDB error means stored bytes are damaged (not a busy or missing resource).
pub fn is_corruption(e: &rocksdb::Error) -> bool {
    e.kind() == rocksdb::ErrorKind::Corruption
}
