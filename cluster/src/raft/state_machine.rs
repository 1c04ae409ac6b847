//! The Raft state machine: committed entries go to the application, snapshots go to files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, Snapshot, StorageIOError,
};
use tokio::sync::Mutex;

use crate::app::{AppStateMachine, SnapshotBuilder};

use super::applied::AppliedIndex;
use super::snapshot_file;
use super::types::{
    CommandResponses, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

fn snapshot_error(verb: ErrorVerb, e: impl Into<openraft::AnyError>) -> StorageError {
    StorageIOError::new(ErrorSubject::Snapshot(None), verb, e).into()
}

fn join_error(e: tokio::task::JoinError) -> StorageError {
    StorageIOError::new(ErrorSubject::StateMachine, ErrorVerb::Write, &e).into()
}

/// State shared by the state machine and the snapshot builders it hands out (a builder runs in
/// its own task while entries keep being applied).
struct SnapshotShared {
    dir: PathBuf,
    /// Metadata of the snapshot kept on disk; the lock also serialises replacing the file.
    current: Mutex<Option<SnapshotMeta>>,
}

/// openraft's state machine over the application's [`AppStateMachine`].
pub struct StateMachineStore {
    app: Arc<dyn AppStateMachine>,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    snapshots: Arc<SnapshotShared>,
    /// Set once the application was given any command or snapshot: such a node holds data
    /// and may not join another cluster.
    holds_app_data: Arc<std::sync::atomic::AtomicBool>,
    /// The applied index, for tasks waiting to read their own writes.
    applied: Arc<AppliedIndex>,
}

impl StateMachineStore {
    /// Opens the state machine whose snapshots live in `snapshot_dir`. If a snapshot is there,
    /// the application is restored from it first (the application must hold no state yet).
    pub async fn open(
        app: Arc<dyn AppStateMachine>,
        snapshot_dir: &Path,
    ) -> Result<Self, std::io::Error> {
        let dir = snapshot_dir.to_path_buf();
        let restore_app = app.clone();
        let restored =
            tokio::task::spawn_blocking(move || -> std::io::Result<Option<SnapshotMeta>> {
                snapshot_file::prepare_dir(&dir)?;
                let path = snapshot_file::current_path(&dir);
                if !path.exists() {
                    return Ok(None);
                }
                snapshot_file::restore(&path, restore_app.as_ref()).map(Some)
            })
            .await
            .map_err(std::io::Error::other)??;
        if let Some(meta) = &restored {
            tracing::info!(snapshot = %meta, "state restored from snapshot");
        }
        let applied = Arc::new(AppliedIndex::default());
        applied.set(
            restored
                .as_ref()
                .and_then(|m| m.last_log_id)
                .map(|id| id.index),
        );
        Ok(Self {
            applied,
            app,
            last_applied: restored.as_ref().and_then(|m| m.last_log_id),
            last_membership: restored
                .as_ref()
                .map(|m| m.last_membership.clone())
                .unwrap_or_default(),
            holds_app_data: Arc::new(std::sync::atomic::AtomicBool::new(restored.is_some())),
            snapshots: Arc::new(SnapshotShared {
                dir: snapshot_dir.to_path_buf(),
                current: Mutex::new(restored),
            }),
        })
    }
}

/// Builds one snapshot from a view captured by [`RaftStateMachine::get_snapshot_builder`].
pub struct StateMachineSnapshotBuilder {
    /// The application's captured view; taken by the first `build_snapshot`. A `Mutex` only
    /// because openraft wants builders `Sync`.
    captured: StdMutex<Option<Box<dyn SnapshotBuilder>>>,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    snapshots: Arc<SnapshotShared>,
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineSnapshotBuilder {
    #[tracing::instrument(level = "info", skip_all, fields(last_applied = ?self.last_applied))]
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let captured = self
            .captured
            .lock()
            .map_err(|_| {
                snapshot_error(
                    ErrorVerb::Write,
                    openraft::AnyError::error("snapshot builder lock poisoned"),
                )
            })?
            .take()
            .ok_or_else(|| {
                snapshot_error(
                    ErrorVerb::Write,
                    openraft::AnyError::error("snapshot builder used twice"),
                )
            })?;
        let snapshot_id = match &self.last_applied {
            Some(id) => format!(
                "{}-{}-{:08x}",
                id.leader_id,
                id.index,
                rand::random::<u32>()
            ),
            None => format!("none-{:08x}", rand::random::<u32>()),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id,
        };
        let dir = self.snapshots.dir.clone();
        let write_meta = meta.clone();
        let temp = tokio::task::spawn_blocking(move || {
            snapshot_file::write_temp(&dir, &write_meta, captured)
        })
        .await
        .map_err(join_error)?
        .map_err(|e| snapshot_error(ErrorVerb::Write, &e))?;

        // Keep only the newest: an older build finishing late is discarded.
        let mut current = self.snapshots.current.lock().await;
        let is_newer = match current.as_ref() {
            None => true,
            Some(kept) => kept.last_log_id <= meta.last_log_id,
        };
        let dir = self.snapshots.dir.clone();
        if !is_newer {
            let _ = tokio::fs::remove_file(&temp).await;
            let kept = current.clone().ok_or_else(|| {
                snapshot_error(
                    ErrorVerb::Write,
                    openraft::AnyError::error("kept snapshot vanished"),
                )
            })?;
            let file = snapshot_file::open_current(&dir)
                .map_err(|e| snapshot_error(ErrorVerb::Read, &e))?;
            return Ok(Snapshot {
                meta: kept,
                snapshot: Box::new(tokio::fs::File::from_std(file)),
            });
        }
        let file = tokio::task::spawn_blocking(move || {
            snapshot_file::commit(&dir, &temp)?;
            snapshot_file::open_current(&dir)
        })
        .await
        .map_err(join_error)?
        .map_err(|e| snapshot_error(ErrorVerb::Write, &e))?;
        *current = Some(meta.clone());
        tracing::info!(snapshot = %meta, "snapshot written");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

impl StateMachineStore {
    /// True once the application was given a command or a snapshot.
    pub fn holds_app_data(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.holds_app_data.clone()
    }

    /// The applied index this store advances after every apply and snapshot install.
    pub(crate) fn applied_index(&self) -> Arc<AppliedIndex> {
        self.applied.clone()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponses>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last() else {
            return Ok(Vec::new());
        };
        let last_log_id = last.log_id;
        let mut last_membership = None;
        if entries
            .iter()
            .any(|e| matches!(&e.payload, EntryPayload::Normal(batch) if !batch.0.is_empty()))
        {
            self.holds_app_data
                .store(true, std::sync::atomic::Ordering::Release);
        }
        for entry in &entries {
            if let EntryPayload::Membership(membership) = &entry.payload {
                last_membership = Some(StoredMembership::new(
                    Some(entry.log_id),
                    membership.clone(),
                ));
            }
        }
        // The application's apply may do blocking IO (blob files, fsync): off the runtime.
        let app = self.app.clone();
        let responses = tokio::task::spawn_blocking(move || {
            entries
                .into_iter()
                .map(|entry| match entry.payload {
                    EntryPayload::Normal(batch) => CommandResponses(
                        batch
                            .0
                            .iter()
                            .map(|command| app.apply(entry.log_id.index, command))
                            .collect(),
                    ),
                    EntryPayload::Blank | EntryPayload::Membership(_) => {
                        CommandResponses::default()
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(join_error)?;
        self.last_applied = Some(last_log_id);
        self.applied.set(Some(last_log_id.index));
        if let Some(membership) = last_membership {
            self.last_membership = membership;
        }
        Ok(responses)
    }

    /// Captures the application's view here, on the state machine task, between two applies:
    /// so the view is exactly the state at `last_applied`. openraft then runs `build_snapshot`
    /// in its own task while applying goes on.
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateMachineSnapshotBuilder {
            captured: StdMutex::new(Some(self.app.begin_snapshot())),
            last_applied: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let dir = self.snapshots.dir.clone();
        let file = tokio::task::spawn_blocking(move || snapshot_file::receiving_file(&dir))
            .await
            .map_err(join_error)?
            .map_err(|e| snapshot_error(ErrorVerb::Write, &e))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    #[tracing::instrument(level = "info", skip_all, fields(snapshot = %meta))]
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let mut received = snapshot.into_std().await;
        let dir = self.snapshots.dir.clone();
        let app = self.app.clone();
        let install_meta = meta.clone();
        let mut current = self.snapshots.current.lock().await;
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let temp = snapshot_file::write_temp_from_received(&dir, &mut received, &install_meta)?;
            let result = snapshot_file::restore(&temp, app.as_ref())
                .and_then(|_| snapshot_file::commit(&dir, &temp));
            if result.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            result
        })
        .await
        .map_err(join_error)?
        .map_err(|e| {
            StorageError::from(StorageIOError::new(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                &e,
            ))
        })?;
        *current = Some(meta.clone());
        self.holds_app_data
            .store(true, std::sync::atomic::Ordering::Release);
        self.last_applied = meta.last_log_id;
        self.applied.set(meta.last_log_id.map(|id| id.index));
        self.last_membership = meta.last_membership.clone();
        tracing::info!("snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self.snapshots.current.lock().await;
        let Some(meta) = current.clone() else {
            return Ok(None);
        };
        let file = snapshot_file::open_current(&self.snapshots.dir)
            .map_err(|e| snapshot_error(ErrorVerb::Read, &e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}
