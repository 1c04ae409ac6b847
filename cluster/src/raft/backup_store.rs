//! Backup chunks held for other nodes (issue 11, backup target kind `node`).
//!
//! A node backing up to another node sends it named objects (`chunks/xx/<id>`,
//! `backups/<id>`: ciphertext sealed before it left the sender) on the mesh's `bulk` channel;
//! the receiver keeps them under `<data_dir>/backup-store/`, in the same layout as a `dir`
//! backup target, so that folder can be read back as one when no node runs. The receiver never
//! decrypts anything; retention (keep the last N backups) is applied by the sender, which holds
//! the key, with `List` and `Delete`.
//!
//! Wire: a request body is [`MAGIC`] followed by a bincode [`BackupStoreRequest`]; the answer is
//! a bincode [`BackupStoreReply`]. The bulk channel's other requests (Raft's snapshot chunks)
//! are bincode `RaftRpc`s whose first four bytes are a small variant index, never [`MAGIC`]'s, so
//! [`serve_beside`] takes these requests off the channel and hands the rest on untouched.
//! Only members of the mesh can send (the handshake refuses anyone else).
//!
//! [`Store`] is the folder and its limits: an optional quota (a `Put` that would pass it is
//! refused with [`BackupStoreReply::Error`] naming the quota; `Get`, `List` and `Delete` go on),
//! and the temporary files of interrupted writes (`*.tmp-*`), removed when the store opens and
//! on [`BackupStoreRequest::CleanTemporary`], which a sender issues before a backup and after
//! a failed one. A backup-only member (kermail's `[node] role = "backup-store"`) runs this
//! store and the mesh, and nothing else: no Raft, no mail state, no backup key.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::node::{Cluster, ClusterError};
use super::wire::{decode, encode};
use crate::mesh::{Channel, Incoming};

/// The folder under the data folder where chunks sent by other nodes are kept.
pub const BACKUP_STORE_DIR: &str = "backup-store";
/// Names a `List` answer carries at most; the sender asks for the next page after the last.
pub const LIST_PAGE: usize = 5_000;
/// How long a backup-store request may take (a chunk up to the mesh's message limit, fsync'd).
pub const BACKUP_STORE_TIMEOUT: Duration = Duration::from_secs(120);
/// Requests of other nodes served at once; more wait in the channel.
const MAX_CONCURRENT: usize = 16;
/// Messages queued between the backup-store filter and the Raft RPC server of the channel.
const PASS_ON_QUEUE: usize = 64;
/// Marks a backup-store request on the bulk channel.
pub const MAGIC: &[u8; 8] = b"kmBkSt01";

/// What a node asks of another node's backup store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupStoreRequest {
    /// Stores `bytes` under `name` (replacing an object of that name), fsync'd before the answer.
    Put {
        name: String,
        bytes: Vec<u8>,
    },
    Get {
        name: String,
    },
    /// Objects under `prefix`, in name order, after `after` (a page of at most [`LIST_PAGE`]).
    List {
        prefix: String,
        after: Option<String>,
    },
    Delete {
        name: String,
    },
    /// Removes the temporary files interrupted writes left (`*.tmp-*`); answers `Done`.
    CleanTemporary,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupStoreReply {
    Done,
    Bytes(Vec<u8>),
    /// Names and sizes; `more`: ask again after the last one.
    List {
        entries: Vec<(String, u64)>,
        more: bool,
    },
    NotFound,
    Error(String),
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// `name` as a relative path of plain components (no `..`, no absolute path, no temp names).
fn checked(name: &str) -> io::Result<&str> {
    if name.is_empty()
        || name.len() > 512
        || name.starts_with('/')
        || name.contains(".tmp-")
        || name
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(invalid(format!("bad object name {name:?}")));
    }
    Ok(name)
}

/// Appends the files below `root/relative` (paths relative to `root`, with their sizes) to
/// `out`, skipping the temporary files of unfinished writes; a missing folder lists nothing.
/// Also the listing of a folder backup target (`src/backup/target.rs`).
pub fn list_dir(root: &Path, relative: &str, out: &mut Vec<(String, u64)>) -> io::Result<()> {
    let entries = match std::fs::read_dir(root.join(relative)) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp-") {
            continue;
        }
        let child = if relative.is_empty() {
            name
        } else {
            format!("{relative}/{name}")
        };
        let meta = entry.metadata()?;
        if meta.is_dir() {
            list_dir(root, &child, out)?;
        } else {
            out.push((child, meta.len()));
        }
    }
    Ok(())
}

/// Whether a file name is a temporary one of an unfinished write.
fn is_temporary(name: &str) -> bool {
    name.contains(".tmp-")
}

/// Removes every temporary file under `dir` (recursively); returns how many.
pub fn remove_temporary_files(dir: &Path) -> io::Result<u64> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            removed += remove_temporary_files(&path)?;
        } else if is_temporary(&entry.file_name().to_string_lossy()) {
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
    }
    Ok(removed)
}

/// The folder a node keeps other nodes' backup chunks in, with its quota.
pub struct Store {
    root: PathBuf,
    /// Bytes the store may hold at most (`None`: no limit but the disk).
    quota_bytes: Option<u64>,
    /// Bytes of the objects it holds (counted when it opens, kept up to date since).
    used: AtomicU64,
    /// Serialises the quota check of concurrent `Put`s with their accounting.
    reserve: Mutex<()>,
}

impl Store {
    /// Opens the folder (created if missing), removes the temporary files interrupted writes
    /// left and counts what it holds.
    pub fn open(root: PathBuf, quota_bytes: Option<u64>) -> io::Result<Store> {
        std::fs::create_dir_all(&root)?;
        let removed = remove_temporary_files(&root)?;
        if removed > 0 {
            tracing::info!(removed, root = %root.display(), "backup store: temporary files of interrupted writes removed");
        }
        let mut entries = Vec::new();
        list_dir(&root, "", &mut entries)?;
        let used = entries.iter().map(|(_, size)| size).sum();
        Ok(Store {
            root,
            quota_bytes,
            used: AtomicU64::new(used),
            reserve: Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes held, and the quota.
    pub fn usage(&self) -> (u64, Option<u64>) {
        (self.used.load(Ordering::Relaxed), self.quota_bytes)
    }

    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let path = self.root.join(checked(name)?);
        let replaced = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let grows = (bytes.len() as u64).saturating_sub(replaced);
        if let Some(quota) = self.quota_bytes {
            let _guard = self.reserve.lock().unwrap_or_else(|p| p.into_inner());
            let used = self.used.load(Ordering::Relaxed);
            if used.saturating_add(grows) > quota {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!(
                        "backup store quota reached: {used} of {quota} bytes used, {} more \
                         refused (reads and deletes still work: prune, or raise \
                         [backup_store] quota_mb on this node)",
                        bytes.len()
                    ),
                ));
            }
            self.used.fetch_add(grows, Ordering::Relaxed);
        } else {
            self.used.fetch_add(grows, Ordering::Relaxed);
        }
        let written = (|| {
            let parent = path.parent().unwrap_or(&self.root);
            std::fs::create_dir_all(parent)?;
            let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
            let result = (|| {
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(bytes)?;
                file.sync_all()?;
                std::fs::rename(&tmp, &path)
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            result?;
            std::fs::File::open(parent)?.sync_all()
        })();
        if written.is_err() {
            self.used.fetch_sub(grows, Ordering::Relaxed);
        }
        written
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        let path = self.root.join(checked(name)?);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
            Ok(()) => {
                let _ = self
                    .used
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                        Some(u.saturating_sub(size))
                    });
                Ok(())
            }
        }
    }

    /// Serves one request (blocking file I/O).
    pub fn handle(&self, request: BackupStoreRequest) -> BackupStoreReply {
        let root = self.root.as_path();
        let result = match request {
            BackupStoreRequest::Put { name, bytes } => self.put(&name, &bytes).map(|()| {
                tracing::debug!(%name, len = bytes.len(), "backup chunk stored for a peer");
                BackupStoreReply::Done
            }),
            BackupStoreRequest::Get { name } => checked(&name)
                .and_then(|name| std::fs::read(root.join(name)))
                .map(BackupStoreReply::Bytes),
            BackupStoreRequest::List { prefix, after } => {
                let prefix = prefix.trim_end_matches('/');
                let start = if prefix.is_empty() {
                    Ok("")
                } else {
                    checked(prefix)
                };
                start.and_then(|prefix| {
                    let mut entries = Vec::new();
                    list_dir(root, prefix, &mut entries)?;
                    entries.sort();
                    if let Some(after) = after {
                        entries.retain(|(name, _)| *name > after);
                    }
                    let more = entries.len() > LIST_PAGE;
                    entries.truncate(LIST_PAGE);
                    Ok(BackupStoreReply::List { entries, more })
                })
            }
            BackupStoreRequest::Delete { name } => {
                self.delete(&name).map(|()| BackupStoreReply::Done)
            }
            BackupStoreRequest::CleanTemporary => remove_temporary_files(root).map(|removed| {
                if removed > 0 {
                    tracing::info!(removed, "backup store: temporary files removed on request");
                }
                BackupStoreReply::Done
            }),
        };
        match result {
            Ok(reply) => reply,
            Err(error) if error.kind() == io::ErrorKind::NotFound => BackupStoreReply::NotFound,
            Err(error) => BackupStoreReply::Error(error.to_string()),
        }
    }
}

/// Takes the backup-store requests off a channel's incoming messages and serves them from
/// `root`; every other message is passed on, in order, to the returned receiver.
///
/// `allowed` says which senders may use the store: on a mail node, the members of the Raft
/// membership (not a backup-only store that is a mesh peer of this node); on a backup-only
/// node, every peer of its mesh (its configured clients).
pub fn serve_beside(
    mut incoming: mpsc::Receiver<Incoming>,
    store: Arc<Store>,
    allowed: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    stop: CancellationToken,
) -> mpsc::Receiver<Incoming> {
    let (pass_on, passed) = mpsc::channel(PASS_ON_QUEUE);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => break,
                message = incoming.recv() => match message {
                    Some(message) => message,
                    None => break,
                },
            };
            let Some(body) = message.body.strip_prefix(MAGIC.as_slice()) else {
                if pass_on.send(message).await.is_err() {
                    break;
                }
                continue;
            };
            let Some(responder) = message.responder else {
                continue;
            };
            if !allowed(&message.from) {
                tracing::warn!(from = %message.from, "backup-store request refused: not a member");
                let reply = BackupStoreReply::Error(format!(
                    "{} may not use this backup store",
                    message.from
                ));
                if let Ok(bytes) = encode(&reply) {
                    let _ = responder.respond(bytes).await;
                }
                continue;
            }
            let request = match decode::<BackupStoreRequest>(body) {
                Ok(request) => request,
                Err(error) => {
                    tracing::warn!(from = %message.from, %error, "malformed backup-store request");
                    let reply = BackupStoreReply::Error(error);
                    if let Ok(bytes) = encode(&reply) {
                        let _ = responder.respond(bytes).await;
                    }
                    continue;
                }
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let store = store.clone();
            let from = message.from;
            tokio::spawn(async move {
                let reply = tokio::task::spawn_blocking(move || store.handle(request))
                    .await
                    .unwrap_or_else(|e| BackupStoreReply::Error(e.to_string()));
                if let BackupStoreReply::Error(error) = &reply {
                    tracing::warn!(%from, %error, "backup-store request failed");
                }
                match encode(&reply) {
                    Ok(bytes) => {
                        if let Err(error) = responder.respond(bytes).await {
                            tracing::debug!(%error, "cannot answer a backup-store request");
                        }
                    }
                    Err(error) => tracing::error!(%error, "cannot encode a backup-store reply"),
                }
                drop(permit);
            });
        }
    });
    passed
}

impl Cluster {
    /// Sends one request to the backup store of member `peer` (its name, or its node id in
    /// decimal) over the mesh's bulk channel.
    pub async fn backup_store(
        &self,
        peer: &str,
        request: &BackupStoreRequest,
    ) -> Result<BackupStoreReply, ClusterError> {
        let engine = self.engine()?;
        let name = match peer.parse::<u64>() {
            Ok(id) => engine
                .name_of(id)
                .ok_or_else(|| ClusterError::Refused(format!("no node {id} in the membership")))?,
            Err(_) => peer.to_owned(),
        };
        let encoded = encode(request).map_err(ClusterError::Mesh)?;
        let mut body = Vec::with_capacity(MAGIC.len() + encoded.len());
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&encoded);
        let reply = engine
            .mesh
            .request(&name, Channel::Bulk, body.into(), BACKUP_STORE_TIMEOUT)
            .await
            .map_err(|e| ClusterError::Mesh(e.to_string()))?;
        decode(&reply).map_err(ClusterError::Mesh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_store_puts_lists_in_pages_gets_and_deletes_and_refuses_escapes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path().to_path_buf(), None).expect("open");
        let handle = |_: &Path, request| store.handle(request);
        let root = dir.path();
        for i in 0..3 {
            let reply = handle(
                root,
                BackupStoreRequest::Put {
                    name: format!("chunks/ab/{i}"),
                    bytes: vec![i; 10],
                },
            );
            assert_eq!(reply, BackupStoreReply::Done);
        }
        assert_eq!(
            handle(
                root,
                BackupStoreRequest::Get {
                    name: "chunks/ab/1".into()
                }
            ),
            BackupStoreReply::Bytes(vec![1; 10])
        );
        let listed = handle(
            root,
            BackupStoreRequest::List {
                prefix: "chunks".into(),
                after: Some("chunks/ab/0".into()),
            },
        );
        assert_eq!(
            listed,
            BackupStoreReply::List {
                entries: vec![("chunks/ab/1".into(), 10), ("chunks/ab/2".into(), 10)],
                more: false
            }
        );
        assert_eq!(
            handle(
                root,
                BackupStoreRequest::Delete {
                    name: "chunks/ab/1".into()
                }
            ),
            BackupStoreReply::Done
        );
        assert_eq!(
            handle(
                root,
                BackupStoreRequest::Get {
                    name: "chunks/ab/1".into()
                }
            ),
            BackupStoreReply::NotFound
        );
        for bad in ["../x", "/etc/passwd", "a//b", "chunks/x.tmp-1", ""] {
            assert!(
                matches!(
                    handle(root, BackupStoreRequest::Get { name: bad.into() }),
                    BackupStoreReply::Error(_)
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_store_over_its_quota_refuses_puts_clearly_and_keeps_serving_reads_and_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let put = |store: &Store, name: &str, len: usize| {
            store.handle(BackupStoreRequest::Put {
                name: name.into(),
                bytes: vec![7; len],
            })
        };
        // Counted at open: what an earlier run stored.
        std::fs::create_dir_all(dir.path().join("chunks/aa")).expect("mkdir");
        std::fs::write(dir.path().join("chunks/aa/old"), vec![1; 400]).expect("write");
        let store = Store::open(dir.path().to_path_buf(), Some(1_000)).expect("open");
        assert_eq!(store.usage(), (400, Some(1_000)));
        assert_eq!(put(&store, "chunks/aa/a", 500), BackupStoreReply::Done);
        // 900 used: 200 more would pass the quota.
        match put(&store, "chunks/aa/b", 200) {
            BackupStoreReply::Error(error) => {
                assert!(error.contains("quota"), "{error}");
                assert!(error.contains("900 of 1000 bytes used"), "{error}");
            }
            other => panic!("a put over the quota answered {other:?}"),
        }
        assert!(!dir.path().join("chunks/aa/b").exists());
        // Reads and lists still work.
        assert_eq!(
            store.handle(BackupStoreRequest::Get {
                name: "chunks/aa/a".into()
            }),
            BackupStoreReply::Bytes(vec![7; 500])
        );
        assert!(matches!(
            store.handle(BackupStoreRequest::List {
                prefix: "chunks".into(),
                after: None
            }),
            BackupStoreReply::List { entries, .. } if entries.len() == 2
        ));
        // Replacing an object counts only the growth; a delete frees its bytes.
        assert_eq!(put(&store, "chunks/aa/a", 550), BackupStoreReply::Done);
        assert_eq!(store.usage().0, 950);
        assert_eq!(
            store.handle(BackupStoreRequest::Delete {
                name: "chunks/aa/old".into()
            }),
            BackupStoreReply::Done
        );
        assert_eq!(store.usage().0, 550);
        assert_eq!(put(&store, "chunks/aa/b", 200), BackupStoreReply::Done);
    }

    #[test]
    fn temporary_files_of_interrupted_writes_go_at_open_and_on_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let chunks = dir.path().join("chunks/ab");
        std::fs::create_dir_all(&chunks).expect("mkdir");
        std::fs::write(chunks.join("kept"), b"x").expect("write");
        std::fs::write(chunks.join("c1.tmp-0123456789abcdef"), b"half").expect("write");
        let store = Store::open(dir.path().to_path_buf(), None).expect("open");
        assert!(!chunks.join("c1.tmp-0123456789abcdef").exists());
        assert!(chunks.join("kept").exists());
        // Temporary files are not counted.
        assert_eq!(store.usage().0, 1);
        std::fs::write(chunks.join("c2.tmp-0123456789abcdef"), b"half").expect("write");
        assert_eq!(
            store.handle(BackupStoreRequest::CleanTemporary),
            BackupStoreReply::Done
        );
        assert!(!chunks.join("c2.tmp-0123456789abcdef").exists());
        assert!(chunks.join("kept").exists());
    }

    #[test]
    fn the_magic_never_starts_a_raft_rpc() {
        // bincode writes an enum's variant index first, as a little-endian u32.
        let tag = u32::from_le_bytes([MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3]]);
        assert!(tag > 1_000_000);
    }
}
