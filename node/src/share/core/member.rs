//! One member of one share: the state machine the share driver runs. Events come in (a catalog
//! record, a local put, a peer's message or reply, a tick with the time), [`Effect`]s go out
//! (persist, send, wake watchers). The hub of the record's generation keeps a [`HubChannel`] per
//! spoke; every other member is a [`Spoke`] of it.
//!
//! Driver rules: run the effects in order; `Persist` makes the whole `Member` durable, and it
//! comes before any `Send` or reply that depends on it (a round's number and diff, a hub's
//! reflected change) — release nothing before it is done. Replies that come back go to
//! [`Member::on_reply`], refusals (errors whose [`MemberError::refusal`] is `Some`) to
//! [`Member::on_refused`].
//!
//! This module owns the roles, the generation check, retransmission and the counters. It must not
//! do I/O, read a clock (time comes in as `now_ms`), or reach the catalog (records come in).

use std::collections::BTreeMap;

use haven_proto::ids::{NodeId, ShareId};
use haven_proto::share::{
    ShareDiff, ShareMemberStatus, ShareMessage, ShareRecord, ShareRefusal, ShareReply, SyncReply, SyncRequest,
};
use serde::{Deserialize, Serialize};

use super::channel::{ChannelError, HubChannel, Round, Spoke};
use super::doc::{payload_bytes, Applied, Doc, LocalEdits, PatchError};

/// A spoke resends its round (or its reset request), and the hub re-pokes a spoke that is out of
/// sync, after this long without an answer.
pub const RETRANSMIT_MS: u64 = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Spoke(Spoke),
    /// One channel per other member.
    Hub(BTreeMap<NodeId, HubChannel>),
}

/// Running totals, kept across role changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Non-empty diffs sent (rounds and replies).
    pub diffs_sent: u64,
    /// Non-empty diffs from a peer applied to the live copy.
    pub diffs_reflected: u64,
    /// Ops of outbound diffs that set a key back to what that peer had sent (must stay 0).
    pub echoes: u64,
    pub diff_payload_bytes_sent: u64,
    /// Ops a fuzzy apply skipped.
    pub conflicts: u64,
    /// Resets this member went through (as a spoke) or served (as the hub).
    pub resets: u64,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Make the whole member durable before anything after it (and before the reply).
    Persist,
    /// The live copy changed: wake watchers.
    Changed,
    Send {
        to: NodeId,
        msg: ShareMessage,
    },
}

/// Why a member refused an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberError {
    #[error("message for {theirs}, this member holds {ours}")]
    WrongShare { ours: ShareId, theirs: ShareId },
    #[error("message of generation {theirs}, this member is at generation {ours}: refresh the share record")]
    Generation { ours: u64, theirs: u64 },
    #[error("{me} is not the hub of this share, {hub} is")]
    NotHub { me: NodeId, hub: NodeId },
    #[error("{me} is the hub of this share, not a spoke")]
    NotSpoke { me: NodeId },
    #[error("{node} is not a spoke of this share")]
    NotMember { node: NodeId },
    #[error("message from {from} names {named} as its sender")]
    WrongSender { from: NodeId, named: NodeId },
    #[error("client requests are answered by the share driver")]
    ClientRequest,
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Patch(#[from] PatchError),
}

/// What the sender of a refused message must know (the driver carries it back as
/// `ShareReply::Refused`; [`Member::on_reply`] takes it there too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The refusing member is at `generation`: whoever is behind refreshes the record.
    Generation { generation: u64 },
    /// The round does not fit the hub's shadow: the spoke resets.
    Diverged { round: u64 },
    /// The refusing member is not the hub (the sender's record is stale or the receiver's is).
    NotHub,
}

impl From<ShareRefusal> for Refusal {
    fn from(r: ShareRefusal) -> Self {
        match r {
            ShareRefusal::Generation { generation } => Self::Generation { generation },
            ShareRefusal::Diverged { round } => Self::Diverged { round },
            ShareRefusal::NotHub => Self::NotHub,
        }
    }
}

impl From<Refusal> for ShareRefusal {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Generation { generation } => Self::Generation { generation },
            Refusal::Diverged { round } => Self::Diverged { round },
            Refusal::NotHub => Self::NotHub,
        }
    }
}

impl MemberError {
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            Self::Generation { ours, .. } => Some(Refusal::Generation { generation: *ours }),
            // A round older than the one answered last and not cached: the hub can never answer
            // it (a reset came between). If it is the spoke's round in flight the spoke must
            // reset; if the spoke moved on, it ignores this.
            Self::Channel(ChannelError::Diverged { round, .. } | ChannelError::Stale { round, .. }) => {
                Some(Refusal::Diverged { round: *round })
            }
            Self::NotHub { .. } => Some(Refusal::NotHub),
            _ => None,
        }
    }
}

/// One member of one share. Persisted whole by the driver at every [`Effect::Persist`].
///
/// **Invariants:** `live_version` grows by one on every change of `live`; `generation` only
/// grows; round numbers (`next_round`, carried across roles) only grow, so a late reply never
/// matches a newer round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub me: NodeId,
    pub share: ShareId,
    pub generation: u64,
    pub hub: NodeId,
    pub members: Vec<NodeId>,
    pub live: Doc,
    pub live_version: u64,
    /// This member's own edits not overtaken yet: what it re-applies when it resets.
    pub local: LocalEdits,
    pub role: Role,
    /// The next round number, for a spoke started later (the spoke's own counter is ahead of it
    /// while this member is a spoke).
    pub next_round: u64,
    pub counters: Counters,
    /// When this member last sent a round or a reset request (volatile: a restart resends).
    #[serde(skip)]
    pub last_sent_ms: Option<u64>,
}

impl Member {
    pub fn new(me: NodeId, record: &ShareRecord) -> Self {
        let mut m = Self {
            me,
            share: record.id,
            generation: record.generation,
            hub: record.hub,
            members: record.members.clone(),
            live: Doc::new(),
            live_version: 0,
            local: LocalEdits::default(),
            role: Role::Hub(BTreeMap::new()),
            next_round: 1,
            counters: Counters::default(),
            last_sent_ms: None,
        };
        m.role = if record.hub == me { Role::Hub(m.fresh_channels()) } else { Role::Spoke(m.new_spoke()) };
        m
    }

    fn fresh_channels(&self) -> BTreeMap<NodeId, HubChannel> {
        self.spokes().map(|n| (n, HubChannel::new(self.generation))).collect()
    }

    /// The other members.
    fn spokes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members.iter().copied().filter(move |n| *n != self.me)
    }

    fn new_spoke(&self) -> Spoke {
        Spoke::resetting(self.generation << 32, self.next_round, self.live_version)
    }

    pub fn is_hub(&self) -> bool {
        matches!(self.role, Role::Hub(_))
    }

    pub fn needs_reset(&self) -> bool {
        matches!(&self.role, Role::Spoke(s) if s.needs_reset())
    }

    /// A spoke: live copy equal to the shadow agreed with the hub, no round in flight. The hub:
    /// every spoke has reset and agreed on the live copy.
    pub fn in_sync(&self) -> bool {
        match &self.role {
            Role::Spoke(s) => s.in_sync(&self.live),
            Role::Hub(channels) => self.spokes().all(|n| channels.get(&n).is_some_and(|c| c.in_sync(&self.live))),
        }
    }

    /// Whether the change that made `live_version` is reflected (durably) by the hub: on the hub
    /// at once, on a spoke once a round covering it completed (`ShareAck::Hub`).
    pub fn hub_acked(&self, live_version: u64) -> bool {
        match &self.role {
            Role::Hub(_) => true,
            Role::Spoke(s) => s.synced_live_version >= live_version,
        }
    }

    /// On the hub: its `live_version` that `spoke` last agreed on (`ShareAck::AllMembers` waits
    /// for every spoke to pass the put's version).
    pub fn agreed_live_version(&self, spoke: NodeId) -> Option<u64> {
        match &self.role {
            Role::Hub(channels) => channels.get(&spoke).and_then(|c| c.agreed_live_version),
            Role::Spoke(_) => None,
        }
    }

    pub fn status(&self) -> ShareMemberStatus {
        ShareMemberStatus {
            member: self.me,
            reachable: true,
            hub: self.hub,
            generation: self.generation,
            live_version: self.live_version,
            keys: self.live.len() as u64,
            bytes: self.live.bytes(),
            digest: self.live.digest(),
            in_sync: self.in_sync(),
            diffs_sent: self.counters.diffs_sent,
            diffs_reflected: self.counters.diffs_reflected,
            echoes: self.counters.echoes,
            diff_payload_bytes_sent: self.counters.diff_payload_bytes_sent,
        }
    }

    // ---- catalog ----------------------------------------------------------------------------

    /// A record of a newer generation: take the new hub and members and start over with them.
    /// The hub starts fresh channels (every spoke resets); every other member becomes a spoke
    /// that resets with the hub, re-applying its own edits (see [`Spoke::on_reset`]). Even a
    /// hub that stays starts over: a member may skip generations, so its channel with a hub it
    /// knew two generations ago says nothing about what that hub holds now. Older records:
    /// nothing.
    pub fn on_record(&mut self, record: &ShareRecord, now_ms: u64) -> Vec<Effect> {
        if record.id != self.share || record.generation <= self.generation {
            return Vec::new();
        }
        if let Role::Spoke(s) = &self.role {
            self.next_round = self.next_round.max(s.next_round);
        }
        let synced = match &self.role {
            Role::Spoke(s) => s.synced_live_version,
            Role::Hub(_) => self.live_version,
        };
        self.generation = record.generation;
        self.hub = record.hub;
        self.members = record.members.clone();
        self.role = if record.hub == self.me {
            Role::Hub(self.fresh_channels())
        } else {
            let mut s = self.new_spoke();
            s.synced_live_version = synced;
            Role::Spoke(s)
        };
        self.last_sent_ms = None;
        let mut fx = vec![Effect::Persist];
        fx.extend(self.tick(now_ms));
        fx
    }

    // ---- local changes ----------------------------------------------------------------------

    /// Set `key` to `value` (`None`: delete) in the live copy; on error nothing changed. A spoke
    /// then starts a round (if none is in flight); the hub pokes every spoke out of sync.
    pub fn local_put(&mut self, key: &str, value: Option<Vec<u8>>, now_ms: u64) -> Result<Vec<Effect>, MemberError> {
        let old = self.live.get(key).map(<[u8]>::to_vec);
        if !self.live.set(key, value)? {
            return Ok(Vec::new());
        }
        self.live_version += 1;
        self.local.record(key, old.as_deref(), self.live.get(key), self.live_version);
        let mut fx = vec![Effect::Persist, Effect::Changed];
        match &self.role {
            Role::Spoke(_) => fx.extend(self.start_round(false, now_ms)),
            Role::Hub(_) => fx.extend(self.poke_out_of_sync(None, now_ms)),
        }
        Ok(move_persist_first(fx))
    }

    // ---- messages ---------------------------------------------------------------------------

    /// A peer's message. Returns the reply to release (after the effects' `Persist`). Client
    /// requests are the driver's, not this state machine's.
    pub fn on_message(
        &mut self,
        from: NodeId,
        msg: &ShareMessage,
        now_ms: u64,
    ) -> Result<(Option<ShareReply>, Vec<Effect>), MemberError> {
        if msg.share() != self.share {
            return Err(MemberError::WrongShare { ours: self.share, theirs: msg.share() });
        }
        match msg {
            ShareMessage::Client(_) => Err(MemberError::ClientRequest),
            ShareMessage::Sync(req) => {
                self.check_generation(req.generation)?;
                self.on_sync(from, req, now_ms)
            }
            ShareMessage::Reset { generation, spoke, .. } => {
                self.check_generation(*generation)?;
                if *spoke != from {
                    return Err(MemberError::WrongSender { from, named: *spoke });
                }
                self.on_reset_request(from)
            }
            ShareMessage::Poke { generation, .. } => {
                self.check_generation(*generation)?;
                self.on_poke(from, now_ms)
            }
        }
    }

    fn check_generation(&self, theirs: u64) -> Result<(), MemberError> {
        match theirs == self.generation {
            true => Ok(()),
            false => Err(MemberError::Generation { ours: self.generation, theirs }),
        }
    }

    /// The hub's channel with `from` (the hub has one for every other member of its record).
    fn hub_channel(role: &mut Role, from: NodeId, me: NodeId, hub: NodeId) -> Result<&mut HubChannel, MemberError> {
        match role {
            Role::Hub(channels) => channels.get_mut(&from).ok_or(MemberError::NotMember { node: from }),
            Role::Spoke(_) => Err(MemberError::NotHub { me, hub }),
        }
    }

    /// The hub reflects a spoke's round and answers; if its live copy changed, it pokes the
    /// other spokes out of sync (never the sender: its change is already in its shadow).
    fn on_sync(
        &mut self,
        from: NodeId,
        req: &SyncRequest,
        now_ms: u64,
    ) -> Result<(Option<ShareReply>, Vec<Effect>), MemberError> {
        if req.spoke != from {
            return Err(MemberError::WrongSender { from, named: req.spoke });
        }
        let ch = Self::hub_channel(&mut self.role, from, self.me, self.hub)?;
        let fresh = req.round > ch.highest_round;
        let echoes = ch.echoes;
        let (reply, applied) =
            ch.on_request(&mut self.live, self.live_version, req.round, req.base_version, &req.diff)?;
        if !fresh {
            return Ok((Some(ShareReply::Synced(reply)), Vec::new()));
        }
        self.counters.echoes += ch.echoes - echoes;
        ch.poked_at_ms = None;
        self.count_reflected(&req.diff, &applied);
        self.count_sent(&reply.diff);
        let mut fx = vec![Effect::Persist];
        if applied.changed() {
            self.live_version += 1;
            self.local.overtaken(&applied.changed_keys, u64::MAX);
            fx.push(Effect::Changed);
            fx.extend(self.poke_out_of_sync(Some(from), now_ms));
        }
        Ok((Some(ShareReply::Synced(reply)), fx))
    }

    fn on_reset_request(&mut self, from: NodeId) -> Result<(Option<ShareReply>, Vec<Effect>), MemberError> {
        let ch = Self::hub_channel(&mut self.role, from, self.me, self.hub)?;
        let (version, entries) = ch.on_reset(&self.live, self.live_version);
        ch.poked_at_ms = None;
        self.counters.resets += 1;
        Ok((Some(ShareReply::Reset { version, entries }), vec![Effect::Persist]))
    }

    fn on_poke(&mut self, from: NodeId, now_ms: u64) -> Result<(Option<ShareReply>, Vec<Effect>), MemberError> {
        let Role::Spoke(spoke) = &self.role else {
            return Err(MemberError::NotSpoke { me: self.me });
        };
        if from != self.hub {
            return Ok((Some(ShareReply::Poked), Vec::new()));
        }
        let fx = match spoke.needs_reset() {
            true => self.request_reset(now_ms),
            false => move_persist_first(self.start_round(true, now_ms)),
        };
        Ok((Some(ShareReply::Poked), fx))
    }

    // ---- replies ----------------------------------------------------------------------------

    /// The hub's answer to this spoke's round or reset request. Late duplicates and answers from
    /// a member that is not (or no longer) the hub are ignored.
    pub fn on_reply(&mut self, from: NodeId, reply: &ShareReply, now_ms: u64) -> Result<Vec<Effect>, MemberError> {
        if from != self.hub || self.is_hub() {
            return Ok(Vec::new());
        }
        let fx = match reply {
            ShareReply::Synced(r) => self.on_synced(r, now_ms),
            ShareReply::Reset { version, entries } => self.on_reset_reply(*version, entries, now_ms)?,
            ShareReply::Refused(r) => self.on_refused(from, Refusal::from(*r), now_ms),
            ShareReply::Poked | ShareReply::Client(_) => Vec::new(),
        };
        Ok(move_persist_first(fx))
    }

    fn spoke_mut(&mut self) -> Option<&mut Spoke> {
        match &mut self.role {
            Role::Spoke(s) => Some(s),
            Role::Hub(_) => None,
        }
    }

    fn on_synced(&mut self, reply: &SyncReply, now_ms: u64) -> Vec<Effect> {
        let Role::Spoke(spoke) = &mut self.role else { return Vec::new() };
        if spoke.pending.as_ref().is_none_or(|p| p.round.round != reply.round) {
            return Vec::new();
        }
        let echoes = spoke.echoes;
        let result = spoke.on_reply(&mut self.live, reply);
        self.counters.echoes += spoke.echoes - echoes;
        let synced = spoke.synced_live_version;
        let Ok(applied) = result else {
            self.counters.resets += 1;
            self.last_sent_ms = None;
            let mut fx = vec![Effect::Persist];
            fx.extend(self.request_reset(now_ms));
            return fx;
        };
        self.last_sent_ms = None;
        self.count_reflected(&reply.diff, &applied);
        let mut fx = vec![Effect::Persist];
        if applied.changed() {
            self.live_version += 1;
            self.local.overtaken(&applied.changed_keys, synced);
            fx.push(Effect::Changed);
        }
        fx.extend(self.start_round(false, now_ms));
        fx
    }

    fn on_reset_reply(
        &mut self,
        version: u64,
        entries: &[(String, Vec<u8>)],
        now_ms: u64,
    ) -> Result<Vec<Effect>, MemberError> {
        let Role::Spoke(spoke) = &mut self.role else { return Ok(Vec::new()) };
        if !spoke.wants_reset(version) {
            return Ok(Vec::new());
        }
        let hub_doc = Doc::from_entries(entries.to_vec())?;
        let applied = spoke.on_reset(&mut self.live, version, hub_doc, &self.local);
        self.last_sent_ms = None;
        self.counters.resets += 1;
        self.counters.conflicts += applied.conflicts;
        let mut fx = vec![Effect::Persist];
        if applied.changed() {
            self.live_version += 1;
            fx.push(Effect::Changed);
        }
        fx.extend(self.start_round(false, now_ms));
        Ok(fx)
    }

    /// A peer refused this member's message. Only a diverged round matters here: the spoke drops
    /// its shadow and resets. (A generation refusal is the driver's: it refreshes the record.)
    pub fn on_refused(&mut self, from: NodeId, refusal: Refusal, now_ms: u64) -> Vec<Effect> {
        let Refusal::Diverged { round } = refusal else { return Vec::new() };
        if from != self.hub {
            return Vec::new();
        }
        let Some(spoke) = self.spoke_mut() else { return Vec::new() };
        if spoke.pending.as_ref().is_none_or(|p| p.round.round != round) {
            return Vec::new();
        }
        spoke.diverge();
        self.counters.resets += 1;
        let mut fx = vec![Effect::Persist];
        fx.extend(self.request_reset(now_ms));
        fx
    }

    // ---- time -------------------------------------------------------------------------------

    /// Retransmit what went unanswered for [`RETRANSMIT_MS`]: a spoke its round or its reset
    /// request (or it starts a round if its live copy moved without one); the hub its pokes.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        match &self.role {
            Role::Hub(_) => self.poke_out_of_sync(None, now_ms),
            Role::Spoke(s) if s.needs_reset() => self.request_reset(now_ms),
            Role::Spoke(s) => match s.pending_request() {
                Some(round) if self.due(now_ms) => {
                    let msg = self.sync_message(round);
                    self.last_sent_ms = Some(now_ms);
                    vec![Effect::Send { to: self.hub, msg }]
                }
                Some(_) => Vec::new(),
                None => move_persist_first(self.start_round(false, now_ms)),
            },
        }
    }

    fn due(&self, now_ms: u64) -> bool {
        self.last_sent_ms.is_none_or(|t| now_ms >= t + RETRANSMIT_MS)
    }

    // ---- helpers ----------------------------------------------------------------------------

    fn request_reset(&mut self, now_ms: u64) -> Vec<Effect> {
        if !self.due(now_ms) {
            return Vec::new();
        }
        self.last_sent_ms = Some(now_ms);
        let msg = ShareMessage::Reset { share: self.share, generation: self.generation, spoke: self.me };
        vec![Effect::Send { to: self.hub, msg }]
    }

    fn sync_message(&self, round: &Round) -> ShareMessage {
        ShareMessage::Sync(SyncRequest {
            share: self.share,
            generation: self.generation,
            spoke: self.me,
            round: round.round,
            base_version: round.base_version,
            diff: round.diff.clone(),
        })
    }

    /// A spoke starts a round if it should (see [`Spoke::poll`]): `[Persist, Send]`.
    fn start_round(&mut self, force: bool, now_ms: u64) -> Vec<Effect> {
        let (live, live_version) = (&self.live, self.live_version);
        let Role::Spoke(spoke) = &mut self.role else { return Vec::new() };
        let echoes = spoke.echoes;
        let Some(round) = spoke.poll(live, live_version, force) else { return Vec::new() };
        self.counters.echoes += spoke.echoes - echoes;
        self.count_sent(&round.diff);
        self.last_sent_ms = Some(now_ms);
        vec![Effect::Persist, Effect::Send { to: self.hub, msg: self.sync_message(&round) }]
    }

    /// The hub pokes every spoke (but `except`) whose channel has not agreed on the current live
    /// copy or whose reset no round confirmed yet, at most once per [`RETRANSMIT_MS`] each.
    fn poke_out_of_sync(&mut self, except: Option<NodeId>, now_ms: u64) -> Vec<Effect> {
        let (live_version, share, generation) = (self.live_version, self.share, self.generation);
        let Role::Hub(channels) = &mut self.role else { return Vec::new() };
        let mut fx = Vec::new();
        for (node, ch) in channels.iter_mut() {
            let behind = ch.agreed_live_version != Some(live_version) || ch.reset_unconfirmed;
            let due = ch.poked_at_ms.is_none_or(|t| now_ms >= t + RETRANSMIT_MS);
            if Some(*node) != except && behind && due {
                ch.poked_at_ms = Some(now_ms);
                fx.push(Effect::Send { to: *node, msg: ShareMessage::Poke { share, generation } });
            }
        }
        fx
    }

    fn count_sent(&mut self, diff: &ShareDiff) {
        if !diff.is_empty() {
            self.counters.diffs_sent += 1;
            self.counters.diff_payload_bytes_sent += payload_bytes(diff);
        }
    }

    fn count_reflected(&mut self, diff: &ShareDiff, applied: &Applied) {
        if !diff.is_empty() {
            self.counters.diffs_reflected += 1;
        }
        self.counters.conflicts += applied.conflicts;
    }
}

/// One `Persist`, before every other effect (several steps of one event may each ask for it).
fn move_persist_first(fx: Vec<Effect>) -> Vec<Effect> {
    let persist = fx.contains(&Effect::Persist);
    let rest = fx.into_iter().filter(|e| *e != Effect::Persist);
    persist.then_some(Effect::Persist).into_iter().chain(rest).collect()
}
