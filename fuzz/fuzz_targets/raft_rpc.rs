//! The openraft RPC payload decoder (`raft::decode`: bincode with a size limit) on arbitrary
//! bytes, for every payload a node decodes from a peer — the four requests (AppendEntries in
//! its `AppendFrame`, and Haven's pre-vote), the four replies —
//! and a log entry as the log store reads it back. The first byte picks the type.
//!
//! Properties: no panic; peak allocation at most 32× the input plus 8 MiB (serde pre-allocates
//! at most 1 MiB per sequence it starts reading, whatever the announced length, so a constant
//! per nesting level is unavoidable with openraft's serde types); anything accepted re-encodes to
//! bytes that decode and re-encode to the same bytes (bincode maps deduplicate and reorder, so the
//! round trip is checked from the first re-encoding on).
#![no_main]

use haven_fuzz::{assert_alloc_bounded, measure};
use haven_node::raft::campaign::{PreVoteReply, PreVoteRequest};
use haven_node::raft::network::AppendFrame;
use haven_node::raft::{decode, encode, Entry, TypeConfig};
use libfuzzer_sys::fuzz_target;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn check<T: Serialize + DeserializeOwned>(what: &str, payload: &[u8]) {
    let (decoded, peak) = measure(|| decode::<T>(payload));
    assert_alloc_bounded(what, peak, payload.len(), 32, 8 << 20);
    let Ok(value) = decoded else { return };
    let bytes = encode(&value).unwrap_or_else(|e| panic!("{what}: a decoded value does not encode: {e}"));
    let again: T = decode(&bytes).unwrap_or_else(|e| panic!("{what}: a re-encoded value does not decode: {e}"));
    assert_eq!(encode(&again).unwrap(), bytes, "{what}: encode/decode round trip changed the value");
}

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("raft_rpc"), |data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else { return };
    match which % 9 {
        0 => check::<AppendFrame>("AppendEntries frame", payload),
        1 => check::<VoteRequest<u64>>("VoteRequest", payload),
        2 => check::<InstallSnapshotRequest<TypeConfig>>("InstallSnapshotRequest", payload),
        3 => check::<Result<AppendEntriesResponse<u64>, RaftError<u64>>>("AppendEntries reply", payload),
        4 => check::<Result<VoteResponse<u64>, RaftError<u64>>>("Vote reply", payload),
        5 => check::<Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>>(
            "InstallSnapshot reply",
            payload,
        ),
        6 => check::<Entry>("log entry", payload),
        7 => check::<PreVoteRequest>("PreVoteRequest", payload),
        _ => check::<PreVoteReply>("PreVote reply", payload),
    }
});
