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

/// One address to try, with the name its certificate must carry under `require_tls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub address: SocketAddr,
    pub tls_name: String,
}

/// The host part of a `relay_host` setting (`host`, `host:port`, `ip:port`, `[v6]:port`).
fn relay_host_name(relay: &str) -> String {
    if let Ok(address) = relay.parse::<SocketAddr>() {
        return address.ip().to_string();
    }
    match relay.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host.to_owned(),
        _ => relay.to_owned(),
    }
    .trim_start_matches('[')
    .trim_end_matches(']')
    .to_owned()
}

/// The addresses to try for `domain`, in order, each with its TLS name; the policy that
/// applies (matched on the domain and the MX host names) and its limiter key.
///
/// Overrides and the relay host go through [`mx::resolve`]. For MX destinations the MX
/// walk is done here, because the policy (and so the address family) depends on the MX
/// host names, and each address must keep the MX host name it came from. An MX host whose
/// address look-up fails temporarily is skipped when another one has addresses.
pub async fn resolve_targets<'p>(
    config: &OutboundConfig,
    dns: &impl Dns,
    policies: &'p Policies,
    domain: &str,
    rng: &mut (impl rand::Rng + Send),
) -> Result<(Vec<Target>, &'p PolicyConfig, String), MxError> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if config.overrides.contains_key(&domain) || config.relay_host.is_some() {
        let (policy, _) = policies.select(&domain, &[]);
        let key = policies.limiter_key(&domain, &[]);
        let tls_name = match (&config.relay_host, config.overrides.contains_key(&domain)) {
            (Some(relay), false) => relay_host_name(relay),
            _ => domain.clone(),
        };
        let addresses = mx::resolve(config, dns, &domain, policy.ip_family, rng).await?;
        let targets = addresses
            .into_iter()
            .map(|address| Target {
                address,
                tls_name: tls_name.clone(),
            })
            .collect();
        return Ok((targets, policy, key));
    }
    let hosts = match dns.mx(&domain).await? {
        Some(records) if !records.is_empty() => mx::order_mx(&domain, records, rng)?,
        _ => vec![domain.clone()],
    };
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let (policy, _) = policies.select(&domain, &host_refs);
    let key = policies.limiter_key(&domain, &host_refs);
    let mut targets = Vec::new();
    let mut temporary = None;
    for host in &hosts {
        if targets.len() >= mx::MAX_DESTINATION_ADDRESSES {
            break;
        }
        match dns.ips(host).await {
            Ok(ips) => targets.extend(
                ips.into_iter()
                    .filter(|ip| policy.ip_family.allows(ip))
                    .map(|ip| Target {
                        address: SocketAddr::new(ip, config.smtp_port),
                        tls_name: host.clone(),
                    }),
            ),
            Err(error) => temporary = Some(error),
        }
    }
    targets.truncate(mx::MAX_DESTINATION_ADDRESSES);
    if targets.is_empty() {
        return Err(temporary.unwrap_or(MxError::NoAddress(domain)));
    }
    Ok((targets, policy, key))
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
    /// Addresses that failed at connection level, in the order tried, with why (when no
    /// address ran a transaction, the last of them is `host`).
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

    /// Resolves `domain` (override map, relay host, MX in preference order, A/AAAA
    /// fallback, null MX), selects its policy (by domain and MX host names), and delivers
    /// under that policy's limits. Each address keeps the host name it was found under, which
    /// `require_tls` verifies the certificate against (the MX host; the relay host; the
    /// domain for overrides and the A/AAAA fallback).
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
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
        let resolved = resolve_targets(config, dns, policies, &domain, &mut rng).await;
        let (targets, policy, key) = match resolved {
            Ok(resolved) => resolved,
            Err(error) => {
                let reply = match &error {
                    MxError::NullMx(_) => Reply::local(556, "5.1.10", error.to_string()),
                    MxError::NoAddress(_) => Reply::local(550, "5.4.4", error.to_string()),
                    MxError::InvalidAddress(_) => Reply::local(451, "4.3.5", error.to_string()),
                    MxError::Temporary(_) => Reply::local(451, "4.4.3", error.to_string()),
                };
                tracing::info!(domain, %reply, "destination not resolved");
                return DeliveryReport::all(
                    envelope.recipients.len(),
                    RecipientOutcome::failure(reply),
                    None,
                );
            }
        };
        let limits = limiters.get(&key, policy);
        self.deliver_targets(&targets, policy, &limits, envelope)
            .await
    }

    /// Tries `addresses` in order until one runs a transaction, under the policy's limits:
    /// one connection slot held throughout, one rate slot taken before MAIL FROM.
    /// Addresses of a family the policy forbids are skipped. `tls_name` is the name a
    /// certificate must carry under `require_tls`.
    pub async fn deliver(
        &self,
        addresses: &[SocketAddr],
        tls_name: &str,
        policy: &PolicyConfig,
        limits: &DestinationLimits,
        envelope: &Envelope<'_>,
    ) -> DeliveryReport {
        let targets: Vec<Target> = addresses
            .iter()
            .map(|address| Target {
                address: *address,
                tls_name: tls_name.to_owned(),
            })
            .collect();
        self.deliver_targets(&targets, policy, limits, envelope)
            .await
    }

    /// [`Self::deliver`] with a TLS name per address.
    pub async fn deliver_targets(
        &self,
        targets: &[Target],
        policy: &PolicyConfig,
        limits: &DestinationLimits,
        envelope: &Envelope<'_>,
    ) -> DeliveryReport {
        let _connection_slot = limits.connections.acquire().await;
        let rate = limits.rate.as_deref();
        let mut failed_hosts = Vec::new();
        let mut any_temporary = false;
        let mut last_tls = false;
        for target in targets {
            let address = target.address;
            if !policy.ip_family.allows(&address.ip()) {
                continue;
            }
            match self
                .deliver_to_host(address, &target.tls_name, policy, envelope, rate)
                .await
            {
                HostAttempt::Completed { outcomes, tls } => {
                    log_outcomes(envelope, address, tls, &outcomes);
                    return DeliveryReport {
                        outcomes,
                        host: Some(address),
                        tls,
                        failed_hosts,
                    };
                }
                HostAttempt::ConnectionFailed { reply, tls } => {
                    tracing::info!(%address, %reply, "address failed, trying the next one");
                    any_temporary |= !reply.is_permanent();
                    last_tls = tls;
                    failed_hosts.push((address, reply));
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
                let (connector, name) = if policy.require_tls {
                    (&self.tls.verified, tls_name.to_owned())
                } else if rustls::pki_types::ServerName::try_from(tls_name).is_ok() {
                    (&self.tls.opportunistic, tls_name.to_owned())
                } else {
                    // Any certificate is accepted: a name rustls cannot use is replaced by
                    // the address rather than failing the handshake.
                    (&self.tls.opportunistic, address.ip().to_string())
                };
                let mut tls_client = client
                    .into_tls(connector, &name)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::mx::MxRecord;
    use crate::outbound::policy::IpFamily;
    use std::collections::HashMap;
    use std::net::IpAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    /// Upper bound on one test line at the sink.
    const SINK_MAX_LINE_BYTES: usize = 64 * 1024;
    /// Generous per-test deadline, so a hung client fails the test instead of hanging it.
    const TEST_DEADLINE: Duration = Duration::from_secs(60);

    #[derive(Clone)]
    struct SinkBehaviour {
        greeting: String,
        tls: Option<Arc<rustls::ServerConfig>>,
        /// Advertise STARTTLS, answer 220, then drop the connection instead of handshaking.
        broken_tls: bool,
        /// Recipient → reply line; default `250 2.1.5 ok`.
        rcpt: HashMap<String, String>,
        data_reply: String,
    }

    impl Default for SinkBehaviour {
        fn default() -> Self {
            Self {
                greeting: "220 sink.test ESMTP".into(),
                tls: None,
                broken_tls: false,
                rcpt: HashMap::new(),
                data_reply: "250 2.0.0 queued as 1".into(),
            }
        }
    }

    #[derive(Debug, Clone)]
    struct SinkConnection {
        peer: SocketAddr,
        commands: Vec<String>,
        tls: bool,
    }

    #[derive(Debug, Clone)]
    struct Received {
        connection: usize,
        mail_from: String,
        recipients: Vec<String>,
        data: Vec<u8>,
        at: Instant,
    }

    #[derive(Default)]
    struct Record {
        connections: Vec<SinkConnection>,
        messages: Vec<Received>,
    }

    struct Sink {
        v4: SocketAddr,
        v6: SocketAddr,
        record: Arc<Mutex<Record>>,
        tasks: Vec<JoinHandle<()>>,
    }

    impl Drop for Sink {
        fn drop(&mut self) {
            for task in &self.tasks {
                task.abort();
            }
        }
    }

    impl Sink {
        async fn start(behaviour: SinkBehaviour) -> Self {
            crate::tls::install_crypto_provider();
            let record = Arc::new(Mutex::new(Record::default()));
            let behaviour = Arc::new(behaviour);
            let v4 = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let v6 = TcpListener::bind("[::1]:0").await.unwrap();
            let (a4, a6) = (v4.local_addr().unwrap(), v6.local_addr().unwrap());
            let tasks = [v4, v6]
                .into_iter()
                .map(|listener| {
                    let record = record.clone();
                    let behaviour = behaviour.clone();
                    tokio::spawn(async move {
                        while let Ok((stream, peer)) = listener.accept().await {
                            let index = {
                                let mut r = record.lock().unwrap();
                                r.connections.push(SinkConnection {
                                    peer,
                                    commands: Vec::new(),
                                    tls: false,
                                });
                                r.connections.len() - 1
                            };
                            let record = record.clone();
                            let behaviour = behaviour.clone();
                            tokio::spawn(async move {
                                let _ = handle(stream, index, &behaviour, &record).await;
                            });
                        }
                    })
                })
                .collect();
            Self {
                v4: a4,
                v6: a6,
                record,
                tasks,
            }
        }

        fn connections(&self) -> Vec<SinkConnection> {
            self.record.lock().unwrap().connections.clone()
        }

        fn messages(&self) -> Vec<Received> {
            self.record.lock().unwrap().messages.clone()
        }
    }

    enum End {
        Closed,
        StartTls,
    }

    async fn handle(
        stream: TcpStream,
        index: usize,
        behaviour: &SinkBehaviour,
        record: &Mutex<Record>,
    ) -> std::io::Result<()> {
        let mut io = BufReader::new(stream);
        io.write_all(format!("{}\r\n", behaviour.greeting).as_bytes())
            .await?;
        if let End::StartTls = serve(&mut io, index, behaviour, record, false).await? {
            if behaviour.broken_tls {
                return Ok(());
            }
            let Some(config) = behaviour.tls.clone() else {
                return Ok(());
            };
            let tls = tokio_rustls::TlsAcceptor::from(config)
                .accept(io.into_inner())
                .await?;
            record.lock().unwrap().connections[index].tls = true;
            serve(&mut BufReader::new(tls), index, behaviour, record, true).await?;
        }
        Ok(())
    }

    async fn read_line<S: AsyncRead + AsyncWrite + Unpin>(
        io: &mut BufReader<S>,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        let n = (&mut *io)
            .take(SINK_MAX_LINE_BYTES as u64)
            .read_until(b'\n', &mut line)
            .await?;
        Ok((n > 0).then_some(line))
    }

    fn between_brackets(line: &str) -> String {
        let start = line.find('<').map_or(0, |i| i + 1);
        let end = line.rfind('>').unwrap_or(line.len());
        line.get(start..end).unwrap_or_default().to_owned()
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        io: &mut BufReader<S>,
        index: usize,
        behaviour: &SinkBehaviour,
        record: &Mutex<Record>,
        tls_active: bool,
    ) -> std::io::Result<End> {
        let mut mail_from = String::new();
        let mut accepted: Vec<String> = Vec::new();
        while let Some(raw) = read_line(io).await? {
            let line = String::from_utf8_lossy(&raw).trim_end().to_owned();
            record.lock().unwrap().connections[index]
                .commands
                .push(line.clone());
            let upper = line.to_ascii_uppercase();
            let reply: String = if upper.starts_with("EHLO") {
                let starttls = behaviour.tls.is_some() && !tls_active || behaviour.broken_tls;
                format!(
                    "250-sink.test\r\n250-SIZE 10000000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n{}250 ENHANCEDSTATUSCODES",
                    if starttls { "250-STARTTLS\r\n" } else { "" }
                )
            } else if upper.starts_with("HELO") {
                "250 sink.test".into()
            } else if upper == "STARTTLS" {
                if (behaviour.tls.is_some() || behaviour.broken_tls) && !tls_active {
                    io.write_all(b"220 2.0.0 ready\r\n").await?;
                    io.flush().await?;
                    return Ok(End::StartTls);
                }
                "502 5.5.1 no".into()
            } else if upper.starts_with("MAIL FROM:") {
                mail_from = between_brackets(&line);
                accepted.clear();
                "250 2.1.0 ok".into()
            } else if upper.starts_with("RCPT TO:") {
                let address = between_brackets(&line);
                let reply = behaviour
                    .rcpt
                    .get(&address)
                    .cloned()
                    .unwrap_or_else(|| "250 2.1.5 ok".into());
                if reply.starts_with('2') {
                    accepted.push(address);
                }
                reply
            } else if upper == "DATA" {
                if accepted.is_empty() {
                    "554 5.5.1 no valid recipients".into()
                } else {
                    io.write_all(b"354 go ahead\r\n").await?;
                    io.flush().await?;
                    let mut data = Vec::new();
                    loop {
                        let Some(line) = read_line(io).await? else {
                            return Ok(End::Closed);
                        };
                        if line == b".\r\n" {
                            break;
                        }
                        let line = line.strip_prefix(b".").unwrap_or(&line);
                        data.extend_from_slice(line);
                    }
                    record.lock().unwrap().messages.push(Received {
                        connection: index,
                        mail_from: mail_from.clone(),
                        recipients: std::mem::take(&mut accepted),
                        data,
                        at: Instant::now(),
                    });
                    behaviour.data_reply.clone()
                }
            } else if upper == "QUIT" {
                io.write_all(b"221 2.0.0 bye\r\n").await?;
                io.flush().await?;
                return Ok(End::Closed);
            } else if upper == "RSET" {
                "250 2.0.0 ok".into()
            } else {
                "500 5.5.2 unknown command".into()
            };
            io.write_all(format!("{reply}\r\n").as_bytes()).await?;
            io.flush().await?;
        }
        Ok(End::Closed)
    }

    struct NoDns;

    impl Dns for NoDns {
        async fn mx(&self, domain: &str) -> Result<Option<Vec<MxRecord>>, MxError> {
            Err(MxError::Temporary(domain.to_owned()))
        }
        async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, MxError> {
            Err(MxError::Temporary(host.to_owned()))
        }
    }

    fn test_timeouts() -> TimeoutConfig {
        TimeoutConfig {
            connect_secs: 10,
            greeting_secs: 10,
            ehlo_secs: 10,
            starttls_secs: 10,
            mail_from_secs: 10,
            rcpt_to_secs: 10,
            data_secs: 10,
            data_block_secs: 10,
            data_end_secs: 10,
        }
    }

    fn client() -> OutboundClient {
        OutboundClient::new("client.kermail.test", test_timeouts())
    }

    fn policy() -> PolicyConfig {
        PolicyConfig::default_policy()
    }

    fn recipients(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    const MESSAGE: &[u8] = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nline \xc3\xa9t\xc3\xa9\r\n";

    async fn deliver_to(
        client: &OutboundClient,
        addresses: &[SocketAddr],
        policy: &PolicyConfig,
        rcpts: &[String],
    ) -> DeliveryReport {
        let limits = Limiters::new().get("test", policy);
        let envelope = Envelope {
            mail_from: "a@x.test",
            recipients: rcpts,
            message: MESSAGE,
        };
        tokio::time::timeout(
            TEST_DEADLINE,
            client.deliver(addresses, "localhost", policy, &limits, &envelope),
        )
        .await
        .expect("delivery finished in time")
    }

    #[test]
    fn data_encoder_stuffs_dots_and_normalises_line_ends() {
        assert_eq!(DataEncoder::encode(b""), b".\r\n");
        assert_eq!(DataEncoder::encode(b"a\r\n"), b"a\r\n.\r\n");
        assert_eq!(DataEncoder::encode(b"a"), b"a\r\n.\r\n");
        assert_eq!(
            DataEncoder::encode(b".a\r\n..\r\n.\r\nb.\r\n"),
            b"..a\r\n...\r\n..\r\nb.\r\n.\r\n"
        );
        // Bare LF and bare CR cannot smuggle an end of data.
        assert_eq!(
            DataEncoder::encode(b"a\n.\nMAIL FROM:<x>\r.\r\n"),
            b"a\r\n..\r\nMAIL FROM:<x>\r\n..\r\n.\r\n"
        );
        // Block boundaries change nothing.
        let message: Vec<u8> = b".x\r\n".repeat(1000);
        let mut encoder = DataEncoder::new();
        let mut out = Vec::new();
        while encoder.next_block(&message, 7, &mut out) {}
        assert_eq!(out, DataEncoder::encode(&message));
    }

    #[test]
    fn unsafe_addresses_are_not_sent() {
        assert!(address_is_sendable("a@b.test"));
        assert!(address_is_sendable(""));
        assert!(address_is_sendable("é@b.test"));
        assert!(!address_is_sendable("a@b.test>\r\nRCPT TO:<c@d"));
        assert!(!address_is_sendable("a@b.test> SIZE=1"));
        assert!(!address_is_sendable(&"a".repeat(MAX_ADDRESS_BYTES + 1)));
    }

    #[tokio::test]
    async fn delivers_byte_exact_with_size_and_8bitmime() {
        let sink = Sink::start(SinkBehaviour::default()).await;
        let rcpts = recipients(&["b@y.test"]);
        let report = deliver_to(&client(), &[sink.v4], &policy(), &rcpts).await;
        assert_eq!(report.host, Some(sink.v4));
        assert!(!report.tls);
        assert!(report.failed_hosts.is_empty());
        match &report.outcomes[..] {
            [RecipientOutcome::Delivered { reply }] => {
                assert_eq!(reply.code, 250);
                assert_eq!(reply.status, "2.0.0");
                assert_eq!(reply.text, "queued as 1");
                assert!(reply.remote);
            }
            other => panic!("unexpected outcomes {other:?}"),
        }
        let messages = sink.messages();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].data, MESSAGE);
        assert_eq!(messages[0].mail_from, "a@x.test");
        assert_eq!(messages[0].recipients, rcpts);
        let commands = &sink.connections()[messages[0].connection].commands;
        assert_eq!(commands[0], "EHLO client.kermail.test");
        assert_eq!(
            commands[1],
            format!("MAIL FROM:<a@x.test> SIZE={} BODY=8BITMIME", MESSAGE.len())
        );
        assert_eq!(commands.last().map(String::as_str), Some("QUIT"));
    }

    #[tokio::test]
    async fn mixed_recipient_results_are_kept_per_recipient() {
        let mut behaviour = SinkBehaviour::default();
        behaviour
            .rcpt
            .insert("later@y.test".into(), "450 4.2.1 mailbox busy".into());
        behaviour
            .rcpt
            .insert("nobody@y.test".into(), "550 5.1.1 no such user".into());
        let sink = Sink::start(behaviour).await;
        let rcpts = recipients(&["ok@y.test", "later@y.test", "nobody@y.test"]);
        let report = deliver_to(&client(), &[sink.v4], &policy(), &rcpts).await;
        assert!(
            matches!(&report.outcomes[0], RecipientOutcome::Delivered { reply } if reply.code == 250)
        );
        match &report.outcomes[1] {
            RecipientOutcome::TempFail { reply } => {
                assert_eq!((reply.code, reply.status.as_str()), (450, "4.2.1"));
                assert_eq!(reply.text, "mailbox busy");
            }
            other => panic!("{other:?}"),
        }
        match &report.outcomes[2] {
            RecipientOutcome::PermFail { reply } => {
                assert_eq!(reply.to_string(), "550 5.1.1 no such user");
                assert_eq!(
                    reply.diagnostic().as_deref(),
                    Some("smtp; 550 5.1.1 no such user")
                );
            }
            other => panic!("{other:?}"),
        }
        let messages = sink.messages();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].recipients, recipients(&["ok@y.test"]));
    }

    #[tokio::test]
    async fn no_data_when_every_recipient_is_refused_and_data_reply_applies_to_accepted() {
        let mut behaviour = SinkBehaviour::default();
        behaviour
            .rcpt
            .insert("nobody@y.test".into(), "550 5.1.1 no such user".into());
        let sink = Sink::start(behaviour).await;
        let rcpts = recipients(&["nobody@y.test"]);
        let report = deliver_to(&client(), &[sink.v4], &policy(), &rcpts).await;
        assert!(matches!(
            report.outcomes[0],
            RecipientOutcome::PermFail { .. }
        ));
        let commands = &sink.connections()[0].commands;
        assert!(!commands.iter().any(|c| c == "DATA"), "{commands:?}");
        assert!(sink.messages().is_empty());

        let sink = Sink::start(SinkBehaviour {
            data_reply: "451 4.3.0 try later".into(),
            ..SinkBehaviour::default()
        })
        .await;
        let rcpts = recipients(&["a@y.test", "b@y.test"]);
        let report = deliver_to(&client(), &[sink.v4], &policy(), &rcpts).await;
        for outcome in &report.outcomes {
            assert!(matches!(outcome, RecipientOutcome::TempFail { reply } if reply.code == 451));
        }
    }

    #[tokio::test]
    async fn greeting_failures_apply_to_all_recipients() {
        let rcpts = recipients(&["a@y.test", "b@y.test"]);
        let sink = Sink::start(SinkBehaviour {
            greeting: "554 5.7.1 go away".into(),
            ..SinkBehaviour::default()
        })
        .await;
        let report = deliver_to(&client(), &[sink.v4], &policy(), &rcpts).await;
        assert_eq!(report.outcomes.len(), 2);
        for outcome in &report.outcomes {
            assert!(matches!(outcome, RecipientOutcome::PermFail { reply } if reply.code == 554));
        }
        let sink = Sink::start(SinkBehaviour {
            greeting: "421 4.3.2 busy".into(),
            ..SinkBehaviour::default()
        })
        .await;
        let report = deliver_to(&client(), &[sink.v4], &policy(), &rcpts).await;
        for outcome in &report.outcomes {
            assert!(matches!(outcome, RecipientOutcome::TempFail { reply } if reply.code == 421));
        }
        assert!(sink.messages().is_empty());
    }

    /// An address nothing listens on (bound, then released).
    async fn dead_address() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        address
    }

    #[tokio::test]
    async fn dead_first_address_falls_over_to_the_second() {
        let sink = Sink::start(SinkBehaviour::default()).await;
        let dead = dead_address().await;
        let rcpts = recipients(&["b@y.test"]);
        let report = deliver_to(&client(), &[dead, sink.v4], &policy(), &rcpts).await;
        assert_eq!(report.host, Some(sink.v4));
        assert!(matches!(
            report.outcomes[0],
            RecipientOutcome::Delivered { .. }
        ));
        assert_eq!(report.failed_hosts.len(), 1);
        assert_eq!(report.failed_hosts[0].0, dead);
        assert_eq!(report.failed_hosts[0].1.status, "4.4.1");
        assert_eq!(sink.messages().len(), 1);

        // Only dead addresses: a temporary failure for everyone.
        let report = deliver_to(&client(), &[dead], &policy(), &rcpts).await;
        assert!(
            matches!(&report.outcomes[0], RecipientOutcome::TempFail { reply } if !reply.remote)
        );
    }

    fn tls_sink_behaviour() -> SinkBehaviour {
        SinkBehaviour {
            tls: Some(crate::tls::self_signed(&["localhost".into()]).unwrap()),
            ..SinkBehaviour::default()
        }
    }

    #[tokio::test]
    async fn starttls_is_used_when_offered() {
        let sink = Sink::start(tls_sink_behaviour()).await;
        let rcpts = recipients(&["b@y.test"]);
        let report = deliver_to(&client(), &[sink.v4], &policy(), &rcpts).await;
        assert!(report.tls);
        assert!(matches!(
            report.outcomes[0],
            RecipientOutcome::Delivered { .. }
        ));
        let connections = sink.connections();
        assert_eq!(connections.len(), 1);
        assert!(connections[0].tls);
        // EHLO, STARTTLS, then EHLO again inside TLS, and only then the envelope.
        assert_eq!(
            &connections[0].commands[..3],
            &[
                "EHLO client.kermail.test",
                "STARTTLS",
                "EHLO client.kermail.test"
            ]
        );
        assert_eq!(sink.messages()[0].data, MESSAGE);

        // A name rustls cannot use does not stop opportunistic TLS.
        let limits = Limiters::new().get("test", &policy());
        let envelope = Envelope {
            mail_from: "a@x.test",
            recipients: &rcpts,
            message: MESSAGE,
        };
        let report = client()
            .deliver(&[sink.v4], "not a host name", &policy(), &limits, &envelope)
            .await;
        assert!(report.tls);
        assert!(matches!(
            report.outcomes[0],
            RecipientOutcome::Delivered { .. }
        ));
    }

    #[tokio::test]
    async fn broken_starttls_falls_back_to_clear_unless_tls_is_required() {
        let sink = Sink::start(SinkBehaviour {
            broken_tls: true,
            ..SinkBehaviour::default()
        })
        .await;
        let rcpts = recipients(&["b@y.test"]);
        let report = deliver_to(&client(), &[sink.v4], &policy(), &rcpts).await;
        assert!(!report.tls);
        assert!(matches!(
            report.outcomes[0],
            RecipientOutcome::Delivered { .. }
        ));
        let connections = sink.connections();
        assert_eq!(connections.len(), 2);
        assert!(!connections[1].commands.iter().any(|c| c == "STARTTLS"));
    }

    #[tokio::test]
    async fn require_tls_refuses_a_sink_without_starttls_or_with_an_untrusted_certificate() {
        let required = PolicyConfig {
            require_tls: true,
            ..policy()
        };
        let rcpts = recipients(&["b@y.test"]);
        let sink = Sink::start(SinkBehaviour::default()).await;
        let report = deliver_to(&client(), &[sink.v4], &required, &rcpts).await;
        match &report.outcomes[0] {
            RecipientOutcome::TempFail { reply } => assert_eq!(reply.status, "4.7.10"),
            other => panic!("{other:?}"),
        }
        let commands = &sink.connections()[0].commands;
        assert!(
            !commands.iter().any(|c| c.starts_with("MAIL")),
            "{commands:?}"
        );
        assert!(sink.messages().is_empty());

        // A self-signed certificate does not verify against the webpki roots.
        let sink = Sink::start(tls_sink_behaviour()).await;
        let report = deliver_to(&client(), &[sink.v4], &required, &rcpts).await;
        match &report.outcomes[0] {
            RecipientOutcome::TempFail { reply } => assert_eq!(reply.status, "4.7.5"),
            other => panic!("{other:?}"),
        }
        let connections = sink.connections();
        assert_eq!(connections.len(), 1, "no retry in clear under require_tls");
        assert!(!connections[0]
            .commands
            .iter()
            .any(|c| c.starts_with("MAIL")));
        assert!(sink.messages().is_empty());
    }

    fn dual_stack_config(sink: &Sink) -> OutboundConfig {
        let mut config = OutboundConfig::default();
        // IPv6 listed first, so `any` tries it first.
        config.overrides.insert(
            "dual.test".into(),
            vec![sink.v6.to_string(), sink.v4.to_string()],
        );
        config
    }

    #[tokio::test]
    async fn ipv4_only_policy_never_connects_over_ipv6() {
        let sink = Sink::start(SinkBehaviour::default()).await;
        let config = dual_stack_config(&sink);
        let v4_only = Policies::new(
            vec![PolicyConfig {
                name: "v4".into(),
                match_domains: vec!["dual.test".into()],
                ip_family: IpFamily::Ipv4Only,
                ..PolicyConfig::default()
            }],
            PolicyConfig::default_policy(),
        );
        let limiters = Limiters::new();
        let rcpts = recipients(&["b@dual.test"]);
        let envelope = Envelope {
            mail_from: "a@x.test",
            recipients: &rcpts,
            message: MESSAGE,
        };
        let client = client();
        for _ in 0..3 {
            let report = tokio::time::timeout(
                TEST_DEADLINE,
                client.deliver_to_domain(
                    &config,
                    &NoDns,
                    &v4_only,
                    &limiters,
                    "dual.test",
                    &envelope,
                ),
            )
            .await
            .unwrap();
            assert_eq!(report.host, Some(sink.v4));
            assert!(matches!(
                report.outcomes[0],
                RecipientOutcome::Delivered { .. }
            ));
        }
        let connections = sink.connections();
        assert_eq!(connections.len(), 3);
        assert!(
            connections.iter().all(|c| c.peer.is_ipv4()),
            "{connections:?}"
        );

        // The same destination without the rule: IPv6, tried first, is used.
        let any = Policies::new(Vec::new(), PolicyConfig::default_policy());
        let report = tokio::time::timeout(
            TEST_DEADLINE,
            client.deliver_to_domain(&config, &NoDns, &any, &limiters, "dual.test", &envelope),
        )
        .await
        .unwrap();
        assert_eq!(report.host, Some(sink.v6));
        assert!(sink.connections().iter().any(|c| c.peer.is_ipv6()));
        assert_eq!(sink.messages().len(), 4);
    }

    #[tokio::test]
    async fn unresolvable_destinations_fail_without_connecting() {
        let config = OutboundConfig::default();
        let policies = Policies::new(Vec::new(), PolicyConfig::default_policy());
        let rcpts = recipients(&["b@nowhere.test", "c@nowhere.test"]);
        let envelope = Envelope {
            mail_from: "a@x.test",
            recipients: &rcpts,
            message: MESSAGE,
        };
        let report = client()
            .deliver_to_domain(
                &config,
                &NoDns,
                &policies,
                &Limiters::new(),
                "nowhere.test",
                &envelope,
            )
            .await;
        assert_eq!(report.host, None);
        assert_eq!(report.outcomes.len(), 2);
        for outcome in &report.outcomes {
            assert!(
                matches!(outcome, RecipientOutcome::TempFail { reply } if reply.status == "4.4.3")
            );
        }
    }

    struct FakeDns {
        mx: HashMap<String, Vec<MxRecord>>,
        ips: HashMap<String, Vec<IpAddr>>,
    }

    impl Dns for FakeDns {
        async fn mx(&self, domain: &str) -> Result<Option<Vec<MxRecord>>, MxError> {
            Ok(self.mx.get(domain).cloned())
        }
        async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, MxError> {
            match self.ips.get(host) {
                Some(ips) => Ok(ips.clone()),
                None => Err(MxError::Temporary(host.to_owned())),
            }
        }
    }

    fn mx_record(preference: u16, exchange: &str) -> MxRecord {
        MxRecord {
            preference,
            exchange: exchange.to_owned(),
        }
    }

    #[tokio::test]
    async fn mx_walk_keeps_host_names_selects_policy_by_mx_and_fails_over() {
        let sink = Sink::start(SinkBehaviour::default()).await;
        let mut dns = FakeDns {
            mx: HashMap::new(),
            ips: HashMap::new(),
        };
        dns.mx.insert(
            "corp.test".into(),
            vec![
                mx_record(20, "alt.mx.test."),
                mx_record(10, "aspmx.l.google.com."),
                mx_record(30, "broken.mx.test."),
            ],
        );
        dns.mx.insert("null.test".into(), vec![mx_record(0, ".")]);
        // Nothing listens on 127.0.0.2 at the sink's port: the first MX is dead.
        dns.ips.insert(
            "aspmx.l.google.com".into(),
            vec!["127.0.0.2".parse().unwrap(), "::1".parse().unwrap()],
        );
        dns.ips
            .insert("alt.mx.test".into(), vec!["127.0.0.1".parse().unwrap()]);
        let config = OutboundConfig {
            smtp_port: sink.v4.port(),
            ..OutboundConfig::default()
        };
        let policies = Policies::new(
            crate::outbound::policy::shipped_example_policies(),
            PolicyConfig::default_policy(),
        );
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
        let (targets, policy, key) =
            resolve_targets(&config, &dns, &policies, "Corp.Test.", &mut rng)
                .await
                .unwrap();
        assert_eq!(policy.name, "gmail");
        assert_eq!(key, "policy:gmail");
        let port = sink.v4.port();
        assert_eq!(
            targets,
            vec![
                Target {
                    address: SocketAddr::new("127.0.0.2".parse().unwrap(), port),
                    tls_name: "aspmx.l.google.com".into(),
                },
                Target {
                    address: SocketAddr::new("127.0.0.1".parse().unwrap(), port),
                    tls_name: "alt.mx.test".into(),
                },
            ],
            "IPv6 dropped by the gmail policy, broken MX host skipped"
        );

        let rcpts = recipients(&["b@corp.test"]);
        let envelope = Envelope {
            mail_from: "a@x.test",
            recipients: &rcpts,
            message: MESSAGE,
        };
        let client = client();
        let limiters = Limiters::new();
        let report = tokio::time::timeout(
            TEST_DEADLINE,
            client.deliver_to_domain(&config, &dns, &policies, &limiters, "corp.test", &envelope),
        )
        .await
        .unwrap();
        assert_eq!(report.host, Some(sink.v4));
        assert_eq!(report.failed_hosts.len(), 1);
        assert!(matches!(
            report.outcomes[0],
            RecipientOutcome::Delivered { .. }
        ));

        let report = client
            .deliver_to_domain(&config, &dns, &policies, &limiters, "null.test", &envelope)
            .await;
        assert!(
            matches!(&report.outcomes[0], RecipientOutcome::PermFail { reply } if reply.status == "5.1.10")
        );
        let report = client
            .deliver_to_domain(
                &config,
                &dns,
                &policies,
                &limiters,
                "unknown.test",
                &envelope,
            )
            .await;
        assert!(
            matches!(&report.outcomes[0], RecipientOutcome::TempFail { reply } if reply.status == "4.4.3"),
            "{report:?}"
        );
    }

    #[test]
    fn relay_host_names_lose_their_port() {
        assert_eq!(relay_host_name("smtp.relay.test"), "smtp.relay.test");
        assert_eq!(relay_host_name("smtp.relay.test:587"), "smtp.relay.test");
        assert_eq!(relay_host_name("192.0.2.1:25"), "192.0.2.1");
        assert_eq!(relay_host_name("[2001:db8::1]:25"), "2001:db8::1");
    }

    #[tokio::test]
    async fn smtputf8_is_asked_for_when_an_address_needs_it() {
        let sink = Sink::start(SinkBehaviour::default()).await;
        let rcpts = recipients(&["jos\u{e9}@y.test"]);
        let report = deliver_to(&client(), &[sink.v4], &policy(), &rcpts).await;
        assert!(matches!(
            report.outcomes[0],
            RecipientOutcome::Delivered { .. }
        ));
        let commands = &sink.connections()[0].commands;
        assert!(commands[1].ends_with(" SMTPUTF8"), "{commands:?}");
        assert_eq!(commands[2], "RCPT TO:<jos\u{e9}@y.test>");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_as_a_temporary_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // Accepts and never says anything.
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let client = OutboundClient::new(
            "client.kermail.test",
            TimeoutConfig {
                greeting_secs: 1,
                ..test_timeouts()
            },
        );
        let started = Instant::now();
        let report = deliver_to(&client, &[address], &policy(), &recipients(&["b@y.test"])).await;
        assert!(started.elapsed() < Duration::from_secs(10));
        match &report.outcomes[0] {
            RecipientOutcome::TempFail { reply } => {
                assert_eq!(reply.status, "4.4.2");
                assert!(reply.text.contains("greeting"), "{reply}");
            }
            other => panic!("{other:?}"),
        }
        holder.abort();
    }

    /// Largest number of `times` in any half-open window [t, t + window).
    fn max_in_any_window(times: &[Instant], window: Duration) -> usize {
        let mut sorted = times.to_vec();
        sorted.sort();
        (0..sorted.len())
            .map(|i| {
                sorted[i..]
                    .iter()
                    .take_while(|t| **t < sorted[i] + window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_per_second_policy_is_respected_at_the_sink() {
        let sink = Sink::start(SinkBehaviour::default()).await;
        let limited = PolicyConfig {
            name: "orange-like".into(),
            max_messages_per_second: Some(3.0),
            max_connections: 10,
            ..PolicyConfig::default()
        };
        let limits = Limiters::new().get("policy:orange-like", &limited);
        let client = Arc::new(client());
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..10 {
            let (client, limited, limits) = (client.clone(), limited.clone(), limits.clone());
            let address = sink.v4;
            tasks.spawn(async move {
                let rcpts = vec![format!("r{i}@orange.test")];
                let envelope = Envelope {
                    mail_from: "a@x.test",
                    recipients: &rcpts,
                    message: MESSAGE,
                };
                client
                    .deliver(&[address], "localhost", &limited, &limits, &envelope)
                    .await
            });
        }
        let deadline = tokio::time::timeout(TEST_DEADLINE, async {
            while let Some(report) = tasks.join_next().await {
                let report = report.unwrap();
                assert!(matches!(
                    report.outcomes[0],
                    RecipientOutcome::Delivered { .. }
                ));
            }
        });
        deadline.await.expect("deliveries finished in time");
        let times: Vec<Instant> = sink.messages().iter().map(|m| m.at).collect();
        assert_eq!(times.len(), 10);
        assert!(max_in_any_window(&times, Duration::from_secs(1)) <= 3);
        // Ten messages at three a second need at least three full windows.
        assert!(started.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test]
    async fn source_address_is_bound_per_family() {
        let sink = Sink::start(SinkBehaviour::default()).await;
        let bound = PolicyConfig {
            source_ipv4: Some("127.0.0.2".parse().unwrap()),
            ..policy()
        };
        let rcpts = recipients(&["b@y.test"]);
        let report = deliver_to(&client(), &[sink.v4, sink.v6], &bound, &rcpts).await;
        assert!(matches!(
            report.outcomes[0],
            RecipientOutcome::Delivered { .. }
        ));
        assert_eq!(
            sink.connections()[0].peer.ip(),
            "127.0.0.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn delivery_future_is_send_with_the_real_resolver() {
        fn assert_send<T: Send>(_: &T) {}
        let client = OutboundClient::new("x", TimeoutConfig::default());
        let config = OutboundConfig::default();
        let dns = crate::outbound::dns::HickoryDns::with_name_servers(
            &["127.0.0.1:1".parse().unwrap()],
            Duration::from_millis(10),
        );
        let policies = Policies::new(Vec::new(), PolicyConfig::default_policy());
        let limiters = Limiters::new();
        let rcpts = recipients(&["b@y.test"]);
        let envelope = Envelope {
            mail_from: "a@x.test",
            recipients: &rcpts,
            message: MESSAGE,
        };
        let future =
            client.deliver_to_domain(&config, &dns, &policies, &limiters, "y.test", &envelope);
        assert_send(&future);
    }
}
