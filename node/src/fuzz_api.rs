//! Entry points for the fuzz targets in `fuzz/` (not a stable API; hidden from the docs).
//!
//! The decoders the fuzzers drive are mostly public already (`Envelope`, `raft::decode`,
//! `nbd::protocol`, `migrate_destination`, `DiskLog::decode`, `load_image`). This module exposes
//! the few that are private to their modules — the XOR delta codec of the migration stream, the
//! block store's key layout and high-water merge, and one NBD connection over an arbitrary byte
//! stream — as thin wrappers, so their modules keep their own visibility. Nothing here adds
//! behaviour.

use std::net::SocketAddr;
use std::sync::Arc;

use haven_proto::VolumeId;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::nbd::{ExportResolver, NbdServerConfig};
use crate::volume::blockstore::BlockStoreError;

/// Encodes `new XOR old` as a migration XOR delta into `out`; false once `out` would exceed
/// `limit` bytes (see `vm::migration`).
pub fn xor_encode(new: &[u8], old: &[u8], out: &mut Vec<u8>, limit: usize) -> bool {
    crate::vm::migration::xor_encode(new, old, out, limit)
}

/// Checks a migration XOR delta and, given a page, XORs it in; a malformed delta is an error.
pub fn xor_apply(enc: &[u8], page: Option<&mut [u8]>) -> Result<(), crate::vm::migration::MigrationError> {
    crate::vm::migration::xor_apply(enc, page)
}

/// The `blocks` key of version `seq` of `block` of `vol`.
pub fn block_key(vol: VolumeId, block: u64, seq: u64) -> [u8; 24] {
    crate::volume::blockstore::block_key(vol, block, seq)
}

/// (block, seq) of a `blocks` key that must belong to `vol`.
pub fn parse_block_key(vol: VolumeId, key: &[u8]) -> Result<(u64, u64), BlockStoreError> {
    crate::volume::blockstore::parse_block_key(vol, key)
}

/// The smallest key above every key starting with `prefix` (`None` if the prefix is all 0xFF).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    crate::volume::blockstore::prefix_end(prefix)
}

/// The high-water merge operator over the existing value followed by the operands.
pub fn hwm_merge<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    crate::volume::blockstore::hwm_merge_values(values)
}

/// Serves one NBD connection (handshake and transmission) over `stream` until the client
/// leaves; what a TCP connection of `nbd::serve` gets, without a socket.
pub async fn nbd_serve_connection<S>(stream: S, resolver: Arc<dyn ExportResolver>, config: NbdServerConfig)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let peer = SocketAddr::from(([127, 0, 0, 1], 0));
    // Never signalled: the connection ends when the client does.
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    crate::nbd::server::serve_connection(stream, peer, resolver, Arc::new(config), stop_rx).await
}
