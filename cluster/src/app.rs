//! The seam between the replication engine and the application it replicates.

use std::io;

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
    /// [`SnapshotBuilder`] (possibly on another node).
    fn restore(&self, snapshot: &mut dyn io::Read) -> io::Result<()>;
}

/// Writes a snapshot captured by [`AppStateMachine::begin_snapshot`].
pub trait SnapshotBuilder: Send + 'static {
    /// Writes the snapshot to `out`. Runs on a blocking thread.
    fn write_to(self: Box<Self>, out: &mut dyn io::Write) -> io::Result<()>;
}
