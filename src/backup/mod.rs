//! Encrypted, deduplicated backups (issue 11).
//!
//! A backup is the mail state at one applied Raft index (the metadata, serialized) plus every
//! body it references. At the target:
//! - `chunks/<2 hex>/<64 hex>`: one body each (its zstd bytes as the packs hold them), or one
//!   piece of zstd metadata; sealed with XChaCha20-Poly1305 (`crypto.rs`). Names are BLAKE3
//!   keyed hashes, so the target learns neither content nor content hashes. A body already at
//!   the target (an earlier backup, or an interrupted one) is not sent again.
//! - `backups/<id>`: the sealed manifest (JSON): time, index, counts, bytes, metadata chunks.
//!
//! The node runs `backup now` (it holds the state and the key); `list`, `verify`, `prune` and
//! `restore --to` run in the CLI with the key (asked from the node, or `--key-file`), so a
//! restore works with no node left.

pub mod crypto;
pub mod schedule;
pub mod target;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::store::{BackupMeta, BackupView, MailStore};
pub use crypto::Keys;
pub use target::{Target, TargetConfig, TargetKind};

/// Metadata is cut in pieces of this many bytes (zstd) before sealing.
pub const META_PIECE_BYTES: usize = 4 * 1024 * 1024;
/// A backup lease lasts this long; a node that dies mid-backup blocks others at most this long.
pub const BACKUP_LEASE_MS: i64 = 60 * 60 * 1000;
/// Objects put at once by a target without a batch put of its own (S3, node).
pub const PUTS_IN_FLIGHT: usize = 16;
/// Bodies read and sealed by one blocking task and handed to the target as one batch (a thread
/// hand-off per body made a backup's time follow the machine's scheduling load), and the most
/// stored bytes a batch holds.
pub const BATCH_BODIES: usize = 256;
pub const BATCH_BYTES: u64 = 8 * 1024 * 1024;
/// Batches read, sealed or sent at once.
pub const BATCHES_IN_FLIGHT: usize = 2;
/// A folder target syncs what was sent (once, not per chunk) after this many chunks or bytes,
/// so that an interrupted backup resumes from there.
pub const FLUSH_EVERY_CHUNKS: usize = 5_000;
pub const FLUSH_EVERY_BYTES: u64 = 512 * 1024 * 1024;
/// zstd level of the metadata.
const META_ZSTD_LEVEL: i32 = 3;
/// The manifest format written.
const MANIFEST_VERSION: u32 = 1;

/// `[backup]`.
#[derive(Debug, Clone, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// `daily HH:MM` (UTC); none: backups run only on `kermail backup now`.
    pub schedule: Option<String>,
    pub targets: Vec<TargetConfig>,
    pub retention: Retention,
}

/// `[backup_store]`: the chunks this node keeps for other nodes' backups.
#[derive(Debug, Clone, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BackupStoreConfig {
    /// MiB the store (`<data_dir>/backup-store`) may hold; a chunk that would pass it is
    /// refused (the sender's backup fails naming the quota), reads and deletes go on. 0: no
    /// limit but the disk. Default 0.
    pub quota_mb: u64,
    /// On a backup-only node (`[node] role = "backup-store"`): the cluster nodes that may send
    /// it backups (their names and mesh public keys, `kermail mesh status` on each).
    pub clients: Vec<BackupClient>,
}

/// One cluster node a backup-only store accepts.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackupClient {
    pub name: String,
    /// Its mesh public key, base64.
    pub public_key: String,
    #[serde(default)]
    pub site: String,
    /// Addresses to dial it at (optional: the cluster nodes dial the store).
    #[serde(default)]
    pub addrs: Vec<std::net::SocketAddr>,
}

impl BackupStoreConfig {
    pub fn quota_bytes(&self) -> Option<u64> {
        (self.quota_mb > 0).then(|| self.quota_mb.saturating_mul(1024 * 1024))
    }
}

/// `[backup.retention]`: how many daily, weekly and monthly backups `prune` keeps.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            daily: 7,
            weekly: 4,
            monthly: 12,
        }
    }
}

impl BackupConfig {
    /// The backup-only stores the `node` targets name (those with a `public_key`): they join
    /// this node's mesh, never its Raft membership.
    pub fn backup_peers(&self) -> Vec<kermail_cluster::mesh::Member> {
        self.targets
            .iter()
            .filter(|t| t.kind == TargetKind::Node)
            .filter_map(|t| {
                Some(kermail_cluster::mesh::Member {
                    name: t.node.clone()?,
                    site: t.site.clone().unwrap_or_default(),
                    public_key: t.public_key.clone()?,
                    addrs: t.addrs.clone(),
                })
            })
            .collect()
    }

    pub fn validate(&self) -> Result<(), String> {
        for t in &self.targets {
            if t.kind == TargetKind::Node && t.public_key.is_some() && t.addrs.is_empty() {
                return Err(format!(
                    "backup target {}: a backup-only node (public_key) needs `addrs`, where its \
                     mesh listens",
                    t.name
                ));
            }
        }
        Ok(())
    }

    /// The named target, or the first one.
    pub fn target(&self, name: Option<&str>) -> Result<&TargetConfig, String> {
        match name {
            Some(name) => self
                .targets
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| format!("no backup target named {name} in [backup]")),
            None => self
                .targets
                .first()
                .ok_or_else(|| "no backup target configured: add [[backup.targets]]".to_owned()),
        }
    }
}

/// What `backups/<id>` holds (sealed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    pub id: String,
    /// Unix seconds.
    pub created_at: i64,
    pub node: String,
    pub raft_index: u64,
    pub messages: u64,
    pub bodies: u64,
    /// Bytes of chunks this backup sent to the target (the manifest, under 1 KB plus 64 bytes
    /// per 4 MiB of metadata, not counted), and the bytes all its chunks take there.
    pub bytes_new: u64,
    pub bytes_total: u64,
    pub meta_chunks: Vec<String>,
}

fn chunk_path(name: &str) -> String {
    format!("chunks/{}/{name}", &name[..2])
}

fn manifest_path(id: &str) -> String {
    format!("backups/{id}")
}

/// Counters a running backup updates and `kermail backup now` shows.
#[derive(Default, Debug)]
pub struct Progress {
    pub bodies_total: AtomicU64,
    pub bodies_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_sent: AtomicU64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgressReport {
    pub bodies_total: u64,
    pub bodies_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub bytes_sent: u64,
    /// Set once finished: the summary line, or the error.
    pub done: Option<Result<String, String>>,
}

/// Backup jobs of this node (`backup now` starts one; the CLI polls it).
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
    /// Set while this node runs a backup (the lease lets the same node through twice).
    running: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
pub struct Job {
    progress: Progress,
    done: Mutex<Option<Result<String, String>>>,
}

/// Finished jobs kept for polling.
const JOBS_KEPT: usize = 16;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Jobs {
    pub fn start(
        self: &Arc<Self>,
        store: MailStore,
        config: BackupConfig,
        target_name: Option<String>,
        node: String,
        cluster: Option<&kermail_cluster::Cluster>,
    ) -> Result<u64, String> {
        let target_config = config.target(target_name.as_deref())?.clone();
        let target = target::open(&target_config, cluster).map_err(|e| e.to_string())?;
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job::default());
        {
            let mut jobs = lock(&self.jobs);
            while jobs.len() >= JOBS_KEPT {
                let Some(&oldest) = jobs.keys().next() else {
                    break;
                };
                jobs.remove(&oldest);
            }
            jobs.insert(id, job.clone());
        }
        let jobs = self.clone();
        tokio::spawn(async move {
            let summary = jobs
                .run_recorded(
                    &store,
                    &config,
                    &target_config,
                    target.as_ref(),
                    &node,
                    &job.progress,
                )
                .await;
            *lock(&job.done) = Some(summary);
        });
        Ok(id)
    }

    /// Runs one backup to `target`, records its success in the replicated state (for
    /// `kermail status` and the age warning, on every node) and, when the target keeps only
    /// the last N backups, prunes it.
    pub async fn run_recorded(
        &self,
        store: &MailStore,
        config: &BackupConfig,
        target_config: &TargetConfig,
        target: &dyn Target,
        node: &str,
        progress: &Progress,
    ) -> Result<String, String> {
        if self
            .running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err("backup refused: a backup is already running on this node".to_owned());
        }
        let result = run_backup(store, target, node, progress).await;
        self.running.store(false, Ordering::Release);
        match result {
            Ok(manifest) => {
                // The time is the manifest's, chosen before proposing.
                let success = crate::store::BackupSuccess {
                    at_secs: manifest.created_at,
                    id: manifest.id.clone(),
                    node: node.to_owned(),
                };
                if let Err(error) = store
                    .record_backup_success(&target_config.name, success)
                    .await
                {
                    tracing::warn!(target = %target_config.name, %error, "cannot record the backup's success");
                }
                if let (Some(_), Some(key)) = (target_config.keep_last, store.backup_key()) {
                    let keys = Keys::derive(&key.0);
                    match prune(target, &keys, config.retention, target_config.keep_last).await {
                        Ok(line) => {
                            tracing::info!(target = %target_config.name, %line, "backup target pruned")
                        }
                        Err(error) => {
                            tracing::warn!(target = %target_config.name, %error, "cannot prune the backup target")
                        }
                    }
                }
                tracing::info!(
                    target = %target_config.name,
                    id = %manifest.id,
                    raft_index = manifest.raft_index,
                    bytes_new = manifest.bytes_new,
                    "backup done"
                );
                Ok(format!(
                    "backup {} done: raft index {}, {} messages, {} bodies, {} bytes new, {} bytes total",
                    manifest.id,
                    manifest.raft_index,
                    manifest.messages,
                    manifest.bodies,
                    manifest.bytes_new,
                    manifest.bytes_total
                ))
            }
            Err(error) => {
                tracing::warn!(target = %target_config.name, %error, "backup failed");
                Err(error)
            }
        }
    }

    pub fn report(&self, id: u64) -> Option<ProgressReport> {
        let job = lock(&self.jobs).get(&id).cloned()?;
        let p = &job.progress;
        let done = lock(&job.done).clone();
        Some(ProgressReport {
            bodies_total: p.bodies_total.load(Ordering::Relaxed),
            bodies_done: p.bodies_done.load(Ordering::Relaxed),
            bytes_total: p.bytes_total.load(Ordering::Relaxed),
            bytes_done: p.bytes_done.load(Ordering::Relaxed),
            bytes_sent: p.bytes_sent.load(Ordering::Relaxed),
            done,
        })
    }
}

/// `backup TARGET: last success ...` lines for `kermail status`, from the replicated records
/// (they survive restarts and are the same on every node), and the lease while one is held.
pub fn status_lines(store: &MailStore, config: &BackupConfig, now: i64) -> Vec<String> {
    let (lease, last) = store.backup_records();
    let mut lines: Vec<String> = config
        .targets
        .iter()
        .map(|t| match last.get(&t.name) {
            Some(success) => format!(
                "backup {}: last success {} s ago ({}, by {})",
                t.name,
                now.saturating_sub(success.at_secs),
                success.id,
                success.node
            ),
            None => format!("backup {}: no successful backup yet", t.name),
        })
        .collect();
    if let Some(lease) = lease.filter(|l| l.expires_at_ms > now.saturating_mul(1000)) {
        lines.push(format!("backup running on node {}", lease.node));
    }
    lines
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn backup_id(created_at: i64, raft_index: u64) -> String {
    let time = time::OffsetDateTime::from_unix_timestamp(created_at)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    format!(
        "{}-{raft_index}",
        time.format(&format)
            .unwrap_or_else(|_| created_at.to_string())
    )
}

/// Runs one backup: takes the lease, captures a view, sends what the target lacks, writes the
/// manifest last (a backup without a manifest is not listed; its chunks are reused by the next).
pub async fn run_backup(
    store: &MailStore,
    target: &dyn Target,
    node: &str,
    progress: &Progress,
) -> Result<Manifest, String> {
    let key = store
        .backup_key_or_init()
        .await
        .map_err(|e| format!("cannot get the backup key: {e}"))?;
    store
        .take_backup_lease(node, BACKUP_LEASE_MS)
        .await
        .map_err(|e| format!("backup refused: {e}"))?;
    // Temporary files an interrupted earlier backup left (a kill, a crash) go first.
    match target.clean_temporary().await {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "temporary files of an interrupted backup removed"),
        Err(error) => tracing::warn!(%error, "cannot remove the temporary files at the target"),
    }
    let result = run_backup_leased(store, target, node, progress, Keys::derive(&key.0)).await;
    if result.is_err() {
        // Keep what fully arrived (the next backup skips it), drop what did not.
        if let Err(error) = target.flush().await {
            tracing::warn!(%error, "cannot sync the chunks of the failed backup");
        }
        match target.clean_temporary().await {
            Ok(removed) => tracing::info!(removed, "failed backup: temporary files removed"),
            Err(error) => tracing::warn!(%error, "cannot remove the temporary files at the target"),
        }
    }
    if let Err(error) = store.release_backup_lease(node).await {
        tracing::warn!(%error, "cannot release the backup lease (it expires by itself)");
    }
    result
}

async fn run_backup_leased(
    store: &MailStore,
    target: &dyn Target,
    node: &str,
    progress: &Progress,
    keys: Keys,
) -> Result<Manifest, String> {
    let started = std::time::Instant::now();
    let view: BackupView = store.backup_view();
    tracing::info!(
        applied_index = view.applied_index,
        capture_ms = started.elapsed().as_millis() as u64,
        "backup view captured"
    );
    let keys = Arc::new(keys);
    let present: BTreeMap<String, u64> = target
        .list("chunks".into())
        .await
        .map_err(|e| format!("cannot list the target: {e}"))?
        .into_iter()
        .collect();
    let referenced = view.referenced();
    progress
        .bodies_total
        .store(referenced.len() as u64, Ordering::Relaxed);
    let bytes_total: u64 = referenced
        .iter()
        .map(|id| view.blobs.stored_len(id).unwrap_or(0))
        .sum();
    progress.bytes_total.store(bytes_total, Ordering::Relaxed);
    let mut bytes_new = 0u64;
    let mut bytes_at_target = 0u64;
    let mut missing = Vec::new();
    for id in &referenced {
        let name = chunk_path(&keys.body_chunk(id));
        let stored = view.blobs.stored_len(id).unwrap_or(0);
        if let Some(size) = present.get(&name) {
            bytes_at_target += size;
            progress.bodies_done.fetch_add(1, Ordering::Relaxed);
            progress.bytes_done.fetch_add(stored, Ordering::Relaxed);
        } else {
            missing.push((*id, name, stored));
        }
    }
    // Bodies go in batches: one blocking task reads and seals a batch, the target takes it as
    // one (a folder writes it in one task; S3 and node targets put several objects at once),
    // and a few batches are in flight, so that neither a target's latency per object nor a
    // thread hand-off per body adds up.
    let mut batches: Vec<Vec<(crate::store::BlobId, String, u64)>> = Vec::new();
    let mut batch_bytes = 0u64;
    for item in missing {
        let new_batch = match batches.last() {
            None => true,
            Some(last) => last.len() >= BATCH_BODIES || batch_bytes >= BATCH_BYTES,
        };
        if new_batch {
            batches.push(Vec::new());
            batch_bytes = 0;
        }
        batch_bytes += item.2;
        if let Some(last) = batches.last_mut() {
            last.push(item);
        }
    }
    let sends = futures::stream::iter(batches.into_iter().map(|batch| {
        let blobs = view.blobs.clone();
        let keys = keys.clone();
        async move {
            let count = batch.len();
            let stored: u64 = batch.iter().map(|(_, _, stored)| stored).sum();
            let sealed =
                tokio::task::spawn_blocking(move || -> Result<Vec<(String, Vec<u8>)>, String> {
                    let mut out = Vec::with_capacity(batch.len());
                    let mut compressed = Vec::new();
                    for (id, name, _) in batch {
                        let mut reader = blobs
                            .open_compressed(&id)
                            .map_err(|e| format!("body {} unreadable: {e}", hex::encode(id.0)))?;
                        compressed.clear();
                        reader
                            .read_to_end(&mut compressed)
                            .map_err(|e| format!("body {} unreadable: {e}", hex::encode(id.0)))?;
                        out.push((name, keys.seal(&compressed).map_err(|e| e.to_string())?));
                    }
                    Ok(out)
                })
                .await
                .map_err(|e| e.to_string())??;
            let len: u64 = sealed.iter().map(|(_, bytes)| bytes.len() as u64).sum();
            target
                .put_batch(sealed)
                .await
                .map_err(|e| format!("cannot write to the target: {e}"))?;
            progress.bytes_sent.fetch_add(len, Ordering::Relaxed);
            progress
                .bodies_done
                .fetch_add(count as u64, Ordering::Relaxed);
            progress.bytes_done.fetch_add(stored, Ordering::Relaxed);
            Ok::<(usize, u64), String>((count, len))
        }
    }))
    .buffer_unordered(BATCHES_IN_FLIGHT);
    futures::pin_mut!(sends);
    let mut unflushed = (0usize, 0u64);
    while let Some(sent) = sends.next().await {
        let (count, len) = sent?;
        bytes_new += len;
        bytes_at_target += len;
        // Now and then, what was sent becomes durable and listed: an interrupted backup
        // resumes from there.
        unflushed = (unflushed.0 + count, unflushed.1 + len);
        if unflushed.0 >= FLUSH_EVERY_CHUNKS || unflushed.1 >= FLUSH_EVERY_BYTES {
            target
                .flush()
                .await
                .map_err(|e| format!("cannot sync the target: {e}"))?;
            unflushed = (0, 0);
        }
    }
    // The metadata, compressed and cut into sealed pieces (content-addressed too).
    let meta = view.encode_meta()?;
    let meta = zstd::bulk::compress(&meta, META_ZSTD_LEVEL).map_err(|e| e.to_string())?;
    let mut meta_chunks = Vec::new();
    for piece in meta.chunks(META_PIECE_BYTES) {
        let name = keys.meta_chunk(piece);
        let path = chunk_path(&name);
        if let Some(size) = present.get(&path) {
            bytes_at_target += size;
        } else {
            let sealed = keys.seal(piece).map_err(|e| e.to_string())?;
            let len = sealed.len() as u64;
            target
                .put(path, sealed)
                .await
                .map_err(|e| format!("cannot write to the target: {e}"))?;
            bytes_new += len;
            bytes_at_target += len;
            progress.bytes_sent.fetch_add(len, Ordering::Relaxed);
        }
        meta_chunks.push(name);
    }
    // Every chunk durable at the target before the manifest that names them.
    target
        .flush()
        .await
        .map_err(|e| format!("cannot sync the target: {e}"))?;
    let created_at = now_secs();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        id: backup_id(created_at, view.applied_index),
        created_at,
        node: node.to_owned(),
        raft_index: view.applied_index,
        messages: view.messages(),
        bodies: referenced.len() as u64,
        bytes_new,
        bytes_total: bytes_at_target,
        meta_chunks,
    };
    let plain = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
    let sealed = keys.seal(&plain).map_err(|e| e.to_string())?;
    progress
        .bytes_sent
        .fetch_add(sealed.len() as u64, Ordering::Relaxed);
    target
        .put(manifest_path(&manifest.id), sealed)
        .await
        .map_err(|e| format!("cannot write the manifest: {e}"))?;
    Ok(manifest)
}

/// Every backup at the target, oldest first.
pub async fn list(target: &dyn Target, keys: &Keys) -> Result<Vec<Manifest>, String> {
    let mut manifests = Vec::new();
    let mut names = target
        .list("backups".into())
        .await
        .map_err(|e| format!("cannot list the target: {e}"))?;
    names.sort();
    for (name, _) in names {
        let id = name.trim_start_matches("backups/").to_owned();
        manifests.push(read_manifest(target, keys, &id).await?);
    }
    manifests.sort_by_key(|m| (m.created_at, m.raft_index));
    Ok(manifests)
}

/// `kermail backup list`'s output: a header, then one backup a line, oldest first.
pub fn list_lines(manifests: &[Manifest]) -> Vec<String> {
    let mut lines = vec!["id time raft_index messages bytes_new/bytes_total".to_owned()];
    for m in manifests {
        let time = time::OffsetDateTime::from_unix_timestamp(m.created_at)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| m.created_at.to_string());
        lines.push(format!(
            "{} {time} {} {} {}/{}",
            m.id, m.raft_index, m.messages, m.bytes_new, m.bytes_total
        ));
    }
    lines
}

pub async fn read_manifest(target: &dyn Target, keys: &Keys, id: &str) -> Result<Manifest, String> {
    if id.is_empty() || id.contains('/') {
        return Err(format!("bad backup id {id:?}"));
    }
    let sealed = target.get(manifest_path(id)).await.map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            format!("no backup {id} at this target")
        } else {
            format!("cannot read backup {id}: {e}")
        }
    })?;
    let plain = keys.open(&sealed).map_err(|_| {
        format!(
            "cannot decrypt the manifest of backup {id}: wrong backup key (check the key file \
             against `kermail backup key export`), or the manifest is damaged"
        )
    })?;
    serde_json::from_slice(&plain).map_err(|e| format!("manifest of backup {id} is corrupt: {e}"))
}

/// The metadata of a backup, decrypted and decoded.
pub async fn read_meta(
    target: &dyn Target,
    keys: &Keys,
    manifest: &Manifest,
) -> Result<(BackupMeta, Vec<u8>), String> {
    let mut compressed = Vec::new();
    for name in &manifest.meta_chunks {
        let sealed = target
            .get(chunk_path(name))
            .await
            .map_err(|e| format!("metadata chunk {name} unreadable: {e}"))?;
        let piece = keys
            .open(&sealed)
            .map_err(|e| format!("metadata chunk {name}: {e}"))?;
        if keys.meta_chunk(&piece) != *name {
            return Err(format!("metadata chunk {name} does not match its name"));
        }
        compressed.extend_from_slice(&piece);
    }
    let mut plain = Vec::new();
    zstd::stream::read::Decoder::new(compressed.as_slice())
        .map_err(|e| e.to_string())?
        .take(crate::store::BackupMeta::MAX_BYTES)
        .read_to_end(&mut plain)
        .map_err(|e| format!("metadata of backup {} is corrupt: {e}", manifest.id))?;
    let meta = BackupMeta::decode(&plain)?;
    Ok((meta, plain))
}

/// Reads one body chunk back: decrypts it, decompresses it and checks its content hash.
fn open_body(keys: &Keys, id: &crate::store::BlobId, sealed: &[u8]) -> Result<Vec<u8>, String> {
    let compressed = keys
        .open(sealed)
        .map_err(|e| format!("body chunk {}: {e}", keys.body_chunk(id)))?;
    let raw = zstd::stream::decode_all(compressed.as_slice()).map_err(|e| {
        format!(
            "body chunk {} does not decompress: {e}",
            keys.body_chunk(id)
        )
    })?;
    if blake3::hash(&raw).as_bytes() != &id.0 {
        return Err(format!(
            "body chunk {} does not match its hash",
            keys.body_chunk(id)
        ));
    }
    Ok(compressed)
}

/// Re-reads every chunk of a backup; the error names the first bad one.
pub async fn verify(target: &dyn Target, keys: &Keys, id: &str) -> Result<String, String> {
    let manifest = read_manifest(target, keys, id).await?;
    let (meta, _) = read_meta(target, keys, &manifest).await?;
    let referenced = meta.referenced();
    let mut bad = Vec::new();
    for blob in &referenced {
        let name = keys.body_chunk(blob);
        match target.get(chunk_path(&name)).await {
            Ok(sealed) => {
                if let Err(error) = open_body(keys, blob, &sealed) {
                    bad.push(error);
                }
            }
            Err(error) => bad.push(format!("body chunk {name} unreadable: {error}")),
        }
    }
    if let Some(first) = bad.first() {
        return Err(format!(
            "backup {id} is damaged: {} of {} bodies bad; first: {first}",
            bad.len(),
            referenced.len()
        ));
    }
    Ok(format!(
        "backup {id} ok: {} messages, {} bodies, {} metadata chunks verified",
        manifest.messages,
        referenced.len(),
        manifest.meta_chunks.len()
    ))
}

/// Restores a backup into a fresh data folder that `kermail serve` runs as a one-node cluster.
pub async fn restore_to(
    target: &dyn Target,
    keys: &Keys,
    id: &str,
    folder: &Path,
    on_body: &(dyn Fn(u64, u64) + Sync),
) -> Result<String, String> {
    if folder.exists()
        && std::fs::read_dir(folder)
            .map_err(|e| e.to_string())?
            .next()
            .is_some()
    {
        return Err(format!(
            "{} is not empty: restore into a new folder",
            folder.display()
        ));
    }
    let manifest = read_manifest(target, keys, id).await?;
    let (meta, plain) = read_meta(target, keys, &manifest).await?;
    std::fs::create_dir_all(folder).map_err(|e| e.to_string())?;
    let blobs = crate::store::BodyStore::open(folder.join("blobs")).map_err(|e| e.to_string())?;
    let referenced: BTreeSet<_> = meta.referenced();
    let total = referenced.len() as u64;
    // Several bodies fetched and opened at once (a target's latency per body adds up).
    let keys_shared = Arc::new(keys.clone());
    let wanted: Vec<crate::store::BlobId> = referenced.iter().copied().collect();
    let fetches = futures::stream::iter(wanted.into_iter().map(|blob| {
        let keys = keys_shared.clone();
        async move {
            let name = keys.body_chunk(&blob);
            let sealed = target
                .get(chunk_path(&name))
                .await
                .map_err(|e| format!("body chunk {name} unreadable: {e}"))?;
            let compressed = tokio::task::spawn_blocking(move || open_body(&keys, &blob, &sealed))
                .await
                .map_err(|e| e.to_string())??;
            Ok::<_, String>((blob, compressed))
        }
    }))
    .buffer_unordered(PUTS_IN_FLIGHT);
    futures::pin_mut!(fetches);
    let mut done = 0u64;
    while let Some(fetched) = fetches.next().await {
        let (blob, compressed) = fetched?;
        blobs
            .write(&blob, &compressed)
            .map_err(|e| format!("cannot write a body: {e}"))?;
        done += 1;
        on_body(done, total);
    }
    blobs.sync().map_err(|e| e.to_string())?;
    drop(blobs);
    let base = folder.join(crate::store::RESTORE_BASE_FILE);
    std::fs::write(&base, &plain).map_err(|e| format!("cannot write {}: {e}", base.display()))?;
    Ok(format!(
        "backup {id} restored to {}: {} messages, {} bodies (raft index {} of the old cluster); \
         start it with `kermail serve` (data_dir = that folder)",
        folder.display(),
        manifest.messages,
        total,
        manifest.raft_index
    ))
}

/// Puts one account's mail of a backup (or one mailbox's) back into the running cluster, as new
/// messages (same flags and INTERNALDATE) in `Restored/<backup date>` of `into` (default: the
/// same address; the account must exist: after `user remove`, `user add` it first).
pub async fn restore_account(
    store: &MailStore,
    target: &dyn Target,
    keys: &Keys,
    id: &str,
    address: &str,
    into: Option<&str>,
    mailbox: Option<&str>,
) -> Result<String, String> {
    let manifest = read_manifest(target, keys, id).await?;
    let (meta, _) = read_meta(target, keys, &manifest).await?;
    let mail = meta
        .account_mail(address, mailbox)
        .ok_or_else(|| format!("backup {id} has no account {address}"))?;
    if mail.is_empty() {
        return Err(format!(
            "backup {id} has no mailbox {} for {address}",
            mailbox.unwrap_or("")
        ));
    }
    let into = into.unwrap_or(address);
    let account = store
        .list_accounts(None)
        .into_iter()
        .find(|a| a.address.eq_ignore_ascii_case(into))
        .ok_or_else(|| {
            format!("no account {into} in the cluster: add it with `kermail user add`")
        })?;
    let date = time::OffsetDateTime::from_unix_timestamp(manifest.created_at)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let name = format!(
        "Restored/{:04}-{:02}-{:02}",
        date.year(),
        date.month() as u8,
        date.day()
    );
    let mailbox_id = match store.mailbox_by_name(account.id, &name) {
        Some(view) => view.id,
        None => store
            .create_mailbox(account.id, &name, None)
            .await
            .map_err(|e| format!("cannot create {name}: {e}"))?,
    };
    let mut restored = 0u64;
    for (_, messages) in mail {
        for message in messages {
            let sealed = target
                .get(chunk_path(&keys.body_chunk(&message.blob)))
                .await
                .map_err(|e| format!("a body of backup {id} is unreadable: {e}"))?;
            let compressed = open_body(keys, &message.blob, &sealed)?;
            let raw = zstd::stream::decode_all(compressed.as_slice()).map_err(|e| e.to_string())?;
            store
                .append(
                    account.id,
                    mailbox_id,
                    message.flags.clone(),
                    message.internal_date,
                    message.internal_date_offset_min,
                    raw,
                )
                .await
                .map_err(|e| format!("cannot append a restored message: {e}"))?;
            restored += 1;
        }
    }
    tracing::info!(%id, account = %address, into = %into, restored, "account restored from a backup");
    Ok(format!(
        "restored {restored} messages of {address} from backup {id} into {into} {name}"
    ))
}

/// The backups retention keeps: the newest `keep_last` when set (a target's `keep_last`),
/// else the newest of each of the last `daily` days, `weekly` ISO weeks and `monthly` months
/// (UTC).
pub fn kept_by_retention(
    manifests: &[Manifest],
    retention: Retention,
    keep_last: Option<u32>,
) -> BTreeSet<String> {
    let mut kept = BTreeSet::new();
    let mut newest_first: Vec<&Manifest> = manifests.iter().collect();
    newest_first.sort_by_key(|m| std::cmp::Reverse((m.created_at, m.raft_index)));
    if let Some(n) = keep_last {
        return newest_first
            .iter()
            .take(n as usize)
            .map(|m| m.id.clone())
            .collect();
    }
    let period = |m: &Manifest, kind: u8| -> (i32, u32) {
        let t = time::OffsetDateTime::from_unix_timestamp(m.created_at)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        match kind {
            0 => (t.year(), t.ordinal() as u32),
            1 => {
                let (year, week, _) = t.to_iso_week_date();
                (year, week as u32)
            }
            _ => (t.year(), t.month() as u32),
        }
    };
    for (kind, count) in [
        (0u8, retention.daily),
        (1, retention.weekly),
        (2, retention.monthly),
    ] {
        let mut seen = BTreeSet::new();
        for m in &newest_first {
            if seen.len() as u32 >= count {
                break;
            }
            if seen.insert(period(m, kind)) {
                kept.insert(m.id.clone());
            }
        }
    }
    kept
}

/// Applies retention: deletes the manifests of the backups not kept, then every chunk no kept
/// backup references.
pub async fn prune(
    target: &dyn Target,
    keys: &Keys,
    retention: Retention,
    keep_last: Option<u32>,
) -> Result<String, String> {
    let manifests = list(target, keys).await?;
    let kept = kept_by_retention(&manifests, retention, keep_last);
    let mut referenced = BTreeSet::new();
    for manifest in manifests.iter().filter(|m| kept.contains(&m.id)) {
        let (meta, _) = read_meta(target, keys, manifest).await?;
        referenced.extend(
            meta.referenced()
                .iter()
                .map(|b| chunk_path(&keys.body_chunk(b))),
        );
        referenced.extend(manifest.meta_chunks.iter().map(|n| chunk_path(n)));
    }
    let mut removed_backups = 0;
    for manifest in manifests.iter().filter(|m| !kept.contains(&m.id)) {
        target
            .delete(manifest_path(&manifest.id))
            .await
            .map_err(|e| e.to_string())?;
        removed_backups += 1;
    }
    let mut removed_chunks = 0;
    let mut freed = 0;
    for (name, size) in target
        .list("chunks".into())
        .await
        .map_err(|e| e.to_string())?
    {
        if !referenced.contains(&name) {
            target.delete(name).await.map_err(|e| e.to_string())?;
            removed_chunks += 1;
            freed += size;
        }
    }
    Ok(format!(
        "pruned {removed_backups} backups and {removed_chunks} chunks ({freed} bytes); {} backups kept",
        kept.len()
    ))
}

/// Parses the hex key `kermail backup key export` prints.
pub fn parse_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(text.trim()).map_err(|_| "the backup key is not hex".to_owned())?;
    bytes
        .try_into()
        .map_err(|_| "the backup key must be 32 bytes (64 hex digits)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str, created_at: i64) -> Manifest {
        Manifest {
            version: 1,
            id: id.into(),
            created_at,
            node: "n".into(),
            raft_index: created_at as u64,
            messages: 0,
            bodies: 0,
            bytes_new: 0,
            bytes_total: 0,
            meta_chunks: Vec::new(),
        }
    }

    #[test]
    fn retention_keeps_the_newest_per_day_week_and_month() {
        let day = 86_400;
        // Two a day for 60 days from 2023-11-14 00:16:40 UTC.
        let manifests: Vec<Manifest> = (0..120)
            .map(|i| manifest(&format!("b{i:03}"), 1_699_920_000 + 1_000 + i * day / 2))
            .collect();
        let kept = kept_by_retention(
            &manifests,
            Retention {
                daily: 7,
                weekly: 4,
                monthly: 12,
            },
            None,
        );
        // The newest is always kept; 7 days + a few weekly + 2-3 monthly, well under 120.
        assert!(kept.contains("b119"));
        assert!(!kept.contains("b118"), "only the newest of a day");
        assert!(kept.len() >= 7 && kept.len() <= 7 + 4 + 3, "{kept:?}");
        // The newest of November (the 30th, day 16) stands for that month.
        assert!(kept.contains("b033"), "{kept:?}");
        assert!(!kept.contains("b031"), "{kept:?}");
        let last_two = kept_by_retention(&manifests, Retention::default(), Some(2));
        assert_eq!(
            last_two,
            BTreeSet::from(["b118".to_owned(), "b119".to_owned()])
        );
    }
}
