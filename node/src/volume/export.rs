//! Volumes as NBD exports: every volume is an export named after it (read-write, through its
//! primary), and every complete snapshot is a read-only export named `<volume>@<snapshot>`.
//!
//! This module only adapts [`VolumeHost`] to the NBD server's [`ExportResolver`] and
//! [`ExportBackend`] traits and maps errors to NBD errnos; the NBD server has already checked
//! offsets, lengths and alignment against [`ExportInfo`] before a call reaches here (a TRIM may
//! be unaligned: it is advisory, so only the whole blocks inside it are zeroed, see
//! [`trim_blocks`]; TRIM and WRITE_ZEROES of any length are one zeroing request to the primary), and decided
//! what the connection may open (it serves a volume read-only to a `reader` certificate, and
//! lists a connection only what it may open, using [`ExportListing::read_only`]).

use std::sync::Arc;

use futures::future::BoxFuture;
use haven_proto::volume::{SnapshotRecord, VolumeRecord};
use haven_proto::{ErrorCode, VolumeId};

use super::error::VolumeError;
use super::host::VolumeHost;
use crate::nbd::{BackendError, ExportBackend, ExportInfo, ExportListing, ExportResolver, NbdErrno};

/// Resolves export names against the catalog.
pub struct VolumeExports {
    host: Arc<VolumeHost>,
}

impl VolumeExports {
    pub fn new(host: Arc<VolumeHost>) -> Arc<Self> {
        Arc::new(Self { host })
    }
}

fn to_backend(e: VolumeError) -> BackendError {
    let errno = match e.code() {
        ErrorCode::InvalidRequest => NbdErrno::Inval,
        ErrorCode::NotFound => NbdErrno::Inval,
        _ => NbdErrno::Io,
    };
    BackendError::new(errno, e.to_string())
}

fn store_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::new(NbdErrno::Io, e.to_string())
}

impl ExportResolver for VolumeExports {
    fn list(&self) -> BoxFuture<'static, Result<Vec<ExportListing>, BackendError>> {
        let store = self.host.store().clone();
        Box::pin(async move {
            let mut exports = Vec::new();
            for v in crate::catalog::volumes::volumes(&store).map_err(store_err)? {
                exports.push(ExportListing { name: v.name.clone(), read_only: false });
                for s in crate::catalog::volumes::snapshots(&store, v.id).map_err(store_err)? {
                    if s.complete {
                        exports.push(ExportListing { name: format!("{}@{}", v.name, s.name), read_only: true });
                    }
                }
            }
            Ok(exports)
        })
    }

    fn open(&self, name: &str) -> BoxFuture<'static, Result<Arc<dyn ExportBackend>, BackendError>> {
        let host = self.host.clone();
        let name = name.to_string();
        Box::pin(async move {
            let store = host.store().clone();
            let (vol_name, snap_name) = match name.split_once('@') {
                Some((v, s)) => (v.to_string(), Some(s.to_string())),
                None => (name.clone(), None),
            };
            let unknown = || BackendError::new(NbdErrno::Inval, format!("no export named {name:?}"));
            let volume =
                crate::catalog::volumes::find_volume(&store, &vol_name).map_err(store_err)?.ok_or_else(unknown)?;
            let snapshot = match snap_name {
                Some(s) => Some(
                    crate::catalog::volumes::snapshots(&store, volume.id)
                        .map_err(store_err)?
                        .into_iter()
                        .find(|r| r.complete && (r.name == s || r.id.to_string() == s))
                        .ok_or_else(unknown)?,
                ),
                None => None,
            };
            let backend: Arc<dyn ExportBackend> = Arc::new(VolumeExport { host, volume: volume.id, snapshot });
            Ok(backend)
        })
    }
}

/// One open export of a volume (or of one of its snapshots, read-only).
pub struct VolumeExport {
    host: Arc<VolumeHost>,
    volume: VolumeId,
    snapshot: Option<SnapshotRecord>,
}

impl VolumeExport {
    fn record(&self) -> Option<VolumeRecord> {
        crate::catalog::volumes::volume(self.host.store(), self.volume).ok().flatten()
    }
}

impl VolumeExport {
    fn zero(&self, first: u64, count: u64, fua: bool) -> BoxFuture<'static, Result<(), BackendError>> {
        let (host, vol) = (self.host.clone(), self.volume);
        Box::pin(async move { host.zero_blocks(vol, first, count, fua).await.map(|_| ()).map_err(to_backend) })
    }
}

/// The whole blocks `(first, count)` inside the byte range `offset..offset + len`, or `None`
/// when it covers no whole block (a TRIM inside one block is a successful no-op).
pub fn trim_blocks(offset: u64, len: u32, block_size: u32) -> Option<(u64, u64)> {
    let bs = u64::from(block_size.max(1));
    let first = offset.div_ceil(bs);
    let end = offset.checked_add(u64::from(len))? / bs;
    (end > first).then(|| (first, end - first))
}

impl ExportBackend for VolumeExport {
    fn info(&self) -> ExportInfo {
        let rec = self.record();
        let (size, block_size, name) =
            rec.map_or((0, 4096, self.volume.to_string()), |r| (r.size_bytes, r.block_size, r.name));
        ExportInfo {
            size,
            block_size,
            read_only: self.snapshot.is_some(),
            description: match &self.snapshot {
                Some(s) => format!("Haven snapshot {} of volume {name} (read-only)", s.name),
                None => format!("Haven volume {name} ({})", self.volume),
            },
        }
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<Vec<u8>, BackendError>> {
        let (host, vol, snap) = (self.host.clone(), self.volume, self.snapshot.as_ref().map(|s| s.id));
        Box::pin(async move { host.read_from(vol, offset, len, snap).await.map_err(to_backend) })
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'static, Result<(), BackendError>> {
        let (host, vol) = (self.host.clone(), self.volume);
        Box::pin(async move { host.write_to(vol, offset, data, fua).await.map(|_| ()).map_err(to_backend) })
    }

    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'static, Result<(), BackendError>> {
        // The server refuses unaligned WRITE_ZEROES (the advertised minimum block size), so the
        // range is whole blocks; a bogus one is refused by the primary.
        let bs = u64::from(self.info().block_size.max(1));
        self.zero(offset / bs, u64::from(len) / bs, fua)
    }

    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<(), BackendError>> {
        // Trimmed blocks read back as zeroes, so a trim zeroes the whole blocks it covers.
        match trim_blocks(offset, len, self.info().block_size) {
            Some((first, count)) => self.zero(first, count, false),
            None => Box::pin(async { Ok(()) }),
        }
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), BackendError>> {
        let (host, vol) = (self.host.clone(), self.volume);
        Box::pin(async move { host.flush(vol).await.map_err(to_backend) })
    }
}

#[cfg(test)]
mod tests {
    use super::trim_blocks;

    #[test]
    fn trims_keep_only_the_whole_blocks_inside() {
        assert_eq!(trim_blocks(0, 4096, 4096), Some((0, 1)));
        assert_eq!(trim_blocks(1000, 4096, 4096), None);
        assert_eq!(trim_blocks(1000, 3096, 4096), None);
        assert_eq!(trim_blocks(4096, 1000, 4096), None);
        assert_eq!(trim_blocks(1000, 8192, 4096), Some((1, 1)));
        assert_eq!(trim_blocks(4095, 8194, 4096), Some((1, 2)));
        assert_eq!(trim_blocks(0, u32::MAX, 4096), Some((0, (u64::from(u32::MAX) / 4096))));
        assert_eq!(trim_blocks(u64::MAX - 10, 100, 4096), None);
        assert_eq!(trim_blocks(3, 7, 0), Some((3, 7)));
    }
}
