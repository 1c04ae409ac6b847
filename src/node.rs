//! Node wiring: the one place that builds and connects the parts.
//!
//! Start order: data folder, TLS, mail state machine, cluster (Raft, one voter on a fresh
//! folder), mail store over the cluster, listeners (bound before anything is announced), the
//! admin socket last — so a working admin socket means the node is ready. Stop order: cancel,
//! let sessions finish their transaction within the grace period, stop Raft, remove the socket.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::server::AdminContext;
use crate::config::Config;
use crate::store::{BoxFuture, MailStateMachine, MailStore, Propose, StoreError};

/// How long in-flight sessions get to finish after SIGTERM/SIGINT before they are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// File descriptors kept for everything but client sessions (Raft segments, packs, snapshot
/// files, mesh links, DNS, outbound connections, the admin socket): the session limits of the
/// listeners are lowered so that all of them together stay this far under `RLIMIT_NOFILE`.
pub const FD_RESERVE: u64 = 1024;
/// How often a failed storage is probed again in the background (bodies waiting to be
/// written), so that writes resume by themselves once space returns.
pub const STORAGE_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// How often a proposal in flight checks whether this node's storage failed meanwhile.
const STORAGE_FAILURE_POLL: Duration = Duration::from_millis(50);

/// Proposes mail commands through Raft.
struct ClusterProposer {
    cluster: kermail_cluster::Cluster,
    health: Arc<kermail_cluster::StorageHealth>,
}

impl Propose for ClusterProposer {
    fn propose(&self, command: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, StoreError>> {
        Box::pin(async move {
            let storage_failed = async {
                loop {
                    tokio::time::sleep(STORAGE_FAILURE_POLL).await;
                    if let Some(failure) = self.health.failure() {
                        return failure.reason;
                    }
                }
            };
            // A storage failure while the proposal waits (the log append is being retried)
            // answers at once: not stored as far as the client knows (the entry may still
            // commit once the disk recovers, as after a timeout).
            let proposed = tokio::select! {
                proposed = self.cluster.propose(command) => proposed,
                reason = storage_failed => return Err(StoreError::StorageFailed(reason)),
            };
            proposed.map_err(|error| match error {
                kermail_cluster::ProposeError::Unavailable(message) => {
                    StoreError::Unavailable(message)
                }
                other => StoreError::Unavailable(other.to_string()),
            })
        })
    }
}

/// Runs a backup-only member (`[node] role = "backup-store"`) until `shutdown` is cancelled:
/// the mesh, with the configured cluster nodes as its only peers, and the backup store on its
/// `bulk` channel; nothing else. It never opens a Raft log, a mail state or a body store, so
/// no backup key and no plaintext can reach it: it holds only the sealed chunks it is sent.
async fn run_backup_store(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    use kermail_cluster::mesh::{Channel, Identity, Member, Mesh};
    use kermail_cluster::raft::backup_store::{serve_beside, Store, BACKUP_STORE_DIR};
    let data_dir = config.node.data_dir.clone();
    create_private_dir(&data_dir)?;
    let key_path = config.mesh_key_path();
    let identity = Identity::load_or_create(&key_path)
        .with_context(|| format!("cannot load the mesh key {}", key_path.display()))?;
    let mut members = vec![Member {
        name: config.node.name.clone(),
        site: config.node.site.clone(),
        public_key: identity.public_key_base64(),
        addrs: config.mesh.listen.clone(),
    }];
    members.extend(config.backup_store.clients.iter().map(|c| Member {
        name: c.name.clone(),
        site: c.site.clone(),
        public_key: c.public_key.clone(),
        addrs: c.addrs.clone(),
    }));
    let mesh = Mesh::start(config.mesh.clone(), identity, members)
        .await
        .context("cannot start the mesh")?;
    let root = data_dir.join(BACKUP_STORE_DIR);
    let quota = config.backup_store.quota_bytes();
    let store = Arc::new(
        tokio::task::spawn_blocking(move || Store::open(root, quota))
            .await?
            .context("cannot open the backup store")?,
    );
    let bulk = mesh
        .incoming(Channel::Bulk)
        .context("the mesh's bulk channel is taken")?;
    // Its mesh's only peers are its clients.
    let others = serve_beside(
        bulk,
        store.clone(),
        Arc::new(|_: &str| true),
        shutdown.clone(),
    );
    // Anything else a peer sends (it should send nothing else) is answered empty at once.
    let mut refused = vec![others];
    for channel in [Channel::Control, Channel::Raft, Channel::Writes] {
        refused.extend(mesh.incoming(channel));
    }
    for mut incoming in refused {
        tokio::spawn(async move {
            while let Some(message) = incoming.recv().await {
                tracing::debug!(from = %message.from, channel = ?message.channel, "backup store: request refused");
                if let Some(responder) = message.responder {
                    let _ = responder.respond(Vec::new().into()).await;
                }
            }
        });
    }
    let socket_path = config.admin_socket_path();
    let listener = crate::admin::server::bind(&socket_path)
        .with_context(|| format!("cannot open the admin socket {}", socket_path.display()))?;
    let admin = tokio::spawn(crate::admin::server::serve_backup_store(
        listener,
        store.clone(),
        mesh.clone(),
        shutdown.clone(),
    ));
    let (used, quota) = store.usage();
    info!(
        name = %config.node.name,
        clients = config.backup_store.clients.len(),
        used,
        quota = ?quota,
        data_dir = %data_dir.display(),
        "kermail backup store ready"
    );
    shutdown.cancelled().await;
    mesh.shutdown();
    let _ = admin.await;
    let _ = std::fs::remove_file(&socket_path);
    info!("kermail backup store stopped");
    Ok(())
}

/// Runs a node until `shutdown` is cancelled (the binary cancels it on SIGTERM/SIGINT).
pub async fn run(mut config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    if config.node.role == crate::config::NodeRole::BackupStore {
        return run_backup_store(config, shutdown).await;
    }
    let data_dir = config.node.data_dir.clone();
    create_private_dir(&data_dir)?;
    let nofile = raise_nofile_limit();
    cap_sessions(&mut config, nofile);

    crate::tls::install_crypto_provider();
    let tls = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(cert), Some(key)) => crate::tls::from_pem_files(cert, key)?,
        _ => crate::tls::self_signed_in(&data_dir, std::slice::from_ref(&config.node.hostname))?,
    };

    let machine = MailStateMachine::open(&data_dir).context("cannot open the mail store")?;
    machine.set_min_free_disk_bytes(config.node.min_free_disk_mb.saturating_mul(1024 * 1024));
    let cluster_config = kermail_cluster::ClusterConfig {
        data_dir: data_dir.clone(),
        name: config.node.name.clone(),
        site: config.node.site.clone(),
        raft: config.cluster.timings(),
        mesh: config.mesh.clone(),
        backup_peers: config.backup.backup_peers(),
        backup_store_quota_bytes: config.backup_store.quota_bytes(),
    };
    let cluster = kermail_cluster::Cluster::open(cluster_config, machine.clone())
        .await
        .context("cannot start the replication engine")?;
    // A folder restored from a backup (`kermail restore --to`) starts from a state its log does
    // not hold: snapshot it at once and drop the log before it, so that a node joining later
    // is sent the snapshot, not a log that would start it from an empty state.
    if data_dir.join(crate::store::RESTORE_BASE_FILE).exists()
        && cluster.status().snapshot_index.is_none()
    {
        let snapshot = cluster
            .trigger_snapshot()
            .await
            .context("cannot snapshot the restored state")?;
        cluster
            .purge_log_to_snapshot()
            .await
            .context("cannot purge the log of the restored folder")?;
        info!(
            ?snapshot,
            "restored state snapshotted; the log before it is purged"
        );
    }
    let store = MailStore::new(
        machine.clone(),
        Arc::new(ClusterProposer {
            cluster: cluster.clone(),
            health: machine.health().clone(),
        }),
    )
    .with_login_throttle(config.auth.clone());
    let inbound = if config.inbound.enabled {
        let checks = crate::filter::InboundAuth::new(&config.inbound, &config.node.hostname)
            .map_err(|e| anyhow::anyhow!("[inbound]: {e}"))?;
        info!(
            authserv_id = checks.authserv_id(),
            "inbound SPF/DKIM/DMARC checks on"
        );
        Some(Arc::new(checks))
    } else {
        None
    };
    let spam = if config.spam.enabled {
        let filter = crate::filter::SpamFilter::new(
            &config.spam,
            inbound.as_ref().map(|checks| checks.resolver()),
            &config.inbound,
        )
        .map_err(|e| anyhow::anyhow!("[spam]: {e}"))?;
        info!(backend = ?config.spam.backend, "spam scoring on");
        Some(Arc::new(filter))
    } else {
        None
    };
    let store = store.with_filters(crate::store::FilterSettings {
        hostname: config.node.hostname.clone(),
        greylist: config.greylist.clone(),
        inbound,
        spam,
    });

    let hostname: Arc<str> = Arc::from(config.node.hostname.as_str());
    let smtp_config = Arc::new(config.smtp.clone());
    let imap_config = Arc::new(config.imap.clone());
    let mut servers = JoinSet::new();
    for address in &config.smtp.listen {
        let listener = bind(*address, "smtp").await?;
        servers.spawn(crate::smtp::serve(
            listener,
            smtp_config.clone(),
            hostname.clone(),
            store.clone(),
            tls.clone(),
            shutdown.clone(),
        ));
    }
    // One limiter for both submission ports: failed logins and messages count across them.
    let submission_limits = Arc::new(crate::smtp::limits::Limiter::new());
    for (addresses, kind) in [
        (
            &config.smtp.submission_listen,
            crate::smtp::ListenerKind::Submission,
        ),
        (
            &config.smtp.submissions_listen,
            crate::smtp::ListenerKind::Submissions,
        ),
    ] {
        for address in addresses {
            let listener = bind(*address, kind.name()).await?;
            servers.spawn(crate::smtp::serve_submission(
                listener,
                kind,
                smtp_config.clone(),
                hostname.clone(),
                store.clone(),
                tls.clone(),
                submission_limits.clone(),
                shutdown.clone(),
            ));
        }
    }
    for (addresses, implicit_tls, what) in [
        (&config.imap.listen, false, "imap"),
        (&config.imap.listen_tls, true, "imaps"),
    ] {
        for address in addresses {
            let listener = bind(address.as_str(), what).await?;
            servers.spawn(crate::imap::serve(
                listener,
                implicit_tls,
                imap_config.clone(),
                store.clone(),
                tls.clone(),
                shutdown.clone(),
            ));
        }
    }

    let managesieve_config = Arc::new(config.managesieve.clone());
    for address in &config.managesieve.listen {
        let listener = bind(address.as_str(), "managesieve").await?;
        servers.spawn(crate::managesieve::server::serve(
            listener,
            managesieve_config.clone(),
            store.clone(),
            tls.clone(),
            shutdown.clone(),
        ));
    }

    let advertised = Arc::new(crate::autoconfig::Advertised::new(
        &config.autoconfig,
        &config.node.hostname,
    ));
    for (addresses, https, what) in [
        (&config.autoconfig.listen, false, "autoconfig http"),
        (&config.autoconfig.listen_tls, true, "autoconfig https"),
    ] {
        for address in addresses {
            let listener = bind(address.as_str(), what).await?;
            servers.spawn(crate::autoconfig::serve(
                listener,
                https.then(|| tls.clone()),
                advertised.clone(),
                store.clone(),
                shutdown.clone(),
            ));
        }
    }

    servers.spawn(crate::store::keep_default_quota(
        store.clone(),
        config.store.default_quota(),
        shutdown.clone(),
    ));
    // Bodies whose write failed are written again as soon as the disk takes them.
    servers.spawn(retry_storage(store.machine().clone(), shutdown.clone()));

    // The delivery worker: leases make it safe on every node of a cluster.
    servers.spawn(crate::outbound::worker::run(
        store.clone(),
        config.outbound.clone(),
        config.node.name.clone(),
        config.node.hostname.clone(),
        shutdown.clone(),
    ));

    let backup_jobs = std::sync::Arc::new(crate::backup::Jobs::default());
    servers.spawn(crate::backup::schedule::run(
        store.clone(),
        config.backup.clone(),
        config.node.name.clone(),
        backup_jobs.clone(),
        Some(cluster.clone()),
        shutdown.clone(),
    ));

    let socket_path = config.admin_socket_path();
    let admin_listener = crate::admin::server::bind(&socket_path)
        .with_context(|| format!("cannot open the admin socket {}", socket_path.display()))?;
    let admin = tokio::spawn(crate::admin::server::serve(
        admin_listener,
        AdminContext {
            store: store.clone(),
            cluster: cluster.clone(),
            data_dir: data_dir.clone(),
            node_name: config.node.name.clone(),
            backup_config: config.backup.clone(),
            backup_jobs: backup_jobs.clone(),
        },
        shutdown.clone(),
    ));
    info!(
        name = %config.node.name,
        site = %config.node.site,
        data_dir = %data_dir.display(),
        "kermail node ready"
    );

    shutdown.cancelled().await;
    info!("shutting down: finishing in-flight sessions");
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, drain(&mut servers)).await;
    if drained.is_err() {
        warn!("grace period over: dropping the remaining sessions");
        servers.abort_all();
    }
    admin.abort();
    let _ = std::fs::remove_file(&socket_path);
    if let Err(error) = cluster.shutdown().await {
        warn!(%error, "replication engine did not stop cleanly");
    }
    info!("kermail node stopped");
    Ok(())
}

/// Retries, every [`STORAGE_RETRY_INTERVAL`] while the storage is failed, the bodies whose
/// write failed (the log store and snapshots retry their own writes).
async fn retry_storage(
    machine: Arc<MailStateMachine>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(STORAGE_RETRY_INTERVAL) => {}
        }
        if machine.health().is_failed() {
            let machine = machine.clone();
            let _ = tokio::task::spawn_blocking(move || machine.retry_unwritten_bodies()).await;
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (a mail server holds a socket per
/// session, plus its files) and returns the soft limit in force.
fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills in the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read RLIMIT_NOFILE");
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            info!(
                from = limit.rlim_cur,
                to = limit.rlim_max,
                "raised the open files limit"
            );
            return limit.rlim_max;
        }
        warn!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_NOFILE");
    }
    limit.rlim_cur
}

/// Lowers the listeners' session limits so that every session allowed at once, on every
/// listener, stays [`FD_RESERVE`] descriptors under `nofile` (a session that would hit the
/// limit would fail its accept or a file open elsewhere: EMFILE).
fn cap_sessions(config: &mut Config, nofile: u64) {
    let n_smtp = config.smtp.listen.len()
        + config.smtp.submission_listen.len()
        + config.smtp.submissions_listen.len();
    let n_imap = config.imap.listen.len() + config.imap.listen_tls.len();
    let n_listeners = (n_smtp + n_imap).max(1) as u64;
    let share = (nofile.saturating_sub(FD_RESERVE) / n_listeners).max(1) as usize;
    cap_protocol_sessions("smtp", &mut config.smtp.max_sessions, share, nofile);
    cap_protocol_sessions("imap", &mut config.imap.max_sessions, share, nofile);
}

/// Lowers one protocol's `max_sessions` to its share of the open files limit.
fn cap_protocol_sessions(protocol: &str, max_sessions: &mut usize, share: usize, nofile: u64) {
    if *max_sessions > share {
        warn!(
            protocol,
            configured = *max_sessions,
            capped = share,
            nofile,
            "max_sessions lowered to fit the open files limit"
        );
        *max_sessions = share;
    }
}

async fn drain(servers: &mut JoinSet<std::io::Result<()>>) {
    while let Some(result) = servers.join_next().await {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => error!(%error, "a listener stopped with an error"),
            Err(error) => error!(%error, "a listener task failed"),
        }
    }
}

async fn bind(
    address: impl tokio::net::ToSocketAddrs + std::fmt::Display,
    what: &str,
) -> anyhow::Result<TcpListener> {
    let shown = address.to_string();
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for {what} on {shown}"))?;
    info!(address = %shown, what, "listening");
    Ok(listener)
}

/// Makes the data folder private whatever the umask and whoever created it: the process's
/// umask becomes 0077 (every file this node creates from now on is 0600, every folder 0700),
/// the folder is created 0700 or, when it already exists, set to 0700, and every file and
/// folder already in it loses its group and other permissions (a folder created by an admin
/// with a 0022 umask, or files left by an older version that created them 0644).
fn create_private_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    // SAFETY: umask only sets the process's file mode creation mask; it cannot fail.
    unsafe { libc::umask(PRIVATE_UMASK) };
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .with_context(|| format!("cannot create the data folder {}", path.display()))?;
    }
    make_private(path)
        .with_context(|| format!("cannot make the data folder {} private", path.display()))
}

/// The process umask of a node: no permission for group and others.
pub const PRIVATE_UMASK: libc::mode_t = 0o077;

/// Removes the group and other permission bits of `path` and, for a folder, of everything
/// below it (symbolic links are neither followed nor changed).
fn make_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::symlink_metadata(path)?;
    if metadata.file_type().is_symlink() {
        return Ok(());
    }
    let mode = metadata.permissions().mode() & 0o7777;
    let private = mode & 0o700;
    if mode != private {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(private))?;
    }
    if metadata.is_dir() {
        for entry in std::fs::read_dir(path)? {
            make_private(&entry?.path())?;
        }
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT, then cancels `token`.
pub async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            error!(%error, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
    token.cancel();
}
