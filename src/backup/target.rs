//! Where backups go: a plain directory or an S3-compatible bucket. A target stores named
//! objects (`chunks/xx/<id>`, `backups/<id>`) and lists what it has, so an interrupted backup
//! resumes by skipping what is there.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::store::BoxFuture;

/// `[[backup.targets]]`: one place backups go.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// `dir` or `s3`.
    pub kind: TargetKind,
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
}

pub trait Target: Send + Sync {
    fn put(&self, name: String, bytes: Vec<u8>) -> BoxFuture<'_, io::Result<()>>;
    fn get(&self, name: String) -> BoxFuture<'_, io::Result<Vec<u8>>>;
    /// Every object under `prefix`: name and size.
    fn list(&self, prefix: String) -> BoxFuture<'_, io::Result<Vec<(String, u64)>>>;
    fn delete(&self, name: String) -> BoxFuture<'_, io::Result<()>>;
}

pub fn open(config: &TargetConfig) -> io::Result<Arc<dyn Target>> {
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
            Ok(Arc::new(DirTarget { root }))
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
    }
}

struct DirTarget {
    root: PathBuf,
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
        Box::pin(blocking(move || {
            use std::io::Write;
            let path = root.join(checked_name(&name)?);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
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
