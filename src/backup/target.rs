//! Where backups go: a plain directory, an S3-compatible bucket, or another node of the
//! cluster over the mesh (which keeps them in its `backup-store` folder). A target stores named
//! objects (`chunks/xx/<id>`, `backups/<id>`) and lists what it has, so an interrupted backup
//! resumes by skipping what is there.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use kermail_cluster::raft::backup_store::{BackupStoreReply, BackupStoreRequest};

use crate::store::BoxFuture;

/// `[[backup.targets]]`: one place backups go.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// `dir`, `s3` or `node`.
    pub kind: TargetKind,
    /// `node`: the member (its name, or its node id) that keeps the chunks, under
    /// `<its data_dir>/backup-store/` (a `dir` target's layout).
    #[serde(default)]
    pub node: Option<String>,
    /// Keep only the newest this many backups at this target instead of `[backup.retention]`;
    /// applied by `kermail backup prune` and after every successful backup to it.
    #[serde(default)]
    pub keep_last: Option<u32>,
    /// `dir`: the folder (created if missing).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `s3`: the endpoint URL (e.g. `https://s3.example.net`), bucket, region, key prefix.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub bucket: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    /// `s3` credentials; when absent, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are used.
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Dir,
    S3,
    Node,
}

pub trait Target: Send + Sync {
    fn put(&self, name: String, bytes: Vec<u8>) -> BoxFuture<'_, io::Result<()>>;
    fn get(&self, name: String) -> BoxFuture<'_, io::Result<Vec<u8>>>;
    /// Every object under `prefix`: name and size.
    fn list(&self, prefix: String) -> BoxFuture<'_, io::Result<Vec<(String, u64)>>>;
    fn delete(&self, name: String) -> BoxFuture<'_, io::Result<()>>;
    /// Makes every chunk put so far durable and visible under its name (a folder writes
    /// chunks under temporary names without an fsync each, then syncs once); called before
    /// the manifest is written. A chunk is listed only once it is durable.
    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// Opens a target; a `node` target needs this node's cluster handle (`None` in the CLI).
pub fn open(
    config: &TargetConfig,
    cluster: Option<&kermail_cluster::Cluster>,
) -> io::Result<Arc<dyn Target>> {
    let missing = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("backup target {} needs `{what}`", config.name),
        )
    };
    match config.kind {
        TargetKind::Dir => {
            let root = config.path.clone().ok_or_else(|| missing("path"))?;
            std::fs::create_dir_all(&root)?;
            Ok(Arc::new(DirTarget {
                root,
                pending: Default::default(),
            }))
        }
        TargetKind::S3 => {
            // reqwest is built without a provider of its own: the process-wide one (ring).
            crate::tls::install_crypto_provider();
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(config.bucket.clone().ok_or_else(|| missing("bucket"))?)
                .with_region(config.region.clone().unwrap_or_else(|| "us-east-1".into()));
            if let Some(endpoint) = &config.endpoint {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_virtual_hosted_style_request(false);
            }
            if let Some(key) = &config.access_key_id {
                builder = builder.with_access_key_id(key);
            }
            if let Some(secret) = &config.secret_access_key {
                builder = builder.with_secret_access_key(secret);
            }
            let store = builder.build().map_err(io::Error::other)?;
            Ok(Arc::new(S3Target {
                store,
                prefix: config.prefix.clone().unwrap_or_default(),
            }))
        }
        TargetKind::Node => {
            let node = config.node.clone().ok_or_else(|| missing("node"))?;
            let cluster = cluster.cloned().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "backup target {} is a node: only a running node reaches it",
                        config.name
                    ),
                )
            })?;
            Ok(Arc::new(NodeTarget { cluster, node }))
        }
    }
}

/// Another node of the cluster, over the mesh's bulk channel
/// (`kermail_cluster::raft::backup_store`).
struct NodeTarget {
    cluster: kermail_cluster::Cluster,
    node: String,
}

impl NodeTarget {
    async fn call(&self, request: BackupStoreRequest) -> io::Result<BackupStoreReply> {
        match self.cluster.backup_store(&self.node, &request).await {
            Ok(BackupStoreReply::NotFound) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("not found at node {}", self.node),
            )),
            Ok(BackupStoreReply::Error(error)) => Err(io::Error::other(format!(
                "node {} refused: {error}",
                self.node
            ))),
            Ok(reply) => Ok(reply),
            Err(error) => Err(io::Error::other(format!("node {}: {error}", self.node))),
        }
    }
}

fn unexpected(reply: BackupStoreReply) -> io::Error {
    io::Error::other(format!("unexpected backup-store answer {reply:?}"))
}

impl Target for NodeTarget {
    fn put(&self, name: String, bytes: Vec<u8>) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            match self.call(BackupStoreRequest::Put { name, bytes }).await? {
                BackupStoreReply::Done => Ok(()),
                other => Err(unexpected(other)),
            }
        })
    }

    fn get(&self, name: String) -> BoxFuture<'_, io::Result<Vec<u8>>> {
        Box::pin(async move {
            match self.call(BackupStoreRequest::Get { name }).await? {
                BackupStoreReply::Bytes(bytes) => Ok(bytes),
                other => Err(unexpected(other)),
            }
        })
    }

    fn list(&self, prefix: String) -> BoxFuture<'_, io::Result<Vec<(String, u64)>>> {
        Box::pin(async move {
            let mut out: Vec<(String, u64)> = Vec::new();
            loop {
                let after = out.last().map(|(name, _)| name.clone());
                let request = BackupStoreRequest::List {
                    prefix: prefix.clone(),
                    after,
                };
                match self.call(request).await? {
                    BackupStoreReply::List { entries, more } => {
                        let progressed = !entries.is_empty();
                        out.extend(entries);
                        if !more || !progressed {
                            return Ok(out);
                        }
                    }
                    other => return Err(unexpected(other)),
                }
            }
        })
    }

    fn delete(&self, name: String) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            match self.call(BackupStoreRequest::Delete { name }).await {
                Ok(_) => Ok(()),
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(error) => Err(error),
            }
        })
    }
}

struct DirTarget {
    root: PathBuf,
    /// Chunks written under a temporary name, not yet synced: (temporary, final) paths.
    pending: Arc<std::sync::Mutex<Vec<(PathBuf, PathBuf)>>>,
}

/// Syncs the file system holding `root` (Linux: one `syncfs`, instead of an fsync per chunk);
/// elsewhere, every file of `files`.
fn sync_all_of(root: &std::path::Path, files: &[(PathBuf, PathBuf)]) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let _ = files;
        use std::os::fd::AsRawFd;
        let dir = std::fs::File::open(root)?;
        // SAFETY: syncfs(2) takes a valid open descriptor, which `dir` holds for the call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = root;
        for (tmp, _) in files {
            std::fs::File::open(tmp)?.sync_all()?;
        }
        Ok(())
    }
}

fn checked_name(name: &str) -> io::Result<&str> {
    if name.is_empty()
        || name.starts_with('/')
        || name.split('/').any(|part| part.is_empty() || part == "..")
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad object name {name:?}"),
        ));
    }
    Ok(name)
}

fn list_dir(
    root: &std::path::Path,
    relative: &str,
    out: &mut Vec<(String, u64)>,
) -> io::Result<()> {
    let dir = root.join(relative);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp-") {
            continue;
        }
        let child = if relative.is_empty() {
            name
        } else {
            format!("{relative}/{name}")
        };
        let meta = entry.metadata()?;
        if meta.is_dir() {
            list_dir(root, &child, out)?;
        } else {
            out.push((child, meta.len()));
        }
    }
    Ok(())
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

impl Target for DirTarget {
    fn put(&self, name: String, bytes: Vec<u8>) -> BoxFuture<'_, io::Result<()>> {
        let root = self.root.clone();
        let pending = self.pending.clone();
        Box::pin(blocking(move || {
            use std::io::Write;
            let path = root.join(checked_name(&name)?);
            let parent = path.parent().unwrap_or(&root).to_path_buf();
            std::fs::create_dir_all(&parent)?;
            let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            if name.starts_with("chunks/") {
                // Synced and renamed by `flush`, all at once.
                lock(&pending).push((tmp, path));
                return Ok(());
            }
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&parent)?.sync_all()
        }))
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        let root = self.root.clone();
        let pending = std::mem::take(&mut *lock(&self.pending));
        Box::pin(blocking(move || {
            if pending.is_empty() {
                return Ok(());
            }
            sync_all_of(&root, &pending)?;
            let mut parents = std::collections::BTreeSet::new();
            for (tmp, path) in &pending {
                std::fs::rename(tmp, path)?;
                if let Some(parent) = path.parent() {
                    parents.insert(parent.to_path_buf());
                }
            }
            parents.insert(root.join("chunks"));
            parents.insert(root.clone());
            for parent in parents {
                std::fs::File::open(&parent)?.sync_all()?;
            }
            Ok(())
        }))
    }

    fn get(&self, name: String) -> BoxFuture<'_, io::Result<Vec<u8>>> {
        let root = self.root.clone();
        Box::pin(blocking(move || {
            std::fs::read(root.join(checked_name(&name)?))
        }))
    }

    fn list(&self, prefix: String) -> BoxFuture<'_, io::Result<Vec<(String, u64)>>> {
        let root = self.root.clone();
        Box::pin(blocking(move || {
            let mut out = Vec::new();
            list_dir(&root, prefix.trim_end_matches('/'), &mut out)?;
            Ok(out)
        }))
    }

    fn delete(&self, name: String) -> BoxFuture<'_, io::Result<()>> {
        let root = self.root.clone();
        Box::pin(blocking(move || {
            std::fs::remove_file(root.join(checked_name(&name)?))
        }))
    }
}

struct S3Target {
    store: object_store::aws::AmazonS3,
    prefix: String,
}

impl S3Target {
    fn path(&self, name: &str) -> io::Result<object_store::path::Path> {
        Ok(object_store::path::Path::from(format!(
            "{}{}",
            self.prefix,
            checked_name(name)?
        )))
    }
}

fn s3_error(error: object_store::Error) -> io::Error {
    match error {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, error),
        other => io::Error::other(other),
    }
}

impl Target for S3Target {
    fn put(&self, name: String, bytes: Vec<u8>) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            use object_store::ObjectStoreExt;
            let path = self.path(&name)?;
            self.store
                .put(&path, bytes.into())
                .await
                .map(|_| ())
                .map_err(s3_error)
        })
    }

    fn get(&self, name: String) -> BoxFuture<'_, io::Result<Vec<u8>>> {
        Box::pin(async move {
            use object_store::ObjectStoreExt;
            let path = self.path(&name)?;
            let result = self.store.get(&path).await.map_err(s3_error)?;
            Ok(result.bytes().await.map_err(s3_error)?.to_vec())
        })
    }

    fn list(&self, prefix: String) -> BoxFuture<'_, io::Result<Vec<(String, u64)>>> {
        Box::pin(async move {
            use futures::StreamExt;
            use object_store::ObjectStore;
            let full = object_store::path::Path::from(format!(
                "{}{}",
                self.prefix,
                prefix.trim_end_matches('/')
            ));
            let mut stream = self.store.list(Some(&full));
            let mut out = Vec::new();
            while let Some(meta) = stream.next().await {
                let meta = meta.map_err(s3_error)?;
                let name = meta.location.to_string();
                let name = name.strip_prefix(&self.prefix).unwrap_or(&name).to_owned();
                out.push((name, meta.size));
            }
            Ok(out)
        })
    }

    fn delete(&self, name: String) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            use object_store::ObjectStoreExt;
            let path = self.path(&name)?;
            self.store.delete(&path).await.map_err(s3_error)
        })
    }
}
