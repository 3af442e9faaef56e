//! Durable state of the shares this node is a member of, two files per share: a snapshot,
//! `<data-dir>/shares/<id>.state`, of the whole member state (live copy, shadows, rounds) that
//! `share::core::member::Member` is, and a journal, `<id>.log`, of the events applied to it since
//! (`share::host` replays them through the same pure state machine on load). Persisting a step
//! appends one record (the size of the change, one `fdatasync`) instead of rewriting the whole
//! document; the host writes a new snapshot, and empties the journal, once the journal has grown
//! as large as the snapshot. It owns the file formats and nothing else.
//!
//! Snapshot: magic `HVSH`, format version (u32 LE), body length (u64 LE), the body (bincode), and
//! the body's CRC32C (u32 LE). It is written to `<id>.tmp`, fsynced, renamed into place and the
//! directory fsynced, so a crash leaves the old snapshot or the new one, never a mix; the journal
//! is emptied only after that. A snapshot that fails its checks is moved aside to
//! `<id>.corrupt` (kept for a human, never deleted) with its journal, and the member starts
//! without state: it resets from its hub, keeping nothing it cannot prove.
//!
//! Journal: records of body length (u32 LE), CRC32C of the body (u32 LE), body (bincode). Read
//! back up to the first record that is short or fails its checksum: a crash mid-append leaves
//! a torn tail, and the step it belonged to was never acknowledged (the append returns only
//! after `fdatasync`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use haven_proto::ShareId;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::ShareError;

const MAGIC: &[u8; 4] = b"HVSH";
const FORMAT: u32 = 1;
const HEADER_LEN: usize = 4 + 4 + 8;
const TRAILER_LEN: usize = 4;

/// Largest state file read back: a document, a shadow per peer and a pending round, each bounded
/// by `MAX_SHARE_DOC_BYTES`.
const MAX_STATE_BYTES: u64 =
    (haven_proto::share::MAX_SHARE_DOC_BYTES + 4096) * (haven_proto::share::MAX_SHARE_MEMBERS as u64 + 2);

#[derive(Debug, Clone)]
pub struct ShareFiles {
    dir: PathBuf,
}

fn io<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ShareError + 'a {
    move |e| ShareError::internal(format!("{what} {}: {e}", path.display()))
}

impl ShareFiles {
    /// The directory under `data_dir`, created if missing.
    pub fn open(data_dir: &Path) -> Result<Self, ShareError> {
        let dir = data_dir.join("shares");
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        Ok(Self { dir })
    }

    fn path(&self, id: ShareId, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", id.0))
    }

    /// Write `state` durably (see the module docs).
    pub fn save<T: Serialize>(&self, id: ShareId, state: &T) -> Result<(), ShareError> {
        let body = bincode::serialize(state).map_err(ShareError::internal)?;
        let mut bytes = Vec::with_capacity(HEADER_LEN + body.len() + TRAILER_LEN);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        let (tmp, path) = (self.path(id, "tmp"), self.path(id, "state"));
        let mut file = File::create(&tmp).map_err(io("creating", &tmp))?;
        file.write_all(&bytes).map_err(io("writing", &tmp))?;
        // Durable before any reply or acknowledgement that depends on it is released.
        file.sync_all().map_err(io("syncing", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io("renaming", &path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io("syncing", &self.dir))
    }

    /// Append one journal record durably; the journal's size after it.
    pub fn append<E: Serialize>(&self, id: ShareId, event: &E) -> Result<u64, ShareError> {
        let body = bincode::serialize(event).map_err(ShareError::internal)?;
        let len = u32::try_from(body.len()).map_err(|_| ShareError::internal("journal record over 4 GiB"))?;
        let mut record = Vec::with_capacity(8 + body.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        record.extend_from_slice(&body);
        let path = self.path(id, "log");
        let mut file = OpenOptions::new().create(true).append(true).open(&path).map_err(io("opening", &path))?;
        file.write_all(&record).map_err(io("appending to", &path))?;
        // Durable before the step's replies and acknowledgements are released.
        file.sync_data().map_err(io("syncing", &path))?;
        file.metadata().map(|m| m.len()).map_err(io("reading the size of", &path))
    }

    /// The journal's records, up to the first torn or damaged one.
    pub fn journal<E: DeserializeOwned>(&self, id: ShareId) -> Result<Vec<E>, ShareError> {
        let path = self.path(id, "log");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let mut events = Vec::new();
        let mut rest = &bytes[..];
        while rest.len() >= 8 {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            let Some(body) = rest.get(8..8 + len) else { break };
            if crc32c::crc32c(body) != crc {
                break;
            }
            match bincode::deserialize(body) {
                Ok(e) => events.push(e),
                Err(_) => break,
            }
            rest = &rest[8 + len..];
        }
        if !rest.is_empty() {
            tracing::warn!(share = %id, torn_bytes = rest.len(), "share journal ends in a torn record; dropped");
        }
        Ok(events)
    }

    /// Replace the snapshot with `state` and empty the journal (after the snapshot is durable).
    pub fn snapshot<T: Serialize>(&self, id: ShareId, state: &T) -> Result<(), ShareError> {
        self.save(id, state)?;
        let path = self.path(id, "log");
        match File::create(&path) {
            Ok(f) => f.sync_all().map_err(io("syncing", &path)),
            Err(e) => Err(io("emptying", &path)(e)),
        }
    }

    /// The saved state of `id`, if any. A file that fails its checks is moved aside and reported
    /// as absent (logged and counted).
    pub fn load<T: DeserializeOwned>(&self, id: ShareId) -> Result<Option<T>, ShareError> {
        let path = self.path(id, "state");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        match decode(&bytes) {
            Ok(state) => Ok(Some(state)),
            Err(reason) => {
                let aside = self.path(id, "corrupt");
                tracing::error!(share = %id, file = %path.display(), %reason, aside = %aside.display(),
                    "share state is damaged; moved aside, the member resets from its hub");
                metrics::counter!("haven_share_corrupt_state_total").increment(1);
                std::fs::rename(&path, &aside).map_err(io("moving aside", &path))?;
                // Its journal applies to that snapshot only.
                let log = self.path(id, "log");
                if log.exists() {
                    let log_aside = self.path(id, "corrupt-log");
                    std::fs::rename(&log, &log_aside).map_err(io("moving aside", &log))?;
                }
                Ok(None)
            }
        }
    }

    /// Forget `id` (this node is no longer a member, or the share was deleted).
    pub fn remove(&self, id: ShareId) -> Result<(), ShareError> {
        for ext in ["state", "log"] {
            let path = self.path(id, ext);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing", &path)(e)),
            }
        }
        Ok(())
    }

    /// The shares with a saved state, in id order.
    pub fn saved(&self) -> Result<Vec<ShareId>, ShareError> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io("listing", &self.dir))? {
            let name = entry.map_err(io("listing", &self.dir))?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".state").and_then(|n| n.parse::<u64>().ok()) {
                ids.push(ShareId(id));
            }
        }
        ids.sort();
        Ok(ids)
    }
}

/// Check and decode a state file's bytes.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() < HEADER_LEN + TRAILER_LEN || &bytes[..4] != MAGIC {
        return Err("not a share state file (magic or length)".into());
    }
    let format = u32::from_le_bytes(bytes[4..8].try_into().map_err(|_| "header")?);
    if format != FORMAT {
        return Err(format!("format {format}, this node reads {FORMAT}"));
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().map_err(|_| "header")?);
    if len > MAX_STATE_BYTES || len as usize != bytes.len() - HEADER_LEN - TRAILER_LEN {
        return Err(format!("body length {len} does not match the file's {} bytes", bytes.len()));
    }
    let body = &bytes[HEADER_LEN..bytes.len() - TRAILER_LEN];
    let crc = u32::from_le_bytes(bytes[bytes.len() - TRAILER_LEN..].try_into().map_err(|_| "trailer")?);
    if crc32c::crc32c(body) != crc {
        return Err("checksum mismatch".into());
    }
    bincode::deserialize(body).map_err(|e| format!("body does not decode: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_state_reads_back_and_damage_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let files = ShareFiles::open(dir.path()).unwrap();
        let state: Vec<(String, Vec<u8>)> = vec![("a".into(), vec![1, 2, 3])];
        assert_eq!(files.load::<Vec<(String, Vec<u8>)>>(ShareId(7)).unwrap(), None);
        files.save(ShareId(7), &state).unwrap();
        assert_eq!(files.load(ShareId(7)).unwrap(), Some(state.clone()));
        assert_eq!(files.saved().unwrap(), vec![ShareId(7)]);

        // Flip one byte of the body: refused, moved aside, not deleted.
        let path = dir.path().join("shares/7.state");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + 2] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(files.load::<Vec<(String, Vec<u8>)>>(ShareId(7)).unwrap(), None);
        assert!(dir.path().join("shares/7.corrupt").exists());
        assert!(files.saved().unwrap().is_empty());

        // Truncated and foreign files too.
        for bad in [&b"HVSH"[..], b"not a state file at all, not at all"] {
            std::fs::write(&path, bad).unwrap();
            assert_eq!(files.load::<Vec<(String, Vec<u8>)>>(ShareId(7)).unwrap(), None);
        }
        files.save(ShareId(7), &state).unwrap();
        files.remove(ShareId(7)).unwrap();
        assert_eq!(files.load::<Vec<(String, Vec<u8>)>>(ShareId(7)).unwrap(), None);
    }

    #[test]
    fn the_journal_reads_back_to_its_first_torn_record_and_a_snapshot_empties_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = ShareFiles::open(dir.path()).unwrap();
        let id = ShareId(3);
        assert!(files.journal::<String>(id).unwrap().is_empty());
        files.append(id, &"one".to_string()).unwrap();
        let size = files.append(id, &"two".to_string()).unwrap();
        assert_eq!(files.journal::<String>(id).unwrap(), ["one", "two"]);

        // A torn tail (a crash mid-append) and a damaged record are where reading stops.
        let path = dir.path().join("shares/3.log");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(files.journal::<String>(id).unwrap(), ["one", "two"]);
        bytes[size as usize - 1] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(files.journal::<String>(id).unwrap(), ["one"]);

        files.snapshot(id, &vec![1u8]).unwrap();
        assert!(files.journal::<String>(id).unwrap().is_empty());
        assert_eq!(files.load::<Vec<u8>>(id).unwrap(), Some(vec![1u8]));
    }
}
