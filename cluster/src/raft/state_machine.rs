//! The Raft state machine: committed entries go to the application, snapshots go to files.
//!
//! Storage faults: with openraft 0.9 a `StorageError` from here stops Raft for good. Writing a
//! snapshot (build or install) that fails with an OS error (no space left, an I/O error, too
//! many open files) is therefore retried with backoff (`health::retry_delay`) until it
//! succeeds, and the failure is reported to the shared [`StorageHealth`] meanwhile. A build
//! runs in its own task (openraft starts no other build meanwhile and keeps the log); an
//! install holds the state machine worker, as an install does anyway.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, Snapshot, StorageIOError,
};
use tokio::sync::Mutex;

use crate::app::{AppStateMachine, SnapshotBuilder};
use crate::health::{self, StorageComponent, StorageHealth};

use super::applied::AppliedIndex;
use super::fetch::ObjectFetcher;
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
    health: Arc<StorageHealth>,
    /// Turns the kept snapshot into what a follower installs (see `snapshot_file`).
    app: Arc<dyn AppStateMachine>,
    /// Metadata of the snapshot kept on disk; the lock also serialises replacing the file.
    current: Mutex<Option<SnapshotMeta>>,
    /// Fetches the bodies a received snapshot references and this node lacks; set once the
    /// mesh and the Raft engine exist (`node::open`).
    fetcher: Arc<OnceLock<Arc<ObjectFetcher>>>,
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
    /// False until openraft's first `get_current_snapshot`, the one its start-up makes to
    /// read the metadata (openraft 0.9's storage helper): that one gets the kept file itself,
    /// every later one (a follower to feed) the transfer file.
    metadata_read: bool,
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
                snapshot_file::restore(&path, restore_app.as_ref(), true).map(Some)
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
            metadata_read: false,
            applied,
            app: app.clone(),
            last_applied: restored.as_ref().and_then(|m| m.last_log_id),
            last_membership: restored
                .as_ref()
                .map(|m| m.last_membership.clone())
                .unwrap_or_default(),
            holds_app_data: Arc::new(std::sync::atomic::AtomicBool::new(restored.is_some())),
            snapshots: Arc::new(SnapshotShared {
                dir: snapshot_dir.to_path_buf(),
                health: app.storage_health(),
                app: app.clone(),
                current: Mutex::new(restored),
                fetcher: Arc::new(OnceLock::new()),
            }),
        })
    }
}

/// Builds one snapshot from a view captured by [`RaftStateMachine::get_snapshot_builder`].
pub struct StateMachineSnapshotBuilder {
    /// The application's captured view; taken by the first `build_snapshot`. A `Mutex` only
    /// because openraft wants builders `Sync`.
    captured: StdMutex<Option<Arc<dyn SnapshotBuilder>>>,
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
        let health = self.snapshots.health.clone();
        let mut attempt = 0;
        let temp = loop {
            let dir = self.snapshots.dir.clone();
            let write_meta = meta.clone();
            let builder = captured.clone();
            let written = tokio::task::spawn_blocking(move || {
                snapshot_file::write_temp(&dir, &write_meta, builder.as_ref())
            })
            .await
            .map_err(join_error)?;
            match written {
                Ok(temp) => break temp,
                Err(e) if health::is_retryable(&e) => {
                    health.report_failure(StorageComponent::Snapshot, &e);
                    tokio::time::sleep(health::retry_delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(snapshot_error(ErrorVerb::Write, &e)),
            }
        };

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
        let mut attempt = 0;
        let file = loop {
            let dir = dir.clone();
            let moving = temp.clone();
            let committed = tokio::task::spawn_blocking(move || {
                snapshot_file::commit(&dir, &moving)?;
                snapshot_file::open_current(&dir)
            })
            .await
            .map_err(join_error)?;
            match committed {
                Ok(file) => break file,
                Err(e) if health::is_retryable(&e) && temp.exists() => {
                    health.report_failure(StorageComponent::Snapshot, &e);
                    tokio::time::sleep(health::retry_delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(snapshot_error(ErrorVerb::Write, &e)),
            }
        };
        health.report_ok(StorageComponent::Snapshot);
        *current = Some(meta.clone());
        captured.kept();
        let stale_dir = dir.clone();
        let keep_id = meta.snapshot_id.clone();
        let _ = tokio::task::spawn_blocking(move || {
            snapshot_file::remove_stale_transfers(&stale_dir, Some(&keep_id))
        })
        .await;
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

    /// Where the body fetcher goes once the mesh and the engine exist.
    pub(crate) fn fetcher_slot(&self) -> Arc<OnceLock<Arc<ObjectFetcher>>> {
        self.snapshots.fetcher.clone()
    }

    /// Fetches, round after round, every object the received snapshot references and this
    /// node lacks (see `raft::fetch`). Returns once none is missing. An OS error (no space
    /// left) and a round that fetched nothing (no peer reachable, or none holding a body) are
    /// retried with backoff, never returned: openraft would stop Raft for good on an error.
    /// Only a stream that cannot be read (corrupt) is an error.
    async fn fetch_missing_objects(
        &self,
        received: &Arc<StdMutex<std::fs::File>>,
        meta: &SnapshotMeta,
    ) -> Result<(), StorageError> {
        let health = self.snapshots.health.clone();
        let started = std::time::Instant::now();
        let mut attempt = 0u32;
        let mut first_round = true;
        let mut total = crate::raft::fetch::Fetched::default();
        loop {
            let app = self.app.clone();
            let scan_meta = meta.clone();
            let scan = received.clone();
            let missing = tokio::task::spawn_blocking(move || {
                let mut file = scan.lock().unwrap_or_else(|p| p.into_inner());
                snapshot_file::missing_objects(&mut file, &scan_meta, app.as_ref())
            })
            .await
            .map_err(join_error)?;
            let missing = match missing {
                Ok(missing) => missing,
                Err(e) if health::is_retryable(&e) => {
                    health.report_failure(StorageComponent::Snapshot, &e);
                    tokio::time::sleep(health::retry_delay(attempt)).await;
                    attempt += 1;
                    continue;
                }
                Err(e) => {
                    return Err(StorageError::from(StorageIOError::new(
                        ErrorSubject::Snapshot(Some(meta.signature())),
                        ErrorVerb::Read,
                        &e,
                    )))
                }
            };
            let fetcher = self.snapshots.fetcher.get().cloned();
            if missing.is_empty() {
                if let Some(fetcher) = &fetcher {
                    fetcher.finish();
                }
                if !first_round {
                    tracing::info!(
                        snapshot = %meta.snapshot_id,
                        bodies = total.objects,
                        bytes = total.bytes,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "snapshot bodies fetched"
                    );
                }
                return Ok(());
            }
            let Some(fetcher) = fetcher else {
                tracing::warn!("snapshot bodies missing and no fetcher yet; waiting");
                tokio::time::sleep(health::retry_delay(attempt)).await;
                attempt += 1;
                continue;
            };
            if first_round {
                tracing::info!(
                    snapshot = %meta.snapshot_id,
                    bodies = missing.len(),
                    bytes = missing.iter().map(|o| o.len).sum::<u64>(),
                    "snapshot install: fetching the bodies this node lacks"
                );
                first_round = false;
            }
            fetcher.begin(&meta.snapshot_id, &missing);
            let fetched = fetcher.fetch(&self.app, &missing).await;
            total.objects += fetched.objects;
            total.bytes += fetched.bytes;
            if fetched.objects == 0 {
                if attempt.is_multiple_of(10) {
                    tracing::warn!(
                        snapshot = %meta.snapshot_id,
                        missing = missing.len(),
                        "no peer gave the missing snapshot bodies; retrying"
                    );
                }
                tokio::time::sleep(health::retry_delay(attempt)).await;
                attempt += 1;
            } else {
                attempt = 0;
            }
        }
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
            captured: StdMutex::new(Some(Arc::from(self.app.begin_snapshot()))),
            last_applied: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    /// An OS error creating the file (no space left...) is retried and reported, not returned:
    /// openraft's state machine worker would stop Raft for good on it. (A failed chunk write
    /// later only fails that request: the leader sends the snapshot again from offset 0.)
    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let health = self.snapshots.health.clone();
        let mut attempt = 0;
        let file = loop {
            let dir = self.snapshots.dir.clone();
            match tokio::task::spawn_blocking(move || snapshot_file::receiving_file(&dir))
                .await
                .map_err(join_error)?
            {
                Ok(file) => break file,
                Err(e) if health::is_retryable(&e) => {
                    health.report_failure(StorageComponent::Snapshot, &e);
                    tokio::time::sleep(health::retry_delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(snapshot_error(ErrorVerb::Write, &e)),
            }
        };
        if attempt > 0 {
            health.report_ok(StorageComponent::Snapshot);
        }
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    #[tracing::instrument(level = "info", skip_all, fields(snapshot = %meta))]
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let received = snapshot.into_std().await;
        let received = Arc::new(StdMutex::new(received));
        // The stream carries references to the bodies, not their bytes: first make every
        // referenced body present here, so the restore never installs a state with a message
        // whose body this node cannot serve.
        self.fetch_missing_objects(&received, meta).await?;
        let mut current = self.snapshots.current.lock().await;
        let health = self.snapshots.health.clone();
        let mut attempt = 0;
        let builder = loop {
            let dir = self.snapshots.dir.clone();
            let app = self.app.clone();
            let install_meta = meta.clone();
            let received = received.clone();
            // Restore from what the leader sent (bodies inlined), then keep this node's own
            // snapshot of the restored state (references only), under the same metadata.
            let installed = tokio::task::spawn_blocking(
                move || -> std::io::Result<Box<dyn SnapshotBuilder>> {
                    let mut received = received.lock().unwrap_or_else(|p| p.into_inner());
                    snapshot_file::restore_received(&mut received, &install_meta, app.as_ref())?;
                    let builder = app.begin_snapshot();
                    let temp = snapshot_file::write_temp(&dir, &install_meta, builder.as_ref())?;
                    let result = snapshot_file::commit(&dir, &temp);
                    if result.is_err() {
                        let _ = std::fs::remove_file(&temp);
                    }
                    result.map(|()| builder)
                },
            )
            .await
            .map_err(join_error)?;
            match installed {
                Ok(builder) => break builder,
                Err(e) if health::is_retryable(&e) => {
                    health.report_failure(StorageComponent::Snapshot, &e);
                    tokio::time::sleep(health::retry_delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(StorageError::from(StorageIOError::new(
                        ErrorSubject::Snapshot(Some(meta.signature())),
                        ErrorVerb::Write,
                        &e,
                    )))
                }
            }
        };
        health.report_ok(StorageComponent::Snapshot);
        builder.kept();
        let stale_dir = self.snapshots.dir.clone();
        let keep_id = meta.snapshot_id.clone();
        let _ = tokio::task::spawn_blocking(move || {
            snapshot_file::remove_stale_transfers(&stale_dir, Some(&keep_id))
        })
        .await;
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
        // The first call is openraft's start-up, whether or not a snapshot is kept: once it is
        // done, every call is for a follower. (Setting the flag only when a snapshot existed
        // made a node that started without one send its first snapshot's own file, with the
        // metadata as references into its chunk store and no way for the follower to read
        // it: "snapshot references body ... which this node does not have", fatal there.)
        let first_call = !self.metadata_read;
        self.metadata_read = true;
        let current = self.snapshots.current.lock().await;
        let Some(meta) = current.clone() else {
            return Ok(None);
        };
        if first_call {
            let file = snapshot_file::open_current(&self.snapshots.dir)
                .map_err(|e| snapshot_error(ErrorVerb::Read, &e))?;
            return Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(tokio::fs::File::from_std(file)),
            }));
        }
        // A follower needs it: the transfer file (bodies inlined), written once per snapshot.
        // It runs on the state machine worker (applies wait), once per kept snapshot.
        let dir = self.snapshots.dir.clone();
        let app = self.snapshots.app.clone();
        let transfer_meta = meta.clone();
        let file = tokio::task::spawn_blocking(move || {
            snapshot_file::open_transfer(&dir, &transfer_meta, app.as_ref())
        })
        .await
        .map_err(join_error)?
        .map_err(|e| snapshot_error(ErrorVerb::Read, &e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}
