//! The ManageSieve tokio driver: accepts connections, counts sessions (in total and per
//! client address, IPv6 per /64), runs STARTTLS, enforces the pre-auth deadline and the idle
//! timeout, and moves bytes between the socket and the [`Session`].

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::session::{Action, ConnectionInfo, Session};
use super::ManageSieveConfig;
use crate::auth::slots::Slots;
use crate::store::MailStore;

const READ_CHUNK_BYTES: usize = 16 * 1024;
const ACCEPT_ERROR_BACKOFF_MS: u64 = 100;
/// Sessions get this long to finish at shutdown.
const SHUTDOWN_GRACE_SECS: u64 = 5;

/// Serves ManageSieve on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ManageSieveConfig>,
    store: MailStore,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let loopback = listener.local_addr()?.ip().is_loopback();
    let slots = Arc::new(Slots::default());
    let mut sessions = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "managesieve accept failed");
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
            tracing::info!(%peer, "managesieve connection refused: too many sessions");
            sessions.spawn(async move {
                let mut tcp = tcp;
                let _ = tcp.write_all(b"BYE \"Too many connections\"\r\n").await;
            });
            continue;
        };
        let conn = ConnectionInfo {
            client: peer.ip(),
            secure: false,
            loopback,
        };
        let session = Session::new(store.clone(), Arc::clone(&config), conn);
        let acceptor = acceptor.clone();
        let config = Arc::clone(&config);
        let shutdown = shutdown.clone();
        sessions.spawn(
            async move {
                run(tcp, session, acceptor, &config, &shutdown).await;
                drop(slot);
            }
            .instrument(tracing::info_span!("managesieve", %peer)),
        );
    }
    let drained = tokio::time::timeout(Duration::from_secs(SHUTDOWN_GRACE_SECS), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        sessions.abort_all();
    }
    Ok(())
}

async fn run(
    tcp: TcpStream,
    mut session: Session,
    acceptor: TlsAcceptor,
    config: &ManageSieveConfig,
    shutdown: &CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let preauth_deadline = Instant::now() + Duration::from_secs(config.preauth_timeout_secs);
    let mut out = Vec::new();
    session.greeting(&mut out);
    let mut tcp = tcp;
    if drive(
        &mut tcp,
        &mut session,
        out,
        config,
        preauth_deadline,
        shutdown,
    )
    .await
        != Action::StartTls
    {
        return;
    }
    match tokio::time::timeout_at(preauth_deadline, acceptor.accept(tcp)).await {
        Ok(Ok(mut tls)) => {
            let mut out = Vec::new();
            session.tls_established(&mut out);
            drive(
                &mut tls,
                &mut session,
                out,
                config,
                preauth_deadline,
                shutdown,
            )
            .await;
        }
        Ok(Err(error)) => tracing::info!(%error, "managesieve starttls handshake failed"),
        Err(_) => tracing::info!("managesieve starttls handshake timed out"),
    }
}

/// Runs the session over `stream` until it closes (`Close`) or asks for TLS (`StartTls`).
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    session: &mut Session,
    mut out: Vec<u8>,
    config: &ManageSieveConfig,
    preauth_deadline: Instant,
    shutdown: &CancellationToken,
) -> Action {
    let idle = Duration::from_secs(config.idle_timeout_secs);
    let mut buffer = vec![0u8; READ_CHUNK_BYTES];
    let mut action = Action::Continue;
    loop {
        let wait_until = if session.is_authenticated() {
            Instant::now() + idle
        } else {
            preauth_deadline
        };
        if !out.is_empty() {
            let written = tokio::time::timeout_at(wait_until, async {
                stream.write_all(&out).await?;
                stream.flush().await
            })
            .await;
            out.clear();
            if !matches!(written, Ok(Ok(()))) {
                return Action::Close;
            }
        }
        match action {
            Action::Continue => {}
            Action::StartTls => return Action::StartTls,
            Action::Close => {
                let _ = stream.shutdown().await;
                return Action::Close;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                session.shutdown(&mut out);
                action = Action::Close;
            }
            _ = tokio::time::sleep_until(wait_until) => {
                session.timed_out(&mut out);
                action = Action::Close;
            }
            read = stream.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return Action::Close,
                Ok(n) => action = session.handle_input(&buffer[..n], &mut out).await,
            },
        }
    }
}
