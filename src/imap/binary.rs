//! BINARY (RFC 3516): the FETCH items `BINARY[section]<partial>`, `BINARY.PEEK[...]` and
//! `BINARY.SIZE[section]`, a part's content with its Content-Transfer-Encoding undone.
//! (APPEND of literal8 data, RFC 3516 4.4, is `multiappend::split`'s and `catenate.rs`'s.)
//!
//! imap-codec 1.0 knows none of these items: [`rewrite_fetch`] turns each into the
//! `BODY[...]` item of the same section (`BODY[...]` for `BINARY[...]`, so that \Seen is set
//! the same way; `BODY.PEEK[...]` for the others) and remembers its position in the item
//! list, and the FETCH loop writes the decoded answer in its place ([`binary_content`]).
//!
//! What is decoded: base64 and quoted-printable (mail-parser's decoders); 7bit, 8bit, binary
//! and no header at all give the bytes as they are; anything else is `NO [UNKNOWN-CTE]`.
//! `BINARY[]` (no part number) is the whole message as stored, not decoded.

use std::borrow::Cow;
use std::io::Write;

use imap_codec::imap_types::fetch::Section;

use super::fetch::{first_field, unfold, ParsedMessage};
use super::fetch_items::split_fetch;

/// Longest section text (`1.2.3...`) accepted inside `BINARY[...]`: part numbers nest at
/// most as deep as the MIME tree the parser builds.
const MAX_SECTION_BYTES: usize = 200;

/// What one rewritten item asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryKind {
    /// `BINARY[...]` or `BINARY.PEEK[...]`: the decoded bytes (after `<partial>`).
    Content,
    /// `BINARY.SIZE[...]`: the decoded length.
    Size,
}

/// The rewritten items of a FETCH: (position in the item list, kind).
pub type BinaryItems = Vec<(usize, BinaryKind)>;

/// The content-transfer-encoding of a part is not one the server can undo.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown content-transfer-encoding")]
pub struct UnknownCte;

/// `body` with the content-transfer-encoding `cte` (as in the header, any case) undone.
/// Malformed encoded data is decoded leniently (never an error, never a panic).
pub fn decode<'a>(cte: &[u8], body: &'a [u8]) -> Result<Cow<'a, [u8]>, UnknownCte> {
    let cte = cte.trim_ascii().to_ascii_lowercase();
    match cte.as_slice() {
        b"" | b"7bit" | b"8bit" | b"binary" => Ok(Cow::Borrowed(body)),
        b"base64" => Ok(Cow::Owned(decode_base64(body))),
        b"quoted-printable" => Ok(Cow::Owned(
            mail_parser::decoders::quoted_printable::quoted_printable_decode(body)
                .unwrap_or_else(|| body.to_vec()),
        )),
        _ => Err(UnknownCte),
    }
}

/// Base64 that skips every byte outside the alphabet (line breaks, stray characters) and
/// stops at the first `=`, as RFC 2045 6.8 asks of a decoder.
fn decode_base64(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() / 4 * 3);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &b in body {
        let value = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// The decoded content of `BINARY[section]` (before `<partial>`); `None` is the whole
/// message as stored. A part that does not exist is empty.
pub fn binary_content(
    parsed: &ParsedMessage<'_>,
    section: Option<&Section<'_>>,
) -> Result<Vec<u8>, UnknownCte> {
    let Some(Section::Part(part)) = section else {
        return Ok(parsed.raw().to_vec());
    };
    let mime = parsed.section(Some(&Section::Mime(part.clone())));
    let body = parsed.section(section);
    let cte = first_field(&mime, b"content-transfer-encoding")
        .map(|field| unfold(field.value))
        .unwrap_or_default();
    decode(&cte, &body).map(Cow::into_owned)
}

/// Writes a `BINARY[...]` value: a literal8 (`~{n}`) when it holds a NUL (RFC 3516 4.3),
/// else an ordinary literal.
pub fn write_value(out: &mut Vec<u8>, bytes: &[u8]) {
    let prefix = if bytes.contains(&0) { "~" } else { "" };
    let _ = write!(out, "{prefix}{{{}}}\r\n", bytes.len());
    out.extend_from_slice(bytes);
}

/// `[1.2]` for a section (empty for `None`), as a FETCH response names it.
pub fn section_text(section: Option<&Section<'_>>) -> String {
    match section {
        Some(Section::Part(part)) => part
            .0
            .as_ref()
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("."),
        _ => String::new(),
    }
}

fn starts_with_ignore_case(bytes: &[u8], prefix: &[u8]) -> bool {
    bytes.len() >= prefix.len() && bytes[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// One item rewritten to its `BODY` twin; `Ok(None)` if it is no BINARY item.
fn rewrite_item(item: &[u8]) -> Result<Option<(Vec<u8>, BinaryKind)>, &'static str> {
    let (prefix_len, twin, kind) = if starts_with_ignore_case(item, b"BINARY.PEEK[") {
        (12, &b"BODY.PEEK["[..], BinaryKind::Content)
    } else if starts_with_ignore_case(item, b"BINARY.SIZE[") {
        (12, &b"BODY.PEEK["[..], BinaryKind::Size)
    } else if starts_with_ignore_case(item, b"BINARY[") {
        (7, &b"BODY["[..], BinaryKind::Content)
    } else {
        return Ok(None);
    };
    let rest = &item[prefix_len..];
    let close = rest
        .iter()
        .position(|&b| b == b']')
        .ok_or("BINARY section without ]")?;
    let section = &rest[..close];
    let valid_section = section.len() <= MAX_SECTION_BYTES
        && (section.is_empty()
            || section.split(|&b| b == b'.').all(|number| {
                !number.is_empty()
                    && number.iter().all(u8::is_ascii_digit)
                    && number[0] != b'0'
                    && number.len() <= 9
            }));
    if !valid_section {
        return Err("BINARY takes only part numbers as section");
    }
    let tail = &rest[close + 1..];
    if kind == BinaryKind::Size && !tail.is_empty() {
        return Err("BINARY.SIZE takes no partial");
    }
    let mut rewritten = twin.to_vec();
    rewritten.extend_from_slice(section);
    rewritten.push(b']');
    rewritten.extend_from_slice(tail);
    Ok(Some((rewritten, kind)))
}

/// For `tag [UID] FETCH set items ...` naming BINARY items: the command with each turned
/// into its `BODY` twin, and where they are. `Ok(None)` if there is none; `Err` for a
/// malformed BINARY item (a BAD).
pub fn rewrite_fetch(bytes: &[u8]) -> Result<Option<(Vec<u8>, BinaryItems)>, &'static str> {
    let Some(fetch) = split_fetch(bytes) else {
        return Ok(None);
    };
    let mut items: Vec<Cow<'_, [u8]>> = Vec::with_capacity(fetch.items.len());
    let mut found = BinaryItems::new();
    for &item in &fetch.items {
        match rewrite_item(item)? {
            Some((twin, kind)) => {
                found.push((items.len(), kind));
                items.push(Cow::Owned(twin));
            }
            None => items.push(Cow::Borrowed(item)),
        }
    }
    if found.is_empty() {
        return Ok(None);
    }
    Ok(Some((fetch.join(&items), found)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rewrite(text: &str) -> Result<Option<(String, BinaryItems)>, &'static str> {
        rewrite_fetch(text.as_bytes()).map(|r| r.map(|(b, i)| (String::from_utf8(b).unwrap(), i)))
    }

    #[test]
    fn binary_items_become_body_items_at_known_positions() {
        assert_eq!(
            rewrite("a UID FETCH 1:* (FLAGS BINARY.PEEK[1.2]<0.10> binary.size[2] BINARY[])\r\n"),
            Ok(Some((
                "a UID FETCH 1:* (FLAGS BODY.PEEK[1.2]<0.10> BODY.PEEK[2] BODY[])\r\n".into(),
                vec![
                    (1, BinaryKind::Content),
                    (2, BinaryKind::Size),
                    (3, BinaryKind::Content)
                ]
            )))
        );
        assert_eq!(
            rewrite("b FETCH 1 BINARY[1]\r\n"),
            Ok(Some((
                "b FETCH 1 BODY[1]\r\n".into(),
                vec![(0, BinaryKind::Content)]
            )))
        );
        assert_eq!(rewrite("c FETCH 1 (BODY[1] FLAGS)\r\n"), Ok(None));
        assert_eq!(rewrite("d SEARCH ALL\r\n"), Ok(None));
        assert!(rewrite("e FETCH 1 BINARY[HEADER]\r\n").is_err());
        assert!(rewrite("f FETCH 1 (BINARY.SIZE[1]<0.5>)\r\n").is_err());
        assert!(rewrite("g FETCH 1 (BINARY[1.0])\r\n").is_err());
        let command = "h FETCH 1:* (UID BINARY.PEEK[1.2]<3.4> BINARY.SIZE[1])\r\n";
        for end in 0..=command.len() {
            let _ = rewrite(&command[..end]);
        }
    }

    #[test]
    fn transfer_encodings_are_undone() {
        let check = |cte: &str, body: &[u8], expected: &[u8]| {
            assert_eq!(
                decode(cte.as_bytes(), body).unwrap().as_ref(),
                expected,
                "{cte}"
            );
        };
        check("base64", b"AGhp\r\nAP8=\r\n", b"\0hi\0\xff");
        check(" Base64 ", b"aGVs bG8*", b"hello");
        check(
            "quoted-printable",
            b"caf=C3=A9 =\r\nend=00",
            b"caf\xc3\xa9 end\0",
        );
        check("7bit", b"as is=41", b"as is=41");
        check("BINARY", b"\0\x01", b"\0\x01");
        check("", b"plain", b"plain");
        assert_eq!(decode(b"x-uuencode", b"begin"), Err(UnknownCte));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(cte in prop::sample::select(vec!["base64", "quoted-printable", "8bit", "x-y"]),
                                body in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(cte.as_bytes(), &body);
        }

        #[test]
        fn base64_round_trips(data in prop::collection::vec(any::<u8>(), 0..300)) {
            use base64::Engine;
            let mut encoded = base64::engine::general_purpose::STANDARD.encode(&data).into_bytes();
            // Line breaks as a mail body has them.
            let mut wrapped = Vec::new();
            for chunk in encoded.chunks_mut(76) {
                wrapped.extend_from_slice(chunk);
                wrapped.extend_from_slice(b"\r\n");
            }
            prop_assert_eq!(decode(b"base64", &wrapped).unwrap().into_owned(), data);
        }

        #[test]
        fn rewrite_never_panics(text in "[a-zA-Z0-9 .\\[\\]()<>*:]{0,80}") {
            let _ = rewrite_fetch(format!("t FETCH 1 {text}\r\n").as_bytes());
            let _ = rewrite_fetch(text.as_bytes());
        }
    }
}
