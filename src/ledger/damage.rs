//! Damage the ledger finds in its own files, and what becomes of it: logged once, recorded as
//! one security alert, reported by `/health` ([`super::Ledger::damage`]).
//!
//! Damage shows in two ways. The read-back after the start ([`super::scrub`]) reads every block
//! once; but a block can go bad while the node runs, or be needed by a query before the read-back
//! reaches it, and then the first sign is a read that fails with RocksDB's `Corruption`. Every
//! read of the ledger turns a RocksDB error into a [`LedgerError`] through [`read_error`], which
//! hands damage to the ledger's [`DamageBook`], the one the read-back reports to as well. The
//! check runs on the error path only: a read that succeeds pays nothing.
//!
//! A damaged block fails every query that needs it, so the book keeps one record per damaged
//! file and ignores the same damage found again; it keeps at most [`MAX_RECORDS`], so that a
//! flood of queries against a badly damaged ledger grows neither memory nor the trail. The
//! committer records the alert of each new record at its next spool pass, about once a second:
//! it is the only writer of the ledger, and the read that found the damage may be its own.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use rocksdb::DB;

use super::error::LedgerError;
use super::scrub::{is_corruption, Damage};

/// Most damage records a ledger keeps (one per damaged file). Past this the ledger is reported
/// damaged already, and more records would only lengthen `/health` and the trail.
pub const MAX_RECORDS: usize = 64;

/// The damage found in one ledger since it was opened.
#[derive(Default)]
pub struct DamageBook {
    found: Mutex<Found>,
}

#[derive(Default)]
struct Found {
    records: Vec<Damage>,
    /// How many of `records` (the first ones) have their alert on the trail.
    alerted: usize,
}

impl DamageBook {
    /// Takes `damage` found by `found_by` (for the log); returns whether it was new, in which
    /// case it is logged. Damage of a file already recorded is not.
    pub fn note(&self, damage: Damage, found_by: &str) -> bool {
        let Ok(mut found) = self.found.lock() else {
            return false;
        };
        let file = damaged_file(&damage.error);
        if found.records.len() >= MAX_RECORDS
            || found.records.iter().any(|r| damaged_file(&r.error) == file)
        {
            return false;
        }
        tracing::error!(%damage, found_by, "the ledger is damaged: a table file no longer matches its checksums; what it held cannot be served (run `dicomchain verify`, restore from a backup)");
        found.records.push(damage);
        true
    }

    /// Every record, oldest first.
    pub fn all(&self) -> Vec<Damage> {
        self.found
            .lock()
            .map(|f| f.records.clone())
            .unwrap_or_default()
    }

    /// The records whose alert is not on the trail yet, and the mark to hand to
    /// [`DamageBook::alerted`] once it is.
    pub fn unalerted(&self) -> (usize, Vec<Damage>) {
        match self.found.lock() {
            Ok(f) => (f.records.len(), f.records[f.alerted..].to_vec()),
            Err(_) => (0, Vec::new()),
        }
    }

    /// The alerts of the records before `mark` (from [`DamageBook::unalerted`]) are durable.
    pub fn alerted(&self, mark: usize) {
        if let Ok(mut f) = self.found.lock() {
            f.alerted = f.alerted.max(mark);
        }
    }
}

/// What identifies one damage: the file RocksDB names in its message ("… in
/// /var/lib/dicomchain/ledger/000012.sst offset 8192 size 3998"), or else the whole message.
/// Not the block: two damaged blocks of one file are one file to restore, and one alert.
fn damaged_file(message: &str) -> &str {
    message
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| matches!(c, ',' | ':' | ';' | '(' | ')' | '\'' | '"')))
        .find(|w| w.ends_with(".sst") || w.ends_with(".blob"))
        .and_then(|w| Path::new(w).file_name()?.to_str())
        .unwrap_or(message)
}

/// The books of the ledgers open in this process, by the path of their database. The functions
/// that read are handed a bare `&DB`, which has no room for a book of ours; the list is looked
/// at only when a read has failed.
static BOOKS: Mutex<Vec<(PathBuf, Weak<DamageBook>)>> = Mutex::new(Vec::new());

/// A new book for the ledger in `db`, found by [`read_error`] from then on (and until the book
/// is dropped).
pub fn register(db: &DB) -> Arc<DamageBook> {
    let book = Arc::new(DamageBook::default());
    if let Ok(mut books) = BOOKS.lock() {
        books.retain(|(path, b)| b.strong_count() > 0 && path != db.path());
        books.push((db.path().to_path_buf(), Arc::downgrade(&book)));
    }
    book
}

fn book_of(db: &DB) -> Option<Arc<DamageBook>> {
    let books = BOOKS.lock().ok()?;
    books
        .iter()
        .find(|(path, _)| path == db.path())
        .and_then(|(_, b)| b.upgrade())
}

/// The ledger error for a failed read of `db`: [`LedgerError::Read`], after handing damage (an
/// error of kind `Corruption`) to the ledger's book. For `map_err`.
pub fn read_error(db: &DB) -> impl Fn(rocksdb::Error) -> LedgerError + '_ {
    move |e| {
        report(db, &e);
        LedgerError::Read(e)
    }
}

/// Hands `e`, an error of `db`, to its ledger's book if it is damage; named by column family
/// when RocksDB's message names a table file (looked up among the live files: only on this
/// rare path).
pub fn report(db: &DB, e: &rocksdb::Error) {
    if !is_corruption(e) {
        return;
    }
    let Some(book) = book_of(db) else {
        return;
    };
    let error = e.to_string();
    let file = damaged_file(&error);
    let column_family = db
        .live_files()
        .ok()
        .and_then(|files| {
            files
                .into_iter()
                .find(|f| Path::new(&f.name).file_name().and_then(|n| n.to_str()) == Some(file))
        })
        .map(|f| f.column_family_name)
        .unwrap_or_default();
    book.note(
        Damage {
            column_family,
            error,
        },
        "a read of the ledger",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: &str = "Corruption: block checksum mismatch: stored(context removed) = 2818495117, computed = 3544213290, type = 4  in /tmp/x/ledger/000009.sst offset 8192 size 3998";

    fn damage(cf: &str, error: &str) -> Damage {
        Damage {
            column_family: cf.into(),
            error: error.into(),
        }
    }

    #[test]
    fn a_damage_is_named_by_its_file() {
        assert_eq!(damaged_file(BLOCK), "000009.sst");
        assert_eq!(
            damaged_file("Corruption: bad blob checksum in '/l/000031.blob':"),
            "000031.blob"
        );
        assert_eq!(
            damaged_file("Corruption: bad entry"),
            "Corruption: bad entry"
        );
    }

    #[test]
    fn the_same_file_found_again_is_one_record_and_one_alert() {
        let book = DamageBook::default();
        assert!(book.note(damage("meta", BLOCK), "test"));
        // Another query, another block of the same file: nothing new.
        let other_block = BLOCK.replace("offset 8192", "offset 16384");
        assert!(!book.note(damage("", &other_block), "test"));
        assert!(!book.note(damage("meta", BLOCK), "test"));
        let (mark, new) = book.unalerted();
        assert_eq!(new.len(), 1);
        book.alerted(mark);
        assert!(book.unalerted().1.is_empty());
        // Another file is news.
        assert!(book.note(damage("index", &BLOCK.replace("000009", "000010")), "test"));
        let (mark, new) = book.unalerted();
        assert_eq!((mark, new.len()), (2, 1));
        assert_eq!(new[0].column_family, "index");
        assert_eq!(book.all().len(), 2);
    }

    #[test]
    fn the_records_are_bounded() {
        let book = DamageBook::default();
        for n in 0..MAX_RECORDS * 2 {
            book.note(
                damage("meta", &BLOCK.replace("000009", &format!("{n:06}"))),
                "test",
            );
        }
        assert_eq!(book.all().len(), MAX_RECORDS);
    }

    /// A byte flipped in a table file under an open database: reads that meet it reach the
    /// book as one record, named by column family; other errors do not.
    #[test]
    fn a_read_that_meets_damage_reports_it_once() {
        use std::io::{Read, Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let mut table = rocksdb::BlockBasedOptions::default();
        // Every read goes to the file.
        table.disable_cache();
        let mut o = rocksdb::Options::default();
        o.create_if_missing(true);
        o.set_block_based_table_factory(&table);
        o.set_compression_type(rocksdb::DBCompressionType::None);
        let db = DB::open(&o, dir.path()).unwrap();
        for n in 0..2000u32 {
            db.put(n.to_be_bytes(), [n as u8; 100]).unwrap();
        }
        db.flush().unwrap();
        let book = register(&db);
        let sst = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "sst"))
            .unwrap();
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&sst)
            .unwrap();
        f.seek(SeekFrom::Start(f.metadata().unwrap().len() / 4))
            .unwrap();
        let mut b = [0u8];
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Current(-1)).unwrap();
        f.write_all(&[b[0] ^ 0x5a]).unwrap();
        drop(f);

        let mut failed = 0;
        for n in 0..2000u32 {
            if let Err(e) = db.get(n.to_be_bytes()).map_err(read_error(&db)) {
                assert!(
                    matches!(&e, LedgerError::Read(s) if is_corruption(s)),
                    "{e}"
                );
                failed += 1;
            }
        }
        assert!(failed > 1, "{failed} reads failed");
        let found = book.all();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].column_family, "default");
        assert!(found[0].error.contains(&name_of(&sst)), "{found:?}");

        let mut strict = rocksdb::Options::default();
        strict.create_if_missing(false);
        let missing = DB::open(&strict, dir.path().join("none"))
            .map(|_| ())
            .unwrap_err();
        assert!(!is_corruption(&missing));
        assert!(matches!(read_error(&db)(missing), LedgerError::Read(_)));
        assert_eq!(book.all().len(), 1);
    }

    fn name_of(p: &Path) -> String {
        p.file_name().unwrap().to_string_lossy().into_owned()
    }
}
