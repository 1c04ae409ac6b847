//! MULTIAPPEND (RFC 3502): `APPEND mailbox [flags] [date] literal [flags] [date] literal ...`
//! appends every message or none, answered `OK [APPENDUID uidvalidity uid-set]`.
//!
//! imap-codec 1.0 parses an APPEND of one message only, so [`split`] cuts a command of several
//! messages into one single-message APPEND per message (the same tag, mailbox, flags and
//! date, the literal re-announced as `{n+}`), which imap-codec then decodes one by one; the
//! session appends the decoded messages with one replicated command
//! (`MailStore::append_many`).

/// Most messages accepted in one MULTIAPPEND (the store's limit).
pub use crate::store::MAX_MESSAGES_PER_MULTIAPPEND;

/// One message of an APPEND cut by [`split`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// `tag APPEND mailbox [flags] [date] {n+}\r\n<literal>\r\n` (with an empty literal
    /// when the message's data is carried by `content`).
    pub command: Vec<u8>,
    pub content: Content,
}

/// Where a message's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// The literal of `command` (imap-codec reads it; it cannot hold a NUL).
    InCommand,
    /// Announced `{0+}` (or `~{0+}`) in the command the session runs: a large literal that
    /// arrived in the spill file.
    MaybeSpilled { literal8: bool },
    /// A literal8 (`~{n}`, RFC 3516 4.4): it may hold NULs.
    Literal8(Vec<u8>),
    /// CATENATE (RFC 4469): the message is made of these parts.
    Catenate(Vec<super::catenate::CatPart>),
}

/// A literal found by [`literal_at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiteralAt {
    pub length: usize,
    /// Position of the literal's first byte.
    pub start: usize,
    /// Announced as literal8 (`~{n}`).
    pub literal8: bool,
    /// Announced `{0+}`: maybe a spilled literal (see [`Content::MaybeSpilled`]).
    pub maybe_spilled: bool,
}

/// Reads a literal announcement `{n}` or `{n+}` (and, if `allow8`, `~{n}` or `~{n+}`)
/// followed by CRLF at `at`, whose bytes are all in `bytes`.
pub fn literal_at(bytes: &[u8], at: usize, allow8: bool) -> Option<LiteralAt> {
    let literal8 = allow8 && bytes.get(at) == Some(&b'~');
    let at = at + usize::from(literal8);
    if bytes.get(at) != Some(&b'{') {
        return None;
    }
    let close = at + bytes[at..].iter().take(16).position(|&b| b == b'}')?;
    let inner = &bytes[at + 1..close];
    let (digits, plus) = match inner.strip_suffix(b"+") {
        Some(digits) => (digits, true),
        None => (inner, false),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let length: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
    if bytes.get(close + 1..close + 3) != Some(b"\r\n") {
        return None;
    }
    let start = close + 3;
    if bytes.len() < start.checked_add(length)? {
        return None;
    }
    Some(LiteralAt {
        length,
        start,
        literal8,
        maybe_spilled: plus && length == 0,
    })
}

/// The end of a quoted string starting at `at` (just after its closing quote).
fn quoted_end(bytes: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            b'\r' | b'\n' => return None,
            _ => i += 1,
        }
    }
    None
}

/// For an APPEND of two messages or more, or of one message given as literal8 or CATENATE:
/// one single-message APPEND per message. `Ok(None)` for any other command (a plain APPEND
/// of one message is left to imap-codec as it is), and for an APPEND whose shape is not
/// understood (imap-codec then answers it); `Err` for a malformed CATENATE list (a BAD).
/// `spilled_at` is where the session put the empty placeholder literal of the literal it
/// spilled to a file (the position of its data in `bytes`): only that `{0+}` is the spilled
/// message, a client's own empty literal elsewhere stays empty.
pub fn split(bytes: &[u8], spilled_at: Option<usize>) -> Result<Option<Vec<Part>>, &'static str> {
    let Some(line_end) = bytes.iter().position(|&b| b == b' ') else {
        return Ok(None);
    };
    let tag = &bytes[..line_end];
    let mut at = line_end + 1;
    if !bytes
        .get(at..at + 7)
        .is_some_and(|verb| verb.eq_ignore_ascii_case(b"APPEND "))
    {
        return Ok(None);
    }
    at += 7;
    // The mailbox: a quoted string, a literal or an atom.
    let mailbox_start = at;
    let mailbox_end = match bytes.get(at) {
        Some(b'"') => quoted_end(bytes, at),
        Some(b'{') => literal_at(bytes, at, false).map(|literal| literal.start + literal.length),
        Some(_) => bytes[at..]
            .iter()
            .position(|&b| b == b' ')
            .map(|len| at + len),
        None => None,
    };
    let Some(mailbox_end) = mailbox_end else {
        return Ok(None);
    };
    at = mailbox_end;
    let mailbox = &bytes[mailbox_start..at];
    let mut parts = Vec::new();
    let mut extended = false;
    loop {
        if bytes.get(at..) == Some(b"\r\n") || bytes.get(at..) == Some(b"\n") {
            break;
        }
        if bytes.get(at) != Some(&b' ') {
            return Ok(None);
        }
        at += 1;
        let params_start = at;
        if bytes.get(at) == Some(&b'(') {
            let Some(close) = bytes[at..].iter().position(|&b| b == b')') else {
                return Ok(None);
            };
            at += close + 1;
            if bytes.get(at) == Some(&b' ') {
                at += 1;
            }
        }
        if bytes.get(at) == Some(&b'"') {
            let Some(end) = quoted_end(bytes, at) else {
                return Ok(None);
            };
            at = end;
            if bytes.get(at) == Some(&b' ') {
                at += 1;
            }
        }
        let params = &bytes[params_start..at];
        let (content, data, end) = match super::catenate::parse_catenate(bytes, at, spilled_at)? {
            Some((cat_parts, end)) => (Content::Catenate(cat_parts), &[][..], end),
            None => {
                let Some(literal) = literal_at(bytes, at, true) else {
                    return Ok(None);
                };
                let end = literal.start + literal.length;
                let data = &bytes[literal.start..end];
                let spilled = literal.maybe_spilled && spilled_at == Some(literal.start);
                match (literal.literal8, spilled) {
                    (literal8, true) => (Content::MaybeSpilled { literal8 }, data, end),
                    (true, false) => (Content::Literal8(data.to_vec()), &[][..], end),
                    (false, false) => (Content::InCommand, data, end),
                }
            }
        };
        extended |= matches!(
            content,
            Content::Catenate(_) | Content::Literal8(_) | Content::MaybeSpilled { literal8: true }
        );
        let mut command = Vec::with_capacity(tag.len() + mailbox.len() + data.len() + 64);
        command.extend_from_slice(tag);
        command.extend_from_slice(b" APPEND ");
        command.extend_from_slice(mailbox);
        command.push(b' ');
        command.extend_from_slice(params);
        command.extend_from_slice(format!("{{{}+}}\r\n", data.len()).as_bytes());
        command.extend_from_slice(data);
        command.extend_from_slice(b"\r\n");
        parts.push(Part { command, content });
        at = end;
        if parts.len() > MAX_MESSAGES_PER_MULTIAPPEND {
            // Still a MULTIAPPEND: the session refuses it as too large.
            return Ok(Some(parts));
        }
    }
    Ok((parts.len() >= 2 || extended).then_some(parts))
}

impl super::session::Session {
    /// Appends every message of `parts` to their mailbox, all or none.
    pub(super) async fn multiappend(&mut self, tag: &str, parts: Vec<Part>, out: &mut Vec<u8>) {
        use imap_codec::decode::Decoder;
        use imap_codec::imap_types::command::CommandBody;
        use imap_codec::CommandCodec;

        use super::catenate::{refuse, Refusal};
        use super::fetch::top_header;
        use super::mailboxes::{no, now_secs, read_spill, to_flag_set};
        use super::response::tagged;
        use super::session::{mailbox_name, State};

        let Some(account) = self.account() else {
            return;
        };
        if parts.len() > MAX_MESSAGES_PER_MULTIAPPEND {
            tagged(
                out,
                tag,
                "NO",
                Some("LIMIT"),
                "too many messages in one APPEND",
            );
            return;
        }
        let mut spilled = self.spilled.take();
        let mut name = None;
        let mut messages = Vec::with_capacity(parts.len());
        for part in parts {
            let Ok((_, command)) = CommandCodec::default().decode(&part.command) else {
                tagged(out, tag, "BAD", None, "syntax error in APPEND");
                return;
            };
            let CommandBody::Append {
                mailbox,
                flags,
                date,
                message,
            } = command.body
            else {
                tagged(out, tag, "BAD", None, "syntax error in APPEND");
                return;
            };
            name = mailbox_name(&mailbox);
            let body = match part.content {
                Content::InCommand => Ok(message.data().to_vec()),
                Content::MaybeSpilled { literal8 } => match spilled.take() {
                    Some(file) => match read_spill(file).await {
                        Ok(body) if !literal8 && body.contains(&0) => Err(Refusal::NulInLiteral),
                        Ok(body) => Ok(body),
                        Err(error) => Err(Refusal::Spill(error)),
                    },
                    None => Ok(Vec::new()),
                },
                Content::Literal8(body) => Ok(body),
                Content::Catenate(cat_parts) => {
                    self.catenate(account, cat_parts, &mut spilled).await
                }
            };
            let body = match body {
                Ok(body) => body,
                Err(refusal) => {
                    refuse(out, tag, &refusal);
                    return;
                }
            };
            if body.is_empty() {
                tagged(out, tag, "NO", None, "empty message");
                return;
            }
            let (internal_date, offset_min) = match date {
                Some(date) => {
                    let date = date.as_ref();
                    (
                        date.timestamp(),
                        (date.offset().local_minus_utc() / 60) as i16,
                    )
                }
                None => (now_secs(), 0),
            };
            messages.push((to_flag_set(&flags), internal_date, offset_min, body));
        }
        let Some(view) = name.and_then(|name| self.store.mailbox_by_name(account, &name)) else {
            tagged(out, tag, "NO", Some("TRYCREATE"), "no such mailbox");
            return;
        };
        let headers: Vec<_> = messages
            .iter()
            .map(|m| {
                (
                    crate::store::BlobId(*blake3::hash(&m.3).as_bytes()),
                    std::sync::Arc::<[u8]>::from(top_header(&m.3)),
                )
            })
            .collect();
        let target = view.id;
        drop(view);
        let mut released = None;
        if let State::Selected { mailbox, .. } = &mut self.state {
            if mailbox.id == target {
                let owner = mailbox.owner;
                mailbox.refresh(&self.store, owner, true, &[], out);
                released = mailbox.release();
            }
        }
        let result = self.store.append_many(account, target, messages).await;
        if let State::Selected { mailbox, .. } = &mut self.state {
            if mailbox.id == target {
                let owner = mailbox.owner;
                match released {
                    Some(released) => mailbox.reacquire(released, &self.store, owner, out),
                    None => mailbox.refresh(&self.store, owner, true, &[], out),
                }
            }
        }
        match result {
            Ok((uidvalidity, uids)) => {
                for (blob, header) in headers {
                    self.headers.insert(blob, header);
                }
                let mut code = format!("APPENDUID {uidvalidity} ").into_bytes();
                super::response::uid_set(&mut code, &uids);
                let code = String::from_utf8_lossy(&code).into_owned();
                tagged(out, tag, "OK", Some(&code), "APPEND completed");
            }
            Err(error) => no(out, tag, &error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(text: &[u8]) -> Option<Vec<String>> {
        split(text, None).unwrap().map(|parts| {
            parts
                .into_iter()
                .map(|p| String::from_utf8(p.command).unwrap())
                .collect()
        })
    }

    #[test]
    fn each_message_becomes_an_append_of_its_own() {
        let command = b"A1 APPEND \"Sent Items\" (\\Seen) \"06-Dec-2026 10:00:00 +0100\" {3}\r\nabc (\\Flagged) {2+}\r\nde {1}\r\nf\r\n";
        assert_eq!(
            commands(command),
            Some(vec![
                "A1 APPEND \"Sent Items\" (\\Seen) \"06-Dec-2026 10:00:00 +0100\" {3+}\r\nabc\r\n"
                    .to_owned(),
                "A1 APPEND \"Sent Items\" (\\Flagged) {2+}\r\nde\r\n".to_owned(),
                "A1 APPEND \"Sent Items\" {1+}\r\nf\r\n".to_owned(),
            ])
        );
        assert_eq!(
            commands(b"A2 APPEND {5}\r\nINBOX {1}\r\nx {1}\r\ny\r\n"),
            Some(vec![
                "A2 APPEND {5}\r\nINBOX {1+}\r\nx\r\n".to_owned(),
                "A2 APPEND {5}\r\nINBOX {1+}\r\ny\r\n".to_owned(),
            ])
        );
        // One message: left to imap-codec.
        assert_eq!(commands(b"A3 APPEND INBOX {1}\r\nx\r\n"), None);
        assert_eq!(commands(b"A4 FETCH 1 (FLAGS)\r\n"), None);
        let spilled = b"A5 APPEND INBOX {0+}\r\n {1}\r\nx\r\n";
        let parts = split(spilled, Some(22)).unwrap().unwrap();
        assert_eq!(parts[0].content, Content::MaybeSpilled { literal8: false });
        assert_eq!(parts[1].content, Content::InCommand);
        // The client's own empty literal is not the spilled one (which came later).
        let parts = split(b"A5 APPEND INBOX {0+}\r\n {0+}\r\n\r\n", Some(29))
            .unwrap()
            .unwrap();
        assert_eq!(parts[0].content, Content::InCommand);
        assert_eq!(parts[1].content, Content::MaybeSpilled { literal8: false });
        let command = b"A6 APPEND INBOX (\\Seen) {3}\r\nabc {2}\r\nde\r\n";
        for end in 0..=command.len() {
            let _ = split(&command[..end], None);
        }
    }
}
