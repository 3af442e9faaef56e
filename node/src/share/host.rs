//! The share driver: runs one [`Member`] state machine per share this node is a member of, and
//! does their I/O — durable state files (`share::files`), messages to the other members' share
//! actors (`actors::share`), the clock, and the catalog's share records.
//!
//! **Driver rules** (`share::core::member`): effects run in order; `Persist` writes the member's
//! state durably before anything after it, so no reply, round or acknowledgement is released for
//! state a crash could lose. Sends go out after the member's lock is released, each on its own
//! task; their replies come back through [`ShareHost::on_reply`]. A member's lock is held only
//! for the state machine step and its persist.
//!
//! Clients reach a share through any node ([`ShareHost::client`]): the request goes to the member
//! it names, else this node if it is a member, else the hub. A put is acknowledged once durable
//! at that member and reflected by the hub (`ShareAck::Hub`), or once every member holds it
//! (`ShareAck::AllMembers`). This module must not decide anything about diffs or rounds (the core
//! does) or touch the catalog except to read share records.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use haven_proto::share::{
    ShareAck, ShareMemberStatus, ShareMessage, ShareRecord, ShareReply, ShareRequest, ShareResponse,
};
use haven_proto::{ActorAddr, ActorKind, ActorMessage, ActorReply, NodeId, ShareId};
use tracing::{debug, info, warn};

use super::core::member::{Effect, Member, MemberError};
use super::error::ShareError;
use super::files::ShareFiles;
use crate::actors::ActorRegistry;
use crate::storage::Store;

/// How often the driver reads the share records and ticks every member (retransmissions).
const TICK: Duration = Duration::from_millis(50);
/// How long one message to another member may take before the driver stops waiting (the member
/// retransmits on its own schedule).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// A member writes a new snapshot once its journal holds this much (or twice its document).
const SNAPSHOT_AFTER_BYTES: u64 = 1 << 20;
/// How long an unknown share is looked for in this node's catalog before it counts as missing.
const CATALOG_LAG: Duration = Duration::from_millis(500);
/// Most a put waits for its acknowledgement, and a `Get` with `after_version` for a change.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// The address of `node`'s share actor (one per node; messages name their share).
pub fn actor(node: NodeId) -> ActorAddr {
    ActorAddr { node, kind: ActorKind::Share, id: 0 }
}

/// One share's member, and a counter bumped on every step that may change what waiters wait for.
struct Slot {
    member: tokio::sync::Mutex<Member>,
    progress: tokio::sync::watch::Sender<u64>,
}

impl Slot {
    fn bump(&self) {
        self.progress.send_modify(|p| *p += 1);
    }
}

pub struct ShareHost {
    node: NodeId,
    store: Store,
    registry: ActorRegistry,
    files: ShareFiles,
    slots: Mutex<BTreeMap<ShareId, Arc<Slot>>>,
    started: Instant,
    ack_timeout: Duration,
}

impl ShareHost {
    /// `ack_timeout`: how long a put waits for its acknowledgement by default.
    pub fn new(
        node: NodeId,
        store: Store,
        registry: ActorRegistry,
        data_dir: &std::path::Path,
        ack_timeout: Duration,
    ) -> Result<Arc<Self>, ShareError> {
        let files = ShareFiles::open(data_dir)?;
        Ok(Arc::new(Self {
            node,
            store,
            registry,
            files,
            slots: Mutex::default(),
            started: Instant::now(),
            ack_timeout,
        }))
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// `share`'s record in this node's catalog. A share created a moment ago may not be applied
    /// here yet (its creator heard back once the leader applied it), so an unknown share is
    /// looked for again for up to [`CATALOG_LAG`] before it is reported missing.
    async fn record(&self, share: ShareId) -> Result<ShareRecord, ShareError> {
        let give_up = Instant::now() + CATALOG_LAG;
        loop {
            if let Some(r) = crate::catalog::shares::share(&self.store, share).map_err(ShareError::internal)? {
                return Ok(r);
            }
            if Instant::now() >= give_up {
                return Err(ShareError::not_found(format!("{share} does not exist")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn slot(&self, share: ShareId) -> Option<Arc<Slot>> {
        self.slots.lock().expect("share slots lock").get(&share).cloned()
    }

    /// This node's member of `share`, created from the catalog if the driver has not yet.
    async fn member_slot(self: &Arc<Self>, share: ShareId) -> Result<Arc<Slot>, ShareError> {
        if let Some(slot) = self.slot(share) {
            return Ok(slot);
        }
        let record = self.record(share).await?;
        if !record.members.contains(&self.node) {
            return Err(ShareError::not_found(format!("{} is not a member of share {}", self.node, record.name)));
        }
        self.open_slot(&record)
    }

    /// Load (or start) this node's member of `record`'s share and keep it.
    fn open_slot(self: &Arc<Self>, record: &ShareRecord) -> Result<Arc<Slot>, ShareError> {
        let mut slots = self.slots.lock().expect("share slots lock");
        if let Some(slot) = slots.get(&record.id) {
            return Ok(slot.clone());
        }
        let member = self.load_member(record)?;
        info!(share = %record.id, name = %record.name, hub = %record.hub, "serving share");
        let (progress, _) = tokio::sync::watch::channel(0);
        let slot = Arc::new(Slot { member: tokio::sync::Mutex::new(member), progress });
        slots.insert(record.id, slot.clone());
        Ok(slot)
    }

    /// This node's member of `record`'s share as it was last persisted: the snapshot with the
    /// journal's events replayed on it (the same [`apply`] as when they first happened), or a
    /// new member, snapshotted at once so a journal always has the snapshot it applies to.
    fn load_member(&self, record: &ShareRecord) -> Result<Member, ShareError> {
        let Some(mut member) = self.files.load::<Member>(record.id)? else {
            let member = Member::new(self.node, record);
            self.files.snapshot(record.id, &member)?;
            return Ok(member);
        };
        if member.share != record.id || member.me != self.node {
            return Err(ShareError::internal(format!(
                "the state file of {} holds {} of {}",
                record.id, member.me, member.share
            )));
        }
        let events: Vec<Event> = self.files.journal(record.id)?;
        for event in &events {
            // An event that was refused when it happened is refused again and changes nothing.
            let _ = apply(&mut member, event);
        }
        // Times in the journal are the old process's; reset what only this process's clock means
        // (retransmission timers), as a restart does.
        let fresh = bincode::serialize(&member).and_then(|b| bincode::deserialize(&b)).map_err(ShareError::internal)?;
        info!(share = %record.id, replayed = events.len(), "share state loaded");
        Ok(fresh)
    }

    /// Run until the process ends: follow the catalog's share records and tick every member.
    pub async fn run(self: Arc<Self>) {
        loop {
            if let Err(e) = self.reconcile().await {
                warn!(error = %e, "share reconcile failed");
            }
            tokio::time::sleep(TICK).await;
        }
    }

    async fn reconcile(self: &Arc<Self>) -> Result<(), ShareError> {
        let records = crate::catalog::shares::shares(&self.store).map_err(ShareError::internal)?;
        let mine: BTreeMap<ShareId, ShareRecord> =
            records.into_iter().filter(|r| r.members.contains(&self.node)).map(|r| (r.id, r)).collect();
        self.forget_others(&mine)?;
        for record in mine.values() {
            let slot = self.open_slot(record)?;
            let event = Event::Record { record: record.clone(), now_ms: self.now_ms() };
            self.step(record.id, &slot, event).await?;
        }
        Ok(())
    }

    /// Drop the members of shares this node no longer belongs to (deleted, or removed from).
    fn forget_others(&self, mine: &BTreeMap<ShareId, ShareRecord>) -> Result<(), ShareError> {
        let gone: Vec<ShareId> = {
            let mut slots = self.slots.lock().expect("share slots lock");
            let gone: Vec<ShareId> = slots.keys().filter(|id| !mine.contains_key(id)).copied().collect();
            for id in &gone {
                slots.remove(id);
            }
            gone
        };
        for id in gone.into_iter().chain(self.files.saved()?.into_iter().filter(|id| !mine.contains_key(id))) {
            info!(share = %id, "no longer a member; dropping its copy");
            self.files.remove(id)?;
        }
        Ok(())
    }

    /// Run one event through the member under its lock, then its effects: persist (inside the
    /// lock, before anything is released), wake waiters, and send (after the lock). The member's
    /// reply to a message, if any. A refusal changes nothing and is returned as the error.
    async fn step(
        self: &Arc<Self>,
        share: ShareId,
        slot: &Arc<Slot>,
        event: Event,
    ) -> Result<Option<ShareReply>, StepError> {
        let (reply, sends) = {
            let mut member = slot.member.lock().await;
            let (reply, fx) = apply(&mut member, &event).map_err(StepError::Refused)?;
            match self.run_effects(share, &member, &event, fx).await {
                Ok(sends) => (reply, sends),
                Err(e) => {
                    // The change is in memory but not durable: drop this member, so the next
                    // event reloads it from its files as they are.
                    self.slots.lock().expect("share slots lock").remove(&share);
                    return Err(StepError::Host(e));
                }
            }
        };
        slot.bump();
        for (to, msg) in sends {
            self.dispatch(share, to, msg);
        }
        Ok(reply)
    }

    /// Persist and wake in order; hand back the sends.
    async fn run_effects(
        &self,
        share: ShareId,
        member: &Member,
        event: &Event,
        fx: Vec<Effect>,
    ) -> Result<Vec<(NodeId, ShareMessage)>, ShareError> {
        let mut sends = Vec::new();
        for effect in fx {
            match effect {
                Effect::Persist => self.persist(share, member, event).await?,
                Effect::Changed => metrics::counter!("haven_share_live_changes_total").increment(1),
                Effect::Send { to, msg } => sends.push((to, msg)),
            }
        }
        Ok(sends)
    }

    /// Make the step durable: append its event to the journal; once the journal has grown as
    /// large as the state, write a snapshot instead (which empties it).
    async fn persist(&self, share: ShareId, member: &Member, event: &Event) -> Result<(), ShareError> {
        let files = self.files.clone();
        let event = event.clone();
        let started = Instant::now();
        let journal_bytes = tokio::task::spawn_blocking(move || files.append(share, &event))
            .await
            .map_err(|e| ShareError::internal(format!("persist task failed: {e}")))??;
        if journal_bytes >= SNAPSHOT_AFTER_BYTES.max(member.live.bytes() * 2) {
            let (files, state) = (self.files.clone(), member.clone());
            tokio::task::spawn_blocking(move || files.snapshot(share, &state))
                .await
                .map_err(|e| ShareError::internal(format!("snapshot task failed: {e}")))??;
            metrics::counter!("haven_share_snapshots_total").increment(1);
        }
        metrics::histogram!("haven_share_persist_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Send `msg` to `to`'s share actor on a task of its own; its reply goes back to the member.
    fn dispatch(self: &Arc<Self>, share: ShareId, to: NodeId, msg: ShareMessage) {
        let host = self.clone();
        tokio::spawn(async move {
            let sent = host.registry.send_timeout(actor(to), ActorMessage::Share(msg), SEND_TIMEOUT).await;
            let reply = match sent {
                Ok(ActorReply::Share(reply)) => reply,
                Ok(other) => return warn!(%share, %to, ?other, "share actor answered with something else"),
                Err(e) => return debug!(%share, %to, error = %e, "share message not answered; the member retries"),
            };
            if let Err(e) = host.on_reply(share, to, reply).await {
                debug!(%share, %to, error = %e, "share reply not taken");
            }
        });
    }

    /// Another member's answer to a message this node sent.
    async fn on_reply(self: &Arc<Self>, share: ShareId, from: NodeId, reply: ShareReply) -> Result<(), ShareError> {
        let Some(slot) = self.slot(share) else { return Ok(()) };
        // A generation refusal needs nothing here: whoever is behind gets the newer record from
        // its catalog at its next reconcile.
        let event = Event::Reply { from, reply, now_ms: self.now_ms() };
        self.step(share, &slot, event).await.map(|_| ()).map_err(ShareError::from)
    }

    /// A message for this node's share actor.
    pub async fn handle(self: &Arc<Self>, msg: ShareMessage) -> Result<ShareReply, ShareError> {
        let share = msg.share();
        if let ShareMessage::Client(req) = msg {
            return self.local_client(req).await.map(ShareReply::Client);
        }
        let slot = self.member_slot(share).await?;
        let from = match &msg {
            ShareMessage::Sync(s) => s.spoke,
            ShareMessage::Reset { spoke, .. } => *spoke,
            // Pokes come from the hub (node-only, `authz`); the member ignores one that is not.
            _ => slot.member.lock().await.hub,
        };
        let event = Event::Message { from, msg, now_ms: self.now_ms() };
        match self.step(share, &slot, event).await {
            Ok(reply) => Ok(reply.unwrap_or(ShareReply::Poked)),
            // A refusal the sender's state machine acts on goes back as a reply, not an error.
            Err(StepError::Refused(e)) => match e.refusal() {
                Some(r) => Ok(ShareReply::Refused(r.into())),
                None => Err(ShareError::invalid(e.to_string())),
            },
            Err(StepError::Host(e)) => Err(e),
        }
    }

    /// A client's request that reached this node: answered here if this node is the member it
    /// goes to, else sent there. `Members` asks every member.
    pub async fn client(self: &Arc<Self>, req: ShareRequest) -> Result<ShareResponse, ShareError> {
        let record = self.record(req.share()).await?;
        if let ShareRequest::Members { .. } = req {
            return Ok(ShareResponse::Members(self.members_status(&record).await));
        }
        let named = match &req {
            ShareRequest::Put { member, .. } | ShareRequest::Get { member, .. } => *member,
            ShareRequest::Members { .. } => None,
        };
        let target = match named {
            Some(m) if !record.members.contains(&m) => {
                return Err(ShareError::invalid(format!("{m} is not a member of share {}", record.name)))
            }
            Some(m) => m,
            None if record.members.contains(&self.node) => self.node,
            None => record.hub,
        };
        if target == self.node {
            return self.local_client(req).await;
        }
        // The share actor of another member: a client request there is authorized as this node
        // relaying one `authz` already checked here.
        match self
            .registry
            .send_timeout(actor(target), ActorMessage::Share(ShareMessage::Client(req)), MAX_WAIT)
            .await?
        {
            ActorReply::Share(ShareReply::Client(r)) => Ok(r),
            other => Err(ShareError::internal(format!("{target}'s share actor answered {other:?}"))),
        }
    }

    /// Every member's status; one that does not answer is listed unreachable.
    async fn members_status(self: &Arc<Self>, record: &ShareRecord) -> Vec<ShareMemberStatus> {
        let asks = record.members.iter().map(|&m| async move {
            let asked = if m == self.node {
                self.own_status(record.id).await
            } else {
                let msg = ActorMessage::Share(ShareMessage::Client(ShareRequest::Members { share: record.id }));
                match self.registry.send_timeout(actor(m), msg, SEND_TIMEOUT).await {
                    Ok(ActorReply::Share(ShareReply::Client(ShareResponse::Members(mut s)))) if s.len() == 1 => s.pop(),
                    _ => None,
                }
            };
            asked.unwrap_or_else(|| unreachable_status(m))
        });
        futures::future::join_all(asks).await
    }

    async fn own_status(self: &Arc<Self>, share: ShareId) -> Option<ShareMemberStatus> {
        let slot = self.member_slot(share).await.ok()?;
        let status = slot.member.lock().await.status();
        Some(status)
    }

    /// A client's request answered by this node's member.
    async fn local_client(self: &Arc<Self>, req: ShareRequest) -> Result<ShareResponse, ShareError> {
        match req {
            ShareRequest::Members { share } => {
                Ok(ShareResponse::Members(self.own_status(share).await.into_iter().collect()))
            }
            ShareRequest::Get { share, key, after_version, wait_ms, .. } => {
                self.get(share, key, after_version, Duration::from_millis(wait_ms.into())).await
            }
            ShareRequest::Put { share, key, value, ack, .. } => self.put(share, key, value, ack).await,
        }
    }

    async fn get(
        self: &Arc<Self>,
        share: ShareId,
        key: Option<String>,
        after_version: Option<u64>,
        wait: Duration,
    ) -> Result<ShareResponse, ShareError> {
        let slot = self.member_slot(share).await?;
        if let Some(after) = after_version {
            // A watch: nothing newer yet is not an error, the caller asks again.
            let _ = self.wait_for(&slot, wait.min(MAX_WAIT), |m| m.live_version > after).await;
        }
        let m = slot.member.lock().await;
        let entries = match key {
            Some(k) => m.live.get(&k).map(|v| vec![(k.clone(), v.to_vec())]).unwrap_or_default(),
            None => m.live.entries(),
        };
        Ok(ShareResponse::Doc { member: self.node, live_version: m.live_version, entries })
    }

    async fn put(
        self: &Arc<Self>,
        share: ShareId,
        key: String,
        value: Option<Vec<u8>>,
        ack: ShareAck,
    ) -> Result<ShareResponse, ShareError> {
        let slot = self.member_slot(share).await?;
        let event = Event::Put { key: key.clone(), value: value.clone(), now_ms: self.now_ms() };
        self.step(share, &slot, event).await?;
        // At least the put's own version (a change right after it may be counted too: waiting for
        // that one as well is conservative).
        let version = slot.member.lock().await.live_version;
        let hub_acked = self.wait_for(&slot, self.ack_timeout, |m| m.hub_acked(version)).await;
        if !hub_acked {
            return Err(ShareError::Timeout(format!(
                "the change is durable on {} (version {version}) but the hub has not reflected it within {:?}; \
                 it will sync when the hub answers",
                self.node, self.ack_timeout
            )));
        }
        if ack == ShareAck::AllMembers {
            self.wait_all_members(share, &key, value.as_deref()).await?;
        }
        Ok(ShareResponse::Put { member: self.node, live_version: version })
    }

    /// Wait until every member's live copy holds `key` as `value` (each member persists before it
    /// answers, so holding it means durable there).
    async fn wait_all_members(
        self: &Arc<Self>,
        share: ShareId,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<(), ShareError> {
        let give_up = Instant::now() + self.ack_timeout;
        let record = self.record(share).await?;
        let mut missing: Vec<NodeId> = record.members.iter().copied().filter(|m| *m != self.node).collect();
        while !missing.is_empty() {
            let mut still = Vec::new();
            for m in missing {
                let get = ShareRequest::Get {
                    share,
                    member: Some(m),
                    key: Some(key.to_string()),
                    after_version: None,
                    wait_ms: 0,
                };
                let held = match self
                    .registry
                    .send_timeout(actor(m), ActorMessage::Share(ShareMessage::Client(get)), SEND_TIMEOUT)
                    .await
                {
                    Ok(ActorReply::Share(ShareReply::Client(ShareResponse::Doc { entries, .. }))) => {
                        entries.first().map(|(_, v)| v.as_slice()) == value
                    }
                    _ => false,
                };
                if !held {
                    still.push(m);
                }
            }
            missing = still;
            if missing.is_empty() {
                break;
            }
            if Instant::now() >= give_up {
                return Err(ShareError::Timeout(format!(
                    "the change is durable on {} and the hub, but {missing:?} do not hold it yet",
                    self.node
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Wait (at most `limit`) until `done` holds for the member; whether it did.
    async fn wait_for(&self, slot: &Arc<Slot>, limit: Duration, done: impl Fn(&Member) -> bool) -> bool {
        let give_up = tokio::time::Instant::now() + limit;
        let mut progress = slot.progress.subscribe();
        loop {
            if done(&*slot.member.lock().await) {
                return true;
            }
            if tokio::time::timeout_at(give_up, progress.changed()).await.is_err() {
                return done(&*slot.member.lock().await);
            }
        }
    }
}

/// One input to a member, as the journal records it. Replaying a member's journal through
/// [`apply`] on its snapshot rebuilds its state: the core is deterministic, and every event that
/// changes what it persists asks for `Persist` (the share model checks that).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum Event {
    /// The catalog's record (a newer generation changes roles), then a tick (retransmissions).
    Record { record: ShareRecord, now_ms: u64 },
    /// A client's change at this member (`None`: delete).
    Put { key: String, value: Option<Vec<u8>>, now_ms: u64 },
    /// Another member's round, reset request or poke.
    Message { from: NodeId, msg: ShareMessage, now_ms: u64 },
    /// Another member's answer to what this member sent.
    Reply { from: NodeId, reply: ShareReply, now_ms: u64 },
}

/// Run `event` through `member`: its reply (to a message) and effects, or its refusal (nothing
/// changed). The one place events meet the state machine, live and on replay.
fn apply(member: &mut Member, event: &Event) -> Result<(Option<ShareReply>, Vec<Effect>), MemberError> {
    match event {
        Event::Record { record, now_ms } => {
            let mut fx = member.on_record(record, *now_ms);
            fx.extend(member.tick(*now_ms));
            Ok((None, fx))
        }
        Event::Put { key, value, now_ms } => Ok((None, member.local_put(key, value.clone(), *now_ms)?)),
        Event::Message { from, msg, now_ms } => member.on_message(*from, msg, *now_ms),
        Event::Reply { from, reply, now_ms } => Ok((None, member.on_reply(*from, reply, *now_ms)?)),
    }
}

/// Why a step did not happen: the member refused the event (nothing changed), or the host
/// failed to persist it.
#[derive(Debug)]
enum StepError {
    Refused(MemberError),
    Host(ShareError),
}

impl From<StepError> for ShareError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Refused(e) => ShareError::invalid(e.to_string()),
            StepError::Host(e) => e,
        }
    }
}

fn unreachable_status(member: NodeId) -> ShareMemberStatus {
    ShareMemberStatus {
        member,
        reachable: false,
        hub: NodeId(0),
        generation: 0,
        live_version: 0,
        keys: 0,
        bytes: 0,
        digest: String::new(),
        in_sync: false,
        diffs_sent: 0,
        diffs_reflected: 0,
        echoes: 0,
        diff_payload_bytes_sent: 0,
    }
}
