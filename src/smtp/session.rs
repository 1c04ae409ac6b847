//! The sans-IO SMTP session (MX and submission roles, told apart by [`ListenerKind`]).
//!
//! [`Session::step`] is the one transition function: it takes an [`Input`] (bytes from the
//! client, the result of a delivery or of a password check, TLS established, a timeout,
//! shutdown, the client gone) and the current time, and returns an [`Output`]: bytes to write
//! and [`Action`]s for the driver. The session never blocks and does no I/O; the outside
//! knowledge it asks for (is a recipient local, which addresses may an account send as) comes
//! through [`Recipients`], and the node-wide rate limits through [`Limiter`].
//!
//! Submission rules (RFC 6409, RFC 4954): AUTH (PLAIN, LOGIN) is offered and accepted only
//! over TLS, loopback included; MAIL needs AUTH; the envelope sender and the From header must
//! be addresses of the authenticated account ([`Recipients::sender_addresses`]).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use smtp_proto::{Error as ParseError, Request};

use super::data::DotReader;
use super::limits::Limiter;
use super::{ListenerKind, SmtpConfig};
use crate::store::{
    looks_like_srs, AccountId, BodyWriter, Delivery, DeliveryReceipt, RecipientCheck, StoreError,
    MAX_MESSAGE_BYTES, MAX_RECIPIENTS_PER_DELIVERY,
};

/// Answers whether an address is one of ours. The driver implements it with
/// [`crate::store::MailStore::check_recipient`]; tests with a table.
pub trait Recipients {
    fn check_recipient(&self, address: &str) -> RecipientCheck;

    /// Greylisting of an unauthenticated RCPT: `Some(seconds)` to answer `451 4.7.1` (retry
    /// in that long), None to go on. The default greylists nothing.
    fn greylist(&self, _client: IpAddr, _mail_from: &str, _recipient: &str) -> Option<u64> {
        None
    }

    /// The addresses `account` may send as, normalized (lowercase): its own and the alias
    /// sources that reach it ([`crate::store::MailStore::sender_addresses`]). The default,
    /// for MX-only implementations, allows nothing.
    fn sender_addresses(&self, _account: AccountId) -> Vec<String> {
        Vec::new()
    }

    /// Whether a message of `size` bytes (`MAIL FROM ... SIZE=`, else 0) to this local
    /// address would bring an account it reaches over its quota
    /// ([`crate::store::MailStore::recipient_over_quota`]): refused at RCPT with `552 5.2.2`.
    fn over_quota(&self, _address: &str, _size: u64) -> bool {
        false
    }
}

/// What happened, as told to the session by its driver.
#[derive(Debug)]
pub enum Input<'a> {
    /// The connection was accepted: the session sends its greeting.
    Connected,
    /// Bytes read from the client.
    Bytes(&'a [u8]),
    /// The outcome of the [`Action::Deliver`] the session asked for.
    DeliveryDone(Result<DeliveryReceipt, StoreError>),
    /// The [`Action::Deliver`] was not carried out: the inbound checks ([`crate::filter`])
    /// refused (`550 5.7.1`) or deferred (`451 4.7.x`) the message with this reply; nothing
    /// was stored.
    DeliveryRefused(String),
    /// The TLS handshake asked for by [`Action::StartTls`] succeeded.
    TlsEstablished,
    /// The outcome of the [`Action::Authenticate`] the session asked for: the account, or
    /// None when the credentials are wrong.
    AuthDone(Option<AccountId>),
    /// The [`Action::Authenticate`] was refused by the login throttle before any check.
    AuthThrottled,
    /// Nothing was read for [`Session::read_timeout`].
    Timeout,
    /// The server is shutting down: close now if idle, else after the current transaction.
    Shutdown,
    /// The client closed the connection (or the connection broke).
    Closed,
}

/// What the driver must do, in order, after writing [`Output::reply`].
#[derive(Debug)]
pub enum Action {
    /// Write the reply, then run the TLS handshake and report [`Input::TlsEstablished`].
    /// Any plaintext bytes received after the STARTTLS command have been discarded.
    StartTls,
    /// Store this message, then report [`Input::DeliveryDone`]. Until then the session reads
    /// no further input.
    Deliver(Box<PendingDelivery>),
    /// Check these credentials against the accounts, then report [`Input::AuthDone`]. Until
    /// then the session reads no further input.
    Authenticate(Credentials),
    /// Write the reply, then close the connection.
    Close,
}

/// A login name and password from AUTH. Its `Debug` never shows the password.
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A complete transaction ready to be stored.
#[derive(Debug)]
pub struct PendingDelivery {
    /// The id chosen for this message, already in its Received header.
    pub message_id: String,
    pub delivery: Delivery,
    /// The authenticated account that submitted it: foreign recipients may then be queued,
    /// and the message is DKIM-signed. None on the MX listener.
    pub submitter: Option<AccountId>,
}

#[derive(Debug, Default)]
pub struct Output {
    /// Bytes to write to the client.
    pub reply: Vec<u8>,
    pub actions: Vec<Action>,
    /// How long the driver waits before writing `reply` (failed logins are answered late);
    /// zero for every other reply.
    pub delay: Duration,
}

/// The session's state: what the next input bytes mean.
#[derive(Debug)]
pub enum Mode {
    /// Before [`Input::Connected`].
    New,
    /// Reading command lines.
    Command,
    /// Reading message content after `DATA` / `354`.
    Data(DotReader),
    /// Reading the bytes of a `BDAT` chunk. `keep` is false when the chunk is being skipped
    /// (no transaction, or the message is already too big); then `refusal` is sent at its end.
    Bdat {
        bytes_left: usize,
        is_last: bool,
        keep: bool,
        refusal: Option<&'static str>,
    },
    /// An [`Action::Deliver`] is outstanding.
    AwaitingDelivery,
    /// An [`Action::StartTls`] is outstanding.
    AwaitingTls,
    /// Reading the client's answer to a `334` AUTH challenge.
    Auth(AuthStep),
    /// An [`Action::Authenticate`] is outstanding.
    AwaitingAuth,
    /// The session is over; input is ignored.
    Closed,
}

/// Which `334` challenge the client is answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// AUTH PLAIN without initial response: the whole `authzid NUL authcid NUL passwd`.
    Plain,
    /// AUTH LOGIN: the user name.
    LoginUsername,
    /// AUTH LOGIN: the password of this user name.
    LoginPassword { username: String },
}

/// The account a submission session authenticated as.
#[derive(Debug, Clone)]
struct Authenticated {
    account: AccountId,
    /// The login name as given, made printable (for logs and replies).
    login: String,
}

/// What the client said in HELO/EHLO.
#[derive(Debug, Clone)]
struct Greeting {
    name: String,
    extended: bool,
}

/// One mail transaction, from MAIL to the end of its message.
#[derive(Debug)]
struct Transaction {
    mail_from: String,
    recipients: Vec<String>,
    n_recipients_refused: usize,
    smtputf8: bool,
    /// The message as received (unstuffed), at most `max_message_size_bytes`: in memory up
    /// to [`crate::store::BODY_MEMORY_BYTES_MAX`], then in an unlinked temporary file.
    body: BodyWriter,
    /// The temporary file could not be written: the message is refused with a 451.
    spool_failed: bool,
    /// Every message byte the client sent, kept or not.
    size_received: usize,
    too_big: bool,
    used_bdat: bool,
    /// `MAIL FROM ... SIZE=` (0 when not given), for the quota check at RCPT.
    declared_size: usize,
}

/// Fixed parts of a session, set by the driver.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub config: Arc<SmtpConfig>,
    /// The node's public host name (banner, Received).
    pub hostname: Arc<str>,
    pub client_ip: IpAddr,
    /// Whether STARTTLS may be offered.
    pub tls_available: bool,
    /// Seed of the generator of message ids (random in the driver, fixed in tests).
    pub id_seed: u64,
    /// The listener's role. For [`ListenerKind::Submissions`] the driver runs the TLS
    /// handshake before [`Input::Connected`], and the session starts with TLS active.
    pub kind: ListenerKind,
    /// The node-wide rate limits (failed logins, messages per account).
    pub limits: Arc<Limiter>,
    /// Where the part of a message past [`crate::store::BODY_MEMORY_BYTES_MAX`] goes (an unlinked file in
    /// the data folder's `tmp`); None: the system's temporary folder.
    pub spool_dir: Option<PathBuf>,
}

/// The SMTP session. See the module comment.
pub struct Session<R> {
    params: SessionParams,
    recipients: R,
    mode: Mode,
    greeting: Option<Greeting>,
    transaction: Option<Transaction>,
    tls_active: bool,
    n_errors: u32,
    /// Received bytes not yet processed (a partial command line, or input that arrived while
    /// a delivery was outstanding).
    pending: Vec<u8>,
    /// Bytes of the current over-long command line thrown away so far.
    discarding_line_bytes: Option<usize>,
    shutting_down: bool,
    /// The message id and log details of the outstanding delivery.
    delivering: Option<(String, TransactionSummary)>,
    id_rng: StdRng,
    /// Set by a successful AUTH (submission listeners only).
    authenticated: Option<Authenticated>,
    /// The login name and mechanism of the outstanding [`Action::Authenticate`].
    authenticating: Option<(String, &'static str)>,
    /// Failed or refused AUTH attempts in this session.
    n_auth_failures: u32,
    /// The total deadline of the current phase (see [`SmtpConfig::command_phase_deadline_secs`]
    /// and [`SmtpConfig::data_deadline_secs`]); None for an authenticated session between
    /// messages.
    deadline: Option<SystemTime>,
}

/// What the transaction log line says about a transaction.
#[derive(Debug, Clone)]
struct TransactionSummary {
    mail_from: String,
    recipients: Vec<String>,
    n_recipients_refused: usize,
    size: usize,
}

/// Replies used in several places.
const REPLY_SPOOL_FAILED: &str = "451 4.3.0 Error: cannot store the message, try again later";
const REPLY_LINE_TOO_LONG: &str = "500 5.5.2 Error: line too long";
const REPLY_NEED_HELO: &str = "503 5.5.1 Error: send HELO/EHLO first";
const REPLY_NEED_MAIL: &str = "503 5.5.1 Error: need MAIL command";
const REPLY_NEED_RCPT: &str = "554 5.5.1 Error: no valid recipients";
const REPLY_TOO_BIG: &str = "552 5.3.4 Error: message size exceeds fixed limit";

/// Longest piece of client text echoed back in a reply.
const ECHO_LENGTH_MAX: usize = 64;
/// Longest refusal from the inbound checks written back (it names a domain from the message).
const REFUSAL_LENGTH_MAX: usize = 256;

impl<R: Recipients> Session<R> {
    pub fn new(params: SessionParams, recipients: R) -> Session<R> {
        let id_rng = StdRng::seed_from_u64(params.id_seed);
        let tls_active = params.kind == ListenerKind::Submissions;
        Session {
            params,
            recipients,
            mode: Mode::New,
            greeting: None,
            transaction: None,
            tls_active,
            n_errors: 0,
            pending: Vec::new(),
            discarding_line_bytes: None,
            shutting_down: false,
            delivering: None,
            id_rng,
            authenticated: None,
            authenticating: None,
            n_auth_failures: 0,
            deadline: None,
        }
    }

    /// The account this session authenticated as, if any.
    pub fn authenticated_account(&self) -> Option<AccountId> {
        self.authenticated
            .as_ref()
            .map(|authenticated| authenticated.account)
    }

    /// The client's address (for the driver's login throttle).
    pub fn client_ip(&self) -> IpAddr {
        self.params.client_ip
    }

    /// The name the client gave in HELO or EHLO ("" before either).
    pub fn helo_name(&self) -> &str {
        self.greeting
            .as_ref()
            .map(|greeting| greeting.name.as_str())
            .unwrap_or("")
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    pub fn is_tls(&self) -> bool {
        self.tls_active
    }

    /// Whether a transaction is under way (MAIL accepted, message not yet answered).
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some() || self.delivering.is_some()
    }

    /// How long the driver waits for input before reporting [`Input::Timeout`]: the idle
    /// timeout of the mode, or less when the phase's total deadline comes first.
    pub fn read_timeout(&self, now: SystemTime) -> Duration {
        let config = &self.params.config;
        let idle = match self.mode {
            Mode::Data(_) | Mode::Bdat { .. } => Duration::from_secs(config.data_timeout_secs),
            _ => Duration::from_secs(config.command_timeout_secs),
        };
        match self.deadline {
            Some(deadline) => idle.min(deadline.duration_since(now).unwrap_or(Duration::ZERO)),
            None => idle,
        }
    }

    /// Starts the command phase's total deadline (none once authenticated).
    fn start_command_phase(&mut self, now: SystemTime) {
        self.deadline = if self.authenticated.is_some() {
            None
        } else {
            Some(now + Duration::from_secs(self.params.config.command_phase_deadline_secs))
        };
    }

    /// Starts the total deadline of one message's data.
    fn start_data_phase(&mut self, now: SystemTime) {
        self.deadline = Some(now + Duration::from_secs(self.params.config.data_deadline_secs));
    }

    /// The transition function.
    pub fn step(&mut self, input: Input<'_>, now: SystemTime) -> Output {
        let mut out = Output::default();
        match input {
            Input::Connected => {
                if matches!(self.mode, Mode::New) {
                    self.mode = Mode::Command;
                    self.start_command_phase(now);
                    let banner = format!("220 {} ESMTP kermail", self.params.hostname);
                    self.push_reply(&mut out, &banner);
                }
            }
            Input::Bytes(bytes) => match self.mode {
                Mode::Closed | Mode::New => {}
                // Plaintext behind STARTTLS is never used (command injection).
                Mode::AwaitingTls => {}
                _ => {
                    self.pending.extend_from_slice(bytes);
                    self.process(&mut out, now);
                }
            },
            Input::DeliveryDone(result) => {
                if matches!(self.mode, Mode::AwaitingDelivery) {
                    self.mode = Mode::Command;
                    let (message_id, summary) = self
                        .delivering
                        .take()
                        .unwrap_or_else(|| (String::new(), TransactionSummary::empty()));
                    match result {
                        Ok(_) => {
                            self.log_transaction(&summary, "delivered", &message_id);
                            let reply = format!("250 2.0.0 Ok: stored as {message_id}");
                            self.push_reply(&mut out, &reply);
                        }
                        Err(error) => {
                            let outcome = format!("deferred: {error}");
                            self.log_transaction(&summary, &outcome, &message_id);
                            // No quorum (or no leader): RFC 3463 4.4.3, a temporary
                            // routing/system failure; anything else is a local error.
                            let reply = match error {
                                StoreError::Unavailable(_) => "451 4.4.3 Error: the cluster cannot commit the message now, try again later",
                                // Some recipient's quota would be passed: nothing was stored.
                                StoreError::OverQuota(_) => "552 5.2.2 Error: mailbox full",
                                // RFC 3463 4.3.1: mail system full.
                                StoreError::StorageFailed(_) => "451 4.3.1 Error: the storage of this server failed, try again later",
                                StoreError::InsufficientStorage(_) => "452 4.3.1 Error: insufficient system storage, try again later",
                                _ => "451 4.3.0 Error: cannot store the message now, try again later",
                            };
                            // A recipient's Sieve script rejected it (RFC 5429): its reason.
                            let reply = match &error {
                                StoreError::Rejected(reason) => {
                                    format!("550 5.7.1 {}", printable(reason, ECHO_LENGTH_MAX))
                                }
                                _ => reply.to_owned(),
                            };
                            self.push_reply(&mut out, &reply);
                        }
                    }
                    self.process(&mut out, now);
                }
            }
            Input::DeliveryRefused(reply) => {
                if matches!(self.mode, Mode::AwaitingDelivery) {
                    self.mode = Mode::Command;
                    let (message_id, summary) = self
                        .delivering
                        .take()
                        .unwrap_or_else(|| (String::new(), TransactionSummary::empty()));
                    let reply = printable(&reply, REFUSAL_LENGTH_MAX);
                    self.log_transaction(&summary, &format!("refused: {reply}"), &message_id);
                    self.push_reply(&mut out, &reply);
                    self.process(&mut out, now);
                }
            }
            Input::AuthDone(result) => {
                if matches!(self.mode, Mode::AwaitingAuth) {
                    self.mode = Mode::Command;
                    self.auth_done(result, &mut out, now);
                    self.process(&mut out, now);
                }
            }
            Input::AuthThrottled => {
                if matches!(self.mode, Mode::AwaitingAuth) {
                    self.mode = Mode::Command;
                    let (username, mechanism) = self
                        .authenticating
                        .take()
                        .unwrap_or_else(|| (String::new(), "-"));
                    self.log_auth(&login_shown(&username), mechanism, "refused: throttled");
                    self.push_reply(
                        &mut out,
                        "454 4.7.0 Error: too many failed authentication attempts, try again later",
                    );
                    self.count_auth_failure(&mut out);
                    self.process(&mut out, now);
                }
            }
            Input::TlsEstablished => {
                if matches!(self.mode, Mode::AwaitingTls) {
                    // RFC 3207: forget everything learnt before; the client starts over.
                    self.tls_active = true;
                    self.greeting = None;
                    self.transaction = None;
                    self.authenticated = None;
                    self.pending.clear();
                    self.discarding_line_bytes = None;
                    self.mode = Mode::Command;
                }
            }
            Input::Timeout => {
                if !matches!(
                    self.mode,
                    Mode::Closed | Mode::AwaitingDelivery | Mode::AwaitingAuth
                ) {
                    self.abort_transaction("aborted: timeout");
                    let reply =
                        format!("421 4.4.2 {} Error: timeout exceeded", self.params.hostname);
                    self.push_reply(&mut out, &reply);
                    self.close(&mut out);
                }
            }
            Input::Shutdown => {
                self.shutting_down = true;
                self.close_if_shutting_down(&mut out);
            }
            Input::Closed => {
                self.abort_transaction("aborted: connection closed by client");
                self.mode = Mode::Closed;
            }
        }
        out
    }

    /// Consumes as much of `pending` as the current mode allows.
    fn process(&mut self, out: &mut Output, now: SystemTime) {
        let pending = std::mem::take(&mut self.pending);
        let mut position = 0;
        while position < pending.len() {
            let rest = &pending[position..];
            match &mut self.mode {
                Mode::Command | Mode::Auth(_) => match self.command_bytes(rest, out, now) {
                    Some(consumed) => position += consumed,
                    // A partial line: wait for more bytes.
                    None => break,
                },
                Mode::Data(reader) => {
                    let max_size = max_message_size(&self.params.config);
                    let transaction = self.transaction.as_mut();
                    let (consumed, done) = match transaction {
                        Some(transaction) => reader.feed(rest, &mut |bytes| {
                            transaction.take_message_bytes(bytes, max_size)
                        }),
                        // DATA is entered only with a transaction; skip the message if not.
                        None => reader.feed(rest, &mut |_| {}),
                    };
                    position += consumed;
                    if done {
                        self.mode = Mode::Command;
                        self.end_of_message(out, now);
                    }
                }
                Mode::Bdat {
                    bytes_left,
                    is_last,
                    keep,
                    refusal,
                } => {
                    let take = (*bytes_left).min(rest.len());
                    let chunk = &rest[..take];
                    *bytes_left -= take;
                    position += take;
                    let chunk_done = *bytes_left == 0;
                    let (is_last, keep, refusal) = (*is_last, *keep, *refusal);
                    if keep {
                        let max_size = max_message_size(&self.params.config);
                        if let Some(transaction) = self.transaction.as_mut() {
                            transaction.take_message_bytes(chunk, max_size);
                        }
                    }
                    if chunk_done {
                        self.mode = Mode::Command;
                        self.end_of_chunk(out, now, is_last, keep, refusal);
                    }
                }
                Mode::New
                | Mode::AwaitingDelivery
                | Mode::AwaitingTls
                | Mode::AwaitingAuth
                | Mode::Closed => break,
            }
            if !matches!(
                self.mode,
                Mode::Command | Mode::Data(_) | Mode::Bdat { .. } | Mode::Auth(_)
            ) {
                break;
            }
        }
        match self.mode {
            // Anything behind STARTTLS (or after the end) is dropped.
            Mode::AwaitingTls | Mode::Closed => {}
            _ => self.pending = pending[position..].to_vec(),
        }
        self.close_if_shutting_down(out);
    }

    /// Handles the bytes at the start of `rest` in command mode; returns how many it used, or
    /// None when they are the start of a line whose end has not arrived.
    fn command_bytes(&mut self, rest: &[u8], out: &mut Output, now: SystemTime) -> Option<usize> {
        let max_line = self.params.config.max_command_line_length_bytes.max(1);
        let newline = rest.iter().position(|&byte| byte == b'\n');
        if let Some(discarded) = self.discarding_line_bytes {
            return Some(match newline {
                Some(index) => {
                    self.discarding_line_bytes = None;
                    index + 1
                }
                None => {
                    // Each further line's worth of garbage counts as one more error, so a
                    // stream without newlines still reaches the error limit.
                    let total = discarded + rest.len();
                    let n_new_errors = total / max_line - discarded / max_line;
                    self.discarding_line_bytes = Some(total);
                    for _ in 0..n_new_errors {
                        self.count_error(out);
                    }
                    rest.len()
                }
            });
        }
        match newline {
            Some(index) if index < max_line => {
                let line = &rest[..=index];
                self.command(line, out, now);
                Some(index + 1)
            }
            Some(index) => {
                self.end_auth_exchange("line too long");
                self.push_reply(out, REPLY_LINE_TOO_LONG);
                Some(index + 1)
            }
            None if rest.len() >= max_line => {
                self.end_auth_exchange("line too long");
                self.push_reply(out, REPLY_LINE_TOO_LONG);
                self.discarding_line_bytes = Some(rest.len());
                Some(rest.len())
            }
            None => None,
        }
    }

    /// One complete command line (ending in LF, at most the configured length).
    fn command(&mut self, line: &[u8], out: &mut Output, now: SystemTime) {
        if let Mode::Auth(step) = &self.mode {
            let step = step.clone();
            return self.auth_response(step, line, out, now);
        }
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(error) => {
                let reply = parse_error_reply(&error);
                self.push_reply(out, &reply);
                return;
            }
        };
        match request {
            Request::Ehlo { host } => self.hello(&host, true, out),
            Request::Helo { host } => self.hello(&host, false, out),
            Request::Mail { from } => self.mail(from, out, now),
            Request::Rcpt { mut to } => {
                // smtp-proto returns an empty address for any path without '@'. The one such
                // path that must be accepted is <postmaster> (RFC 5321 section 4.5.1), taken
                // as the postmaster of this host's own name.
                if to.address.is_empty() {
                    let lower = line.to_ascii_lowercase();
                    if !lower.windows(12).any(|window| window == b"<postmaster>") {
                        return self.push_reply(out, "501 5.1.3 Error: bad recipient address syntax");
                    }
                    to.address = format!("postmaster@{}", self.params.hostname).into();
                }
                self.rcpt(to, out, now)
            }
            Request::Data => self.data(out, now),
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.bdat(chunk_size, is_last, out, now),
            Request::Rset => {
                self.abort_transaction("aborted: RSET");
                self.push_reply(out, "250 2.0.0 Ok");
            }
            Request::Noop { .. } => self.push_reply(out, "250 2.0.0 Ok"),
            Request::Quit => {
                self.abort_transaction("aborted: QUIT");
                self.push_reply(out, "221 2.0.0 Bye");
                self.close(out);
            }
            Request::Vrfy { .. } => self.push_reply(
                out,
                "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
            ),
            Request::Help { .. } => self.push_reply(
                out,
                "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
            ),
            Request::StartTls => self.start_tls(out),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, &initial_response, out, now),
            Request::Lhlo { .. } => {
                self.push_reply(out, "500 5.5.2 Error: command not recognized")
            }
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => {
                self.push_reply(out, "502 5.5.1 Error: command not implemented")
            }
        }
    }

    fn hello(&mut self, host: &str, extended: bool, out: &mut Output) {
        self.abort_transaction("aborted: new HELO/EHLO");
        self.greeting = Some(Greeting {
            // EHLO comes before any SMTPUTF8 transaction: the name must be ASCII (RFC 6531
            // section 3.7.1), and it goes into a header.
            name: printable(host, DOMAIN_LENGTH_MAX)
                .chars()
                .map(|character| if character.is_ascii() { character } else { '?' })
                .collect(),
            extended,
        });
        let hostname = self.params.hostname.clone();
        if !extended {
            self.push_reply(out, &format!("250 {hostname}"));
            return;
        }
        let mut lines = vec![
            hostname.to_string(),
            "PIPELINING".to_owned(),
            format!("SIZE {}", max_message_size(&self.params.config)),
            "8BITMIME".to_owned(),
            "SMTPUTF8".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
            "CHUNKING".to_owned(),
        ];
        // AUTH only on submission listeners, and only over TLS (RFC 4954 section 4).
        if self.params.kind.is_submission() && self.tls_active {
            lines.push("AUTH PLAIN LOGIN".to_owned());
        }
        if self.params.tls_available && !self.tls_active {
            lines.push("STARTTLS".to_owned());
        }
        let n_lines = lines.len();
        for (index, line) in lines.iter().enumerate() {
            let separator = if index + 1 == n_lines { ' ' } else { '-' };
            out.reply
                .extend_from_slice(format!("250{separator}{line}\r\n").as_bytes());
        }
    }

    fn mail(
        &mut self,
        from: smtp_proto::MailFrom<std::borrow::Cow<'_, str>>,
        out: &mut Output,
        now: SystemTime,
    ) {
        if self.greeting.is_none() {
            return self.push_reply(out, REPLY_NEED_HELO);
        }
        if self.params.kind.is_submission() && self.authenticated.is_none() {
            return self.push_reply(out, "530 5.7.0 Authentication required");
        }
        if self.transaction.is_some() {
            return self.push_reply(out, "503 5.5.1 Error: nested MAIL command");
        }
        const SUPPORTED_FLAGS: u64 =
            smtp_proto::MAIL_BODY_7BIT | smtp_proto::MAIL_BODY_8BITMIME | smtp_proto::MAIL_SMTPUTF8;
        let unsupported = from.flags & !SUPPORTED_FLAGS != 0
            || from.trans_id.is_some()
            || from.by != 0
            || from.env_id.is_some()
            || from.solicit.is_some()
            || from.mtrk.is_some()
            || from.hold_for != 0
            || from.hold_until != 0
            || from.mt_priority != 0;
        if unsupported {
            return self.push_reply(out, "555 5.5.4 Error: unsupported MAIL parameter");
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        if let Err(reply) = check_address(&from.address, smtputf8, "5.1.7") {
            return self.push_reply(out, &reply);
        }
        if from.size > max_message_size(&self.params.config) {
            return self.push_reply(out, REPLY_TOO_BIG);
        }
        if let Some(authenticated) = &self.authenticated {
            let allowed = self.recipients.sender_addresses(authenticated.account);
            if !sender_allowed(&from.address, &allowed) {
                let reply = format!(
                    "553 5.7.1 <{}>: Sender address rejected: not owned by user {}",
                    printable(&from.address, ECHO_LENGTH_MAX),
                    authenticated.login
                );
                return self.push_reply(out, &reply);
            }
            if !self
                .params
                .limits
                .may_send(authenticated.account, &self.params.config, now)
            {
                tracing::info!(
                    client = %self.params.client_ip,
                    user = %authenticated.login,
                    "smtp sending rate limit reached"
                );
                return self.push_reply(
                    out,
                    "450 4.7.1 Error: sending rate limit exceeded, try again later",
                );
            }
        }
        self.transaction = Some(Transaction {
            mail_from: from.address.into_owned(),
            recipients: Vec::new(),
            n_recipients_refused: 0,
            smtputf8,
            body: BodyWriter::new(self.params.spool_dir.clone()),
            spool_failed: false,
            size_received: 0,
            too_big: false,
            used_bdat: false,
            declared_size: from.size,
        });
        self.push_reply(out, "250 2.1.0 Ok");
    }

    fn rcpt(
        &mut self,
        to: smtp_proto::RcptTo<std::borrow::Cow<'_, str>>,
        out: &mut Output,
        now: SystemTime,
    ) {
        if self.greeting.is_none() {
            return self.push_reply(out, REPLY_NEED_HELO);
        }
        let Some(transaction) = self.transaction.as_ref() else {
            return self.push_reply(out, REPLY_NEED_MAIL);
        };
        if to.flags != 0 || to.orcpt.is_some() || to.rrvs != 0 {
            return self.push_reply(out, "555 5.5.4 Error: unsupported RCPT parameter");
        }
        if let Err(reply) = check_address(&to.address, transaction.smtputf8, "5.1.3") {
            return self.push_reply(out, &reply);
        }
        if transaction.recipients.len() >= max_recipients(&self.params.config) {
            return self.push_reply(out, "452 4.5.3 Error: too many recipients");
        }
        let address = to.address.into_owned();
        let client = self.params.client_ip;
        // SRS addresses are the one kind of local address that sends mail back out: each
        // client address may try only a few wrong ones (so a 40-bit hash cannot be guessed)
        // and send only so many bounces.
        let srs_shaped = looks_like_srs(&address);
        if srs_shaped
            && self
                .params
                .limits
                .srs_blocked(client, &self.params.config, now)
        {
            tracing::info!(client = %client, "smtp srs recipient refused: rate limit");
            return self.push_reply(
                out,
                "450 4.7.1 Error: too many SRS recipients from your address, try again later",
            );
        }
        let check = self.recipients.check_recipient(&address);
        let echoed = printable(&address, ECHO_LENGTH_MAX);
        let Some(transaction) = self.transaction.as_mut() else {
            return;
        };
        match check {
            // Like Postfix with Dovecot's quota-status: a full mailbox is refused here, where
            // SMTP can answer per recipient, so that the message still reaches the others.
            RecipientCheck::Local
                if self
                    .recipients
                    .over_quota(&address, transaction.declared_size as u64) =>
            {
                transaction.n_recipients_refused += 1;
                let reply =
                    format!("552 5.2.2 <{echoed}>: Recipient address rejected: mailbox full");
                self.push_reply(out, &reply);
            }
            // Greylisting (issue 12): unauthenticated mail only; the store decides and
            // records (replicated, so a retry to another node passes).
            RecipientCheck::Local
                if self.authenticated.is_none()
                    && self
                        .recipients
                        .greylist(client, &transaction.mail_from, &address)
                        .is_some() =>
            {
                transaction.n_recipients_refused += 1;
                self.push_reply(out, "451 4.7.1 Error: greylisted, please try again later");
            }
            RecipientCheck::Local => {
                if !transaction.recipients.contains(&address) {
                    transaction.recipients.push(address);
                }
                self.push_reply(out, "250 2.1.5 Ok");
            }
            RecipientCheck::SrsBounce if transaction.mail_from.is_empty() => {
                if !transaction.recipients.contains(&address) {
                    transaction.recipients.push(address);
                }
                self.params
                    .limits
                    .srs_bounce(client, &self.params.config, now);
                self.push_reply(out, "250 2.1.5 Ok");
            }
            // Anything but a bounce through an SRS address would be relaying.
            RecipientCheck::SrsBounce => {
                transaction.n_recipients_refused += 1;
                let reply = format!(
                    "550 5.7.1 <{echoed}>: Recipient address rejected: this address takes bounces only"
                );
                self.push_reply(out, &reply);
            }
            RecipientCheck::UnknownUser => {
                transaction.n_recipients_refused += 1;
                if srs_shaped {
                    self.params
                        .limits
                        .srs_failed(client, &self.params.config, now);
                }
                let reply =
                    format!("550 5.1.1 <{echoed}>: Recipient address rejected: user unknown");
                self.push_reply(out, &reply);
            }
            // An authenticated submission session's foreign recipients are accepted: the
            // store queues them (replicated outbound queue) in the same commit as the local
            // copies.
            RecipientCheck::ForeignDomain if self.authenticated.is_some() => {
                if !transaction.recipients.contains(&address) {
                    transaction.recipients.push(address);
                }
                self.push_reply(out, "250 2.1.5 Ok");
            }
            // Without authentication, on any listener, a foreign recipient is a relay attempt.
            RecipientCheck::ForeignDomain => {
                transaction.n_recipients_refused += 1;
                let reply = format!("550 5.7.1 <{echoed}>: relaying denied");
                self.push_reply(out, &reply);
            }
        }
    }

    fn data(&mut self, out: &mut Output, now: SystemTime) {
        if self.greeting.is_none() {
            return self.push_reply(out, REPLY_NEED_HELO);
        }
        let Some(transaction) = self.transaction.as_ref() else {
            return self.push_reply(out, REPLY_NEED_MAIL);
        };
        if transaction.used_bdat {
            return self.push_reply(out, "503 5.5.1 Error: DATA after BDAT");
        }
        if transaction.recipients.is_empty() {
            return self.push_reply(out, REPLY_NEED_RCPT);
        }
        self.push_reply(out, "354 End data with <CR><LF>.<CR><LF>");
        self.mode = Mode::Data(DotReader::new());
        self.start_data_phase(now);
    }

    fn bdat(&mut self, chunk_size: usize, is_last: bool, out: &mut Output, now: SystemTime) {
        if chunk_size > max_message_size(&self.params.config) {
            // The chunk cannot be part of an acceptable message, and skipping that many bytes
            // would keep the connection busy for nothing: refuse and close.
            self.abort_transaction("rejected: message too big");
            self.push_reply(out, REPLY_TOO_BIG);
            let reply = format!(
                "421 4.7.0 {} Error: closing connection",
                self.params.hostname
            );
            self.push_reply(out, &reply);
            return self.close(out);
        }
        let refusal = if self.greeting.is_none() {
            Some(REPLY_NEED_HELO)
        } else {
            match self.transaction.as_mut() {
                None => Some(REPLY_NEED_MAIL),
                Some(transaction) if transaction.recipients.is_empty() => Some(REPLY_NEED_RCPT),
                Some(transaction) => {
                    if !transaction.used_bdat {
                        transaction.used_bdat = true;
                        self.deadline =
                            Some(now + Duration::from_secs(self.params.config.data_deadline_secs));
                    }
                    None
                }
            }
        };
        let keep = refusal.is_none();
        if chunk_size == 0 {
            return self.end_of_chunk(out, now, is_last, keep, refusal);
        }
        self.mode = Mode::Bdat {
            bytes_left: chunk_size,
            is_last,
            keep,
            refusal,
        };
    }

    fn end_of_chunk(
        &mut self,
        out: &mut Output,
        now: SystemTime,
        is_last: bool,
        keep: bool,
        refusal: Option<&'static str>,
    ) {
        if let Some(refusal) = refusal {
            return self.push_reply(out, refusal);
        }
        if !keep {
            return;
        }
        let Some(transaction) = self.transaction.as_ref() else {
            return self.push_reply(out, REPLY_NEED_MAIL);
        };
        if is_last || transaction.too_big {
            return self.end_of_message(out, now);
        }
        let reply = format!(
            "250 2.0.0 Ok: {} octets received",
            transaction.size_received
        );
        self.push_reply(out, &reply);
    }

    /// The message is complete: refuse it or hand it to the driver for delivery.
    fn end_of_message(&mut self, out: &mut Output, now: SystemTime) {
        self.start_command_phase(now);
        let Some(mut transaction) = self.transaction.take() else {
            return self.push_reply(out, REPLY_NEED_MAIL);
        };
        let summary = transaction.summary();
        if transaction.too_big {
            self.log_transaction(&summary, "rejected: message too big", "-");
            return self.push_reply(out, REPLY_TOO_BIG);
        }
        if transaction.spool_failed {
            self.log_transaction(&summary, "failed: cannot write the temporary file", "-");
            return self.push_reply(out, REPLY_SPOOL_FAILED);
        }
        let message = match std::mem::replace(&mut transaction.body, BodyWriter::new(None)).finish()
        {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "cannot finish a message's temporary file");
                self.log_transaction(&summary, "failed: cannot write the temporary file", "-");
                return self.push_reply(out, REPLY_SPOOL_FAILED);
            }
        };
        if !message.head_is_complete() {
            // The checks below read the header section from memory: it must end there.
            self.log_transaction(&summary, "rejected: header section too large", "-");
            return self.push_reply(out, "552 5.3.4 Error: header section too large");
        }
        if count_received_headers(message.head()) > MAX_RECEIVED_HEADERS {
            // RFC 5321 section 6.3: a message that went through this many hops is looping.
            self.log_transaction(&summary, "rejected: mail loop (too many Received)", "-");
            return self.push_reply(out, "554 5.4.6 Error: too many hops, mail loop detected");
        }
        if self.params.kind.is_submission() && self.authenticated.is_none() {
            // MAIL already needs AUTH; this only guards the invariant.
            self.log_transaction(&summary, "rejected: not authenticated", "-");
            return self.push_reply(out, "530 5.7.0 Authentication required");
        }
        if let Some(authenticated) = &self.authenticated {
            let allowed = self.recipients.sender_addresses(authenticated.account);
            if let Err(reason) = check_from_header(message.head(), &allowed) {
                let reply = format!("553 5.7.1 Error: From header refused: {reason}");
                self.log_transaction(&summary, &format!("rejected: From header: {reason}"), "-");
                return self.push_reply(out, &reply);
            }
            let account = authenticated.account;
            self.params.limits.sent(account, &self.params.config, now);
        }
        let message_id = format!("{:016X}", self.id_rng.gen::<u64>());
        let mut body = message;
        body.prepend(&self.trace_headers(&transaction, &message_id, now));
        let received_at = now
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs() as i64)
            .unwrap_or(0);
        let delivery = Delivery {
            mail_from: transaction.mail_from,
            recipients: transaction.recipients,
            body,
            received_at,
        };
        self.delivering = Some((message_id.clone(), summary));
        self.mode = Mode::AwaitingDelivery;
        let submitter = self
            .authenticated
            .as_ref()
            .map(|authenticated| authenticated.account);
        out.actions.push(Action::Deliver(Box::new(PendingDelivery {
            message_id,
            delivery,
            submitter,
        })));
    }

    fn start_tls(&mut self, out: &mut Output) {
        if self.tls_active {
            return self.push_reply(out, "554 5.5.1 Error: TLS already active");
        }
        if !self.params.tls_available {
            return self.push_reply(out, "454 4.7.0 TLS not available");
        }
        self.abort_transaction("aborted: STARTTLS");
        self.push_reply(out, "220 2.0.0 Ready to start TLS");
        self.mode = Mode::AwaitingTls;
        out.actions.push(Action::StartTls);
    }

    /// AUTH (RFC 4954). Submission listeners only, and only over TLS, loopback included.
    fn auth(&mut self, mechanism: u64, initial_response: &str, out: &mut Output, now: SystemTime) {
        if !self.params.kind.is_submission() {
            return self.push_reply(out, "503 5.5.1 Error: authentication not enabled");
        }
        if !self.tls_active {
            return self.push_reply(out, "530 5.7.0 Must issue a STARTTLS command first");
        }
        if self.greeting.is_none() {
            return self.push_reply(out, REPLY_NEED_HELO);
        }
        if self.authenticated.is_some() {
            return self.push_reply(out, "503 5.5.1 Error: already authenticated");
        }
        if self.transaction.is_some() {
            return self.push_reply(
                out,
                "503 5.5.1 Error: AUTH not permitted during a mail transaction",
            );
        }
        match mechanism {
            smtp_proto::AUTH_PLAIN if initial_response.is_empty() => {
                self.mode = Mode::Auth(AuthStep::Plain);
                self.push_reply(out, "334 ");
            }
            smtp_proto::AUTH_PLAIN => {
                self.auth_response_text(AuthStep::Plain, initial_response, out, now)
            }
            smtp_proto::AUTH_LOGIN if initial_response.is_empty() => {
                self.mode = Mode::Auth(AuthStep::LoginUsername);
                self.push_reply(out, REPLY_LOGIN_USERNAME);
            }
            smtp_proto::AUTH_LOGIN => {
                self.auth_response_text(AuthStep::LoginUsername, initial_response, out, now)
            }
            _ => self.push_reply(out, "504 5.5.4 Error: unrecognized authentication type"),
        }
    }

    /// A line answering a `334` challenge.
    fn auth_response(&mut self, step: AuthStep, line: &[u8], out: &mut Output, now: SystemTime) {
        self.mode = Mode::Command;
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match std::str::from_utf8(line) {
            Ok(text) => self.auth_response_text(step, text.trim(), out, now),
            Err(_) => self.auth_malformed(out),
        }
    }

    /// The client's response to `step`, as an initial response or after `334`.
    fn auth_response_text(
        &mut self,
        step: AuthStep,
        response: &str,
        out: &mut Output,
        now: SystemTime,
    ) {
        self.mode = Mode::Command;
        if response == "*" {
            self.log_auth("", mechanism_name(&step), "cancelled");
            return self.push_reply(out, "501 5.7.0 Error: authentication cancelled");
        }
        let Some(decoded) = decode_sasl(response) else {
            return self.auth_malformed(out);
        };
        match step {
            AuthStep::Plain => {
                // authzid NUL authcid NUL passwd (RFC 4616).
                let mut parts = decoded.splitn(3, |&byte| byte == 0);
                let (Some(authzid), Some(authcid), Some(password)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return self.auth_malformed(out);
                };
                let (Ok(authzid), Ok(username), Ok(password)) = (
                    std::str::from_utf8(authzid),
                    std::str::from_utf8(authcid),
                    std::str::from_utf8(password),
                ) else {
                    return self.auth_malformed(out);
                };
                if username.is_empty() || password.is_empty() {
                    return self.auth_malformed(out);
                }
                // Acting as another user (a different authorization identity) is not offered:
                // such an attempt fails like a wrong password.
                let proxying = !authzid.is_empty() && !authzid.eq_ignore_ascii_case(username);
                self.submit_credentials(username, password, "PLAIN", proxying, out, now);
            }
            AuthStep::LoginUsername => match String::from_utf8(decoded) {
                Ok(username) if !username.is_empty() => {
                    self.mode = Mode::Auth(AuthStep::LoginPassword { username });
                    self.push_reply(out, REPLY_LOGIN_PASSWORD);
                }
                _ => self.auth_malformed(out),
            },
            AuthStep::LoginPassword { username } => match std::str::from_utf8(&decoded) {
                Ok(password) if !password.is_empty() => {
                    self.submit_credentials(&username, password, "LOGIN", false, out, now)
                }
                _ => self.auth_malformed(out),
            },
        }
    }

    fn auth_malformed(&mut self, out: &mut Output) {
        self.mode = Mode::Command;
        self.log_auth("", "-", "malformed response");
        self.push_reply(out, "501 5.5.2 Error: malformed authentication response");
    }

    /// Leaves a `334` exchange that cannot go on (its line was too long).
    fn end_auth_exchange(&mut self, why: &str) {
        if let Mode::Auth(step) = &self.mode {
            let mechanism = mechanism_name(step);
            self.mode = Mode::Command;
            self.log_auth("", mechanism, why);
        }
    }

    /// Complete credentials: refused at once when rate-limited (or asking to act as someone
    /// else), else handed to the driver to check.
    fn submit_credentials(
        &mut self,
        username: &str,
        password: &str,
        mechanism: &'static str,
        proxying: bool,
        out: &mut Output,
        now: SystemTime,
    ) {
        let client = self.params.client_ip;
        if let Some(block) =
            self.params
                .limits
                .auth_blocked(client, username, &self.params.config, now)
        {
            let outcome = format!("refused: too many failures for this {}", block.as_str());
            self.log_auth(&login_shown(username), mechanism, &outcome);
            out.delay = self.auth_failure_delay();
            self.push_reply(
                out,
                "454 4.7.0 Error: too many failed authentication attempts, try again later",
            );
            return self.count_auth_failure(out);
        }
        if proxying {
            let failure = "failure: authorization identity differs";
            return self.auth_done_as(None, username, mechanism, failure, out, now);
        }
        self.authenticating = Some((username.to_owned(), mechanism));
        self.mode = Mode::AwaitingAuth;
        out.actions.push(Action::Authenticate(Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        }));
    }

    fn auth_done(&mut self, result: Option<AccountId>, out: &mut Output, now: SystemTime) {
        let (username, mechanism) = self
            .authenticating
            .take()
            .unwrap_or_else(|| (String::new(), "-"));
        self.auth_done_as(result, &username, mechanism, "failure", out, now);
    }

    /// The outcome of an AUTH for `username` (as the client gave it).
    fn auth_done_as(
        &mut self,
        result: Option<AccountId>,
        username: &str,
        mechanism: &'static str,
        failure: &str,
        out: &mut Output,
        now: SystemTime,
    ) {
        let login = login_shown(username);
        match result {
            Some(account) => {
                self.log_auth(&login, mechanism, "success");
                self.authenticated = Some(Authenticated { account, login });
                self.deadline = None;
                self.push_reply(out, "235 2.7.0 Authentication successful");
            }
            None => {
                self.params.limits.auth_failed(
                    self.params.client_ip,
                    username,
                    &self.params.config,
                    now,
                );
                self.log_auth(&login, mechanism, failure);
                out.delay = self.auth_failure_delay();
                self.push_reply(out, "535 5.7.8 Error: authentication failed");
                self.count_auth_failure(out);
            }
        }
    }

    fn auth_failure_delay(&self) -> Duration {
        Duration::from_millis(self.params.config.auth_failure_delay_ms).min(AUTH_FAILURE_DELAY_MAX)
    }

    /// One more failed AUTH in this session; past the limit, `421` and close.
    fn count_auth_failure(&mut self, out: &mut Output) {
        if matches!(self.mode, Mode::Closed) {
            return;
        }
        self.n_auth_failures += 1;
        if self.n_auth_failures >= self.params.config.max_auth_failures_per_session {
            let reply = format!(
                "421 4.7.0 {} Error: too many failed authentication attempts",
                self.params.hostname
            );
            out.reply.extend_from_slice(reply.as_bytes());
            out.reply.extend_from_slice(b"\r\n");
            self.close(out);
        }
    }

    /// The one log line per AUTH attempt. Never the password.
    fn log_auth(&self, login: &str, mechanism: &str, outcome: &str) {
        tracing::info!(
            client = %self.params.client_ip,
            listener = self.params.kind.name(),
            user = %login,
            mechanism = %mechanism,
            outcome = %outcome,
            "smtp auth"
        );
    }

    /// `Return-Path` and `Received` (RFC 5321 section 4.4), prepended to the message.
    fn trace_headers(
        &self,
        transaction: &Transaction,
        message_id: &str,
        now: SystemTime,
    ) -> Vec<u8> {
        let helo = self
            .greeting
            .as_ref()
            .map(|greeting| greeting.name.as_str())
            .unwrap_or("unknown");
        let extended = self
            .greeting
            .as_ref()
            .is_some_and(|greeting| greeting.extended);
        let protocol = match (
            extended || self.tls_active,
            transaction.smtputf8,
            self.tls_active,
        ) {
            (_, true, false) => "UTF8SMTP",
            (_, true, true) => "UTF8SMTPS",
            (true, false, true) => "ESMTPS",
            (true, false, false) => "ESMTP",
            (false, false, _) => "SMTP",
        };
        // RFC 3848: "A" for an authenticated session (ESMTPSA, UTF8SMTPSA).
        let authenticated = if self.authenticated.is_some() {
            "A"
        } else {
            ""
        };
        let client = match self.params.client_ip {
            IpAddr::V4(ip) => format!("[{ip}]"),
            IpAddr::V6(ip) => format!("[IPv6:{ip}]"),
        };
        let date = time::OffsetDateTime::from(now)
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap_or_default();
        let mut headers = String::new();
        let _ = write!(
            headers,
            "Return-Path: <{}>\r\nReceived: from {helo} ({client})\r\n\tby {} (kermail) with {protocol}{authenticated} id {message_id}",
            transaction.mail_from, self.params.hostname
        );
        if let [recipient] = transaction.recipients.as_slice() {
            let _ = write!(headers, "\r\n\tfor <{recipient}>");
        }
        let _ = write!(headers, "; {date}\r\n");
        headers.into_bytes()
    }

    /// Appends a one-line reply; a permanent error counts toward the error limit.
    fn push_reply(&mut self, out: &mut Output, text: &str) {
        out.reply.extend_from_slice(text.as_bytes());
        out.reply.extend_from_slice(b"\r\n");
        if text.starts_with('5') {
            self.count_error(out);
        }
    }

    fn count_error(&mut self, out: &mut Output) {
        if matches!(self.mode, Mode::Closed) {
            return;
        }
        self.n_errors += 1;
        if self.n_errors >= self.params.config.max_errors_per_session {
            self.abort_transaction("aborted: too many errors");
            let reply = format!("421 4.7.0 {} Error: too many errors", self.params.hostname);
            out.reply.extend_from_slice(reply.as_bytes());
            out.reply.extend_from_slice(b"\r\n");
            self.close(out);
        }
    }

    fn close(&mut self, out: &mut Output) {
        if matches!(self.mode, Mode::Closed) {
            return;
        }
        self.mode = Mode::Closed;
        self.pending.clear();
        out.actions.push(Action::Close);
    }

    fn close_if_shutting_down(&mut self, out: &mut Output) {
        if self.shutting_down && matches!(self.mode, Mode::Command) && !self.in_transaction() {
            let reply = format!("421 4.3.2 {} Service shutting down", self.params.hostname);
            out.reply.extend_from_slice(reply.as_bytes());
            out.reply.extend_from_slice(b"\r\n");
            self.close(out);
        }
    }

    /// Ends the current transaction without storing anything, logging why.
    fn abort_transaction(&mut self, outcome: &str) {
        if let Some(transaction) = self.transaction.take() {
            self.log_transaction(&transaction.summary(), outcome, "-");
        }
    }

    /// The one log line per transaction. Never the body.
    fn log_transaction(&self, summary: &TransactionSummary, outcome: &str, message_id: &str) {
        let helo = self
            .greeting
            .as_ref()
            .map(|greeting| greeting.name.as_str())
            .unwrap_or("");
        let user = self
            .authenticated
            .as_ref()
            .map(|authenticated| authenticated.login.as_str())
            .unwrap_or("");
        tracing::info!(
            client = %self.params.client_ip,
            listener = self.params.kind.name(),
            user = %user,
            helo = %helo,
            from = %summary.mail_from,
            to = %summary.recipients.join(","),
            n_recipients_refused = summary.n_recipients_refused,
            size = summary.size,
            tls = self.tls_active,
            outcome = %outcome,
            message_id = %message_id,
            "smtp transaction"
        );
    }
}

/// Room left under the store's message cap for the trace headers we prepend: Return-Path and
/// Received hold at most two addresses of 256 bytes, a HELO name of 255, the host name, an id
/// and a date.
const TRACE_HEADERS_BYTES_MAX: usize = 4096;

/// More `Received` header fields than this in a message (before ours) mean a mail loop
/// (RFC 5321 section 6.3 suggests 100 as a "large" limit; Postfix uses 50).
pub const MAX_RECEIVED_HEADERS: usize = 50;

/// `Received:` fields in the header section of `message` (up to its first empty line),
/// counted case-insensitively at line starts; stops as soon as the count passes the limit.
pub fn count_received_headers(message: &[u8]) -> usize {
    let mut count = 0;
    for line in message.split(|&byte| byte == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            count += 1;
            if count > MAX_RECEIVED_HEADERS {
                break;
            }
        }
    }
    count
}

/// The configured message size, never above what the store accepts (a larger setting would
/// only turn into 451s at the end of DATA).
pub fn max_message_size(config: &SmtpConfig) -> usize {
    config
        .max_message_size_bytes
        .min(MAX_MESSAGE_BYTES - TRACE_HEADERS_BYTES_MAX)
}

/// The configured recipient limit, never above what one delivery command takes.
pub fn max_recipients(config: &SmtpConfig) -> usize {
    config
        .max_recipients_per_message
        .min(MAX_RECIPIENTS_PER_DELIVERY)
}

/// Longest HELO name kept (RFC 1035 domain length).
const DOMAIN_LENGTH_MAX: usize = 255;

impl Transaction {
    fn take_message_bytes(&mut self, bytes: &[u8], max_size: usize) {
        self.size_received = self.size_received.saturating_add(bytes.len());
        if self.too_big {
            return;
        }
        if self.spool_failed {
            return;
        }
        if self.body.len() + bytes.len() > max_size {
            self.too_big = true;
            // Drops what was kept (and its temporary file).
            self.body = BodyWriter::new(None);
        } else if let Err(error) = self.body.write(bytes) {
            tracing::warn!(%error, "cannot write a message's temporary file");
            self.spool_failed = true;
            self.body = BodyWriter::new(None);
        }
    }

    fn summary(&self) -> TransactionSummary {
        TransactionSummary {
            mail_from: self.mail_from.clone(),
            recipients: self.recipients.clone(),
            n_recipients_refused: self.n_recipients_refused,
            size: self.size_received,
        }
    }
}

impl TransactionSummary {
    fn empty() -> TransactionSummary {
        TransactionSummary {
            mail_from: String::new(),
            recipients: Vec::new(),
            n_recipients_refused: 0,
            size: 0,
        }
    }
}

/// Replies to AUTH LOGIN: "Username:" and "Password:" in base64 (the customary prompts).
const REPLY_LOGIN_USERNAME: &str = "334 VXNlcm5hbWU6";
const REPLY_LOGIN_PASSWORD: &str = "334 UGFzc3dvcmQ6";

/// Longest login name shown in logs and replies.
const LOGIN_LENGTH_MAX: usize = 256;

/// Upper bound of `auth_failure_delay_ms`, so that a mistyped setting cannot hold sessions
/// for hours.
const AUTH_FAILURE_DELAY_MAX: Duration = Duration::from_secs(30);

/// A login name as shown in logs and replies: trimmed, printable, bounded.
fn login_shown(username: &str) -> String {
    printable(username.trim(), LOGIN_LENGTH_MAX)
}

fn mechanism_name(step: &AuthStep) -> &'static str {
    match step {
        AuthStep::Plain => "PLAIN",
        AuthStep::LoginUsername | AuthStep::LoginPassword { .. } => "LOGIN",
    }
}

/// A SASL response: base64, with "=" standing for an empty response (RFC 4954 section 4).
fn decode_sasl(response: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    if response == "=" {
        return Some(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(response.as_bytes())
        .ok()
}

/// Whether `address` (an envelope sender or a From address) is one of `allowed` (normalized,
/// lowercase). The null sender is not: an authenticated user sends as an address of theirs.
fn sender_allowed(address: &str, allowed: &[String]) -> bool {
    let address = address.trim().to_ascii_lowercase();
    !address.is_empty() && allowed.contains(&address)
}

/// Checks the From header of a submitted message: exactly one From field, naming at least one
/// address, every one of them in `allowed`. The error says what is wrong, for the reply.
fn check_from_header(message: &[u8], allowed: &[String]) -> Result<(), &'static str> {
    let parsed = mail_parser::MessageParser::new()
        .parse_headers(message)
        .ok_or("unreadable header")?;
    let mut from_fields = parsed
        .headers()
        .iter()
        .filter(|header| header.name == mail_parser::HeaderName::From);
    let field = from_fields.next().ok_or("no From header")?;
    if from_fields.next().is_some() {
        return Err("more than one From header");
    }
    let addresses = field.value.as_address().ok_or("unreadable From header")?;
    let mut n_addresses = 0;
    for address in addresses.iter() {
        n_addresses += 1;
        let address = address.address.as_deref().ok_or("unreadable From header")?;
        if !sender_allowed(address, allowed) {
            return Err("address not owned by the authenticated user");
        }
    }
    if n_addresses == 0 {
        return Err("no From address");
    }
    Ok(())
}

/// Refuses control characters (they would end up in headers and logs) and non-ASCII
/// addresses outside an SMTPUTF8 transaction (RFC 6531).
fn check_address(address: &str, smtputf8: bool, status: &str) -> Result<(), String> {
    if address.chars().any(|character| character.is_control()) {
        return Err(format!("501 {status} Error: bad address syntax"));
    }
    if !smtputf8 && !address.is_ascii() {
        return Err("553 5.6.7 Error: SMTPUTF8 is required for non-ASCII addresses".to_owned());
    }
    Ok(())
}

/// Client text made safe to echo in a reply or a header: no control characters, bounded.
fn printable(text: &str, length_max: usize) -> String {
    text.chars()
        .take(length_max)
        .map(|character| {
            if character.is_control() || character == '(' || character == ')' {
                '?'
            } else {
                character
            }
        })
        .collect()
}

fn parse_error_reply(error: &ParseError) -> String {
    match error {
        ParseError::UnknownCommand => "500 5.5.2 Error: command not recognized".to_owned(),
        ParseError::InvalidSenderAddress => "501 5.1.7 Error: bad sender address syntax".to_owned(),
        ParseError::InvalidRecipientAddress => {
            "501 5.1.3 Error: bad recipient address syntax".to_owned()
        }
        ParseError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}"),
        ParseError::InvalidParameter { param } => {
            format!("501 5.5.4 Error: invalid parameter {param}")
        }
        ParseError::UnsupportedParameter { param } => format!(
            "555 5.5.4 Error: unsupported parameter {}",
            printable(param, ECHO_LENGTH_MAX)
        ),
        _ => "500 5.5.2 Error: syntax error".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::BlobId;
    use proptest::prelude::*;

    /// Local domain `example.org` with users alice and bob; every other domain is foreign.
    struct Table;

    impl Recipients for Table {
        fn check_recipient(&self, address: &str) -> RecipientCheck {
            let lower = address.to_ascii_lowercase();
            match lower.rsplit_once('@') {
                Some((user, "example.org")) if user == "alice" || user == "bob" => {
                    RecipientCheck::Local
                }
                Some((_, "example.org")) => RecipientCheck::UnknownUser,
                _ => RecipientCheck::ForeignDomain,
            }
        }

        /// Alice (account 1) also sends as info@; bob (account 2) as sales@.
        fn sender_addresses(&self, account: AccountId) -> Vec<String> {
            let addresses: &[&str] = match account {
                1 => &["alice@example.org", "info@example.org"],
                2 => &["bob@example.org", "sales@example.org"],
                _ => &[],
            };
            addresses
                .iter()
                .map(|address| address.to_string())
                .collect()
        }
    }

    /// Passwords of the table's accounts, as the driver's store would check them.
    fn table_authenticate(credentials: &Credentials) -> Option<AccountId> {
        match (
            credentials.username.to_ascii_lowercase().as_str(),
            credentials.password.as_str(),
        ) {
            ("alice@example.org", "alice password") => Some(1),
            ("bob@example.org", "bob password") => Some(2),
            _ => None,
        }
    }

    /// 2023-11-14 22:13:20 UTC.
    fn test_now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn new_session(config: SmtpConfig) -> Session<Table> {
        new_session_of(config, ListenerKind::Mx, Arc::new(Limiter::new()))
    }

    fn new_session_of(
        config: SmtpConfig,
        kind: ListenerKind,
        limits: Arc<Limiter>,
    ) -> Session<Table> {
        let params = SessionParams {
            config: Arc::new(config),
            hostname: Arc::from("mx.example.org"),
            client_ip: IpAddr::from([192, 0, 2, 7]),
            tls_available: true,
            id_seed: 7,
            kind,
            limits,
            spool_dir: None,
        };
        Session::new(params, Table)
    }

    /// Everything a run produced.
    #[derive(Default)]
    struct Run {
        replies: Vec<u8>,
        deliveries: Vec<PendingDelivery>,
        n_starttls: usize,
        closed: bool,
        /// The delays asked for before replies, in order.
        delays: Vec<Duration>,
        /// Every password the driver was asked to check.
        n_password_checks: usize,
    }

    impl Run {
        fn text(&self) -> String {
            normalise_ids(&String::from_utf8_lossy(&self.replies))
        }
    }

    /// Performs the session's actions the way the driver does, with a store that answers
    /// `delivery_result` and a TLS handshake that always succeeds.
    fn perform(
        session: &mut Session<Table>,
        mut output: Output,
        run: &mut Run,
        delivery_result: &dyn Fn() -> Result<DeliveryReceipt, StoreError>,
    ) {
        loop {
            if !output.delay.is_zero() {
                run.delays.push(output.delay);
            }
            run.replies.extend_from_slice(&output.reply);
            let mut next = None;
            for action in std::mem::take(&mut output.actions) {
                match action {
                    Action::Deliver(pending) => {
                        run.deliveries.push(*pending);
                        next =
                            Some(session.step(Input::DeliveryDone(delivery_result()), test_now()));
                    }
                    Action::StartTls => {
                        run.n_starttls += 1;
                        next = Some(session.step(Input::TlsEstablished, test_now()));
                    }
                    Action::Authenticate(credentials) => {
                        assert!(session.is_tls(), "a password is checked only over TLS");
                        run.n_password_checks += 1;
                        let account = table_authenticate(&credentials);
                        next = Some(session.step(Input::AuthDone(account), test_now()));
                    }
                    Action::Close => run.closed = true,
                }
            }
            match next {
                Some(next) => output = next,
                None => return,
            }
        }
    }

    fn stored() -> Result<DeliveryReceipt, StoreError> {
        Ok(DeliveryReceipt {
            blob: BlobId([0; 32]),
            delivered: vec![(1, 1, 1)],
        })
    }

    /// Runs `input` through a fresh session in chunks of `chunk_bytes`.
    fn run_with(config: SmtpConfig, input: &[u8], chunk_bytes: usize) -> Run {
        let mut session = new_session(config);
        let mut run = Run::default();
        let greeting = session.step(Input::Connected, test_now());
        perform(&mut session, greeting, &mut run, &stored);
        for chunk in input.chunks(chunk_bytes.max(1)) {
            let output = session.step(Input::Bytes(chunk), test_now());
            perform(&mut session, output, &mut run, &stored);
        }
        run
    }

    /// Lines joined with CRLF, each ending in CRLF.
    fn crlf(text: &str) -> String {
        text.lines().map(|line| format!("{line}\r\n")).collect()
    }

    /// Message ids are random: transcripts show them as `<ID>`.
    fn normalise_ids(text: &str) -> String {
        let marker = "stored as ";
        let mut result = String::new();
        let mut rest = text;
        while let Some(index) = rest.find(marker) {
            result.push_str(&rest[..index + marker.len()]);
            result.push_str("<ID>");
            rest = &rest[index + marker.len()..];
            let end = rest.find('\r').unwrap_or(rest.len());
            rest = &rest[end..];
        }
        result.push_str(rest);
        result
    }

    /// The transcript helper: `input` (client lines) must produce `expected` (server lines),
    /// whether it arrives in one piece or byte by byte. Returns the one-piece run.
    fn check(input: &str, expected: &str) -> Run {
        check_with(SmtpConfig::default(), input, expected)
    }

    fn check_with(config: SmtpConfig, input: &str, expected: &str) -> Run {
        let input = crlf(input);
        let whole = run_with(config.clone(), input.as_bytes(), input.len());
        assert_eq!(whole.text(), crlf(expected), "input in one piece");
        let bytewise = run_with(config, input.as_bytes(), 1);
        assert_eq!(bytewise.text(), crlf(expected), "input byte by byte");
        assert_eq!(bytewise.deliveries.len(), whole.deliveries.len());
        whole
    }

    const EHLO_REPLY: &str = "250-mx.example.org
250-PIPELINING
250-SIZE 26214400
250-8BITMIME
250-SMTPUTF8
250-ENHANCEDSTATUSCODES
250-CHUNKING
250 STARTTLS";

    #[test]
    fn ehlo_lists_the_extensions_and_a_message_is_delivered_with_trace_headers() {
        let run = check(
            "EHLO client.example.net
MAIL FROM:<sender@example.net>
RCPT TO:<alice@example.org>
DATA
Subject: hi

..dot stuffed
body
.
QUIT",
            &format!(
                "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
250 2.1.0 Ok
250 2.1.5 Ok
354 End data with <CR><LF>.<CR><LF>
250 2.0.0 Ok: stored as <ID>
221 2.0.0 Bye"
            ),
        );
        assert!(run.closed);
        let [pending] = run.deliveries.as_slice() else {
            panic!("one delivery expected");
        };
        let delivery = &pending.delivery;
        assert_eq!(delivery.mail_from, "sender@example.net");
        assert_eq!(delivery.recipients, vec!["alice@example.org".to_owned()]);
        assert_eq!(delivery.received_at, 1_700_000_000);
        let expected = format!(
            "Return-Path: <sender@example.net>\r\n\
             Received: from client.example.net ([192.0.2.7])\r\n\
             \tby mx.example.org (kermail) with ESMTP id {}\r\n\
             \tfor <alice@example.org>; Tue, 14 Nov 2023 22:13:20 +0000\r\n\
             Subject: hi\r\n\r\n.dot stuffed\r\nbody\r\n",
            pending.message_id
        );
        assert_eq!(String::from_utf8_lossy(delivery.body.head()), expected);
    }

    #[test]
    fn pipelined_transactions_get_one_reply_per_command_in_order() {
        let run = check(
            "EHLO c
MAIL FROM:<>
RCPT TO:<alice@example.org>
RCPT TO:<BOB@example.org>
RCPT TO:<alice@example.org>
DATA
one
.
MAIL FROM:<x@example.net>
RCPT TO:<bob@example.org>
DATA
two
.
QUIT",
            &format!(
                "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
250 2.1.0 Ok
250 2.1.5 Ok
250 2.1.5 Ok
250 2.1.5 Ok
354 End data with <CR><LF>.<CR><LF>
250 2.0.0 Ok: stored as <ID>
250 2.1.0 Ok
250 2.1.5 Ok
354 End data with <CR><LF>.<CR><LF>
250 2.0.0 Ok: stored as <ID>
221 2.0.0 Bye"
            ),
        );
        assert_eq!(run.deliveries.len(), 2);
        let first = &run.deliveries[0].delivery;
        assert_eq!(first.mail_from, "");
        assert_eq!(
            first.recipients,
            vec!["alice@example.org", "BOB@example.org"]
        );
        let body = String::from_utf8_lossy(first.body.head());
        assert!(body.starts_with("Return-Path: <>\r\n"));
        assert!(
            !body.contains("\tfor <"),
            "no for clause with two recipients"
        );
        assert!(body.ends_with("; Tue, 14 Nov 2023 22:13:20 +0000\r\none\r\n"));
        assert_ne!(run.deliveries[0].message_id, run.deliveries[1].message_id);
    }

    #[test]
    fn unknown_user_relay_attempt_and_no_valid_recipient_are_refused() {
        let run = check(
            "HELO c
MAIL FROM:<s@example.net>
RCPT TO:<nobody@example.org>
RCPT TO:<victim@elsewhere.example>
DATA
RSET",
            "220 mx.example.org ESMTP kermail
250 mx.example.org
250 2.1.0 Ok
550 5.1.1 <nobody@example.org>: Recipient address rejected: user unknown
550 5.7.1 <victim@elsewhere.example>: relaying denied
554 5.5.1 Error: no valid recipients
250 2.0.0 Ok",
        );
        assert!(run.deliveries.is_empty());
    }

    #[test]
    fn commands_out_of_sequence_are_refused() {
        check(
            "MAIL FROM:<a@b.example>
RCPT TO:<alice@example.org>
DATA
EHLO c
RCPT TO:<alice@example.org>
DATA
MAIL FROM:<a@b.example>
MAIL FROM:<a@b.example>
DATA
BDAT 0 LAST
NOOP",
            &format!(
                "220 mx.example.org ESMTP kermail
503 5.5.1 Error: send HELO/EHLO first
503 5.5.1 Error: send HELO/EHLO first
503 5.5.1 Error: send HELO/EHLO first
{EHLO_REPLY}
503 5.5.1 Error: need MAIL command
503 5.5.1 Error: need MAIL command
250 2.1.0 Ok
503 5.5.1 Error: nested MAIL command
554 5.5.1 Error: no valid recipients
554 5.5.1 Error: no valid recipients
250 2.0.0 Ok"
            ),
        );
    }

    #[test]
    fn small_commands() {
        check(
            "NOOP
VRFY alice
HELP
EXPN list
AUTH PLAIN AGFsaWNlAHNlY3JldA==
RSET
LHLO x",
            "220 mx.example.org ESMTP kermail
250 2.0.0 Ok
252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery
214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS
502 5.5.1 Error: command not implemented
503 5.5.1 Error: authentication not enabled
250 2.0.0 Ok
500 5.5.2 Error: command not recognized",
        );
    }

    #[test]
    fn a_10000_byte_command_line_gets_one_500_and_the_session_goes_on() {
        let long_line = format!("NOOP {}", "x".repeat(10_000));
        let run = check(
            &format!("EHLO c\n{long_line}\nNOOP"),
            &format!(
                "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
500 5.5.2 Error: line too long
250 2.0.0 Ok"
            ),
        );
        assert!(!run.closed);
    }

    #[test]
    fn binary_garbage_earns_500s_until_the_error_limit_closes_the_session() {
        let config = SmtpConfig {
            max_errors_per_session: 3,
            ..SmtpConfig::default()
        };
        let garbage: Vec<u8> =
            b"\x00\xff\xfe garbage\r\n\x80\x81\r\n\x1b[31m\r\n\x01\x02\r\nNOOP\r\n".to_vec();
        for chunk_bytes in [garbage.len(), 1] {
            let run = run_with(config.clone(), &garbage, chunk_bytes);
            assert_eq!(
                run.text(),
                crlf(
                    "220 mx.example.org ESMTP kermail
500 5.5.2 Error: command not recognized
500 5.5.2 Error: command not recognized
500 5.5.2 Error: command not recognized
421 4.7.0 mx.example.org Error: too many errors"
                )
            );
            assert!(run.closed);
        }
    }

    #[test]
    fn endless_garbage_without_newline_reaches_the_error_limit() {
        let garbage = vec![0xAAu8; 200_000];
        let run = run_with(SmtpConfig::default(), &garbage, 4096);
        assert!(run.closed);
        let text = run.text();
        assert!(text.contains("500 5.5.2 Error: line too long\r\n"));
        assert!(text.ends_with("421 4.7.0 mx.example.org Error: too many errors\r\n"));
    }

    #[test]
    fn declared_size_over_the_limit_is_refused_at_mail() {
        let config = SmtpConfig {
            max_message_size_bytes: 100,
            ..SmtpConfig::default()
        };
        check_with(
            config,
            "EHLO c
MAIL FROM:<s@example.net> SIZE=101
MAIL FROM:<s@example.net> SIZE=100",
            "220 mx.example.org ESMTP kermail
250-mx.example.org
250-PIPELINING
250-SIZE 100
250-8BITMIME
250-SMTPUTF8
250-ENHANCEDSTATUSCODES
250-CHUNKING
250 STARTTLS
552 5.3.4 Error: message size exceeds fixed limit
250 2.1.0 Ok",
        );
    }

    #[test]
    fn a_message_over_the_limit_is_read_to_its_end_then_refused_and_not_stored() {
        let config = SmtpConfig {
            max_message_size_bytes: 100,
            ..SmtpConfig::default()
        };
        let big_line = "y".repeat(150);
        let run = check_with(
            config,
            &format!(
                "HELO c
MAIL FROM:<s@example.net>
RCPT TO:<alice@example.org>
DATA
{big_line}
.
NOOP"
            ),
            "220 mx.example.org ESMTP kermail
250 mx.example.org
250 2.1.0 Ok
250 2.1.5 Ok
354 End data with <CR><LF>.<CR><LF>
552 5.3.4 Error: message size exceeds fixed limit
250 2.0.0 Ok",
        );
        assert!(run.deliveries.is_empty());
    }

    #[test]
    fn recipients_beyond_the_limit_get_452() {
        let config = SmtpConfig {
            max_recipients_per_message: 1,
            ..SmtpConfig::default()
        };
        check_with(
            config,
            "HELO c
MAIL FROM:<s@example.net>
RCPT TO:<alice@example.org>
RCPT TO:<bob@example.org>",
            "220 mx.example.org ESMTP kermail
250 mx.example.org
250 2.1.0 Ok
250 2.1.5 Ok
452 4.5.3 Error: too many recipients",
        );
    }

    #[test]
    fn bdat_chunks_make_one_message_stored_unchanged() {
        let input =
            b"EHLO c\r\nMAIL FROM:<s@example.net> BODY=8BITMIME\r\nRCPT TO:<bob@example.org>\r\n\
BDAT 10\r\nA: b\r\n\r\n.\rBDAT 6 LAST\r\n\n.\r\nxyQUIT\r\n";
        for chunk_bytes in [input.len(), 1] {
            let run = run_with(SmtpConfig::default(), input, chunk_bytes);
            assert_eq!(
                run.text(),
                crlf(&format!(
                    "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
250 2.1.0 Ok
250 2.1.5 Ok
250 2.0.0 Ok: 10 octets received
250 2.0.0 Ok: stored as <ID>
221 2.0.0 Bye"
                ))
            );
            let [pending] = run.deliveries.as_slice() else {
                panic!("one delivery expected");
            };
            let body = pending.delivery.body.head();
            assert!(
                body.ends_with(b"+0000\r\nA: b\r\n\r\n.\r\n.\r\nxy"),
                "{body:?}"
            );
        }
    }

    #[test]
    fn bdat_without_a_transaction_skips_its_bytes() {
        check(
            "EHLO c
BDAT 6
QUIT
BDAT 0 LAST
NOOP",
            &format!(
                "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
503 5.5.1 Error: need MAIL command
503 5.5.1 Error: need MAIL command
250 2.0.0 Ok"
            ),
        );
    }

    #[test]
    fn a_bdat_chunk_larger_than_any_message_closes_the_session() {
        let run = check(
            "EHLO c
MAIL FROM:<s@example.net>
RCPT TO:<bob@example.org>
BDAT 999999999999 LAST",
            &format!(
                "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
250 2.1.0 Ok
250 2.1.5 Ok
552 5.3.4 Error: message size exceeds fixed limit
421 4.7.0 mx.example.org Error: closing connection"
            ),
        );
        assert!(run.closed);
        assert!(run.deliveries.is_empty());
    }

    #[test]
    fn data_after_bdat_is_refused() {
        check(
            "EHLO c
MAIL FROM:<s@example.net>
RCPT TO:<bob@example.org>
BDAT 1
xDATA",
            &format!(
                "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
250 2.1.0 Ok
250 2.1.5 Ok
250 2.0.0 Ok: 1 octets received
503 5.5.1 Error: DATA after BDAT"
            ),
        );
    }

    #[test]
    fn commands_pipelined_behind_starttls_are_discarded_and_ehlo_is_needed_again() {
        let mut session = new_session(SmtpConfig::default());
        let mut run = Run::default();
        let greeting = session.step(Input::Connected, test_now());
        perform(&mut session, greeting, &mut run, &stored);
        let injected = crlf(
            "EHLO c
STARTTLS
MAIL FROM:<evil@example.net>
RCPT TO:<alice@example.org>",
        );
        let output = session.step(Input::Bytes(injected.as_bytes()), test_now());
        perform(&mut session, output, &mut run, &stored);
        assert_eq!(run.n_starttls, 1);
        assert!(session.is_tls());
        let after = crlf(
            "MAIL FROM:<a@example.net>
EHLO c
STARTTLS",
        );
        let output = session.step(Input::Bytes(after.as_bytes()), test_now());
        perform(&mut session, output, &mut run, &stored);
        assert_eq!(
            run.text(),
            crlf(&format!(
                "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
220 2.0.0 Ready to start TLS
503 5.5.1 Error: send HELO/EHLO first
250-mx.example.org
250-PIPELINING
250-SIZE 26214400
250-8BITMIME
250-SMTPUTF8
250-ENHANCEDSTATUSCODES
250 CHUNKING
554 5.5.1 Error: TLS already active"
            ))
        );
    }

    #[test]
    fn received_says_esmtps_after_starttls() {
        let mut session = new_session(SmtpConfig::default());
        let mut run = Run::default();
        for part in [
            "",
            "EHLO c\r\nSTARTTLS\r\n",
            "EHLO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nx\r\n.\r\n",
        ] {
            let output = if part.is_empty() {
                session.step(Input::Connected, test_now())
            } else {
                session.step(Input::Bytes(part.as_bytes()), test_now())
            };
            perform(&mut session, output, &mut run, &stored);
        }
        let [pending] = run.deliveries.as_slice() else {
            panic!("one delivery expected");
        };
        let body = String::from_utf8_lossy(pending.delivery.body.head());
        assert!(body.contains(" with ESMTPS id "), "{body}");
    }

    #[test]
    fn a_failed_delivery_answers_451_and_the_session_goes_on() {
        let mut session = new_session(SmtpConfig::default());
        let mut run = Run::default();
        let unavailable = || Err(StoreError::Unavailable("no quorum".to_owned()));
        let greeting = session.step(Input::Connected, test_now());
        perform(&mut session, greeting, &mut run, &unavailable);
        let input = crlf(
            "HELO c
MAIL FROM:<a@example.net>
RCPT TO:<alice@example.org>
DATA
x
.
NOOP",
        );
        let output = session.step(Input::Bytes(input.as_bytes()), test_now());
        perform(&mut session, output, &mut run, &unavailable);
        assert_eq!(
            run.text(),
            crlf(
                "220 mx.example.org ESMTP kermail
250 mx.example.org
250 2.1.0 Ok
250 2.1.5 Ok
354 End data with <CR><LF>.<CR><LF>
451 4.4.3 Error: the cluster cannot commit the message now, try again later
250 2.0.0 Ok"
            )
        );
    }

    #[test]
    fn received_fields_are_counted_in_the_header_section_only() {
        let headers = "Received: a\r\nRECEIVED: b\r\n c\r\nSubject: x\r\n\r\nReceived: body\r\n";
        assert_eq!(count_received_headers(headers.as_bytes()), 2);
        assert_eq!(count_received_headers(b""), 0);
        let many = "Received: x\n".repeat(500);
        assert_eq!(
            count_received_headers(many.as_bytes()),
            MAX_RECEIVED_HEADERS + 1
        );
    }

    #[test]
    fn smuggled_end_of_data_with_bare_lf_is_message_content() {
        let run = check(
            "HELO c
MAIL FROM:<a@example.net>
RCPT TO:<alice@example.org>
DATA",
            "220 mx.example.org ESMTP kermail
250 mx.example.org
250 2.1.0 Ok
250 2.1.5 Ok
354 End data with <CR><LF>.<CR><LF>",
        );
        assert!(run.deliveries.is_empty());
        let input =
            b"HELO c\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n\
x\n.\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\ny\r\n.\r\n";
        let run = run_with(SmtpConfig::default(), input, input.len());
        assert_eq!(run.deliveries.len(), 1);
        assert_eq!(
            run.deliveries[0].delivery.recipients,
            vec!["alice@example.org"]
        );
    }

    #[test]
    fn a_client_gone_mid_data_or_silent_stores_nothing() {
        let mut session = new_session(SmtpConfig::default());
        let mut run = Run::default();
        let greeting = session.step(Input::Connected, test_now());
        perform(&mut session, greeting, &mut run, &stored);
        let input =
            crlf("HELO c\nMAIL FROM:<a@example.net>\nRCPT TO:<alice@example.org>\nDATA\nhalf");
        let output = session.step(Input::Bytes(input.as_bytes()), test_now());
        perform(&mut session, output, &mut run, &stored);
        assert_eq!(session.read_timeout(test_now()), Duration::from_secs(180));
        let output = session.step(Input::Closed, test_now());
        perform(&mut session, output, &mut run, &stored);
        assert!(run.deliveries.is_empty());
        assert!(matches!(session.mode(), Mode::Closed));

        let mut session = new_session(SmtpConfig::default());
        let mut run = Run::default();
        let greeting = session.step(Input::Connected, test_now());
        perform(&mut session, greeting, &mut run, &stored);
        let output = session.step(Input::Timeout, test_now());
        perform(&mut session, output, &mut run, &stored);
        assert_eq!(
            run.text(),
            crlf("220 mx.example.org ESMTP kermail\n421 4.4.2 mx.example.org Error: timeout exceeded")
        );
        assert!(run.closed);
    }

    #[test]
    fn shutdown_closes_an_idle_session_at_once_and_a_busy_one_after_its_message() {
        let mut session = new_session(SmtpConfig::default());
        let mut run = Run::default();
        let greeting = session.step(Input::Connected, test_now());
        perform(&mut session, greeting, &mut run, &stored);
        let output = session.step(Input::Shutdown, test_now());
        perform(&mut session, output, &mut run, &stored);
        assert!(run.closed);
        assert!(run
            .text()
            .ends_with("421 4.3.2 mx.example.org Service shutting down\r\n"));

        let mut session = new_session(SmtpConfig::default());
        let mut run = Run::default();
        let greeting = session.step(Input::Connected, test_now());
        perform(&mut session, greeting, &mut run, &stored);
        let start =
            crlf("HELO c\nMAIL FROM:<a@example.net>\nRCPT TO:<alice@example.org>\nDATA\nhalf");
        let output = session.step(Input::Bytes(start.as_bytes()), test_now());
        perform(&mut session, output, &mut run, &stored);
        let output = session.step(Input::Shutdown, test_now());
        perform(&mut session, output, &mut run, &stored);
        assert!(!run.closed, "the message in flight may finish");
        let output = session.step(Input::Bytes(b" done\r\n.\r\n"), test_now());
        perform(&mut session, output, &mut run, &stored);
        assert_eq!(run.deliveries.len(), 1);
        assert!(run.closed);
        assert!(run.text().ends_with(
            "250 2.0.0 Ok: stored as <ID>\r\n421 4.3.2 mx.example.org Service shutting down\r\n"
        ));
    }

    #[test]
    fn non_ascii_addresses_need_smtputf8() {
        let run = check(
            "EHLO c
MAIL FROM:<josé@example.net>
MAIL FROM:<josé@example.net> SMTPUTF8
RCPT TO:<alice@example.org>
DATA
x
.",
            &format!(
                "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
553 5.6.7 Error: SMTPUTF8 is required for non-ASCII addresses
250 2.1.0 Ok
250 2.1.5 Ok
354 End data with <CR><LF>.<CR><LF>
250 2.0.0 Ok: stored as <ID>"
            ),
        );
        let body = String::from_utf8_lossy(run.deliveries[0].delivery.body.head());
        assert!(body.contains(" with UTF8SMTP id "), "{body}");
    }

    #[test]
    fn unsupported_parameters_are_refused() {
        check(
            "EHLO c
MAIL FROM:<a@example.net> RET=FULL
MAIL FROM:<a@example.net>
RCPT TO:<alice@example.org> NOTIFY=NEVER",
            &format!(
                "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
555 5.5.4 Error: unsupported MAIL parameter
250 2.1.0 Ok
555 5.5.4 Error: unsupported RCPT parameter"
            ),
        );
    }

    #[test]
    fn postmaster_without_domain_means_this_host_and_an_empty_recipient_is_refused() {
        let run = check(
            "HELO c
MAIL FROM:<a@example.net>
RCPT TO:<>
RCPT TO:<Postmaster>",
            "220 mx.example.org ESMTP kermail
250 mx.example.org
250 2.1.0 Ok
501 5.1.3 Error: bad recipient address syntax
550 5.7.1 <postmaster@mx.example.org>: relaying denied",
        );
        assert!(run.deliveries.is_empty());
    }

    /// A writer that keeps what tracing writes, for the log test.
    #[derive(Clone, Default)]
    struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

    /// Runs `f` with a subscriber that captures this thread's log lines and returns them.
    ///
    /// tracing caches one interest per callsite for the whole process. While only one
    /// dispatcher is registered, a callsite first reached by another test thread (which has no
    /// subscriber) is cached as "never" and our events vanish (this failed CI once). A second
    /// dispatcher kept alive for the whole test binary makes tracing ask every registered
    /// dispatcher instead of the registering thread's default, and the rebuild re-asks the
    /// callsites that were cached before our subscriber existed.
    fn with_captured_log<R>(f: impl FnOnce() -> R) -> (R, String) {
        static KEEP_TWO_DISPATCHERS: std::sync::OnceLock<tracing::Dispatch> =
            std::sync::OnceLock::new();
        KEEP_TWO_DISPATCHERS.get_or_init(|| tracing::Dispatch::new(tracing_subscriber::registry()));
        let log = CapturedLog::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let result = tracing::subscriber::with_default(subscriber, || {
            tracing::callsite::rebuild_interest_cache();
            f()
        });
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        (result, text)
    }

    impl std::io::Write for CapturedLog {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_log_line_per_transaction_with_its_outcome_and_never_the_body() {
        let (run, text) = with_captured_log(|| {
            check(
                "EHLO client.example.net
MAIL FROM:<s@example.net>
RCPT TO:<alice@example.org>
RCPT TO:<nobody@example.org>
DATA
Subject: TOPSECRET
.
MAIL FROM:<t@example.net>
RSET
QUIT",
                &format!(
                    "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
250 2.1.0 Ok
250 2.1.5 Ok
550 5.1.1 <nobody@example.org>: Recipient address rejected: user unknown
354 End data with <CR><LF>.<CR><LF>
250 2.0.0 Ok: stored as <ID>
250 2.1.0 Ok
250 2.0.0 Ok
221 2.0.0 Bye"
                ),
            )
        });
        let lines: Vec<&str> = text.lines().collect();
        // check() runs the input twice (whole, then byte by byte): two lines per run.
        assert_eq!(lines.len(), 4, "{text}");
        let delivered = lines[0];
        for field in [
            "client=192.0.2.7",
            "helo=client.example.net",
            "from=s@example.net",
            "to=alice@example.org",
            "n_recipients_refused=1",
            "size=20",
            "outcome=delivered",
            &format!("message_id={}", run.deliveries[0].message_id),
        ] {
            assert!(delivered.contains(field), "{field} missing in {delivered}");
        }
        assert!(
            lines[1].contains("from=t@example.net") && lines[1].contains("outcome=aborted: RSET")
        );
        assert!(!text.contains("TOPSECRET"));
    }

    #[test]
    fn limits_above_the_store_caps_are_clamped_to_them() {
        let config = SmtpConfig {
            max_message_size_bytes: usize::MAX,
            max_recipients_per_message: usize::MAX,
            ..SmtpConfig::default()
        };
        assert!(max_message_size(&config) + TRACE_HEADERS_BYTES_MAX <= MAX_MESSAGE_BYTES);
        assert_eq!(max_recipients(&config), MAX_RECIPIENTS_PER_DELIVERY);
        let defaults = SmtpConfig::default();
        assert_eq!(max_message_size(&defaults), defaults.max_message_size_bytes);
        assert_eq!(
            max_recipients(&defaults),
            defaults.max_recipients_per_message
        );
    }

    // ----- submission -----

    fn b64(text: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(text.as_bytes())
    }

    /// AUTH PLAIN credentials as an initial response.
    fn plain(user: &str, password: &str) -> String {
        b64(&format!("\0{user}\0{password}"))
    }

    /// A submission session from `client_ip` sharing `limits`.
    fn submission_session(
        kind: ListenerKind,
        config: SmtpConfig,
        limits: Arc<Limiter>,
        client_ip: IpAddr,
    ) -> Session<Table> {
        let mut session = new_session_of(config, kind, limits);
        session.params.client_ip = client_ip;
        session
    }

    /// Runs `parts` (each a group of client lines, sent after the previous group's replies)
    /// through a session; `chunk_bytes` splits each part.
    fn converse(session: &mut Session<Table>, parts: &[&str], chunk_bytes: usize) -> Run {
        let mut run = Run::default();
        let greeting = session.step(Input::Connected, test_now());
        perform(session, greeting, &mut run, &stored);
        for part in parts {
            let input = crlf(part);
            for chunk in input.as_bytes().chunks(chunk_bytes.max(1)) {
                let output = session.step(Input::Bytes(chunk), test_now());
                perform(session, output, &mut run, &stored);
            }
        }
        run
    }

    /// The transcript helper for submission: `parts` must produce `expected` whether each
    /// part arrives whole or byte by byte (each run with a fresh session and limiter).
    fn check_submission(
        kind: ListenerKind,
        config: SmtpConfig,
        parts: &[&str],
        expected: &str,
    ) -> Run {
        let client = IpAddr::from([192, 0, 2, 7]);
        let fresh = || submission_session(kind, config.clone(), Arc::new(Limiter::new()), client);
        let whole = converse(&mut fresh(), parts, usize::MAX);
        assert_eq!(whole.text(), crlf(expected), "input in one piece");
        let bytewise = converse(&mut fresh(), parts, 1);
        assert_eq!(bytewise.text(), crlf(expected), "input byte by byte");
        assert_eq!(bytewise.deliveries.len(), whole.deliveries.len());
        whole
    }

    const SUBMISSION_EHLO_BEFORE_TLS: &str = "250-mx.example.org
250-PIPELINING
250-SIZE 26214400
250-8BITMIME
250-SMTPUTF8
250-ENHANCEDSTATUSCODES
250-CHUNKING
250 STARTTLS";

    const SUBMISSION_EHLO_TLS: &str = "250-mx.example.org
250-PIPELINING
250-SIZE 26214400
250-8BITMIME
250-SMTPUTF8
250-ENHANCEDSTATUSCODES
250-CHUNKING
250 AUTH PLAIN LOGIN";

    #[test]
    fn submission_refuses_auth_before_tls_on_loopback_too_then_offers_it_over_tls() {
        let credentials = plain("alice@example.org", "alice password");
        for client in [IpAddr::from([127, 0, 0, 1]), "::1".parse().unwrap()] {
            let mut session = submission_session(
                ListenerKind::Submission,
                SmtpConfig::default(),
                Arc::new(Limiter::new()),
                client,
            );
            let run = converse(
                &mut session,
                &[
                    &format!(
                        "EHLO c
AUTH PLAIN {credentials}
AUTH LOGIN
MAIL FROM:<alice@example.org>
RCPT TO:<bob@example.org>
STARTTLS"
                    ),
                    &format!(
                        "EHLO c
MAIL FROM:<alice@example.org>
AUTH PLAIN {credentials}
MAIL FROM:<alice@example.org>"
                    ),
                ],
                usize::MAX,
            );
            assert_eq!(
                run.text(),
                crlf(&format!(
                    "220 mx.example.org ESMTP kermail
{SUBMISSION_EHLO_BEFORE_TLS}
530 5.7.0 Must issue a STARTTLS command first
530 5.7.0 Must issue a STARTTLS command first
530 5.7.0 Authentication required
503 5.5.1 Error: need MAIL command
220 2.0.0 Ready to start TLS
{SUBMISSION_EHLO_TLS}
530 5.7.0 Authentication required
235 2.7.0 Authentication successful
250 2.1.0 Ok"
                )),
                "client {client}"
            );
            assert_eq!(run.n_password_checks, 1, "no password checked before TLS");
        }
    }

    #[test]
    fn the_mx_listener_neither_offers_nor_accepts_auth_even_over_tls() {
        let mut session = new_session(SmtpConfig::default());
        let credentials = plain("alice@example.org", "alice password");
        let run = converse(
            &mut session,
            &[
                "EHLO c\nSTARTTLS",
                &format!("EHLO c\nAUTH PLAIN {credentials}\nAUTH LOGIN"),
            ],
            usize::MAX,
        );
        assert_eq!(
            run.text(),
            crlf(&format!(
                "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
220 2.0.0 Ready to start TLS
250-mx.example.org
250-PIPELINING
250-SIZE 26214400
250-8BITMIME
250-SMTPUTF8
250-ENHANCEDSTATUSCODES
250 CHUNKING
503 5.5.1 Error: authentication not enabled
503 5.5.1 Error: authentication not enabled"
            ))
        );
        assert_eq!(run.n_password_checks, 0);
    }

    #[test]
    fn auth_plain_and_login_succeed_with_or_without_initial_response() {
        let credentials = plain("alice@example.org", "alice password");
        for kind in [ListenerKind::Submissions, ListenerKind::Submission] {
            let starttls: &[&str] = match kind {
                ListenerKind::Submission => &["EHLO c\nSTARTTLS"],
                _ => &[],
            };
            let before = match kind {
                ListenerKind::Submission => {
                    format!("{SUBMISSION_EHLO_BEFORE_TLS}\n220 2.0.0 Ready to start TLS\n")
                }
                _ => String::new(),
            };
            let cases = [
                (
                    format!("AUTH PLAIN {credentials}\nAUTH PLAIN {credentials}"),
                    "235 2.7.0 Authentication successful\n503 5.5.1 Error: already authenticated",
                ),
                (
                    format!("AUTH PLAIN\n{credentials}"),
                    "334 \n235 2.7.0 Authentication successful",
                ),
                (
                    format!(
                        "AUTH LOGIN\n{}\n{}",
                        b64("alice@example.org"),
                        b64("alice password")
                    ),
                    "334 VXNlcm5hbWU6\n334 UGFzc3dvcmQ6\n235 2.7.0 Authentication successful",
                ),
                (
                    format!(
                        "auth login {}\n{}",
                        b64("ALICE@example.org"),
                        b64("alice password")
                    ),
                    "334 UGFzc3dvcmQ6\n235 2.7.0 Authentication successful",
                ),
            ];
            for (input, replies) in cases {
                let auth_part = format!("EHLO c\n{input}\nMAIL FROM:<alice@example.org>");
                let mut parts: Vec<&str> = starttls.to_vec();
                parts.push(&auth_part);
                let run = check_submission(
                    kind,
                    SmtpConfig::default(),
                    &parts,
                    &format!(
                        "220 mx.example.org ESMTP kermail
{before}{SUBMISSION_EHLO_TLS}
{replies}
250 2.1.0 Ok"
                    ),
                );
                assert_eq!(run.n_password_checks, 1, "{input}");
            }
        }
    }

    #[test]
    fn wrong_credentials_get_535_late_and_the_third_failure_closes_the_session() {
        let run = check_submission(
            ListenerKind::Submissions,
            SmtpConfig::default(),
            &[&format!(
                "EHLO c
AUTH PLAIN {}
AUTH LOGIN {}
{}
AUTH PLAIN {}
NOOP",
                plain("alice@example.org", "wrong password"),
                b64("alice@example.org"),
                b64("wrong password"),
                plain("nobody@example.org", "alice password"),
            )],
            &format!(
                "220 mx.example.org ESMTP kermail
{SUBMISSION_EHLO_TLS}
535 5.7.8 Error: authentication failed
334 UGFzc3dvcmQ6
535 5.7.8 Error: authentication failed
535 5.7.8 Error: authentication failed
421 4.7.0 mx.example.org Error: too many failed authentication attempts"
            ),
        );
        assert!(run.closed);
        assert_eq!(run.delays, vec![Duration::from_secs(1); 3]);
    }

    #[test]
    fn cancelled_malformed_unknown_and_proxy_auth_are_refused() {
        let config = SmtpConfig {
            max_auth_failures_per_session: 10,
            ..SmtpConfig::default()
        };
        let run = check_submission(
            ListenerKind::Submissions,
            config,
            &[&format!(
                "AUTH PLAIN {}
EHLO c
AUTH PLAIN
*
AUTH LOGIN
{}
*
AUTH PLAIN !!notbase64
AUTH PLAIN {}
AUTH CRAM-MD5
AUTH PLAIN {}
MAIL FROM:<alice@example.org>
AUTH PLAIN {}
MAIL FROM:<alice@example.org>
AUTH PLAIN {}",
                plain("alice@example.org", "alice password"),
                b64("alice@example.org"),
                b64("no separators"),
                b64("bob@example.org\0alice@example.org\0alice password"),
                plain("alice@example.org", "alice password"),
                plain("alice@example.org", "alice password"),
            )],
            &format!(
                "220 mx.example.org ESMTP kermail
503 5.5.1 Error: send HELO/EHLO first
{SUBMISSION_EHLO_TLS}
334 
501 5.7.0 Error: authentication cancelled
334 VXNlcm5hbWU6
334 UGFzc3dvcmQ6
501 5.7.0 Error: authentication cancelled
501 5.5.2 Error: malformed authentication response
501 5.5.2 Error: malformed authentication response
504 5.5.4 Error: unrecognized authentication type
535 5.7.8 Error: authentication failed
530 5.7.0 Authentication required
235 2.7.0 Authentication successful
250 2.1.0 Ok
503 5.5.1 Error: already authenticated"
            ),
        );
        // Only the final, well-formed attempt reached the password check.
        assert_eq!(run.n_password_checks, 1);
    }

    /// Alice, authenticated over implicit TLS, then the given lines.
    fn as_alice(lines: &str, expected: &str) -> Run {
        check_submission(
            ListenerKind::Submissions,
            SmtpConfig::default(),
            &[&format!(
                "EHLO c\nAUTH PLAIN {}\n{lines}",
                plain("alice@example.org", "alice password")
            )],
            &format!(
                "220 mx.example.org ESMTP kermail
{SUBMISSION_EHLO_TLS}
235 2.7.0 Authentication successful
{expected}"
            ),
        )
    }

    #[test]
    fn the_envelope_sender_must_be_the_users_own_address_or_an_alias_of_theirs() {
        as_alice(
            "MAIL FROM:<alice@example.org>
RSET
MAIL FROM:<Alice@Example.ORG>
RSET
MAIL FROM:<info@example.org>
RSET
MAIL FROM:<bob@example.org>
MAIL FROM:<sales@example.org>
MAIL FROM:<alice@example.net>
MAIL FROM:<>",
            "250 2.1.0 Ok
250 2.0.0 Ok
250 2.1.0 Ok
250 2.0.0 Ok
250 2.1.0 Ok
250 2.0.0 Ok
553 5.7.1 <bob@example.org>: Sender address rejected: not owned by user alice@example.org
553 5.7.1 <sales@example.org>: Sender address rejected: not owned by user alice@example.org
553 5.7.1 <alice@example.net>: Sender address rejected: not owned by user alice@example.org
553 5.7.1 <>: Sender address rejected: not owned by user alice@example.org",
        );
    }

    #[test]
    fn the_from_header_is_checked_before_anything_is_stored() {
        let transaction = |from_lines: &str| {
            format!(
                "MAIL FROM:<alice@example.org>\nRCPT TO:<bob@example.org>\nDATA\n{from_lines}Subject: s\n\nbody\n."
            )
        };
        let accepted = "250 2.1.0 Ok\n250 2.1.5 Ok\n354 End data with <CR><LF>.<CR><LF>\n250 2.0.0 Ok: stored as <ID>";
        let refused = |reason: &str| {
            format!(
                "250 2.1.0 Ok\n250 2.1.5 Ok\n354 End data with <CR><LF>.<CR><LF>\n553 5.7.1 Error: From header refused: {reason}"
            )
        };
        const NOT_OWNED: &str = "address not owned by the authenticated user";
        let cases = [
            ("From: Alice <alice@example.org>\n", accepted.to_owned()),
            ("From: \"Info\" <INFO@example.org>\n", accepted.to_owned()),
            ("From:\n alice@example.org\n", accepted.to_owned()),
            ("From: Bob <bob@example.org>\n", refused(NOT_OWNED)),
            ("From: <sales@example.org>\n", refused(NOT_OWNED)),
            (
                "From: alice@example.org, bob@example.org\n",
                refused(NOT_OWNED),
            ),
            (
                "From: \"alice@example.org\" <mallory@example.net>\n",
                refused(NOT_OWNED),
            ),
            ("", refused("no From header")),
            (
                "From: alice@example.org\nFrom: bob@example.org\n",
                refused("more than one From header"),
            ),
            (
                "From: alice@example.org\nFROM : bob@example.org\n",
                refused("more than one From header"),
            ),
            ("from: alice@example.org\n", accepted.to_owned()),
            ("From: Alice\n", refused("unreadable From header")),
            ("From: undisclosed:;\n", refused("no From address")),
        ];
        for (from_lines, expected) in cases {
            let run = as_alice(&transaction(from_lines), &expected);
            let n_expected = usize::from(expected.ends_with("<ID>"));
            assert_eq!(run.deliveries.len(), n_expected, "{from_lines}");
        }
        // BDAT ends at the same check.
        let message = "From: bob@example.org\r\n\r\nx\r\n";
        let run = as_alice(
            &format!(
                "MAIL FROM:<alice@example.org>\nRCPT TO:<bob@example.org>\nBDAT {} LAST\n{message}",
                message.len()
            ),
            "250 2.1.0 Ok
250 2.1.5 Ok
553 5.7.1 Error: From header refused: address not owned by the authenticated user",
        );
        assert!(run.deliveries.is_empty());
    }

    #[test]
    fn foreign_recipients_are_queued_with_authentication_and_refused_without() {
        // Authenticated: accepted, handed to the store with the submitter (it queues them).
        let run = as_alice(
            "MAIL FROM:<alice@example.org>
RCPT TO:<someone@gmail.example>
RCPT TO:<bob@example.org>
DATA
From: alice@example.org

hi
.",
            "250 2.1.0 Ok
250 2.1.5 Ok
250 2.1.5 Ok
354 End data with <CR><LF>.<CR><LF>
250 2.0.0 Ok: stored as <ID>",
        );
        assert_eq!(
            run.deliveries[0].delivery.recipients,
            vec!["someone@gmail.example", "bob@example.org"]
        );
        assert!(run.deliveries[0].submitter.is_some());
        // Unauthenticated on MX: relaying denied (on submission MAIL already needs AUTH).
        check(
            "EHLO c
MAIL FROM:<alice@example.org>
RCPT TO:<someone@gmail.example>",
            &format!(
                "220 mx.example.org ESMTP kermail
{EHLO_REPLY}
250 2.1.0 Ok
550 5.7.1 <someone@gmail.example>: relaying denied"
            ),
        );
    }

    #[test]
    fn received_says_esmtpsa_for_an_authenticated_tls_session() {
        let run = as_alice(
            "MAIL FROM:<alice@example.org>
RCPT TO:<bob@example.org>
DATA
From: alice@example.org

hi
.",
            "250 2.1.0 Ok
250 2.1.5 Ok
354 End data with <CR><LF>.<CR><LF>
250 2.0.0 Ok: stored as <ID>",
        );
        let body = String::from_utf8_lossy(run.deliveries[0].delivery.body.head());
        assert!(body.contains(" with ESMTPSA id "), "{body}");
        assert_eq!(run.deliveries[0].delivery.mail_from, "alice@example.org");
    }

    #[test]
    fn failed_logins_are_limited_per_client_address_but_never_lock_an_account() {
        let config = SmtpConfig {
            max_auth_failures_per_session: 100,
            ..SmtpConfig::default()
        };
        let limits = Arc::new(Limiter::new());
        let attacker = IpAddr::from([198, 51, 100, 1]);
        let attempt = |client: IpAddr, user: &str, password: &str| {
            let mut session = submission_session(
                ListenerKind::Submissions,
                config.clone(),
                limits.clone(),
                client,
            );
            let run = converse(
                &mut session,
                &[&format!("EHLO c\nAUTH PLAIN {}", plain(user, password))],
                usize::MAX,
            );
            let text = run.text();
            let last = text.lines().last().unwrap_or("").to_owned();
            (last, run.n_password_checks, run.delays)
        };
        // Five failures from one address, for five different names.
        for index in 0..5 {
            let (reply, n_checks, _) =
                attempt(attacker, &format!("u{index}@example.org"), "wrong password");
            assert_eq!(reply, "535 5.7.8 Error: authentication failed");
            assert_eq!(n_checks, 1);
        }
        // The sixth, even with the right password, is refused unchecked and late.
        let (reply, n_checks, delays) = attempt(attacker, "alice@example.org", "alice password");
        assert_eq!(
            reply,
            "454 4.7.0 Error: too many failed authentication attempts, try again later"
        );
        assert_eq!(n_checks, 0);
        assert_eq!(delays, vec![Duration::from_secs(1)]);
        // Alice from her own address is not affected.
        let alice_home = IpAddr::from([203, 0, 113, 5]);
        let (reply, _, _) = attempt(alice_home, "alice@example.org", "alice password");
        assert_eq!(reply, "235 2.7.0 Authentication successful");

        // Ten failures for bob from ten addresses do not lock bob out (issue 10): his own
        // login still gets checked and succeeds (the shared login throttle only delays it).
        for index in 0..10u8 {
            let (reply, _, _) = attempt(
                IpAddr::from([192, 0, 2, 100 + index]),
                "bob@example.org",
                "nope nope",
            );
            assert_eq!(reply, "535 5.7.8 Error: authentication failed");
        }
        let (reply, n_checks, _) = attempt(
            IpAddr::from([203, 0, 113, 9]),
            "BOB@example.org",
            "bob password",
        );
        assert_eq!(reply, "235 2.7.0 Authentication successful");
        assert_eq!(n_checks, 1);
        let (reply, _, _) = attempt(
            IpAddr::from([203, 0, 113, 9]),
            "alice@example.org",
            "alice password",
        );
        assert_eq!(reply, "235 2.7.0 Authentication successful");
    }

    #[test]
    fn sending_is_limited_per_account_per_minute() {
        let config = SmtpConfig {
            max_messages_per_account_per_minute: 2,
            ..SmtpConfig::default()
        };
        let limits = Arc::new(Limiter::new());
        let message = "MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nFrom: alice@example.org\r\n\r\nx\r\n.\r\n";
        let mut run = Run::default();
        let mut session = submission_session(
            ListenerKind::Submissions,
            config,
            limits.clone(),
            IpAddr::from([192, 0, 2, 7]),
        );
        let greeting = session.step(Input::Connected, test_now());
        perform(&mut session, greeting, &mut run, &stored);
        let login = format!(
            "EHLO c\r\nAUTH PLAIN {}\r\n",
            plain("alice@example.org", "alice password")
        );
        let output = session.step(Input::Bytes(login.as_bytes()), test_now());
        perform(&mut session, output, &mut run, &stored);
        for _ in 0..2 {
            let output = session.step(Input::Bytes(message.as_bytes()), test_now());
            perform(&mut session, output, &mut run, &stored);
        }
        let refused = session.step(
            Input::Bytes(b"MAIL FROM:<alice@example.org>\r\n"),
            test_now() + Duration::from_secs(59),
        );
        assert_eq!(
            String::from_utf8_lossy(&refused.reply),
            "450 4.7.1 Error: sending rate limit exceeded, try again later\r\n"
        );
        let later = session.step(
            Input::Bytes(b"MAIL FROM:<alice@example.org>\r\n"),
            test_now() + Duration::from_secs(60),
        );
        assert_eq!(String::from_utf8_lossy(&later.reply), "250 2.1.0 Ok\r\n");
        assert_eq!(run.deliveries.len(), 2);
    }

    #[test]
    fn one_log_line_per_auth_attempt_and_never_the_password() {
        let ((), text) = with_captured_log(|| {
            let mut session = submission_session(
                ListenerKind::Submissions,
                SmtpConfig::default(),
                Arc::new(Limiter::new()),
                IpAddr::from([192, 0, 2, 7]),
            );
            converse(
                &mut session,
                &[&format!(
                    "EHLO c\nAUTH PLAIN {}\nAUTH LOGIN {}\n{}",
                    plain("alice@example.org", "TOPSECRET-1"),
                    b64("alice@example.org"),
                    b64("alice password"),
                )],
                usize::MAX,
            );
        });
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("smtp auth"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        for (line, mechanism, outcome) in [
            (lines[0], "PLAIN", "outcome=failure"),
            (lines[1], "LOGIN", "outcome=success"),
        ] {
            for field in [
                "client=192.0.2.7",
                "user=alice@example.org",
                "listener=\"submissions\"",
                &format!("mechanism={mechanism}"),
                outcome,
            ] {
                assert!(line.contains(field), "{field} missing in {line}");
            }
        }
        assert!(!text.contains("TOPSECRET"), "{text}");
        assert!(!text.contains("alice password"), "{text}");
        assert!(
            !text.contains(&plain("alice@example.org", "TOPSECRET-1")),
            "{text}"
        );
    }

    /// Pieces that make up valid and invalid sessions, for the property test.
    fn fragment() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"EHLO c\r\n".to_vec()),
            Just(b"HELO c\r\n".to_vec()),
            Just(b"MAIL FROM:<a@example.net>\r\n".to_vec()),
            Just(b"RCPT TO:<alice@example.org>\r\n".to_vec()),
            Just(b"RCPT TO:<nobody@example.org>\r\n".to_vec()),
            Just(b"RCPT TO:<x@foreign.example>\r\n".to_vec()),
            Just(b"DATA\r\n".to_vec()),
            Just(b"BDAT 5\r\n".to_vec()),
            Just(b"BDAT 3 LAST\r\n".to_vec()),
            Just(b"\r\n.\r\n".to_vec()),
            Just(b"RSET\r\n".to_vec()),
            Just(b"STARTTLS\r\n".to_vec()),
            Just(b"QUIT\r\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..64),
        ]
    }

    /// Pieces of submission sessions, for the property test.
    fn submission_fragment() -> impl Strategy<Value = Vec<u8>> {
        let login = |user: &str, password: &str| {
            format!("AUTH PLAIN {}\r\n", plain(user, password)).into_bytes()
        };
        prop_oneof![
            Just(b"EHLO c\r\n".to_vec()),
            Just(b"STARTTLS\r\n".to_vec()),
            Just(login("alice@example.org", "alice password")),
            Just(login("bob@example.org", "bob password")),
            Just(login("bob@example.org", "alice password")),
            Just(b"AUTH LOGIN\r\n".to_vec()),
            Just(format!("{}\r\n", b64("alice@example.org")).into_bytes()),
            Just(format!("{}\r\n", b64("alice password")).into_bytes()),
            Just(b"*\r\n".to_vec()),
            Just(b"MAIL FROM:<alice@example.org>\r\n".to_vec()),
            Just(b"MAIL FROM:<info@example.org>\r\n".to_vec()),
            Just(b"MAIL FROM:<bob@example.org>\r\n".to_vec()),
            Just(b"MAIL FROM:<sales@example.org>\r\n".to_vec()),
            Just(b"MAIL FROM:<x@foreign.example>\r\n".to_vec()),
            Just(b"RCPT TO:<alice@example.org>\r\n".to_vec()),
            Just(b"RCPT TO:<x@foreign.example>\r\n".to_vec()),
            Just(b"DATA\r\n".to_vec()),
            Just(b"From: alice@example.org\r\n".to_vec()),
            Just(b"From: bob@example.org\r\n".to_vec()),
            Just(b"From: sales@example.org\r\n".to_vec()),
            Just(b"\r\nbody\r\n.\r\n".to_vec()),
            Just(b"BDAT 30 LAST\r\n".to_vec()),
            Just(b"RSET\r\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..32),
            // Whole transactions, some of them allowed for one user.
            (0usize..4, 0usize..4).prop_map(|(sender, from)| {
                let addresses = [
                    "alice@example.org",
                    "info@example.org",
                    "bob@example.org",
                    "sales@example.org",
                ];
                format!(
                    "MAIL FROM:<{}>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n\
                     From: {}\r\n\r\nbody\r\n.\r\n",
                    addresses[sender], addresses[from]
                )
                .into_bytes()
            }),
        ]
    }

    /// How a submission session starts, for the property test: nothing, or EHLO, STARTTLS
    /// unless the TLS is implicit, EHLO and a login.
    fn submission_opening(implicit_tls: bool, who: u8) -> Vec<u8> {
        let tls = if implicit_tls {
            ""
        } else {
            "STARTTLS\r\nEHLO c\r\n"
        };
        let login = match who {
            0 => return Vec::new(),
            1 => plain("alice@example.org", "alice password"),
            _ => plain("bob@example.org", "bob password"),
        };
        format!("EHLO c\r\n{tls}AUTH PLAIN {login}\r\n").into_bytes()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever a submission client sends: a password is checked only over TLS (asserted
        /// in `perform`), and every message stored was sent by the account that logged in, as
        /// one of its addresses, envelope and From alike, to local recipients only.
        #[test]
        fn a_submission_session_stores_only_what_its_user_may_send(
            fragments in proptest::collection::vec(submission_fragment(), 0..40),
            chunk_bytes in 1usize..64,
            implicit_tls in any::<bool>(),
            who in 0u8..3,
        ) {
            let kind = if implicit_tls {
                ListenerKind::Submissions
            } else {
                ListenerKind::Submission
            };
            let mut session = submission_session(
                kind,
                SmtpConfig::default(),
                Arc::new(Limiter::new()),
                IpAddr::from([127, 0, 0, 1]),
            );
            let mut input = submission_opening(implicit_tls, who);
            input.extend(fragments.concat());
            let mut run = Run::default();
            let greeting = session.step(Input::Connected, test_now());
            perform(&mut session, greeting, &mut run, &stored);
            // The opening goes whole (bytes behind STARTTLS would be dropped), the rest in
            // chunks.
            let opening_bytes = submission_opening(implicit_tls, who).len();
            let (opening, rest) = input.split_at(opening_bytes);
            let mut parts: Vec<&[u8]> = Vec::new();
            if !implicit_tls && !opening.is_empty() {
                let starttls_end = b"EHLO c\r\nSTARTTLS\r\n".len();
                parts.push(&opening[..starttls_end]);
                parts.push(&opening[starttls_end..]);
            } else if !opening.is_empty() {
                parts.push(opening);
            }
            parts.extend(rest.chunks(chunk_bytes));
            for chunk in parts {
                let output = session.step(Input::Bytes(chunk), test_now());
                perform(&mut session, output, &mut run, &stored);
            }
            if !run.deliveries.is_empty() {
                let account = session.authenticated_account();
                prop_assert!(account.is_some());
                let allowed = Table.sender_addresses(account.unwrap_or(0));
                for pending in &run.deliveries {
                    let delivery = &pending.delivery;
                    prop_assert!(allowed.contains(&delivery.mail_from));
                    // Foreign recipients only with the submitter named, so the store queues
                    // them for this account and nobody else.
                    prop_assert_eq!(pending.submitter, account);
                    for recipient in &delivery.recipients {
                        prop_assert!(matches!(
                            Table.check_recipient(recipient),
                            RecipientCheck::Local | RecipientCheck::ForeignDomain
                        ));
                    }
                    let body = String::from_utf8_lossy(delivery.body.head());
                    prop_assert!(body.contains(" with ESMTPSA id "), "{}", body);
                    // The trace headers in front hold no From.
                    prop_assert!(check_from_header(delivery.body.head(), &allowed).is_ok());
                }
            }
        }

        /// Arbitrary input never panics, and every Deliver carries a complete transaction:
        /// a sender, at least one recipient, each of them local, trace headers first.
        #[test]
        fn arbitrary_input_never_panics_or_delivers_an_incomplete_transaction(
            fragments in proptest::collection::vec(fragment(), 0..40),
            chunk_bytes in 1usize..64,
        ) {
            let input: Vec<u8> = fragments.concat();
            let config = SmtpConfig {
                max_command_line_length_bytes: 64,
                max_message_size_bytes: 256,
                ..SmtpConfig::default()
            };
            let run = run_with(config, &input, chunk_bytes);
            let n_mail_commands = input.windows(5).filter(|window| window == b"MAIL ").count();
            prop_assert!(run.deliveries.len() <= n_mail_commands);
            for pending in &run.deliveries {
                let delivery = &pending.delivery;
                prop_assert!(!delivery.recipients.is_empty());
                for recipient in &delivery.recipients {
                    prop_assert_eq!(Table.check_recipient(recipient), RecipientCheck::Local);
                }
                prop_assert!(delivery.body.head().starts_with(b"Return-Path: <a@example.net>\r\nReceived: "));
                prop_assert!(delivery.body.len() <= 256 + 1024);
            }
        }
    }
}
