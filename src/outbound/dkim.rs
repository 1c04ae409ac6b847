//! DKIM keys and signing.
//!
//! A key is a [`DkimKeyRecord`]: serialisable so it can live in the replicated state, with the
//! private key as PKCS#8 DER. Ed25519 keys come from ring; RSA-2048 keys from the `openssl`
//! command (ring cannot generate RSA keys, and mail-auth's generator needs the `rsa` crate,
//! which is not in our dependency set). Signing uses mail-auth's `DkimSigner`, relaxed/relaxed.

use std::io::Write;
use std::process::{Command, Stdio};

use base64::Engine;
use mail_auth::arc::ArcSealer;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner};
use mail_auth::{ArcOutput, AuthenticatedMessage, AuthenticationResults};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

/// Headers signed when present; every one of them missing from a message is oversigned by
/// mail-auth (listed in h= without a value), and From is listed twice so that one extra From
/// cannot be added after signing.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// RSA modulus size in bits.
pub const RSA_KEY_BITS: u32 = 2048;

/// Upper bound on a message handed to the signer (it is held in memory).
pub const MAX_SIGNED_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("cannot generate the key: {0}")]
    Generate(String),
    #[error("cannot run openssl to generate an RSA key (install the openssl package): {0}")]
    Openssl(std::io::Error),
    #[error("the stored private key is invalid: {0}")]
    InvalidKey(String),
    #[error("cannot sign the message: {0}")]
    Sign(String),
    #[error("the message is larger than {MAX_SIGNED_MESSAGE_BYTES} bytes")]
    TooLarge,
    #[error("invalid selector or domain {0:?}")]
    InvalidName(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DkimAlgorithm {
    Ed25519,
    Rsa,
}

/// A DKIM key as stored in the replicated state.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DkimKeyRecord {
    pub domain: String,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// PKCS#8 DER.
    pub private_key_pkcs8_der: Vec<u8>,
    /// The p= value: base64 of the raw key (ed25519) or of the SubjectPublicKeyInfo (RSA).
    pub public_key_base64: String,
    pub created_at_unix_secs: u64,
}

impl std::fmt::Debug for DkimKeyRecord {
    // Never print the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimKeyRecord")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .field("created_at_unix_secs", &self.created_at_unix_secs)
            .finish_non_exhaustive()
    }
}

fn valid_dns_label_list(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl DkimKeyRecord {
    /// Generates a new key. `created_at_unix_secs` is passed in so the caller decides the time
    /// before proposing the record to the log.
    pub fn generate(
        domain: &str,
        selector: &str,
        algorithm: DkimAlgorithm,
        created_at_unix_secs: u64,
    ) -> Result<Self, DkimError> {
        for name in [domain, selector] {
            if !valid_dns_label_list(name) {
                return Err(DkimError::InvalidName(name.to_owned()));
            }
        }
        let (private_key_pkcs8_der, public_key) = match algorithm {
            DkimAlgorithm::Ed25519 => {
                let der =
                    Ed25519Key::generate_pkcs8().map_err(|e| DkimError::Generate(e.to_string()))?;
                let key = Ed25519Key::from_pkcs8_der(&der)
                    .map_err(|e| DkimError::Generate(e.to_string()))?;
                (der, key.public_key())
            }
            DkimAlgorithm::Rsa => {
                // OpenSSL 3.0 writes DER keys in PKCS#1 form; convert to PKCS#8.
                let pkcs1 = openssl(
                    &[
                        "genpkey",
                        "-algorithm",
                        "RSA",
                        "-pkeyopt",
                        &format!("rsa_keygen_bits:{RSA_KEY_BITS}"),
                        "-outform",
                        "DER",
                    ],
                    &[],
                )?;
                let der = openssl(
                    &[
                        "pkcs8", "-topk8", "-nocrypt", "-inform", "DER", "-outform", "DER",
                    ],
                    &pkcs1,
                )?;
                let spki = openssl(
                    &["pkey", "-inform", "DER", "-pubout", "-outform", "DER"],
                    &der,
                )?;
                // Check that ring accepts it before storing it.
                rsa_key(&der)?;
                (der, spki)
            }
        };
        Ok(Self {
            domain: domain.to_ascii_lowercase(),
            selector: selector.to_owned(),
            algorithm,
            private_key_pkcs8_der,
            public_key_base64: base64::engine::general_purpose::STANDARD.encode(public_key),
            created_at_unix_secs,
        })
    }

    /// The DNS name the TXT record goes under.
    pub fn dns_name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }

    /// The TXT record text to publish at [`Self::dns_name`].
    pub fn dns_txt_record(&self) -> String {
        let k = match self.algorithm {
            DkimAlgorithm::Ed25519 => "ed25519",
            DkimAlgorithm::Rsa => "rsa",
        };
        format!("v=DKIM1; k={k}; p={}", self.public_key_base64)
    }

    /// The private key as PEM (PKCS#8), for export.
    pub fn private_key_pem(&self) -> String {
        let body = base64::engine::general_purpose::STANDARD.encode(&self.private_key_pkcs8_der);
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in body.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(chunk));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        pem
    }

    /// Signs `message` (headers and body, CRLF line ends) and returns the DKIM-Signature
    /// header field, ending in CRLF, to prepend to it.
    pub fn sign(&self, message: &[u8]) -> Result<String, DkimError> {
        if message.len() > MAX_SIGNED_MESSAGE_BYTES {
            return Err(DkimError::TooLarge);
        }
        let signature = match self.algorithm {
            DkimAlgorithm::Ed25519 => {
                let key = Ed25519Key::from_pkcs8_der(&self.private_key_pkcs8_der)
                    .map_err(|e| DkimError::InvalidKey(e.to_string()))?;
                signer_sign(
                    DkimSigner::from_key(key),
                    &self.domain,
                    &self.selector,
                    message,
                )?
            }
            DkimAlgorithm::Rsa => {
                let key = rsa_key(&self.private_key_pkcs8_der)?;
                signer_sign(
                    DkimSigner::from_key(key),
                    &self.domain,
                    &self.selector,
                    message,
                )?
            }
        };
        Ok(signature)
    }
}

impl DkimKeyRecord {
    /// An ARC set (RFC 8617) for `message` as it will be forwarded: `ARC-Seal`,
    /// `ARC-Message-Signature` (relaxed/relaxed over [`SIGNED_HEADERS`]) and
    /// `ARC-Authentication-Results` carrying `results`, numbered after the sets `chain` (the
    /// verified chain of the message) holds; the three fields end in CRLF, to prepend.
    /// Refused when the chain already failed (`cv=fail` must not be sealed over).
    pub fn arc_seal(
        &self,
        message: &AuthenticatedMessage<'_>,
        results: &AuthenticationResults<'_>,
        chain: &ArcOutput<'_>,
    ) -> Result<String, DkimError> {
        if message.raw_message().len() > MAX_SIGNED_MESSAGE_BYTES {
            return Err(DkimError::TooLarge);
        }
        match self.algorithm {
            DkimAlgorithm::Ed25519 => {
                let key = Ed25519Key::from_pkcs8_der(&self.private_key_pkcs8_der)
                    .map_err(|e| DkimError::InvalidKey(e.to_string()))?;
                sealer_seal(ArcSealer::from_key(key), self, message, results, chain)
            }
            DkimAlgorithm::Rsa => {
                let key = rsa_key(&self.private_key_pkcs8_der)?;
                sealer_seal(ArcSealer::from_key(key), self, message, results, chain)
            }
        }
    }
}

fn sealer_seal<T: mail_auth::common::crypto::SigningKey<Hasher = Sha256>>(
    sealer: ArcSealer<T, mail_auth::dkim::NeedDomain>,
    record: &DkimKeyRecord,
    message: &AuthenticatedMessage<'_>,
    results: &AuthenticationResults<'_>,
    chain: &ArcOutput<'_>,
) -> Result<String, DkimError> {
    let set = sealer
        .domain(record.domain.as_str())
        .selector(record.selector.as_str())
        .headers(SIGNED_HEADERS.iter().copied())
        .seal(message, results, chain)
        .map_err(|e| DkimError::Sign(e.to_string()))?;
    Ok(set.to_header())
}

fn rsa_key(der: &[u8]) -> Result<RsaKey<Sha256>, DkimError> {
    RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)))
        .map_err(|e| DkimError::InvalidKey(e.to_string()))
}

fn signer_sign<T: mail_auth::common::crypto::SigningKey>(
    signer: DkimSigner<T, mail_auth::dkim::NeedDomain>,
    domain: &str,
    selector: &str,
    message: &[u8],
) -> Result<String, DkimError> {
    let signature = signer
        .domain(domain)
        .selector(selector)
        .headers(SIGNED_HEADERS.iter().copied())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
        .sign(message)
        .map_err(|e| DkimError::Sign(e.to_string()))?;
    Ok(signature.to_header())
}

fn openssl(args: &[&str], stdin: &[u8]) -> Result<Vec<u8>, DkimError> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(DkimError::Openssl)?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin).map_err(DkimError::Openssl)?;
    }
    let output = child.wait_with_output().map_err(DkimError::Openssl)?;
    if !output.status.success() || output.stdout.is_empty() {
        return Err(DkimError::Generate(format!(
            "openssl {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_auth::common::parse::TxtRecordParser;
    use mail_auth::common::verify::DomainKey;
    use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, ResolverCache, Txt};
    use std::borrow::Borrow;
    use std::collections::HashMap;
    use std::hash::Hash;
    use std::sync::Mutex;

    const MESSAGE: &str = "From: Alice <alice@example.test>\r\n\
To: Bob <bob@example.org>\r\n\
Subject: hello   there\r\n\
Date: Sat, 28 Nov 2026 06:00:00 +0000\r\n\
Message-ID: <1@example.test>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
Hello Bob,\r\n\
.leading dot and trailing spaces   \r\n\
\r\n";

    struct TxtCache(Mutex<HashMap<String, Txt>>);

    impl ResolverCache<String, Txt> for TxtCache {
        fn get<Q>(&self, key: &Q) -> Option<Txt>
        where
            String: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().get(key).cloned()
        }
        fn remove<Q>(&self, key: &Q) -> Option<Txt>
        where
            String: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().remove(key)
        }
        fn insert(&self, key: String, value: Txt, _: std::time::Instant) {
            self.0.lock().unwrap().insert(key, value);
        }
    }

    async fn mail_auth_verifies(record: &DkimKeyRecord, signed: &[u8]) -> DkimResult {
        let cache = TxtCache(Mutex::new(HashMap::new()));
        let key = DomainKey::parse(record.dns_txt_record().as_bytes()).unwrap();
        cache
            .0
            .lock()
            .unwrap()
            .insert(format!("{}.", record.dns_name()), Txt::from(key));
        // No query leaves the machine: the record is in the cache.
        let authenticator = MessageAuthenticator::new_cloudflare().unwrap();
        let message = AuthenticatedMessage::parse(signed).unwrap();
        let params = mail_auth::Parameters::new(&message).with_txt_cache(&cache);
        let output = authenticator.verify_dkim(params).await;
        output.last().unwrap().result().clone()
    }

    fn dkimpy_verifies(record: &DkimKeyRecord, signed: &[u8]) -> bool {
        let python = "/usr/bin/python3";
        let script = r#"
import sys
try:
    import dkim
except ImportError:
    print("MISSING")
    sys.exit(3)
record = sys.argv[1].encode()
message = sys.stdin.buffer.read()
ok = dkim.verify(message, dnsfunc=lambda name, timeout=5: record)
print("PASS" if ok else "FAIL")
"#;
        let mut child = Command::new(python)
            .args(["-c", script, &record.dns_txt_record()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {python} ({e}): install python3 and python3-dkim")
            });
        child.stdin.take().unwrap().write_all(signed).unwrap();
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            !text.contains("MISSING"),
            "python3-dkim is missing: apt-get install -y python3-dkim"
        );
        text.trim() == "PASS"
    }

    async fn check_algorithm(algorithm: DkimAlgorithm) {
        let record =
            DkimKeyRecord::generate("example.test", "k2026", algorithm, 1_800_000_000).unwrap();
        let header = record.sign(MESSAGE.as_bytes()).unwrap();
        assert!(header.starts_with("DKIM-Signature:"), "{header}");
        assert!(header.ends_with("\r\n"));
        assert!(header.contains("c=relaxed/relaxed"), "{header}");
        let h = header
            .split("h=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap();
        let h: String = h.chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(
            h.to_ascii_lowercase().matches("from").count(),
            2,
            "From oversigned: {h}"
        );
        let signed = format!("{header}{MESSAGE}");
        assert_eq!(
            mail_auth_verifies(&record, signed.as_bytes()).await,
            DkimResult::Pass
        );
        assert!(
            dkimpy_verifies(&record, signed.as_bytes()),
            "dkimpy rejected {header}"
        );

        // A tampered body and an added From both fail.
        let tampered = signed.replace("Hello Bob", "Hello Eve");
        assert_ne!(
            mail_auth_verifies(&record, tampered.as_bytes()).await,
            DkimResult::Pass
        );
        assert!(!dkimpy_verifies(&record, tampered.as_bytes()));
        let extra_from = format!("{header}From: mallory@evil.test\r\n{MESSAGE}");
        assert!(!dkimpy_verifies(&record, extra_from.as_bytes()));
    }

    #[tokio::test]
    async fn ed25519_signature_verifies_with_mail_auth_and_dkimpy() {
        check_algorithm(DkimAlgorithm::Ed25519).await;
    }

    #[tokio::test]
    async fn rsa_signature_verifies_with_mail_auth_and_dkimpy() {
        check_algorithm(DkimAlgorithm::Rsa).await;
    }

    #[test]
    fn record_round_trips_and_prints_the_txt_record() {
        let record =
            DkimKeyRecord::generate("Example.Test", "s1", DkimAlgorithm::Ed25519, 42).unwrap();
        assert_eq!(record.dns_name(), "s1._domainkey.example.test");
        assert!(record
            .dns_txt_record()
            .starts_with("v=DKIM1; k=ed25519; p="));
        let json = serde_json::to_string(&record).unwrap();
        let back: DkimKeyRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record);
        assert!(!format!("{record:?}").contains("private"));
        assert!(record
            .private_key_pem()
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(DkimKeyRecord::generate("bad domain", "s1", DkimAlgorithm::Ed25519, 0).is_err());
    }
}
