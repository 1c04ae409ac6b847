//! The tokio driver around [`super::session::Session`]: accepts connections, enforces the
//! session limits, moves bytes between the socket and the session, performs its actions
//! (TLS handshake, delivery, close) and shuts down gracefully. It holds no protocol logic.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::session::{Action, Input, Output, Recipients, Session, SessionParams};
use super::SmtpConfig;
use crate::store::{MailStore, RecipientCheck};

/// Bytes read from the socket at once; also the most unprocessed input a session holds while
/// a delivery is outstanding.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// How long a refused connection may take to receive its `421` before it is dropped.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed accept (for example out of file descriptors), so the loop does not
/// spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

impl Recipients for MailStore {
    fn check_recipient(&self, address: &str) -> RecipientCheck {
        MailStore::check_recipient(self, address)
    }
}

/// Serves SMTP (MX role) on `listener` until `shutdown` is cancelled. Then it stops
/// accepting, lets sessions finish their current transaction for at most
/// `shutdown_grace_period_secs`, cuts the rest and returns.
pub async fn serve(
    listener: TcpListener,
    config: Arc<SmtpConfig>,
    hostname: Arc<str>,
    store: MailStore,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let limits = Arc::new(SessionLimits::default());
    let mut sessions = JoinSet::new();
    tracing::info!(address = ?listener.local_addr().ok(), "smtp listening");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "smtp accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                match limits.acquire(peer.ip(), &config) {
                    Some(permit) => {
                        let context = SessionContext {
                            config: config.clone(),
                            hostname: hostname.clone(),
                            store: store.clone(),
                            acceptor: acceptor.clone(),
                            shutdown: shutdown.clone(),
                        };
                        sessions.spawn(async move {
                            run_session(stream, peer, context).await;
                            drop(permit);
                        });
                    }
                    None => {
                        tracing::info!(client = %peer.ip(), "smtp connection refused: too many sessions");
                        let reply = format!("421 4.7.0 {hostname} Error: too many connections, try again later\r\n");
                        sessions.spawn(refuse(stream, reply));
                    }
                }
            }
        }
    }
    drop(listener);
    let grace = Duration::from_secs(config.shutdown_grace_period_secs);
    let drained = tokio::time::timeout(grace, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            n_sessions = sessions.len(),
            "smtp grace period over, cutting sessions"
        );
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
    }
    tracing::info!("smtp stopped");
    Ok(())
}

async fn refuse(mut stream: TcpStream, reply: String) {
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Counts open sessions, in total and per client address.
#[derive(Default)]
struct SessionLimits {
    counts: Mutex<LimitCounts>,
}

#[derive(Default)]
struct LimitCounts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One open session; gives its place back when dropped.
struct SessionPermit {
    limits: Arc<SessionLimits>,
    ip: IpAddr,
}

impl SessionLimits {
    fn acquire(self: &Arc<Self>, ip: IpAddr, config: &SmtpConfig) -> Option<SessionPermit> {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let for_ip = counts.per_ip.get(&ip).copied().unwrap_or(0);
        if counts.total >= config.max_sessions || for_ip >= config.max_sessions_per_ip {
            return None;
        }
        counts.total += 1;
        counts.per_ip.insert(ip, for_ip + 1);
        Some(SessionPermit {
            limits: self.clone(),
            ip,
        })
    }
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        let mut counts = self
            .limits
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(count) = counts.per_ip.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.per_ip.remove(&self.ip);
            }
        }
    }
}

struct SessionContext {
    config: Arc<SmtpConfig>,
    hostname: Arc<str>,
    store: MailStore,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
}

/// How a run of [`drive`] over one stream ended.
enum DriveEnd {
    Closed,
    StartTls,
}

async fn run_session(stream: TcpStream, peer: SocketAddr, context: SessionContext) {
    let span = tracing::info_span!("smtp_session", client = %peer);
    async move {
        tracing::debug!("smtp session opened");
        let params = SessionParams {
            config: context.config.clone(),
            hostname: context.hostname.clone(),
            client_ip: peer.ip(),
            tls_available: true,
            id_seed: rand::random(),
        };
        let mut session = Session::new(params, context.store.clone());
        let greeting = session.step(Input::Connected, SystemTime::now());
        let mut plain = stream;
        match drive(&mut plain, &mut session, greeting, &context).await {
            Ok(DriveEnd::StartTls) => {
                let handshake_timeout = Duration::from_secs(context.config.command_timeout_secs);
                match tokio::time::timeout(handshake_timeout, context.acceptor.accept(plain)).await
                {
                    Ok(Ok(mut tls)) => {
                        tracing::debug!("smtp tls established");
                        let output = session.step(Input::TlsEstablished, SystemTime::now());
                        if let Err(error) = drive(&mut tls, &mut session, output, &context).await {
                            tracing::debug!(%error, "smtp connection error");
                        }
                    }
                    Ok(Err(error)) => {
                        tracing::info!(%error, "smtp tls handshake failed");
                        session.step(Input::Closed, SystemTime::now());
                    }
                    Err(_) => {
                        tracing::info!("smtp tls handshake timed out");
                        session.step(Input::Closed, SystemTime::now());
                    }
                }
            }
            Ok(DriveEnd::Closed) => {}
            Err(error) => tracing::debug!(%error, "smtp connection error"),
        }
        tracing::debug!("smtp session closed");
    }
    .instrument(span)
    .await
}

/// Runs the session over one stream (plain, then TLS after STARTTLS).
async fn drive<S>(
    stream: &mut S,
    session: &mut Session<MailStore>,
    first_output: Output,
    context: &SessionContext,
) -> std::io::Result<DriveEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let write_timeout = Duration::from_secs(context.config.command_timeout_secs);
    let mut output = first_output;
    let mut shutdown_told = false;
    loop {
        if !output.reply.is_empty() {
            let written = tokio::time::timeout(write_timeout, async {
                stream.write_all(&output.reply).await?;
                stream.flush().await
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    session.step(Input::Closed, SystemTime::now());
                    return Err(error);
                }
                Err(_) => {
                    session.step(Input::Closed, SystemTime::now());
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
            }
        }
        let mut next_output = None;
        for action in std::mem::take(&mut output.actions) {
            match action {
                Action::Close => {
                    let _ = stream.shutdown().await;
                    return Ok(DriveEnd::Closed);
                }
                Action::StartTls => return Ok(DriveEnd::StartTls),
                Action::Deliver(pending) => {
                    let result = context.store.deliver(pending.delivery).await;
                    next_output =
                        Some(session.step(Input::DeliveryDone(result), SystemTime::now()));
                }
            }
        }
        if let Some(next_output) = next_output {
            output = next_output;
            continue;
        }
        let read_timeout = session.read_timeout();
        let read = tokio::select! {
            biased;
            _ = context.shutdown.cancelled(), if !shutdown_told => {
                shutdown_told = true;
                output = session.step(Input::Shutdown, SystemTime::now());
                continue;
            }
            read = tokio::time::timeout(read_timeout, stream.read(&mut buffer)) => read,
        };
        output = match read {
            Err(_elapsed) => session.step(Input::Timeout, SystemTime::now()),
            Ok(Ok(0)) => {
                session.step(Input::Closed, SystemTime::now());
                return Ok(DriveEnd::Closed);
            }
            Ok(Ok(n_read)) => session.step(Input::Bytes(&buffer[..n_read]), SystemTime::now()),
            Ok(Err(error)) => {
                session.step(Input::Closed, SystemTime::now());
                return Err(error);
            }
        };
    }
}
