//! Waiting for this node to apply a log index, without waking on every Raft metrics change.
//!
//! A follower that forwarded a write answers its client only once its own state machine has
//! applied the entry (read-your-writes). Waiting on openraft's metrics channel would wake every
//! waiting session at each metrics update (several per entry), which under load costs more CPU
//! than the writes themselves. Here the state machine reports each applied index once and only
//! the waiters at or below it are woken.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;

/// Why a wait ended without the index being applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitError {
    /// The deadline passed first.
    Timeout,
    /// The state machine is gone (the node is shutting down).
    Closed,
}

/// The highest index the state machine applied, and the tasks waiting for a higher one.
#[derive(Default)]
pub(crate) struct AppliedIndex {
    /// The applied index + 1 (0: nothing applied yet).
    applied_plus_one: AtomicU64,
    waiters: Mutex<Waiters>,
}

#[derive(Default)]
struct Waiters {
    closed: bool,
    by_index: BTreeMap<u64, Vec<oneshot::Sender<()>>>,
}

impl AppliedIndex {
    fn waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        // Plain data: a panic while holding the lock leaves nothing half-done.
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// True when `index` has been applied.
    pub(crate) fn has_applied(&self, index: u64) -> bool {
        self.applied_plus_one.load(Ordering::Acquire) > index
    }

    /// Records that everything up to `index` is applied (a lower index than the current one,
    /// after a restore of an older snapshot, lowers it) and wakes the waiters it satisfies.
    pub(crate) fn set(&self, index: Option<u64>) {
        let value = index.map_or(0, |i| i + 1);
        let woken = {
            let mut waiters = self.waiters();
            self.applied_plus_one.store(value, Ordering::Release);
            match index {
                None => BTreeMap::new(),
                Some(index) => {
                    let above = waiters.by_index.split_off(&(index + 1));
                    std::mem::replace(&mut waiters.by_index, above)
                }
            }
        };
        for sender in woken.into_values().flatten() {
            let _ = sender.send(());
        }
    }

    /// Wakes every waiter with [`WaitError::Closed`] and refuses new ones.
    pub(crate) fn close(&self) {
        let dropped = {
            let mut waiters = self.waiters();
            waiters.closed = true;
            std::mem::take(&mut waiters.by_index)
        };
        drop(dropped);
    }

    /// Waits until `index` is applied, or `deadline`.
    pub(crate) async fn wait(
        &self,
        index: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), WaitError> {
        let receiver = {
            let mut waiters = self.waiters();
            // Checked under the lock `set` stores under: no wake-up can fall in between.
            if self.has_applied(index) {
                return Ok(());
            }
            if waiters.closed {
                return Err(WaitError::Closed);
            }
            let (sender, receiver) = oneshot::channel();
            waiters.by_index.entry(index).or_default().push(sender);
            receiver
        };
        match tokio::time::timeout_at(deadline, receiver).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WaitError::Closed),
            Err(_) => {
                // Our sender stays in the map until the index is applied or the node closes
                // (bounded by the callers in flight); check once more in case it just came.
                if self.has_applied(index) {
                    Ok(())
                } else {
                    Err(WaitError::Timeout)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn waiters_wake_when_their_index_is_applied_and_not_before() {
        let applied = Arc::new(AppliedIndex::default());
        assert!(!applied.has_applied(0));
        applied.set(Some(3));
        assert_eq!(applied.wait(3, soon()).await, Ok(()));
        let waiting = {
            let applied = applied.clone();
            tokio::spawn(async move { applied.wait(7, soon()).await })
        };
        let early = {
            let applied = applied.clone();
            tokio::spawn(async move { applied.wait(5, soon()).await })
        };
        // Wait until both are registered.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while applied.waiters().by_index.len() < 2 {
            assert!(
                std::time::Instant::now() < until,
                "waiters never registered"
            );
            tokio::task::yield_now().await;
        }
        applied.set(Some(5));
        assert_eq!(early.await.unwrap(), Ok(()));
        assert!(!waiting.is_finished());
        assert_eq!(applied.waiters().by_index.len(), 1);
        applied.set(Some(9));
        assert_eq!(waiting.await.unwrap(), Ok(()));
        assert!(applied.waiters().by_index.is_empty());
    }

    #[tokio::test]
    async fn a_wait_times_out_and_close_ends_the_others() {
        let applied = Arc::new(AppliedIndex::default());
        let short = tokio::time::Instant::now() + Duration::from_millis(20);
        assert_eq!(applied.wait(1, short).await, Err(WaitError::Timeout));
        let waiting = {
            let applied = applied.clone();
            tokio::spawn(async move { applied.wait(2, soon()).await })
        };
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while !applied.waiters().by_index.contains_key(&2) {
            assert!(std::time::Instant::now() < until, "waiter never registered");
            tokio::task::yield_now().await;
        }
        applied.close();
        assert_eq!(waiting.await.unwrap(), Err(WaitError::Closed));
        assert_eq!(applied.wait(2, soon()).await, Err(WaitError::Closed));
    }
}
