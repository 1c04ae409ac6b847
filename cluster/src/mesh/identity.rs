//! A node's static X25519 identity and its key file.
//!
//! `node.key` holds one line: the base64 private key. The public key is derived from it, so the
//! file cannot disagree with itself. The file is created with mode 0600 and never overwritten.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use base64::Engine;

/// Bytes of an X25519 key.
pub const KEY_BYTES: usize = 32;

/// Errors reading or writing a key file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists { path: String },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} does not hold a base64 32-byte key")]
    Malformed { path: String },
    #[error("not a base64 32-byte public key")]
    BadPublicKey,
    #[error("cannot generate a key: {0}")]
    Random(String),
}

/// A node's static key pair.
#[derive(Clone)]
pub struct Identity {
    private: [u8; KEY_BYTES],
    public: [u8; KEY_BYTES],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("Identity")
            .field("public", &encode_key(&self.public))
            .finish()
    }
}

impl Identity {
    /// A fresh random key pair.
    pub fn generate() -> Result<Identity, IdentityError> {
        let mut private = [0u8; KEY_BYTES];
        getrandom_fill(&mut private)?;
        Ok(Identity::from_private(private))
    }

    /// The key pair of a private key.
    pub fn from_private(private: [u8; KEY_BYTES]) -> Identity {
        let public = curve25519_dalek::MontgomeryPoint::mul_base_clamped(private).to_bytes();
        Identity { private, public }
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; KEY_BYTES] {
        self.public
    }

    /// The public key in base64, as printed by `kermail keygen` and written in member lists.
    pub fn public_key_base64(&self) -> String {
        encode_key(&self.public)
    }

    pub(crate) fn private_key(&self) -> &[u8; KEY_BYTES] {
        &self.private
    }

    /// Reads a key file written by [`keygen`].
    pub fn load(path: &Path) -> Result<Identity, IdentityError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
            path: shown.clone(),
            source,
        })?;
        let private =
            decode_key(text.trim()).map_err(|_| IdentityError::Malformed { path: shown })?;
        Ok(Identity::from_private(private))
    }

    /// Reads the key file, creating it first when it does not exist (first start).
    pub fn load_or_create(path: &Path) -> Result<Identity, IdentityError> {
        if path.exists() {
            return Identity::load(path);
        }
        keygen(path)?;
        Identity::load(path)
    }
}

fn getrandom_fill(out: &mut [u8]) -> Result<(), IdentityError> {
    use rand::RngCore;
    rand::rngs::OsRng
        .try_fill_bytes(out)
        .map_err(|e| IdentityError::Random(e.to_string()))
}

/// Base64 (standard, padded) of a key.
pub fn encode_key(key: &[u8; KEY_BYTES]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Parses a base64 key.
pub fn decode_key(text: &str) -> Result<[u8; KEY_BYTES], IdentityError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| IdentityError::BadPublicKey)?;
    bytes.try_into().map_err(|_| IdentityError::BadPublicKey)
}

/// Creates a new key file at `path` (mode 0600, refusing to overwrite an existing file) and
/// returns the base64 public key. This is `kermail keygen`.
pub fn keygen(path: &Path) -> Result<String, IdentityError> {
    let shown = path.display().to_string();
    let identity = Identity::generate()?;
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            IdentityError::Exists {
                path: shown.clone(),
            }
        } else {
            IdentityError::Write {
                path: shown.clone(),
                source,
            }
        }
    })?;
    let line = format!("{}\n", encode_key(identity.private_key()));
    file.write_all(line.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|source| IdentityError::Write {
            path: shown,
            source,
        })?;
    Ok(identity.public_key_base64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_0600_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let public = keygen(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(Identity::load(&path).unwrap().public_key_base64(), public);
        assert!(matches!(keygen(&path), Err(IdentityError::Exists { .. })));
        assert_eq!(
            Identity::load_or_create(&path).unwrap().public_key_base64(),
            public
        );
        assert!(!format!("{:?}", Identity::load(&path).unwrap())
            .contains(&std::fs::read_to_string(&path).unwrap().trim().to_string()));
    }
}
