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

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

fn list_dir(root: &Path, relative: &str, out: &mut Vec<(String, u64)>) -> io::Result<()> {
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

fn put(root: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let path = root.join(checked(name)?);
    let parent = path.parent().unwrap_or(root);
    std::fs::create_dir_all(parent)?;
    let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(parent)?.sync_all()
}

/// Serves one request against the folder `root` (blocking file I/O).
pub fn handle(root: &Path, request: BackupStoreRequest) -> BackupStoreReply {
    let result = match request {
        BackupStoreRequest::Put { name, bytes } => put(root, &name, &bytes).map(|()| {
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
            checked(&name).and_then(|name| match std::fs::remove_file(root.join(name)) {
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            })
        }
        .map(|()| BackupStoreReply::Done),
    };
    match result {
        Ok(reply) => reply,
        Err(error) if error.kind() == io::ErrorKind::NotFound => BackupStoreReply::NotFound,
        Err(error) => BackupStoreReply::Error(error.to_string()),
    }
}

/// Takes the backup-store requests off a channel's incoming messages and serves them from
/// `root`; every other message is passed on, in order, to the returned receiver.
pub(crate) fn serve_beside(
    mut incoming: mpsc::Receiver<Incoming>,
    root: PathBuf,
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
            let root = root.clone();
            let from = message.from;
            tokio::spawn(async move {
                let reply = tokio::task::spawn_blocking(move || handle(&root, request))
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
    fn the_magic_never_starts_a_raft_rpc() {
        // bincode writes an enum's variant index first, as a little-endian u32.
        let tag = u32::from_le_bytes([MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3]]);
        assert!(tag > 1_000_000);
    }
}
