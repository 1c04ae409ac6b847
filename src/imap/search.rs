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
//! \Recent: kermail keeps no \Recent flag (it would have to be replicated per session), so
//! RECENT and NEW match no message and OLD matches every message.

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
}

/// Whether evaluating `key` needs the raw message (headers or body), as opposed to
/// metadata alone.
pub fn needs_body(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().any(needs_body),
        SearchKey::Not(key) => needs_body(key),
        SearchKey::Or(a, b) => needs_body(a) || needs_body(b),
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
    texts: OnceCell<Vec<String>>,
}

impl<'a> Context<'_, 'a> {
    fn header(&self) -> Option<&'a [u8]> {
        let raw = self.input.raw?;
        Some(self.header.get_or_init(|| top_header(raw)))
    }

    fn texts(&self) -> &[String] {
        self.texts.get_or_init(|| match self.input.raw {
            Some(raw) => ParsedMessage::parse(raw).text_parts(),
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
            // No \Recent in kermail (see the module comment).
            SearchKey::Recent | SearchKey::New => false,
            SearchKey::Old => true,
            SearchKey::Larger(n) => input.meta.size > *n,
            SearchKey::Smaller(n) => input.meta.size < *n,
            SearchKey::Before(d) => self.internal_day() < day_of(d),
            SearchKey::On(d) => self.internal_day() == day_of(d),
            SearchKey::Since(d) => self.internal_day() >= day_of(d),
            SearchKey::SentBefore(d) => input.raw.is_some() && self.sent_day() < day_of(d),
            SearchKey::SentOn(d) => input.raw.is_some() && self.sent_day() == day_of(d),
            SearchKey::SentSince(d) => input.raw.is_some() && self.sent_day() >= day_of(d),
            SearchKey::Bcc(s) => self.header_contains(b"bcc", s),
            SearchKey::Cc(s) => self.header_contains(b"cc", s),
            SearchKey::From(s) => self.header_contains(b"from", s),
            SearchKey::To(s) => self.header_contains(b"to", s),
            SearchKey::Subject(s) => self.header_contains(b"subject", s),
            SearchKey::Header(name, s) => self.header_contains(name.as_ref(), s),
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
