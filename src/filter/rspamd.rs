//! The rspamd backend of `[spam]`: the message goes to an rspamd normal worker over its HTTP
//! protocol (`POST /checkv2` with the envelope in request headers: `IP`, `Helo`, `From`, one
//! `Rcpt` per recipient, `Queue-Id`), and its action becomes ours. A small HTTP/1.1 client
//! (one request per connection, `Connection: close`): rspamd is local or on a private
//! network, plain HTTP.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::spam::{status_field, ScanRequest, SpamAction, SpamVerdict};

/// The largest rspamd reply read (the JSON result with its symbols).
const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RspamdError {
    #[error("cannot reach rspamd at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("rspamd I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("rspamd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("rspamd answered HTTP {0}")]
    Status(u16),
    #[error("rspamd's reply is malformed: {0}")]
    Malformed(String),
}

/// Where rspamd listens.
#[derive(Debug, Clone)]
pub struct Rspamd {
    /// `host:port`.
    authority: String,
    /// The path before `/checkv2` ("" or "/prefix").
    base: String,
    timeout: Duration,
}

#[derive(Debug, Deserialize)]
struct Symbol {
    #[serde(default)]
    score: f64,
}

/// The part of rspamd's `/checkv2` JSON reply we use.
#[derive(Debug, Deserialize)]
pub struct RspamdReply {
    pub action: String,
    #[serde(default)]
    pub score: f64,
    #[serde(default)]
    pub required_score: f64,
    #[serde(default)]
    symbols: BTreeMap<String, Symbol>,
    /// The new subject of "rewrite subject".
    #[serde(default)]
    pub subject: Option<String>,
}

impl RspamdReply {
    /// Our verdict from rspamd's action.
    pub fn verdict(&self, message: &[u8]) -> SpamVerdict {
        let tests: Vec<(String, f64)> = self
            .symbols
            .iter()
            .map(|(name, symbol)| (name.clone(), symbol.score))
            .collect();
        let (action, spam, subject) = match self.action.as_str() {
            "reject" => (
                SpamAction::Reject(format!(
                    "550 5.7.1 Error: message rejected as spam (score {:.1})",
                    self.score
                )),
                true,
                None,
            ),
            "soft reject" | "greylist" => (
                SpamAction::Defer(
                    "451 4.7.1 Error: message deferred by the spam filter, try again later"
                        .to_owned(),
                ),
                true,
                None,
            ),
            "add header" => (SpamAction::Junk, true, None),
            "rewrite subject" => {
                let subject = self.subject.clone().unwrap_or_else(|| {
                    let old = mail_parser::MessageParser::default()
                        .parse_headers(message)
                        .and_then(|m| m.subject().map(str::to_owned))
                        .unwrap_or_default();
                    format!("*** SPAM *** {old}")
                });
                (SpamAction::Deliver, true, Some(subject))
            }
            _ => (SpamAction::Deliver, false, None),
        };
        SpamVerdict {
            score: self.score,
            header: status_field(spam, self.score, self.required_score, &tests),
            tests,
            action,
            subject,
        }
    }
}

/// Characters a request header value may hold (no CR, LF or other controls).
fn header_value(value: &str) -> String {
    value.chars().filter(|c| !c.is_control()).collect()
}

impl Rspamd {
    pub fn new(url: &str, timeout: Duration) -> Result<Rspamd, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("rspamd_url {url:?} is not an http:// URL"))?;
        let (authority, base) = match rest.find('/') {
            Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("rspamd_url {url:?} has no host"));
        }
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Rspamd {
            authority,
            base: base.to_owned(),
            timeout,
        })
    }

    /// Asks rspamd about one message.
    pub async fn check(&self, request: &ScanRequest<'_>) -> Result<RspamdReply, RspamdError> {
        tokio::time::timeout(self.timeout, self.exchange(request))
            .await
            .map_err(|_| RspamdError::Timeout(self.timeout))?
    }

    async fn exchange(&self, request: &ScanRequest<'_>) -> Result<RspamdReply, RspamdError> {
        let mut stream = tokio::net::TcpStream::connect(self.authority.as_str())
            .await
            .map_err(|e| RspamdError::Connect(self.authority.clone(), e))?;
        let mut head = format!(
            "POST {}/checkv2 HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Content-Length: {}\r\nIP: {}\r\nHelo: {}\r\nFrom: {}\r\n",
            self.base,
            self.authority,
            request.message.len(),
            request.client_ip,
            header_value(request.helo),
            header_value(request.mail_from),
        );
        for rcpt in request.recipients {
            head.push_str(&format!("Rcpt: {}\r\n", header_value(rcpt)));
        }
        head.push_str(&format!(
            "Queue-Id: {}\r\n\r\n",
            blake3::hash(request.message)
                .to_hex()
                .as_str()
                .get(..16)
                .unwrap_or("")
        ));
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(request.message).await?;
        stream.flush().await?;
        let mut reply = Vec::new();
        (&mut stream)
            .take(MAX_REPLY_BYTES as u64 + 1)
            .read_to_end(&mut reply)
            .await?;
        if reply.len() > MAX_REPLY_BYTES {
            return Err(RspamdError::Malformed("reply too long".into()));
        }
        let body = parse_http(&reply)?;
        serde_json::from_slice(&body).map_err(|e| RspamdError::Malformed(e.to_string()))
    }
}

/// The body of an HTTP/1.x response (Content-Length, chunked, or up to the end), if 200.
fn parse_http(reply: &[u8]) -> Result<Vec<u8>, RspamdError> {
    let end = memchr::memmem::find(reply, b"\r\n\r\n")
        .ok_or_else(|| RspamdError::Malformed("no end of the HTTP header".into()))?;
    let head = String::from_utf8_lossy(&reply[..end]);
    let body = &reply[end + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| RspamdError::Malformed("no HTTP status".into()))?;
    if status != 200 {
        return Err(RspamdError::Status(status));
    }
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            chunked = true;
        }
    }
    if chunked {
        let mut out = Vec::new();
        let mut rest = body;
        loop {
            let line_end = memchr::memmem::find(rest, b"\r\n")
                .ok_or_else(|| RspamdError::Malformed("truncated chunk".into()))?;
            let size_text = String::from_utf8_lossy(&rest[..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| RspamdError::Malformed("bad chunk size".into()))?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                return Ok(out);
            }
            if rest.len() < size {
                return Err(RspamdError::Malformed("truncated chunk".into()));
            }
            out.extend_from_slice(&rest[..size]);
            rest = rest.get(size + 2..).unwrap_or(&[]);
        }
    }
    match length {
        Some(length) if body.len() >= length => Ok(body[..length].to_vec()),
        Some(_) => Err(RspamdError::Malformed("truncated body".into())),
        None => Ok(body.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_and_actions_map() {
        let json = br#"{"action":"reject","score":1000.5,"required_score":15,"symbols":{"GTUBE":{"name":"GTUBE","score":0}}}"#;
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            json.len(),
            String::from_utf8_lossy(json)
        );
        let body = parse_http(reply.as_bytes()).unwrap();
        let parsed: RspamdReply = serde_json::from_slice(&body).unwrap();
        let verdict = parsed.verdict(b"Subject: x\r\n\r\n");
        assert!(matches!(verdict.action, SpamAction::Reject(_)));
        assert!(verdict.header.contains("tests=GTUBE=0.00"));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(parse_http(chunked).unwrap(), b"hello");
        assert!(matches!(
            parse_http(b"HTTP/1.1 500 Oops\r\n\r\n"),
            Err(RspamdError::Status(500))
        ));
        let rewrite: RspamdReply =
            serde_json::from_str(r#"{"action":"rewrite subject","score":7}"#).unwrap();
        assert_eq!(
            rewrite
                .verdict(b"Subject: hello\r\n\r\n")
                .subject
                .as_deref(),
            Some("*** SPAM *** hello")
        );
        let url = Rspamd::new("http://127.0.0.1:11333", Duration::from_secs(1)).unwrap();
        assert_eq!(url.authority, "127.0.0.1:11333");
        assert_eq!(url.base, "");
    }
}
