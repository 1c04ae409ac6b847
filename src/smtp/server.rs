//! The tokio driver around [`super::session::Session`]: accepts connections, enforces the
//! session limits, moves bytes between the socket and the session, performs its actions
//! (TLS handshake, password check, delivery, close) and shuts down gracefully. It holds no
//! protocol logic. The same driver serves the MX and the submission listeners
//! ([`ListenerKind`]); on [`ListenerKind::Submissions`] it runs the TLS handshake first.

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

use super::limits::Limiter;
use super::session::{Action, Input, Output, Recipients, Session, SessionParams};
use super::{ListenerKind, SmtpConfig};
use crate::filter::Disposition;
use crate::store::{AccountId, Delivery, DeliveryReceipt, MailStore, RecipientCheck, StoreError};

/// Bytes read from the socket at once; also the most unprocessed input a session holds while
/// a delivery is outstanding.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Pause after a failed accept (for example out of file descriptors), so the loop does not
/// spin while the condition lasts.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// What the driver needs from the store: recipient checks and delivery. [`MailStore`] is the
/// one implementation in a node; tests of the driver use a fake.
pub trait Backend: Recipients + Clone + Send + Sync + 'static {
    /// Stores the message; returns only once it is committed.
    fn deliver(
        &self,
        delivery: Delivery,
    ) -> impl std::future::Future<Output = Result<DeliveryReceipt, StoreError>> + Send;

    /// Stores a message from an authenticated `submitter`: foreign recipients are queued
    /// for delivery, the message is DKIM-signed. The default, for MX-only backends, stores it
    /// like [`Backend::deliver`].
    fn deliver_submitted(
        &self,
        delivery: Delivery,
        _submitter: AccountId,
    ) -> impl std::future::Future<Output = Result<DeliveryReceipt, StoreError>> + Send {
        self.deliver(delivery)
    }

    /// Checks a login (submission AUTH): the account, or None for wrong credentials. The
    /// default, for MX-only backends, accepts nobody.
    /// `Err(Throttled)`: refused before any check (too many recent failures from this client
    /// or for this login).
    fn authenticate(
        &self,
        _client: IpAddr,
        _username: &str,
        _password: &str,
    ) -> impl std::future::Future<Output = Result<Option<AccountId>, crate::auth::Throttled>> + Send
    {
        std::future::ready(Ok(None))
    }

    /// The SPF/DKIM/DMARC checks of the MX listener, when configured. The default: none.
    fn inbound_checks(&self) -> Option<Arc<crate::filter::InboundAuth>> {
        None
    }

    /// Spam scoring (`[spam]`) of an unauthenticated MX delivery, after the inbound checks
    /// (`auth`: their summary); may add header fields to `delivery`. The default: none.
    fn spam_check<'a>(
        &'a self,
        _client_ip: IpAddr,
        _helo: &'a str,
        _auth: Option<&'a str>,
        _delivery: &'a mut Delivery,
    ) -> impl std::future::Future<Output = crate::filter::spam::SpamAction> + Send + 'a {
        std::future::ready(crate::filter::spam::SpamAction::Deliver)
    }

    /// The DKIM key an ARC seal of a message to `recipients` is made with: that of the first
    /// local domain among them whose alias forwards outside and which has a key. The
    /// default, for backends that forward nothing: none.
    fn arc_seal_key(&self, _recipients: &[String]) -> Option<crate::outbound::dkim::DkimKeyRecord> {
        None
    }

    /// Greylisting after the inbound checks ([`crate::store::MailStore::greylist_after_checks`]):
    /// `Some(seconds)` to answer `451 4.7.1`. The default: nothing to do.
    fn greylist_after_checks(
        &self,
        _client: IpAddr,
        _mail_from: &str,
        _recipients: &[String],
        _dmarc_pass: bool,
    ) -> impl std::future::Future<Output = Option<u64>> + Send {
        std::future::ready(None)
    }

    /// Stores a message whose DMARC policy says quarantine: local copies go to Junk. The
    /// default, for backends without mailboxes, stores it like [`Backend::deliver`].
    fn deliver_junk(
        &self,
        delivery: Delivery,
    ) -> impl std::future::Future<Output = Result<DeliveryReceipt, StoreError>> + Send {
        self.deliver(delivery)
    }

    /// Where the part of a message past the in-memory threshold goes; None: the system's
    /// temporary folder.
    fn spool_dir(&self) -> Option<std::path::PathBuf> {
        None
    }
}

impl Recipients for MailStore {
    fn check_recipient(&self, address: &str) -> RecipientCheck {
        MailStore::check_recipient(self, address)
    }

    fn sender_addresses(&self, account: AccountId) -> Vec<String> {
        MailStore::sender_addresses(self, account)
    }

    fn over_quota(&self, address: &str, size: u64) -> bool {
        MailStore::recipient_over_quota(self, address, size)
    }

    fn greylist(&self, client: IpAddr, mail_from: &str, recipient: &str) -> Option<u64> {
        match self.greylist_check(client, mail_from, recipient) {
            crate::store::GreylistVerdict::Pass => None,
            crate::store::GreylistVerdict::Defer { retry_in_secs } => Some(retry_in_secs),
        }
    }
}

/// [`MailStore::accept`], logging where the remote part went.
async fn accept_logged(
    store: &MailStore,
    delivery: Delivery,
    submitter: Option<AccountId>,
) -> Result<DeliveryReceipt, StoreError> {
    let accepted = store.accept(delivery, submitter).await?;
    if let Some(queue_id) = accepted.queued {
        tracing::info!(
            queue_id,
            n_remote = accepted.n_remote,
            n_local = accepted.receipt.delivered.len(),
            dkim_signed = accepted.dkim_signed,
            "queued for outbound delivery"
        );
    }
    Ok(accepted.receipt)
}

impl Backend for MailStore {
    /// Local recipients, and local aliases forwarding outside (queued, SRS sender).
    fn deliver(
        &self,
        delivery: Delivery,
    ) -> impl std::future::Future<Output = Result<DeliveryReceipt, StoreError>> + Send {
        accept_logged(self, delivery, None)
    }

    fn deliver_submitted(
        &self,
        delivery: Delivery,
        submitter: AccountId,
    ) -> impl std::future::Future<Output = Result<DeliveryReceipt, StoreError>> + Send {
        accept_logged(self, delivery, Some(submitter))
    }

    fn authenticate(
        &self,
        client: IpAddr,
        username: &str,
        password: &str,
    ) -> impl std::future::Future<Output = Result<Option<AccountId>, crate::auth::Throttled>> + Send
    {
        MailStore::authenticate_from(self, client, username, password)
    }

    fn spool_dir(&self) -> Option<std::path::PathBuf> {
        Some(MailStore::spool_dir(self))
    }

    fn inbound_checks(&self) -> Option<Arc<crate::filter::InboundAuth>> {
        self.filter_settings().inbound.clone()
    }

    fn arc_seal_key(&self, recipients: &[String]) -> Option<crate::outbound::dkim::DkimKeyRecord> {
        MailStore::arc_seal_key(self, recipients)
    }

    async fn greylist_after_checks(
        &self,
        client: IpAddr,
        mail_from: &str,
        recipients: &[String],
        dmarc_pass: bool,
    ) -> Option<u64> {
        MailStore::greylist_after_checks(self, client, mail_from, recipients, dmarc_pass).await
    }

    fn deliver_junk(
        &self,
        delivery: Delivery,
    ) -> impl std::future::Future<Output = Result<DeliveryReceipt, StoreError>> + Send {
        MailStore::accept_quarantined(self, delivery)
    }

    async fn spam_check<'a>(
        &'a self,
        client_ip: IpAddr,
        helo: &'a str,
        auth: Option<&'a str>,
        delivery: &'a mut Delivery,
    ) -> crate::filter::spam::SpamAction {
        match self.filter_settings().spam.clone() {
            Some(spam) => {
                spam.filter_delivery(self, client_ip, helo, auth, delivery)
                    .await
            }
            None => crate::filter::spam::SpamAction::Deliver,
        }
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
    serve_backend(listener, config, hostname, store, tls, shutdown).await
}

/// Serves submission ([`ListenerKind::Submission`], STARTTLS, or
/// [`ListenerKind::Submissions`], implicit TLS) on `listener` until `shutdown` is cancelled,
/// like [`serve`]. `limits` is shared by all the node's submission listeners, so that failed
/// logins and messages are counted across ports.
#[allow(clippy::too_many_arguments)]
pub async fn serve_submission(
    listener: TcpListener,
    kind: ListenerKind,
    config: Arc<SmtpConfig>,
    hostname: Arc<str>,
    store: MailStore,
    tls: Arc<rustls::ServerConfig>,
    limits: Arc<Limiter>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_listener(
        listener, kind, config, hostname, store, tls, limits, shutdown,
    )
    .await
}

/// [`serve`] over any [`Backend`].
pub async fn serve_backend<B: Backend>(
    listener: TcpListener,
    config: Arc<SmtpConfig>,
    hostname: Arc<str>,
    store: B,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = Arc::new(Limiter::new());
    serve_listener(
        listener,
        ListenerKind::Mx,
        config,
        hostname,
        store,
        tls,
        limits,
        shutdown,
    )
    .await
}

/// Any [`ListenerKind`] over any [`Backend`].
#[allow(clippy::too_many_arguments)]
pub async fn serve_listener<B: Backend>(
    listener: TcpListener,
    kind: ListenerKind,
    config: Arc<SmtpConfig>,
    hostname: Arc<str>,
    store: B,
    tls: Arc<rustls::ServerConfig>,
    auth_limits: Arc<Limiter>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let limits = Arc::new(SessionLimits::default());
    let mut sessions = JoinSet::new();
    tracing::info!(address = ?listener.local_addr().ok(), listener = kind.name(), "smtp listening");
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
                            kind,
                            limits: auth_limits.clone(),
                        };
                        sessions.spawn(async move {
                            run_session(stream, peer, context).await;
                            drop(permit);
                        });
                    }
                    None => {
                        tracing::info!(client = %peer.ip(), "smtp connection refused: too many sessions");
                        let reply = format!("421 4.7.0 {hostname} Error: too many connections, try again later\r\n");
                        // The socket's send buffer is empty: this write does not block, and a
                        // flood of refused connections costs no task each.
                        let _ = stream.try_write(reply.as_bytes());
                        drop(stream);
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
        // IPv6 clients count per /64: one subscriber's block must not reach the global cap.
        let ip = super::limits::client_key(ip);
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

struct SessionContext<B> {
    config: Arc<SmtpConfig>,
    hostname: Arc<str>,
    store: B,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
    kind: ListenerKind,
    limits: Arc<Limiter>,
}

/// How a run of [`drive`] over one stream ended.
enum DriveEnd {
    Closed,
    StartTls,
}

async fn run_session<B: Backend>(stream: TcpStream, peer: SocketAddr, context: SessionContext<B>) {
    let span = tracing::info_span!("smtp_session", client = %peer, listener = context.kind.name());
    async move {
        tracing::debug!("smtp session opened");
        let params = SessionParams {
            config: context.config.clone(),
            hostname: context.hostname.clone(),
            client_ip: peer.ip(),
            tls_available: true,
            id_seed: rand::random(),
            kind: context.kind,
            limits: context.limits.clone(),
            spool_dir: context.store.spool_dir(),
        };
        let mut session = Session::new(params, context.store.clone());
        if context.kind == ListenerKind::Submissions {
            // Implicit TLS (RFC 8314): the handshake comes before the greeting.
            let handshake_timeout = Duration::from_secs(context.config.command_timeout_secs);
            match tokio::time::timeout(handshake_timeout, context.acceptor.accept(stream)).await {
                Ok(Ok(mut tls)) => {
                    let greeting = session.step(Input::Connected, SystemTime::now());
                    if let Err(error) = drive(&mut tls, &mut session, greeting, &context).await {
                        tracing::debug!(%error, "smtp connection error");
                    }
                }
                Ok(Err(error)) => tracing::info!(%error, "smtp tls handshake failed"),
                Err(_) => tracing::info!("smtp tls handshake timed out"),
            }
            tracing::debug!("smtp session closed");
            return;
        }
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
async fn drive<S, B>(
    stream: &mut S,
    session: &mut Session<B>,
    first_output: Output,
    context: &SessionContext<B>,
) -> std::io::Result<DriveEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Backend,
{
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let write_timeout = Duration::from_secs(context.config.command_timeout_secs);
    let mut output = first_output;
    let mut shutdown_told = false;
    loop {
        if !output.delay.is_zero() {
            // Failed logins are answered late (bounded by the session).
            tokio::time::sleep(output.delay).await;
        }
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
                    let mut pending = *pending;
                    // Unauthenticated mail on the MX listener: SPF, DKIM, DMARC first, then
                    // spam scoring (unless already refused).
                    let inbound = pending.submitter.is_none() && context.kind == ListenerKind::Mx;
                    let (disposition, auth) = match context.store.inbound_checks() {
                        Some(checks) if inbound => {
                            // Mail an alias forwards outside gets our ARC seal.
                            let seal_key = context.store.arc_seal_key(&pending.delivery.recipients);
                            let (disposition, summary) = checks
                                .filter_delivery(
                                    session.client_ip(),
                                    session.helo_name(),
                                    &mut pending.delivery,
                                    seal_key.as_ref(),
                                )
                                .await;
                            (disposition, Some(summary))
                        }
                        _ => (Disposition::Deliver, None),
                    };
                    // Greylisting skips sender domains that passed DMARC before, at RCPT;
                    // one that fails it now is greylisted here.
                    let disposition = match (disposition, &auth) {
                        (
                            disposition @ (Disposition::Deliver | Disposition::Junk),
                            Some(summary),
                        ) => {
                            let dmarc_pass = summary.split(' ').any(|w| w == "dmarc=pass");
                            match context
                                .store
                                .greylist_after_checks(
                                    session.client_ip(),
                                    &pending.delivery.mail_from,
                                    &pending.delivery.recipients,
                                    dmarc_pass,
                                )
                                .await
                            {
                                Some(_) => Disposition::Defer(
                                    "451 4.7.1 Error: greylisted, please try again later".into(),
                                ),
                                None => disposition,
                            }
                        }
                        (disposition, _) => disposition,
                    };
                    let disposition = match disposition {
                        Disposition::Deliver | Disposition::Junk if inbound => {
                            use crate::filter::spam::SpamAction;
                            match context
                                .store
                                .spam_check(
                                    session.client_ip(),
                                    session.helo_name(),
                                    auth.as_deref(),
                                    &mut pending.delivery,
                                )
                                .await
                            {
                                SpamAction::Deliver => disposition,
                                SpamAction::Junk => Disposition::Junk,
                                SpamAction::Reject(reply) => Disposition::Reject(reply),
                                SpamAction::Defer(reply) => Disposition::Defer(reply),
                            }
                        }
                        other => other,
                    };
                    let input = match (disposition, pending.submitter) {
                        (Disposition::Reject(reply) | Disposition::Defer(reply), _) => {
                            Input::DeliveryRefused(reply)
                        }
                        (Disposition::Junk, _) => {
                            Input::DeliveryDone(context.store.deliver_junk(pending.delivery).await)
                        }
                        (Disposition::Deliver, Some(account)) => Input::DeliveryDone(
                            context
                                .store
                                .deliver_submitted(pending.delivery, account)
                                .await,
                        ),
                        (Disposition::Deliver, None) => {
                            Input::DeliveryDone(context.store.deliver(pending.delivery).await)
                        }
                    };
                    next_output = Some(session.step(input, SystemTime::now()));
                }
                Action::Authenticate(credentials) => {
                    let result = context
                        .store
                        .authenticate(
                            session.client_ip(),
                            &credentials.username,
                            &credentials.password,
                        )
                        .await;
                    drop(credentials);
                    let input = match result {
                        Ok(account) => Input::AuthDone(account),
                        Err(crate::auth::Throttled) => Input::AuthThrottled,
                    };
                    next_output = Some(session.step(input, SystemTime::now()));
                }
            }
        }
        if let Some(next_output) = next_output {
            output = next_output;
            continue;
        }
        let read_timeout = session.read_timeout(SystemTime::now());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::test_client::Client;
    use crate::store::BlobId;
    use std::net::SocketAddr;

    /// Local users alice and bob at example.org; records deliveries; fails them when asked.
    #[derive(Clone, Default)]
    struct FakeStore {
        delivered: Arc<Mutex<Vec<Delivery>>>,
        fail: bool,
    }

    impl Recipients for FakeStore {
        fn check_recipient(&self, address: &str) -> RecipientCheck {
            match address.rsplit_once('@') {
                Some(("alice" | "bob", "example.org")) => RecipientCheck::Local,
                Some((_, "example.org")) => RecipientCheck::UnknownUser,
                _ => RecipientCheck::ForeignDomain,
            }
        }
    }

    impl Backend for FakeStore {
        async fn deliver(&self, delivery: Delivery) -> Result<DeliveryReceipt, StoreError> {
            if self.fail {
                return Err(StoreError::Unavailable("test".to_owned()));
            }
            self.delivered.lock().unwrap().push(delivery);
            Ok(DeliveryReceipt {
                blob: BlobId([0; 32]),
                delivered: Vec::new(),
            })
        }
    }

    impl FakeStore {
        fn n_delivered(&self) -> usize {
            self.delivered.lock().unwrap().len()
        }
    }

    struct Server {
        address: SocketAddr,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl Server {
        /// Cancels and waits for `serve` to return.
        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(60), self.task)
                .await
                .expect("serve returns")
                .expect("serve task")
                .expect("serve result");
        }
    }

    async fn start(config: SmtpConfig, store: FakeStore) -> Server {
        crate::tls::install_crypto_provider();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let tls = crate::tls::self_signed(&["localhost".into()]).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_backend(
            listener,
            Arc::new(config),
            Arc::from("mx.test"),
            store,
            tls,
            shutdown.clone(),
        ));
        Server {
            address,
            shutdown,
            task,
        }
    }

    #[tokio::test]
    async fn a_message_is_answered_250_only_after_the_store_took_it() {
        let store = FakeStore::default();
        let server = start(SmtpConfig::default(), store.clone()).await;
        let mut client = Client::connect(server.address).await;
        assert_eq!(client.reply().await, "220 mx.test ESMTP kermail\r\n");
        assert!(client.command("EHLO c").await.contains("250 STARTTLS\r\n"));
        let reply = client
            .send_message(
                "s@example.net",
                &["alice@example.org"],
                b"Subject: x\r\n\r\nhello\r\n",
            )
            .await;
        assert!(reply.starts_with("250 2.0.0 Ok: stored as "), "{reply}");
        assert_eq!(store.n_delivered(), 1);
        assert_eq!(client.command("QUIT").await, "221 2.0.0 Bye\r\n");
        assert_eq!(client.reply().await, "", "closed after QUIT");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_store_failure_answers_451() {
        let store = FakeStore {
            fail: true,
            ..FakeStore::default()
        };
        let server = start(SmtpConfig::default(), store.clone()).await;
        let mut client = Client::connect(server.address).await;
        client.reply().await;
        client.command("HELO c").await;
        let reply = client
            .send_message("s@example.net", &["alice@example.org"], b"x\r\n")
            .await;
        assert!(reply.starts_with("451 4.4.3 "), "{reply}");
        server.stop().await;
    }

    #[tokio::test]
    async fn starttls_upgrades_and_the_session_starts_over() {
        let store = FakeStore::default();
        let server = start(SmtpConfig::default(), store.clone()).await;
        let mut client = Client::connect(server.address).await;
        client.reply().await;
        client.command("EHLO c").await;
        assert_eq!(
            client.command("STARTTLS").await,
            "220 2.0.0 Ready to start TLS\r\n"
        );
        let mut client = client.start_tls().await.expect("tls handshake");
        assert!(client
            .command("MAIL FROM:<a@example.net>")
            .await
            .starts_with("503 5.5.1"));
        let ehlo = client.command("EHLO c").await;
        assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
        let reply = client
            .send_message("s@example.net", &["bob@example.org"], b"secret\r\n")
            .await;
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
        let body = store.delivered.lock().unwrap()[0].body.to_vec().unwrap();
        assert!(String::from_utf8_lossy(&body).contains(" with ESMTPS id "));
        server.stop().await;
    }

    #[tokio::test]
    async fn plaintext_pipelined_behind_starttls_is_never_answered() {
        let server = start(SmtpConfig::default(), FakeStore::default()).await;
        let mut client = Client::connect(server.address).await;
        client.reply().await;
        client.command("EHLO c").await;
        client.send(b"STARTTLS\r\nRSET\r\n").await;
        assert_eq!(client.reply().await, "220 2.0.0 Ready to start TLS\r\n");
        // Either the injected bytes broke the handshake, or they were dropped and the first
        // reply over TLS is the one to our EHLO.
        if let Ok(mut client) = client.start_tls().await {
            let reply = client.command("EHLO c").await;
            assert!(
                reply.is_empty() || reply.starts_with("250-mx.test\r\n"),
                "{reply}"
            );
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn sessions_beyond_the_per_ip_limit_get_421_until_one_ends() {
        let config = SmtpConfig {
            max_sessions_per_ip: 2,
            ..SmtpConfig::default()
        };
        let server = start(config, FakeStore::default()).await;
        let mut first = Client::connect(server.address).await;
        assert!(first.reply().await.starts_with("220 "));
        let mut second = Client::connect(server.address).await;
        assert!(second.reply().await.starts_with("220 "));
        let mut third = Client::connect(server.address).await;
        assert!(third.reply().await.starts_with("421 4.7.0 "));
        first.command("QUIT").await;
        assert_eq!(first.reply().await, "");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut again = Client::connect(server.address).await;
            if again.reply().await.starts_with("220 ") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the slot never came back"
            );
            tokio::task::yield_now().await;
        }
        drop(second);
        server.stop().await;
    }

    #[test]
    fn ipv6_sessions_count_per_slash_64() {
        let config = SmtpConfig {
            max_sessions_per_ip: 2,
            ..SmtpConfig::default()
        };
        let limits = Arc::new(SessionLimits::default());
        let first = limits.acquire("2001:db8:1:2::1".parse().unwrap(), &config);
        let second = limits.acquire("2001:db8:1:2::2".parse().unwrap(), &config);
        assert!(first.is_some() && second.is_some());
        assert!(limits
            .acquire("2001:db8:1:2:ffff::3".parse().unwrap(), &config)
            .is_none());
        assert!(limits
            .acquire("2001:db8:1:3::1".parse().unwrap(), &config)
            .is_some());
        drop(first);
        assert!(limits
            .acquire("2001:db8:1:2::9".parse().unwrap(), &config)
            .is_some());
    }

    #[tokio::test]
    async fn an_idle_client_is_closed_after_the_command_timeout() {
        let config = SmtpConfig {
            command_timeout_secs: 1,
            ..SmtpConfig::default()
        };
        let server = start(config, FakeStore::default()).await;
        let mut client = Client::connect(server.address).await;
        client.reply().await;
        assert_eq!(
            client.reply().await,
            "421 4.4.2 mx.test Error: timeout exceeded\r\n"
        );
        assert_eq!(client.reply().await, "");
        server.stop().await;
    }

    #[tokio::test]
    async fn sessions_beyond_the_total_limit_get_421() {
        let config = SmtpConfig {
            max_sessions: 1,
            ..SmtpConfig::default()
        };
        let server = start(config, FakeStore::default()).await;
        let mut first = Client::connect(server.address).await;
        assert!(first.reply().await.starts_with("220 "));
        let mut second = Client::connect(server.address).await;
        assert_eq!(
            second.reply().await,
            "421 4.7.0 mx.test Error: too many connections, try again later\r\n"
        );
        assert_eq!(second.reply().await, "", "closed after the refusal");
        drop(first);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_client_silent_mid_data_is_closed_after_the_data_timeout_and_nothing_is_stored() {
        let config = SmtpConfig {
            data_timeout_secs: 1,
            ..SmtpConfig::default()
        };
        let store = FakeStore::default();
        let server = start(config, store.clone()).await;
        let mut client = Client::connect(server.address).await;
        client.reply().await;
        client.command("HELO c").await;
        client.command("MAIL FROM:<a@example.net>").await;
        client.command("RCPT TO:<alice@example.org>").await;
        assert!(client.command("DATA").await.starts_with("354"));
        client.send(b"Subject: slow\r\n").await;
        assert_eq!(
            client.reply().await,
            "421 4.4.2 mx.test Error: timeout exceeded\r\n"
        );
        assert_eq!(client.reply().await, "");
        server.stop().await;
        assert_eq!(store.n_delivered(), 0);
    }

    #[tokio::test]
    async fn a_client_vanishing_mid_data_stores_nothing() {
        let store = FakeStore::default();
        let server = start(SmtpConfig::default(), store.clone()).await;
        let mut client = Client::connect(server.address).await;
        client.reply().await;
        client.command("HELO c").await;
        client.command("MAIL FROM:<a@example.net>").await;
        client.command("RCPT TO:<alice@example.org>").await;
        assert!(client.command("DATA").await.starts_with("354"));
        client.send(b"Subject: half\r\n\r\nhalf a mess").await;
        drop(client);
        server.stop().await;
        assert_eq!(store.n_delivered(), 0);
    }

    #[tokio::test]
    async fn shutdown_lets_the_message_in_flight_finish_then_refuses_connections() {
        let store = FakeStore::default();
        let server = start(SmtpConfig::default(), store.clone()).await;
        let mut idle = Client::connect(server.address).await;
        idle.reply().await;
        let mut busy = Client::connect(server.address).await;
        busy.reply().await;
        busy.command("HELO c").await;
        busy.command("MAIL FROM:<a@example.net>").await;
        busy.command("RCPT TO:<alice@example.org>").await;
        assert!(busy.command("DATA").await.starts_with("354"));
        busy.send(b"Subject: in flight\r\n").await;
        server.shutdown.cancel();
        assert_eq!(
            idle.reply().await,
            "421 4.3.2 mx.test Service shutting down\r\n"
        );
        busy.send(b"\r\nbody\r\n.\r\n").await;
        assert!(busy.reply().await.starts_with("250 2.0.0 Ok: stored as "));
        assert_eq!(
            busy.reply().await,
            "421 4.3.2 mx.test Service shutting down\r\n"
        );
        let address = server.address;
        server.stop().await;
        assert_eq!(store.n_delivered(), 1);
        assert!(
            TcpStream::connect(address).await.is_err(),
            "listener closed"
        );
    }

    #[tokio::test]
    async fn fifty_concurrent_sessions_from_one_address_are_served() {
        let store = FakeStore::default();
        let server = start(SmtpConfig::default(), store.clone()).await;
        let mut tasks = JoinSet::new();
        for session in 0..50 {
            let address = server.address;
            tasks.spawn(async move {
                let mut client = Client::connect(address).await;
                assert!(client.reply().await.starts_with("220 "));
                client.command("EHLO c").await;
                for message in 0..4 {
                    let body = format!("Subject: {session}/{message}\r\n\r\nx\r\n");
                    let reply = client
                        .send_message("s@example.net", &["bob@example.org"], body.as_bytes())
                        .await;
                    assert!(reply.starts_with("250 2.0.0"), "{reply}");
                }
                client.command("QUIT").await;
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
        assert_eq!(store.n_delivered(), 200);
        server.stop().await;
    }
}

/// The driver over the real store (`MailStore::open_local`), end to end.
#[cfg(test)]
mod store_tests {
    use super::*;
    use crate::smtp::test_client::Client;
    use crate::store::AccountId;
    use std::net::SocketAddr;

    const PASSWORD: &str = "correct horse battery";

    struct Node {
        address: SocketAddr,
        store: MailStore,
        alice: AccountId,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
        _data: tempfile::TempDir,
    }

    impl Node {
        async fn start(config: SmtpConfig) -> Node {
            crate::tls::install_crypto_provider();
            let data = tempfile::tempdir().unwrap();
            let store = MailStore::open_local(data.path()).unwrap();
            store.add_domain("example.org").await.unwrap();
            let alice = store
                .add_account("alice@example.org", PASSWORD)
                .await
                .unwrap();
            store
                .add_account("bob@example.org", PASSWORD)
                .await
                .unwrap();
            store
                .add_alias("info@example.org", "alice@example.org")
                .await
                .unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let tls = crate::tls::self_signed(&["localhost".into()]).unwrap();
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(serve(
                listener,
                Arc::new(config),
                Arc::from("mx.example.org"),
                store.clone(),
                tls,
                shutdown.clone(),
            ));
            Node {
                address,
                store,
                alice,
                shutdown,
                task,
                _data: data,
            }
        }

        async fn client(&self) -> Client<TcpStream> {
            let mut client = Client::connect(self.address).await;
            assert!(client.reply().await.starts_with("220 "));
            assert!(client
                .command("EHLO client.example.net")
                .await
                .starts_with("250-"));
            client
        }

        async fn inbox(&self, account: AccountId) -> Vec<Vec<u8>> {
            let view = self.store.mailbox_by_name(account, "INBOX").expect("INBOX");
            let mut bodies = Vec::new();
            for message in view.messages.iter() {
                bodies.push(
                    self.store
                        .body(message.blob)
                        .await
                        .unwrap()
                        .as_ref()
                        .clone(),
                );
            }
            bodies
        }

        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(60), self.task)
                .await
                .expect("serve returns")
                .expect("serve task")
                .expect("serve result");
        }
    }

    /// The stored message is the sent one with exactly Return-Path and Received in front.
    fn assert_stored_unchanged(stored: &[u8], sent: &[u8], mail_from: &str) {
        assert!(
            stored.ends_with(sent),
            "{}",
            String::from_utf8_lossy(stored)
        );
        let trace = String::from_utf8_lossy(&stored[..stored.len() - sent.len()]).into_owned();
        let expected_start = format!("Return-Path: <{mail_from}>\r\nReceived: from client.example.net ([127.0.0.1])\r\n\tby mx.example.org (kermail) with ");
        assert!(trace.starts_with(&expected_start), "{trace}");
        let continuation_lines = trace.lines().skip(2).all(|line| line.starts_with('\t'));
        assert!(continuation_lines, "{trace}");
    }

    const MESSAGE: &[u8] = b"From: Sender <s@example.net>\r\nTo: alice@example.org\r\n\
Subject: byte exact\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\r\nLine one\r\n.leading dot\r\n..two dots\r\n\
caf\xc3\xa9 8-bit\r\n\r\n  indented\ttab\r\nlast line\r\n";

    #[tokio::test]
    async fn a_delivered_message_is_in_inbox_byte_exact_apart_from_trace_headers() {
        let node = Node::start(SmtpConfig::default()).await;
        let mut client = node.client().await;
        let reply = client
            .send_message("s@example.net", &["alice@example.org"], MESSAGE)
            .await;
        assert!(reply.starts_with("250 2.0.0 Ok: stored as "), "{reply}");
        let inbox = node.inbox(node.alice).await;
        assert_eq!(inbox.len(), 1);
        assert_stored_unchanged(&inbox[0], MESSAGE, "s@example.net");
        let view = node.store.mailbox_by_name(node.alice, "INBOX").unwrap();
        assert_eq!(view.messages[0].size as usize, inbox[0].len());
        // An alias delivers to its target.
        let reply = client
            .send_message("", &["info@example.org"], b"Subject: alias\r\n\r\nx\r\n")
            .await;
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
        assert_eq!(node.inbox(node.alice).await.len(), 2);
        client.command("QUIT").await;
        node.stop().await;
    }

    #[tokio::test]
    async fn bad_input_gets_the_right_reply_and_stores_nothing() {
        let config = SmtpConfig {
            max_message_size_bytes: 1000,
            max_errors_per_session: 5,
            ..SmtpConfig::default()
        };
        let node = Node::start(config).await;
        let mut client = node.client().await;
        assert!(client
            .command("MAIL FROM:<s@example.net>")
            .await
            .starts_with("250"));
        let reply = client.command("RCPT TO:<nobody@example.org>").await;
        assert!(reply.starts_with("550 5.1.1 "), "{reply}");
        let reply = client.command("RCPT TO:<victim@gmail.example>").await;
        assert!(reply.starts_with("550 5.7.1 "), "{reply}");
        assert!(reply.contains("relaying denied"), "{reply}");
        let reply = client.command("DATA").await;
        assert!(reply.starts_with("554 5.5.1"), "{reply}");
        assert!(client.command("RSET").await.starts_with("250"));

        // Oversize, declared and undeclared.
        let reply = client.command("MAIL FROM:<s@example.net> SIZE=1001").await;
        assert!(reply.starts_with("552 5.3.4"), "{reply}");
        let big = format!("Subject: big\r\n\r\n{}\r\n", "z".repeat(2000));
        let mut big_client = node.client().await;
        let reply = big_client
            .send_message("s@example.net", &["alice@example.org"], big.as_bytes())
            .await;
        assert!(reply.starts_with("552 5.3.4"), "{reply}");

        // A 10,000-byte command line.
        let mut long_client = node.client().await;
        let reply = long_client
            .command(&format!("MAIL FROM:<{}@example.net>", "a".repeat(10_000)))
            .await;
        assert_eq!(reply, "500 5.5.2 Error: line too long\r\n");
        assert!(long_client.command("NOOP").await.starts_with("250"));

        // Binary garbage until the error limit closes the session.
        let mut garbage_client = node.client().await;
        let garbage: Vec<u8> = (0..4000u32).map(|index| (index * 7 % 256) as u8).collect();
        garbage_client.send(&garbage).await;
        garbage_client
            .send(b"\r\n\xff\xfe\r\n\x00\r\n\x80\r\n\x1b\r\n\x07\r\n")
            .await;
        let mut replies = String::new();
        loop {
            let reply = garbage_client.reply().await;
            if reply.is_empty() {
                break;
            }
            replies.push_str(&reply);
        }
        assert!(replies.starts_with("500 5.5.2"), "{replies}");
        assert!(
            replies.ends_with("421 4.7.0 mx.example.org Error: too many errors\r\n"),
            "{replies}"
        );

        // A client that vanishes mid-DATA.
        let mut vanishing = node.client().await;
        vanishing.command("MAIL FROM:<s@example.net>").await;
        vanishing.command("RCPT TO:<alice@example.org>").await;
        assert!(vanishing.command("DATA").await.starts_with("354"));
        vanishing.send(b"Subject: half\r\n\r\nhalf of it").await;
        drop(vanishing);

        drop((client, big_client, long_client, garbage_client));
        let alice = node.alice;
        let store = node.store.clone();
        node.stop().await;
        assert!(store
            .mailbox_by_name(alice, "INBOX")
            .unwrap()
            .messages
            .is_empty());
        assert_eq!(store.stats().messages, 0);
    }

    #[tokio::test]
    async fn bdat_and_starttls_deliveries_are_stored() {
        let node = Node::start(SmtpConfig::default()).await;
        let mut client = node.client().await;
        client
            .command("MAIL FROM:<s@example.net> BODY=8BITMIME")
            .await;
        client.command("RCPT TO:<alice@example.org>").await;
        let (first, last) = MESSAGE.split_at(40);
        client
            .send(format!("BDAT {}\r\n", first.len()).as_bytes())
            .await;
        client.send(first).await;
        assert!(client.reply().await.starts_with("250 2.0.0 Ok: 40 octets"));
        client
            .send(format!("BDAT {} LAST\r\n", last.len()).as_bytes())
            .await;
        client.send(last).await;
        let reply = client.reply().await;
        assert!(reply.starts_with("250 2.0.0 Ok: stored as "), "{reply}");

        assert!(client.command("STARTTLS").await.starts_with("220 "));
        let mut client = client.start_tls().await.expect("tls");
        client.command("EHLO client.example.net").await;
        let reply = client
            .send_message("s@example.net", &["alice@example.org"], MESSAGE)
            .await;
        assert!(reply.starts_with("250 2.0.0"), "{reply}");

        let inbox = node.inbox(node.alice).await;
        assert_eq!(inbox.len(), 2);
        assert_stored_unchanged(&inbox[0], MESSAGE, "s@example.net");
        assert_stored_unchanged(&inbox[1], MESSAGE, "s@example.net");
        assert!(String::from_utf8_lossy(&inbox[1]).contains(" with ESMTPS id "));
        node.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn twenty_sessions_of_fifty_messages_are_all_stored_once_with_dense_uids() {
        const N_SESSIONS: usize = 20;
        const N_MESSAGES: usize = 50;
        let node = Node::start(SmtpConfig::default()).await;
        let started = std::time::Instant::now();
        let mut tasks = JoinSet::new();
        for session in 0..N_SESSIONS {
            let address = node.address;
            tasks.spawn(async move {
                let mut client = Client::connect(address).await;
                client.reply().await;
                client.command("EHLO client.example.net").await;
                for message in 0..N_MESSAGES {
                    let body = format!(
                        "Subject: {session}/{message}\r\nMessage-ID: <{session}.{message}@t>\r\n\r\n{}\r\n",
                        "b".repeat(4000)
                    );
                    let reply = client
                        .send_message("s@example.net", &["alice@example.org"], body.as_bytes())
                        .await;
                    assert!(reply.starts_with("250 2.0.0"), "{reply}");
                }
                client.command("QUIT").await;
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
        let elapsed = started.elapsed();
        let n_total = N_SESSIONS * N_MESSAGES;
        println!(
            "smtp into open_local store: {n_total} messages of ~4 KB over {N_SESSIONS} sessions in {:.2} s ({:.0} msg/s)",
            elapsed.as_secs_f64(),
            n_total as f64 / elapsed.as_secs_f64()
        );
        let view = node.store.mailbox_by_name(node.alice, "INBOX").unwrap();
        let uids: Vec<u32> = view.messages.iter().map(|message| message.uid).collect();
        let expected: Vec<u32> = (1..=n_total as u32).collect();
        assert_eq!(uids, expected, "UIDs unique and dense");
        let mut subjects = std::collections::BTreeSet::new();
        for message in view.messages.iter() {
            let body = node.store.body(message.blob).await.unwrap();
            let text = String::from_utf8_lossy(&body);
            let subject = text
                .lines()
                .find_map(|line| line.strip_prefix("Subject: "))
                .unwrap()
                .to_owned();
            assert!(subjects.insert(subject), "each message stored once");
        }
        assert_eq!(subjects.len(), n_total);
        node.stop().await;
    }
}

/// Submission end to end: real sockets, the real store (`MailStore::open_local`), the MX and
/// both submission listeners of one node sharing one limiter.
#[cfg(test)]
mod submission_tests {
    use super::*;
    use crate::smtp::test_client::Client;
    use crate::store::AccountId;
    use base64::Engine as _;

    const PASSWORD: &str = "correct horse battery";

    struct Node {
        mx: SocketAddr,
        submission: SocketAddr,
        submissions: SocketAddr,
        store: MailStore,
        alice: AccountId,
        bob: AccountId,
        shutdown: CancellationToken,
        tasks: JoinSet<std::io::Result<()>>,
        _data: tempfile::TempDir,
    }

    impl Node {
        async fn start(config: SmtpConfig) -> Node {
            crate::tls::install_crypto_provider();
            let data = tempfile::tempdir().unwrap();
            let store = MailStore::open_local(data.path()).unwrap();
            store.add_domain("example.org").await.unwrap();
            let alice = store
                .add_account("alice@example.org", PASSWORD)
                .await
                .unwrap();
            let bob = store
                .add_account("bob@example.org", PASSWORD)
                .await
                .unwrap();
            store
                .add_alias("info@example.org", "alice@example.org")
                .await
                .unwrap();
            store
                .add_alias("sales@example.org", "bob@example.org")
                .await
                .unwrap();
            let tls = crate::tls::self_signed(&["localhost".into()]).unwrap();
            let config = Arc::new(config);
            let hostname: Arc<str> = Arc::from("mx.example.org");
            let shutdown = CancellationToken::new();
            let limits = Arc::new(Limiter::new());
            let mut tasks = JoinSet::new();
            let mut addresses = Vec::new();
            for kind in [
                ListenerKind::Mx,
                ListenerKind::Submission,
                ListenerKind::Submissions,
            ] {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                addresses.push(listener.local_addr().unwrap());
                tasks.spawn(serve_listener(
                    listener,
                    kind,
                    config.clone(),
                    hostname.clone(),
                    store.clone(),
                    tls.clone(),
                    limits.clone(),
                    shutdown.clone(),
                ));
            }
            Node {
                mx: addresses[0],
                submission: addresses[1],
                submissions: addresses[2],
                store,
                alice,
                bob,
                shutdown,
                tasks,
                _data: data,
            }
        }

        /// A session on port 587 after greeting, EHLO and STARTTLS, not authenticated.
        async fn submission_tls(&self) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
            let mut client = Client::connect(self.submission).await;
            assert!(client.reply().await.starts_with("220 "));
            let ehlo = client.command("EHLO client.example.net").await;
            assert!(ehlo.contains("250 STARTTLS\r\n"), "{ehlo}");
            assert!(!ehlo.contains("AUTH"), "{ehlo}");
            assert!(client.command("STARTTLS").await.starts_with("220 "));
            let mut client = client.start_tls().await.expect("tls");
            let ehlo = client.command("EHLO client.example.net").await;
            assert!(ehlo.contains("250 AUTH PLAIN LOGIN\r\n"), "{ehlo}");
            client
        }

        /// A session on port 465 (implicit TLS) after greeting and EHLO.
        async fn submissions(&self) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
            let client = Client::connect(self.submissions).await;
            let mut client = client.start_tls().await.expect("implicit tls");
            assert!(client.reply().await.starts_with("220 mx.example.org "));
            let ehlo = client.command("EHLO client.example.net").await;
            assert!(ehlo.contains("250 AUTH PLAIN LOGIN\r\n"), "{ehlo}");
            client
        }

        async fn inbox(&self, account: AccountId) -> Vec<String> {
            let view = self.store.mailbox_by_name(account, "INBOX").expect("INBOX");
            let mut bodies = Vec::new();
            for message in view.messages.iter() {
                let body = self.store.body(message.blob).await.unwrap();
                bodies.push(String::from_utf8_lossy(&body).into_owned());
            }
            bodies
        }

        async fn stop(mut self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(60), async {
                while let Some(result) = self.tasks.join_next().await {
                    result.expect("serve task").expect("serve result");
                }
            })
            .await
            .expect("serve returns");
        }
    }

    fn plain(user: &str, password: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
    }

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    fn quick_failures() -> SmtpConfig {
        SmtpConfig {
            auth_failure_delay_ms: 0,
            ..SmtpConfig::default()
        }
    }

    #[tokio::test]
    async fn an_authenticated_message_over_starttls_reaches_the_local_inbox() {
        let node = Node::start(SmtpConfig::default()).await;
        let mut client = Client::connect(node.submission).await;
        client.reply().await;
        client.command("EHLO c").await;
        let reply = client
            .command(&format!(
                "AUTH PLAIN {}",
                plain("alice@example.org", PASSWORD)
            ))
            .await;
        assert_eq!(reply, "530 5.7.0 Must issue a STARTTLS command first\r\n");
        drop(client);

        let mut client = node.submission_tls().await;
        let reply = client
            .command(&format!(
                "AUTH PLAIN {}",
                plain("alice@example.org", PASSWORD)
            ))
            .await;
        assert_eq!(reply, "235 2.7.0 Authentication successful\r\n");
        let message = b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\n\
Subject: submitted\r\n\r\nhello bob\r\n";
        let reply = client
            .send_message("alice@example.org", &["bob@example.org"], message)
            .await;
        assert!(reply.starts_with("250 2.0.0 Ok: stored as "), "{reply}");
        // As her alias, to herself through the alias of bob's.
        let message = b"From: info@example.org\r\nSubject: as alias\r\n\r\nx\r\n";
        let reply = client
            .send_message("info@example.org", &["sales@example.org"], message)
            .await;
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
        client.command("QUIT").await;

        let inbox = node.inbox(node.bob).await;
        assert_eq!(inbox.len(), 2);
        assert!(inbox[0].starts_with("Return-Path: <alice@example.org>\r\nReceived: from client.example.net ([127.0.0.1])\r\n\tby mx.example.org (kermail) with ESMTPSA id "), "{}", inbox[0]);
        assert!(inbox[0].ends_with("Subject: submitted\r\n\r\nhello bob\r\n"));
        assert!(node.inbox(node.alice).await.is_empty());
        node.stop().await;
    }

    #[tokio::test]
    async fn auth_login_over_implicit_tls_and_a_wrong_password() {
        let node = Node::start(quick_failures()).await;
        let mut client = node.submissions().await;
        assert_eq!(
            client
                .command(&format!(
                    "AUTH PLAIN {}",
                    plain("alice@example.org", "wrong password")
                ))
                .await,
            "535 5.7.8 Error: authentication failed\r\n"
        );
        assert_eq!(client.command("AUTH LOGIN").await, "334 VXNlcm5hbWU6\r\n");
        assert_eq!(
            client.command(&b64("alice@example.org")).await,
            "334 UGFzc3dvcmQ6\r\n"
        );
        assert_eq!(
            client.command(&b64(PASSWORD)).await,
            "235 2.7.0 Authentication successful\r\n"
        );
        let reply = client
            .send_message(
                "alice@example.org",
                &["alice@example.org"],
                b"From: alice@example.org\r\n\r\nnote to self\r\n",
            )
            .await;
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
        assert_eq!(node.inbox(node.alice).await.len(), 1);
        node.stop().await;
    }

    /// The relay matrix of issue 5: every line refused, nothing stored.
    #[tokio::test]
    async fn relay_matrix_every_attempt_is_refused_and_nothing_is_stored() {
        let node = Node::start(quick_failures()).await;
        let foreign = "victim@gmail.example";

        // Unauthenticated to a foreign domain on the MX listener.
        let mut mx = Client::connect(node.mx).await;
        mx.reply().await;
        mx.command("EHLO c").await;
        assert!(mx
            .command("MAIL FROM:<alice@example.org>")
            .await
            .starts_with("250"));
        let reply = mx.command(&format!("RCPT TO:<{foreign}>")).await;
        assert_eq!(reply, format!("550 5.7.1 <{foreign}>: relaying denied\r\n"));
        assert!(mx.command("DATA").await.starts_with("554 5.5.1"));

        // Unauthenticated on submission, before and after STARTTLS.
        let mut plain_587 = Client::connect(node.submission).await;
        plain_587.reply().await;
        plain_587.command("EHLO c").await;
        let reply = plain_587.command("MAIL FROM:<alice@example.org>").await;
        assert_eq!(reply, "530 5.7.0 Authentication required\r\n");
        let reply = plain_587.command(&format!("RCPT TO:<{foreign}>")).await;
        assert!(reply.starts_with("503 5.5.1"), "{reply}");
        // AUTH before TLS on 587, from loopback, with the right password.
        for command in [
            format!("AUTH PLAIN {}", plain("alice@example.org", PASSWORD)),
            "AUTH LOGIN".to_owned(),
        ] {
            let reply = plain_587.command(&command).await;
            assert_eq!(reply, "530 5.7.0 Must issue a STARTTLS command first\r\n");
        }
        let mut tls_587 = node.submission_tls().await;
        let reply = tls_587.command("MAIL FROM:<alice@example.org>").await;
        assert_eq!(reply, "530 5.7.0 Authentication required\r\n");
        let reply = tls_587.command(&format!("RCPT TO:<{foreign}>")).await;
        assert!(reply.starts_with("503 5.5.1"), "{reply}");

        // Unauthenticated on submissions (465).
        let mut tls_465 = node.submissions().await;
        let reply = tls_465.command("MAIL FROM:<alice@example.org>").await;
        assert_eq!(reply, "530 5.7.0 Authentication required\r\n");
        let reply = tls_465.command(&format!("RCPT TO:<{foreign}>")).await;
        assert!(reply.starts_with("503 5.5.1"), "{reply}");

        // Authenticated alice: as bob, as bob's alias, as a foreign address, From as bob.
        let reply = tls_465
            .command(&format!(
                "AUTH PLAIN {}",
                plain("alice@example.org", PASSWORD)
            ))
            .await;
        assert!(reply.starts_with("235 "), "{reply}");
        for sender in [
            "bob@example.org",
            "sales@example.org",
            "alice@gmail.example",
            "",
        ] {
            let reply = tls_465.command(&format!("MAIL FROM:<{sender}>")).await;
            assert!(reply.starts_with("553 5.7.1 "), "{sender}: {reply}");
        }
        let reply = tls_465
            .send_message(
                "alice@example.org",
                &["alice@example.org"],
                b"From: bob@example.org\r\n\r\nforged\r\n",
            )
            .await;
        assert!(reply.starts_with("553 5.7.1 "), "{reply}");
        drop((mx, plain_587, tls_587, tls_465));
        let store = node.store.clone();
        node.stop().await;
        assert_eq!(store.stats().messages, 0);
        assert!(store.queue_entries().is_empty());
    }

    #[tokio::test]
    async fn failed_logins_on_587_count_on_465_and_close_the_session() {
        let config = SmtpConfig {
            max_auth_failures_per_ip: 4,
            ..quick_failures()
        };
        let node = Node::start(config).await;
        let mut client = node.submission_tls().await;
        for _ in 0..2 {
            let reply = client
                .command(&format!(
                    "AUTH PLAIN {}",
                    plain("alice@example.org", "bad password")
                ))
                .await;
            assert_eq!(reply, "535 5.7.8 Error: authentication failed\r\n");
        }
        let reply = client
            .command(&format!(
                "AUTH PLAIN {}",
                plain("bob@example.org", "bad password")
            ))
            .await;
        assert_eq!(reply, "535 5.7.8 Error: authentication failed\r\n");
        assert_eq!(
            client.reply().await,
            "421 4.7.0 mx.example.org Error: too many failed authentication attempts\r\n"
        );
        assert_eq!(client.reply().await, "", "closed");

        let mut client = node.submissions().await;
        let reply = client
            .command(&format!(
                "AUTH PLAIN {}",
                plain("bob@example.org", "bad password")
            ))
            .await;
        assert!(reply.starts_with("535 "), "{reply}");
        // Four failures from 127.0.0.1 over both ports: even the right password is refused.
        let reply = client
            .command(&format!(
                "AUTH PLAIN {}",
                plain("bob@example.org", PASSWORD)
            ))
            .await;
        assert!(reply.starts_with("454 4.7.0 "), "{reply}");
        node.stop().await;
    }
}
