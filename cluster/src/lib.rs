//! kermail-cluster: the replication engine. It knows nothing about mail.
//!
//! Module map:
//! - [`app`]: the trait the application implements ([`AppStateMachine`]); the cluster feeds it
//!   committed commands in log order and asks it for snapshots.

pub mod app;
pub mod mesh;

pub use app::{AppStateMachine, SnapshotBuilder};
