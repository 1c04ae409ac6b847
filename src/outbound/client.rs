//! The SMTP client: one message, one destination, a list of recipients, per-recipient
//! outcomes.
//!
//! Built on mail-send's `SmtpClient { stream, timeout }` over a socket we connect ourselves
//! (so the policy's source address can be bound), with our own DATA encoder (CRLF
//! normalisation and dot-stuffing; mail-send's appends an extra CRLF to messages that already
//! end with one, which would break byte-exact delivery and DKIM body hashes).
//!
//! Session: connect (bound source address) → 220 greeting → EHLO with the configured host
//! name (HELO when EHLO is refused with 5xx) → STARTTLS when offered (any certificate
//! accepted, like Postfix's `may`; verified against the webpki roots when the policy says
//! `require_tls`, which also refuses to continue in clear) → EHLO again → MAIL FROM (SIZE,
//! BODY=8BITMIME, SMTPUTF8 when offered and needed) → one RCPT TO per recipient, each reply
//! kept → DATA only if a recipient was accepted → QUIT.
//!
//! Failure mapping: a connection-level failure (refused, timeout, 4xx greeting, broken TLS)
//! is a temporary failure for every recipient, a 5xx greeting a permanent one; the next
//! address of the destination is then tried. Once MAIL FROM has been sent the transaction's
//! replies are final for this attempt and no other address is tried.
//!
//! Rate limiting: the policy's connection slot is held for the whole delivery (all addresses
//! tried); the rate slot is taken right before MAIL FROM, so that the receiver, which counts
//! messages, sees the limiter's spacing with as little network jitter as possible.

use std::net::SocketAddr;
use std::time::Duration;

use mail_send::smtp::tls::build_tls_connector;
use mail_send::SmtpClient;
use serde::{Deserialize, Serialize};
use smtp_proto::{EhloResponse, Response, EXT_8BIT_MIME, EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tracing::Instrument;

use super::mx::{self, Dns, MxError};
use super::policy::{DestinationLimits, Limiters, Policies, PolicyConfig, RateLimiter};
use super::OutboundConfig;

/// SMTP client timeouts (`[outbound.timeouts]`), defaults from RFC 5321 §4.5.3.2.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutConfig {
    /// TCP connect. Default: 60 s (not in the RFC; Postfix uses 30 s).
    pub connect_secs: u64,
    /// Initial 220 greeting. Default: 300 s.
    pub greeting_secs: u64,
    /// EHLO reply. Default: 300 s.
    pub ehlo_secs: u64,
    /// STARTTLS reply and TLS handshake. Default: 120 s.
    pub starttls_secs: u64,
    /// MAIL FROM reply. Default: 300 s.
    pub mail_from_secs: u64,
    /// Each RCPT TO reply. Default: 300 s.
    pub rcpt_to_secs: u64,
    /// DATA initiation (354). Default: 120 s.
    pub data_secs: u64,
    /// Each block of data written. Default: 180 s.
    pub data_block_secs: u64,
    /// Reply to the final dot. Default: 600 s.
    pub data_end_secs: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            connect_secs: 60,
            greeting_secs: 300,
            ehlo_secs: 300,
            starttls_secs: 120,
            mail_from_secs: 300,
            rcpt_to_secs: 300,
            data_secs: 120,
            data_block_secs: 180,
            data_end_secs: 600,
        }
    }
}

/// Bytes of encoded message written per block (each block under `data_block_secs`).
pub const DATA_BLOCK_BYTES: usize = 64 * 1024;
/// Recipients sent in one transaction; any beyond get a temporary failure (RFC 5321 §4.5.3.1.8
/// requires receivers to accept at least 100).
pub const MAX_RECIPIENTS_PER_TRANSACTION: usize = 100;
/// Wait for the reply to QUIT (it changes nothing; the message is already accepted or not).
pub const QUIT_TIMEOUT_SECS: u64 = 5;
/// Longest envelope address accepted for sending (RFC 5321 §4.5.3.1.3: 256 octets for a path).
pub const MAX_ADDRESS_BYTES: usize = 256;

/// One SMTP reply, or a reply synthesised locally for a failure that has none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Three-digit reply code.
    pub code: u16,
    /// Enhanced status code (`5.1.1`), from the reply or derived from its class (`5.0.0`).
    pub status: String,
    /// Reply text, lines joined with a space, without code and enhanced status.
    pub text: String,
    /// True when the remote server sent it, false when synthesised (connect failure, policy).
    pub remote: bool,
}

impl Reply {
    fn from_response(response: &Response<String>) -> Self {
        let status = if response.esc[0] != 0 {
            format!(
                "{}.{}.{}",
                response.esc[0], response.esc[1], response.esc[2]
            )
        } else {
            default_status(response.code)
        };
        Self {
            code: response.code,
            status,
            text: response
                .message
                .replace(['\r', '\n'], " ")
                .trim()
                .to_owned(),
            remote: true,
        }
    }

    /// A locally generated reply.
    pub fn local(code: u16, status: &str, text: impl Into<String>) -> Self {
        Self {
            code,
            status: status.to_owned(),
            text: text.into(),
            remote: false,
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The `Diagnostic-Code` of a DSN: `smtp; 550 5.1.1 text` for remote replies, none for
    /// local ones.
    pub fn diagnostic(&self) -> Option<String> {
        self.remote
            .then(|| format!("smtp; {} {} {}", self.code, self.status, self.text))
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.code, self.status, self.text)
    }
}

fn default_status(code: u16) -> String {
    match code / 100 {
        2 => "2.0.0".to_owned(),
        5 => "5.0.0".to_owned(),
        _ => "4.0.0".to_owned(),
    }
}

/// What happened to one recipient in one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecipientOutcome {
    /// The receiver accepted the message for this recipient (reply to the final dot).
    Delivered { reply: Reply },
    /// Try again later.
    TempFail { reply: Reply },
    /// Give up and send a DSN.
    PermFail { reply: Reply },
}

impl RecipientOutcome {
    pub fn reply(&self) -> &Reply {
        match self {
            Self::Delivered { reply } | Self::TempFail { reply } | Self::PermFail { reply } => {
                reply
            }
        }
    }

    /// Delivered, TempFail or PermFail from a reply's class (2xx, 5xx, anything else).
    pub fn from_reply(reply: Reply) -> Self {
        if reply.is_positive() {
            Self::Delivered { reply }
        } else if reply.is_permanent() {
            Self::PermFail { reply }
        } else {
            Self::TempFail { reply }
        }
    }

    fn failure(reply: Reply) -> Self {
        if reply.is_permanent() {
            Self::PermFail { reply }
        } else {
            Self::TempFail { reply }
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Delivered { .. } => "delivered",
            Self::TempFail { .. } => "deferred",
            Self::PermFail { .. } => "bounced",
        }
    }
}

/// The message to send.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// Envelope sender, without angle brackets; empty for the null sender (DSNs).
    pub mail_from: &'a str,
    /// Recipients, without angle brackets, all for the destination being delivered to.
    pub recipients: &'a [String],
    /// The message, CRLF line endings (bare CR/LF are sent as CRLF), not dot-stuffed.
    pub message: &'a [u8],
}

/// The result of delivering to one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// One outcome per recipient, in the envelope's order.
    pub outcomes: Vec<RecipientOutcome>,
    /// The address whose answers `outcomes` holds (the last one tried); none when no address
    /// could be tried (resolution failed).
    pub host: Option<SocketAddr>,
    /// Whether that session ran over TLS.
    pub tls: bool,
    /// Addresses tried before it that failed at connection level, with why.
    pub failed_hosts: Vec<(SocketAddr, Reply)>,
}

impl DeliveryReport {
    fn all(recipients: usize, outcome: RecipientOutcome, host: Option<SocketAddr>) -> Self {
        Self {
            outcomes: vec![outcome; recipients],
            host,
            tls: false,
            failed_hosts: Vec::new(),
        }
    }
}

/// Result of one session with one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostAttempt {
    /// The transaction ran (MAIL FROM was sent); outcomes per recipient.
    Completed {
        outcomes: Vec<RecipientOutcome>,
        tls: bool,
    },
    /// Failed before any transaction: the same reply applies to every recipient, and the
    /// next address may be tried.
    ConnectionFailed { reply: Reply, tls: bool },
}

/// Why a session stopped before or during the transaction.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("{stage}: {source}")]
    Smtp {
        stage: &'static str,
        source: mail_send::Error,
    },
    #[error("I/O during {stage}: {source}")]
    Io {
        stage: &'static str,
        source: std::io::Error,
    },
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(mail_send::Error),
    /// The remote sent a reply that ends the session.
    #[error("{0}")]
    Rejected(Reply),
    /// Refused locally (policy).
    #[error("{0}")]
    Local(Reply),
}

impl SessionError {
    fn smtp(stage: &'static str) -> impl FnOnce(mail_send::Error) -> Self {
        move |source| match source {
            mail_send::Error::Timeout => Self::Timeout(stage),
            mail_send::Error::UnexpectedReply(response) => {
                Self::Rejected(Reply::from_response(&response))
            }
            source => Self::Smtp { stage, source },
        }
    }

    fn reply(&self) -> Reply {
        match self {
            Self::Rejected(reply) | Self::Local(reply) => reply.clone(),
            Self::Connect(_) => Reply::local(451, "4.4.1", self.to_string()),
            Self::Timeout(_) => Reply::local(451, "4.4.2", self.to_string()),
            Self::TlsHandshake(_) => Reply::local(451, "4.7.5", self.to_string()),
            Self::Smtp { .. } | Self::Io { .. } => Reply::local(451, "4.4.2", self.to_string()),
        }
    }
}

fn capability(ehlo: &Option<EhloResponse<String>>, flag: u32) -> bool {
    ehlo.as_ref().is_some_and(|e| e.has_capability(flag))
}

/// An address safe to put between angle brackets: bounded, no controls, no brackets or
/// spaces (which could smuggle a second command or parameter).
fn address_is_sendable(address: &str) -> bool {
    address.len() <= MAX_ADDRESS_BYTES
        && !address
            .bytes()
            .any(|b| b < 0x20 || b == 0x7f || matches!(b, b'<' | b'>' | b' '))
}

/// Streams a message as SMTP DATA content: bare CR and bare LF become CRLF, lines starting
/// with `.` get a second `.`, a final CRLF is added when missing, then the `.` line.
#[derive(Debug, Default)]
pub struct DataEncoder {
    position: usize,
    at_line_start: bool,
    finished: bool,
}

impl DataEncoder {
    pub fn new() -> Self {
        Self {
            position: 0,
            at_line_start: true,
            finished: false,
        }
    }

    /// Appends the next block (about `block_bytes`) to `out`; false once everything,
    /// including the terminating `.` line, has been produced.
    pub fn next_block(&mut self, message: &[u8], block_bytes: usize, out: &mut Vec<u8>) -> bool {
        if self.finished {
            return false;
        }
        let limit = out.len() + block_bytes.max(1);
        while self.position < message.len() && out.len() < limit {
            let byte = message[self.position];
            self.position += 1;
            if self.at_line_start && byte == b'.' {
                out.push(b'.');
            }
            match byte {
                b'\r' => {
                    if message.get(self.position) == Some(&b'\n') {
                        self.position += 1;
                    }
                    out.extend_from_slice(b"\r\n");
                    self.at_line_start = true;
                }
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.at_line_start = true;
                }
                _ => {
                    out.push(byte);
                    self.at_line_start = false;
                }
            }
        }
        if self.position >= message.len() {
            if !self.at_line_start {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b".\r\n");
            self.finished = true;
        }
        true
    }

    /// The whole encoding at once (tests, small messages).
    pub fn encode(message: &[u8]) -> Vec<u8> {
        let mut encoder = Self::new();
        let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 5);
        while encoder.next_block(message, usize::MAX / 2, &mut out) {}
        out
    }
}

/// TLS client configurations, built once.
#[derive(Clone)]
struct TlsConnectors {
    /// Any certificate accepted (opportunistic TLS).
    opportunistic: TlsConnector,
    /// Certificates verified against the webpki roots (`require_tls`).
    verified: TlsConnector,
}

/// The outbound SMTP client of one node.
#[derive(Clone)]
pub struct OutboundClient {
    ehlo_hostname: String,
    timeouts: TimeoutConfig,
    tls: TlsConnectors,
}

impl std::fmt::Debug for OutboundClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundClient")
            .field("ehlo_hostname", &self.ehlo_hostname)
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

fn secs(value: u64) -> Duration {
    Duration::from_secs(value)
}

impl OutboundClient {
    /// A client greeting with `ehlo_hostname`. Installs the ring crypto provider if none is.
    pub fn new(ehlo_hostname: impl Into<String>, timeouts: TimeoutConfig) -> Self {
        crate::tls::install_crypto_provider();
        Self {
            ehlo_hostname: ehlo_hostname.into(),
            timeouts,
            tls: TlsConnectors {
                opportunistic: build_tls_connector(true),
                verified: build_tls_connector(false),
            },
        }
    }

    /// The client for an `[outbound]` section.
    pub fn from_config(config: &OutboundConfig) -> Self {
        Self::new(config.ehlo_hostname.clone(), config.timeouts.clone())
    }

    /// Replaces the connector used for `require_tls` (tests, private CAs).
    pub fn with_verified_tls(mut self, config: std::sync::Arc<rustls::ClientConfig>) -> Self {
        self.tls.verified = TlsConnector::from(config);
        self
    }

    /// Resolves `domain` (override map, relay host, MX, A/AAAA), selects its policy (by
    /// domain and MX host names), and delivers under that policy's limits.
    pub async fn deliver_to_domain(
        &self,
        config: &OutboundConfig,
        dns: &impl Dns,
        policies: &Policies,
        limiters: &Limiters,
        domain: &str,
        envelope: &Envelope<'_>,
    ) -> DeliveryReport {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        // MX host names are only needed to match `match_mx` patterns; the look-up is cached
        // by the resolver and repeated by `mx::resolve`.
        let mut mx_hosts = Vec::new();
        if !config.overrides.contains_key(&domain) && config.relay_host.is_none() {
            if let Ok(Some(records)) = dns.mx(&domain).await {
                mx_hosts = records
                    .into_iter()
                    .map(|r| r.exchange.trim_end_matches('.').to_ascii_lowercase())
                    .collect();
            }
        }
        let mx_refs: Vec<&str> = mx_hosts.iter().map(String::as_str).collect();
        let (policy, _) = policies.select(&domain, &mx_refs);
        let key = policies.limiter_key(&domain, &mx_refs);
        let limits = limiters.get(&key, policy);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
        let resolved = mx::resolve(config, dns, &domain, policy.ip_family, &mut rng).await;
        let addresses = match resolved {
            Ok(addresses) => addresses,
            Err(error) => {
                let reply = match &error {
                    MxError::NullMx(_) => Reply::local(556, "5.1.10", error.to_string()),
                    MxError::NoAddress(_) => Reply::local(550, "5.4.4", error.to_string()),
                    MxError::InvalidAddress(_) => Reply::local(451, "4.3.5", error.to_string()),
                    MxError::Temporary(_) => Reply::local(451, "4.4.3", error.to_string()),
                };
                tracing::info!(domain, policy = policy.name, %reply, "destination not resolved");
                return DeliveryReport::all(
                    envelope.recipients.len(),
                    RecipientOutcome::failure(reply),
                    None,
                );
            }
        };
        // The TLS name: the MX host when there is exactly one, otherwise the domain (the
        // resolver does not say which address belongs to which MX host).
        let tls_name = match mx_hosts.as_slice() {
            [only] => only.clone(),
            _ => domain.clone(),
        };
        self.deliver(&addresses, &tls_name, policy, &limits, envelope)
            .await
    }

    /// Tries `addresses` in order until one runs a transaction, under the policy's limits:
    /// one connection slot held throughout, one rate slot taken before MAIL FROM.
    /// Addresses of a family the policy forbids are skipped.
    pub async fn deliver(
        &self,
        addresses: &[SocketAddr],
        tls_name: &str,
        policy: &PolicyConfig,
        limits: &DestinationLimits,
        envelope: &Envelope<'_>,
    ) -> DeliveryReport {
        let _connection_slot = limits.connections.acquire().await;
        let rate = limits.rate.as_deref();
        let mut failed_hosts = Vec::new();
        let mut any_temporary = false;
        let mut last_tls = false;
        for address in addresses {
            if !policy.ip_family.allows(&address.ip()) {
                continue;
            }
            match self
                .deliver_to_host(*address, tls_name, policy, envelope, rate)
                .await
            {
                HostAttempt::Completed { outcomes, tls } => {
                    log_outcomes(envelope, *address, tls, &outcomes);
                    return DeliveryReport {
                        outcomes,
                        host: Some(*address),
                        tls,
                        failed_hosts,
                    };
                }
                HostAttempt::ConnectionFailed { reply, tls } => {
                    tracing::info!(%address, %reply, "address failed, trying the next one");
                    any_temporary |= !reply.is_permanent();
                    last_tls = tls;
                    failed_hosts.push((*address, reply));
                }
            }
        }
        let Some((host, reply)) = failed_hosts.last().cloned() else {
            let reply = Reply::local(
                550,
                "5.4.4",
                format!("no address the policy {:?} allows", policy.name),
            );
            return DeliveryReport::all(
                envelope.recipients.len(),
                RecipientOutcome::PermFail { reply },
                None,
            );
        };
        // Permanent only when every address refused permanently.
        let outcome = if any_temporary {
            let reply = if reply.is_permanent() {
                Reply::local(451, "4.4.0", format!("all addresses failed, last: {reply}"))
            } else {
                reply
            };
            RecipientOutcome::TempFail { reply }
        } else {
            RecipientOutcome::PermFail { reply }
        };
        let outcomes = vec![outcome; envelope.recipients.len()];
        log_outcomes(envelope, host, last_tls, &outcomes);
        DeliveryReport {
            outcomes,
            host: Some(host),
            tls: last_tls,
            failed_hosts,
        }
    }

    /// One session with one address. When opportunistic STARTTLS fails in the handshake,
    /// the session is retried once in clear (as Postfix does), unless the policy requires TLS.
    pub async fn deliver_to_host(
        &self,
        address: SocketAddr,
        tls_name: &str,
        policy: &PolicyConfig,
        envelope: &Envelope<'_>,
        rate: Option<&RateLimiter>,
    ) -> HostAttempt {
        let span = tracing::info_span!("smtp_out", %address, policy = %policy.name);
        async {
            match self
                .session(address, tls_name, policy, envelope, rate, true)
                .await
            {
                Err((SessionError::TlsHandshake(error), _)) if !policy.require_tls => {
                    tracing::info!(%error, "TLS handshake failed; retrying in clear");
                    self.session(address, tls_name, policy, envelope, rate, false)
                        .await
                        .unwrap_or_else(|(error, tls)| HostAttempt::ConnectionFailed {
                            reply: error.reply(),
                            tls,
                        })
                }
                Ok(attempt) => attempt,
                Err((error, tls)) => HostAttempt::ConnectionFailed {
                    reply: error.reply(),
                    tls,
                },
            }
        }
        .instrument(span)
        .await
    }

    async fn connect(
        &self,
        address: SocketAddr,
        policy: &PolicyConfig,
    ) -> Result<TcpStream, SessionError> {
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(SessionError::Connect)?;
        let source = match address {
            SocketAddr::V4(_) => policy.source_ipv4.map(std::net::IpAddr::V4),
            SocketAddr::V6(_) => policy.source_ipv6.map(std::net::IpAddr::V6),
        };
        if let Some(source) = source {
            socket
                .bind(SocketAddr::new(source, 0))
                .map_err(SessionError::Connect)?;
        }
        tokio::time::timeout(secs(self.timeouts.connect_secs), socket.connect(address))
            .await
            .map_err(|_| SessionError::Timeout("connect"))?
            .map_err(SessionError::Connect)
    }

    /// EHLO, or HELO when EHLO is refused with 5xx (None: no extensions).
    async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<S>,
    ) -> Result<Option<EhloResponse<String>>, SessionError> {
        client.timeout = secs(self.timeouts.ehlo_secs);
        match client.ehlo(&self.ehlo_hostname).await {
            Ok(ehlo) => Ok(Some(ehlo)),
            Err(mail_send::Error::UnexpectedReply(response)) if response.code >= 500 => {
                let reply = client
                    .cmd(format!("HELO {}\r\n", self.ehlo_hostname))
                    .await
                    .map_err(SessionError::smtp("HELO"))?;
                if (200..300).contains(&reply.code) {
                    Ok(None)
                } else {
                    Err(SessionError::Rejected(Reply::from_response(&reply)))
                }
            }
            Err(error) => Err(SessionError::smtp("EHLO")(error)),
        }
    }

    /// Connect, greeting, EHLO, STARTTLS, transaction. Errors carry whether TLS was up.
    async fn session(
        &self,
        address: SocketAddr,
        tls_name: &str,
        policy: &PolicyConfig,
        envelope: &Envelope<'_>,
        rate: Option<&RateLimiter>,
        try_starttls: bool,
    ) -> Result<HostAttempt, (SessionError, bool)> {
        let plain = |error| (error, false);
        let stream = self.connect(address, policy).await.map_err(plain)?;
        let mut client = SmtpClient {
            stream,
            timeout: secs(self.timeouts.greeting_secs),
        };
        let greeting = tokio::time::timeout(secs(self.timeouts.greeting_secs), client.read())
            .await
            .map_err(|_| plain(SessionError::Timeout("greeting")))?
            .map_err(|e| plain(SessionError::smtp("greeting")(e)))?;
        if !(200..300).contains(&greeting.code) {
            let reply = Reply::from_response(&greeting);
            self.quit(&mut client).await;
            return Err(plain(SessionError::Rejected(reply)));
        }
        let ehlo = self.hello(&mut client).await.map_err(plain)?;
        if try_starttls && capability(&ehlo, EXT_START_TLS) {
            client.timeout = secs(self.timeouts.starttls_secs);
            let reply = client
                .cmd(b"STARTTLS\r\n")
                .await
                .map_err(|e| plain(SessionError::smtp("STARTTLS")(e)))?;
            if (200..300).contains(&reply.code) {
                let connector = if policy.require_tls {
                    &self.tls.verified
                } else {
                    &self.tls.opportunistic
                };
                let mut tls_client = client
                    .into_tls(connector, tls_name)
                    .await
                    .map_err(|e| plain(SessionError::TlsHandshake(e)))?;
                let ehlo = self
                    .hello(&mut tls_client)
                    .await
                    .map_err(|error| (error, true))?;
                return Ok(self
                    .transaction(&mut tls_client, ehlo, envelope, rate, true)
                    .await);
            }
            if policy.require_tls {
                let reply = Reply::local(
                    451,
                    "4.7.10",
                    format!(
                        "TLS required but STARTTLS refused: {}",
                        Reply::from_response(&reply)
                    ),
                );
                self.quit(&mut client).await;
                return Err(plain(SessionError::Local(reply)));
            }
            tracing::info!(code = reply.code, "STARTTLS refused; continuing in clear");
        } else if policy.require_tls {
            self.quit(&mut client).await;
            return Err(plain(SessionError::Local(Reply::local(
                451,
                "4.7.10",
                "TLS required but STARTTLS not offered",
            ))));
        }
        Ok(self
            .transaction(&mut client, ehlo, envelope, rate, false)
            .await)
    }

    async fn quit<S: AsyncRead + AsyncWrite + Unpin>(&self, client: &mut SmtpClient<S>) {
        client.timeout = secs(QUIT_TIMEOUT_SECS);
        let _ = client.cmd(b"QUIT\r\n").await;
    }

    /// MAIL FROM, RCPT TO each, DATA, QUIT. Always yields one outcome per recipient.
    async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<S>,
        ehlo: Option<EhloResponse<String>>,
        envelope: &Envelope<'_>,
        rate: Option<&RateLimiter>,
        tls: bool,
    ) -> HostAttempt {
        let total = envelope.recipients.len();
        let mut outcomes: Vec<Option<RecipientOutcome>> = vec![None; total];
        let result = self
            .run_transaction(client, &ehlo, envelope, rate, &mut outcomes)
            .await;
        let fallback = match result {
            Ok(()) => Reply::local(451, "4.4.2", "no reply for this recipient"),
            Err(error) => {
                tracing::info!(%error, "transaction ended early");
                error.reply()
            }
        };
        // Recipients that already have an answer keep it; the rest share the failure.
        let outcomes = outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| RecipientOutcome::failure(fallback.clone())))
            .collect();
        self.quit(client).await;
        HostAttempt::Completed { outcomes, tls }
    }

    async fn run_transaction<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<S>,
        ehlo: &Option<EhloResponse<String>>,
        envelope: &Envelope<'_>,
        rate: Option<&RateLimiter>,
        outcomes: &mut [Option<RecipientOutcome>],
    ) -> Result<(), SessionError> {
        if !address_is_sendable(envelope.mail_from) {
            return Err(SessionError::Local(Reply::local(
                553,
                "5.1.7",
                "envelope sender cannot be sent",
            )));
        }
        let needs_utf8 =
            !envelope.mail_from.is_ascii() || envelope.recipients.iter().any(|r| !r.is_ascii());
        let utf8_offered = capability(ehlo, EXT_SMTP_UTF8);
        if !envelope.mail_from.is_ascii() && !utf8_offered {
            return Err(SessionError::Local(Reply::local(
                553,
                "5.6.7",
                "non-ASCII sender and the receiver does not offer SMTPUTF8",
            )));
        }
        let max_size = ehlo
            .as_ref()
            .filter(|e| e.has_capability(EXT_SIZE))
            .map_or(0, |e| e.size);
        if max_size > 0 && envelope.message.len() > max_size {
            return Err(SessionError::Local(Reply::local(
                552,
                "5.3.4",
                format!(
                    "message of {} bytes exceeds the receiver's limit of {max_size}",
                    envelope.message.len()
                ),
            )));
        }
        let mut mail = format!("MAIL FROM:<{}>", envelope.mail_from);
        if capability(ehlo, EXT_SIZE) {
            mail.push_str(&format!(" SIZE={}", envelope.message.len()));
        }
        if capability(ehlo, EXT_8BIT_MIME) && !envelope.message.is_ascii() {
            mail.push_str(" BODY=8BITMIME");
        }
        if needs_utf8 && utf8_offered {
            mail.push_str(" SMTPUTF8");
        }
        mail.push_str("\r\n");

        if let Some(rate) = rate {
            rate.acquire().await;
        }
        client.timeout = secs(self.timeouts.mail_from_secs);
        let reply = client
            .cmd(mail.as_bytes())
            .await
            .map_err(SessionError::smtp("MAIL FROM"))?;
        if !(200..300).contains(&reply.code) {
            return Err(SessionError::Rejected(Reply::from_response(&reply)));
        }

        let mut accepted = Vec::new();
        client.timeout = secs(self.timeouts.rcpt_to_secs);
        for (index, recipient) in envelope.recipients.iter().enumerate() {
            if index >= MAX_RECIPIENTS_PER_TRANSACTION {
                outcomes[index] = Some(RecipientOutcome::TempFail {
                    reply: Reply::local(452, "4.5.3", "too many recipients for one transaction"),
                });
                continue;
            }
            if !address_is_sendable(recipient) {
                outcomes[index] = Some(RecipientOutcome::PermFail {
                    reply: Reply::local(553, "5.1.3", "recipient address cannot be sent"),
                });
                continue;
            }
            if !recipient.is_ascii() && !utf8_offered {
                outcomes[index] = Some(RecipientOutcome::PermFail {
                    reply: Reply::local(
                        553,
                        "5.6.7",
                        "non-ASCII recipient and the receiver does not offer SMTPUTF8",
                    ),
                });
                continue;
            }
            let response = client
                .cmd(format!("RCPT TO:<{recipient}>\r\n").as_bytes())
                .await
                .map_err(SessionError::smtp("RCPT TO"))?;
            let reply = Reply::from_response(&response);
            if reply.is_positive() {
                accepted.push(index);
            } else {
                outcomes[index] = Some(RecipientOutcome::failure(reply));
            }
        }
        if accepted.is_empty() {
            return Ok(());
        }

        client.timeout = secs(self.timeouts.data_secs);
        let response = client
            .cmd(b"DATA\r\n")
            .await
            .map_err(SessionError::smtp("DATA"))?;
        if response.code != 354 {
            let reply = Reply::from_response(&response);
            let reply = if reply.is_positive() {
                Reply::local(451, "4.5.0", format!("unexpected reply to DATA: {reply}"))
            } else {
                reply
            };
            for index in accepted {
                outcomes[index] = Some(RecipientOutcome::failure(reply.clone()));
            }
            return Ok(());
        }

        let mut encoder = DataEncoder::new();
        let mut block = Vec::with_capacity(DATA_BLOCK_BYTES + 8);
        let block_timeout = secs(self.timeouts.data_block_secs);
        loop {
            block.clear();
            if !encoder.next_block(envelope.message, DATA_BLOCK_BYTES, &mut block) {
                break;
            }
            tokio::time::timeout(block_timeout, client.stream.write_all(&block))
                .await
                .map_err(|_| SessionError::Timeout("DATA block write"))?
                .map_err(|source| SessionError::Io {
                    stage: "DATA",
                    source,
                })?;
        }
        tokio::time::timeout(block_timeout, client.stream.flush())
            .await
            .map_err(|_| SessionError::Timeout("DATA block write"))?
            .map_err(|source| SessionError::Io {
                stage: "DATA",
                source,
            })?;
        let response = tokio::time::timeout(secs(self.timeouts.data_end_secs), client.read())
            .await
            .map_err(|_| SessionError::Timeout("reply to the final dot"))?
            .map_err(SessionError::smtp("end of DATA"))?;
        let reply = Reply::from_response(&response);
        for index in accepted {
            outcomes[index] = Some(RecipientOutcome::from_reply(reply.clone()));
        }
        Ok(())
    }
}

fn log_outcomes(
    envelope: &Envelope<'_>,
    host: SocketAddr,
    tls: bool,
    outcomes: &[RecipientOutcome],
) {
    for (recipient, outcome) in envelope.recipients.iter().zip(outcomes) {
        tracing::info!(
            %host,
            tls,
            recipient = %recipient,
            result = outcome.label(),
            reply = %outcome.reply(),
            "delivery attempt"
        );
    }
}
