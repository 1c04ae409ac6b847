//! Configuration: one TOML file, one section per component. Each component owns its section's
//! type (`smtp::SmtpConfig`, `imap::ImapConfig`, ...) and is handed only that section.
//!
//! Without a file, every section takes its defaults: the embedded single-node setup (data in
//! `./kermail-data`, loopback ports). `config/kermail.toml` documents every key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The data folder used when no configuration file is given.
pub const DEFAULT_DATA_DIR: &str = "kermail-data";
/// New messages are refused (SMTP `452 4.3.1`) while the data folder's file system has less
/// free space than this, so that the Raft log and snapshots keep room to work.
pub const MIN_FREE_DISK_MB_DEFAULT: u64 = 100;

/// The admin socket's file name inside the data folder.
pub const ADMIN_SOCKET_FILE: &str = "admin.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub tls: TlsConfig,
    pub cluster: ClusterSection,
    pub mesh: kermail_cluster::mesh::MeshConfig,
    pub smtp: crate::smtp::SmtpConfig,
    pub imap: crate::imap::ImapConfig,
    pub outbound: crate::outbound::OutboundConfig,
    /// Login throttling shared by IMAP and SMTP AUTH.
    pub auth: crate::auth::ThrottleConfig,
    pub store: crate::store::StoreConfig,
    /// Backups (issue 11).
    pub backup: crate::backup::BackupConfig,
    /// The chunks this node keeps for other nodes' backups: quota; on a backup-only node,
    /// the cluster nodes allowed to send them.
    pub backup_store: crate::backup::BackupStoreConfig,
    /// Greylisting on the MX listener (off by default).
    pub greylist: crate::sieve::greylist::GreylistConfig,
    /// SPF, DKIM and DMARC checks of mail on the MX listener (off by default).
    pub inbound: crate::filter::InboundConfig,
    /// Spam scoring of mail on the MX listener (off by default).
    pub spam: crate::filter::SpamConfig,
    /// The ManageSieve listener (RFC 5804).
    pub managesieve: crate::managesieve::ManageSieveConfig,
    /// Mail client autoconfiguration (HTTP listener, advertised servers).
    pub autoconfig: crate::autoconfig::AutoconfigConfig,
}

/// `[node]`: who this node is and where it keeps its data.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Data folder (Raft log, snapshots, bodies, keys, admin socket). A relative path is taken
    /// relative to the configuration file's folder (to the current folder without a file).
    pub data_dir: PathBuf,
    /// The node's name in the cluster. Default: the host name.
    pub name: String,
    /// The site label (hosting provider, building): the unit of failure. Default: "default".
    pub site: String,
    /// The public host name: SMTP banner, Received headers, the TLS certificate generated on
    /// first start. Default: the node name.
    pub hostname: String,
    /// Free space reserve of the data folder, in MiB: new messages are refused below it.
    /// 0 turns the check off. Default: [`MIN_FREE_DISK_MB_DEFAULT`].
    pub min_free_disk_mb: u64,
    /// `mail` (default): a full node. `backup-store`: a backup-only member that runs the mesh
    /// and keeps other nodes' backup chunks (`[backup_store]`), and nothing else: no Raft, no
    /// mail state, no backup key, no listeners.
    pub role: NodeRole,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRole {
    #[default]
    Mail,
    BackupStore,
}

impl Default for NodeConfig {
    fn default() -> Self {
        let host = system_host_name();
        NodeConfig {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            name: host.clone(),
            site: "default".to_owned(),
            hostname: host,
            min_free_disk_mb: MIN_FREE_DISK_MB_DEFAULT,
            role: NodeRole::Mail,
        }
    }
}

/// `[tls]`: the certificate for STARTTLS and implicit TLS. When both files are unset, a
/// self-signed certificate for `node.hostname` is generated on first start and kept in the
/// data folder.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// `[cluster]`: Raft timings. `preset` picks a documented set (`lan` or `wan`); every value
/// can be overridden one by one.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    pub preset: TimingPreset,
    pub heartbeat_interval_ms: Option<u64>,
    pub election_timeout_min_ms: Option<u64>,
    pub election_timeout_max_ms: Option<u64>,
    pub install_snapshot_timeout_ms: Option<u64>,
    pub propose_timeout_ms: Option<u64>,
    pub snapshot_after_logs: Option<u64>,
    pub logs_kept_after_snapshot: Option<u64>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            preset: TimingPreset::Lan,
            heartbeat_interval_ms: None,
            election_timeout_min_ms: None,
            election_timeout_max_ms: None,
            install_snapshot_timeout_ms: None,
            propose_timeout_ms: None,
            snapshot_after_logs: None,
            logs_kept_after_snapshot: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TimingPreset {
    Lan,
    Wan,
}

impl ClusterSection {
    /// The preset's timings with this section's overrides applied.
    pub fn timings(&self) -> kermail_cluster::RaftTimings {
        let mut timings = match self.preset {
            TimingPreset::Lan => kermail_cluster::RaftTimings::lan(),
            TimingPreset::Wan => kermail_cluster::RaftTimings::wan(),
        };
        if let Some(value) = self.heartbeat_interval_ms {
            timings.heartbeat_interval_ms = value;
        }
        if let Some(value) = self.election_timeout_min_ms {
            timings.election_timeout_min_ms = value;
        }
        if let Some(value) = self.election_timeout_max_ms {
            timings.election_timeout_max_ms = value;
        }
        if let Some(value) = self.install_snapshot_timeout_ms {
            timings.install_snapshot_timeout_ms = value;
        }
        if let Some(value) = self.propose_timeout_ms {
            timings.propose_timeout_ms = value;
        }
        if let Some(value) = self.snapshot_after_logs {
            timings.snapshot_after_logs = value;
        }
        if let Some(value) = self.logs_kept_after_snapshot {
            timings.logs_kept_after_snapshot = value;
        }
        timings
    }
}

impl Config {
    /// Reads the file, or returns the embedded default when `path` is `None`. Relative paths
    /// in the file are resolved against the file's folder.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_relative_paths(base);
        config.validate()?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    fn resolve_relative_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        resolve(&mut self.node.data_dir);
        if let Some(path) = self.tls.cert_file.as_mut() {
            resolve(path);
        }
        if let Some(path) = self.tls.key_file.as_mut() {
            resolve(path);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.greylist.validate().map_err(ConfigError::Invalid)?;
        self.inbound.validate().map_err(ConfigError::Invalid)?;
        self.spam.validate().map_err(ConfigError::Invalid)?;
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(ConfigError::Invalid(
                "tls.cert_file and tls.key_file go together: set both or neither".to_owned(),
            ));
        }
        if self.node.role == NodeRole::BackupStore && self.backup_store.clients.is_empty() {
            return Err(ConfigError::Invalid(
                "[node] role = \"backup-store\" needs the cluster nodes that may store here: \
                 [[backup_store.clients]] name, public_key"
                    .to_owned(),
            ));
        }
        self.backup.validate().map_err(ConfigError::Invalid)?;
        if self.node.name.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "node.name must not be empty".to_owned(),
            ));
        }
        let timings = self.cluster.timings();
        if timings.election_timeout_min_ms <= timings.heartbeat_interval_ms
            || timings.election_timeout_max_ms <= timings.election_timeout_min_ms
        {
            return Err(ConfigError::Invalid(
                "cluster timings must satisfy heartbeat_interval_ms < election_timeout_min_ms < election_timeout_max_ms"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// The mesh key file (`mesh.key_file`, relative to the data folder).
    pub fn mesh_key_path(&self) -> PathBuf {
        if self.mesh.key_file.is_absolute() {
            self.mesh.key_file.clone()
        } else {
            self.node.data_dir.join(&self.mesh.key_file)
        }
    }

    pub fn admin_socket_path(&self) -> PathBuf {
        self.node.data_dir.join(ADMIN_SOCKET_FILE)
    }
}

fn system_host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result == 0 {
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        if let Ok(name) = std::str::from_utf8(&buffer[..end]) {
            if !name.is_empty() {
                return name.to_owned();
            }
        }
    }
    "localhost".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kermail.toml");
        let config = Config::load(Some(&path)).expect("config/kermail.toml must load");
        assert_eq!(config.node.site, "site-a");
        assert!(config.tls.cert_file.is_some());
    }

    #[test]
    fn an_empty_file_is_the_embedded_default() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.node.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(config.cluster.preset, TimingPreset::Lan);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(Config::parse("[node]\ndata_directory = \"x\"\n").is_err());
        assert!(Config::parse("[smtpd]\n").is_err());
    }

    #[test]
    fn relative_data_dir_is_taken_from_the_file_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, "[node]\ndata_dir = \"data\"\n").unwrap();
        let config = Config::load(Some(&path)).unwrap();
        assert_eq!(config.node.data_dir, dir.path().join("data"));
    }

    #[test]
    fn cert_without_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, "[tls]\ncert_file = \"c.pem\"\n").unwrap();
        assert!(matches!(
            Config::load(Some(&path)),
            Err(ConfigError::Invalid(_))
        ));
    }
}
