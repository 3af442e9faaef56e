//! Multi-operation mode: the standby's VM runs beside the primary's, and the application's
//! internal state is mirrored update by update. Every output of the guest is an application
//! update with a sequence number (`seq`, counting the guest's outputs); the primary sends it to
//! the standby and releases its acknowledgement to the application's clients only once the
//! standby acknowledged it (cumulatively). A generation starts with a snapshot of the whole
//! state, covering every output so far. On takeover the standby's state is every update it
//! acknowledged and possibly a few more, never fewer.
//!
//! [`MirrorPrimary`] is the primary's side (snapshot capture handshake, updates in flight,
//! retransmission, release on acknowledgement); [`AppMirror`] the standby's (snapshot, in-order
//! apply with a bounded reorder buffer, cumulative acknowledgement). The application state is
//! modelled as the snapshot bytes plus the ordered log of updates after it ([`AppState`]); the
//! real driver keeps it as a shared document (C2's `Doc`) and folds updates into it.
//!
//! This module must not do I/O, read a clock, check generations or senders (that is
//! `super::standby` and `super::Primary`'s), or seal (`super::PairHost` does).

use std::collections::BTreeMap;

use haven_proto::ha::{AppSnapshot, AppUpdate, HaMessage};
use haven_proto::ids::{NodeId, VmId};

use super::{Effect, HaError, HaMetric, HaTunables};

/// Updates a standby holds ahead of a gap at most.
pub const MAX_EARLY_UPDATES: usize = 1024;
/// Updates a primary resends per tick at most.
pub const MAX_RESEND_UPDATES: usize = 256;

/// The application's state on a standby: `snapshot` (covering outputs `..=snapshot_seq`) and the
/// updates applied after it, consecutive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppState {
    pub generation: u64,
    pub snapshot_seq: u64,
    pub snapshot: Vec<u8>,
    pub updates: Vec<(u64, Vec<u8>)>,
}

impl AppState {
    /// The newest update the state holds.
    pub fn applied(&self) -> u64 {
        self.updates.last().map_or(self.snapshot_seq, |(s, _)| *s)
    }
}

/// The standby's side of one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppMirror {
    generation: u64,
    state: Option<AppState>,
    early: BTreeMap<u64, Vec<u8>>,
}

impl AppMirror {
    pub fn new(generation: u64) -> Self {
        Self { generation, state: None, early: BTreeMap::new() }
    }

    /// Holds a state to take over from.
    pub fn ready(&self) -> bool {
        self.state.is_some()
    }

    pub fn state(&self) -> Option<&AppState> {
        self.state.as_ref()
    }

    pub fn into_state(self) -> Option<AppState> {
        self.state
    }

    /// `snapshot` covers updates `..=seq` (the driver folded them): it becomes the snapshot, and
    /// the updates it covers go. A `seq` outside what is held changes nothing.
    pub fn compact(&mut self, seq: u64, snapshot: Vec<u8>) {
        let Some(st) = &mut self.state else { return };
        if seq <= st.snapshot_seq || seq > st.applied() {
            return;
        }
        st.snapshot = snapshot;
        st.snapshot_seq = seq;
        st.updates.retain(|(s, _)| *s > seq);
    }

    /// A snapshot: taken unless the state already holds as much (a duplicate). Returns the
    /// sequence number to acknowledge.
    pub fn on_snapshot(&mut self, s: &AppSnapshot) -> u64 {
        if let Some(st) = &self.state {
            if st.applied() >= s.seq {
                return st.applied();
            }
        }
        self.state = Some(AppState {
            generation: self.generation,
            snapshot_seq: s.seq,
            snapshot: s.state.clone(),
            updates: vec![],
        });
        self.early = self.early.split_off(&(s.seq + 1));
        self.drain_early()
    }

    /// An update: applied if it is the next one (then any held after it), held if it comes
    /// early, ignored if already applied. Returns the sequence number to acknowledge, if any.
    pub fn on_update(&mut self, u: &AppUpdate) -> Result<Option<u64>, HaError> {
        let Some(st) = &self.state else { return Err(HaError::NoAppState { seq: u.seq }) };
        let applied = st.applied();
        if u.seq <= applied {
            return Ok(Some(applied));
        }
        if u.seq > applied + 1 {
            if !self.early.contains_key(&u.seq) && self.early.len() >= MAX_EARLY_UPDATES {
                return Err(HaError::TooFarAhead { at: u.seq, committed: applied });
            }
            self.early.insert(u.seq, u.data.clone());
            return Ok(None);
        }
        self.early.insert(u.seq, u.data.clone());
        Ok(Some(self.drain_early()))
    }

    fn drain_early(&mut self) -> u64 {
        let Some(st) = &mut self.state else { return 0 };
        while let Some(data) = self.early.remove(&(st.applied() + 1)) {
            let seq = st.applied() + 1;
            st.updates.push((seq, data));
        }
        st.applied()
    }
}

/// Where the primary's snapshot of this generation is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Snapshot {
    /// Asked the driver for it (`CaptureAppState { token }`).
    Capturing {
        token: u64,
    },
    Sent {
        seq: u64,
        state: Vec<u8>,
        sent_ms: u64,
    },
    Acked {
        seq: u64,
    },
}

/// The multi-operation primary of one generation.
///
/// **Invariants:** an update is released only after an acknowledgement of this generation
/// covering it; `acked` only grows; updates are kept until acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorPrimary {
    vm: VmId,
    standby: NodeId,
    generation: u64,
    tun: HaTunables,
    snapshot: Snapshot,
    /// Updates not acknowledged yet: seq → (data, issued at).
    unacked: BTreeMap<u64, (Vec<u8>, u64)>,
    acked: u64,
    /// The newest output this mirror covers (sent or in the snapshot).
    newest: u64,
    last_sent_ms: u64,
}

impl MirrorPrimary {
    /// A fresh mirror to `standby`; asks the driver for a snapshot (`token` names the request).
    pub fn new(vm: VmId, standby: NodeId, generation: u64, token: u64, tun: HaTunables) -> (Self, Vec<Effect>) {
        let m = Self {
            vm,
            standby,
            generation,
            tun,
            snapshot: Snapshot::Capturing { token },
            unacked: BTreeMap::new(),
            acked: 0,
            newest: 0,
            last_sent_ms: 0,
        };
        (m, vec![Effect::CaptureAppState { token }])
    }

    pub fn standby(&self) -> NodeId {
        self.standby
    }

    /// The snapshot request the driver has not answered, if any.
    pub fn capturing(&self) -> Option<u64> {
        match self.snapshot {
            Snapshot::Capturing { token } => Some(token),
            _ => None,
        }
    }

    /// Age of the oldest update not acknowledged (the mirroring lag), 0 with none.
    pub fn lag_ms(&self, now_ms: u64) -> u64 {
        self.unacked.values().next().map_or(0, |(_, at)| now_ms.saturating_sub(*at))
    }

    pub fn backlog(&self) -> usize {
        self.unacked.len()
    }

    /// The snapshot's sequence number once it is sent.
    fn snapshot_seq(&self) -> Option<u64> {
        match self.snapshot {
            Snapshot::Capturing { .. } => None,
            Snapshot::Sent { seq, .. } | Snapshot::Acked { seq } => Some(seq),
        }
    }

    fn update(&self, seq: u64, data: &[u8]) -> Effect {
        let u = AppUpdate { vm: self.vm, generation: self.generation, seq, data: data.to_vec() };
        Effect::Send { to: self.standby, msg: HaMessage::AppUpdate(u) }
    }

    /// The guest issued update `seq`: kept until acknowledged, sent once the snapshot is out.
    pub fn on_output(&mut self, seq: u64, data: Vec<u8>, now_ms: u64) -> Vec<Effect> {
        let send = self.snapshot_seq().is_some_and(|s| seq > s);
        let fx = if send { vec![self.update(seq, &data)] } else { Vec::new() };
        self.newest = self.newest.max(seq);
        self.unacked.insert(seq, (data, now_ms));
        fx
    }

    /// The driver captured the application's state for `token`, covering outputs `..=seq`: send
    /// it, then the updates after it.
    pub fn on_app_state(&mut self, token: u64, seq: u64, state: Vec<u8>, now_ms: u64) -> Result<Vec<Effect>, HaError> {
        if self.capturing() != Some(token) {
            return Err(HaError::Capture { expected: self.capturing(), got: token });
        }
        let snap = AppSnapshot { vm: self.vm, generation: self.generation, seq, state: state.clone() };
        let mut fx = vec![Effect::Send { to: self.standby, msg: HaMessage::AppSnapshot(snap) }];
        fx.extend(self.unacked.range(seq + 1..).map(|(s, (d, _))| self.update(*s, d)));
        self.snapshot = Snapshot::Sent { seq, state, sent_ms: now_ms };
        self.newest = self.newest.max(seq);
        self.last_sent_ms = now_ms;
        Ok(fx)
    }

    /// The standby holds every update up to `seq`: release them.
    pub fn on_ack(&mut self, seq: u64, now_ms: u64) -> Result<Vec<Effect>, HaError> {
        if seq <= self.acked {
            return Ok(Vec::new());
        }
        let Some(snapshot_seq) = self.snapshot_seq() else { return Err(HaError::UnknownSeq { seq }) };
        if seq > self.newest {
            return Err(HaError::UnknownSeq { seq });
        }
        let lag_ms = self.unacked.get(&seq).map_or(0, |(_, at)| now_ms.saturating_sub(*at));
        self.acked = seq;
        self.unacked = self.unacked.split_off(&(seq + 1));
        if seq >= snapshot_seq {
            self.snapshot = Snapshot::Acked { seq: snapshot_seq };
        }
        Ok(vec![
            Effect::Metric(HaMetric::UpdateAcked { seq, lag_ms }),
            Effect::Release { upto: seq, generation: self.generation },
        ])
    }

    /// The standby holds no state for this generation. If it had acknowledged the snapshot it
    /// lost it (a restart): capture a new one. If the snapshot is still on its way, the
    /// retransmission takes care of it.
    pub fn on_need_snapshot(&mut self, token: u64) -> Vec<Effect> {
        match self.snapshot {
            Snapshot::Acked { .. } => {
                self.snapshot = Snapshot::Capturing { token };
                vec![Effect::CaptureAppState { token }]
            }
            _ => Vec::new(),
        }
    }

    /// Resend what went unacknowledged for `retransmit_ms`: the snapshot, then updates.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let Some(snapshot_seq) = self.snapshot_seq() else { return Vec::new() };
        let pending = self.unacked.range(snapshot_seq + 1..).next().is_some();
        let snapshot_pending = matches!(self.snapshot, Snapshot::Sent { .. });
        if (!pending && !snapshot_pending) || now_ms < self.last_sent_ms + self.tun.retransmit_ms {
            return Vec::new();
        }
        self.last_sent_ms = now_ms;
        let mut fx = Vec::new();
        if let Snapshot::Sent { seq, state, sent_ms } = &mut self.snapshot {
            *sent_ms = now_ms;
            let snap = AppSnapshot { vm: self.vm, generation: self.generation, seq: *seq, state: state.clone() };
            fx.push(Effect::Send { to: self.standby, msg: HaMessage::AppSnapshot(snap) });
        }
        let resend = self.unacked.range(snapshot_seq + 1..).take(MAX_RESEND_UPDATES);
        fx.extend(resend.map(|(s, (d, _))| self.update(*s, d)));
        fx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upd(seq: u64) -> AppUpdate {
        AppUpdate { vm: VmId(1), generation: 2, seq, data: vec![seq as u8] }
    }

    fn snap(seq: u64) -> AppSnapshot {
        AppSnapshot { vm: VmId(1), generation: 2, seq, state: vec![0xaa] }
    }

    #[test]
    fn the_standby_applies_in_order_and_acknowledges_cumulatively() {
        let mut m = AppMirror::new(2);
        assert!(matches!(m.on_update(&upd(1)), Err(HaError::NoAppState { seq: 1 })));
        assert_eq!(m.on_snapshot(&snap(3)), 3);
        assert_eq!(m.on_update(&upd(5)).unwrap(), None, "held: 4 is missing");
        assert_eq!(m.on_update(&upd(3)).unwrap(), Some(3), "already in the snapshot");
        assert_eq!(m.on_update(&upd(4)).unwrap(), Some(5), "4, then the held 5");
        assert_eq!(m.on_update(&upd(4)).unwrap(), Some(5), "a duplicate re-acknowledges");
        assert_eq!(m.on_snapshot(&snap(2)), 5, "an older snapshot changes nothing");
        let st = m.state().unwrap();
        assert_eq!((st.snapshot_seq, st.updates.iter().map(|(s, _)| *s).collect::<Vec<_>>()), (3, vec![4, 5]));
        assert_eq!(m.on_snapshot(&snap(9)), 9, "a newer snapshot replaces the state");
        assert!(m.state().unwrap().updates.is_empty());
    }

    #[test]
    fn compaction_keeps_what_the_state_holds_and_drops_the_folded_updates() {
        let mut m = AppMirror::new(2);
        m.on_snapshot(&snap(3));
        for seq in 4..=7 {
            m.on_update(&upd(seq)).unwrap();
        }
        m.compact(9, vec![1]);
        m.compact(3, vec![1]);
        assert_eq!(m.state().unwrap().snapshot_seq, 3, "outside what is held: nothing changes");
        m.compact(5, vec![0xbb]);
        let st = m.state().unwrap();
        assert_eq!((st.snapshot_seq, st.snapshot.clone(), st.applied()), (5, vec![0xbb], 7));
        assert_eq!(st.updates.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![6, 7]);
        assert_eq!(m.on_update(&upd(8)).unwrap(), Some(8), "updates go on after a compaction");
    }

    #[test]
    fn the_primary_releases_only_what_the_standby_acknowledged() {
        let tun = HaTunables::default();
        let (mut p, fx) = MirrorPrimary::new(VmId(1), NodeId(2), 2, 7, tun.clone());
        assert_eq!(fx, vec![Effect::CaptureAppState { token: 7 }]);
        assert!(p.on_output(4, vec![4], 10).is_empty(), "no update before the snapshot is out");
        let fx = p.on_app_state(7, 3, vec![0xaa], 11).unwrap();
        assert_eq!(fx.len(), 2, "the snapshot and update 4: {fx:?}");
        assert_eq!(p.on_output(5, vec![5], 12).len(), 1);
        assert!(matches!(p.on_ack(6, 13), Err(HaError::UnknownSeq { seq: 6 })));
        let fx = p.on_ack(4, 20).unwrap();
        assert_eq!(fx[1], Effect::Release { upto: 4, generation: 2 });
        assert!(p.on_ack(3, 21).unwrap().is_empty());
        let resent = p.tick(11 + tun.retransmit_ms);
        assert_eq!(resent.len(), 1, "only update 5 is pending: {resent:?}");
        p.on_ack(5, 30).unwrap();
        assert!(p.on_ack(5, 31).unwrap().is_empty(), "a late duplicate after everything was acknowledged");
        assert_eq!(p.on_need_snapshot(8), vec![Effect::CaptureAppState { token: 8 }], "the standby lost it");
        assert!(p.tick(1_000).is_empty(), "nothing to resend while capturing");
    }
}
