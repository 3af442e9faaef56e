//! The seed corpus of every fuzz target, written by the targets themselves: run a built target
//! with `HAVEN_FUZZ_WRITE_SEEDS=DIR` and it writes its seeds to `DIR/TARGET/` and exits
//! (`scripts/fuzz --gen-corpus` does this for all of them into `fuzz/corpus`). Each seed is a
//! small, valid instance of what its target decodes, built with Haven's own encoders, so the
//! fuzzer starts past the magic numbers and checksums. Only the disk stream nonces (drawn from
//! the clock, as a guest draws them) differ between runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::{guest_spec, GUEST_PAGES, IMAGE_PLAN, IMAGE_VM};
use haven_node::fuzz_api::{block_key, xor_encode};
use haven_node::nbd::protocol as p;
use haven_node::raft::{encode, Entry, HavenNode, TypeConfig};
use haven_node::vm::disk::{DiskGeometry, DiskLog};
use haven_node::vm::group::{encode_body, write_image_file};
use haven_node::vm::guest::{GuestDriver, SimulatedGuest, PAGE_SIZE};
use haven_node::vm::migration::{MAGIC, PROTOCOL_VERSION};
use haven_proto::{
    ActorAddr, Body, CatalogCommand, ClientCommand, ClientRequest, Envelope, ErrorCode, FrameHeader, NodeId,
    NodeRequest, RaftRpc, VmId, VolumeId, WireError,
};
use openraft::error::{Fatal, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership, SnapshotMeta, StoredMembership, Vote};

struct Corpus {
    root: PathBuf,
    /// The target whose seeds are wanted; the others' are skipped.
    only: String,
}

impl Corpus {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) {
        if target != self.only {
            return;
        }
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

fn with(first: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut v = first.to_vec();
    v.extend_from_slice(rest);
    v
}

fn envelopes(c: &Corpus) {
    let dest = ActorAddr::node(NodeId(2));
    let put = ClientCommand::KvPut { key: "k".into(), value: vec![1, 2, 3] };
    let propose = CatalogCommand::KvDelete { key: "k".into() };
    let cases = [
        ("client-write", Body::Client(ClientRequest::Write { command: put })),
        ("node-propose", Body::Node(NodeRequest::Propose { command: propose })),
        ("client-status", Body::Client(ClientRequest::Status)),
        ("raft-vote", Body::Raft { rpc: RaftRpc::Vote, payload: vec![7; 12] }),
        ("error", Body::Error(WireError::new(ErrorCode::InvalidRequest, "no"))),
    ];
    for (name, body) in cases {
        let bytes = Envelope::new(9, NodeId(1), dest, body).encode().unwrap();
        c.put("envelope", name, &bytes);
    }
}

fn frames(c: &Corpus) {
    let mut stream = 64u32.to_le_bytes().to_vec();
    stream.extend_from_slice(&FrameHeader::encode(10).unwrap());
    for body in [&b"hello"[..], &[0u8; 20][..]] {
        stream.extend_from_slice(&FrameHeader::encode(body.len()).unwrap());
        stream.extend_from_slice(body);
    }
    c.put("frame_header", "two-frames", &stream);
    c.put("frame_header", "too-large", &with(&u32::MAX.to_le_bytes(), &[0xff, 0, 0, 0]));
}

fn raft(c: &Corpus) {
    let leader = CommittedLeaderId::new(2, 1);
    let vote = Vote::new_committed(2, 1);
    let nodes: BTreeMap<u64, HavenNode> = (1..=3)
        .map(|i| (i, HavenNode { addr: format!("127.0.0.1:70{i}0"), admin_addr: format!("127.0.0.1:80{i}0") }))
        .collect();
    let membership = Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes);
    let entries: Vec<Entry> = vec![
        Entry { log_id: LogId::new(leader, 5), payload: EntryPayload::Blank },
        Entry {
            log_id: LogId::new(leader, 6),
            payload: EntryPayload::Normal(CatalogCommand::KvPut { key: "k".into(), value: vec![1, 2] }),
        },
        Entry { log_id: LogId::new(leader, 7), payload: EntryPayload::Membership(membership.clone()) },
    ];
    let append = AppendEntriesRequest::<TypeConfig> {
        vote,
        prev_log_id: Some(LogId::new(leader, 4)),
        entries: entries.clone(),
        leader_commit: Some(LogId::new(leader, 4)),
    };
    let snapshot = InstallSnapshotRequest::<TypeConfig> {
        vote,
        meta: SnapshotMeta {
            last_log_id: Some(LogId::new(leader, 7)),
            last_membership: StoredMembership::new(Some(LogId::new(leader, 7)), membership),
            snapshot_id: "2-1-7".into(),
        },
        offset: 0,
        data: vec![1, 2, 3, 4],
        done: true,
    };
    let put = |which: u8, name: &str, bytes: Vec<u8>| c.put("raft_rpc", name, &with(&[which], &bytes));
    put(0, "append-entries", haven_node::raft::network::encode_append_frame(Some(12), &append).unwrap());
    put(1, "vote", encode(&VoteRequest::new(vote, Some(LogId::new(leader, 7)))).unwrap());
    put(2, "install-snapshot", encode(&snapshot).unwrap());
    let ok: Result<AppendEntriesResponse<u64>, RaftError<u64>> = Ok(AppendEntriesResponse::Success);
    put(3, "append-reply", encode(&ok).unwrap());
    let granted: Result<VoteResponse<u64>, RaftError<u64>> = Ok(VoteResponse::new(vote, None, true));
    put(4, "vote-reply", encode(&granted).unwrap());
    let stopped: Result<InstallSnapshotResponse<u64>, RaftError<u64, openraft::error::InstallSnapshotError>> =
        Err(RaftError::Fatal(Fatal::Stopped));
    put(5, "snapshot-reply-error", encode(&stopped).unwrap());
    put(6, "entry", encode(&entries[1]).unwrap());
}

fn nbd_request(kind: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    p::encode_request(&p::Request { flags, kind, handle, offset, len }).to_vec()
}

fn nbd(c: &Corpus) {
    c.put("nbd_protocol", "request", &nbd_request(p::CMD_WRITE, p::CMD_FLAG_FUA, 1, 4096, 512));
    c.put("nbd_protocol", "info-request", &p::encode_info_request("disk", &[p::INFO_NAME, p::INFO_BLOCK_SIZE]));
    c.put("nbd_protocol", "option", &p::encode_option(p::OPT_GO, b"xy"));
    c.put("nbd_protocol", "flags", &[0, 0, 0, 3]);

    let flags = (p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES).to_be_bytes();
    // GO to the writable disk, then write, read back, flush, write zeroes, trim, a refused read
    // past the end, and disconnect.
    let mut s = flags.to_vec();
    s.extend(p::encode_option(p::OPT_GO, &p::encode_info_request("disk", &[p::INFO_NAME])));
    s.extend(nbd_request(p::CMD_WRITE, p::CMD_FLAG_FUA, 1, 512, 1024));
    s.extend(vec![0xab; 1024]);
    s.extend(nbd_request(p::CMD_READ, 0, 2, 0, 2048));
    s.extend(nbd_request(p::CMD_FLUSH, 0, 3, 0, 0));
    s.extend(nbd_request(p::CMD_WRITE_ZEROES, p::CMD_FLAG_NO_HOLE, 4, 0, 512));
    s.extend(nbd_request(p::CMD_TRIM, 0, 5, 1024, 512));
    s.extend(nbd_request(p::CMD_READ, 0, 6, 64 * 1024, 512));
    s.extend(nbd_request(p::CMD_DISC, 0, 7, 0, 0));
    c.put("nbd_session", "go-write-read", &s);
    // The old-style EXPORT_NAME to the read-only export; a write refused with EPERM (payload
    // skipped), then a read.
    let mut s = p::FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    s.extend(p::encode_option(p::OPT_EXPORT_NAME, b"ro"));
    s.extend(nbd_request(p::CMD_WRITE, 0, 1, 0, 4096));
    s.extend(vec![1; 4096]);
    s.extend(nbd_request(p::CMD_READ, 0, 2, 4096, 4096));
    c.put("nbd_session", "export-name-ro", &s);
    // Haggling only: LIST, INFO for an unknown export, an unsupported option, ABORT.
    let mut s = flags.to_vec();
    s.extend(p::encode_option(p::OPT_LIST, &[]));
    s.extend(p::encode_option(p::OPT_INFO, &p::encode_info_request("nope", &[])));
    s.extend(p::encode_option(p::OPT_INFO, &p::encode_info_request("ro", &[p::INFO_DESCRIPTION])));
    s.extend(p::encode_option(p::OPT_STRUCTURED_REPLY, &[]));
    s.extend(p::encode_option(p::OPT_ABORT, &[]));
    c.put("nbd_session", "haggle-abort", &s);
}

fn migration(c: &Corpus) {
    // XOR codec: a length-limited delta of a page built from a short seed, with a few edits.
    let mut x = vec![0x00, 0x10, 4, 1, 2, 3, 4, 3];
    for (at, run, xor) in [(10u16, 3u16, 0xffu8), (200, 40, 0x11), (4000, 96, 0x80)] {
        x.extend_from_slice(&at.to_le_bytes());
        x.extend_from_slice(&run.to_le_bytes());
        x.push(xor);
    }
    let (old, mut new) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    new[100..140].fill(9);
    let mut delta = Vec::new();
    assert!(xor_encode(&new, &old, &mut delta, PAGE_SIZE));
    x.extend_from_slice(&delta);
    c.put("migration_xor", "edits-and-delta", &x);

    // Destination streams (mode 3: handshake prepended, Complete digest fixed): pages as zero,
    // XOR and full encodings, a Sync, the vCPU state, Complete.
    let frame = |kind: u8, payload: &[u8]| {
        let mut f = vec![kind];
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut pages = 1u32.to_le_bytes().to_vec();
    pages.extend_from_slice(&3u16.to_le_bytes());
    pages.extend_from_slice(&0u64.to_le_bytes());
    pages.push(0); // zero
    pages.extend_from_slice(&5u64.to_le_bytes());
    pages.push(2); // xor
    pages.extend_from_slice(&(delta.len() as u16).to_le_bytes());
    pages.extend_from_slice(&delta);
    pages.extend_from_slice(&(GUEST_PAGES - 1).to_le_bytes());
    pages.push(1); // full
    pages.extend((0..PAGE_SIZE).map(|i| (i % 251) as u8));
    let source = SimulatedGuest::new(guest_spec());
    let mut s = vec![3u8];
    s.extend(frame(0x02, &pages));
    s.extend(frame(0x06, &[]));
    s.extend(frame(0x03, &source.vcpu_state()));
    s.extend(frame(0x04, &[0; 32]));
    c.put("migration_destination", "pages-vcpu-complete", &s);
    let mut s = vec![1u8];
    s.extend(frame(0x05, b"operator"));
    c.put("migration_destination", "abort", &s);
    let mut s = vec![2u8];
    s.extend_from_slice(&MAGIC);
    s.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    s.extend(frame(0x01, &[0; 16]));
    c.put("migration_destination", "bad-hello", &s);

    // Source targets' destination replies (mode 3: header and HelloAck prepended, Ready digest
    // fixed): a successful exchange, and a refusal.
    let mut s = vec![3u8];
    s.extend(frame(0x84, &[]));
    s.extend(frame(0x82, &[0; 32]));
    c.put("migration_source", "sync-ready", &s);
    let mut s = vec![1u8];
    s.extend(frame(0x83, b"no room"));
    c.put("migration_source", "failed", &s);
}

fn guest_with_disks() -> std::sync::Arc<SimulatedGuest> {
    let g = SimulatedGuest::new(guest_spec());
    g.step(3);
    let disks =
        [DiskGeometry::of_volume(11, 1 << 20, 4096).unwrap(), DiskGeometry::of_volume(12, 64 << 10, 512).unwrap()];
    g.set_disks(&disks);
    g.fork_disk_timeline();
    g
}

fn vm_state(c: &Corpus) {
    let strip = |s: Vec<u8>| s[..s.len() - 32].to_vec();
    let fresh = SimulatedGuest::new(guest_spec());
    c.put("vcpu_state", "fresh", &with(&[1], &strip(fresh.vcpu_state())));
    c.put("vcpu_state", "with-disks", &with(&[0x21], &strip(guest_with_disks().vcpu_state())));
    c.put("vcpu_state", "unchecked", &with(&[0], &fresh.vcpu_state()));

    for (i, log) in guest_with_disks().disk_journal().iter().enumerate() {
        let mut b = Vec::new();
        log.encode(&mut b);
        b.extend_from_slice(&[3, 1, 0, 0, 0, 0, 0, 0, 0, 2]);
        c.put("disk_journal", &format!("disk-{i}"), &b);
    }
    let mut b = Vec::new();
    DiskLog::new(DiskGeometry::of_volume(1, 4096, 512).unwrap(), 99).encode(&mut b);
    c.put("disk_journal", "new", &b);
}

fn images(c: &Corpus, scratch: &Path) {
    for (name, writes) in [("empty", 0u64), ("one-page", 1)] {
        let g = guest_with_disks();
        let g2 = SimulatedGuest::new(guest_spec());
        g2.load_vcpu_state(&g.vcpu_state()).unwrap();
        g2.step(writes);
        let path = scratch.join(format!("{name}.img"));
        write_image_file(&path, |w| encode_body(g2.as_ref(), IMAGE_PLAN, VmId(IMAGE_VM), w)).unwrap();
        let file = std::fs::read(&path).unwrap();
        // Mode 7: checksums and digests fixed by the target, trailer appended.
        c.put("recovery_image", name, &with(&[7], &file[..file.len() - 32]));
    }
}

fn blockstore(c: &Corpus) {
    let vol = VolumeId(7);
    let mut b = vol.0.to_le_bytes().to_vec();
    b.push(24);
    b.extend_from_slice(&block_key(vol, 3, 9));
    b.extend_from_slice(&[1; 32]);
    b.extend_from_slice(&[3, 0x61, 0xff, 0xff]);
    c.put("blockstore_keys", "key", &b);
    let mut m = vec![1u8];
    for v in [5u64, 9, 3] {
        m.push(0);
        m.extend_from_slice(&v.to_be_bytes());
    }
    m.extend_from_slice(&[0xc3, 1, 2, 3]);
    c.put("blockstore_keys", "merge-poisoned", &m);
}

/// `ha_pair`: a standby taking a full one-frame epoch and a takeover order; a primary issuing
/// an output, capturing and hearing the acknowledgement (see the target's byte grammar).
fn ha(c: &Corpus) {
    // Standby (bit 0 clear), redundant: a checkpoint frame of generation 1 (vm byte 0), kind 0,
    // two pages, flags full|last, device state, epoch 1, frame 0; then a takeover at 2.
    let mut s = vec![0u8];
    s.extend_from_slice(&[5, 0, 1, 0, 0, 2, 1, 4, 1, 2, 3, 4, 3, 4, 9, 9, 9, 9, 3, 2, 7, 7, 1, 0, 0]);
    s.extend_from_slice(&[5, 1, 1, 2, 0, 6]);
    c.put("ha_pair", "standby-epoch-takeover", &s);
    // Primary (bit 0 set): an output, ticks, a capture of epoch 1, an acknowledgement.
    let p = vec![1u8, 1, 4, 1, 1, 2, 3, 4, 60, 7, 10, 7, 1, 5, 3, 9, 1, 1, 0, 1, 3, 1, 1];
    c.put("ha_pair", "primary-output-ack", &p);
}

/// If `HAVEN_FUZZ_WRITE_SEEDS` is set, writes `target`'s seeds under it and exits the process;
/// otherwise does nothing. Every target calls this from its `init`.
pub fn write_if_asked(target: &str) {
    let Some(root) = std::env::var_os("HAVEN_FUZZ_WRITE_SEEDS") else { return };
    let c = Corpus { root: PathBuf::from(root), only: target.to_string() };
    let scratch = std::env::temp_dir().join(format!("haven-fuzz-seeds-{}", std::process::id()));
    envelopes(&c);
    frames(&c);
    raft(&c);
    nbd(&c);
    migration(&c);
    vm_state(&c);
    images(&c, &scratch);
    blockstore(&c);
    ha(&c);
    let _ = std::fs::remove_dir_all(&scratch);
    let dir = c.root.join(target);
    let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert!(n > 0, "no seeds for fuzz target {target}");
    println!("{n} seeds for {target} in {}", dir.display());
    std::process::exit(0);
}
