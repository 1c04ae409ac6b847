//! CATENATE (RFC 4469): `APPEND box [flags] [date] CATENATE (TEXT {n}... URL "..." ...)`
//! builds the appended message from literal text and parts of messages already stored, named
//! by IMAP URLs (RFC 5092) in their absolute-path form (`/INBOX;UIDVALIDITY=1/;UID=5/;SECTION=1.2`).
//!
//! The parser side ([`parse_catenate`], [`parse_url`]) is pure and runs before imap-codec,
//! which knows neither CATENATE nor literal8: `multiappend::split` hands imap-codec the
//! APPEND with an empty literal and carries the parts here. The handler side
//! ([`Session::catenate`]) resolves each URL against the mailboxes of the authenticated
//! account only (no URLAUTH, no other account, no other server) and joins the parts; the
//! result is appended like any other message, so nothing new is replicated.
//!
//! Refusals: a URL that does not parse or names nothing readable is `NO [BADURL url]`; a
//! result over the literal limit is `NO [TOOBIG]`; a TEXT part given as an ordinary literal
//! must not hold a NUL (RFC 3516 4.4: only literal8 may).

use std::num::NonZeroU32;

use imap_codec::decode::Decoder;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItemName};
use imap_codec::CommandCodec;

use super::cache::read_bodies;
use super::fetch::ParsedMessage;
use super::mailboxes::read_spill;
use super::multiappend::literal_at;
use super::session::Session;
use crate::store::AccountId;

/// Most parts in one CATENATE: each URL costs a body read, so the count is bounded.
pub const MAX_CATENATE_PARTS: usize = 100;

/// Longest URL accepted (RFC 5092 sets none; real ones are far shorter). It also bounds the
/// URL echoed in `NO [BADURL ...]`.
pub const MAX_URL_BYTES: usize = 1024;

/// Longest section text in a URL, as for `BINARY[...]`.
const MAX_SECTION_BYTES: usize = 200;

/// One part of a CATENATE list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatPart {
    /// `TEXT literal` or `TEXT literal8`.
    Text {
        bytes: Vec<u8>,
        /// Given as literal8 (`~{n}`): NULs are allowed.
        literal8: bool,
        /// Announced `{0+}` in the command the session runs: a large literal that arrived
        /// in the spill file.
        maybe_spilled: bool,
    },
    /// `URL astring`: the URL as sent.
    Url(Vec<u8>),
}

/// Why a URL names nothing this server can give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("malformed IMAP URL: {0}")]
    Malformed(&'static str),
    #[error("only URLs of this server's own mailboxes (starting with /) are supported")]
    NotAbsolutePath,
    #[error("URLAUTH is not supported")]
    Urlauth,
    #[error("no such mailbox")]
    NoMailbox,
    #[error("UIDVALIDITY does not match")]
    StaleUidvalidity,
    #[error("no message with that UID")]
    NoMessage,
    #[error("the message cannot be read now")]
    Unreadable,
}

/// A parsed IMAP URL naming a message or a part of one (RFC 5092 `imessagepart`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImapUrl {
    /// Percent-decoded mailbox name.
    pub mailbox: String,
    pub uidvalidity: Option<u32>,
    pub uid: u32,
    /// Percent-decoded section text (`1.2`, `HEADER`, `1.MIME`, ...).
    pub section: Option<String>,
    /// `;PARTIAL=offset[.length]`.
    pub partial: Option<(u32, Option<NonZeroU32>)>,
}

/// Why an APPEND's message data is refused (answered by [`refuse`]).
#[derive(Debug)]
pub enum Refusal {
    BadUrl { url: Vec<u8>, error: UrlError },
    TooBig,
    NulInLiteral,
    Spill(std::io::Error),
}

/// Writes the tagged answer for `refusal`.
pub fn refuse(out: &mut Vec<u8>, tag: &str, refusal: &Refusal) {
    use super::response::tagged;
    match refusal {
        Refusal::BadUrl { url, error } => {
            let code = format!("BADURL {}", url_resp_text(url));
            tagged(out, tag, "NO", Some(&code), &error.to_string());
        }
        Refusal::TooBig => tagged(out, tag, "NO", Some("TOOBIG"), "message too large"),
        Refusal::NulInLiteral => tagged(
            out,
            tag,
            "BAD",
            None,
            "a literal holds a NUL; send it as literal8 (~{n})",
        ),
        Refusal::Spill(error) => {
            tracing::warn!(%error, "cannot read an APPEND spill file");
            tagged(out, tag, "NO", Some("SERVERBUG"), "try again later")
        }
    }
}

/// The URL as a response code may carry it (RFC 4469 `url-resp-text`: no CR, LF, NUL or
/// `]`): such bytes, spaces and non-ASCII are percent-encoded; at most [`MAX_URL_BYTES`].
fn url_resp_text(url: &[u8]) -> String {
    let mut text = String::new();
    for &b in url.iter().take(MAX_URL_BYTES) {
        if b.is_ascii_graphic() && b != b']' {
            text.push(char::from(b));
        } else {
            text.push_str(&format!("%{b:02X}"));
        }
    }
    if text.is_empty() {
        text.push_str("%00");
    }
    text
}

fn starts_with_ignore_case(bytes: &[u8], prefix: &[u8]) -> bool {
    bytes.len() >= prefix.len() && bytes[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// The end of a quoted string starting at `at` (just after its closing quote) and its
/// unescaped content.
fn quoted_at(bytes: &[u8], at: usize) -> Option<(Vec<u8>, usize)> {
    let mut i = at + 1;
    let mut content = Vec::new();
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => {
                content.push(*bytes.get(i + 1)?);
                i += 2;
            }
            b'"' => return Some((content, i + 1)),
            b'\r' | b'\n' => return None,
            b => {
                content.push(b);
                i += 1;
            }
        }
    }
    None
}

/// `CATENATE (cat-part *(SP cat-part))` at `at`: the parts and the position after `)`.
/// `Ok(None)` if there is no CATENATE at `at`.
pub fn parse_catenate(
    bytes: &[u8],
    at: usize,
    spilled_at: Option<usize>,
) -> Result<Option<(Vec<CatPart>, usize)>, &'static str> {
    let Some(rest) = bytes.get(at..) else {
        return Ok(None);
    };
    if !starts_with_ignore_case(rest, b"CATENATE ") {
        return Ok(None);
    }
    let mut at = at + 9;
    if bytes.get(at) != Some(&b'(') {
        return Err("CATENATE takes a parenthesized list");
    }
    at += 1;
    let mut parts = Vec::new();
    loop {
        if parts.len() >= MAX_CATENATE_PARTS {
            return Err("too many CATENATE parts");
        }
        let rest = &bytes[at..];
        if starts_with_ignore_case(rest, b"TEXT ") {
            let literal = literal_at(bytes, at + 5, true).ok_or("TEXT takes a literal")?;
            parts.push(CatPart::Text {
                bytes: bytes[literal.start..literal.start + literal.length].to_vec(),
                literal8: literal.literal8,
                maybe_spilled: literal.maybe_spilled && spilled_at == Some(literal.start),
            });
            at = literal.start + literal.length;
        } else if starts_with_ignore_case(rest, b"URL ") {
            at += 4;
            let (url, end) = match bytes.get(at) {
                Some(b'"') => quoted_at(bytes, at).ok_or("unterminated quoted URL")?,
                Some(b'{') => {
                    let literal = literal_at(bytes, at, false).ok_or("malformed URL literal")?;
                    let end = literal.start + literal.length;
                    (bytes[literal.start..end].to_vec(), end)
                }
                _ => {
                    let len = bytes[at..]
                        .iter()
                        .position(|&b| matches!(b, b' ' | b')' | b'\r' | b'\n'))
                        .ok_or("unterminated URL")?;
                    (bytes[at..at + len].to_vec(), at + len)
                }
            };
            if url.is_empty() || url.len() > MAX_URL_BYTES {
                return Err("URL empty or too long");
            }
            parts.push(CatPart::Url(url));
            at = end;
        } else {
            return Err("CATENATE parts are TEXT literal or URL url");
        }
        match bytes.get(at) {
            Some(b' ') => at += 1,
            Some(b')') => return Ok(Some((parts, at + 1))),
            _ => return Err("malformed CATENATE list"),
        }
    }
}

/// Percent-decodes `text` (RFC 3986 pct-encoded); `None` for a broken escape.
fn percent_decode(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' {
            let hex = std::str::from_utf8(text.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Position of `needle` in `haystack`, ignoring ASCII case.
fn find_ignore_case(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window.eq_ignore_ascii_case(needle))
}

fn nz_number(digits: &[u8]) -> Result<u32, UrlError> {
    let valid = !digits.is_empty()
        && digits.len() <= 10
        && digits.iter().all(u8::is_ascii_digit)
        && digits[0] != b'0';
    let number = valid
        .then(|| std::str::from_utf8(digits).ok()?.parse::<u32>().ok())
        .flatten();
    number.ok_or(UrlError::Malformed("expected a non-zero number"))
}

/// Parses an IMAP URL in its absolute-path form:
/// `/mailbox[;UIDVALIDITY=n]/;UID=n[/;SECTION=s][/;PARTIAL=o[.l]]`.
pub fn parse_url(url: &[u8]) -> Result<ImapUrl, UrlError> {
    if url.len() > MAX_URL_BYTES {
        return Err(UrlError::Malformed("too long"));
    }
    if find_ignore_case(url, b";URLAUTH=").is_some() {
        return Err(UrlError::Urlauth);
    }
    let Some(path) = url.strip_prefix(b"/") else {
        return Err(UrlError::NotAbsolutePath);
    };
    if path.starts_with(b"/") {
        // `//host/...`: a network-path reference, another server's.
        return Err(UrlError::NotAbsolutePath);
    }
    let uid_at = find_ignore_case(path, b"/;UID=").ok_or(UrlError::Malformed("no ;UID="))?;
    let mut mailbox_ref = &path[..uid_at];
    let mut uidvalidity = None;
    if let Some(semicolon) = mailbox_ref.iter().position(|&b| b == b';') {
        let parameter = &mailbox_ref[semicolon..];
        if !starts_with_ignore_case(parameter, b";UIDVALIDITY=") {
            return Err(UrlError::Malformed("unknown mailbox parameter"));
        }
        uidvalidity = Some(nz_number(&parameter[13..])?);
        mailbox_ref = &mailbox_ref[..semicolon];
    }
    if mailbox_ref.is_empty() {
        return Err(UrlError::Malformed("no mailbox"));
    }
    let mailbox = percent_decode(mailbox_ref)
        .and_then(|name| String::from_utf8(name).ok())
        .filter(|name| !name.chars().any(char::is_control))
        .ok_or(UrlError::Malformed("mailbox name"))?;
    let rest = &path[uid_at + 6..];
    let uid_len = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
    let uid = nz_number(&rest[..uid_len])?;
    let mut rest = &rest[uid_len..];
    let mut section = None;
    if starts_with_ignore_case(rest, b"/;SECTION=") {
        let value = &rest[10..];
        let end = find_ignore_case(value, b"/;PARTIAL=").unwrap_or(value.len());
        let text = percent_decode(&value[..end])
            .and_then(|text| String::from_utf8(text).ok())
            .ok_or(UrlError::Malformed("section"))?;
        let valid = !text.is_empty()
            && text.len() <= MAX_SECTION_BYTES
            && text
                .bytes()
                .all(|b| (b.is_ascii_graphic() || b == b' ') && !b"[]{}\\".contains(&b));
        if !valid {
            return Err(UrlError::Malformed("section"));
        }
        section = Some(text);
        rest = &value[end..];
    }
    let mut partial = None;
    if starts_with_ignore_case(rest, b"/;PARTIAL=") {
        let value = &rest[10..];
        let (offset, length) = match value.iter().position(|&b| b == b'.') {
            Some(dot) => (&value[..dot], Some(&value[dot + 1..])),
            None => (value, None),
        };
        let offset_valid =
            !offset.is_empty() && offset.len() <= 10 && offset.iter().all(u8::is_ascii_digit);
        let offset = offset_valid
            .then(|| std::str::from_utf8(offset).ok()?.parse::<u32>().ok())
            .flatten()
            .ok_or(UrlError::Malformed("partial offset"))?;
        let length = length
            .map(|digits| nz_number(digits).map(|n| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)))
            .transpose()?;
        partial = Some((offset, length));
        rest = &[];
    }
    if !rest.is_empty() {
        return Err(UrlError::Malformed("unexpected text after the UID"));
    }
    Ok(ImapUrl {
        mailbox,
        uidvalidity,
        uid,
        section,
        partial,
    })
}

/// The bytes `section` names in `raw` (what `BODY.PEEK[section]` gives), read with
/// imap-codec's own section grammar.
pub fn section_content(raw: &[u8], section: Option<&str>) -> Result<Vec<u8>, UrlError> {
    let parsed = ParsedMessage::parse(raw);
    let Some(section) = section else {
        return Ok(raw.to_vec());
    };
    let command = format!("u FETCH 1 BODY.PEEK[{section}]\r\n");
    let Ok((_, command)) = CommandCodec::default().decode(command.as_bytes()) else {
        return Err(UrlError::Malformed("section"));
    };
    let CommandBody::Fetch {
        macro_or_item_names: MacroOrMessageDataItemNames::MessageDataItemNames(items),
        ..
    } = command.body
    else {
        return Err(UrlError::Malformed("section"));
    };
    match items.first() {
        Some(MessageDataItemName::BodyExt { section, .. }) if items.len() == 1 => {
            Ok(parsed.section(section.as_ref()))
        }
        _ => Err(UrlError::Malformed("section")),
    }
}

/// `bytes` cut to `;PARTIAL=offset[.length]`.
fn apply_url_partial(bytes: Vec<u8>, partial: Option<(u32, Option<NonZeroU32>)>) -> Vec<u8> {
    let Some((offset, length)) = partial else {
        return bytes;
    };
    let start = (offset as usize).min(bytes.len());
    let end = match length {
        Some(length) => start.saturating_add(length.get() as usize).min(bytes.len()),
        None => bytes.len(),
    };
    bytes[start..end].to_vec()
}

impl Session {
    /// The content `url` names in a mailbox of `account`.
    async fn url_content(&self, account: AccountId, url: &[u8]) -> Result<Vec<u8>, UrlError> {
        let url = parse_url(url)?;
        let view = self
            .store
            .mailbox_by_name(account, &url.mailbox)
            .ok_or(UrlError::NoMailbox)?;
        if url.uidvalidity.is_some_and(|v| v != view.uidvalidity) {
            return Err(UrlError::StaleUidvalidity);
        }
        let blob = view
            .messages
            .position_of(url.uid)
            .and_then(|index| view.messages.get(index))
            .map(|meta| meta.blob)
            .ok_or(UrlError::NoMessage)?;
        drop(view);
        let raw = read_bodies(&self.store, &[blob])
            .await
            .pop()
            .flatten()
            .ok_or(UrlError::Unreadable)?;
        let content = section_content(&raw, url.section.as_deref())?;
        Ok(apply_url_partial(content, url.partial))
    }

    /// The message the CATENATE `parts` make, at most `max_literal_size_bytes` long. A TEXT
    /// part announced `{0+}` takes the spilled literal, if one is left in `spilled`.
    pub(super) async fn catenate(
        &self,
        account: AccountId,
        parts: Vec<CatPart>,
        spilled: &mut Option<std::fs::File>,
    ) -> Result<Vec<u8>, Refusal> {
        let max_bytes = self.config.max_literal_size_bytes as usize;
        let mut message = Vec::new();
        for part in parts {
            match part {
                CatPart::Text {
                    bytes,
                    literal8,
                    maybe_spilled,
                } => {
                    let bytes = match (maybe_spilled, spilled.take()) {
                        (true, Some(file)) => read_spill(file).await.map_err(Refusal::Spill)?,
                        (_, file) => {
                            *spilled = file;
                            bytes
                        }
                    };
                    if !literal8 && bytes.contains(&0) {
                        return Err(Refusal::NulInLiteral);
                    }
                    message.extend_from_slice(&bytes);
                }
                CatPart::Url(url) => match self.url_content(account, &url).await {
                    Ok(bytes) => message.extend_from_slice(&bytes),
                    Err(error) => return Err(Refusal::BadUrl { url, error }),
                },
            }
            if message.len() > max_bytes {
                return Err(Refusal::TooBig);
            }
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn urls_of_this_server_parse() {
        assert_eq!(
            parse_url(b"/INBOX;UIDVALIDITY=1/;UID=5/;SECTION=1.2"),
            Ok(ImapUrl {
                mailbox: "INBOX".into(),
                uidvalidity: Some(1),
                uid: 5,
                section: Some("1.2".into()),
                partial: None,
            })
        );
        assert_eq!(
            parse_url(b"/Sent%20Items/;uid=7/;section=HEADER.FIELDS%20(FROM)/;partial=2.10"),
            Ok(ImapUrl {
                mailbox: "Sent Items".into(),
                uidvalidity: None,
                uid: 7,
                section: Some("HEADER.FIELDS (FROM)".into()),
                partial: Some((2, NonZeroU32::new(10))),
            })
        );
        assert_eq!(
            parse_url(b"/a/b/;UID=1").map(|u| u.mailbox),
            Ok("a/b".into())
        );
        let refused: &[(&[u8], UrlError)] = &[
            (b"imap://h/INBOX/;UID=1", UrlError::NotAbsolutePath),
            (b"//h/INBOX/;UID=1", UrlError::NotAbsolutePath),
            (b"INBOX/;UID=1", UrlError::NotAbsolutePath),
            (
                b"/INBOX/;UID=1;URLAUTH=anonymous:internal:x",
                UrlError::Urlauth,
            ),
        ];
        for (url, error) in refused {
            assert_eq!(parse_url(url).as_ref(), Err(error), "{url:?}");
        }
        for url in [
            &b"/INBOX"[..],
            b"/INBOX/;UID=0",
            b"/INBOX/;UID=x",
            b"/;UID=1",
            b"/INBOX;UIDVALIDITY=/;UID=1",
            b"/INBOX;FOO=1/;UID=1",
            b"/INBOX/;UID=1/;SECTION=1]",
            b"/INBOX/;UID=1/;SECTION=",
            b"/INBOX/;UID=1/junk",
            b"/INBOX/;UID=1/;PARTIAL=1.0",
            b"/IN%ZZBOX/;UID=1",
            b"/IN%0ABOX/;UID=1",
        ] {
            assert!(
                matches!(parse_url(url), Err(UrlError::Malformed(_))),
                "{url:?}"
            );
        }
    }

    #[test]
    fn catenate_lists_parse() {
        let command = b"CATENATE (TEXT {3}\r\nabc URL \"/INBOX/;UID=1\" TEXT ~{2}\r\n\0x URL /A/;UID=2 URL {13}\r\n/INBOX/;UID=3) rest";
        let (parts, end) = parse_catenate(command, 0, None).unwrap().unwrap();
        assert_eq!(&command[end..], b" rest");
        assert_eq!(
            parts,
            vec![
                CatPart::Text {
                    bytes: b"abc".to_vec(),
                    literal8: false,
                    maybe_spilled: false
                },
                CatPart::Url(b"/INBOX/;UID=1".to_vec()),
                CatPart::Text {
                    bytes: b"\0x".to_vec(),
                    literal8: true,
                    maybe_spilled: false
                },
                CatPart::Url(b"/A/;UID=2".to_vec()),
                CatPart::Url(b"/INBOX/;UID=3".to_vec()),
            ]
        );
        assert_eq!(parse_catenate(b"{3}\r\nabc", 0, None), Ok(None));
        for bad in [
            &b"CATENATE TEXT {1}\r\na"[..],
            b"CATENATE ()",
            b"CATENATE (TEXT abc)",
            b"CATENATE (URL \"/x)",
            b"CATENATE (TEXT {5}\r\nab)",
            b"CATENATE (URL /a/;UID=1",
        ] {
            assert!(parse_catenate(bad, 0, None).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sections_are_read_with_the_fetch_grammar() {
        let raw = b"Subject: s\r\nFrom: a@b\r\n\r\nbody";
        assert_eq!(section_content(raw, None).unwrap(), raw.to_vec());
        assert_eq!(
            section_content(raw, Some("TEXT")).unwrap(),
            b"body".to_vec()
        );
        assert_eq!(
            section_content(raw, Some("HEADER.FIELDS (FROM)")).unwrap(),
            b"From: a@b\r\n\r\n".to_vec()
        );
        assert!(section_content(raw, Some("1] BODY[2")).is_err());
        assert!(section_content(raw, Some("NOPE")).is_err());
    }

    #[test]
    fn badurl_codes_stay_in_their_response_code() {
        assert_eq!(url_resp_text(b"/a b]/;UID=1\r\n"), "/a%20b%5D/;UID=1%0D%0A");
        assert_eq!(url_resp_text(b""), "%00");
    }

    proptest! {
        #[test]
        fn url_parser_never_panics(url in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_url(&url);
        }

        #[test]
        fn url_like_text_never_panics(url in "/[A-Za-z%0-9;=/.]{0,40}(;UID=|/;UID=)[0-9]{0,12}(/;SECTION=[0-9A-Z.%() ]{0,20})?(/;PARTIAL=[0-9.]{0,12})?") {
            if let Ok(parsed) = parse_url(url.as_bytes()) {
                prop_assert!(parsed.uid > 0);
                if let Some(section) = parsed.section {
                    let _ = section_content(b"Subject: x\r\n\r\nbody", Some(&section));
                }
            }
        }

        #[test]
        fn catenate_parser_never_panics(bytes in prop::collection::vec(
            prop_oneof![Just(b'('), Just(b')'), Just(b' '), Just(b'{'), Just(b'}'), Just(b'~'),
                        Just(b'\r'), Just(b'\n'), Just(b'"'), Just(b'1'), Just(b'+'),
                        Just(b'T'), Just(b'U'), any::<u8>()], 0..80)) {
            let mut command = b"CATENATE (".to_vec();
            command.extend_from_slice(&bytes);
            let _ = parse_catenate(&command, 0, None);
            let mut command = b"CATENATE (TEXT ".to_vec();
            command.extend_from_slice(&bytes);
            let _ = parse_catenate(&command, 0, None);
        }
    }
}
