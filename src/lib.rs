//! dicomchain: a DICOM node that splits every received instance between a tamper-evident ledger
//! (RocksDB) and an object store (a local directory or S3/MinIO), and rebuilds it byte for byte.
//!
//! Data flows one way, each step owned by one module:
//!
//! ```text
//! network ─▶ dimse (listener, association, negotiate, command, service)
//!               │ data set bytes as they arrive
//!               ▼
//!           ingest ─▶ split (metadata | pixel bulk, pure)
//!               │         ├─▶ store   (pixel object under an opaque name; fs or s3)
//!               │         └─▶ ledger  (hash-chained entry + metadata record + index; RocksDB)
//!               ▼
//!           C-STORE-RSP only after both halves are durable
//! ```
//!
//! Queries read the same ledger: [`find`] answers C-FIND from the index written with each
//! instance. Retrieval is the mirror image: [`retrieve`] rebuilds a data set from the ledger's metadata
//! record and the store's pixel object, checking every digest. [`instance`] defines the metadata
//! record and the instance key that ties the halves together; [`config`] the configuration;
//! [`node`] starts and stops it all. [`forward`] passes stored instances on to other
//! destinations (store-and-forward), from a queue kept on the ledger.
//!
//! Below them all, [`dicom`] is the one DICOM element header reader and writer (used by the
//! splitter, the index scanner, C-FIND data sets, import and rebuilding), the Part 10 header and
//! the UIDs the crate names; it imports nothing else of the crate.
//!
//! Guarding it: [`dimse::admission`] decides who gets an association slot and when (pending
//! pool, per-source rates and caps), [`throttle`] does the same for the admin listener,
//! [`perms`] keeps state files private (umask, key file modes), and [`escape`] makes every
//! peer-supplied string safe to print in logs and audit lines.

pub mod acl;
pub mod archive;
pub mod cli;
pub mod config;
pub mod dicom;
pub mod dimse;
pub mod forward;
pub mod instance;
pub mod ledger;
pub mod memory;
pub mod node;
pub mod ops;
pub mod query;
pub mod scp;
pub mod split;
pub mod store;
pub mod util;
