//! Grants and revocations of permissions as ledger entries: event 4 (grant) and 5 (revoke),
//! the AE title in `peer`, the permissions in `detail` ("store,find"), who asked in
//! `calling_ae`. Each is indexed by `acl\0seq` (u64 BE) in the `index` column family, written in
//! the entry's batch, so the node rebuilds the effective rules at start without reading the
//! whole chain.

use rocksdb::{Direction, IteratorMode};

use super::damage::read_error;
use super::db::{read_entry, CF_INDEX};
use super::entry::{Entry, Event};
use super::error::LedgerError;
use super::group::Group;
use super::handle::Ledger;
pub use super::request::AclChange;
use super::request::Job;
use crate::acl::{Change, Permission};

const ACL_PREFIX: &[u8] = b"acl\0";

fn acl_key(seq: u64) -> Vec<u8> {
    let mut k = ACL_PREFIX.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The AE title and change a grant or revoke entry records; `None` for other entries and for
/// one whose permissions do not parse.
pub fn change_of(e: &Entry) -> Option<(String, Change)> {
    let grant = match e.event {
        Event::Grant => true,
        Event::Revoke => false,
        _ => return None,
    };
    let permissions = Permission::parse_list(&e.detail)?;
    (!e.peer.trim().is_empty()).then(|| {
        (
            e.peer.clone(),
            Change {
                seq: e.seq,
                grant,
                permissions,
            },
        )
    })
}

impl Ledger {
    /// Records a grant or revocation; returns its entry's sequence number once durable.
    pub async fn acl_change(&self, change: AclChange) -> Result<u64, LedgerError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        // No timeout once queued: a change reported as failed must not become durable afterwards.
        self.ask_until_done(Job::Acl { change, reply }, rx).await
    }

    /// Every grant and revocation, in ledger order.
    pub fn acl_history(&self) -> Result<Vec<(String, Change)>, LedgerError> {
        let cf = self.cf(CF_INDEX)?;
        let mut out = Vec::new();
        let it = self
            .inner
            .db
            .iterator_cf(cf, IteratorMode::From(ACL_PREFIX, Direction::Forward));
        for item in it {
            let (k, _) = item.map_err(read_error(&self.inner.db))?;
            let Some(seq) = k.strip_prefix(ACL_PREFIX) else {
                break;
            };
            let seq = u64::from_be_bytes(
                seq.try_into()
                    .map_err(|_| LedgerError::Corrupt("bad acl index key".into()))?,
            );
            let entry = read_entry(&self.inner.db, seq)?.ok_or_else(|| {
                LedgerError::Corrupt(format!("acl index names missing entry {seq}"))
            })?;
            let change = change_of(&entry).ok_or_else(|| {
                LedgerError::Corrupt(format!("entry {seq} is not a valid grant or revocation"))
            })?;
            out.push(change);
        }
        Ok(out)
    }
}

impl Group<'_> {
    /// Plans a grant or revoke entry and its index key.
    pub(super) fn acl(&mut self, c: &AclChange) -> Result<u64, LedgerError> {
        if c.ae.trim().is_empty() || c.permissions.is_empty() {
            return Err(LedgerError::Corrupt(
                "a grant or revocation needs an AE title and permissions".into(),
            ));
        }
        let (seq, prev_hash) = self.next_position();
        let event = if c.grant { Event::Grant } else { Event::Revoke };
        let entry = Entry {
            calling_ae: c.by.chars().take(64).collect(),
            peer: c.ae.trim().to_string(),
            detail: Permission::list(&c.permissions),
            ..Entry::event(seq, prev_hash, self.time_micros, event)
        };
        self.append(&entry)?;
        self.batch.put_cf(self.cf_index, acl_key(seq), []);
        Ok(seq)
    }
}
