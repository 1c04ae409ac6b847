//! SEARCH: evaluates an RFC 3501 search key against one message.
//!
//! Keys answerable from [`MessageMeta`] (flags, size, INTERNALDATE, UID, sequence number)
//! never touch the body; [`needs_body`] tells the session whether it must load the raw
//! message first. Header keys (FROM, SUBJECT, HEADER, SENT*...) scan only the header block;
//! BODY and TEXT build the MIME tree and decode text parts (lazily, once per message).
//!
//! String keys match case-insensitively as substrings of decoded values (RFC 2047 words
//! decoded, text parts transfer-decoded and converted from their charset by mail-parser).
//!
//! The sample messages of the tests were searched with 18 string keys (RFC 2047 names and
//! subjects, QP and ISO-8859-1 bodies, folded headers, groups) in Dovecot 2.3.19 too: the
//! same messages matched.
//!
//! Address keys (FROM, TO, CC, BCC) match the parsed addresses written without comments
//! (`Display Name <local@domain>`), as Dovecot does, not the raw field text: `FROM
//! user@domain.org` finds `<user (comment)@ (comment) domain.org>`.
//!
//! \Recent: the session tells which UIDs it owns as recent ([`SearchInput::recent`]).

use std::cell::OnceCell;

use imap_codec::imap_types::core::AString;
use imap_codec::imap_types::datetime::NaiveDate;
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use mail_parser::parsers::MessageStream;
use mail_parser::HeaderValue;

use super::fetch::{decode_field_value, fields, top_header, ParsedMessage};
use crate::store::{Flag, MessageMeta};

/// One message as SEARCH sees it.
pub struct SearchInput<'a> {
    /// Message sequence number (1-based).
    pub seq: u32,
    pub meta: &'a MessageMeta,
    /// The raw message; required when [`needs_body`] is true for the key, otherwise may be
    /// `None`. A key that needs it gets no match without it.
    pub raw: Option<&'a [u8]>,
    /// Sequence number of the last message in the mailbox (`*` in a sequence set).
    pub last_seq: u32,
    /// Largest UID in the mailbox (`*` in a UID set).
    pub last_uid: u32,
    /// The message is `\Recent` in this session.
    pub recent: bool,
    /// When the search started (seconds since the epoch), for OLDER and YOUNGER (RFC 5032).
    pub now: i64,
}

/// Whether evaluating `key` needs the raw message (headers or body), as opposed to
/// metadata alone.
pub fn needs_body(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().any(needs_body),
        SearchKey::Not(key) => needs_body(key),
        SearchKey::Or(a, b) => needs_body(a) || needs_body(b),
        SearchKey::Header(name, value)
            if modseq_key(name, value).is_some()
                || within_key(name, value).is_some()
                || super::savedate::is_saved_key(name) =>
        {
            false
        }
        SearchKey::Bcc(_)
        | SearchKey::Body(_)
        | SearchKey::Cc(_)
        | SearchKey::From(_)
        | SearchKey::Header(_, _)
        | SearchKey::SentBefore(_)
        | SearchKey::SentOn(_)
        | SearchKey::SentSince(_)
        | SearchKey::Subject(_)
        | SearchKey::Text(_)
        | SearchKey::To(_) => true,
        SearchKey::SequenceSet(_)
        | SearchKey::All
        | SearchKey::Answered
        | SearchKey::Before(_)
        | SearchKey::Deleted
        | SearchKey::Draft
        | SearchKey::Flagged
        | SearchKey::Keyword(_)
        | SearchKey::Larger(_)
        | SearchKey::New
        | SearchKey::Old
        | SearchKey::On(_)
        | SearchKey::Recent
        | SearchKey::Seen
        | SearchKey::Since(_)
        | SearchKey::Smaller(_)
        | SearchKey::Uid(_)
        | SearchKey::Unanswered
        | SearchKey::Undeleted
        | SearchKey::Undraft
        | SearchKey::Unflagged
        | SearchKey::Unkeyword(_)
        | SearchKey::Unseen => false,
    }
}

/// The modseq of a `MODSEQ n` key (RFC 7162), which the session rewrote as a HEADER key on
/// [`super::condstore::MODSEQ_HEADER`].
pub fn modseq_key(name: &AString<'_>, value: &AString<'_>) -> Option<u64> {
    let name: &[u8] = name.as_ref();
    if !name.eq_ignore_ascii_case(super::condstore::MODSEQ_HEADER.as_bytes()) {
        return None;
    }
    let value: &[u8] = value.as_ref();
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// A rewritten `OLDER n` (`(true, n)`) or `YOUNGER n` (`(false, n)`) key (RFC 5032; see
/// [`super::condstore::OLDER_HEADER`]).
pub fn within_key(name: &AString<'_>, value: &AString<'_>) -> Option<(bool, i64)> {
    let name: &[u8] = name.as_ref();
    let older = if name.eq_ignore_ascii_case(super::condstore::OLDER_HEADER.as_bytes()) {
        true
    } else if name.eq_ignore_ascii_case(super::condstore::YOUNGER_HEADER.as_bytes()) {
        false
    } else {
        return None;
    };
    let value: &[u8] = value.as_ref();
    Some((older, std::str::from_utf8(value).ok()?.parse().ok()?))
}

/// Whether the message matches `key`.
pub fn matches(key: &SearchKey<'_>, input: &SearchInput<'_>) -> bool {
    let context = Context {
        input,
        header: OnceCell::new(),
        texts: OnceCell::new(),
    };
    context.matches(key)
}

/// What one message evaluation has computed so far, so that `FROM a SUBJECT b BODY c`
/// scans the header once and decodes the body once.
struct Context<'i, 'a> {
    input: &'i SearchInput<'a>,
    header: OnceCell<&'a [u8]>,
    /// Decoded text parts, lower-cased.
    texts: OnceCell<Vec<String>>,
}

impl<'a> Context<'_, 'a> {
    fn header(&self) -> Option<&'a [u8]> {
        let raw = self.input.raw?;
        Some(self.header.get_or_init(|| top_header(raw)))
    }

    fn texts(&self) -> &[String] {
        self.texts.get_or_init(|| match self.input.raw {
            Some(raw) => ParsedMessage::parse(raw)
                .text_parts()
                .iter()
                .map(|t| t.to_lowercase())
                .collect(),
            None => Vec::new(),
        })
    }

    fn has_flag(&self, flag: &Flag) -> bool {
        self.input.meta.flags.contains(flag)
    }

    fn has_keyword(&self, keyword: &str) -> bool {
        self.input.meta.flags.iter().any(|f| match f {
            Flag::Keyword(k) => k.eq_ignore_ascii_case(keyword),
            _ => false,
        })
    }

    /// Any field called `name` whose decoded value contains `needle`; an empty needle
    /// matches when the field exists.
    fn header_contains(&self, name: &[u8], needle: &AString<'_>) -> bool {
        let Some(header) = self.header() else {
            return false;
        };
        let needle = lowercase(needle.as_ref());
        fields(header)
            .filter(|f| f.name.eq_ignore_ascii_case(name))
            .any(|f| needle.is_empty() || contains_folded(f.value, &needle))
    }

    /// Any address field called `name` one of whose addresses, parsed and written without
    /// comments as `Display Name <local@domain>` (or `local@domain`), contains `needle`; a
    /// value with no address in it is matched as text.
    fn address_contains(&self, name: &[u8], needle: &AString<'_>) -> bool {
        let Some(header) = self.header() else {
            return false;
        };
        let needle = lowercase(needle.as_ref());
        fields(header)
            .filter(|f| f.name.eq_ignore_ascii_case(name))
            .any(|f| {
                if needle.is_empty() {
                    return true;
                }
                let addresses = parse_addresses(f.value);
                if addresses.is_empty() {
                    return contains_folded(f.value, &needle);
                }
                addresses
                    .iter()
                    .any(|address| address.to_lowercase().contains(&needle))
            })
    }

    fn text_contains(&self, needle: &AString<'_>, with_header: bool) -> bool {
        let needle = lowercase(needle.as_ref());
        if needle.is_empty() {
            return true;
        }
        if with_header {
            if let Some(header) = self.header() {
                let in_header = fields(header).any(|f| {
                    lowercase(f.name).contains(&needle) || contains_folded(f.value, &needle)
                });
                if in_header {
                    return true;
                }
            }
        }
        self.texts()
            .iter()
            .any(|t| t.to_lowercase().contains(&needle))
    }

    fn sent_day(&self) -> i64 {
        self.header()
            .and_then(|h| fields(h).find(|f| f.name.eq_ignore_ascii_case(b"date")))
            .and_then(|f| match MessageStream::new(f.value).parse_date() {
                HeaderValue::DateTime(dt) if dt.is_valid() => Some(days_from_civil(
                    i64::from(dt.year),
                    u32::from(dt.month),
                    u32::from(dt.day),
                )),
                _ => None,
            })
            // No usable Date: the internal date stands in (RFC 5256's "sent date").
            .unwrap_or_else(|| self.internal_day())
    }

    /// INTERNALDATE's day in its own zone.
    fn internal_day(&self) -> i64 {
        let meta = self.input.meta;
        let local = meta.internal_date + i64::from(meta.internal_date_offset_min) * 60;
        local.div_euclid(86_400)
    }

    fn matches(&self, key: &SearchKey<'_>) -> bool {
        let input = self.input;
        match key {
            SearchKey::And(keys) => keys.as_ref().iter().all(|k| self.matches(k)),
            SearchKey::Not(key) => !self.matches(key),
            SearchKey::Or(a, b) => self.matches(a) || self.matches(b),
            SearchKey::SequenceSet(set) => set_contains(set, input.seq, input.last_seq),
            SearchKey::Uid(set) => set_contains(set, input.meta.uid, input.last_uid),
            SearchKey::All => true,
            SearchKey::Answered => self.has_flag(&Flag::Answered),
            SearchKey::Deleted => self.has_flag(&Flag::Deleted),
            SearchKey::Draft => self.has_flag(&Flag::Draft),
            SearchKey::Flagged => self.has_flag(&Flag::Flagged),
            SearchKey::Seen => self.has_flag(&Flag::Seen),
            SearchKey::Unanswered => !self.has_flag(&Flag::Answered),
            SearchKey::Undeleted => !self.has_flag(&Flag::Deleted),
            SearchKey::Undraft => !self.has_flag(&Flag::Draft),
            SearchKey::Unflagged => !self.has_flag(&Flag::Flagged),
            SearchKey::Unseen => !self.has_flag(&Flag::Seen),
            SearchKey::Keyword(k) => self.has_keyword(k.as_ref()),
            SearchKey::Unkeyword(k) => !self.has_keyword(k.as_ref()),
            SearchKey::Recent => input.recent,
            SearchKey::New => input.recent && !self.has_flag(&Flag::Seen),
            SearchKey::Old => !input.recent,
            SearchKey::Larger(n) => input.meta.size > *n,
            SearchKey::Smaller(n) => input.meta.size < *n,
            SearchKey::Before(d) => self.internal_day() < day_of(d),
            SearchKey::On(d) => self.internal_day() == day_of(d),
            SearchKey::Since(d) => self.internal_day() >= day_of(d),
            SearchKey::SentBefore(d) => input.raw.is_some() && self.sent_day() < day_of(d),
            SearchKey::SentOn(d) => input.raw.is_some() && self.sent_day() == day_of(d),
            SearchKey::SentSince(d) => input.raw.is_some() && self.sent_day() >= day_of(d),
            SearchKey::Bcc(s) => self.address_contains(b"bcc", s),
            SearchKey::Cc(s) => self.address_contains(b"cc", s),
            SearchKey::From(s) => self.address_contains(b"from", s),
            SearchKey::To(s) => self.address_contains(b"to", s),
            SearchKey::Subject(s) => self.header_contains(b"subject", s),
            // SAVEDBEFORE/SAVEDON/SAVEDSINCE (RFC 8514), rewritten by `savedate.rs`.
            SearchKey::Header(name, s) if super::savedate::is_saved_key(name) => {
                super::savedate::key_matches(name, s, input.meta)
            }
            SearchKey::Header(name, s) => match (modseq_key(name, s), within_key(name, s)) {
                (Some(at_least), _) => input.meta.modseq >= at_least,
                // RFC 5032: OLDER n, INTERNALDATE at least n seconds before now; YOUNGER n,
                // less than n seconds before now.
                (None, Some((true, seconds))) => input.meta.internal_date <= input.now - seconds,
                (None, Some((false, seconds))) => input.meta.internal_date > input.now - seconds,
                (None, None) => self.header_contains(name.as_ref(), s),
            },
            SearchKey::Body(s) => input.raw.is_some() && self.text_contains(s, false),
            SearchKey::Text(s) => input.raw.is_some() && self.text_contains(s, true),
        }
    }
}

/// A search string as lower-case text (SEARCH CHARSET other than UTF-8/US-ASCII is the
/// session's business: it converts or refuses before calling here).
fn lowercase(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_lowercase()
}

/// Whether a raw header field value, decoded (unfolded, RFC 2047), contains the lower-case
/// `needle`. Plain ASCII values without encoded words are matched in place, without
/// allocating.
fn contains_folded(value: &[u8], needle: &str) -> bool {
    let inner = value.strip_suffix(b"\n").unwrap_or(value);
    let plain =
        value.is_ascii() && !inner.contains(&b'\n') && !value.windows(2).any(|w| w == b"=?");
    if plain {
        return contains_ascii_ci(value, needle.as_bytes());
    }
    decode_field_value(value).to_lowercase().contains(needle)
}

/// The addresses of an address-list field value (RFC 5322 3.4), each written without
/// comments, folding or routes as `Display Name <local@domain>`, or `local@domain` when it
/// has no display name (encoded words in the name decoded). Group names are not addresses and
/// are left out; the group's members are kept.
pub fn parse_addresses(value: &[u8]) -> Vec<String> {
    let value = &value[..value.len().min(MAX_ADDRESS_FIELD_BYTES)];
    let value = String::from_utf8_lossy(value);
    // Pass 1: comments out (nested, with quoted pairs), quoted strings kept as they are.
    let mut cleaned = String::with_capacity(value.len());
    let mut depth = 0usize;
    let mut in_quote = false;
    let mut escaped = false;
    for c in value.chars() {
        if escaped {
            if depth == 0 {
                cleaned.push(c);
            }
            escaped = false;
            continue;
        }
        if c == '\\' {
            escaped = true;
            if depth == 0 {
                cleaned.push(c);
            }
            continue;
        }
        if depth > 0 {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            continue;
        }
        if in_quote {
            if c == '"' {
                in_quote = false;
            }
            cleaned.push(c);
            continue;
        }
        match c {
            '(' => {
                depth = 1;
                cleaned.push(' ');
            }
            '"' => {
                in_quote = true;
                cleaned.push(c);
            }
            '\r' | '\n' | '\t' => cleaned.push(' '),
            _ => cleaned.push(c),
        }
    }
    // Pass 2: split into mailboxes at top-level commas and semicolons; a colon outside angle
    // brackets ends a group's name.
    let mut addresses = Vec::new();
    let mut current = String::new();
    let mut in_quote = false;
    let mut in_angle = false;
    let mut escaped = false;
    for c in cleaned.chars() {
        if escaped {
            current.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quote => {
                escaped = true;
                current.push(c);
            }
            '"' => {
                in_quote = !in_quote;
                current.push(c);
            }
            '<' if !in_quote => {
                in_angle = true;
                current.push(c);
            }
            '>' if !in_quote => {
                in_angle = false;
                current.push(c);
            }
            ':' if !in_quote && !in_angle => current.clear(),
            ',' | ';' if !in_quote && !in_angle => {
                if let Some(address) = format_mailbox(&current) {
                    addresses.push(address);
                }
                current.clear();
            }
            _ => current.push(c),
        }
        if addresses.len() >= MAX_ADDRESSES_PER_FIELD {
            return addresses;
        }
    }
    if let Some(address) = format_mailbox(&current) {
        addresses.push(address);
    }
    addresses
}

/// Longest address field value parsed for SEARCH (the rest is ignored).
const MAX_ADDRESS_FIELD_BYTES: usize = 64 * 1024;
/// Most addresses taken from one field for SEARCH.
const MAX_ADDRESSES_PER_FIELD: usize = 1_000;

/// One comment-free mailbox (`name <addr>` or `addr`) written as SEARCH matches it.
fn format_mailbox(text: &str) -> Option<String> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let (name, spec) = match (text.find('<'), text.rfind('>')) {
        (Some(open), close) if !in_quotes_at(text, open) => {
            let end = close.filter(|&c| c > open).unwrap_or(text.len());
            (&text[..open], &text[open + 1..end])
        }
        _ => ("", text),
    };
    // A route (`@a,@b:`) before the address is not part of it.
    let spec = spec.rsplit_once(':').map_or(spec, |(_, rest)| rest);
    let spec: String = spec
        .chars()
        .filter(|c| !c.is_whitespace())
        .filter(|&c| c != '"')
        .collect();
    let name = unquote(name.trim());
    let name = if name.contains("=?") {
        // Decoded like a field value, which ends with its line break.
        decode_field_value(format!("{name}\n").as_bytes())
    } else {
        name
    };
    let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
    match (name.is_empty(), spec.is_empty()) {
        (true, true) => None,
        (true, false) => Some(spec),
        (false, true) => Some(name),
        (false, false) => Some(format!("{name} <{spec}>")),
    }
}

/// Whether byte `at` of `text` is inside a quoted string.
fn in_quotes_at(text: &str, at: usize) -> bool {
    let mut in_quote = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if i >= at {
            break;
        }
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            in_quote = !in_quote;
        }
    }
    in_quote
}

/// A display name without its quotes and quoted pairs.
fn unquote(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut escaped = false;
    for c in name.chars() {
        if escaped {
            out.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c != '"' {
            out.push(c);
        }
    }
    out
}

fn contains_ascii_ci(haystack: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    if needle.len() > haystack.len() {
        return false;
    }
    let first = needle[0];
    haystack
        .windows(needle.len())
        .any(|w| w[0].to_ascii_lowercase() == first && w.eq_ignore_ascii_case(needle))
}

fn set_contains(set: &SequenceSet, value: u32, largest: u32) -> bool {
    let resolve = |s: &SeqOrUid| match s {
        SeqOrUid::Value(v) => v.get(),
        SeqOrUid::Asterisk => largest,
    };
    set.0.as_ref().iter().any(|sequence| match sequence {
        Sequence::Single(s) => resolve(s) == value,
        Sequence::Range(a, b) => {
            let (a, b) = (resolve(a), resolve(b));
            (a.min(b)..=a.max(b)).contains(&value)
        }
    })
}

/// Days since 1970-01-01 of a search date.
fn day_of(date: &NaiveDate) -> i64 {
    // imap-types keeps dates as chrono's NaiveDate, printed as YYYY-MM-DD for the years
    // IMAP allows (0..=9999); reading it back avoids a direct chrono dependency.
    let text = date.as_ref().to_string();
    let mut parts = text.split('-').map(|p| p.parse::<i64>().unwrap_or(0));
    let year = parts.next().unwrap_or(1970);
    let month = parts.next().unwrap_or(1);
    let day = parts.next().unwrap_or(1);
    days_from_civil(year, month as u32, day as u32)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let month = i64::from(month.clamp(1, 12));
    let day = i64::from(day.clamp(1, 31));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::fetch::test_samples::*;
    use crate::store::{BlobId, FlagSet};
    use imap_codec::imap_types::command::CommandBody;
    use imap_codec::{decode::Decoder, CommandCodec};

    /// The criteria of `SEARCH <text>`, parsed by imap-codec as a client would send them.
    fn key(text: &str) -> SearchKey<'static> {
        let command = format!("A SEARCH {text}\r\n").into_bytes();
        let command: &'static [u8] = Box::leak(command.into_boxed_slice());
        let (_, command) = CommandCodec::default()
            .decode(command)
            .expect("valid SEARCH");
        match command.body {
            CommandBody::Search { criteria, .. } => criteria,
            other => panic!("unexpected command {other:?}"),
        }
    }

    /// 2024-01-02 23:00:00 UTC.
    const INTERNAL_DATE: i64 = 1_704_236_400;

    fn meta(flags: &[Flag]) -> MessageMeta {
        MessageMeta {
            uid: 7,
            blob: BlobId([0; 32]),
            size: 2_000,
            internal_date: INTERNAL_DATE,
            internal_date_offset_min: 0,
            flags: flags.iter().cloned().collect::<FlagSet>(),
            modseq: 1,
            saved_at: 0,
        }
    }

    fn check(raw: Option<&[u8]>, meta: &MessageMeta, cases: &[(&str, bool)]) {
        for (text, expected) in cases {
            let input = SearchInput {
                seq: 4,
                meta,
                raw,
                last_seq: 5,
                last_uid: 9,
                recent: false,
                now: 0,
            };
            assert_eq!(matches(&key(text), &input), *expected, "SEARCH {text}");
        }
    }

    #[test]
    fn addresses_are_parsed_without_comments() {
        let cases: &[(&str, &[&str])] = &[
            (
                "<user-from (comment)@ (comment) domain.org>\r\n",
                &["user-from@domain.org"],
            ),
            (
                "\"Joe Q. Public\" <joe (x) @ example.org>, Mary <mary@x.test>\r\n",
                &["Joe Q. Public <joe@example.org>", "Mary <mary@x.test>"],
            ),
            (
                "group: <a@b.test>, two (c) <c@d.test>;, e@f.test\r\n",
                &["a@b.test", "two <c@d.test>", "e@f.test"],
            ),
            (
                "<@r1,@r2:user-to (comment)@domain.org>\r\n",
                &["user-to@domain.org"],
            ),
            ("=?utf-8?q?J=C3=B6rg?= <j@x.test>\r\n", &["Jörg <j@x.test>"]),
            ("\"a, \\\"b\" <q@x.test>\r\n", &["a, \"b <q@x.test>"]),
            ("undisclosed-recipients:;\r\n", &[]),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_addresses(value.as_bytes()), *expected, "{value}");
        }
    }

    #[test]
    fn recent_new_and_old_follow_the_session() {
        let unseen = meta(&[]);
        let seen = meta(&[Flag::Seen]);
        for (meta, recent, expected) in [
            (&unseen, true, [true, true, false]),
            (&seen, true, [true, false, false]),
            (&unseen, false, [false, false, true]),
        ] {
            let input = SearchInput {
                seq: 1,
                meta,
                raw: None,
                last_seq: 1,
                last_uid: 7,
                recent,
                now: 0,
            };
            let got = ["RECENT", "NEW", "OLD"].map(|k| matches(&key(k), &input));
            assert_eq!(got, expected, "recent={recent} flags={:?}", meta.flags);
        }
    }

    #[test]
    fn flag_size_sequence_and_uid_keys() {
        let meta = meta(&[Flag::Seen, Flag::Answered, Flag::Keyword("$Label1".into())]);
        check(
            None,
            &meta,
            &[
                ("ALL", true),
                ("SEEN", true),
                ("UNSEEN", false),
                ("ANSWERED", true),
                ("UNANSWERED", false),
                ("FLAGGED", false),
                ("UNFLAGGED", true),
                ("DELETED", false),
                ("UNDELETED", true),
                ("DRAFT", false),
                ("UNDRAFT", true),
                ("KEYWORD $label1", true),
                ("KEYWORD $label2", false),
                ("UNKEYWORD $LABEL1", false),
                ("UNKEYWORD other", true),
                ("LARGER 1999", true),
                ("LARGER 2000", false),
                ("SMALLER 2001", true),
                ("SMALLER 2000", false),
                ("RECENT", false),
                ("NEW", false),
                ("OLD", true),
                ("4", true),
                ("1:3", false),
                ("2,4:5", true),
                ("*", false),
                ("5:3", true),
                ("UID 7", true),
                ("UID 5:*", true),
                ("UID *:8", false),
                ("UID 1:6,8:*", false),
                ("NOT SEEN", false),
                ("OR FLAGGED SEEN", true),
                ("OR FLAGGED DRAFT", false),
                ("(SEEN ANSWERED)", true),
                ("(SEEN FLAGGED)", false),
                ("SEEN NOT (FLAGGED OR DRAFT DELETED)", true),
                // Header keys without the raw message match nothing.
                ("SUBJECT hello", false),
                ("SENTON 1-Jan-2024", false),
            ],
        );
    }

    #[test]
    fn older_and_younger_compare_internaldate_with_now() {
        let meta = meta(&[]);
        for (now_after, text, expected) in [
            (100, "HEADER \"kermail older\" \"100\"", true),
            (99, "HEADER \"kermail older\" \"100\"", false),
            (100, "HEADER \"kermail younger\" \"100\"", false),
            (99, "HEADER \"kermail younger\" \"100\"", true),
        ] {
            let input = SearchInput {
                seq: 1,
                meta: &meta,
                raw: None,
                last_seq: 1,
                last_uid: 7,
                recent: false,
                now: INTERNAL_DATE + now_after,
            };
            assert!(!needs_body(&key(text)), "{text}");
            assert_eq!(
                matches(&key(text), &input),
                expected,
                "{text} at +{now_after}"
            );
        }
    }

    #[test]
    fn internal_date_keys_use_the_dates_own_zone() {
        let mut meta = meta(&[]);
        check(
            None,
            &meta,
            &[
                ("ON 2-Jan-2024", true),
                ("ON 3-Jan-2024", false),
                ("BEFORE 3-Jan-2024", true),
                ("BEFORE 2-Jan-2024", false),
                ("SINCE 2-Jan-2024", true),
                ("SINCE 3-Jan-2024", false),
            ],
        );
        // +02:00: 2024-01-03 01:00 local.
        meta.internal_date_offset_min = 120;
        check(
            None,
            &meta,
            &[("ON 3-Jan-2024", true), ("BEFORE 3-Jan-2024", false)],
        );
        // -05:00 just after midnight UTC: still the 1st locally.
        meta.internal_date = INTERNAL_DATE - 23 * 3_600 + 60;
        meta.internal_date_offset_min = -300;
        check(
            None,
            &meta,
            &[("ON 1-Jan-2024", true), ("SINCE 2-Jan-2024", false)],
        );
    }

    #[test]
    fn header_keys_match_decoded_values() {
        let meta = meta(&[]);
        for raw in [crlf(ENCODED), ENCODED.to_vec()] {
            check(
                Some(&raw),
                &meta,
                &[
                    // Two encoded words in two charsets, folded over two lines.
                    ("SUBJECT \"you UNDERSTAND the\"", true),
                    ("SUBJECT SWYgeW91", false),
                    ("FROM simonsen", true),
                    ("FROM keld@dkuug", true),
                    ("TO \"keith moore\"", true),
                    ("CC undisclosed", true),
                    ("BCC hidden", true),
                    ("BCC nobody", false),
                    ("HEADER X-Long \"second part\"", true),
                    ("HEADER x-long \"\"", true),
                    ("HEADER X-Missing \"\"", false),
                    ("HEADER Message-ID <c@d>", true),
                    ("SENTON 21-Nov-1997", true),
                    ("SENTBEFORE 22-Nov-1997", true),
                    ("SENTBEFORE 21-Nov-1997", false),
                    ("SENTSINCE 21-Nov-1997", true),
                    ("SENTSINCE 22-Nov-1997", false),
                    ("TEXT x-long", true),
                    ("TEXT body", true),
                    ("BODY x-long", false),
                ],
            );
        }
        let from_utf8 = SearchKey::From(AString::try_from("J\u{f8}RN").expect("astring"));
        let raw = crlf(ENCODED);
        let input = SearchInput {
            seq: 1,
            meta: &meta,
            raw: Some(&raw),
            last_seq: 1,
            last_uid: 7,
            recent: false,
            now: 0,
        };
        assert!(
            matches(&from_utf8, &input),
            "RFC 2047 ISO-8859-1 name, UTF-8 needle"
        );
    }

    #[test]
    fn sent_date_ignores_the_zone_and_falls_back_to_internal_date() {
        let meta = meta(&[]);
        let raw = crlf(EIGHT_BIT);
        // "Sun, 31 Dec 2023 23:59:59 -1200" is 2024-01-01 in UTC, 31 Dec as written.
        check(
            Some(&raw),
            &meta,
            &[("SENTON 31-Dec-2023", true), ("SENTON 1-Jan-2024", false)],
        );
        let raw = crlf(ALTERNATIVE);
        check(
            Some(&raw),
            &meta,
            &[
                ("SENTON 2-Jan-2024", true),
                ("SENTBEFORE 2-Jan-2024", false),
            ],
        );
    }

    #[test]
    fn body_keys_search_decoded_text_parts() {
        let meta = meta(&[]);
        let cases: &[(&[u8], &str, bool)] = &[
            (ALTERNATIVE, "BODY \"plain TEXT\"", true),
            (ALTERNATIVE, "BODY preamble", false),
            (MIXED, "BODY attached", true),
            // Attachments are not text: their base64 is not searched.
            (MIXED, "BODY JVBER", false),
            (NESTED, "BODY \"inner text\"", true),
            (NESTED, "BODY <b>inner", true),
            (NESTED, "TEXT outer@example", true),
            (PLAIN, "BODY \"how are\"", true),
            (PLAIN, "BODY alice", false),
            (PLAIN, "TEXT alice", true),
            (NO_BODY, "BODY none", false),
            (NO_BODY, "TEXT none", true),
            (GARBAGE, "BODY zzz", false),
            (TRUNCATED, "BODY trunc", true),
        ];
        for (message, text, expected) in cases {
            for raw in [crlf(message), message.to_vec()] {
                check(Some(&raw), &meta, &[(text, *expected)]);
            }
        }
        // Quoted-printable UTF-8 and 8-bit ISO-8859-1, searched with UTF-8 needles.
        for (message, needle) in [(ALTERNATIVE, "HTML \u{c9}"), (EIGHT_BIT, "CR\u{c8}ME")] {
            let raw = crlf(message);
            let input = SearchInput {
                seq: 1,
                meta: &meta,
                raw: Some(&raw),
                last_seq: 1,
                last_uid: 7,
                recent: false,
                now: 0,
            };
            let key = SearchKey::Body(AString::try_from(needle).expect("astring"));
            assert!(matches(&key, &input), "{needle}");
        }
    }

    #[test]
    fn needs_body_only_for_message_content_keys() {
        let cases: &[(&str, bool)] = &[
            ("ALL", false),
            ("SEEN UNSEEN FLAGGED KEYWORD x UNKEYWORD y", false),
            (
                "LARGER 1 SMALLER 5 BEFORE 1-Jan-2000 ON 1-Jan-2000 SINCE 1-Jan-2000",
                false,
            ),
            ("UID 1:* 1:5 NEW OLD RECENT", false),
            ("OR SEEN NOT DRAFT", false),
            ("SUBJECT x", true),
            ("OR SEEN FROM x", true),
            ("NOT (SEEN BODY x)", true),
            ("SENTSINCE 1-Jan-2000", true),
            ("HEADER a b", true),
            ("TEXT a", true),
            ("TO a", true),
            ("CC a", true),
            ("BCC a", true),
        ];
        for (text, expected) in cases {
            assert_eq!(needs_body(&key(text)), *expected, "{text}");
        }
    }

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2024, 1, 2), INTERNAL_DATE / 86_400);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }
}

/// Timing of the two per-message paths the IMAP benchmark stresses (three header fields
/// for every message, `UID SEARCH SUBJECT`), over `KERMAIL_TIMING_MESSAGES` messages of
/// about 1 KB (1,000 by default). Prints the figures; asserts only the results.
/// `KERMAIL_TIMING_MESSAGES=10000 cargo test --release --lib imap::search::timing -- --nocapture`
#[cfg(test)]
mod timing {
    use super::*;
    use crate::imap::fetch::{apply_partial, ParsedMessage};
    use crate::store::BlobId;
    use imap_codec::encode::Encoder;
    use imap_codec::imap_types::core::{IString, NString, NonEmptyVec};
    use imap_codec::imap_types::fetch::{MessageDataItem, Section};
    use imap_codec::imap_types::response::{Data, Response};
    use imap_codec::ResponseCodec;
    use std::num::NonZeroU32;
    use std::time::Instant;

    fn message(i: usize) -> Vec<u8> {
        let mut m = format!(
            "Return-Path: <sender{i}@example.org>\r\n\
             Received: from client.example.org (client.example.org [192.0.2.1])\r\n\
             \tby mx.example.net with ESMTPS id {i:08x}\r\n\
             \tfor <user@example.net>; Tue, 2 Jan 2024 10:00:00 +0000\r\n\
             From: Sender Number {i} <sender{i}@example.org>\r\n\
             To: User <user@example.net>\r\n\
             Subject: Benchmark message number {i} about topic {}\r\n\
             Date: Tue, 2 Jan 2024 10:{:02}:00 +0000\r\n\
             Message-ID: <{i}@example.org>\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\r\n",
            i % 97,
            i % 60
        )
        .into_bytes();
        while m.len() < 1_000 {
            m.extend_from_slice(b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n");
        }
        m
    }

    #[test]
    fn header_fields_fetch_and_subject_search() {
        let count: usize = std::env::var("KERMAIL_TIMING_MESSAGES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000);
        let messages: Vec<Vec<u8>> = (0..count).map(message).collect();
        let names = NonEmptyVec::try_from(vec![
            "From".try_into().expect("astring"),
            "Subject".try_into().expect("astring"),
            "Date".try_into().expect("astring"),
        ])
        .expect("non-empty");
        let section = Section::HeaderFields(None, names);

        let started = Instant::now();
        let mut total = 0usize;
        for raw in &messages {
            let parsed = ParsedMessage::parse(raw);
            total += apply_partial(&parsed.section(Some(&section)), None).len();
        }
        let sections_elapsed = started.elapsed();

        let codec = ResponseCodec::default();
        let started = Instant::now();
        let mut wire = 0usize;
        for (i, raw) in messages.iter().enumerate() {
            let bytes = ParsedMessage::parse(raw).section(Some(&section));
            let response = Response::Data(Data::Fetch {
                seq: NonZeroU32::new(i as u32 + 1).expect("non-zero"),
                items: NonEmptyVec::from(MessageDataItem::BodyExt {
                    section: Some(section.clone()),
                    origin: None,
                    data: NString(Some(IString::try_from(bytes).expect("no NUL"))),
                }),
            });
            wire += codec.encode(&response).dump().len();
        }
        let encoded_elapsed = started.elapsed();

        let key = SearchKey::Subject("topic 42".try_into().expect("astring"));
        let metas: Vec<MessageMeta> = (0..count)
            .map(|i| MessageMeta {
                uid: i as u32 + 1,
                blob: BlobId([0; 32]),
                size: messages[i].len() as u32,
                internal_date: 1_704_189_600,
                internal_date_offset_min: 0,
                flags: Default::default(),
                modseq: 1,
                saved_at: 0,
            })
            .collect();
        let started = Instant::now();
        let mut hits = 0usize;
        for (i, raw) in messages.iter().enumerate() {
            let input = SearchInput {
                seq: i as u32 + 1,
                meta: &metas[i],
                raw: Some(raw),
                last_seq: count as u32,
                last_uid: count as u32,
                recent: false,
                now: 0,
            };
            hits += usize::from(matches(&key, &input));
        }
        let search_elapsed = started.elapsed();

        println!(
            "{count} messages: HEADER.FIELDS (From Subject Date) sections {:.1} ms, \
             with FETCH encoding {:.1} ms ({wire} bytes); SEARCH SUBJECT {:.1} ms ({hits} hits)",
            sections_elapsed.as_secs_f64() * 1e3,
            encoded_elapsed.as_secs_f64() * 1e3,
            search_elapsed.as_secs_f64() * 1e3,
        );
        assert!(total > count * 100);
        assert_eq!(hits, (0..count).filter(|i| i % 97 == 42).count());
    }
}
