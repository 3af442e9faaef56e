//! The catalog's share table (C2): which hosts are members of each shared dataset and which member
//! is its hub, and the meaning of every [`ShareCommand`].
//!
//! Deterministic like the rest of the catalog. Members must be recorded hosts. **Invariants**
//! (checked by `invariants` after every command that writes a share): `hub ∈ members`, members
//! distinct and sorted, and `generation` grows by one on every change of hub or members;
//! `SetMembers` and `MoveHub` are compare-and-sets on the generation, so a controller acting on
//! an old view changes nothing. The shares' contents are not here: members hold them
//! (`share::host`), and the catalog only says who syncs with whom.
//!
//! Key layout: `share/<id BE>` → bincode [`ShareRecord`]; `sharename/<name>` → id.

use haven_proto::share::{ShareCommand, ShareOutcome, ShareQuery, ShareQueryResult, ShareRecord};
use haven_proto::{NodeId, ShareId};

use super::{get_store, host_key, resolve_name, scan_store, CatalogTxn};
use crate::storage::{Store, StoreError};

pub(super) const SHARE: &[u8] = b"share/";
const SHARENAME: &[u8] = b"sharename/";

fn id_key(id: ShareId) -> Vec<u8> {
    [SHARE, &id.0.to_be_bytes()[..]].concat()
}

fn name_key(name: &str) -> Vec<u8> {
    [SHARENAME, name.as_bytes()].concat()
}

fn refused(reason: impl Into<String>) -> ShareOutcome {
    ShareOutcome::Refused { reason: reason.into(), not_found: false }
}

fn not_found(share: ShareId) -> ShareOutcome {
    ShareOutcome::Refused { reason: format!("{share} does not exist"), not_found: true }
}

/// Members sorted, so two records with the same set compare equal.
fn sorted(members: &[NodeId]) -> Vec<NodeId> {
    let mut m = members.to_vec();
    m.sort();
    m
}

impl CatalogTxn<'_> {
    pub(super) fn apply_share(&mut self, cmd: &ShareCommand) -> Result<ShareOutcome, StoreError> {
        match cmd {
            ShareCommand::Create { name, members } => self.create_share(name, members),
            ShareCommand::Delete { share } => self.delete_share(*share),
            ShareCommand::SetMembers { share, members, expected_generation } => {
                self.set_share_members(*share, members, *expected_generation)
            }
            ShareCommand::MoveHub { share, hub, expected_generation } => {
                self.move_share_hub(*share, *hub, *expected_generation)
            }
        }
    }

    fn share(&self, id: ShareId) -> Result<Option<ShareRecord>, StoreError> {
        self.get_as(&id_key(id))
    }

    /// `None` when every member is a recorded host, else the refusal naming the first that is not.
    fn unknown_member(&self, members: &[NodeId]) -> Result<Option<ShareOutcome>, StoreError> {
        for m in members {
            if self.get(&host_key(m.0))?.is_none() {
                return Ok(Some(refused(format!("{m} is not a host of this cluster"))));
            }
        }
        Ok(None)
    }

    fn create_share(&mut self, name: &str, members: &[NodeId]) -> Result<ShareOutcome, StoreError> {
        if self.get(&name_key(name))?.is_some() {
            return Ok(refused(format!("a share named {name:?} already exists")));
        }
        if let Some(refusal) = self.unknown_member(members)? {
            return Ok(refusal);
        }
        let id = ShareId(self.next_id("share")?);
        let record =
            ShareRecord { id, name: name.to_string(), members: sorted(members), hub: members[0], generation: 1 };
        self.put_as(id_key(id), &record)?;
        self.put(name_key(name), id.0.to_be_bytes().to_vec());
        Ok(ShareOutcome::Share(record))
    }

    fn delete_share(&mut self, id: ShareId) -> Result<ShareOutcome, StoreError> {
        let Some(record) = self.share(id)? else { return Ok(not_found(id)) };
        self.delete(id_key(id));
        self.delete(name_key(&record.name));
        Ok(ShareOutcome::Deleted)
    }

    fn set_share_members(
        &mut self,
        id: ShareId,
        members: &[NodeId],
        expected_generation: u64,
    ) -> Result<ShareOutcome, StoreError> {
        let Some(mut record) = self.share(id)? else { return Ok(not_found(id)) };
        if record.generation != expected_generation {
            return Ok(stale(&record, expected_generation));
        }
        if let Some(refusal) = self.unknown_member(members)? {
            return Ok(refusal);
        }
        if !members.contains(&record.hub) {
            // A member that stays holds the document; a brand-new one starts empty, and as hub
            // it would lose what only the leaving members held.
            record.hub = members.iter().copied().find(|m| record.members.contains(m)).unwrap_or(members[0]);
        }
        record.members = sorted(members);
        record.generation += 1;
        self.put_as(id_key(id), &record)?;
        Ok(ShareOutcome::Share(record))
    }

    fn move_share_hub(
        &mut self,
        id: ShareId,
        hub: NodeId,
        expected_generation: u64,
    ) -> Result<ShareOutcome, StoreError> {
        let Some(mut record) = self.share(id)? else { return Ok(not_found(id)) };
        if record.generation != expected_generation {
            return Ok(stale(&record, expected_generation));
        }
        if !record.members.contains(&hub) {
            return Ok(refused(format!("{hub} is not a member of {}", record.name)));
        }
        record.hub = hub;
        record.generation += 1;
        self.put_as(id_key(id), &record)?;
        Ok(ShareOutcome::Share(record))
    }
}

fn stale(record: &ShareRecord, expected: u64) -> ShareOutcome {
    refused(format!(
        "share {} is at generation {}, not {expected}: read it again and retry",
        record.name, record.generation
    ))
}

/// Check a share record's invariants (see the module docs).
pub(super) fn check(record: &ShareRecord) -> Result<(), String> {
    if !record.members.contains(&record.hub) {
        return Err(format!("{}: hub {} is not a member", record.id, record.hub));
    }
    if record.members.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("{}: members {:?} are not distinct and sorted", record.id, record.members));
    }
    Ok(())
}

pub fn shares(store: &Store) -> Result<Vec<ShareRecord>, StoreError> {
    scan_store(store, SHARE)
}

pub fn share(store: &Store, id: ShareId) -> Result<Option<ShareRecord>, StoreError> {
    get_store(store, &id_key(id))
}

/// A share by name, `share-<id>` or `<id>`.
pub fn find_share(store: &Store, name_or_id: &str) -> Result<Option<ShareRecord>, StoreError> {
    match resolve_name(store, name_or_id, "share-", SHARENAME)? {
        Some(id) => share(store, ShareId(id)),
        None => Ok(None),
    }
}

pub fn query(store: &Store, q: &ShareQuery) -> Result<ShareQueryResult, StoreError> {
    Ok(match q {
        ShareQuery::Shares => ShareQueryResult::Shares(shares(store)?),
        ShareQuery::Share { name_or_id } => ShareQueryResult::Share(find_share(store, name_or_id)?),
    })
}

#[cfg(test)]
mod tests {
    use haven_proto::{CatalogCommand, CommandOutcome, HostRecord};
    use rocksdb::WriteBatch;

    use super::*;

    fn apply(store: &Store, cmd: ShareCommand) -> ShareOutcome {
        let mut batch = WriteBatch::default();
        let mut txn = CatalogTxn::new(store, &mut batch);
        let out = txn.apply(&CatalogCommand::Share(cmd)).unwrap();
        store.db().write(batch).unwrap();
        match out {
            CommandOutcome::Share(o) => o,
            other => panic!("not a share outcome: {other:?}"),
        }
    }

    fn store_with_hosts(n: u64) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut batch = WriteBatch::default();
        let mut txn = CatalogTxn::new(&store, &mut batch);
        for id in 1..=n {
            let host =
                HostRecord { id: NodeId(id), addr: format!("127.0.0.1:{}", 7000 + id), admin_addr: String::new() };
            txn.apply(&CatalogCommand::UpsertHost(host)).unwrap();
        }
        store.db().write(batch).unwrap();
        (dir, store)
    }

    fn created(out: ShareOutcome) -> ShareRecord {
        match out {
            ShareOutcome::Share(r) => r,
            other => panic!("refused: {other:?}"),
        }
    }

    #[test]
    fn create_move_and_resize_are_compare_and_sets_on_the_generation() {
        let (_dir, store) = store_with_hosts(3);
        let r = created(apply(&store, ShareCommand::Create { name: "s".into(), members: vec![NodeId(2), NodeId(1)] }));
        assert_eq!((r.hub, r.members.clone(), r.generation), (NodeId(2), vec![NodeId(1), NodeId(2)], 1));
        assert_eq!(find_share(&store, "s").unwrap(), Some(r.clone()));
        assert_eq!(find_share(&store, &r.id.to_string()).unwrap(), Some(r.clone()));

        let stale = apply(&store, ShareCommand::MoveHub { share: r.id, hub: NodeId(1), expected_generation: 0 });
        assert!(matches!(stale, ShareOutcome::Refused { not_found: false, .. }));
        let moved =
            created(apply(&store, ShareCommand::MoveHub { share: r.id, hub: NodeId(1), expected_generation: 1 }));
        assert_eq!((moved.hub, moved.generation), (NodeId(1), 2));
        let outsider = apply(&store, ShareCommand::MoveHub { share: r.id, hub: NodeId(3), expected_generation: 2 });
        assert!(matches!(outsider, ShareOutcome::Refused { .. }));

        // The hub (node-1) leaves: the member that stays (node-2) takes over, not the newcomer.
        let members = vec![NodeId(3), NodeId(2)];
        let resized = created(apply(&store, ShareCommand::SetMembers { share: r.id, members, expected_generation: 2 }));
        assert_eq!((resized.hub, resized.members, resized.generation), (NodeId(2), vec![NodeId(2), NodeId(3)], 3));
    }

    #[test]
    fn bad_input_is_refused_and_changes_nothing() {
        let (_dir, store) = store_with_hosts(2);
        let unknown_host =
            apply(&store, ShareCommand::Create { name: "s".into(), members: vec![NodeId(1), NodeId(9)] });
        assert!(matches!(unknown_host, ShareOutcome::Refused { .. }));
        assert!(shares(&store).unwrap().is_empty());
        created(apply(&store, ShareCommand::Create { name: "s".into(), members: vec![NodeId(1), NodeId(2)] }));
        let twice = apply(&store, ShareCommand::Create { name: "s".into(), members: vec![NodeId(1), NodeId(2)] });
        assert!(matches!(twice, ShareOutcome::Refused { .. }));
        let missing = apply(&store, ShareCommand::Delete { share: ShareId(99) });
        assert!(matches!(missing, ShareOutcome::Refused { not_found: true, .. }));
        assert_eq!(apply(&store, ShareCommand::Delete { share: ShareId(1) }), ShareOutcome::Deleted);
        assert_eq!(find_share(&store, "s").unwrap(), None);
    }
}
