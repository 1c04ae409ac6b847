//! kermail: a replicated mail server for small, independent mail providers.
//!
//! Module map (layers, top to bottom; arrows point down only):
//! - [`node`]: the one place that builds and connects the parts (store over the cluster,
//!   listeners, admin socket, shutdown).
//! - [`admin`]: the admin socket server and the CLI client that talks to it.
//! - [`smtp`], [`imap`]: protocol servers (tokio drivers) around sans-IO sessions.
//! - [`backup`]: encrypted, deduplicated backups to a folder or an S3 bucket, and restore.
//! - [`managesieve`]: the ManageSieve server (RFC 5804) for users' Sieve scripts.
//! - [`sieve`]: Sieve scripts run at delivery (sieve-rs), and greylisting's pure parts.
//! - [`filter`]: SPF, DKIM and DMARC checks of incoming mail (mail-auth), `Authentication-Results`.
//! - [`store`]: the mail store, the one door to the replicated mail state.
//! - [`autoconfig`]: the HTTP listener for mail client autoconfiguration, and the DNS
//!   records `domain add` prints.
//! - [`config`], [`tls`]: configuration sections and TLS setup.

pub mod admin;
pub mod auth;
pub mod autoconfig;
pub mod backup;
pub mod config;
pub mod filter;
pub mod imap;
pub mod managesieve;
pub mod mesh_bench;
pub mod node;
pub mod outbound;
pub mod sieve;
pub mod smtp;
pub mod store;
pub mod tls;
