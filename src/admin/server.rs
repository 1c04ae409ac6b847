//! The node side of the admin socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use super::{AdminRequest, AdminResponse, MAX_ADMIN_MESSAGE_BYTES};
use crate::store::{MailStore, StoreError};

/// A client that sends nothing for this long is dropped.
pub const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin server needs: the mail store for mail administration, the cluster for
/// status and (later) membership.
#[derive(Clone)]
pub struct AdminContext {
    pub store: MailStore,
    pub cluster: kermail_cluster::Cluster,
    pub data_dir: PathBuf,
    pub node_name: String,
    pub backup_config: crate::backup::BackupConfig,
    pub backup_jobs: std::sync::Arc<crate::backup::Jobs>,
}

/// Binds the socket with mode 0600. A stale socket file left by a killed node is replaced;
/// a live one means another node uses this data folder.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another kermail node answers on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Create the socket with no permissions for group and others from the start.
    let previous_mask = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    unsafe { libc::umask(previous_mask) };
    let listener = listener?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, context: AdminContext, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!(%error, "admin socket accept failed");
                    continue;
                }
            },
        };
        // The socket's mode (0600, in a 0700 folder) is the first gate; the peer's uid is
        // the second, so that a socket whose mode was loosened by hand, or a file descriptor
        // passed to another user, gives no one else the admin's authority.
        match stream.peer_cred() {
            Ok(credentials) if peer_uid_allowed(credentials.uid()) => {}
            Ok(credentials) => {
                warn!(
                    uid = credentials.uid(),
                    "admin connection refused: only root and the node's own user may administer it"
                );
                continue;
            }
            Err(error) => {
                warn!(%error, "admin connection refused: the peer's credentials are unknown");
                continue;
            }
        }
        let context = context.clone();
        tokio::spawn(
            async move {
                if let Err(error) = handle_connection(stream, &context).await {
                    warn!(%error, "admin connection failed");
                }
            }
            .instrument(info_span!("admin")),
        );
    }
}

/// The admin socket of a backup-only node (`[node] role = "backup-store"`): `status` and
/// `mesh status`; every other request is refused (it holds no mail and no backup key).
pub async fn serve_backup_store(
    listener: UnixListener,
    store: std::sync::Arc<kermail_cluster::raft::backup_store::Store>,
    mesh: kermail_cluster::mesh::Mesh,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!(%error, "admin socket accept failed");
                    continue;
                }
            },
        };
        match stream.peer_cred() {
            Ok(credentials) if peer_uid_allowed(credentials.uid()) => {}
            _ => {
                warn!(
                    "admin connection refused: only root and the node's own user may administer it"
                );
                continue;
            }
        }
        let store = store.clone();
        let mesh = mesh.clone();
        tokio::spawn(
            async move {
                let answer = move |request: AdminRequest| match request {
                    AdminRequest::Status => {
                        let (used, quota) = store.usage();
                        let status = mesh.status();
                        let linked = status
                            .peers
                            .iter()
                            .filter(|p| p.link != kermail_cluster::mesh::LinkState::Down)
                            .count();
                        lines(vec![
                            format!("node {} (site {}): backup-store", status.node, status.site),
                            "role: backup-store (no Raft, no mail state, no backup key)".to_owned(),
                            format!(
                                "backup store {}: {used} bytes used, quota {}",
                                store.root().display(),
                                quota.map_or_else(|| "none".to_owned(), |q| format!("{q} bytes"))
                            ),
                            format!("mesh: {linked} of {} clients linked", status.peers.len()),
                        ])
                    }
                    AdminRequest::MeshStatus { json } => {
                        let status = mesh.status();
                        if json {
                            json_line(&status)
                        } else {
                            lines(super::cluster::mesh_status_lines(&status))
                        }
                    }
                    _ => AdminResponse::Error {
                        message: "this node is a backup store (role = \"backup-store\"): it \
                                  keeps other nodes' encrypted backup chunks and holds no mail, \
                                  no cluster state and no backup key"
                            .to_owned(),
                    },
                };
                if let Err(error) = answer_one(stream, answer).await {
                    warn!(%error, "admin connection failed");
                }
            }
            .instrument(info_span!("admin")),
        );
    }
}

async fn answer_one(
    stream: UnixStream,
    answer: impl FnOnce(AdminRequest) -> AdminResponse,
) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader).take(MAX_ADMIN_MESSAGE_BYTES as u64);
    let mut line = String::new();
    tokio::time::timeout(ADMIN_REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let response = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(request) => answer(request),
        Err(error) => AdminResponse::Error {
            message: format!("malformed admin request: {error}"),
        },
    };
    let mut bytes = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    writer.write_all(&bytes).await?;
    writer.shutdown().await
}

/// Root and the user the node runs as may use the admin socket; nobody else.
fn peer_uid_allowed(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

async fn handle_connection(stream: UnixStream, context: &AdminContext) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader).take(MAX_ADMIN_MESSAGE_BYTES as u64);
    let mut line = String::new();
    tokio::time::timeout(ADMIN_REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let response = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(request) => handle(request, context).await,
        Err(error) => AdminResponse::Error {
            message: format!("malformed admin request: {error}"),
        },
    };
    let mut answer = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    answer.push(b'\n');
    writer.write_all(&answer).await?;
    writer.shutdown().await
}

fn lines(lines: Vec<String>) -> AdminResponse {
    AdminResponse::Ok { lines }
}

fn json_line<T: serde::Serialize>(value: &T) -> AdminResponse {
    match serde_json::to_string(value) {
        Ok(line) => lines(vec![line]),
        Err(error) => AdminResponse::Error {
            message: format!("cannot encode the answer: {error}"),
        },
    }
}

fn failed(error: kermail_cluster::ClusterError) -> AdminResponse {
    AdminResponse::Error {
        message: error.to_string(),
    }
}

fn done(result: Result<String, StoreError>) -> AdminResponse {
    match result {
        Ok(line) => lines(vec![line]),
        Err(error) => AdminResponse::Error {
            message: error.to_string(),
        },
    }
}

/// `storage USED/LIMIT messages USED/LIMIT`, bytes and counts, each limit `unlimited` when
/// there is none and followed by `(default)` when it is the cluster's default.
fn quota_text(report: &crate::store::QuotaReport) -> String {
    use crate::store::QuotaSetting;
    let limit = |limit: Option<u64>, setting: QuotaSetting| {
        let value = limit.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
        if setting == QuotaSetting::Default {
            format!("{value} (default)")
        } else {
            value
        }
    };
    format!(
        "storage {}/{} messages {}/{}",
        report.usage.bytes,
        limit(report.limits.storage_bytes, report.settings.storage),
        report.usage.messages,
        limit(report.limits.messages, report.settings.messages),
    )
}

/// Executes one request. Never logs a password.
pub async fn handle(request: AdminRequest, context: &AdminContext) -> AdminResponse {
    let store = &context.store;
    match request {
        AdminRequest::DomainAdd { domain } => {
            let result = store.add_domain(&domain).await;
            info!(%domain, ok = result.is_ok(), "admin: domain add");
            done(result.map(|()| format!("domain {domain} added")))
        }
        AdminRequest::DomainRemove { domain } => {
            let result = store.remove_domain(&domain).await;
            info!(%domain, ok = result.is_ok(), "admin: domain remove");
            done(result.map(|()| format!("domain {domain} removed")))
        }
        AdminRequest::DomainList => lines(store.list_domains()),
        AdminRequest::UserAdd { address, password } => {
            let result = store.add_account(&address, &password).await;
            info!(%address, ok = result.is_ok(), "admin: user add");
            done(result.map(|_| format!("user {address} added")))
        }
        AdminRequest::UserPasswd { address, password } => {
            let result = store.set_password(&address, &password).await;
            info!(%address, ok = result.is_ok(), "admin: user passwd");
            done(result.map(|()| format!("password of {address} changed")))
        }
        AdminRequest::UserRemove { address } => {
            let result = store.remove_account(&address).await;
            info!(%address, ok = result.is_ok(), "admin: user remove");
            done(result.map(|()| format!("user {address} removed")))
        }
        AdminRequest::UserList { domain } => {
            if let Some(domain) = domain.as_deref() {
                if !store
                    .list_domains()
                    .iter()
                    .any(|d| d.eq_ignore_ascii_case(domain))
                {
                    return AdminResponse::Error {
                        message: format!("domain {domain} not found"),
                    };
                }
            }
            lines(
                store
                    .list_accounts(domain.as_deref())
                    .into_iter()
                    .map(|account| match store.quota(account.id) {
                        Some(report) => format!("{} {}", account.address, quota_text(&report)),
                        None => account.address,
                    })
                    .collect(),
            )
        }
        AdminRequest::UserQuota {
            address,
            storage,
            messages,
        } => {
            if storage.is_some() || messages.is_some() {
                let result = store.set_account_quota(&address, storage, messages).await;
                info!(%address, ?storage, ?messages, ok = result.is_ok(), "admin: user quota");
                if let Err(error) = result {
                    return done(Err(error));
                }
            }
            done(
                store
                    .quota_of(&address)
                    .map(|report| format!("{address} {}", quota_text(&report))),
            )
        }
        AdminRequest::AliasAdd { source, target } => {
            let result = store.add_alias(&source, &target).await;
            info!(%source, %target, ok = result.is_ok(), "admin: alias add");
            done(result.map(|()| format!("alias {source} -> {target} added")))
        }
        AdminRequest::AliasRemove { source, target } => {
            let result = store.remove_alias(&source, &target).await;
            info!(%source, %target, ok = result.is_ok(), "admin: alias remove");
            done(result.map(|()| format!("alias {source} -> {target} removed")))
        }
        AdminRequest::AliasList { domain } => lines(
            store
                .list_aliases(domain.as_deref())
                .into_iter()
                .map(|alias| format!("{} -> {}", alias.source, alias.target))
                .collect(),
        ),
        AdminRequest::Outbound(request) => super::outbound::handle(request, store).await,
        AdminRequest::MeshStatus { json } => match context.cluster.mesh_status() {
            Ok(status) if json => json_line(&status),
            Ok(status) => lines(super::cluster::mesh_status_lines(&status)),
            Err(error) => failed(error),
        },
        AdminRequest::ClusterStatus { json } => match context.cluster.cluster_view().await {
            Ok(view) if json => json_line(&view),
            Ok(view) => lines(super::cluster::cluster_status_lines(&view)),
            Err(error) => failed(error),
        },
        AdminRequest::ClusterInvite {
            name,
            site,
            learner,
        } => {
            let result = context.cluster.invite(&name, &site, learner).await;
            info!(%name, %site, learner, ok = result.is_ok(), "admin: cluster invite");
            match result {
                Ok(token) => lines(vec![token]),
                Err(error) => failed(error),
            }
        }
        AdminRequest::ClusterJoin { token } => {
            let result = context.cluster.join(&token).await;
            info!(ok = result.is_ok(), "admin: cluster join");
            match result {
                Ok(message) => lines(vec![message]),
                Err(error) => failed(error),
            }
        }
        AdminRequest::ClusterJoinStatus => match context.cluster.join_report() {
            Some(report) => json_line(&report),
            None => AdminResponse::Error {
                message: "this node is not joining a cluster".to_owned(),
            },
        },
        AdminRequest::ClusterLeave => {
            let result = context.cluster.leave().await;
            info!(ok = result.is_ok(), "admin: cluster leave");
            match result {
                Ok(message) => lines(vec![message]),
                Err(error) => failed(error),
            }
        }
        AdminRequest::ClusterRemove { name } => {
            let result = context.cluster.remove(&name).await;
            info!(%name, ok = result.is_ok(), "admin: cluster remove");
            match result {
                Ok(message) => lines(vec![message]),
                Err(error) => failed(error),
            }
        }
        AdminRequest::Backup(request) => super::backup::handle(request, context).await,
        AdminRequest::Status => {
            let data_dir = context.data_dir.clone();
            let disk_bytes = tokio::task::spawn_blocking(move || folder_size_bytes(&data_dir))
                .await
                .unwrap_or(0);
            let mut status = status_lines(context);
            status.push(format!("data folder size on disk: {disk_bytes}"));
            status.extend(crate::backup::status_lines(
                &context.store,
                &context.backup_config,
                crate::backup::now_secs(),
            ));
            lines(status)
        }
    }
}

/// Apparent size of every file below `path` (what `du -sb` counts), for `kermail status`.
fn folder_size_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => folder_size_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

fn or_none(index: Option<u64>) -> String {
    index.map_or_else(|| "none".to_owned(), |i| i.to_string())
}

fn status_lines(context: &AdminContext) -> Vec<String> {
    let cluster = context.cluster.status();
    let stats = context.store.stats();
    let leader = match cluster.leader {
        Some(id) => id.to_string(),
        None => "none".to_owned(),
    };
    vec![
        format!("node: {} (id {})", cluster.name, cluster.node_id),
        format!("site: {}", cluster.site),
        format!("role: {:?}", cluster.role).to_lowercase(),
        format!("term: {}", cluster.term),
        format!("leader: {leader}"),
        format!("last log index: {}", or_none(cluster.last_log_index)),
        format!("committed index: {}", or_none(cluster.committed_index)),
        format!("applied index: {}", or_none(cluster.applied_index)),
        format!("domains: {}", stats.domains),
        format!("accounts: {}", stats.accounts),
        format!("aliases: {}", stats.aliases),
        format!("messages: {}", stats.messages),
        format!("bodies: {}", stats.blobs),
        format!("stored bytes (raw): {}", stats.blob_bytes_raw),
        format!(
            "stored bytes (on disk, bodies): {}",
            stats.blob_bytes_stored
        ),
        format!("data folder: {}", context.data_dir.display()),
        storage_line(context),
    ]
}

/// `storage: ok`, `storage: failed (REASON) since TIME (COMPONENT)`, or `storage: low (...)`.
fn storage_line(context: &AdminContext) -> String {
    let machine = context.store.machine();
    if let Some(failure) = machine.health().failure() {
        let since = time::OffsetDateTime::from(failure.since);
        let since = since
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| "unknown".to_owned());
        return format!(
            "storage: failed ({}) since {since} ({}); writes are refused until it recovers",
            failure.reason,
            failure.component.name()
        );
    }
    if let Some((free, reserve)) = machine.low_disk_space() {
        return format!(
            "storage: low ({} MB free, reserve {} MB); new messages are refused",
            free / (1024 * 1024),
            reserve / (1024 * 1024)
        );
    }
    "storage: ok".to_owned()
}
