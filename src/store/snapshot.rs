//! Snapshot stream: the whole mail state plus every referenced body, so that a snapshot alone
//! rebuilds a node (on another machine too).
//!
//! Layout (integers little-endian):
//! ```text
//! MAGIC (16 bytes) | version u32 = 1
//! meta_len u64 | meta: bincode of SnapshotMeta (varint, limited to meta_len)
//! blob_count u64 | blob_count × ( blob id [32] | len u64 | zstd bytes [len] ), ids ascending
//! BLAKE3 of every byte above [32]
//! ```
//! Reading is bounded everywhere: a corrupt or hostile stream gives an error, never a panic or
//! an allocation sized by the stream. The state is replaced only after the trailing hash and
//! the state's invariants have been checked; bodies written before a failure are
//! content-addressed and harmless (the next restore's sweep removes them).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::Arc;

use bincode::Options;
use serde::{Deserialize, Serialize};

use super::blob::{BlobStore, ReadGuard};
use super::command::SrsKey;
use super::command::MAX_COMMAND_BYTES;
use super::queue::Outbound;
use super::quota::Quotas;
use super::state::State;
use super::BlobId;

pub const MAGIC: &[u8; 16] = b"kermail-snapshot";
pub const VERSION: u32 = 1;
/// The encoded metadata (accounts, mailboxes, message lists): 1 GiB is about ten million
/// messages, far above a small provider.
pub const MAX_META_BYTES: u64 = 1024 * 1024 * 1024;
/// Distinct bodies in one snapshot.
pub const MAX_BLOBS: u64 = 100_000_000;

/// V1: before the outbound queue (its state restores empty). V2: the state and the outbound
/// part (queue, DKIM keys), which `State` does not serialize itself. V3: and the quota
/// settings (before them, the built-in default applies to every account).
#[derive(Serialize, Deserialize)]
enum SnapshotMeta {
    V1(State),
    V2(State, Outbound),
    /// V2 plus the SRS key (issue 10) and the quota settings (usage is derived at restore).
    V3(State, Outbound, Option<SrsKey>, Quotas),
}

#[derive(Serialize)]
enum SnapshotMetaRef<'a> {
    /// Written only by the compatibility test.
    #[cfg_attr(not(test), allow(dead_code))]
    V1(&'a State),
    /// Written only by the compatibility tests.
    #[cfg_attr(not(test), allow(dead_code))]
    V2(&'a State, &'a Outbound),
    V3(&'a State, &'a Outbound, &'a Option<SrsKey>, &'a Quotas),
}

fn meta_codec(limit: u64) -> impl Options {
    bincode::DefaultOptions::new().with_limit(limit)
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Buffer between bincode's many small reads and writes and the stream (and the hasher).
const IO_BUFFER_BYTES: usize = 64 * 1024;

struct HashingWriter<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct HashingReader<R: Read> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.hasher.update(&buf[..read]);
        Ok(read)
    }
}

/// A point-in-time view of the state and a guard that keeps its bodies readable.
pub struct Builder {
    pub(super) state: State,
    pub(super) blobs: Arc<BlobStore>,
    pub(super) _guard: ReadGuard,
}

impl kermail_cluster::SnapshotBuilder for Builder {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> io::Result<()> {
        write_snapshot(&self.state, &self.blobs, out)
    }
}

/// Writes the state and its bodies (the bodies must be stored: the caller holds a [`ReadGuard`]).
pub fn write_snapshot(state: &State, blobs: &BlobStore, out: &mut dyn Write) -> io::Result<()> {
    write_snapshot_as(
        SnapshotMetaRef::V3(state, &state.outbound, &state.outbound.srs_key, &state.quotas),
        blobs,
        out,
    )
}

fn write_snapshot_as(
    meta: SnapshotMetaRef<'_>,
    blobs: &BlobStore,
    out: &mut dyn Write,
) -> io::Result<()> {
    let state = match meta {
        SnapshotMetaRef::V1(state)
        | SnapshotMetaRef::V2(state, _)
        | SnapshotMetaRef::V3(state, _, _, _) => state,
    };
    let mut out = HashingWriter {
        inner: io::BufWriter::with_capacity(IO_BUFFER_BYTES, out),
        hasher: blake3::Hasher::new(),
    };
    out.write_all(MAGIC)?;
    out.write_all(&VERSION.to_le_bytes())?;
    let meta_len = meta_codec(MAX_META_BYTES)
        .serialized_size(&meta)
        .map_err(|e| invalid(format!("cannot encode the state: {e}")))?;
    out.write_all(&meta_len.to_le_bytes())?;
    meta_codec(MAX_META_BYTES)
        .serialize_into(&mut out, &meta)
        .map_err(|e| invalid(format!("cannot encode the state: {e}")))?;
    // The referenced bodies come from the message lists, not from `state.blobs`: the capture
    // for a snapshot leaves that table out to stay cheap.
    let referenced = state.referenced_blobs();
    out.write_all(&(referenced.len() as u64).to_le_bytes())?;
    for id in &referenced {
        let mut body = blobs.open_compressed(id).map_err(|error| {
            tracing::error!(blob = %hex::encode(id.0), %error, "a referenced body is missing");
            io::Error::new(
                error.kind(),
                format!("body {} is missing: {error}", hex::encode(id.0)),
            )
        })?;
        let len = body.remaining_bytes();
        out.write_all(&id.0)?;
        out.write_all(&len.to_le_bytes())?;
        let copied = io::copy(&mut body, &mut out)?;
        if copied != len {
            return Err(invalid(format!(
                "body {} shrank while being read",
                hex::encode(id.0)
            )));
        }
    }
    let hash = out.hasher.finalize();
    out.inner.write_all(hash.as_bytes())?;
    out.inner.flush()
}

fn read_u64(input: &mut impl Read) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    input.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

/// Reads a snapshot: writes its bodies into `blobs` and returns the checked state.
pub fn read_snapshot(input: &mut dyn Read, blobs: &BlobStore) -> io::Result<State> {
    let mut input = HashingReader {
        inner: io::BufReader::with_capacity(IO_BUFFER_BYTES, input),
        hasher: blake3::Hasher::new(),
    };
    let mut magic = [0u8; 16];
    input.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(invalid("not a kermail snapshot"));
    }
    let mut version = [0u8; 4];
    input.read_exact(&mut version)?;
    let version = u32::from_le_bytes(version);
    if version != VERSION {
        return Err(invalid(format!(
            "snapshot version {version} is not supported (this node reads {VERSION})"
        )));
    }
    let meta_len = read_u64(&mut input)?;
    if meta_len > MAX_META_BYTES {
        return Err(invalid("snapshot metadata is too large"));
    }
    // Read into memory as the bytes arrive (never sized by the claimed length), then decode
    // from the slice, where every length is checked against the bytes actually there.
    let mut meta_bytes = Vec::new();
    (&mut input).take(meta_len).read_to_end(&mut meta_bytes)?;
    if meta_bytes.len() as u64 != meta_len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "snapshot ends inside its metadata",
        ));
    }
    let meta: SnapshotMeta = meta_codec(meta_len)
        .deserialize(&meta_bytes)
        .map_err(|e| invalid(format!("snapshot metadata is corrupt: {e}")))?;
    drop(meta_bytes);
    let mut state = match meta {
        SnapshotMeta::V1(state) => state,
        SnapshotMeta::V2(mut state, outbound) => {
            state.outbound = outbound;
            state.outbound.rebuild_due();
            state
        }
        SnapshotMeta::V3(mut state, outbound, srs_key, quotas) => {
            state.outbound = outbound;
            state.outbound.srs_key = srs_key;
            state.outbound.rebuild_due();
            // Usage is derived: `rebuild_blobs` below recomputes it from the messages.
            state.quotas = quotas;
            state
        }
    };

    let blob_count = read_u64(&mut input)?;
    if blob_count > MAX_BLOBS {
        return Err(invalid("snapshot holds too many bodies"));
    }
    let mut stored_sizes: BTreeMap<BlobId, u64> = BTreeMap::new();
    let mut previous: Option<BlobId> = None;
    for _ in 0..blob_count {
        let mut id = [0u8; 32];
        input.read_exact(&mut id)?;
        let id = BlobId(id);
        if previous.is_some_and(|p| p >= id) {
            return Err(invalid("snapshot bodies are not in ascending order"));
        }
        previous = Some(id);
        let len = read_u64(&mut input)?;
        if len > MAX_COMMAND_BYTES {
            return Err(invalid("snapshot body is larger than any message"));
        }
        blobs.write_from(&id, len, &mut input)?;
        stored_sizes.insert(id, len);
    }
    let expected = input.hasher.finalize();
    let mut hash = [0u8; 32];
    input.inner.read_exact(&mut hash)?;
    if &hash != expected.as_bytes() {
        return Err(invalid("snapshot checksum does not match"));
    }
    let mut extra = [0u8; 1];
    if input.inner.read(&mut extra)? != 0 {
        return Err(invalid("snapshot has trailing bytes"));
    }

    state
        .check_invariants()
        .map_err(|why| invalid(format!("snapshot state is inconsistent: {why}")))?;
    state.rebuild_blobs(|id| stored_sizes.get(id).copied().unwrap_or(0));
    if let Some(missing) = state.blobs.keys().find(|id| !stored_sizes.contains_key(id)) {
        return Err(invalid(format!(
            "snapshot lacks body {}",
            hex::encode(missing.0)
        )));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_from_before_the_queue_restores_with_an_empty_queue() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let mut state = State::default();
        state.domains.insert("example.org".into());
        state.outbound.next_queue_id = 42;
        let mut legacy = Vec::new();
        write_snapshot_as(SnapshotMetaRef::V1(&state), &blobs, &mut legacy).unwrap();
        let restored = read_snapshot(&mut legacy.as_slice(), &blobs).unwrap();
        assert_eq!(restored.domains, state.domains);
        assert_eq!(restored.outbound, super::super::queue::Outbound::default());
        // And the current format carries the outbound part.
        let mut current = Vec::new();
        write_snapshot(&state, &blobs, &mut current).unwrap();
        let restored = read_snapshot(&mut current.as_slice(), &blobs).unwrap();
        assert_eq!(restored.outbound.next_queue_id, 42);
    }

    #[test]
    fn a_snapshot_from_before_the_srs_key_restores_without_one_and_the_key_survives() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let mut state = State::default();
        state.outbound.next_queue_id = 7;
        state.outbound.srs_key = Some(SrsKey([9; 32]));
        let mut legacy = Vec::new();
        write_snapshot_as(
            SnapshotMetaRef::V2(&state, &state.outbound),
            &blobs,
            &mut legacy,
        )
        .unwrap();
        let restored = read_snapshot(&mut legacy.as_slice(), &blobs).unwrap();
        assert_eq!(restored.outbound.next_queue_id, 7);
        assert_eq!(restored.outbound.srs_key, None);
        let mut current = Vec::new();
        write_snapshot(&state, &blobs, &mut current).unwrap();
        let restored = read_snapshot(&mut current.as_slice(), &blobs).unwrap();
        assert_eq!(restored.outbound.srs_key, Some(SrsKey([9; 32])));
    }

    #[test]
    fn quota_settings_survive_a_snapshot_and_older_snapshots_get_the_default() {
        use super::super::quota::{AccountQuota, QuotaLimits, QuotaSetting};
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
        let mut state = State::default();
        state.quotas.default = QuotaLimits::from_config(1000, 0);
        state.quotas.accounts.clear();
        let mut v2 = Vec::new();
        write_snapshot_as(
            SnapshotMetaRef::V2(&state, &state.outbound),
            &blobs,
            &mut v2,
        )
        .unwrap();
        let restored = read_snapshot(&mut v2.as_slice(), &blobs).unwrap();
        assert_eq!(restored.quotas.default, QuotaLimits::default());
        let mut current = Vec::new();
        write_snapshot(&state, &blobs, &mut current).unwrap();
        let restored = read_snapshot(&mut current.as_slice(), &blobs).unwrap();
        assert_eq!(restored.quotas.default, state.quotas.default);
        // Settings of an account that is not in the state are dropped at restore.
        state.quotas.accounts.insert(
            7,
            AccountQuota {
                storage: QuotaSetting::Limit(5),
                messages: QuotaSetting::Default,
            },
        );
        let mut current = Vec::new();
        write_snapshot(&state, &blobs, &mut current).unwrap();
        let restored = read_snapshot(&mut current.as_slice(), &blobs).unwrap();
        assert!(restored.quotas.accounts.is_empty());
    }
}
