//! Mail client autoconfiguration (issue 13, point 5): a small HTTP/1.1 listener (plain and
//! over the node's TLS configuration) that answers
//! - Thunderbird's `GET /mail/config-v1.1.xml` (asked of `autoconfig.DOMAIN`) and
//!   `GET /.well-known/autoconfig/mail/config-v1.1.xml` (asked of `DOMAIN`),
//! - Microsoft's `POST /autodiscover/autodiscover.xml` (Outlook's POX request),
//!
//! and the DNS zone lines `kermail domain add` prints (RFC 6186 SRV records, RFC 8314
//! `_submissions`, and CNAMEs for `autoconfig.` and `autodiscover.`).
//!
//! The protocol side is sans-IO: [`respond`] takes a parsed [`Request`] and the local domains
//! and gives the [`Reply`]; the driver only reads one request (bounded, with a deadline),
//! writes the reply and closes. Only local domains get an answer (404 otherwise), so the
//! listener tells nothing about other domains. The ACME work can reuse the listener.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::store::MailStore;

/// Longest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Longest request body (an autodiscover request is a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// A connection gets this long, TLS handshake included, to send its request and read the
/// reply.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// A request path is cut to this many characters in log lines.
const MAX_LOGGED_PATH_CHARS: usize = 256;
/// Connections served at once per listener; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 64;

/// `[autoconfig]`: the listener and what it advertises.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoconfigConfig {
    /// Plain HTTP listeners. Default `["127.0.0.1:2080"]` (publicly: port 80).
    pub listen: Vec<String>,
    /// HTTPS listeners with the node's certificate. Default `["127.0.0.1:2443"]` (publicly:
    /// port 443; clients ask `https://autoconfig.DOMAIN/` first).
    pub listen_tls: Vec<String>,
    /// The host name clients are sent to for IMAP and SMTP. Default: `node.hostname`.
    pub hostname: Option<String>,
    /// Advertised IMAPS (implicit TLS) port. Default 993.
    pub imaps_port: u16,
    /// Advertised IMAP (STARTTLS) port. Default 143.
    pub imap_port: u16,
    /// Advertised submissions (implicit TLS) port. Default 465.
    pub submissions_port: u16,
    /// Advertised submission (STARTTLS) port. Default 587.
    pub submission_port: u16,
    /// TTL of the printed DNS records, in seconds. Default 3600.
    pub dns_ttl_secs: u32,
}

impl Default for AutoconfigConfig {
    fn default() -> Self {
        AutoconfigConfig {
            listen: vec!["127.0.0.1:2080".to_owned()],
            listen_tls: vec!["127.0.0.1:2443".to_owned()],
            hostname: None,
            imaps_port: 993,
            imap_port: 143,
            submissions_port: 465,
            submission_port: 587,
            dns_ttl_secs: 3600,
        }
    }
}

/// What clients are told: the configuration with the host name resolved.
#[derive(Debug, Clone)]
pub struct Advertised {
    pub hostname: String,
    pub imaps_port: u16,
    pub imap_port: u16,
    pub submissions_port: u16,
    pub submission_port: u16,
    pub dns_ttl_secs: u32,
}

impl Advertised {
    pub fn new(config: &AutoconfigConfig, node_hostname: &str) -> Advertised {
        Advertised {
            hostname: config
                .hostname
                .clone()
                .unwrap_or_else(|| node_hostname.to_owned())
                .trim_end_matches('.')
                .to_ascii_lowercase(),
            imaps_port: config.imaps_port,
            imap_port: config.imap_port,
            submissions_port: config.submissions_port,
            submission_port: config.submission_port,
            dns_ttl_secs: config.dns_ttl_secs,
        }
    }
}

/// The DNS records to publish for `domain`, as zone file lines (printed by
/// `kermail domain add`). POP3 is not offered: RFC 6186's "." target says so.
pub fn zone_lines(domain: &str, advertised: &Advertised) -> Vec<String> {
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let host = &advertised.hostname;
    let ttl = advertised.dns_ttl_secs;
    vec![
        format!("; DNS records to publish for {domain} (RFC 6186 SRV, autoconfig, autodiscover)"),
        format!(
            "_imaps._tcp.{domain}. {ttl} IN SRV 0 1 {} {host}.",
            advertised.imaps_port
        ),
        format!(
            "_imap._tcp.{domain}. {ttl} IN SRV 10 1 {} {host}.",
            advertised.imap_port
        ),
        format!(
            "_submissions._tcp.{domain}. {ttl} IN SRV 0 1 {} {host}.",
            advertised.submissions_port
        ),
        format!(
            "_submission._tcp.{domain}. {ttl} IN SRV 10 1 {} {host}.",
            advertised.submission_port
        ),
        format!("_pop3._tcp.{domain}. {ttl} IN SRV 0 0 0 ."),
        format!("_pop3s._tcp.{domain}. {ttl} IN SRV 0 0 0 ."),
        format!("_autodiscover._tcp.{domain}. {ttl} IN SRV 0 1 443 {host}."),
        format!("autoconfig.{domain}. {ttl} IN CNAME {host}."),
        format!("autodiscover.{domain}. {ttl} IN CNAME {host}."),
    ]
}

/// One parsed HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub query: String,
    /// The Host header without its port, lowercase.
    pub host: String,
    pub body: Vec<u8>,
}

/// One HTTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    fn text(status: u16, body: &str) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{body}\n"),
        }
    }

    fn xml(body: String) -> Reply {
        Reply {
            status: 200,
            content_type: "application/xml; charset=utf-8",
            body,
        }
    }

    /// The whole HTTP/1.1 response (the connection closes after it).
    pub fn to_bytes(&self, head_only: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Content Too Large",
            _ => "Error",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: max-age=3600\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            out.push_str("Allow: GET, HEAD, POST\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// The answer to one request; `is_local` says whether a domain is one of ours.
pub fn respond(
    request: &Request,
    advertised: &Advertised,
    is_local: &dyn Fn(&str) -> bool,
) -> Reply {
    let path = request.path.to_ascii_lowercase();
    match path.as_str() {
        "/mail/config-v1.1.xml" | "/.well-known/autoconfig/mail/config-v1.1.xml" => {
            if request.method != "GET" && request.method != "HEAD" {
                return Reply::text(405, "method not allowed");
            }
            // The address the client asks about names the domain; without it, the host the
            // client asked (autoconfig.DOMAIN or DOMAIN) does.
            let address = query_value(&request.query, "emailaddress");
            let domain = match &address {
                Some(address) => match address.rsplit_once('@') {
                    Some((_, domain)) => domain.to_ascii_lowercase(),
                    None => return Reply::text(400, "emailaddress is not an address"),
                },
                None => request
                    .host
                    .strip_prefix("autoconfig.")
                    .unwrap_or(&request.host)
                    .to_owned(),
            };
            if !is_local(&domain) {
                return Reply::text(404, "no such domain");
            }
            Reply::xml(thunderbird_xml(&domain, advertised))
        }
        "/autodiscover/autodiscover.xml" => {
            if request.method != "POST" {
                return Reply::text(405, "method not allowed");
            }
            let body = String::from_utf8_lossy(&request.body);
            let Some(address) = element_text(&body, "EMailAddress") else {
                return Reply::text(400, "no EMailAddress in the request");
            };
            let Some((_, domain)) = address.rsplit_once('@') else {
                return Reply::text(400, "EMailAddress is not an address");
            };
            if !is_local(&domain.to_ascii_lowercase()) {
                return Reply::text(404, "no such domain");
            }
            Reply::xml(autodiscover_xml(&address, advertised))
        }
        _ => Reply::text(404, "not found"),
    }
}

fn thunderbird_xml(domain: &str, advertised: &Advertised) -> String {
    let domain = xml_escape(domain);
    let host = xml_escape(&advertised.hostname);
    let server = |kind: &str, tag: &str, port: u16, socket: &str| {
        format!(
            "    <{tag} type=\"{kind}\">\n      <hostname>{host}</hostname>\n      \
             <port>{port}</port>\n      <socketType>{socket}</socketType>\n      \
             <authentication>password-cleartext</authentication>\n      \
             <username>%EMAILADDRESS%</username>\n    </{tag}>\n"
        )
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<clientConfig version=\"1.1\">\n  \
         <emailProvider id=\"{domain}\">\n    <domain>{domain}</domain>\n    \
         <displayName>{domain}</displayName>\n    <displayShortName>{domain}</displayShortName>\n\
         {}{}{}{}  </emailProvider>\n</clientConfig>\n",
        server("imap", "incomingServer", advertised.imaps_port, "SSL"),
        server("imap", "incomingServer", advertised.imap_port, "STARTTLS"),
        server("smtp", "outgoingServer", advertised.submissions_port, "SSL"),
        server(
            "smtp",
            "outgoingServer",
            advertised.submission_port,
            "STARTTLS"
        ),
    )
}

fn autodiscover_xml(address: &str, advertised: &Advertised) -> String {
    let address = xml_escape(address);
    let host = xml_escape(&advertised.hostname);
    let protocol = |kind: &str, port: u16| {
        format!(
            "      <Protocol>\n        <Type>{kind}</Type>\n        <Server>{host}</Server>\n        \
             <Port>{port}</Port>\n        <DomainRequired>off</DomainRequired>\n        \
             <LoginName>{address}</LoginName>\n        <SPA>off</SPA>\n        <SSL>on</SSL>\n        \
             <AuthRequired>on</AuthRequired>\n      </Protocol>\n"
        )
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n\
         <Autodiscover xmlns=\"http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006\">\n  \
         <Response xmlns=\"http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a\">\n    \
         <Account>\n      <AccountType>email</AccountType>\n      <Action>settings</Action>\n\
         {}{}    </Account>\n  </Response>\n</Autodiscover>\n",
        protocol("IMAP", advertised.imaps_port),
        protocol("SMTP", advertised.submissions_port),
    )
}

fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The text of the first `<name>...</name>` element (any namespace prefix), trimmed.
fn element_text(xml: &str, name: &str) -> Option<String> {
    let lower = xml.to_ascii_lowercase();
    let open = format!("{}>", name.to_ascii_lowercase());
    let start = lower.find(&open)? + open.len();
    let end = start + lower[start..].find('<')?;
    let text = xml[start..end].trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// A query parameter, percent-decoded (`+` as a space).
fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        k.eq_ignore_ascii_case(key).then(|| percent_decode(v))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a request could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not complete yet: read more.
    Incomplete,
    Bad(&'static str),
    TooLarge,
}

/// Parses one request from the bytes read so far.
pub fn parse_request(bytes: &[u8]) -> Result<Request, ParseError> {
    let Some(head_end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(if bytes.len() > MAX_HEAD_BYTES {
            ParseError::TooLarge
        } else {
            ParseError::Incomplete
        });
    };
    if head_end > MAX_HEAD_BYTES {
        return Err(ParseError::TooLarge);
    }
    let head = std::str::from_utf8(&bytes[..head_end]).map_err(|_| ParseError::Bad("head"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().ok_or(ParseError::Bad("request line"))?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::Bad("request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ParseError::Bad("version"));
    }
    let mut host = String::new();
    let mut content_length = 0usize;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(ParseError::Bad("header"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("host") {
            let without_port = match value.rsplit_once(':') {
                Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
                _ => value,
            };
            host = without_port.trim_end_matches('.').to_ascii_lowercase();
        } else if name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().map_err(|_| ParseError::Bad("length"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ParseError::Bad("chunked bodies are not accepted"));
        }
    }
    if content_length > MAX_BODY_BYTES {
        return Err(ParseError::TooLarge);
    }
    let body_start = head_end + 4;
    if bytes.len() < body_start + content_length {
        return Err(ParseError::Incomplete);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        host,
        body: bytes[body_start..body_start + content_length].to_vec(),
    })
}

/// Serves one listener until `shutdown`; `tls` makes it HTTPS.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    advertised: Arc<Advertised>,
    store: MailStore,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return Ok(()),
            },
        };
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "autoconfig: accept failed");
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let advertised = advertised.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let served = tokio::time::timeout(CONNECTION_DEADLINE, async {
                match acceptor {
                    Some(acceptor) => {
                        let stream = acceptor.accept(socket).await?;
                        serve_connection(stream, &advertised, &store).await
                    }
                    None => serve_connection(socket, &advertised, &store).await,
                }
            })
            .await;
            match served {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%peer, %error, "autoconfig: connection failed"),
                Err(_) => tracing::debug!(%peer, "autoconfig: connection timed out"),
            }
        });
    }
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    advertised: &Advertised,
    store: &MailStore,
) -> std::io::Result<()> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (reply, head_only) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..n]);
        match parse_request(&buffer) {
            Err(ParseError::Incomplete) => continue,
            Err(ParseError::TooLarge) => break (Reply::text(413, "request too large"), false),
            Err(ParseError::Bad(what)) => {
                tracing::info!(what, "autoconfig: bad request");
                break (Reply::text(400, "bad request"), false);
            }
            Ok(request) => {
                let domains = store.list_domains();
                let is_local = |domain: &str| domains.iter().any(|d| d == domain);
                let reply = respond(&request, advertised, &is_local);
                tracing::info!(
                    method = %request.method,
                    path = %request.path.chars().take(MAX_LOGGED_PATH_CHARS).collect::<String>(),
                    status = reply.status,
                    "autoconfig request"
                );
                break (reply, request.method == "HEAD");
            }
        }
    };
    stream.write_all(&reply.to_bytes(head_only)).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advertised() -> Advertised {
        Advertised::new(&AutoconfigConfig::default(), "mx.example.net")
    }

    fn answer(raw: &str) -> Reply {
        let request = parse_request(raw.as_bytes()).expect("complete request");
        respond(&request, &advertised(), &|d| d == "example.org")
    }

    #[test]
    fn thunderbird_by_host_and_by_address() {
        let reply =
            answer("GET /mail/config-v1.1.xml HTTP/1.1\r\nHost: autoconfig.example.org\r\n\r\n");
        assert_eq!(reply.status, 200);
        assert!(
            reply.body.contains("<domain>example.org</domain>"),
            "{}",
            reply.body
        );
        assert!(reply.body.contains("<hostname>mx.example.net</hostname>"));
        assert!(reply
            .body
            .contains("<port>993</port>\n      <socketType>SSL</socketType>"));
        assert!(reply
            .body
            .contains("<port>587</port>\n      <socketType>STARTTLS</socketType>"));
        let reply = answer(
            "GET /.well-known/autoconfig/mail/config-v1.1.xml?emailaddress=a%40Example.org HTTP/1.1\r\nHost: x:80\r\n\r\n",
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let reply =
            answer("GET /mail/config-v1.1.xml HTTP/1.1\r\nHost: autoconfig.other.test\r\n\r\n");
        assert_eq!(reply.status, 404);
        let reply = answer("DELETE /mail/config-v1.1.xml HTTP/1.1\r\nHost: example.org\r\n\r\n");
        assert_eq!(reply.status, 405);
    }

    #[test]
    fn autodiscover_answers_local_addresses_only() {
        let body = "<?xml version=\"1.0\"?><Autodiscover xmlns=\"http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006\"><Request><EMailAddress>alice@example.org</EMailAddress><AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>";
        let raw = format!(
            "POST /Autodiscover/Autodiscover.xml HTTP/1.1\r\nHost: autodiscover.example.org\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let reply = answer(&raw);
        assert_eq!(reply.status, 200);
        assert!(reply
            .body
            .contains("<LoginName>alice@example.org</LoginName>"));
        assert!(reply.body.contains("<Type>SMTP</Type>"));
        // Same length, so Content-Length still holds.
        let other = raw.replace("alice@example.org<", "alice@elsewhr.org<");
        assert_eq!(answer(&other).status, 404);
    }

    #[test]
    fn requests_are_bounded_and_checked() {
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: a"),
            Err(ParseError::Incomplete)
        );
        assert_eq!(
            parse_request(&vec![b'a'; MAX_HEAD_BYTES + 1]),
            Err(ParseError::TooLarge)
        );
        let big = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(parse_request(big.as_bytes()), Err(ParseError::TooLarge));
        assert!(matches!(
            parse_request(b"GET / SPDY/3\r\n\r\n"),
            Err(ParseError::Bad(_))
        ));
        assert_eq!(percent_decode("a%40b%2"), "a@b%2");
    }

    #[test]
    fn zone_lines_name_every_service() {
        let lines = zone_lines("Example.org.", &advertised());
        assert!(lines
            .contains(&"_imaps._tcp.example.org. 3600 IN SRV 0 1 993 mx.example.net.".to_owned()));
        assert!(lines.contains(
            &"_submission._tcp.example.org. 3600 IN SRV 10 1 587 mx.example.net.".to_owned()
        ));
        assert!(lines.contains(&"autoconfig.example.org. 3600 IN CNAME mx.example.net.".to_owned()));
    }
}
