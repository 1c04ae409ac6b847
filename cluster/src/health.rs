//! Storage health: whether this node's disk currently takes writes.
//!
//! With openraft 0.9 a `StorageError` stops Raft for good. So the storage code does not turn
//! an operating error of the disk (no space left, an I/O error, too many open files) into one:
//! it retries the operation with backoff until it succeeds, and reports the failure here
//! meanwhile. The application reads it to refuse new writes with a clear temporary error and
//! to say so in its status; the failure clears by itself when the retried operation succeeds.
//!
//! One log line per transition (failed, recovered) and component, never one per retry.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// First pause before a failed storage operation is retried.
pub const RETRY_DELAY_MIN: Duration = Duration::from_millis(50);
/// Longest pause between two retries (so writes resume within about this long once space
/// returns).
pub const RETRY_DELAY_MAX: Duration = Duration::from_secs(1);

/// The part of the storage that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StorageComponent {
    /// The Raft log (appends, the meta file).
    RaftLog,
    /// Building or installing a snapshot.
    Snapshot,
    /// The application's data (message bodies).
    AppData,
}

impl StorageComponent {
    pub fn name(self) -> &'static str {
        match self {
            StorageComponent::RaftLog => "raft log",
            StorageComponent::Snapshot => "snapshot",
            StorageComponent::AppData => "message bodies",
        }
    }
}

/// One current failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageFailure {
    pub component: StorageComponent,
    /// Short reason, e.g. "no space left on device".
    pub reason: String,
    pub since: SystemTime,
}

/// Shared by the log store, the snapshot code and the application of one node.
#[derive(Debug, Default)]
pub struct StorageHealth {
    failed: AtomicBool,
    failures: Mutex<BTreeMap<StorageComponent, StorageFailure>>,
}

/// Whether an error is an operating error of the disk, which a retry may overcome (as opposed
/// to a logic error of the caller, which stays fatal).
pub fn is_retryable(error: &io::Error) -> bool {
    error.raw_os_error().is_some()
}

/// The reason shown to operators and clients for an OS error.
pub fn reason(error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(code) if code == ENOSPC => "no space left on device".to_owned(),
        Some(code) if code == EDQUOT => "disk quota exceeded".to_owned(),
        Some(code) if code == EIO => "input/output error".to_owned(),
        Some(code) if code == EMFILE || code == ENFILE => "too many open files".to_owned(),
        Some(code) if code == EROFS => "read-only file system".to_owned(),
        _ => {
            let text = error.to_string();
            // "Permission denied (os error 13)" -> "permission denied".
            let text = text.split(" (os error").next().unwrap_or(&text).to_owned();
            text.to_lowercase()
        }
    }
}

// Linux errno values (the crate has no libc dependency; these are fixed by the kernel ABI).
const EIO: i32 = 5;
const ENFILE: i32 = 23;
const EMFILE: i32 = 24;
const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EDQUOT: i32 = 122;

impl StorageHealth {
    pub fn new() -> Self {
        Self::default()
    }

    /// True while any component is failed (cheap: one atomic load).
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The oldest current failure, if any.
    pub fn failure(&self) -> Option<StorageFailure> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.values().min_by_key(|f| f.since).cloned()
    }

    /// Records that `component` failed with `error`. Logs once per transition.
    pub fn report_failure(&self, component: StorageComponent, error: &io::Error) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.contains_key(&component) {
            return;
        }
        let reason = reason(error);
        tracing::error!(
            component = component.name(),
            %reason,
            %error,
            "storage failed: writes are refused until it recovers (retrying in the background)"
        );
        failures.insert(
            component,
            StorageFailure {
                component,
                reason,
                since: SystemTime::now(),
            },
        );
        self.failed.store(true, Ordering::Release);
    }

    /// Records that `component` works (again). Logs once if it was failed.
    pub fn report_ok(&self, component: StorageComponent) {
        if !self.is_failed() {
            return;
        }
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(failure) = failures.remove(&component) {
            let failed_for = SystemTime::now()
                .duration_since(failure.since)
                .unwrap_or_default();
            tracing::info!(
                component = component.name(),
                failed_for_ms = failed_for.as_millis() as u64,
                "storage recovered"
            );
        }
        self.failed.store(!failures.is_empty(), Ordering::Release);
    }
}

/// The pause before retry number `attempt` (0-based): doubling from [`RETRY_DELAY_MIN`] up to
/// [`RETRY_DELAY_MAX`].
pub fn retry_delay(attempt: u32) -> Duration {
    let factor = 1u32 << attempt.min(16);
    RETRY_DELAY_MIN.saturating_mul(factor).min(RETRY_DELAY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_reported_until_its_component_recovers() {
        let health = StorageHealth::new();
        assert!(!health.is_failed());
        let enospc = io::Error::from_raw_os_error(ENOSPC);
        health.report_failure(StorageComponent::RaftLog, &enospc);
        health.report_failure(
            StorageComponent::AppData,
            &io::Error::from_raw_os_error(EIO),
        );
        assert!(health.is_failed());
        let failure = health.failure().unwrap();
        assert_eq!(failure.component, StorageComponent::RaftLog);
        assert_eq!(failure.reason, "no space left on device");
        health.report_ok(StorageComponent::RaftLog);
        assert!(health.is_failed(), "the bodies are still failed");
        assert_eq!(health.failure().unwrap().reason, "input/output error");
        health.report_ok(StorageComponent::AppData);
        assert!(!health.is_failed());
        assert!(health.failure().is_none());
    }

    #[test]
    fn only_os_errors_are_retried_and_delays_are_bounded() {
        assert!(is_retryable(&io::Error::from_raw_os_error(ENOSPC)));
        assert!(!is_retryable(&io::Error::other("append after a hole")));
        assert_eq!(retry_delay(0), RETRY_DELAY_MIN);
        assert_eq!(retry_delay(1), RETRY_DELAY_MIN * 2);
        assert_eq!(retry_delay(40), RETRY_DELAY_MAX);
        assert_eq!(
            reason(&io::Error::from_raw_os_error(13)),
            "permission denied"
        );
    }
}
