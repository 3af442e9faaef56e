//! The catalog: the cluster's replicated state, applied from Raft log entries.
//!
//! This module owns the key layout in the `catalog` column family and the meaning of every
//! [`CatalogCommand`]. Applying is deterministic: it reads only catalog state (through a
//! [`CatalogTxn`] that sees its own earlier writes) and never clocks, randomness or the network,
//! so every replica computes the same outcome. Later issues add tables (volumes, plans, pairs, ...)
//! as new key prefixes here.
//!
//! Key layout:
//! - `kv/<key>` → value bytes (the generic namespace)
//! - `host/<id as 8 big-endian bytes>` → bincode of [`HostRecord`]
//! - volume tables: see [`volumes`]; VM tables: see [`vms`]; migration plans: see [`plans`];
//!   shares: see [`shares`]
//!
//! After every command, the invariants of the volume, VM and plan records it wrote are checked
//! ([`invariants`]); a violation is logged and counted (a panic in debug builds), never refused.

pub mod ha;
pub mod invariants;
pub mod plans;
pub mod shares;
pub mod vms;
pub mod volumes;

use std::collections::{BTreeMap, HashMap};

use haven_proto::{CatalogCommand, CatalogQuery, CommandOutcome, HostRecord, QueryResult};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use crate::raft::{decode, encode};
use crate::storage::{Store, StoreError, CF_CATALOG};

/// One catalog key and its value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// What a transaction held for a key before a command first wrote it: `Some(value)` if an earlier
/// command of the batch wrote it, `None` if none did (the store's value is still current).
type Earlier = Option<Option<Vec<u8>>>;

const KV_PREFIX: &[u8] = b"kv/";
const HOST_PREFIX: &[u8] = b"host/";

/// Largest number of entries one scan returns.
pub const MAX_SCAN: u32 = 10_000;

fn kv_key(key: &str) -> Vec<u8> {
    [KV_PREFIX, key.as_bytes()].concat()
}

pub(super) fn host_key(id: u64) -> Vec<u8> {
    [HOST_PREFIX, &id.to_be_bytes()[..]].concat()
}

/// A write transaction over the catalog: buffered writes into a batch, with reads that see the
/// transaction's own earlier writes.
pub struct CatalogTxn<'a> {
    store: &'a Store,
    batch: &'a mut WriteBatch,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// The watched keys ([`invariants::watched`]) the command being applied wrote, with what
    /// the transaction held for each before.
    written: BTreeMap<Vec<u8>, Earlier>,
}

impl<'a> CatalogTxn<'a> {
    pub fn new(store: &'a Store, batch: &'a mut WriteBatch) -> Self {
        Self { store, batch, overlay: HashMap::new(), written: BTreeMap::new() }
    }

    /// Remember what `key` held before the current command first writes it, if it is watched.
    fn note_write(&mut self, key: &[u8]) {
        if invariants::watched(key) && !self.written.contains_key(key) {
            self.written.insert(key.to_vec(), self.overlay.get(key).cloned());
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        Ok(self.store.db().get_cf(self.store.cf(CF_CATALOG), key)?)
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.note_write(&key);
        self.batch.put_cf(self.store.cf(CF_CATALOG), &key, &value);
        self.overlay.insert(key, Some(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.note_write(&key);
        self.batch.delete_cf(self.store.cf(CF_CATALOG), &key);
        self.overlay.insert(key, None);
    }

    /// A bincode record at `key`, seeing this transaction's own writes.
    fn get_as<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.get(key)?.map(|v| decode(&v).map_err(corrupt)).transpose()
    }

    fn put_as<T: serde::Serialize>(&mut self, key: Vec<u8>, value: &T) -> Result<(), StoreError> {
        let bytes = encode(value).map_err(corrupt)?;
        self.put(key, bytes);
        Ok(())
    }

    /// Every bincode record under `prefix`, in key order (see [`Self::scan`]).
    fn scan_as<T: serde::de::DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>, StoreError> {
        self.scan(prefix)?.into_iter().map(|(_, v)| decode(&v).map_err(corrupt)).collect()
    }

    /// The next id of `table` (1, 2, ...), from the counter at `counter/<table>`.
    fn next_id(&mut self, table: &str) -> Result<u64, StoreError> {
        let k = [b"counter/".as_slice(), table.as_bytes()].concat();
        let next = match self.get(&k)? {
            Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| corrupt(format!("counter {table}")))?),
            None => 1,
        };
        self.put(k, (next + 1).to_be_bytes().to_vec());
        Ok(next)
    }

    /// Every key under `prefix` with its value, in key order, including this transaction's own
    /// writes: Raft applies entries in batches whose boundaries differ between nodes, so a scan
    /// that missed earlier entries of its own batch would make replicas disagree.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let db = self.store.db();
        for item in db.iterator_cf(self.store.cf(CF_CATALOG), IteratorMode::From(prefix, Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            merged.insert(k.to_vec(), Some(v.to_vec()));
        }
        for (k, v) in &self.overlay {
            if k.starts_with(prefix) {
                merged.insert(k.clone(), v.clone());
            }
        }
        Ok(merged.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect())
    }

    /// Apply one command, then check the invariants of what it wrote. Commands were validated
    /// before they were proposed; a command that still fails here would fail identically on every
    /// replica, so it yields the same outcome everywhere rather than an error that would stall the
    /// state machine.
    ///
    /// A [`CatalogCommand::Batch`] applies its commands in order, each exactly as if it were an
    /// entry of its own (its own invariant check), and gives back their outcomes.
    pub fn apply(&mut self, cmd: &CatalogCommand) -> Result<CommandOutcome, StoreError> {
        if let CatalogCommand::Batch(commands) = cmd {
            return self.apply_batch(commands);
        }
        self.written.clear();
        let outcome = self.apply_command(cmd)?;
        self.check_invariants(cmd);
        Ok(outcome)
    }

    /// Report (never refuse: `cmd` is applied on every replica alike) a broken invariant among
    /// the records `cmd` wrote.
    fn check_invariants(&self, cmd: &CatalogCommand) {
        if self.written.is_empty() {
            return;
        }
        if let Err(violation) = self.changes().and_then(|changes| invariants::check(&changes, self)) {
            invariants::report(&violation, cmd);
        }
    }

    /// Decode and apply each command of a batch. An element that does not decode to a single
    /// command (the leader's proposer never makes one; the bytes are the same on every replica)
    /// changes nothing and yields `Internal`; a batch inside a batch is not opened, so applying
    /// never recurses.
    fn apply_batch(&mut self, commands: &[Vec<u8>]) -> Result<CommandOutcome, StoreError> {
        let mut outcomes = Vec::with_capacity(commands.len());
        for bytes in commands {
            let outcome = match decode::<CatalogCommand>(bytes) {
                Ok(CatalogCommand::Batch(_)) | Err(_) => CommandOutcome::Internal,
                Ok(command) => self.apply(&command)?,
            };
            outcomes.push(encode(&outcome).map_err(corrupt)?);
        }
        Ok(CommandOutcome::Batch(outcomes))
    }

    fn apply_command(&mut self, cmd: &CatalogCommand) -> Result<CommandOutcome, StoreError> {
        Ok(match cmd {
            CatalogCommand::KvPut { key, value } => {
                let k = kv_key(key);
                let previous = self.get(&k)?;
                self.put(k, value.clone());
                CommandOutcome::Put { previous }
            }
            CatalogCommand::KvDelete { key } => {
                let k = kv_key(key);
                let existed = self.get(&k)?.is_some();
                self.delete(k);
                CommandOutcome::Deleted { existed }
            }
            CatalogCommand::KvCas { key, expected, new } => {
                let k = kv_key(key);
                let current = self.get(&k)?;
                if current == *expected {
                    match new {
                        Some(v) => self.put(k, v.clone()),
                        None => self.delete(k),
                    }
                    CommandOutcome::Cas { succeeded: true, current: new.clone() }
                } else {
                    CommandOutcome::Cas { succeeded: false, current }
                }
            }
            CatalogCommand::UpsertHost(host) => {
                let bytes = encode(host).map_err(|reason| StoreError::Corrupt { cf: CF_CATALOG, reason })?;
                self.put(host_key(host.id.0), bytes);
                CommandOutcome::Host
            }
            CatalogCommand::RemoveHost { id } => {
                self.delete(host_key(id.0));
                CommandOutcome::Host
            }
            CatalogCommand::Volume(v) => CommandOutcome::Volume(self.apply_volume(v)?),
            CatalogCommand::Vm(v) => CommandOutcome::Vm(self.apply_vm(v)?),
            CatalogCommand::Plan(p) => CommandOutcome::Plan(self.apply_plan(p)?),
            CatalogCommand::Share(s) => CommandOutcome::Share(self.apply_share(s)?),
            CatalogCommand::Ha(h) => CommandOutcome::Ha(self.apply_ha(h)?),
            // `apply` takes batches apart before they get here.
            CatalogCommand::Batch(commands) => self.apply_batch(commands)?,
        })
    }
}

/// Answer a query from applied state.
pub fn query(store: &Store, q: &CatalogQuery) -> Result<QueryResult, StoreError> {
    let db = store.db();
    let cf = store.cf(CF_CATALOG);
    Ok(match q {
        CatalogQuery::KvGet { key } => QueryResult::Value(db.get_cf(cf, kv_key(key))?),
        CatalogQuery::KvScan { prefix, limit } => {
            let start = kv_key(prefix);
            let mut out = Vec::new();
            for item in db.iterator_cf(cf, IteratorMode::From(&start, Direction::Forward)) {
                let (k, v) = item?;
                if !k.starts_with(&start) || out.len() as u32 >= (*limit).min(MAX_SCAN) {
                    break;
                }
                let key = String::from_utf8_lossy(&k[KV_PREFIX.len()..]).into_owned();
                out.push((key, v.to_vec()));
            }
            QueryResult::Entries(out)
        }
        CatalogQuery::Hosts => QueryResult::Hosts(hosts(store)?),
        CatalogQuery::Volume(q) => QueryResult::Volume(volumes::query(store, q)?),
        CatalogQuery::Vm(q) => QueryResult::Vm(vms::query(store, q)?),
        CatalogQuery::Plan(q) => QueryResult::Plan(plans::query(store, q)?),
        CatalogQuery::Share(q) => QueryResult::Share(shares::query(store, q)?),
        CatalogQuery::Ha(q) => QueryResult::Ha(ha::query(store, q)?),
    })
}

/// Every recorded host, in id order.
pub fn hosts(store: &Store) -> Result<Vec<HostRecord>, StoreError> {
    scan_store(store, HOST_PREFIX)
}

fn corrupt(reason: String) -> StoreError {
    StoreError::Corrupt { cf: CF_CATALOG, reason }
}

/// Every applied bincode record under `prefix`, in key order.
fn scan_store<T: serde::de::DeserializeOwned>(store: &Store, prefix: &[u8]) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for item in store.db().iterator_cf(store.cf(CF_CATALOG), IteratorMode::From(prefix, Direction::Forward)) {
        let (k, v) = item?;
        if !k.starts_with(prefix) {
            break;
        }
        out.push(decode(&v).map_err(corrupt)?);
    }
    Ok(out)
}

/// Resolve `name_or_id` for a table whose ids print as `<id_prefix><n>` and whose names are
/// indexed at `<name_index><name>` → id (big-endian): `vol-7`, `7` and `disk1` all work.
fn resolve_name(
    store: &Store,
    name_or_id: &str,
    id_prefix: &str,
    name_index: &[u8],
) -> Result<Option<u64>, StoreError> {
    let digits = name_or_id.strip_prefix(id_prefix).unwrap_or(name_or_id);
    if let Ok(id) = digits.parse::<u64>() {
        return Ok(Some(id));
    }
    let key = [name_index, name_or_id.as_bytes()].concat();
    match store.db().get_cf(store.cf(CF_CATALOG), key)? {
        Some(v) => {
            let bytes = v.as_slice().try_into().map_err(|_| corrupt(format!("name index entry for {name_or_id:?}")))?;
            Ok(Some(u64::from_be_bytes(bytes)))
        }
        None => Ok(None),
    }
}

/// One applied bincode record.
fn get_store<T: serde::de::DeserializeOwned>(store: &Store, key: &[u8]) -> Result<Option<T>, StoreError> {
    store.db().get_cf(store.cf(CF_CATALOG), key)?.map(|v| decode(&v).map_err(corrupt)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply_all(store: &Store, cmds: &[CatalogCommand]) -> Vec<CommandOutcome> {
        let mut batch = WriteBatch::default();
        let mut txn = CatalogTxn::new(store, &mut batch);
        let out = cmds.iter().map(|c| txn.apply(c).unwrap()).collect();
        store.db().write(batch).unwrap();
        out
    }

    #[test]
    fn cas_sees_earlier_writes_in_the_same_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let out = apply_all(
            &store,
            &[
                CatalogCommand::KvPut { key: "a".into(), value: b"1".to_vec() },
                CatalogCommand::KvCas { key: "a".into(), expected: Some(b"1".to_vec()), new: Some(b"2".to_vec()) },
                CatalogCommand::KvCas { key: "a".into(), expected: Some(b"1".to_vec()), new: Some(b"3".to_vec()) },
                CatalogCommand::KvDelete { key: "b".into() },
            ],
        );
        assert_eq!(out[0], CommandOutcome::Put { previous: None });
        assert_eq!(out[1], CommandOutcome::Cas { succeeded: true, current: Some(b"2".to_vec()) });
        assert_eq!(out[2], CommandOutcome::Cas { succeeded: false, current: Some(b"2".to_vec()) });
        assert_eq!(out[3], CommandOutcome::Deleted { existed: false });
        assert_eq!(
            query(&store, &CatalogQuery::KvGet { key: "a".into() }).unwrap(),
            QueryResult::Value(Some(b"2".to_vec()))
        );
    }

    #[test]
    fn a_batch_applies_like_its_commands_one_entry_each() {
        let cmds = vec![
            CatalogCommand::KvPut { key: "a".into(), value: b"1".to_vec() },
            CatalogCommand::KvCas { key: "a".into(), expected: Some(b"1".to_vec()), new: Some(b"2".to_vec()) },
            CatalogCommand::KvCas { key: "a".into(), expected: Some(b"1".to_vec()), new: Some(b"3".to_vec()) },
            CatalogCommand::KvDelete { key: "b".into() },
        ];
        let (one, each) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (batched, separate) = (Store::open(one.path()).unwrap(), Store::open(each.path()).unwrap());
        let encoded = cmds.iter().map(|c| encode(c).unwrap()).collect();
        let out = apply_all(&batched, &[CatalogCommand::Batch(encoded)]);
        let expected = apply_all(&separate, &cmds).iter().map(|o| encode(o).unwrap()).collect();
        assert_eq!(out, vec![CommandOutcome::Batch(expected)]);
        let get = |store: &Store| query(store, &CatalogQuery::KvGet { key: "a".into() }).unwrap();
        assert_eq!(get(&batched), QueryResult::Value(Some(b"2".to_vec())));
        assert_eq!(get(&batched), get(&separate));

        // Bytes that are not one command, or a batch inside a batch: no effect, `Internal`.
        let put = CatalogCommand::KvPut { key: "c".into(), value: b"9".to_vec() };
        let inner = encode(&CatalogCommand::Batch(vec![encode(&put).unwrap()])).unwrap();
        let out = apply_all(&batched, &[CatalogCommand::Batch(vec![vec![0xFF; 3], inner])]);
        let internal = encode(&CommandOutcome::Internal).unwrap();
        assert_eq!(out, vec![CommandOutcome::Batch(vec![internal.clone(), internal])]);
        let c = query(&batched, &CatalogQuery::KvGet { key: "c".into() }).unwrap();
        assert_eq!(c, QueryResult::Value(None));
    }

    #[test]
    fn scan_stays_inside_prefix_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cmds: Vec<_> = ["x/1", "x/2", "x/3", "y/1"]
            .iter()
            .map(|k| CatalogCommand::KvPut { key: k.to_string(), value: vec![1] })
            .collect();
        apply_all(&store, &cmds);
        let QueryResult::Entries(e) = query(&store, &CatalogQuery::KvScan { prefix: "x/".into(), limit: 2 }).unwrap()
        else {
            panic!("wrong result kind")
        };
        assert_eq!(e.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["x/1", "x/2"]);
    }
}
