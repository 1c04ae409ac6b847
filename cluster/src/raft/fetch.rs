//! Fetching the objects (mail bodies) a received snapshot references and this node lacks.
//!
//! A snapshot sent to a follower carries the application's metadata and references to the
//! objects it keeps beside its snapshots (immutable, content-addressed), not their bytes. Before
//! the follower installs it, [`ObjectFetcher::fetch`] asks its peers for the missing ones: the
//! leader first, then the other members, in batches of at most [`FETCH_BATCH_BYTES`] (by the
//! stored sizes the snapshot names) as [`RaftRpc::FetchObjects`] requests on the mesh's `bulk`
//! channel, so heartbeats never wait behind them. Each object received is checked against its
//! content address and stored at once by the application, so an interrupted fetch (a peer
//! gone, a timeout, a new leader) loses nothing: the next round asks only for what is still
//! missing. Progress (objects and bytes done of total) is logged every
//! [`PROGRESS_LOG_INTERVAL`] and kept in [`FetchProgress`].
//!
//! The serving side is [`serve`]: any mesh peer (a member or an invited node) may ask; an
//! answer holds at most [`MAX_FETCH_REPLY_BYTES`] of bodies (the rest are marked not found and
//! asked again).

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::app::{AppStateMachine, ObjectId, ObjectRef};
use crate::mesh::{Channel, Mesh};

use super::node::Engine;
use super::types::CommandBatch;
use super::wire::{decode, encode, FetchObjects, FetchedObjects, RaftReply, RaftRpc};

/// Bodies asked for in one request, by their stored sizes (one body larger than this goes
/// alone).
pub const FETCH_BATCH_BYTES: u64 = 8 * 1024 * 1024;
/// Ids in one request.
pub const MAX_FETCH_IDS: usize = 4096;
/// Bound on the bodies in one answer (the mesh's default message bound is 64 MiB).
pub const MAX_FETCH_REPLY_BYTES: u64 = 32 * 1024 * 1024;
/// How long one request may take: 8 MiB over a 5 Mbit/s uplink takes about 14 s.
pub const FETCH_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How often progress is logged while fetching.
pub const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(2);

/// Where the fetch for a snapshot install stands (on the installing node).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FetchProgress {
    /// The snapshot being installed.
    pub snapshot_id: String,
    /// Objects missing when the install began, and their stored bytes.
    pub objects_total: u64,
    pub bytes_total: u64,
    /// Objects and bytes fetched so far (over every round of this install).
    pub objects_done: u64,
    pub bytes_done: u64,
    /// Whether every object is present (the install goes on).
    pub complete: bool,
}

/// Fetches objects from this node's peers over the mesh.
pub struct ObjectFetcher {
    mesh: Mesh,
    engine: Weak<Engine>,
    progress: Mutex<Option<FetchProgress>>,
}

/// What one round fetched.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fetched {
    pub objects: u64,
    pub bytes: u64,
}

impl ObjectFetcher {
    pub(crate) fn new(mesh: Mesh, engine: Weak<Engine>) -> Self {
        Self {
            mesh,
            engine,
            progress: Mutex::new(None),
        }
    }

    /// The progress of the current (or last) install's fetch.
    pub fn progress(&self) -> Option<FetchProgress> {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn update(&self, change: impl FnOnce(&mut FetchProgress)) {
        let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(progress) = progress.as_mut() {
            change(progress);
        }
    }

    /// Starts the progress of an install (or keeps it, for another round of the same one).
    pub fn begin(&self, snapshot_id: &str, missing: &[ObjectRef]) {
        let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        if progress
            .as_ref()
            .is_some_and(|p| p.snapshot_id == snapshot_id && !p.complete)
        {
            return;
        }
        *progress = Some(FetchProgress {
            snapshot_id: snapshot_id.to_string(),
            objects_total: missing.len() as u64,
            bytes_total: missing.iter().map(|o| o.len).sum(),
            ..FetchProgress::default()
        });
    }

    /// Marks the install's objects all present.
    pub fn finish(&self) {
        self.update(|p| p.complete = true);
    }

    /// The peers to ask, the leader first: every member but this node.
    fn peers(&self) -> Vec<String> {
        let Some(engine) = self.engine.upgrade() else {
            return Vec::new();
        };
        let metrics = engine.raft.metrics();
        let metrics = metrics.borrow();
        let mut peers: Vec<String> = Vec::new();
        if let Some(leader) = metrics.current_leader.filter(|id| *id != engine.node_id) {
            if let Some(info) = metrics.membership_config.membership().get_node(&leader) {
                peers.push(info.name.clone());
            }
        }
        for (id, info) in metrics.membership_config.membership().nodes() {
            if *id != engine.node_id && !peers.contains(&info.name) {
                peers.push(info.name.clone());
            }
        }
        for (id, info) in &engine.known {
            if *id != engine.node_id && !peers.contains(&info.name) {
                peers.push(info.name.clone());
            }
        }
        peers
    }

    /// One round: asks the peers for `missing`, batch by batch, storing each object received
    /// through `app`. Returns what was fetched; objects no peer gave stay missing (the caller
    /// computes what is missing again and calls once more after a delay).
    pub async fn fetch(&self, app: &Arc<dyn AppStateMachine>, missing: &[ObjectRef]) -> Fetched {
        let peers = self.peers();
        let mut fetched = Fetched::default();
        if peers.is_empty() {
            tracing::warn!("no peer to fetch snapshot bodies from");
            return fetched;
        }
        let started = Instant::now();
        let mut last_log = Instant::now();
        let mut batch_start = 0;
        while batch_start < missing.len() {
            let mut end = batch_start;
            let mut batch_bytes = 0u64;
            while end < missing.len()
                && end - batch_start < MAX_FETCH_IDS
                && (end == batch_start || batch_bytes + missing[end].len <= FETCH_BATCH_BYTES)
            {
                batch_bytes += missing[end].len;
                end += 1;
            }
            let mut wanted: Vec<ObjectId> =
                missing[batch_start..end].iter().map(|o| o.id).collect();
            batch_start = end;
            for peer in &peers {
                if wanted.is_empty() {
                    break;
                }
                let got = match self.ask(peer, &wanted).await {
                    Ok(got) => got,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "snapshot body fetch failed");
                        continue;
                    }
                };
                let mut still = Vec::new();
                let mut received = Vec::new();
                let mut bytes = got.bytes.0.into_iter();
                for (id, found) in wanted.iter().zip(got.found) {
                    match found.then(|| bytes.next()).flatten() {
                        Some(body) => received.push((*id, body)),
                        None => still.push(*id),
                    }
                }
                still.extend(wanted.iter().skip(still.len() + received.len()));
                let store = app.clone();
                let stored = tokio::task::spawn_blocking(move || {
                    let mut stored = Fetched::default();
                    let mut failed = Vec::new();
                    for (id, body) in received {
                        match store.store_object(&id, &body) {
                            Ok(()) => {
                                stored.objects += 1;
                                stored.bytes += body.len() as u64;
                            }
                            Err(error) => {
                                tracing::warn!(
                                    object = %hex_prefix(&id), %error,
                                    "cannot store a fetched snapshot body"
                                );
                                failed.push(id);
                            }
                        }
                    }
                    (stored, failed)
                })
                .await;
                let (stored, failed) = match stored {
                    Ok(result) => result,
                    Err(error) => {
                        tracing::warn!(%error, "storing fetched bodies failed");
                        (Fetched::default(), Vec::new())
                    }
                };
                fetched.objects += stored.objects;
                fetched.bytes += stored.bytes;
                self.update(|p| {
                    p.objects_done += stored.objects;
                    p.bytes_done += stored.bytes;
                });
                still.extend(failed);
                wanted = still;
            }
            if last_log.elapsed() >= PROGRESS_LOG_INTERVAL {
                last_log = Instant::now();
                if let Some(p) = self.progress() {
                    tracing::info!(
                        snapshot = %p.snapshot_id,
                        bodies_done = p.objects_done,
                        bodies_total = p.objects_total,
                        bytes_done = p.bytes_done,
                        bytes_total = p.bytes_total,
                        "fetching snapshot bodies"
                    );
                }
            }
        }
        tracing::debug!(
            objects = fetched.objects,
            bytes = fetched.bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot body fetch round done"
        );
        fetched
    }

    async fn ask(&self, peer: &str, ids: &[ObjectId]) -> Result<FetchedObjects, String> {
        let body = encode(&RaftRpc::FetchObjects(FetchObjects { ids: ids.to_vec() }))?;
        let reply = self
            .mesh
            .request(peer, Channel::Bulk, body, FETCH_REQUEST_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        match decode::<RaftReply>(&reply)? {
            RaftReply::Objects(objects) if objects.found.len() <= ids.len() => Ok(objects),
            RaftReply::Objects(_) => Err(format!("{peer} answered more objects than asked")),
            RaftReply::Refused(reason) => Err(format!("{peer} refused: {reason}")),
            _ => Err(format!("{peer} answered with the wrong reply type")),
        }
    }
}

fn hex_prefix(id: &ObjectId) -> String {
    id.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Serves a [`FetchObjects`] request from `from`: the objects this node holds, at most
/// [`MAX_FETCH_REPLY_BYTES`] of them.
pub(crate) async fn serve(
    app: Arc<dyn AppStateMachine>,
    from: &str,
    request: FetchObjects,
) -> RaftReply {
    if request.ids.len() > MAX_FETCH_IDS {
        tracing::warn!(
            from,
            ids = request.ids.len(),
            "snapshot body request too large"
        );
        return RaftReply::Refused(format!("more than {MAX_FETCH_IDS} objects asked"));
    }
    let ids = request.ids;
    let read =
        tokio::task::spawn_blocking(move || app.read_objects(&ids, MAX_FETCH_REPLY_BYTES)).await;
    let objects = match read {
        Ok(objects) => objects,
        Err(error) => {
            tracing::warn!(from, %error, "reading snapshot bodies for a peer failed");
            return RaftReply::Refused("cannot read objects".to_string());
        }
    };
    let found = objects.iter().map(Option::is_some).collect();
    let bytes = CommandBatch(objects.into_iter().flatten().collect());
    tracing::debug!(from, objects = bytes.0.len(), "served snapshot bodies");
    RaftReply::Objects(FetchedObjects { found, bytes })
}
