//! The seam between the replication engine and the application it replicates.

use std::io;
use std::sync::Arc;

use crate::health::StorageHealth;

/// The application's replicated state machine.
///
/// The cluster crate calls [`AppStateMachine::apply`] with every committed command, in log
/// order, exactly once per process lifetime for each index above the last restored snapshot.
/// The implementation is internally synchronised (methods take `&self`) so that the application
/// can serve reads from the same state concurrently.
pub trait AppStateMachine: Send + Sync + 'static {
    /// Applies one committed command and returns the response handed to the proposer.
    ///
    /// Must be deterministic: the same state and the same bytes give the same new state and the
    /// same response on every node. No clock, no randomness, no hash-order iteration. A command
    /// the application rejects (unknown mailbox, duplicate account) is not an error here: the
    /// rejection is encoded in the response bytes and the state is left unchanged.
    fn apply(&self, log_index: u64, command: &[u8]) -> Vec<u8>;

    /// Captures a consistent point-in-time view, cheaply (it may run while the state is locked).
    /// The returned builder writes it out later, off the lock, while writes go on.
    fn begin_snapshot(&self) -> Box<dyn SnapshotBuilder>;

    /// Replaces the whole state with the one read from a snapshot stream written by a
    /// [`SnapshotBuilder`] (possibly on another node). `local` is true when the stream is this
    /// node's own kept snapshot (a restart): then the data the application keeps beside its
    /// snapshots (message bodies) is already on disk.
    fn restore(&self, snapshot: &mut dyn io::Read, local: bool) -> io::Result<()>;

    /// Writes the stream that a follower installing `local_snapshot` (a stream written by
    /// [`SnapshotBuilder::write_to`]) needs to rebuild this state. What the application keeps
    /// beside its snapshots (message bodies) may go by reference: the follower fetches what it
    /// lacks ([`AppStateMachine::missing_objects`]). Runs on a blocking thread. The default
    /// copies the stream as it is.
    fn write_transfer(
        &self,
        local_snapshot: &mut dyn io::Read,
        out: &mut dyn io::Write,
    ) -> io::Result<()> {
        io::copy(local_snapshot, out).map(|_| ())
    }

    /// The objects (immutable, content-addressed data the application keeps beside its
    /// snapshots: the mail bodies) that a snapshot stream received from the leader (`snapshot`,
    /// a stream written by [`AppStateMachine::write_transfer`]) references and this node does
    /// not hold yet. The cluster fetches them from its peers ([`AppStateMachine::read_objects`]
    /// there, [`AppStateMachine::store_object`] here) before it calls
    /// [`AppStateMachine::restore`]. Runs on a blocking thread. The default: none.
    fn missing_objects(&self, _snapshot: &mut dyn io::Read) -> io::Result<Vec<ObjectRef>> {
        Ok(Vec::new())
    }

    /// Reads objects for a peer installing a snapshot, in the order asked: `None` for one this
    /// node does not hold. Stops (the rest `None`) once `max_bytes` were read. Runs on a
    /// blocking thread.
    fn read_objects(&self, ids: &[ObjectId], _max_bytes: u64) -> Vec<Option<Vec<u8>>> {
        ids.iter().map(|_| None).collect()
    }

    /// Stores an object fetched from a peer, after checking that `bytes` are the object `id`
    /// (content addressing): a mismatch is an `InvalidData` error and nothing is stored. An
    /// object stored here stays whether or not the install that fetched it completes, so a
    /// fetch interrupted and started again asks only for what is still missing. Runs on a
    /// blocking thread.
    fn store_object(&self, _id: &ObjectId, _bytes: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this application keeps no objects beside its snapshots",
        ))
    }

    /// The health of this node's storage, shared with the cluster's log store and snapshots:
    /// the application refuses writes while it is failed.
    fn storage_health(&self) -> Arc<StorageHealth> {
        Arc::new(StorageHealth::new())
    }
}

/// The content address of an object kept beside the snapshots (a mail body's BLAKE3).
pub type ObjectId = [u8; 32];

/// An object a received snapshot references: its id and its stored size (for progress).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectRef {
    pub id: ObjectId,
    pub len: u64,
}

/// Writes a snapshot captured by [`AppStateMachine::begin_snapshot`].
pub trait SnapshotBuilder: Send + Sync + 'static {
    /// Writes the snapshot to `out`. Runs on a blocking thread. May be called again after a
    /// failed attempt (a full disk): it writes the same view again.
    fn write_to(&self, out: &mut dyn io::Write) -> io::Result<()>;

    /// Called once the snapshot written by this builder is the one the node keeps (the
    /// previous one is gone): the application may release what only the previous one needed.
    fn kept(&self) {}
}
