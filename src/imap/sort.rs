//! SORT (RFC 5256 section 3) and SORT=DISPLAY (RFC 5957): sort criteria, sort keys and the
//! base subject that THREAD shares.
//!
//! imap-codec 1.0 parses neither SORT nor THREAD, so [`strip_ordering`] takes the sort
//! criteria (or the threading algorithm) and the charset out of the command's bytes and
//! rewrites the rest as `[UID] SEARCH CHARSET charset criteria`, which imap-codec decodes as
//! a SEARCH; the session then orders (or threads) the matching messages instead of writing
//! `* SEARCH`.
//!
//! Strings are compared with `i;unicode-casemap` (RFC 5051) up to one approximation: RFC 2047
//! words are decoded, every character is mapped to its Unicode uppercase where RFC 5051 says
//! titlecase (they differ only for a few digraphs such as `ǆ`, titlecase `ǅ`, uppercase `Ǆ`),
//! the result is put in NFKD (so `Ä` sorts as `A` + U+0308, just after `A`), and the results
//! compare as UTF-8 octets. `ß`/`ss`, `Σ`/`σ`/`ς` compare equal. Dovecot 2.3 gives the same
//! orders on the integration tests' messages.

use mail_parser::parsers::MessageStream;
use mail_parser::HeaderValue;

use super::fetch::{decode_field_value, first_field, parse_address_list, unfold};
#[cfg(test)]
use crate::store::MessageMeta;

/// One sort key of RFC 5256 section 3 (and RFC 5957's DISPLAYFROM/DISPLAYTO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Arrival,
    Cc,
    Date,
    From,
    Size,
    Subject,
    To,
    DisplayFrom,
    DisplayTo,
}

impl SortKey {
    /// Whether the key reads a header field (ARRIVAL and SIZE come from the message list).
    pub fn needs_header(self) -> bool {
        !matches!(self, SortKey::Arrival | SortKey::Size)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortCriterion {
    pub key: SortKey,
    pub reverse: bool,
}

/// THREAD algorithms (RFC 5256 section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadAlgorithm {
    OrderedSubject,
    References,
}

/// What a rewritten SORT or THREAD asks for once its SEARCH part has matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ordering {
    Sort(Vec<SortCriterion>),
    Thread(ThreadAlgorithm),
}

/// Most sort criteria in one SORT (nine keys, each maybe reversed, fit many times over).
const MAX_SORT_CRITERIA: usize = 32;
/// Most bytes of a sort criteria list looked at.
const MAX_SORT_LIST_BYTES: usize = 512;

/// For `tag [UID] SORT (criteria) charset search-criteria` and `tag [UID] THREAD algorithm
/// charset search-criteria`: the command as `tag [UID] SEARCH CHARSET charset
/// search-criteria` and what to do with the result. `Ok(None)` for any other command;
/// `Err` (answered BAD) for a SORT or THREAD that cannot be parsed.
pub fn strip_ordering(bytes: &[u8]) -> Result<Option<(Vec<u8>, Ordering)>, &'static str> {
    let mut position = 0;
    let next_word = |bytes: &[u8], position: &mut usize| -> Option<(usize, usize)> {
        let start = *position;
        let len = bytes[start..].iter().position(|&b| b == b' ')?;
        *position = start + len + 1;
        Some((start, start + len))
    };
    if next_word(bytes, &mut position).is_none() {
        return Ok(None);
    }
    let Some((mut start, mut end)) = next_word(bytes, &mut position) else {
        return Ok(None);
    };
    if bytes[start..end].eq_ignore_ascii_case(b"UID") {
        let Some(word) = next_word(bytes, &mut position) else {
            return Ok(None);
        };
        (start, end) = word;
    }
    let verb = &bytes[start..end];
    let verb_start = start;
    let is_sort = verb.eq_ignore_ascii_case(b"SORT");
    if !is_sort && !verb.eq_ignore_ascii_case(b"THREAD") {
        return Ok(None);
    }
    let rest = &bytes[position..];
    let (ordering, used) = if is_sort {
        let (criteria, used) = sort_criteria(rest)?;
        (Ordering::Sort(criteria), used)
    } else {
        let end = rest
            .iter()
            .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
            .unwrap_or(rest.len());
        let algorithm = match rest[..end].to_ascii_uppercase().as_slice() {
            b"ORDEREDSUBJECT" => ThreadAlgorithm::OrderedSubject,
            b"REFERENCES" => ThreadAlgorithm::References,
            _ => return Err("unsupported threading algorithm (ORDEREDSUBJECT REFERENCES)"),
        };
        (Ordering::Thread(algorithm), end)
    };
    let rest = &rest[used..];
    let Some(rest) = rest.strip_prefix(b" ") else {
        return Err("missing charset");
    };
    let charset_len = charset_length(rest).ok_or("charset must be an atom or a quoted string")?;
    let charset = &rest[..charset_len];
    let criteria = &rest[charset_len..];
    let criteria_start = criteria.strip_prefix(b" ").unwrap_or(criteria);
    if criteria.first() != Some(&b' ')
        || criteria_start.is_empty()
        || criteria_start.starts_with(b"\r")
        || criteria_start.starts_with(b"\n")
    {
        return Err("missing search criteria");
    }
    let mut rewritten = bytes[..verb_start].to_vec();
    rewritten.extend_from_slice(b"SEARCH CHARSET ");
    rewritten.extend_from_slice(charset);
    rewritten.extend_from_slice(criteria);
    Ok(Some((rewritten, ordering)))
}

/// `(key key ...)` at the start of `list`: the criteria and the bytes used.
fn sort_criteria(list: &[u8]) -> Result<(Vec<SortCriterion>, usize), &'static str> {
    if list.first() != Some(&b'(') {
        return Err("SORT needs a parenthesized list of sort criteria");
    }
    let close = list
        .iter()
        .take(MAX_SORT_LIST_BYTES)
        .position(|&b| b == b')')
        .ok_or("sort criteria list not closed")?;
    let mut criteria = Vec::new();
    let mut reverse = false;
    for word in list[1..close]
        .split(|&b| b == b' ')
        .filter(|w| !w.is_empty())
    {
        let key = match word.to_ascii_uppercase().as_slice() {
            b"REVERSE" if !reverse => {
                reverse = true;
                continue;
            }
            b"ARRIVAL" => SortKey::Arrival,
            b"CC" => SortKey::Cc,
            b"DATE" => SortKey::Date,
            b"FROM" => SortKey::From,
            b"SIZE" => SortKey::Size,
            b"SUBJECT" => SortKey::Subject,
            b"TO" => SortKey::To,
            b"DISPLAYFROM" => SortKey::DisplayFrom,
            b"DISPLAYTO" => SortKey::DisplayTo,
            _ => return Err("unknown sort criterion"),
        };
        criteria.push(SortCriterion { key, reverse });
        reverse = false;
        if criteria.len() > MAX_SORT_CRITERIA {
            return Err("too many sort criteria");
        }
    }
    if reverse {
        return Err("REVERSE must precede a sort key");
    }
    if criteria.is_empty() {
        return Err("empty sort criteria list");
    }
    Ok((criteria, close + 1))
}

/// Length of the charset argument at the start of `rest`: an atom or a quoted string (a
/// literal is not accepted here).
fn charset_length(rest: &[u8]) -> Option<usize> {
    if rest.first() == Some(&b'"') {
        let mut escaped = false;
        for (i, &b) in rest.iter().enumerate().skip(1) {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => return Some(i + 1),
                b'\r' | b'\n' => return None,
                _ => {}
            }
        }
        return None;
    }
    let len = rest
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .unwrap_or(rest.len());
    let atom = &rest[..len];
    (!atom.is_empty()
        && atom
            .iter()
            .all(|&b| b.is_ascii_graphic() && !b"(){%*\"\\]".contains(&b)))
    .then_some(len)
}

// ---------------------------------------------------------------------------------------
// Sort values
// ---------------------------------------------------------------------------------------

/// One message's value for one sort key.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SortValue {
    Number(i64),
    Text(String),
}

/// `text` mapped for comparison (the approximation of `i;unicode-casemap` described at the
/// top of this module).
pub fn casemap(text: &str) -> String {
    if text.is_ascii() {
        return text.to_ascii_uppercase();
    }
    let upper = text.to_uppercase();
    icu_normalizer::DecomposingNormalizerBorrowed::new_nfkd()
        .normalize(&upper)
        .into_owned()
}

/// The Date field of a header block as seconds since the epoch in UTC, `None` when there is
/// none that parses.
pub fn header_date(header: Option<&[u8]>) -> Option<i64> {
    header.and_then(|h| first_field(h, b"date")).and_then(|f| {
        match MessageStream::new(f.value).parse_date() {
            HeaderValue::DateTime(dt) if dt.is_valid() => Some(dt.to_timestamp()),
            _ => None,
        }
    })
}

/// The sent date (RFC 5256 section 2.2) as seconds since the epoch in UTC: the Date field,
/// or INTERNALDATE when there is no Date field that parses.
#[cfg(test)]
pub fn sent_date(header: Option<&[u8]>, meta: &MessageMeta) -> i64 {
    header_date(header).unwrap_or(meta.internal_date)
}

/// The decoded Subject field, empty when there is none.
pub fn subject_text(header: Option<&[u8]>) -> String {
    header
        .and_then(|h| first_field(h, b"subject"))
        .map(|f| decode_text(f.value))
        .unwrap_or_default()
}

/// A field value decoded (RFC 2047 words, folding); plain ASCII without encoded words is only
/// unfolded, without the full parse (base subject extraction collapses the spaces anyway).
fn decode_text(value: &[u8]) -> String {
    if value.is_ascii() && !value.windows(2).any(|w| w == b"=?") {
        return String::from_utf8_lossy(&unfold(value)).into_owned();
    }
    decode_field_value(value)
}

/// The first address of the field `name`: (addr-mailbox, display name decoded, addr-spec);
/// the last two are left empty unless `display` is asked for.
fn first_address(
    header: Option<&[u8]>,
    name: &[u8],
    display: bool,
) -> Option<(String, String, String)> {
    let field = first_field(header?, name)?;
    let addresses = parse_address_list(&unfold(field.value));
    let first = addresses.first()?;
    let text = |n: &imap_codec::imap_types::core::NString<'_>| {
        n.0.as_ref()
            .map(|s| String::from_utf8_lossy(s.as_ref()).into_owned())
            .unwrap_or_default()
    };
    let mailbox = text(&first.mailbox);
    if !display {
        return Some((mailbox, String::new(), String::new()));
    }
    let host = text(&first.host);
    let raw_name = text(&first.name);
    let display = if raw_name.is_empty() {
        String::new()
    } else {
        decode_text(format!("{raw_name}\r\n").as_bytes())
    };
    let spec = if host.is_empty() {
        mailbox.clone()
    } else {
        format!("{mailbox}@{host}")
    };
    Some((mailbox, display, spec))
}

/// The value of `key` for one message (`header`: its header block, when the key needs it):
/// the reference the cached keys of [`super::sort_keys`] are checked against.
#[cfg(test)]
pub fn sort_value(key: SortKey, header: Option<&[u8]>, meta: &MessageMeta) -> SortValue {
    match key {
        SortKey::Arrival => SortValue::Number(meta.internal_date),
        SortKey::Size => SortValue::Number(i64::from(meta.size)),
        SortKey::Date => SortValue::Number(sent_date(header, meta)),
        _ => SortValue::Text(text_key(key, header)),
    }
}

/// The case-mapped value of a text sort key (SUBJECT, FROM, TO, CC, DISPLAYFROM,
/// DISPLAYTO) from a header block; empty for the other keys.
pub fn text_key(key: SortKey, header: Option<&[u8]>) -> String {
    match key {
        SortKey::Subject => casemap(&base_subject(&subject_text(header)).0),
        SortKey::From | SortKey::To | SortKey::Cc => {
            let name: &[u8] = match key {
                SortKey::From => b"from",
                SortKey::To => b"to",
                _ => b"cc",
            };
            let mailbox = first_address(header, name, false)
                .map(|(mailbox, _, _)| mailbox)
                .unwrap_or_default();
            casemap(&mailbox)
        }
        SortKey::DisplayFrom | SortKey::DisplayTo => {
            let name: &[u8] = if key == SortKey::DisplayFrom {
                b"from"
            } else {
                b"to"
            };
            // RFC 5957: the decoded display name of the first address when it has a
            // non-empty one, otherwise its addr-spec; empty without an address.
            let display = first_address(header, name, true)
                .map(|(_, display, spec)| {
                    if display.trim().is_empty() {
                        spec
                    } else {
                        display
                    }
                })
                .unwrap_or_default();
            casemap(&display)
        }
        SortKey::Arrival | SortKey::Size | SortKey::Date => String::new(),
    }
}

/// The positions `0..values.len()` in the order the criteria give (`values[i]` holds message
/// i's value for each criterion, in order); ties keep the messages' mailbox order, which is
/// the order of `values` (RFC 5256: "the order in which they appear in the mailbox").
#[cfg(test)]
pub fn sorted_positions(criteria: &[SortCriterion], values: &[Vec<SortValue>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| {
        for (k, criterion) in criteria.iter().enumerate() {
            let ordering = values[a][k].cmp(&values[b][k]);
            let ordering = if criterion.reverse {
                ordering.reverse()
            } else {
                ordering
            };
            if ordering != std::cmp::Ordering::Equal {
                return ordering;
            }
        }
        std::cmp::Ordering::Equal
    });
    order
}

// ---------------------------------------------------------------------------------------
// Base subject (RFC 5256 section 2.1)
// ---------------------------------------------------------------------------------------

/// The base subject of a decoded subject, following RFC 5256 section 2.1 step by step, and
/// whether the extraction found a reply or forward (a `Re:`/`Fwd:` leader, a `(fwd)`
/// trailer or a `[fwd: ...]` wrapper), which THREAD=REFERENCES uses. Not case-mapped.
pub fn base_subject(subject: &str) -> (String, bool) {
    // (1) Tabs and line breaks become spaces; runs of spaces become one.
    let mut normalized = String::with_capacity(subject.len());
    let mut last_space = false;
    for c in subject.chars() {
        let space = matches!(c, ' ' | '\t' | '\r' | '\n');
        if space {
            if !last_space {
                normalized.push(' ');
            }
        } else {
            normalized.push(c);
        }
        last_space = space;
    }
    let mut text: &str = &normalized;
    let mut reply_or_forward = false;
    loop {
        // (2) subj-trailer: "(fwd)" / WSP, repeatedly.
        loop {
            if let Some(rest) = text.strip_suffix(' ') {
                text = rest;
            } else if text.len() >= 5
                && text.is_char_boundary(text.len() - 5)
                && text[text.len() - 5..].eq_ignore_ascii_case("(fwd)")
            {
                text = &text[..text.len() - 5];
                reply_or_forward = true;
            } else {
                break;
            }
        }
        // (3) subj-leader, (4) a subj-blob when a subject is left after it; (5) repeat.
        loop {
            let before = text.len();
            loop {
                if let Some(rest) = text.strip_prefix(' ') {
                    text = rest;
                } else if let Some(rest) = strip_refwd_leader(text) {
                    text = rest;
                    reply_or_forward = true;
                } else {
                    break;
                }
            }
            if let Some(rest) = strip_blob(text) {
                if !rest.is_empty() {
                    text = rest;
                }
            }
            if text.len() == before {
                break;
            }
        }
        // (6) subj-fwd: "[fwd:" subject "]", then again from step 2.
        if text.len() >= 6
            && text.as_bytes()[..5].eq_ignore_ascii_case(b"[fwd:")
            && text.ends_with(']')
        {
            text = &text[5..text.len() - 1];
            reply_or_forward = true;
            continue;
        }
        break;
    }
    (text.to_owned(), reply_or_forward)
}

/// subj-blob = "[" *BLOBCHAR "]" *WSP at the start of `text`: what follows it.
fn strip_blob(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('[')?;
    let close = inner.find([']', '['])?;
    if inner.as_bytes()[close] != b']' {
        return None;
    }
    Some(inner[close + 1..].trim_start_matches(' '))
}

/// `*subj-blob subj-refwd` at the start of `text`, where subj-refwd = ("re" / ("fw" ["d"]))
/// *WSP [subj-blob] ":": what follows it.
fn strip_refwd_leader(text: &str) -> Option<&str> {
    let mut rest = text;
    while let Some(after) = strip_blob(rest) {
        rest = after;
    }
    let bytes = rest.as_bytes();
    let word = if bytes.len() >= 3 && bytes[..3].eq_ignore_ascii_case(b"fwd") {
        3
    } else if bytes.len() >= 2
        && (bytes[..2].eq_ignore_ascii_case(b"re") || bytes[..2].eq_ignore_ascii_case(b"fw"))
    {
        2
    } else {
        return None;
    };
    let mut rest = rest[word..].trim_start_matches(' ');
    if let Some(after) = strip_blob(rest) {
        rest = after;
    }
    rest.strip_prefix(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(text: &str) -> Result<Option<(String, Ordering)>, &'static str> {
        strip_ordering(text.as_bytes())
            .map(|o| o.map(|(bytes, ordering)| (String::from_utf8(bytes).unwrap(), ordering)))
    }

    fn criterion(key: SortKey, reverse: bool) -> SortCriterion {
        SortCriterion { key, reverse }
    }

    #[test]
    fn sort_and_thread_become_a_search() {
        let (command, ordering) = strip("A1 SORT (REVERSE date subject) UTF-8 ALL\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(command, "A1 SEARCH CHARSET UTF-8 ALL\r\n");
        assert_eq!(
            ordering,
            Ordering::Sort(vec![
                criterion(SortKey::Date, true),
                criterion(SortKey::Subject, false)
            ])
        );
        let (command, ordering) = strip("A2 uid sort (DISPLAYFROM) \"us-ascii\" SUBJECT {3}\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            command,
            "A2 uid SEARCH CHARSET \"us-ascii\" SUBJECT {3}\r\n"
        );
        assert_eq!(
            ordering,
            Ordering::Sort(vec![criterion(SortKey::DisplayFrom, false)])
        );
        let (command, ordering) = strip("A3 UID THREAD references UTF-8 UNSEEN FROM x\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(command, "A3 UID SEARCH CHARSET UTF-8 UNSEEN FROM x\r\n");
        assert_eq!(ordering, Ordering::Thread(ThreadAlgorithm::References));
        assert_eq!(strip("A4 SEARCH ALL\r\n").unwrap(), None);
        assert_eq!(strip("A5 UID FETCH 1 FLAGS\r\n").unwrap(), None);
        for bad in [
            "B1 SORT DATE UTF-8 ALL\r\n",
            "B2 SORT (DATE UTF-8 ALL\r\n",
            "B3 SORT (DATE REVERSE) UTF-8 ALL\r\n",
            "B4 SORT (NAME) UTF-8 ALL\r\n",
            "B5 SORT () UTF-8 ALL\r\n",
            "B6 SORT (DATE) UTF-8\r\n",
            "B7 SORT (DATE)\r\n",
            "B8 THREAD X-JWZ UTF-8 ALL\r\n",
            "B9 THREAD REFERENCES UTF-8 \r\n",
            "C1 SORT (REVERSE REVERSE DATE) UTF-8 ALL\r\n",
            "C2 SORT (DATE) {5}\r\n",
        ] {
            assert!(strip(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_panic_on_any_prefix() {
        let command = "A1 UID SORT (REVERSE DATE SUBJECT) \"UTF-8\" OR FROM a TO b\r\n";
        for end in 0..=command.len() {
            let _ = strip(&command[..end]);
        }
        let command = "A1 THREAD REFERENCES US-ASCII ALL\r\n";
        for end in 0..=command.len() {
            let _ = strip(&command[..end]);
        }
    }

    /// RFC 5256 section 2.1, case by case.
    #[test]
    fn base_subject_extraction() {
        let cases: &[(&str, &str, bool)] = &[
            ("Hello", "Hello", false),
            ("  Hello\t  world  ", "Hello world", false),
            ("Re: Hello", "Hello", true),
            ("RE: re: Fwd: fw: Hello", "Hello", true),
            ("Re[2]: Hello", "Hello", true),
            ("Re [2] : Hello", "Hello", true),
            ("[list] Re: Hello", "Hello", true),
            ("[list] [tag] Re: Hello", "Hello", true),
            ("[list] Hello", "Hello", false),
            ("Re: [list] Re: Hello", "Hello", true),
            // A blob is only removed when a subject is left after it.
            ("[only a blob]", "[only a blob]", false),
            ("Re: [only a blob]", "[only a blob]", true),
            ("Hello (fwd)", "Hello", true),
            ("Hello (FWD) (fwd)  ", "Hello", true),
            ("[Fwd: Hello]", "Hello", true),
            ("[fwd: Re: Hello (fwd)]", "Hello", true),
            ("[Fwd: [Fwd: Hello]]", "Hello", true),
            ("Reply to all", "Reply to all", false),
            ("Re:", "", true),
            ("Fwd:Hello", "Hello", true),
            ("Fwdx: Hello", "Fwdx: Hello", false),
            ("Ré: Hello", "Ré: Hello", false),
            ("[a[b] Hello", "[a[b] Hello", false),
            ("", "", false),
            ("Re: Grüße (fwd)", "Grüße", true),
        ];
        for (subject, base, reply) in cases {
            assert_eq!(
                base_subject(subject),
                ((*base).to_owned(), *reply),
                "{subject:?}"
            );
        }
    }

    #[test]
    fn casemap_folds_case_beyond_ascii() {
        assert_eq!(casemap("HeLLo"), "HELLO");
        assert_eq!(casemap("Grüße"), casemap("GRÜSSE"));
        assert_eq!(casemap("ΣΊΣΥΦΟΣ"), casemap("σίσυφος"));
        assert_eq!(casemap("ς"), casemap("σ"));
        assert_ne!(casemap("a"), casemap("b"));
        // NFKD: precomposed and decomposed forms are equal; an accented letter sorts right
        // after its base letter; compatibility forms fold (`ﬁ` is `FI`).
        assert_eq!(casemap("\u{e9}"), casemap("e\u{301}"));
        assert!(casemap("apple") < casemap("\u{e4}pfel"));
        assert!(casemap("\u{e4}pfel") < casemap("banana"));
        assert_eq!(casemap("\u{fb01}le"), "FILE");
    }

    fn meta(uid: u32, size: u32, internal_date: i64) -> MessageMeta {
        MessageMeta {
            uid,
            blob: crate::store::BlobId([0; 32]),
            size,
            internal_date,
            internal_date_offset_min: 0,
            flags: Default::default(),
            modseq: 1,
            saved_at: 0,
        }
    }

    #[test]
    fn sort_values_of_header_keys() {
        let header = b"From: =?utf-8?q?Zo=C3=AB?= <Zoe (c) @example.org>\r\n\
            To: <Bob@example.org>, carol@example.org\r\n\
            Cc: group: dave@example.org;\r\n\
            Subject: Re: [list] =?utf-8?q?=C3=9Cber?= (fwd)\r\n\
            Date: Tue, 2 Jan 2024 10:00:00 +0200\r\n\r\n";
        let m = meta(1, 500, 99);
        let value = |key| sort_value(key, Some(header), &m);
        assert_eq!(value(SortKey::From), SortValue::Text("ZOE".into()));
        assert_eq!(value(SortKey::To), SortValue::Text("BOB".into()));
        // The first Cc "address" is the group's name (RFC 5256: its addr-mailbox).
        assert_eq!(value(SortKey::Cc), SortValue::Text("GROUP".into()));
        assert_eq!(
            value(SortKey::DisplayFrom),
            SortValue::Text("ZOE\u{308}".into())
        );
        assert_eq!(
            value(SortKey::DisplayTo),
            SortValue::Text("BOB@EXAMPLE.ORG".into())
        );
        assert_eq!(
            value(SortKey::Subject),
            SortValue::Text("U\u{308}BER".into())
        );
        assert_eq!(value(SortKey::Date), SortValue::Number(1_704_182_400));
        assert_eq!(value(SortKey::Size), SortValue::Number(500));
        assert_eq!(value(SortKey::Arrival), SortValue::Number(99));
        // No Date: INTERNALDATE; no field: the empty string.
        let bare = b"Subject: x\r\n\r\n";
        assert_eq!(
            sort_value(SortKey::Date, Some(bare), &m),
            SortValue::Number(99)
        );
        assert_eq!(
            sort_value(SortKey::From, Some(bare), &m),
            SortValue::Text(String::new())
        );
        assert_eq!(
            sort_value(SortKey::Date, Some(b"Date: garbage\r\n\r\n"), &m),
            SortValue::Number(99)
        );
    }

    #[test]
    fn ties_keep_mailbox_order_and_reverse_applies_to_one_key() {
        let text = |s: &str| SortValue::Text(s.into());
        let values = vec![
            vec![text("b"), SortValue::Number(1)],
            vec![text("a"), SortValue::Number(1)],
            vec![text("b"), SortValue::Number(2)],
            vec![text("a"), SortValue::Number(1)],
        ];
        let by = |criteria: &[SortCriterion]| sorted_positions(criteria, &values);
        assert_eq!(by(&[criterion(SortKey::Subject, false)]), vec![1, 3, 0, 2]);
        assert_eq!(by(&[criterion(SortKey::Subject, true)]), vec![0, 2, 1, 3]);
        assert_eq!(
            by(&[
                criterion(SortKey::Subject, true),
                criterion(SortKey::Size, true)
            ]),
            vec![2, 0, 1, 3]
        );
    }
}
