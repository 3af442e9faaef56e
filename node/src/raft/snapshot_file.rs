//! The byte format of a state-machine snapshot, written and read as a stream so a catalog of any
//! size is snapshotted, sent and installed without holding it in memory as one buffer.
//!
//! Layout: the magic `HAVENSN2`, then one record per catalog pair — key length and value length
//! (u32, big-endian), key bytes, value bytes — then an end marker (a key length of `u32::MAX`),
//! the record count (u64) and the blake3 hash of everything before the marker. A reader
//! verifies lengths against fixed bounds before it allocates, and the count and hash at the end;
//! callers run [`verify`] over the whole stream before they change any state. Pure over
//! `std::io` readers and writers: this module must not know files, RocksDB or openraft.

use std::io::{self, Read, Write};

/// First bytes of every snapshot stream (format 2; format 1 was one bincode blob).
pub const MAGIC: &[u8; 8] = b"HAVENSN2";

/// The longest key a snapshot record may hold (catalog keys are short; see `catalog`).
pub const MAX_KEY_BYTES: u32 = 64 << 10;

/// The longest value a snapshot record may hold (catalog values are bounded by a frame).
pub const MAX_VALUE_BYTES: u32 = haven_proto::MAX_FRAME_LEN as u32;

const END_MARKER: u32 = u32::MAX;

/// One catalog pair: key, value.
pub type Record = (Vec<u8>, Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotFormatError {
    #[error("snapshot I/O: {0}")]
    Io(#[from] io::Error),
    #[error("not a Haven snapshot (format 2): bad magic {0:?}")]
    BadMagic([u8; 8]),
    #[error("snapshot record {record}: {what} of {len} bytes exceeds the {max}-byte limit")]
    TooLong { record: u64, what: &'static str, len: u32, max: u32 },
    #[error("snapshot ends after {records} records without its end marker")]
    Truncated { records: u64 },
    #[error("snapshot says it holds {claimed} records, but {found} were read")]
    CountMismatch { claimed: u64, found: u64 },
    #[error("snapshot content does not match its checksum")]
    ChecksumMismatch,
}

/// Writes a snapshot stream record by record.
pub struct SnapshotWriter<W: Write> {
    out: W,
    hasher: blake3::Hasher,
    records: u64,
}

impl<W: Write> SnapshotWriter<W> {
    pub fn new(mut out: W) -> Result<Self, SnapshotFormatError> {
        let mut hasher = blake3::Hasher::new();
        out.write_all(MAGIC)?;
        hasher.update(MAGIC);
        Ok(Self { out, hasher, records: 0 })
    }

    /// Append one catalog pair. Keys and values beyond the format's bounds are refused, so
    /// everything written can be read back.
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> Result<(), SnapshotFormatError> {
        let key_len = bounded_len(self.records, "key", key.len(), MAX_KEY_BYTES)?;
        let value_len = bounded_len(self.records, "value", value.len(), MAX_VALUE_BYTES)?;
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&key_len.to_be_bytes());
        header[4..].copy_from_slice(&value_len.to_be_bytes());
        for part in [&header[..], key, value] {
            self.out.write_all(part)?;
            self.hasher.update(part);
        }
        self.records += 1;
        Ok(())
    }

    /// Write the end marker, count and checksum; returns the writer and the record count.
    pub fn finish(mut self) -> Result<(W, u64), SnapshotFormatError> {
        self.out.write_all(&END_MARKER.to_be_bytes())?;
        self.out.write_all(&self.records.to_be_bytes())?;
        self.out.write_all(self.hasher.finalize().as_bytes())?;
        self.out.flush()?;
        Ok((self.out, self.records))
    }
}

fn bounded_len(record: u64, what: &'static str, len: usize, max: u32) -> Result<u32, SnapshotFormatError> {
    match u32::try_from(len) {
        Ok(l) if l <= max => Ok(l),
        _ => Err(SnapshotFormatError::TooLong { record, what, len: u32::try_from(len).unwrap_or(u32::MAX), max }),
    }
}

/// Reads a snapshot stream. Records come out as read; only after [`SnapshotReader::next_record`]
/// returned `None` has the whole stream been checked (count and checksum).
pub struct SnapshotReader<R: Read> {
    input: R,
    hasher: blake3::Hasher,
    records: u64,
    finished: bool,
}

impl<R: Read> SnapshotReader<R> {
    pub fn new(mut input: R) -> Result<Self, SnapshotFormatError> {
        let mut magic = [0u8; 8];
        read_exact(&mut input, &mut magic, 0)?;
        if &magic != MAGIC {
            return Err(SnapshotFormatError::BadMagic(magic));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(MAGIC);
        Ok(Self { input, hasher, records: 0, finished: false })
    }

    /// The next pair, or `None` at a verified end.
    pub fn next_record(&mut self) -> Result<Option<Record>, SnapshotFormatError> {
        if self.finished {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        read_exact(&mut self.input, &mut len, self.records)?;
        let key_len = u32::from_be_bytes(len);
        if key_len == END_MARKER {
            self.check_end()?;
            self.finished = true;
            return Ok(None);
        }
        self.hasher.update(&len);
        read_exact(&mut self.input, &mut len, self.records)?;
        self.hasher.update(&len);
        let value_len = u32::from_be_bytes(len);
        let record = self.records;
        let key_len = checked_len(record, "key", key_len, MAX_KEY_BYTES)?;
        let value_len = checked_len(record, "value", value_len, MAX_VALUE_BYTES)?;
        let mut key = vec![0u8; key_len];
        read_exact(&mut self.input, &mut key, record)?;
        let mut value = vec![0u8; value_len];
        read_exact(&mut self.input, &mut value, record)?;
        self.hasher.update(&key);
        self.hasher.update(&value);
        self.records += 1;
        Ok(Some((key, value)))
    }

    fn check_end(&mut self) -> Result<(), SnapshotFormatError> {
        let mut count = [0u8; 8];
        read_exact(&mut self.input, &mut count, self.records)?;
        let mut hash = [0u8; 32];
        read_exact(&mut self.input, &mut hash, self.records)?;
        let claimed = u64::from_be_bytes(count);
        if claimed != self.records {
            return Err(SnapshotFormatError::CountMismatch { claimed, found: self.records });
        }
        if blake3::Hash::from(hash) != self.hasher.finalize() {
            return Err(SnapshotFormatError::ChecksumMismatch);
        }
        Ok(())
    }
}

fn checked_len(record: u64, what: &'static str, len: u32, max: u32) -> Result<usize, SnapshotFormatError> {
    if len > max {
        return Err(SnapshotFormatError::TooLong { record, what, len, max });
    }
    Ok(len as usize)
}

fn read_exact(input: &mut impl Read, buf: &mut [u8], records: u64) -> Result<(), SnapshotFormatError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => SnapshotFormatError::Truncated { records },
        _ => SnapshotFormatError::Io(e),
    })
}

/// Read a whole stream, checking every bound, the count and the checksum; returns the count.
pub fn verify(input: impl Read) -> Result<u64, SnapshotFormatError> {
    let mut reader = SnapshotReader::new(input)?;
    while reader.next_record()?.is_some() {}
    Ok(reader.records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut w = SnapshotWriter::new(Vec::new()).unwrap();
        for (k, v) in pairs {
            w.push(k, v).unwrap();
        }
        let (bytes, count) = w.finish().unwrap();
        assert_eq!(count, pairs.len() as u64);
        bytes
    }

    #[test]
    fn round_trip() {
        let bytes = sample(&[(b"a", b"1"), (b"kv/b", &[9u8; 1000]), (b"c", b"")]);
        let mut r = SnapshotReader::new(&bytes[..]).unwrap();
        assert_eq!(r.next_record().unwrap(), Some((b"a".to_vec(), b"1".to_vec())));
        assert_eq!(r.next_record().unwrap().unwrap().1.len(), 1000);
        assert_eq!(r.next_record().unwrap(), Some((b"c".to_vec(), vec![])));
        assert_eq!(r.next_record().unwrap(), None);
        assert_eq!(r.next_record().unwrap(), None);
        assert_eq!(verify(&sample(&[])[..]).unwrap(), 0);
    }

    #[test]
    fn damage_is_caught() {
        let bytes = sample(&[(b"a", b"1"), (b"b", b"2")]);
        let mut flipped = bytes.clone();
        flipped[17] ^= 1; // the first value (after magic, lengths and key)
        assert!(matches!(verify(&flipped[..]), Err(SnapshotFormatError::ChecksumMismatch)));
        for cut in [3, 8, 12, bytes.len() - 1] {
            assert!(matches!(verify(&bytes[..cut]), Err(SnapshotFormatError::Truncated { .. })), "cut at {cut}");
        }
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(matches!(verify(&magic[..]), Err(SnapshotFormatError::BadMagic(_))));
        // A forged length is refused before anything is allocated.
        let mut long = MAGIC.to_vec();
        long.extend_from_slice(&1u32.to_be_bytes());
        long.extend_from_slice(&(MAX_VALUE_BYTES + 1).to_be_bytes());
        assert!(matches!(verify(&long[..]), Err(SnapshotFormatError::TooLong { what: "value", .. })));
        // A count that disagrees with the records.
        let mut count = bytes.clone();
        let at = count.len() - 32 - 8;
        count[at + 7] = 5;
        assert!(matches!(verify(&count[..]), Err(SnapshotFormatError::CountMismatch { claimed: 5, found: 2 })));
    }

    #[test]
    fn oversized_records_are_refused_when_written() {
        let mut w = SnapshotWriter::new(Vec::new()).unwrap();
        let key = vec![0u8; MAX_KEY_BYTES as usize + 1];
        assert!(matches!(w.push(&key, b"v"), Err(SnapshotFormatError::TooLong { what: "key", .. })));
    }
}
