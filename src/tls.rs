//! TLS server configuration: a certificate from files, or a self-signed one generated on first
//! start (rcgen) and kept in the data folder so clients can pin it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// File names of the generated certificate and key inside the data folder.
pub const SELF_SIGNED_CERT_FILE: &str = "tls-cert.pem";
pub const SELF_SIGNED_KEY_FILE: &str = "tls-key.pem";

/// Installs the process-wide crypto provider (ring). Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Loads the certificate chain and key from PEM files.
pub fn from_pem_files(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_pem = std::fs::read(cert_path).map_err(|source| TlsError::Read {
        path: cert_path.to_owned(),
        source,
    })?;
    let key_pem = std::fs::read(key_path).map_err(|source| TlsError::Read {
        path: key_path.to_owned(),
        source,
    })?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: cert_path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            path: cert_path.to_owned(),
            what: "certificate",
        });
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: key_path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::Missing {
            path: key_path.to_owned(),
            what: "private key",
        })?;
    server_config(certs, key)
}

/// Uses the self-signed certificate kept in `data_dir`, generating it (for `hostnames`) when
/// it does not exist yet.
pub fn self_signed_in(
    data_dir: &Path,
    hostnames: &[String],
) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_path = data_dir.join(SELF_SIGNED_CERT_FILE);
    let key_path = data_dir.join(SELF_SIGNED_KEY_FILE);
    if !cert_path.exists() || !key_path.exists() {
        let (cert_pem, key_pem) = generate_pem(hostnames)?;
        write_private(&key_path, key_pem.as_bytes())?;
        std::fs::write(&cert_path, cert_pem.as_bytes()).map_err(|source| TlsError::Write {
            path: cert_path.clone(),
            source,
        })?;
    }
    from_pem_files(&cert_path, &key_path)
}

/// A fresh in-memory self-signed configuration, for tests.
pub fn self_signed(hostnames: &[String]) -> Result<Arc<ServerConfig>, TlsError> {
    let (cert_pem, key_pem) = generate_pem(hostnames)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: PathBuf::from("<generated>"),
            source,
        })?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|source| TlsError::Read {
            path: PathBuf::from("<generated>"),
            source,
        })?
        .ok_or(TlsError::Missing {
            path: PathBuf::new(),
            what: "private key",
        })?;
    server_config(certs, key)
}

fn generate_pem(hostnames: &[String]) -> Result<(String, String), TlsError> {
    let mut names = hostnames.to_vec();
    if names.is_empty() {
        names.push("localhost".to_owned());
    }
    let certified = rcgen::generate_simple_self_signed(names)?;
    Ok((certified.cert.pem(), certified.signing_key.serialize_pem()))
}

fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    install_crypto_provider();
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| TlsError::Write {
            path: path.to_owned(),
            source,
        })?;
    file.write_all(bytes).map_err(|source| TlsError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificate_is_reused_on_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        self_signed_in(dir.path(), &["localhost".into()]).unwrap();
        let first = std::fs::read(dir.path().join(SELF_SIGNED_CERT_FILE)).unwrap();
        self_signed_in(dir.path(), &["localhost".into()]).unwrap();
        let second = std::fs::read(dir.path().join(SELF_SIGNED_CERT_FILE)).unwrap();
        assert_eq!(first, second);
    }
}
