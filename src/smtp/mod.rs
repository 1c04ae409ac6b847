//! SMTP server: the MX role (RFC 5321) receives mail for the local domains; the submission
//! role (RFC 6409, ports 587 with STARTTLS and 465 with implicit TLS) takes mail from
//! authenticated users (AUTH PLAIN and LOGIN, RFC 4954). One session serves both, told apart
//! by its [`ListenerKind`].
//!
//! Module map:
//! - [`session`]: the sans-IO session. An explicit state ([`session::Mode`]) and one transition
//!   function, [`session::Session::step`]: bytes, time and driver events in; replies and
//!   [`session::Action`]s (start TLS, deliver, close) out. Recipient checks go through the
//!   [`session::Recipients`] trait, so the session is tested without a store.
//! - [`data`]: the DATA reader (end-of-data detection and dot-unstuffing).
//! - [`server`]: the tokio driver: accept loop, concurrency limits, timeouts, STARTTLS,
//!   delivery through [`crate::store::MailStore::accept`], graceful shutdown.
//!
//! Invariants:
//! - `250` to the end of a message is written only after `MailStore::accept` returned `Ok`,
//!   which it does only after the delivery command is committed. No quorum: `451 4.4.3`;
//!   any other failure: `451 4.3.0`.
//! - A recipient is accepted only when the store says it is local; a foreign domain from an
//!   unauthenticated client is `550 5.7.1` (this role never authenticates).
//! - After STARTTLS, nothing the client sent in plaintext behind the command is used.
//! - Every buffer is bounded: command lines by `max_command_line_length_bytes`, messages by
//!   `max_message_size_bytes`, unprocessed input by one read buffer; and every phase by a
//!   total deadline (`command_phase_deadline_secs` before authentication or DATA,
//!   `data_deadline_secs` for one message), not only by per-read timeouts.
//! - An SRS address takes bounces (null sender) only, and SRS-shaped recipients are limited
//!   per client address; a message with more than 50 `Received` fields is `554 5.4.6`.
//! - Password checks go through the login throttle shared with IMAP ([`crate::auth`]).
//!
//! Submission invariants (see [`session`]):
//! - AUTH is never offered nor accepted before TLS, loopback included (`530 5.7.0`); the MX
//!   listener does not offer AUTH at all. MAIL before AUTH on submission is `530 5.7.0`.
//! - An authenticated user sends only as their own address or an alias source that expands to
//!   them, as envelope sender (checked at MAIL) and as From (checked at the end of the message,
//!   before anything is stored): `553 5.7.1` otherwise.
//! - A foreign recipient is `550 5.7.1 relaying denied` without authentication, on every
//!   listener. With it, it is accepted and the message goes to [`crate::store::MailStore::accept`]
//!   with the submitting account, which queues it (replicated outbound queue) in the same
//!   commit as the local copies, DKIM-signed; the store refuses foreign recipients again when
//!   no submitter is named.
//! - Failed logins are limited per client IP (IPv6: per /64) and per account, sending per
//!   account ([`limits`]), over all listeners of the node.

pub mod data;
pub mod limits;
pub mod server;
pub mod session;
#[cfg(test)]
mod test_client;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use server::{serve, serve_submission};

/// What a listener is for; the session's rules follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Port 25: mail for local recipients from anyone; AUTH not offered.
    Mx,
    /// Port 587: STARTTLS, then AUTH, then mail from the authenticated user (RFC 6409).
    Submission,
    /// Port 465: the same over implicit TLS (RFC 8314).
    Submissions,
}

impl ListenerKind {
    /// Whether clients must authenticate to send (submission, either port).
    pub fn is_submission(self) -> bool {
        !matches!(self, ListenerKind::Mx)
    }

    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Mx => "smtp",
            ListenerKind::Submission => "submission",
            ListenerKind::Submissions => "submissions",
        }
    }
}

/// The `[smtp]` section of the node's configuration. Every limit has a documented default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// Addresses the MX listener binds. Default `["127.0.0.1:2525"]`.
    pub listen: Vec<SocketAddr>,
    /// Addresses the submission listener binds (port 587 in production): STARTTLS, then AUTH.
    /// Default `["127.0.0.1:2587"]`.
    pub submission_listen: Vec<SocketAddr>,
    /// Addresses the implicit-TLS submission listener binds (port 465 in production).
    /// Default `["127.0.0.1:2465"]`.
    pub submissions_listen: Vec<SocketAddr>,
    /// Longest command line accepted, CRLF included. Longer lines get `500 5.5.2 line too
    /// long` and are discarded up to their end. Default 2048 (RFC 5321 asks for at least 512;
    /// extensions make lines longer).
    pub max_command_line_length_bytes: usize,
    /// Largest message accepted, before the trace headers are added (capped at the store's
    /// `MAX_MESSAGE_BYTES`, 128 MiB, minus 4 KiB for those headers). Advertised in the EHLO
    /// `SIZE` line, checked against `MAIL FROM ... SIZE=` and while receiving (`552 5.3.4`).
    /// Lines inside DATA have no limit of their own: they are stored unchanged (wrapping would
    /// break DKIM signatures and byte-exact storage), and this limit bounds the memory.
    /// Default 25 MiB (26214400).
    pub max_message_size_bytes: usize,
    /// Recipients accepted per message; the next ones get `452 4.5.3` (the client sends them
    /// in another transaction). Capped at the store's `MAX_RECIPIENTS_PER_DELIVERY` (1000).
    /// Default 100.
    pub max_recipients_per_message: usize,
    /// Permanent (5xx) replies a session may earn before it is closed with `421 4.7.0`.
    /// Default 20.
    pub max_errors_per_session: u32,
    /// Idle time allowed while waiting for a command, then `421 4.4.2` and close.
    /// Default 300 (RFC 5321 section 4.5.3.2.7).
    pub command_timeout_secs: u64,
    /// Idle time allowed between two reads of message data (DATA or BDAT), then `421 4.4.2`
    /// and close, storing nothing. Default 180 (RFC 5321 section 4.5.3.2.5).
    pub data_timeout_secs: u64,
    /// Total time a session that has not authenticated may spend outside message data: from
    /// its greeting (or the end of its last message) until its next DATA or BDAT, however
    /// busy it keeps the connection; then `421 4.4.2` and close. Default 600.
    pub command_phase_deadline_secs: u64,
    /// Total time one message's data (DATA, or every BDAT chunk of it) may take, however
    /// often bytes trickle in (a byte a minute no longer holds a session forever); then
    /// `421 4.4.2` and close, storing nothing. Default 600 (25 MiB at 42 KiB/s).
    pub data_deadline_secs: u64,
    /// Sessions open at once over all clients; extra connections get `421 4.7.0` and are
    /// closed. Default 1000.
    pub max_sessions: usize,
    /// Sessions open at once from one client address (IPv6: one /64, the block one subscriber
    /// usually holds). Default 100 (the benchmark opens 50
    /// from 127.0.0.1).
    pub max_sessions_per_ip: usize,
    /// On shutdown, how long sessions in the middle of a transaction may take to finish it
    /// before they are cut. Default 30.
    pub shutdown_grace_period_secs: u64,
    /// Failed logins from one client address (IPv6: one /64) within
    /// `auth_failure_window_secs`; beyond, every AUTH from it is answered
    /// `454 4.7.0` without checking the password. Default 5.
    pub max_auth_failures_per_ip: u32,
    /// Obsolete and ignored (kept so that older files load): failures per account no longer
    /// refuse logins, since strangers could lock the owner out; the shared login throttle
    /// (`[auth]`, [`crate::auth::throttle`]) delays them instead, capped. Default 10.
    pub max_auth_failures_per_account: u32,
    /// The sliding window of both failed-login limits. Default 300.
    pub auth_failure_window_secs: u64,
    /// Pause before answering a failed or refused AUTH (`535`, `454`). Capped at 30 s.
    /// Default 1000.
    pub auth_failure_delay_ms: u64,
    /// Failed AUTH attempts in one session before `421 4.7.0` and close. Default 3.
    pub max_auth_failures_per_session: u32,
    /// Messages one account may submit per minute (sliding window, all listeners); beyond,
    /// MAIL gets `450 4.7.1`. Default 60.
    pub max_messages_per_account_per_minute: u32,
    /// SRS-shaped recipients (`SRS0=...`) that are not one of our SRS addresses, per client
    /// address (IPv6: per /64) within `srs_window_secs`; beyond, every SRS recipient from it
    /// gets `450 4.7.1`. Stops guessing of SRS hashes. Default 10.
    pub max_srs_failures_per_ip: u32,
    /// Bounces through our SRS addresses (they go back out to the original sender) per client
    /// address (IPv6: per /64) within `srs_window_secs`; beyond, `450 4.7.1`. Default 100.
    pub max_srs_bounces_per_ip: u32,
    /// The sliding window of both SRS limits. Default 3600.
    pub srs_window_secs: u64,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            submission_listen: vec![SocketAddr::from(([127, 0, 0, 1], 2587))],
            submissions_listen: vec![SocketAddr::from(([127, 0, 0, 1], 2465))],
            max_command_line_length_bytes: 2048,
            max_message_size_bytes: 25 * 1024 * 1024,
            max_recipients_per_message: 100,
            max_errors_per_session: 20,
            command_timeout_secs: 300,
            data_timeout_secs: 180,
            command_phase_deadline_secs: 600,
            data_deadline_secs: 600,
            max_sessions: 1000,
            max_sessions_per_ip: 100,
            shutdown_grace_period_secs: 30,
            max_auth_failures_per_ip: 5,
            max_auth_failures_per_account: 10,
            auth_failure_window_secs: 300,
            auth_failure_delay_ms: 1000,
            max_auth_failures_per_session: 3,
            max_messages_per_account_per_minute: 60,
            max_srs_failures_per_ip: 10,
            max_srs_bounces_per_ip: 100,
            srs_window_secs: 3600,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_round_trip_through_toml_and_an_empty_section_means_defaults() {
        let text = toml::to_string(&SmtpConfig::default()).unwrap();
        let parsed: SmtpConfig = toml::from_str(&text).unwrap();
        assert_eq!(parsed, SmtpConfig::default());
        let empty: SmtpConfig = toml::from_str("").unwrap();
        assert_eq!(empty, SmtpConfig::default());
        assert!(toml::from_str::<SmtpConfig>("no_such_key = 1").is_err());
    }
}
