//! The tokio driver: accepts connections, runs TLS (implicit or after STARTTLS), moves bytes
//! between the socket and the [`Session`], wakes idling sessions on store changes, enforces
//! timeouts and session limits, and shuts down gracefully. No protocol logic lives here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::cache::{AuthCache, HeaderCache};
use super::compress::Deflate;
use super::config::ImapConfig;
use super::session::{Action, ConnectionInfo, Session};
use crate::auth::slots::Slots;
use crate::store::MailStore;

/// Bytes read from the socket at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Pieces of a long response queued between the session and the socket writer.
const OUTPUT_AHEAD_QUEUE: usize = 4;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF_MS: u64 = 100;
/// The output buffer's capacity is given back above this after a write (a large FETCH
/// response must not stay allocated for the rest of the session).
const OUTPUT_KEEP_CAPACITY_BYTES: usize = 256 * 1024;

/// Serves IMAP on `listener` until `shutdown` is cancelled; then stops accepting, lets each
/// session finish its current command, says BYE to the waiting ones, and returns when all
/// sessions ended (or after `shutdown_grace_secs`).
pub async fn serve(
    listener: TcpListener,
    implicit_tls: bool,
    config: Arc<ImapConfig>,
    store: MailStore,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let headers = Arc::new(HeaderCache::new(config.header_cache_bytes));
    let logins = Arc::new(AuthCache::new(Duration::from_secs(
        config.auth_cache_ttl_secs,
    )));
    let slots = Arc::new(Slots::default());
    let loopback = listener.local_addr()?.ip().is_loopback();
    let mut sessions = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "imap accept failed");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                    continue;
                }
            },
        };
        while sessions.try_join_next().is_some() {}
        let Some(slot) = Slots::acquire(
            &slots,
            peer.ip(),
            config.max_sessions,
            config.max_sessions_per_ip,
        ) else {
            tracing::info!(%peer, "imap connection refused: too many sessions");
            sessions.spawn(refuse(tcp, implicit_tls));
            continue;
        };
        let span = tracing::info_span!("imap", %peer, tls = implicit_tls);
        let connection = Connection {
            peer,
            implicit_tls,
            loopback,
            acceptor: acceptor.clone(),
            config: Arc::clone(&config),
            store: store.clone(),
            headers: Arc::clone(&headers),
            logins: Arc::clone(&logins),
            shutdown: shutdown.clone(),
        };
        sessions.spawn(
            async move {
                connection.run(tcp).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let drained = tokio::time::timeout(grace, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = sessions.len(),
            "imap sessions aborted after the grace period"
        );
        sessions.abort_all();
    }
    Ok(())
}

async fn refuse(mut tcp: TcpStream, implicit_tls: bool) {
    // A TLS client would not understand plaintext; just close.
    if !implicit_tls {
        let _ = tcp.write_all(b"* BYE too many connections\r\n").await;
    }
}

/// Counts sessions in total and per client address.
struct Connection {
    peer: SocketAddr,
    implicit_tls: bool,
    loopback: bool,
    acceptor: TlsAcceptor,
    config: Arc<ImapConfig>,
    store: MailStore,
    headers: Arc<HeaderCache>,
    logins: Arc<AuthCache>,
    shutdown: CancellationToken,
}

enum Ended {
    Closed,
    StartTls,
    /// COMPRESS DEFLATE was accepted: go on through [`Deflate`].
    Compress,
}

impl Connection {
    async fn run(self, tcp: TcpStream) {
        let _ = tcp.set_nodelay(true);
        let conn = ConnectionInfo {
            peer: self.peer,
            secure: self.implicit_tls,
            loopback: self.loopback,
        };
        let mut session = Session::new(
            self.store.clone(),
            Arc::clone(&self.config),
            Arc::clone(&self.headers),
            Arc::clone(&self.logins),
            conn,
        );
        // The whole pre-auth phase (TLS handshakes included) ends at this instant, however
        // the client spreads its bytes.
        let preauth_deadline =
            Instant::now() + Duration::from_secs(self.config.preauth_timeout_secs);
        if self.implicit_tls {
            match tokio::time::timeout_at(preauth_deadline, self.acceptor.accept(tcp)).await {
                Ok(Ok(mut tls)) => {
                    self.drive_layers(&mut tls, &mut session, true, preauth_deadline)
                        .await;
                }
                Ok(Err(error)) => tracing::info!(%error, "tls handshake failed"),
                Err(_) => tracing::info!("tls handshake timed out"),
            }
            return;
        }
        let mut tcp = tcp;
        if let Ended::StartTls = self
            .drive_layers(&mut tcp, &mut session, true, preauth_deadline)
            .await
        {
            match tokio::time::timeout_at(preauth_deadline, self.acceptor.accept(tcp)).await {
                Ok(Ok(mut tls)) => {
                    session.tls_established();
                    self.drive_layers(&mut tls, &mut session, false, preauth_deadline)
                        .await;
                }
                Ok(Err(error)) => tracing::info!(%error, "starttls handshake failed"),
                Err(_) => tracing::info!("starttls handshake timed out"),
            }
        }
    }

    /// [`Connection::drive`], then on through a [`Deflate`] layer once the session accepted
    /// COMPRESS DEFLATE.
    async fn drive_layers<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        session: &mut Session,
        greet: bool,
        preauth_deadline: Instant,
    ) -> Ended {
        match self.drive(stream, session, greet, preauth_deadline).await {
            Ended::Compress => {
                tracing::debug!("imap compression on");
                let mut deflated = Deflate::new(stream);
                match self
                    .drive(&mut deflated, session, false, preauth_deadline)
                    .await
                {
                    // The session accepts COMPRESS once per connection.
                    Ended::Compress => Ended::Closed,
                    ended => ended,
                }
            }
            ended => ended,
        }
    }

    /// Feeds input to the session while writing the pieces of long responses it sends ahead
    /// (in order; what is left in `out` follows them). `None`: the client is gone.
    async fn feed<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        session: &mut Session,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<Action> {
        let (ahead, mut pieces) = tokio::sync::mpsc::channel::<Vec<u8>>(OUTPUT_AHEAD_QUEUE);
        session.set_output_ahead(Some(ahead));
        let work = async {
            let action = session.handle_input(input, out).await;
            session.set_output_ahead(None);
            action
        };
        let write_timeout = Duration::from_secs(self.config.idle_timeout_secs);
        let writer = async {
            let mut healthy = true;
            // Ends when the session dropped its sender; after a failed write the pieces are
            // only drained, so the session never waits on a dead client.
            while let Some(piece) = pieces.recv().await {
                if healthy {
                    let written = tokio::time::timeout(write_timeout, async {
                        stream.write_all(&piece).await?;
                        stream.flush().await
                    })
                    .await;
                    healthy = matches!(written, Ok(Ok(())));
                }
            }
            healthy
        };
        let (action, healthy) = tokio::join!(work, writer);
        healthy.then_some(action)
    }

    async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        session: &mut Session,
        greet: bool,
        preauth_deadline: Instant,
    ) -> Ended {
        let mut out: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
        if greet {
            session.greeting(&mut out);
        }
        let mut changes = self.store.subscribe_changes();
        let mut changes_open = true;
        // NOTIFY's mailbox name and subscription changes, and the NOTIFY SET they follow.
        let mut listings = self.store.subscribe_listings();
        let mut listings_open = true;
        let mut notify_generation = session.notify_generation();
        let mut buffer = vec![0u8; READ_CHUNK_BYTES];
        let idle = Duration::from_secs(self.config.idle_timeout_secs);
        let mut action = Action::Continue;
        loop {
            // Before login, every wait ends at the pre-auth deadline; after it, a write or a
            // silence may last `idle_timeout_secs`.
            let wait_until = |session: &Session| {
                if session.is_authenticated() {
                    Instant::now() + idle
                } else {
                    preauth_deadline
                }
            };
            if !out.is_empty() {
                let written = tokio::time::timeout_at(wait_until(session), async {
                    stream.write_all(&out).await?;
                    stream.flush().await
                })
                .await;
                out.clear();
                if out.capacity() > OUTPUT_KEEP_CAPACITY_BYTES {
                    out = Vec::with_capacity(READ_CHUNK_BYTES);
                }
                if !matches!(written, Ok(Ok(()))) {
                    return Ended::Closed;
                }
            }
            match action {
                Action::Continue => {}
                Action::StartTls => return Ended::StartTls,
                Action::Compress => return Ended::Compress,
                Action::Close => {
                    let _ = stream.shutdown().await;
                    return Ended::Closed;
                }
            }
            if session.notify_generation() != notify_generation {
                // A new NOTIFY SET: what happened before it is not news.
                notify_generation = session.notify_generation();
                changes = self.store.subscribe_changes();
                listings = self.store.subscribe_listings();
                changes_open = true;
                listings_open = true;
            }
            if session.notify_active() {
                session.notify_flush(&mut out).await;
                if !out.is_empty() {
                    continue;
                }
            }
            let silence_ends = wait_until(session);
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    session.shutdown(&mut out);
                    action = Action::Close;
                }
                _ = tokio::time::sleep_until(silence_ends) => {
                    session.timed_out(&mut out);
                    action = Action::Close;
                }
                changed = changes.recv(), if changes_open && session.wants_changes() => {
                    match changed {
                        Ok(change) => {
                            if session.is_idling()
                                && session.selected_mailbox() == Some((change.account, change.mailbox))
                            {
                                session.idle_wakeup(&mut out);
                                session.search_updates(&mut out).await;
                            }
                            session.notify_changed(Some(change));
                        }
                        Err(RecvError::Lagged(_)) => {
                            if session.is_idling() {
                                session.idle_wakeup(&mut out);
                                session.search_updates(&mut out).await;
                            }
                            session.notify_changed(None);
                        }
                        Err(RecvError::Closed) => changes_open = false,
                    }
                }
                listed = listings.recv(), if listings_open && session.notify_active() => {
                    match listed {
                        Ok(account) => session.notify_listing(Some(account)),
                        Err(RecvError::Lagged(_)) => session.notify_listing(None),
                        Err(RecvError::Closed) => listings_open = false,
                    }
                }
                read = stream.read(&mut buffer) => {
                    match read {
                        Ok(0) | Err(_) => return Ended::Closed,
                        Ok(n) => match self.feed(stream, session, &buffer[..n], &mut out).await {
                            Some(next) => action = next,
                            None => return Ended::Closed,
                        },
                    }
                }
            }
        }
    }
}
