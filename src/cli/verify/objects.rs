//! Step 4 of `verify`: every pixel object streamed through SHA-256 and compared with its entry
//! (both backends), and the objects that no entry names.

use std::collections::HashSet;

use super::{is_damage, Problem, Progress, VerifyError, Walk};
use crate::config::Config;
use crate::store::{Store, StoreError};

impl Walk<'_> {
    /// Step 4: every pixel object streamed through SHA-256 against its entry, and the objects
    /// no entry names.
    pub(super) async fn objects(
        &mut self,
        cfg: &Config,
        erased_names: &HashSet<String>,
        terminal: bool,
    ) -> Result<(), VerifyError> {
        let ledger = self.ledger;
        let store = Store::open_read_only(&cfg.store).await?.with_master_key(
            crate::archive::ingest::read_master_key(ledger, &cfg.security.master_key_file)
                .map_err(VerifyError::MasterKey)?,
        );
        let object_problems = self.object_digests(&store, terminal).await?;
        let listed = store.list().await?;
        // Problems of objects are confirmed once the ledger has caught up with the node: an
        // instance erased meanwhile has lost its object and key record, and that is no damage.
        ledger.catch_up();
        for (seq, p) in object_problems {
            if ledger.erased_by(seq)?.is_some() {
                self.report.erased += 1;
            } else if self.unacked.contains(&seq) {
                self.report.unacknowledged += 1;
            } else {
                self.problems.push(p);
            }
        }
        for name in listed {
            if erased_names.contains(&name) {
                // Shredded (its key record is gone); deleted at the node's next start.
                self.report.erased_objects_left += 1;
            } else if !self.named.contains(&name) && !ledger.knows_object(&name)? {
                self.problems.push(Problem {
                    subject: format!("object {name}"),
                    what: if name.starts_with("staging/") {
                        "leftover of an interrupted S3 upload (garbage, never a stored instance)"
                            .into()
                    } else {
                        "no ledger entry names this object (orphan)".into()
                    },
                });
            }
        }
        Ok(())
    }

    /// The pixel object of every entry not erased, compared with the entry: the problems found,
    /// by sequence number, to be confirmed once the ledger has caught up.
    async fn object_digests(
        &mut self,
        store: &Store,
        terminal: bool,
    ) -> Result<Vec<(u64, Problem)>, VerifyError> {
        let progress = Progress {
            on: terminal,
            total: self.with_objects.len() as u64,
        };
        let mut object_problems: Vec<(u64, Problem)> = Vec::new();
        for (i, (subject, entry)) in self.with_objects.iter().enumerate() {
            progress.tick("pixel objects", i as u64 + 1);
            let problem = |what: String| {
                (
                    entry.seq,
                    Problem {
                        subject: subject.clone(),
                        what,
                    },
                )
            };
            let key = match self.ledger.object_key(&entry.object_name) {
                Ok(k) => k,
                Err(e) if is_damage(&e) => {
                    object_problems.push(problem(format!(
                        "the key record of pixel object {} is unreadable: {e}",
                        entry.object_name
                    )));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Some(key) = key else {
                object_problems.push(problem(format!(
                    "the key record of pixel object {} is missing (it cannot be decrypted)",
                    entry.object_name
                )));
                continue;
            };
            match store.digest(&entry.object_name, &key).await {
                Ok((len, digest)) => {
                    self.report.objects_checked += 1;
                    self.report.bytes_checked += len;
                    if len != entry.pixel_length || digest != entry.pixel_sha256 {
                        object_problems.push(problem(format!(
                            "pixel object {} differs from the ledger (SHA-256 or length)",
                            entry.object_name
                        )));
                    }
                }
                Err(StoreError::Damaged { reason, .. }) => object_problems.push(problem(format!(
                    "pixel object {} differs from the ledger ({reason})",
                    entry.object_name
                ))),
                Err(StoreError::NotFound { .. }) => object_problems.push(problem(format!(
                    "pixel object {} is missing",
                    entry.object_name
                ))),
                Err(e) => return Err(e.into()),
            }
        }
        progress.end();
        Ok(object_problems)
    }
}
