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
    /// `node`, for a backup-only member (`[node] role = "backup-store"` there, outside the
    /// Raft membership): its mesh public key (base64), the addresses its mesh listens on, and
    /// its site. Without `public_key`, `node` names a member of this cluster.
    #[serde(default)]
    pub public_key: Option<String>,
    #[serde(default)]
    pub addrs: Vec<std::net::SocketAddr>,
    #[serde(default)]
    pub site: Option<String>,
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
    /// Puts several objects (a batch of chunks); by default [`super::PUTS_IN_FLIGHT`] puts at once.
    /// The first error fails the batch (objects already put stay).
    fn put_batch(&self, objects: Vec<(String, Vec<u8>)>) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            use futures::StreamExt;
            let mut puts = futures::stream::iter(
                objects
                    .into_iter()
                    .map(|(name, bytes)| self.put(name, bytes)),
            )
            .buffer_unordered(super::PUTS_IN_FLIGHT);
            while let Some(put) = puts.next().await {
                put?;
            }
            Ok(())
        })
    }
    /// Removes what interrupted writes left (a folder's `*.tmp-*` files, at a node target its
    /// store's); returns how many (where known). Called before a backup and after a failed one.
    fn clean_temporary(&self) -> BoxFuture<'_, io::Result<u64>> {
        Box::pin(async { Ok(0) })
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
                made: Default::default(),
                busy: Default::default(),
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

    fn clean_temporary(&self) -> BoxFuture<'_, io::Result<u64>> {
        Box::pin(async move {
            match self.call(BackupStoreRequest::CleanTemporary).await? {
                BackupStoreReply::Done => Ok(0),
                other => Err(unexpected(other)),
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
    /// Folders known to exist (one `mkdir` each, not one per chunk).
    made: Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>,
    /// Held shared by the tasks writing chunks, exclusively by `flush` and `clean_temporary`:
    /// a write still running after its backup failed (its future dropped) ends before the
    /// clean-up looks, so it leaves no temporary file behind.
    busy: Arc<std::sync::RwLock<()>>,
}

/// Writes one object of a folder target: under a temporary name (removed again if the write
/// fails: a full disk leaves nothing behind); a chunk is left for `flush` to sync and rename,
/// anything else (a manifest) is synced and renamed at once.
fn dir_put(
    root: &std::path::Path,
    pending: &std::sync::Mutex<Vec<(PathBuf, PathBuf)>>,
    made: &std::sync::Mutex<std::collections::HashSet<PathBuf>>,
    name: &str,
    bytes: &[u8],
) -> io::Result<()> {
    use std::io::Write;
    let path = root.join(checked_name(name)?);
    let parent = path.parent().unwrap_or(root).to_path_buf();
    if !lock(made).contains(&parent) {
        std::fs::create_dir_all(&parent)?;
        lock(made).insert(parent.clone());
    }
    let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        if name.starts_with("chunks/") {
            return Ok(None);
        }
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(Some(()))
    })();
    match written {
        Ok(None) => {
            // Synced and renamed by `flush`, all at once.
            lock(pending).push((tmp, path));
            Ok(())
        }
        Ok(Some(())) => std::fs::File::open(&parent)?.sync_all(),
        Err(error) => {
            let _ = std::fs::remove_file(&tmp);
            Err(error)
        }
    }
}

/// Syncs the file system holding `root` (Linux: one `syncfs`, instead of an fsync per chunk);
/// elsewhere, every file of `files`.
fn sync_all_of(root: &std::path::Path, files: &[(PathBuf, PathBuf)]) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let _ = files;
        syncfs(root)
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

#[cfg(target_os = "linux")]
fn syncfs(root: &std::path::Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(root)?;
    // SAFETY: syncfs(2) takes a valid open descriptor, which `dir` holds for the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the renames into `parents` durable. Linux: one more `syncfs` (it writes every dirty
/// inode and commits the journal), not an fsync per folder: up to 258 folders (`chunks/xx`)
/// per flush, each fsync a journal commit of its own, made a folder backup's time follow the
/// disk's other writers (about 1 s per flush on a shared disk).
fn sync_parents(
    root: &std::path::Path,
    parents: &std::collections::BTreeSet<PathBuf>,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let _ = parents;
        syncfs(root)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = root;
        for parent in parents {
            std::fs::File::open(parent)?.sync_all()?;
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
        let made = self.made.clone();
        let busy = self.busy.clone();
        Box::pin(blocking(move || {
            let _writing = busy.read().unwrap_or_else(|p| p.into_inner());
            dir_put(&root, &pending, &made, &name, &bytes)
        }))
    }

    /// One blocking task writes the whole batch (not a thread hand-off per chunk).
    fn put_batch(&self, objects: Vec<(String, Vec<u8>)>) -> BoxFuture<'_, io::Result<()>> {
        let root = self.root.clone();
        let pending = self.pending.clone();
        let made = self.made.clone();
        let busy = self.busy.clone();
        Box::pin(blocking(move || {
            let _writing = busy.read().unwrap_or_else(|p| p.into_inner());
            for (name, bytes) in objects {
                dir_put(&root, &pending, &made, &name, &bytes)?;
            }
            Ok(())
        }))
    }

    fn clean_temporary(&self) -> BoxFuture<'_, io::Result<u64>> {
        let root = self.root.clone();
        let pending = self.pending.clone();
        let busy = self.busy.clone();
        Box::pin(blocking(move || {
            let _alone = busy.write().unwrap_or_else(|p| p.into_inner());
            lock(&pending).clear();
            kermail_cluster::raft::backup_store::remove_temporary_files(&root)
        }))
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        let root = self.root.clone();
        let pending_list = self.pending.clone();
        let busy = self.busy.clone();
        Box::pin(blocking(move || {
            let _alone = busy.write().unwrap_or_else(|p| p.into_inner());
            let pending = std::mem::take(&mut *lock(&pending_list));
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
            sync_parents(&root, &parents)
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
            kermail_cluster::raft::backup_store::list_dir(
                &root,
                prefix.trim_end_matches('/'),
                &mut out,
            )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_target(root: &std::path::Path) -> Arc<dyn Target> {
        open(
            &TargetConfig {
                name: "t".into(),
                kind: TargetKind::Dir,
                node: None,
                public_key: None,
                addrs: Vec::new(),
                site: None,
                keep_last: None,
                path: Some(root.to_path_buf()),
                endpoint: None,
                bucket: None,
                region: None,
                prefix: None,
                access_key_id: None,
                secret_access_key: None,
            },
            None,
        )
        .expect("open")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_folder_lists_a_batch_once_flushed_and_cleans_what_was_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir_target(dir.path());
        let batch = |names: &[&str]| -> Vec<(String, Vec<u8>)> {
            names
                .iter()
                .map(|n| (format!("chunks/ab/{n}"), n.as_bytes().to_vec()))
                .collect()
        };
        target.put_batch(batch(&["a1", "a2"])).await.expect("put");
        assert!(target.list("chunks".into()).await.expect("list").is_empty());
        target.flush().await.expect("flush");
        target.put_batch(batch(&["a3"])).await.expect("put");
        let leftover = dir.path().join("chunks/cd/x.tmp-00000000000000ff");
        std::fs::create_dir_all(leftover.parent().expect("parent")).expect("mkdir");
        std::fs::write(&leftover, b"half").expect("write");
        target.clean_temporary().await.expect("clean");
        assert!(!leftover.exists());
        // The flushed chunks stay, the unflushed one is gone, and a flush now moves nothing.
        target.flush().await.expect("flush");
        let mut listed = target.list("chunks".into()).await.expect("list");
        listed.sort();
        assert_eq!(
            listed,
            vec![
                ("chunks/ab/a1".to_owned(), 2),
                ("chunks/ab/a2".to_owned(), 2)
            ]
        );
        let files = all_files(dir.path());
        assert!(files.iter().all(|f| !f.contains(".tmp-")), "{files:?}");
    }

    fn all_files(dir: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(all_files(&path));
            } else {
                out.push(path.to_string_lossy().into_owned());
            }
        }
        out
    }
}
