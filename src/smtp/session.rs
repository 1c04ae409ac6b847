//! The sans-IO SMTP session (MX role).
//!
//! [`Session::step`] is the one transition function: it takes an [`Input`] (bytes from the
//! client, the result of a delivery, TLS established, a timeout, shutdown, the client gone)
//! and the current time, and returns an [`Output`]: bytes to write and [`Action`]s for the
//! driver. The session never blocks and does no I/O; the only outside knowledge it asks for is
//! whether a recipient is local, through [`Recipients`].

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use smtp_proto::{Error as ParseError, Request};

use super::data::DotReader;
use super::SmtpConfig;
use crate::store::{Delivery, DeliveryReceipt, RecipientCheck, StoreError};

/// Answers whether an address is one of ours. The driver implements it with
/// [`crate::store::MailStore::check_recipient`]; tests with a table.
pub trait Recipients {
    fn check_recipient(&self, address: &str) -> RecipientCheck;
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
    /// The TLS handshake asked for by [`Action::StartTls`] succeeded.
    TlsEstablished,
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
    /// Write the reply, then close the connection.
    Close,
}

/// A complete transaction ready to be stored.
#[derive(Debug)]
pub struct PendingDelivery {
    /// The id chosen for this message, already in its Received header.
    pub message_id: String,
    pub delivery: Delivery,
}

#[derive(Debug, Default)]
pub struct Output {
    /// Bytes to write to the client.
    pub reply: Vec<u8>,
    pub actions: Vec<Action>,
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
    /// The session is over; input is ignored.
    Closed,
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
    /// The message as received (unstuffed), at most `max_message_size_bytes`.
    body: Vec<u8>,
    /// Every message byte the client sent, kept or not.
    size_received: usize,
    too_big: bool,
    used_bdat: bool,
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
const REPLY_LINE_TOO_LONG: &str = "500 5.5.2 Error: line too long";
const REPLY_NEED_HELO: &str = "503 5.5.1 Error: send HELO/EHLO first";
const REPLY_NEED_MAIL: &str = "503 5.5.1 Error: need MAIL command";
const REPLY_NEED_RCPT: &str = "554 5.5.1 Error: no valid recipients";
const REPLY_TOO_BIG: &str = "552 5.3.4 Error: message size exceeds fixed limit";

/// Longest piece of client text echoed back in a reply.
const ECHO_LENGTH_MAX: usize = 64;

impl<R: Recipients> Session<R> {
    pub fn new(params: SessionParams, recipients: R) -> Session<R> {
        let id_rng = StdRng::seed_from_u64(params.id_seed);
        Session {
            params,
            recipients,
            mode: Mode::New,
            greeting: None,
            transaction: None,
            tls_active: false,
            n_errors: 0,
            pending: Vec::new(),
            discarding_line_bytes: None,
            shutting_down: false,
            delivering: None,
            id_rng,
        }
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

    /// How long the driver waits for input before reporting [`Input::Timeout`].
    pub fn read_timeout(&self) -> Duration {
        let config = &self.params.config;
        match self.mode {
            Mode::Data(_) | Mode::Bdat { .. } => Duration::from_secs(config.data_timeout_secs),
            _ => Duration::from_secs(config.command_timeout_secs),
        }
    }

    /// The transition function.
    pub fn step(&mut self, input: Input<'_>, now: SystemTime) -> Output {
        let mut out = Output::default();
        match input {
            Input::Connected => {
                if matches!(self.mode, Mode::New) {
                    self.mode = Mode::Command;
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
                            self.push_reply(
                                &mut out,
                                "451 4.3.0 Error: cannot store the message now, try again later",
                            );
                        }
                    }
                    self.process(&mut out, now);
                }
            }
            Input::TlsEstablished => {
                if matches!(self.mode, Mode::AwaitingTls) {
                    // RFC 3207: forget everything learnt before; the client starts over.
                    self.tls_active = true;
                    self.greeting = None;
                    self.transaction = None;
                    self.pending.clear();
                    self.discarding_line_bytes = None;
                    self.mode = Mode::Command;
                }
            }
            Input::Timeout => {
                if !matches!(self.mode, Mode::Closed | Mode::AwaitingDelivery) {
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
                Mode::Command => match self.command_bytes(rest, out, now) {
                    Some(consumed) => position += consumed,
                    // A partial line: wait for more bytes.
                    None => break,
                },
                Mode::Data(reader) => {
                    let max_size = self.params.config.max_message_size_bytes;
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
                        let max_size = self.params.config.max_message_size_bytes;
                        if let Some(transaction) = self.transaction.as_mut() {
                            transaction.take_message_bytes(chunk, max_size);
                        }
                    }
                    if chunk_done {
                        self.mode = Mode::Command;
                        self.end_of_chunk(out, now, is_last, keep, refusal);
                    }
                }
                Mode::New | Mode::AwaitingDelivery | Mode::AwaitingTls | Mode::Closed => break,
            }
            if !matches!(self.mode, Mode::Command | Mode::Data(_) | Mode::Bdat { .. }) {
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
                self.push_reply(out, REPLY_LINE_TOO_LONG);
                Some(index + 1)
            }
            None if rest.len() >= max_line => {
                self.push_reply(out, REPLY_LINE_TOO_LONG);
                self.discarding_line_bytes = Some(rest.len());
                Some(rest.len())
            }
            None => None,
        }
    }

    /// One complete command line (ending in LF, at most the configured length).
    fn command(&mut self, line: &[u8], out: &mut Output, now: SystemTime) {
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
            Request::Mail { from } => self.mail(from, out),
            Request::Rcpt { to } => self.rcpt(to, out),
            Request::Data => self.data(out),
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
            Request::Auth { .. } => {
                self.push_reply(out, "503 5.5.1 Error: authentication not enabled")
            }
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
            name: printable(host, DOMAIN_LENGTH_MAX),
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
            format!("SIZE {}", self.params.config.max_message_size_bytes),
            "8BITMIME".to_owned(),
            "SMTPUTF8".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
            "CHUNKING".to_owned(),
        ];
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

    fn mail(&mut self, from: smtp_proto::MailFrom<std::borrow::Cow<'_, str>>, out: &mut Output) {
        if self.greeting.is_none() {
            return self.push_reply(out, REPLY_NEED_HELO);
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
        if from.size > self.params.config.max_message_size_bytes {
            return self.push_reply(out, REPLY_TOO_BIG);
        }
        self.transaction = Some(Transaction {
            mail_from: from.address.into_owned(),
            recipients: Vec::new(),
            n_recipients_refused: 0,
            smtputf8,
            body: Vec::new(),
            size_received: 0,
            too_big: false,
            used_bdat: false,
        });
        self.push_reply(out, "250 2.1.0 Ok");
    }

    fn rcpt(&mut self, to: smtp_proto::RcptTo<std::borrow::Cow<'_, str>>, out: &mut Output) {
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
        if transaction.recipients.len() >= self.params.config.max_recipients_per_message {
            return self.push_reply(out, "452 4.5.3 Error: too many recipients");
        }
        let address = to.address.into_owned();
        let check = self.recipients.check_recipient(&address);
        let echoed = printable(&address, ECHO_LENGTH_MAX);
        let Some(transaction) = self.transaction.as_mut() else {
            return;
        };
        match check {
            RecipientCheck::Local => {
                if !transaction.recipients.contains(&address) {
                    transaction.recipients.push(address);
                }
                self.push_reply(out, "250 2.1.5 Ok");
            }
            RecipientCheck::UnknownUser => {
                transaction.n_recipients_refused += 1;
                let reply =
                    format!("550 5.1.1 <{echoed}>: Recipient address rejected: user unknown");
                self.push_reply(out, &reply);
            }
            // Submission will queue foreign recipients for authenticated users here; the MX
            // role has no authenticated clients, so this is always a relay attempt.
            RecipientCheck::ForeignDomain => {
                transaction.n_recipients_refused += 1;
                let reply = format!("550 5.7.1 <{echoed}>: relaying denied");
                self.push_reply(out, &reply);
            }
        }
    }

    fn data(&mut self, out: &mut Output) {
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
    }

    fn bdat(&mut self, chunk_size: usize, is_last: bool, out: &mut Output, now: SystemTime) {
        if chunk_size > self.params.config.max_message_size_bytes {
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
                    transaction.used_bdat = true;
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
        let Some(transaction) = self.transaction.take() else {
            return self.push_reply(out, REPLY_NEED_MAIL);
        };
        let summary = transaction.summary();
        if transaction.too_big {
            self.log_transaction(&summary, "rejected: message too big", "-");
            return self.push_reply(out, REPLY_TOO_BIG);
        }
        let message_id = format!("{:016X}", self.id_rng.gen::<u64>());
        let mut body = self.trace_headers(&transaction, &message_id, now);
        body.extend_from_slice(&transaction.body);
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
        out.actions.push(Action::Deliver(Box::new(PendingDelivery {
            message_id,
            delivery,
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
            "Return-Path: <{}>\r\nReceived: from {helo} ({client})\r\n\tby {} (kermail) with {protocol} id {message_id}",
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
        tracing::info!(
            client = %self.params.client_ip,
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

/// Longest HELO name kept (RFC 1035 domain length).
const DOMAIN_LENGTH_MAX: usize = 255;

impl Transaction {
    fn take_message_bytes(&mut self, bytes: &[u8], max_size: usize) {
        self.size_received = self.size_received.saturating_add(bytes.len());
        if self.too_big {
            return;
        }
        if self.body.len() + bytes.len() > max_size {
            self.too_big = true;
            self.body = Vec::new();
        } else {
            self.body.extend_from_slice(bytes);
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
