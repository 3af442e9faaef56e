//! One host's part in an HA pair (`ha::core::PairHost`) fed hostile messages: checkpoint frames
//! (any epoch, frame, page numbers and sizes, device state), acknowledgements, application
//! snapshots and updates, seals, takeover orders and refusals, from any sender, interleaved with
//! pair records of other generations, outputs, captures and ticks. The host starts as the
//! standby of generation 1 (first input bit clear) or as the primary running the guest.
//!
//! Properties: no panic; a refused event changes nothing (the host equals its clone from before
//! the event); `sealed_below` only grows, and nothing ever leaves the host acknowledging a
//! generation below it (no `CheckpointAck`/`AppAck` of an older generation in any effect); the
//! guest runs only in role `Primary` (no `StartGuest` without the host becoming primary).
#![no_main]

use haven_fuzz::Bytes;
use haven_node::ha::core::standby::ImageShape;
use haven_node::ha::core::{Effect, HaTunables, PairHost, Role};
use haven_proto::ha::{
    AppAck, AppSnapshot, AppUpdate, Checkpoint, CheckpointAck, HaMessage, HaMode, HaPairRecord, HaRefusal, PairState,
};
use haven_proto::ids::{NodeId, VmId};
use libfuzzer_sys::fuzz_target;

const VM: VmId = VmId(7);
const ME: NodeId = NodeId(2);
const SHAPE: ImageShape = ImageShape { pages: 8, page_size: 64 };

fn record(generation: u64, primary: u64, standby: Option<u64>, multi: bool) -> HaPairRecord {
    let mode = if multi { HaMode::MultiOperation } else { HaMode::Redundant { epoch_ms: 10 } };
    HaPairRecord {
        vm: VM,
        primary: NodeId(primary),
        standby: standby.map(NodeId),
        mode,
        state: if standby.is_some() { PairState::Protecting } else { PairState::Degraded },
        generation,
        failovers: 0,
        last_failover: None,
    }
}

/// Up to `max - 1` bytes, the count read first.
fn bytes(b: &mut Bytes, max: u8) -> Vec<u8> {
    let n = usize::from(b.u8() % max);
    b.take(n).to_vec()
}

fn message(b: &mut Bytes) -> HaMessage {
    let generation = u64::from(b.u8() % 6);
    let vm = if b.u8() == 0xff { VmId(9) } else { VM };
    match b.u8() % 10 {
        0 => {
            let n = usize::from(b.u8() % 5);
            let pages = (0..n)
                .map(|_| {
                    let page = u64::from(b.u8() % 12);
                    (page, bytes(b, 80))
                })
                .collect();
            let flags = b.u8();
            let last = flags & 2 != 0;
            let device_state = if last { bytes(b, 16) } else { Vec::new() };
            HaMessage::Checkpoint(Checkpoint {
                vm,
                generation,
                epoch: u64::from(b.u8() % 8),
                frame: u32::from(b.u8() % 4),
                full: flags & 1 != 0,
                last,
                outputs: u64::from(b.u8()),
                pages,
                device_state,
            })
        }
        1 => HaMessage::CheckpointAck(CheckpointAck { vm, generation, epoch: u64::from(b.u8() % 8) }),
        2 => HaMessage::AppSnapshot(AppSnapshot {
            vm,
            generation,
            seq: u64::from(b.u8() % 16),
            state: bytes(b, 16),
        }),
        3 => HaMessage::AppUpdate(AppUpdate {
            vm,
            generation,
            seq: u64::from(b.u8() % 16),
            data: bytes(b, 8),
        }),
        4 => HaMessage::AppAck(AppAck { vm, generation, seq: u64::from(b.u8() % 16) }),
        5 => HaMessage::Seal { vm, generation },
        6 => HaMessage::TakeOver { vm, generation },
        7 => {
            let refusal = match b.u8() % 4 {
                0 => HaRefusal::Generation { generation },
                1 => HaRefusal::Sealed { generation },
                2 => HaRefusal::NeedFull,
                _ => HaRefusal::NeedSnapshot,
            };
            HaMessage::Refused { vm, generation, refusal }
        }
        8 => HaMessage::TookOver { vm, generation },
        _ => HaMessage::CannotTakeOver { vm, generation, lost: b.u8() & 1 != 0 },
    }
}

/// Acknowledgements leaving the host, with their generations.
fn acks(fx: &[Effect]) -> Vec<u64> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Send { msg: HaMessage::CheckpointAck(a), .. } => Some(a.generation),
            Effect::Send { msg: HaMessage::AppAck(a), .. } => Some(a.generation),
            _ => None,
        })
        .collect()
}

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("ha_pair"), |data: &[u8]| {
    let mut b = Bytes::new(data);
    let start = b.u8();
    let tun = HaTunables::default();
    let multi = start & 2 != 0;
    let mut host = if start & 1 == 0 {
        let mut h = PairHost::new(ME, VM, SHAPE, tun, Default::default());
        let _ = h.on_record(&record(1, 1, Some(2), multi), 0);
        h
    } else {
        PairHost::running_here(ME, &record(1, 2, Some(3), multi), SHAPE, tun, 0, 0).expect("a valid record").0
    };
    let mut now = 0u64;
    for _ in 0..64 {
        if b.is_empty() {
            break;
        }
        let before = host.clone();
        let sealed = host.durable.sealed_below;
        now += u64::from(b.u8());
        let result = match b.u8() % 8 {
            0 | 1 | 2 => {
                let from = NodeId(u64::from(b.u8() % 4));
                let msg = message(&mut b);
                host.on_message(from, &msg, now)
            }
            3 => {
                let g = u64::from(b.u8() % 6) + 1;
                let (p, s) = (u64::from(b.u8() % 4), u64::from(b.u8() % 4));
                let standby = (s != p && s != 0).then_some(s);
                host.on_record(&record(g, p.max(1), standby, b.u8() & 1 != 0), now)
            }
            4 => host.on_output(u64::from(b.u8()), b.take(4).to_vec(), now),
            5 => {
                let pages = vec![(u64::from(b.u8() % 8), vec![b.u8(); 64])];
                host.on_captured(u64::from(b.u8() % 8), pages, vec![1, 2], now)
            }
            6 => host.on_app_state(u64::from(b.u8() % 4), u64::from(b.u8()), vec![3], now),
            _ => Ok(host.tick(now)),
        };
        match result {
            Err(_) => assert_eq!(host, before, "a refused event changed the host"),
            Ok(fx) => {
                assert!(host.durable.sealed_below >= sealed, "the seal went back");
                for g in acks(&fx) {
                    assert!(g >= host.durable.sealed_below, "acknowledged generation {g} below the seal");
                }
                let starts = fx.iter().any(|e| matches!(e, Effect::StartGuest { .. }));
                assert!(!starts || matches!(host.role(), Role::Primary(_)), "a guest started outside the primary role");
            }
        }
    }
});
