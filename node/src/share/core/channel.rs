//! The lockstep sync channel between a spoke and the hub of a share (star topology: every member
//! syncs with the hub only). Each side keeps a shadow: the document both agreed at `version`.
//! Only the spoke starts a round ([`Spoke::poll`]): it sends its live copy diffed against the
//! shadow; the hub applies the diff strictly to its shadow and fuzzily to its live copy (the
//! "reflect": the change lands in both, so it is never diffed back — echo suppression), answers
//! with its live copy diffed against that shadow, and both shadows are then equal again at
//! `version + 1`. One round is in flight per spoke; a lost message is recovered by resending the
//! same round, which the hub answers from its cache without reflecting anything twice.
//!
//! A spoke with no agreed shadow (new, moved to another hub, or diverged) resets: it takes the
//! hub's whole document and re-applies its own edits on top ([`Spoke::on_reset`]): those it had
//! not synced yet, and those synced but not overtaken by anyone else's change since (the hub
//! that took them may be gone). Changes it only relayed are never pushed back: for those the
//! hub's document wins, so a member coming back does not revert newer changes made elsewhere.
//!
//! Echo accounting: each side remembers, per key, the value its peer last sent it; an outbound
//! diff that sets a key back to exactly that value is an echo ([`EchoMemory`]). With the
//! protocol right the count stays 0; it is there to catch a regression.
//!
//! This module owns the channel state machines. It must not do I/O, read a clock, or decide who
//! the hub is (that is `member`'s, from the catalog record).

use std::collections::BTreeMap;

use haven_proto::share::{ShareDiff, SyncReply};
use serde::{Deserialize, Serialize};

use super::doc::{
    apply_fuzzy, apply_strict, apply_strict_all, diff, diff_keys, round_diff, Applied, Doc, LocalEdits, PatchError,
};

/// Keys an [`EchoMemory`] remembers at most (the oldest-named are forgotten first).
pub const ECHO_MEMORY_KEYS: usize = 1024;

/// Why a round failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// A round older than the last one answered (and not that one): a late duplicate, or the
    /// round in flight of a spoke whose channel was reset since; either way it gets no answer.
    #[error("round {round} is older than round {highest}, already answered")]
    Stale { round: u64, highest: u64 },
    /// The two sides no longer agree on the shadow: the spoke must reset.
    #[error("round {round} diverged: {cause}; the spoke must reset")]
    Diverged { round: u64, cause: Divergence },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Divergence {
    #[error("it is based on version {base_version}, the shadow is at version {version}")]
    Version { base_version: u64, version: u64 },
    #[error("the reply's version {reply_version} does not follow the round's base {base_version}")]
    ReplyVersion { base_version: u64, reply_version: u64 },
    #[error("its diff does not apply to the shadow: {0}")]
    Patch(PatchError),
    #[error("the spoke has no shadow")]
    NoShadow,
}

/// What a side remembers of the values its peer last sent it: key → hash of the value (`0`:
/// deleted), bounded to [`ECHO_MEMORY_KEYS`] keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoMemory {
    sent_by_peer: BTreeMap<String, u64>,
}

fn value_hash(value: Option<&[u8]>) -> u64 {
    let Some(v) = value else { return 0 };
    let h = blake3::hash(v);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(first) | 1
}

impl EchoMemory {
    /// The peer's diff was applied: remember, per key it named, the value it leaves in `shadow`
    /// (what the peer holds).
    pub fn remember(&mut self, inbound: &ShareDiff, shadow: &Doc) {
        for key in diff_keys(inbound) {
            if self.sent_by_peer.len() >= ECHO_MEMORY_KEYS && !self.sent_by_peer.contains_key(&key) {
                self.sent_by_peer.pop_first();
            }
            let hash = value_hash(shadow.get(&key));
            self.sent_by_peer.insert(key, hash);
        }
    }

    /// An outbound diff to the peer leaves `target`: count the keys it sets back to what the
    /// peer last sent, and forget every key it names (this side's value is now the newer one).
    pub fn count_echoes(&mut self, outbound: &ShareDiff, target: &Doc) -> u64 {
        let mut echoes = 0;
        for key in diff_keys(outbound) {
            if self.sent_by_peer.remove(&key) == Some(value_hash(target.get(&key))) {
                echoes += 1;
            }
        }
        echoes
    }

    pub fn clear(&mut self) {
        self.sent_by_peer.clear();
    }
}

/// One round as the spoke sends it (the rest of a `SyncRequest` is the member's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    pub round: u64,
    pub base_version: u64,
    pub diff: ShareDiff,
}

/// The round in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub round: Round,
    /// The member's `live_version` the round's diff covers: once it completes, every local
    /// change up to there has been reflected by the hub. (A round that carries only part of
    /// the difference covers no more than the rounds before it.)
    pub live_version: u64,
}

/// The spoke's side of a channel.
///
/// **Invariants:** `pending` implies `shadow`; round numbers only grow; `version` only grows
/// (replies and resets of an older version are ignored), so a late duplicate never moves the
/// spoke back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spoke {
    /// The document agreed with the hub at `version`; `None`: this spoke must reset.
    pub shadow: Option<Doc>,
    pub version: u64,
    pub next_round: u64,
    pub pending: Option<Pending>,
    /// The hub poked while a round was in flight: start another once it completes (volatile:
    /// the hub pokes again until this spoke agrees on its live copy).
    #[serde(skip)]
    pub poked: bool,
    /// The member's `live_version` covered by the newest completed round.
    pub synced_live_version: u64,
    pub echo: EchoMemory,
    pub echoes: u64,
}

impl Spoke {
    /// A spoke that must reset before its first round. `version` is a floor: a reset answered
    /// at or below it is a stale duplicate.
    pub fn resetting(version: u64, next_round: u64, synced_live_version: u64) -> Self {
        assert!(next_round >= 1, "rounds start at 1");
        Self {
            shadow: None,
            version,
            next_round,
            pending: None,
            poked: false,
            synced_live_version,
            echo: EchoMemory::default(),
            echoes: 0,
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.shadow.is_none()
    }

    /// Live copy equal to the agreed shadow and no round in flight.
    pub fn in_sync(&self, live: &Doc) -> bool {
        self.pending.is_none() && self.shadow.as_ref() == Some(live)
    }

    /// Start a round if none is in flight and the live copy differs from the shadow (or `force`:
    /// the hub poked, its changes come back in the reply). A poke during a round is remembered.
    /// A difference too large for one round goes in several ([`round_diff`]).
    pub fn poll(&mut self, live: &Doc, live_version: u64, force: bool) -> Option<Round> {
        if self.pending.is_some() {
            self.poked |= force;
            return None;
        }
        let shadow = self.shadow.as_ref()?;
        if !force && !self.poked && shadow == live {
            return None;
        }
        let (d, complete) = round_diff(shadow, live);
        self.echoes += self.echo.count_echoes(&d, live);
        let round = Round { round: self.next_round, base_version: self.version, diff: d };
        self.next_round += 1;
        self.poked = false;
        let covers = if complete { live_version } else { self.synced_live_version };
        self.pending = Some(Pending { round: round.clone(), live_version: covers });
        Some(round)
    }

    /// The round in flight, to resend unchanged.
    pub fn pending_request(&self) -> Option<&Round> {
        self.pending.as_ref().map(|p| &p.round)
    }

    /// The hub answered. A reply to anything but the round in flight is a late duplicate:
    /// `Ok`, nothing done. Else the shadow takes the round's diff and the reply's (strictly:
    /// if that fails the two sides diverged and this spoke must reset), and the live copy the
    /// reply's (fuzzily).
    pub fn on_reply(&mut self, live: &mut Doc, reply: &SyncReply) -> Result<Applied, ChannelError> {
        let Some(pending) = self.pending.take_if(|p| p.round.round == reply.round) else {
            return Ok(Applied::default());
        };
        let round = pending.round.round;
        if let Err(cause) = self.advance_shadow(&pending.round, reply) {
            self.diverge();
            return Err(ChannelError::Diverged { round, cause });
        }
        if let Some(shadow) = &self.shadow {
            self.echo.remember(&reply.diff, shadow);
        }
        self.version = reply.version;
        self.synced_live_version = self.synced_live_version.max(pending.live_version);
        Ok(apply_fuzzy(live, &reply.diff))
    }

    fn advance_shadow(&mut self, sent: &Round, reply: &SyncReply) -> Result<(), Divergence> {
        if reply.version <= sent.base_version {
            return Err(Divergence::ReplyVersion { base_version: sent.base_version, reply_version: reply.version });
        }
        let shadow = self.shadow.as_mut().ok_or(Divergence::NoShadow)?;
        // Both or neither: if the reply does not fit, the shadow stays the one the round was
        // computed against, and the reset that follows re-sends the round's edits.
        apply_strict_all(shadow, &[&sent.diff, &reply.diff]).map_err(Divergence::Patch)?;
        Ok(())
    }

    /// The two sides no longer agree (the hub refused a round, or its reply did not fit): drop
    /// the round and the shadow; a reset follows (the round's edits are among the member's own).
    pub fn diverge(&mut self) {
        self.pending = None;
        self.poked = false;
        self.shadow = None;
        self.echo.clear();
    }

    /// Whether to take a reset answered at `version`: one newer than anything this spoke agreed
    /// (the hub's channel moved past it), or, while it must reset, the one it last took again
    /// (the hub answers a reset request with the same version and document until a round
    /// confirms them, so a version names one document). Older ones are stale duplicates.
    pub fn wants_reset(&self, version: u64) -> bool {
        version > self.version || (self.needs_reset() && version == self.version)
    }

    /// The hub's whole document at `version`. The live copy becomes that with this member's own
    /// edits (`local`) re-applied fuzzily on every key where the hub's document differs from the
    /// live copy; the shadow becomes the hub's document, so those edits go out in the next round.
    pub fn on_reset(&mut self, live: &mut Doc, version: u64, hub_doc: Doc, local: &LocalEdits) -> Applied {
        debug_assert!(self.wants_reset(version));
        let old_live = std::mem::replace(live, hub_doc.clone());
        let mine = local.ops_where(|k| old_live.get(k) != live.get(k));
        let merged = apply_fuzzy(live, &mine);
        self.shadow = Some(hub_doc);
        self.version = version;
        self.pending = None;
        self.poked = false;
        self.echo.clear();
        Applied {
            ops_applied: merged.ops_applied,
            conflicts: merged.conflicts,
            changed_keys: diff_keys(&diff(&old_live, live)),
        }
    }
}

/// The cached answer to the last round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReply {
    pub round: u64,
    pub version: u64,
    pub diff: ShareDiff,
}

impl LastReply {
    pub fn reply(&self) -> SyncReply {
        SyncReply { round: self.round, version: self.version, diff: self.diff.clone() }
    }
}

/// The hub's side of the channel with one spoke.
///
/// **Invariant:** `version` only grows; a fresh channel starts at `generation << 32`, so the
/// versions of two generations' channels never meet and a late reply from an older generation
/// is always older than anything a spoke of the newer one waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubChannel {
    pub shadow: Doc,
    pub version: u64,
    pub last: Option<LastReply>,
    /// The newest round answered (kept across resets: round numbers are the spoke's and grow).
    pub highest_round: u64,
    /// The hub's `live_version` the shadow was last set to; `None` until the spoke has reset.
    pub agreed_live_version: Option<u64>,
    pub echo: EchoMemory,
    pub echoes: u64,
    /// A reset was answered and no round since confirmed it: a reset request gets the same
    /// answer again, and the hub pokes the spoke until a round comes.
    pub reset_unconfirmed: bool,
    /// When the spoke was last poked (volatile: a restart pokes again).
    #[serde(skip)]
    pub poked_at_ms: Option<u64>,
}

impl HubChannel {
    pub fn new(generation: u64) -> Self {
        Self {
            shadow: Doc::new(),
            version: generation << 32,
            last: None,
            highest_round: 0,
            agreed_live_version: None,
            echo: EchoMemory::default(),
            echoes: 0,
            reset_unconfirmed: false,
            poked_at_ms: None,
        }
    }

    /// The spoke's round: apply its diff to the shadow (strictly) and to `live` (fuzzily),
    /// answer with `live` diffed against the shadow, and agree on that at `version + 1`: on
    /// `live` itself (recorded as `agreed_live_version`, from the member's `live_version` before
    /// the round) unless the difference was too large for one reply, in which case the rest
    /// follows in later rounds. The round already answered gets the same answer again and
    /// reflects nothing. On error nothing changed.
    pub fn on_request(
        &mut self,
        live: &mut Doc,
        live_version: u64,
        round: u64,
        base_version: u64,
        inbound: &ShareDiff,
    ) -> Result<(SyncReply, Applied), ChannelError> {
        if let Some(last) = self.last.as_ref().filter(|l| l.round == round) {
            return Ok((last.reply(), Applied::default()));
        }
        if round <= self.highest_round {
            return Err(ChannelError::Stale { round, highest: self.highest_round });
        }
        if base_version != self.version {
            let cause = Divergence::Version { base_version, version: self.version };
            return Err(ChannelError::Diverged { round, cause });
        }
        apply_strict(&mut self.shadow, inbound)
            .map_err(|e| ChannelError::Diverged { round, cause: Divergence::Patch(e) })?;
        self.echo.remember(inbound, &self.shadow);
        let applied = apply_fuzzy(live, inbound);
        let (outbound, complete) = round_diff(&self.shadow, live);
        self.echoes += self.echo.count_echoes(&outbound, live);
        self.agree(live, &outbound, complete);
        if complete {
            self.agreed_live_version = Some(live_version + u64::from(applied.changed()));
        }
        self.version += 1;
        self.reset_unconfirmed = false;
        self.highest_round = round;
        let last = LastReply { round, version: self.version, diff: outbound };
        let reply = last.reply();
        self.last = Some(last);
        Ok((reply, applied))
    }

    /// The shadow takes `outbound` (`live` diffed against it; all of it if `complete`, then the
    /// shadow equals `live`).
    fn agree(&mut self, live: &Doc, outbound: &ShareDiff, complete: bool) {
        if apply_strict(&mut self.shadow, outbound).is_err() {
            // Cannot happen (diffs are exact and `live` is within the limits); be safe anyway.
            debug_assert!(false, "an exact diff did not apply");
            self.shadow = live.clone();
        }
        debug_assert!(!complete || self.shadow == *live, "after a whole reply the hub's shadow equals its live copy");
    }

    /// The spoke asked for the whole document: agree on `live` (at `live_version`, the hub's) at
    /// a new version. Until a round confirms that, every reset request gets the same version and
    /// document again: a retransmitted request never moves the channel past what the spoke took.
    pub fn on_reset(&mut self, live: &Doc, live_version: u64) -> (u64, Vec<(String, Vec<u8>)>) {
        if !self.reset_unconfirmed {
            self.shadow = live.clone();
            self.version += 1;
            self.last = None;
            self.echo.clear();
            self.agreed_live_version = Some(live_version);
            self.reset_unconfirmed = true;
        }
        (self.version, self.shadow.entries())
    }

    /// The spoke has reset, confirmed it with a round, and the shadow equals `live`.
    pub fn in_sync(&self, live: &Doc) -> bool {
        self.agreed_live_version.is_some() && !self.reset_unconfirmed && self.shadow == *live
    }
}

#[cfg(test)]
mod tests {
    use haven_proto::share::ShareOp;

    use super::*;

    fn doc(entries: &[(&str, &str)]) -> Doc {
        Doc::from_entries(entries.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()).unwrap()
    }

    /// A spoke and a hub that agreed on `shared` (the spoke reset).
    fn pair(shared: &Doc) -> (Spoke, Doc, HubChannel, Doc) {
        let mut hub = HubChannel::new(1);
        let hub_live = shared.clone();
        let (version, entries) = hub.on_reset(&hub_live, 0);
        assert_eq!(hub.on_reset(&Doc::new(), 1), (version, hub_live.entries()), "a duplicate gets the same answer");
        let mut spoke = Spoke::resetting(0, 1, 0);
        let mut live = Doc::new();
        spoke.on_reset(&mut live, version, Doc::from_entries(entries).unwrap(), &LocalEdits::default());
        (spoke, live, hub, hub_live)
    }

    fn round_trip(spoke: &mut Spoke, live: &mut Doc, hub: &mut HubChannel, hub_live: &mut Doc, force: bool) {
        let r = spoke.poll(live, 1, force).expect("a round");
        let (reply, _) = hub.on_request(hub_live, 0, r.round, r.base_version, &r.diff).unwrap();
        spoke.on_reply(live, &reply).unwrap();
    }

    #[test]
    fn a_difference_too_large_for_one_round_goes_in_several() {
        use haven_proto::share::MAX_DIFF_OPS;
        let old = Doc::from_entries((0..40_000).map(|i| (format!("a{i}"), vec![1])).collect()).unwrap();
        let (mut spoke, _, mut hub, mut hub_live) = pair(&old);
        let mut live = Doc::from_entries((0..40_000).map(|i| (format!("b{i}"), vec![2])).collect()).unwrap();
        let target = live.clone();
        let first = spoke.poll(&live, 7, false).unwrap();
        assert!(first.diff.validate().is_ok() && first.diff.ops.len() <= MAX_DIFF_OPS);
        let (reply, _) = hub.on_request(&mut hub_live, 0, first.round, first.base_version, &first.diff).unwrap();
        spoke.on_reply(&mut live, &reply).unwrap();
        assert_eq!(spoke.synced_live_version, 0, "a partial round acknowledges nothing");
        assert!(!spoke.in_sync(&live));
        round_trip(&mut spoke, &mut live, &mut hub, &mut hub_live, false);
        assert!(spoke.in_sync(&live) && hub.in_sync(&hub_live));
        assert_eq!((live, hub_live), (target.clone(), target));
    }

    #[test]
    fn a_round_reflects_both_ways_without_echo() {
        let (mut spoke, mut live, mut hub, mut hub_live) = pair(&doc(&[("a", "1")]));
        live.set("b", Some(b"spoke".to_vec())).unwrap();
        hub_live.set("c", Some(b"hub".to_vec())).unwrap();
        let r = spoke.poll(&live, 1, false).unwrap();
        assert_eq!(r.diff.ops.len(), 1);
        assert!(spoke.poll(&live, 1, false).is_none(), "lockstep: one round in flight");
        let (reply, applied) = hub.on_request(&mut hub_live, 0, r.round, r.base_version, &r.diff).unwrap();
        assert_eq!(applied.changed_keys, vec!["b".to_string()]);
        assert!(matches!(&reply.diff.ops[..], [ShareOp::Put { key, .. }] if key == "c"), "{reply:?}");
        // A duplicate of the round: the same answer, nothing reflected again.
        let (again, nothing) = hub.on_request(&mut hub_live, 0, r.round, r.base_version, &r.diff).unwrap();
        assert_eq!((again, nothing), (reply.clone(), Applied::default()));
        spoke.on_reply(&mut live, &reply).unwrap();
        assert_eq!(live, hub_live);
        assert!(spoke.in_sync(&live) && hub.in_sync(&hub_live), "the round confirmed the reset");
        assert_eq!(spoke.shadow.as_ref(), Some(&hub.shadow));
        // Nothing changed since: no round, and a forced one carries nothing either way.
        assert!(spoke.poll(&live, 1, false).is_none());
        round_trip(&mut spoke, &mut live, &mut hub, &mut hub_live, true);
        assert_eq!(hub.last.as_ref().unwrap().diff, ShareDiff::default());
        assert_eq!((spoke.echoes, hub.echoes), (0, 0));
        // A poke during a round is remembered: another round follows the reply.
        live.set("d", Some(b"again".to_vec())).unwrap();
        let r = spoke.poll(&live, 2, false).unwrap();
        assert!(spoke.poll(&live, 2, true).is_none());
        let (reply2, _) = hub.on_request(&mut hub_live, 0, r.round, r.base_version, &r.diff).unwrap();
        spoke.on_reply(&mut live, &reply2).unwrap();
        assert!(spoke.poll(&live, 2, false).is_some(), "the poke starts a round");
        // A late duplicate reply is ignored.
        assert_eq!(spoke.on_reply(&mut live, &reply).unwrap(), Applied::default());
    }

    #[test]
    fn a_reflect_into_live_only_would_be_counted_as_an_echo() {
        let (mut spoke, mut live, mut hub, mut hub_live) = pair(&Doc::new());
        live.set("k", Some(b"v".to_vec())).unwrap();
        let r = spoke.poll(&live, 1, false).unwrap();
        // A broken hub: reflects into its live copy but not its shadow.
        hub.echo.remember(&r.diff, &live);
        apply_fuzzy(&mut hub_live, &r.diff);
        let outbound = diff(&hub.shadow, &hub_live);
        assert_eq!(hub.echo.count_echoes(&outbound, &hub_live), 1);
    }

    #[test]
    fn stale_and_diverged_rounds_are_refused_unchanged() {
        let (mut spoke, mut live, mut hub, mut hub_live) = pair(&doc(&[("a", "1")]));
        live.set("a", Some(b"2".to_vec())).unwrap();
        round_trip(&mut spoke, &mut live, &mut hub, &mut hub_live, false);
        let before = (hub.clone(), hub_live.clone());
        let bad = ShareDiff { ops: vec![ShareOp::Delete { key: "absent".into() }] };
        let e = hub.on_request(&mut hub_live, 0, 9, hub.version, &bad).unwrap_err();
        assert!(matches!(e, ChannelError::Diverged { cause: Divergence::Patch(PatchError::DeleteAbsent { .. }), .. }));
        let e = hub.on_request(&mut hub_live, 0, 9, hub.version - 1, &ShareDiff::default()).unwrap_err();
        assert!(matches!(e, ChannelError::Diverged { cause: Divergence::Version { .. }, .. }), "{e}");
        let e = hub.on_request(&mut hub_live, 0, 0, hub.version, &ShareDiff::default()).unwrap_err();
        assert!(matches!(e, ChannelError::Stale { .. }), "{e}");
        assert_eq!((hub, hub_live), before);
    }

    #[test]
    fn a_reply_that_does_not_fit_makes_the_spoke_reset_keeping_its_edits() {
        let (mut spoke, mut live, _hub, _) = pair(&doc(&[("a", "1")]));
        live.set("mine", Some(b"x".to_vec())).unwrap();
        let mut local = LocalEdits::default();
        local.record("mine", None, Some(b"x"), 1);
        let r = spoke.poll(&live, 1, false).unwrap();
        let bad = SyncReply {
            round: r.round,
            version: r.base_version + 1,
            diff: ShareDiff { ops: vec![ShareOp::Delete { key: "absent".into() }] },
        };
        assert!(matches!(spoke.on_reply(&mut live, &bad), Err(ChannelError::Diverged { .. })));
        assert!(spoke.needs_reset() && spoke.pending.is_none());
        assert!(!spoke.wants_reset(spoke.version - 1), "a reset older than the shadow is stale");
        let hub_doc = doc(&[("a", "1"), ("theirs", "y")]);
        let applied = spoke.on_reset(&mut live, spoke.version + 1, hub_doc, &local);
        assert_eq!(applied.changed_keys, vec!["theirs".to_string()]);
        assert_eq!(live, doc(&[("a", "1"), ("mine", "x"), ("theirs", "y")]));
        let next = spoke.poll(&live, 2, false).unwrap();
        assert!(matches!(&next.diff.ops[..], [ShareOp::Put { key, .. }] if key == "mine"));
    }
}
