//! The primary side of redundant mode: checkpoint epochs (Remus-style). Every `epoch_ms` the
//! guest is paused, the pages it wrote since the previous epoch and its device state are captured
//! (all pages for a full epoch), the guest resumes, and the epoch goes to the standby as frames
//! while the next epoch runs. Outputs the guest issued up to a capture are *covered* by that
//! epoch; they are released (with the pair's generation) only when the standby acknowledged the
//! epoch, i.e. committed it. That is the output commit: nothing reaches the outside that the
//! standby could not start from.
//!
//! This module owns the epoch timer, the capture handshake (`PauseAndCapture` → `on_captured` →
//! `Unpause`), the epochs in flight and their retransmission, release on acknowledgement, and the
//! pause accounting ([`PauseAccounting`]) that feeds the metrics (epoch length and size, pause,
//! mirroring lag). It must not do I/O, read a clock (time comes in as `now_ms`), hold the guest's
//! memory beyond the frames of unacknowledged epochs, or decide who the standby is (the record
//! says, through `super::Primary`).

use std::collections::BTreeMap;

use haven_proto::ha::{Checkpoint, HaMessage};
use haven_proto::ids::{NodeId, VmId};

use super::{Effect, HaError, HaMetric, HaTunables};

/// Upper bounds (ms) of the pause histogram's buckets; the last one catches the rest.
pub const PAUSE_BUCKETS_MS: [u64; 14] = [1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 100, 200, 500, u64::MAX];

/// One captured epoch, as reported for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochReport {
    pub epoch: u64,
    pub full: bool,
    /// Guest paused for the capture.
    pub pause_ms: u64,
    /// From the end of the previous capture to this pause.
    pub epoch_ms: u64,
    pub pages: u64,
    /// Page and device-state bytes of the epoch.
    pub bytes: u64,
}

/// Running totals of checkpoint pauses and sizes, and a pause histogram (p99 from it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PauseAccounting {
    pub epochs: u64,
    pub full_epochs: u64,
    pub pause_ms_total: u64,
    pub pause_ms_max: u64,
    pub bytes_total: u64,
    pub pages_total: u64,
    /// Epochs per bucket of [`PAUSE_BUCKETS_MS`].
    pub pause_buckets: [u64; PAUSE_BUCKETS_MS.len()],
    /// Capture → acknowledgement, the longest seen, and the number of acknowledged epochs.
    pub lag_ms_max: u64,
    pub acked: u64,
    pub last: Option<EpochReport>,
}

impl PauseAccounting {
    pub fn record(&mut self, r: &EpochReport) {
        self.epochs += 1;
        self.full_epochs += u64::from(r.full);
        self.pause_ms_total += r.pause_ms;
        self.pause_ms_max = self.pause_ms_max.max(r.pause_ms);
        self.bytes_total += r.bytes;
        self.pages_total += r.pages;
        let bucket = PAUSE_BUCKETS_MS.iter().position(|b| r.pause_ms <= *b).unwrap_or(PAUSE_BUCKETS_MS.len() - 1);
        self.pause_buckets[bucket] += 1;
        self.last = Some(*r);
    }

    pub fn record_ack(&mut self, lag_ms: u64) {
        self.acked += 1;
        self.lag_ms_max = self.lag_ms_max.max(lag_ms);
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1) of the pauses; 0 with none.
    pub fn pause_quantile_ms(&self, q: f64) -> u64 {
        if self.epochs == 0 {
            return 0;
        }
        let rank = ((self.epochs as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (count, bound) in self.pause_buckets.iter().zip(PAUSE_BUCKETS_MS) {
            seen += count;
            if seen >= rank {
                return bound;
            }
        }
        u64::MAX
    }

    pub fn mean_pause_ms(&self) -> f64 {
        if self.epochs == 0 {
            return 0.0;
        }
        self.pause_ms_total as f64 / self.epochs as f64
    }
}

/// A capture the driver was asked for and has not reported yet (the guest is paused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capturing {
    pub epoch: u64,
    pub full: bool,
    pub paused_ms: u64,
}

/// An epoch sent and not acknowledged yet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlight {
    frames: Vec<Checkpoint>,
    /// Outputs issued up to the capture: released when this epoch is acknowledged.
    covers: u64,
    full: bool,
    captured_ms: u64,
    sent_ms: u64,
}

/// The redundant-mode primary of one generation (a new generation starts a new one, with a full
/// first epoch).
///
/// **Invariants:** epoch numbers only grow (carried across generations by the caller); an epoch
/// covers every output issued before its capture, and `covers` grows with the epoch; a release
/// follows only an acknowledgement of this generation from this standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPrimary {
    vm: VmId,
    standby: NodeId,
    generation: u64,
    epoch_ms: u64,
    tun: HaTunables,
    next_epoch: u64,
    epoch_started_ms: u64,
    capturing: Option<Capturing>,
    in_flight: BTreeMap<u64, InFlight>,
    acked: u64,
    /// The next capture takes every page (first epoch of the generation, or the standby has no
    /// image to apply a delta on).
    full_needed: bool,
    last_covers: u64,
}

impl CheckpointPrimary {
    /// A fresh mirror to `standby` at `generation`; its first epoch (`first_epoch`) is full and is
    /// captured at the first tick.
    pub fn new(
        vm: VmId,
        standby: NodeId,
        generation: u64,
        epoch_ms: u32,
        first_epoch: u64,
        tun: HaTunables,
        now_ms: u64,
    ) -> Self {
        Self {
            vm,
            standby,
            generation,
            epoch_ms: u64::from(epoch_ms),
            tun,
            next_epoch: first_epoch.max(1),
            epoch_started_ms: now_ms.saturating_sub(u64::from(epoch_ms)),
            capturing: None,
            in_flight: BTreeMap::new(),
            acked: 0,
            full_needed: true,
            last_covers: 0,
        }
    }

    pub fn standby(&self) -> NodeId {
        self.standby
    }

    /// The epoch number the next capture gets.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    pub fn capturing(&self) -> Option<Capturing> {
        self.capturing
    }

    /// The newest epoch the standby acknowledged at this generation (0: none).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn epochs_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Capture → now of the oldest epoch not acknowledged (the mirroring lag), 0 with none.
    pub fn lag_ms(&self, now_ms: u64) -> u64 {
        self.in_flight.values().next().map_or(0, |f| now_ms.saturating_sub(f.captured_ms))
    }

    /// Start the next capture when the epoch is over (and not too many epochs are in flight);
    /// resend the frames of epochs unacknowledged for `retransmit_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut fx = self.retransmit(now_ms);
        let due = now_ms >= self.epoch_started_ms + self.epoch_ms;
        if self.capturing.is_none() && due && self.in_flight.len() < self.tun.max_epochs_in_flight {
            let c = Capturing { epoch: self.next_epoch, full: self.full_needed, paused_ms: now_ms };
            self.capturing = Some(c);
            fx.push(Effect::PauseAndCapture { epoch: c.epoch, full: c.full });
        }
        fx
    }

    fn retransmit(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        for f in self.in_flight.values_mut().filter(|f| now_ms >= f.sent_ms + self.tun.retransmit_ms) {
            f.sent_ms = now_ms;
            fx.extend(
                f.frames.iter().map(|c| Effect::Send { to: self.standby, msg: HaMessage::Checkpoint(c.clone()) }),
            );
        }
        fx
    }

    /// The driver captured `epoch` while the guest was paused: `pages` (ascending, distinct; every
    /// non-zero page for a full epoch), the device state, and `outputs`, the outputs issued so
    /// far. Returns `Unpause` first, then the epoch's frames.
    pub fn on_captured(
        &mut self,
        epoch: u64,
        mut pages: Vec<(u64, Vec<u8>)>,
        device_state: Vec<u8>,
        outputs: u64,
        now_ms: u64,
    ) -> Result<Vec<Effect>, HaError> {
        let c = match self.capturing {
            Some(c) if c.epoch == epoch => c,
            other => return Err(HaError::Capture { expected: other.map(|c| c.epoch), got: epoch }),
        };
        pages.sort_unstable_by_key(|(p, _)| *p);
        if let Some(w) = pages.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(HaError::DuplicatePage { page: w[0].0 });
        }
        debug_assert!(outputs >= self.last_covers, "outputs issued went back from {} to {outputs}", self.last_covers);
        let report = EpochReport {
            epoch,
            full: c.full,
            pause_ms: now_ms.saturating_sub(c.paused_ms),
            epoch_ms: c.paused_ms.saturating_sub(self.epoch_started_ms),
            pages: pages.len() as u64,
            bytes: (pages.iter().map(|(_, b)| b.len()).sum::<usize>() + device_state.len()) as u64,
        };
        let frames = self.frames(epoch, c.full, pages, device_state, outputs);
        let mut fx = vec![Effect::Unpause, Effect::Metric(HaMetric::Epoch(report))];
        fx.extend(frames.iter().map(|f| Effect::Send { to: self.standby, msg: HaMessage::Checkpoint(f.clone()) }));
        let sent = InFlight { frames, covers: outputs, full: c.full, captured_ms: now_ms, sent_ms: now_ms };
        self.in_flight.insert(epoch, sent);
        self.capturing = None;
        self.full_needed &= !c.full;
        self.next_epoch = epoch + 1;
        self.epoch_started_ms = now_ms;
        self.last_covers = outputs;
        Ok(fx)
    }

    /// Split an epoch into frames of at most `frame_pages` pages; the last carries the device
    /// state. An epoch without pages is one frame.
    fn frames(
        &self,
        epoch: u64,
        full: bool,
        pages: Vec<(u64, Vec<u8>)>,
        device_state: Vec<u8>,
        outputs: u64,
    ) -> Vec<Checkpoint> {
        let per_frame = self.tun.frame_pages.max(1);
        let mut chunks: Vec<Vec<(u64, Vec<u8>)>> = Vec::with_capacity(pages.len() / per_frame + 1);
        let mut it = pages.into_iter().peekable();
        while it.peek().is_some() {
            chunks.push(it.by_ref().take(per_frame).collect());
        }
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        let n = chunks.len();
        let mut device_state = Some(device_state);
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, pages)| {
                let last = i + 1 == n;
                Checkpoint {
                    vm: self.vm,
                    generation: self.generation,
                    epoch,
                    frame: i as u32,
                    full,
                    last,
                    outputs,
                    pages,
                    device_state: if last { device_state.take().unwrap_or_default() } else { Vec::new() },
                }
            })
            .collect()
    }

    /// The standby committed every epoch up to `epoch`: release the outputs the newest of them
    /// covers. Duplicates are ignored; an epoch never captured is refused.
    pub fn on_ack(&mut self, epoch: u64, now_ms: u64) -> Result<Vec<Effect>, HaError> {
        if epoch >= self.next_epoch {
            return Err(HaError::UnknownEpoch { epoch, next: self.next_epoch });
        }
        if epoch <= self.acked {
            return Ok(Vec::new());
        }
        self.acked = epoch;
        let rest = self.in_flight.split_off(&(epoch + 1));
        let done = std::mem::replace(&mut self.in_flight, rest);
        let Some((newest, f)) = done.into_iter().next_back() else {
            // Only epochs dropped after a full resync request: the next full epoch releases.
            return Ok(Vec::new());
        };
        let lag_ms = now_ms.saturating_sub(f.captured_ms);
        Ok(vec![
            Effect::Metric(HaMetric::EpochAcked { epoch: newest, lag_ms }),
            Effect::Release { upto: f.covers, generation: self.generation },
        ])
    }

    /// The standby has no image to apply deltas on (it restarted): unless a full epoch is already
    /// on its way, the next capture is full, and the deltas in flight are dropped (their outputs
    /// are covered by that full epoch).
    pub fn on_need_full(&mut self) {
        if self.full_needed || self.in_flight.values().any(|f| f.full) || self.capturing.is_some_and(|c| c.full) {
            return;
        }
        self.full_needed = true;
        self.in_flight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tun() -> HaTunables {
        HaTunables { frame_pages: 2, max_epochs_in_flight: 2, retransmit_ms: 50, ..HaTunables::default() }
    }

    fn primary() -> CheckpointPrimary {
        CheckpointPrimary::new(VmId(7), NodeId(2), 3, 20, 1, tun(), 1_000)
    }

    fn sends(fx: &[Effect]) -> Vec<&Checkpoint> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Send { msg: HaMessage::Checkpoint(c), .. } => Some(c),
                _ => None,
            })
            .collect()
    }

    fn capture(p: &mut CheckpointPrimary, now: u64, pages: usize, outputs: u64) -> Vec<Effect> {
        let fx = p.tick(now);
        let Some(Effect::PauseAndCapture { epoch, .. }) = fx.last().cloned() else { panic!("no capture: {fx:?}") };
        let pages = (0..pages as u64).map(|i| (i * 2, vec![i as u8; 16])).collect();
        p.on_captured(epoch, pages, vec![9; 4], outputs, now + 2).unwrap()
    }

    #[test]
    fn an_epoch_is_paused_captured_sent_and_released_on_ack() {
        let mut p = primary();
        let fx = p.tick(1_000);
        assert_eq!(fx, vec![Effect::PauseAndCapture { epoch: 1, full: true }], "the first epoch is full, at once");
        assert!(p.tick(1_001).is_empty(), "one capture at a time");
        let pages = vec![(4, vec![1; 16]), (0, vec![2; 16]), (2, vec![3; 16])];
        let fx = p.on_captured(1, pages, vec![7; 3], 5, 1_003).unwrap();
        assert_eq!(fx[0], Effect::Unpause);
        let frames = sends(&fx);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].pages.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![0, 2], "sorted");
        assert!(!frames[0].last && frames[0].device_state.is_empty());
        assert!(frames[1].last && frames[1].device_state == vec![7; 3] && frames[1].frame == 1);
        assert!(frames.iter().all(|f| f.full && f.outputs == 5 && f.generation == 3 && f.epoch == 1));
        assert!(frames.iter().all(|f| f.validate().is_ok()));
        assert!(p.tick(1_010).is_empty(), "the next epoch runs for epoch_ms");
        let fx = p.on_ack(1, 1_030).unwrap();
        assert_eq!(fx[1], Effect::Release { upto: 5, generation: 3 });
        assert!(p.on_ack(1, 1_031).unwrap().is_empty(), "a duplicate ack releases nothing");
        assert!(matches!(p.on_ack(2, 1_031), Err(HaError::UnknownEpoch { .. })));
        let fx = p.tick(1_023);
        assert_eq!(fx, vec![Effect::PauseAndCapture { epoch: 2, full: false }]);
    }

    #[test]
    fn acks_are_cumulative_and_epochs_in_flight_are_bounded() {
        let mut p = primary();
        capture(&mut p, 1_000, 1, 1);
        capture(&mut p, 1_030, 3, 4);
        assert!(p.tick(1_060).iter().all(|e| !matches!(e, Effect::PauseAndCapture { .. })), "two epochs in flight");
        let fx = p.tick(1_120);
        assert_eq!(sends(&fx).len(), 3, "both epochs' frames are resent");
        assert!(fx.iter().all(|e| !matches!(e, Effect::PauseAndCapture { .. })));
        let fx = p.on_ack(2, 1_130).unwrap();
        assert!(fx.contains(&Effect::Release { upto: 4, generation: 3 }));
        assert_eq!(p.epochs_in_flight(), 0);
        assert!(matches!(p.tick(1_131).last(), Some(Effect::PauseAndCapture { epoch: 3, full: false })));
    }

    #[test]
    fn a_standby_without_a_base_gets_a_full_epoch_and_deltas_in_flight_are_dropped() {
        let mut p = primary();
        capture(&mut p, 1_000, 1, 1);
        p.on_ack(1, 1_010).unwrap();
        capture(&mut p, 1_030, 1, 2);
        p.on_need_full();
        assert_eq!(p.epochs_in_flight(), 0);
        let fx = p.tick(1_060);
        assert_eq!(fx, vec![Effect::PauseAndCapture { epoch: 3, full: true }]);
        p.on_need_full();
        assert!(p.on_ack(2, 1_061).unwrap().is_empty(), "a dropped epoch's ack releases nothing");
        p.on_captured(3, vec![], vec![], 3, 1_062).unwrap();
        assert!(p.on_ack(3, 1_070).unwrap().contains(&Effect::Release { upto: 3, generation: 3 }));
    }

    #[test]
    fn captures_the_core_did_not_ask_for_are_refused() {
        let mut p = primary();
        assert!(matches!(p.on_captured(1, vec![], vec![], 0, 1), Err(HaError::Capture { expected: None, got: 1 })));
        p.tick(1_000);
        let dup = vec![(1, vec![0; 16]), (1, vec![0; 16])];
        assert!(matches!(p.on_captured(1, dup, vec![], 0, 1_001), Err(HaError::DuplicatePage { page: 1 })));
        assert!(p.capturing().is_some(), "nothing changed");
    }

    #[test]
    fn pause_accounting_reports_quantiles() {
        let mut a = PauseAccounting::default();
        for pause_ms in (0..99).map(|_| 2).chain([40]) {
            a.record(&EpochReport { epoch: 1, full: false, pause_ms, epoch_ms: 20, pages: 3, bytes: 100 });
        }
        assert_eq!((a.epochs, a.pause_ms_max, a.bytes_total, a.pages_total), (100, 40, 10_000, 300));
        assert_eq!(a.pause_quantile_ms(0.5), 2);
        assert_eq!(a.pause_quantile_ms(0.99), 2);
        assert_eq!(a.pause_quantile_ms(1.0), 50);
        assert!((a.mean_pause_ms() - 2.38).abs() < 1e-9);
        let mut p = primary();
        let fx = capture(&mut p, 1_000, 3, 0);
        let Some(Effect::Metric(HaMetric::Epoch(r))) = fx.get(1) else { panic!("{fx:?}") };
        assert_eq!((r.pause_ms, r.pages, r.bytes, r.full, r.epoch_ms), (2, 3, 52, true, 20));
    }
}
