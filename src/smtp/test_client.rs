//! A minimal SMTP client for the driver's real-socket tests.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for any one reply.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(20);

pub struct Client<S> {
    pub stream: S,
    buffer: Vec<u8>,
}

impl Client<TcpStream> {
    pub async fn connect(address: std::net::SocketAddr) -> Client<TcpStream> {
        let stream = TcpStream::connect(address).await.expect("connect");
        Client::new(stream)
    }

    /// Runs the TLS handshake (accepting the server's self-signed certificate).
    pub async fn start_tls(
        self,
    ) -> std::io::Result<Client<tokio_rustls::client::TlsStream<TcpStream>>> {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(insecure_client_config()));
        let name = ServerName::try_from("localhost").expect("server name");
        let stream = connector.connect(name, self.stream).await?;
        Ok(Client::new(stream))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(stream: S) -> Client<S> {
        Client {
            stream,
            buffer: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    /// One whole reply (all its lines), or "" when the server closed the connection.
    pub async fn reply(&mut self) -> String {
        tokio::time::timeout(REPLY_DEADLINE, self.read_reply())
            .await
            .expect("reply within the deadline")
    }

    async fn read_reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            if let Some(end) = self.buffer.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line).into_owned();
                let last = line.as_bytes().get(3) != Some(&b'-');
                reply.push_str(&line);
                if last {
                    return reply;
                }
                continue;
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return reply,
                Ok(n_read) => self.buffer.extend_from_slice(&chunk[..n_read]),
            }
        }
    }

    /// Sends one command line and returns its reply.
    pub async fn command(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// A whole transaction with DATA; returns the reply to the end of data.
    pub async fn send_message(&mut self, from: &str, to: &[&str], message: &[u8]) -> String {
        let reply = self.command(&format!("MAIL FROM:<{from}>")).await;
        assert!(reply.starts_with("250"), "{reply}");
        for recipient in to {
            let reply = self.command(&format!("RCPT TO:<{recipient}>")).await;
            assert!(reply.starts_with("250"), "{reply}");
        }
        let reply = self.command("DATA").await;
        assert!(reply.starts_with("354"), "{reply}");
        let mut stuffed = Vec::new();
        let mut at_line_start = true;
        for &byte in message {
            if at_line_start && byte == b'.' {
                stuffed.push(b'.');
            }
            stuffed.push(byte);
            at_line_start = byte == b'\n';
        }
        if !stuffed.ends_with(b"\r\n") {
            stuffed.extend_from_slice(b"\r\n");
        }
        stuffed.extend_from_slice(b".\r\n");
        self.send(&stuffed).await;
        self.reply().await
    }
}

/// A client configuration that accepts any certificate: tests talk to a self-signed server.
pub fn insecure_client_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth()
}

#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
