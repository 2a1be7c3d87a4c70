//! dicomchain: a DICOM node that splits every received instance between a tamper-evident ledger
//! (RocksDB) and an object store (a local directory or S3), and rebuilds it byte for byte.
//!
//! The crate's folders are layers; each imports only those below it (docs/ARCHITECTURE.md,
//! checked by `.ci/layering.py`):
//!
//! ```text
//! cli ─▶ node ─▶ ops, forward ─▶ scp ─▶ query (planner) ─▶ archive ─▶ dimse (the wire)
//!                                                              │
//!                                                              ├─▶ query's pure half (what the
//!                                                              │   index keeps, matching rules)
//!                                                              ├─▶ ledger (entries, tree, index)
//!                                                              └─▶ store  (fs or S3, sealed)
//!            config, acl, instance, memory ─▶ split ─▶ dicom ─▶ util
//! ```
//!
//! A C-STORE flows down: [`dimse`] reads the PDUs, [`scp`] dispatches the command,
//! [`archive::ingest`] splits the data set as it arrives ([`split`], pure) and commits the pixel
//! object to [`store`] and the entry, metadata record and index to [`ledger`]; the response goes
//! only after both halves are durable. C-FIND is [`query`] over the ledger's index; C-MOVE,
//! C-GET and forwarding rebuild each instance with [`archive::retrieve`], checking every digest,
//! and send it with [`archive::outbound`]. [`instance`] defines the metadata record and the keys
//! that tie the halves together, [`dicom`] the one element reader and writer, [`config`] the
//! configuration, [`node`] starts and stops it all, [`ops`] runs beside it (admin API, metrics,
//! syslog), and [`cli`] is every command.
//!
//! Guarding it: [`dimse::admission`] decides who gets an association slot and when (pending
//! pool, per-source rates and caps), [`ops::throttle`] does the same for the admin listener,
//! [`util::perms`] keeps state files private (umask, key file modes), and [`util::escape`] makes
//! every peer-supplied string safe to print in logs and audit lines.

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
