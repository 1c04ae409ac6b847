//! SAVEDATE (RFC 8514): the `SAVEDATE` FETCH item and the `SAVEDBEFORE`, `SAVEDON`,
//! `SAVEDSINCE` and `SAVEDATESUPPORTED` search keys.
//!
//! The save date is [`MessageMeta::saved_at`], chosen by the proposer of the APPEND, COPY,
//! MOVE or delivery that saved the message (`store::savedate_state`), so every replica
//! answers the same. Every mailbox supports save dates, so `SAVEDATESUPPORTED` matches every
//! message. A message saved before save dates were kept has none: FETCH answers `SAVEDATE
//! NIL` for it, and the date keys compare its INTERNALDATE instead (the stand-in RFC 8514
//! gives for a mailbox without save dates).
//!
//! imap-codec 1.0 knows none of these: [`strip_fetch`] takes the FETCH item out before it
//! decodes the rest (the session writes the item itself), and [`rewrite_search`] turns each
//! date key into `HEADER "kermail savedon" "<day>"` ([`SAVEDBEFORE_HEADER`], ...: field
//! names with a space, which no real header has; `<day>`: days since 1970-01-01) and
//! `SAVEDATESUPPORTED` into `ALL`; [`key_matches`] evaluates the rewritten keys.
//! Save dates are compared as UTC days, the zone FETCH writes them in.

use imap_codec::imap_types::core::AString;

use super::scan::{line_end, walk_search_keys, Cursor};
use crate::store::MessageMeta;

/// Header names of the rewritten date keys (not valid field names).
pub const SAVEDBEFORE_HEADER: &str = "kermail savedbefore";
pub const SAVEDON_HEADER: &str = "kermail savedon";
pub const SAVEDSINCE_HEADER: &str = "kermail savedsince";

const MONTHS: [&[u8; 3]; 12] = [
    b"JAN", b"FEB", b"MAR", b"APR", b"MAY", b"JUN", b"JUL", b"AUG", b"SEP", b"OCT", b"NOV", b"DEC",
];

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle))
}

/// An IMAP `date` (`d-Mon-yyyy`, RFC 3501 `date-text`) as days since 1970-01-01.
pub fn parse_date(text: &[u8]) -> Option<i64> {
    let mut parts = text.split(|&b| b == b'-');
    let (day, month, year) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || !(1..=2).contains(&day.len())
        || year.len() != 4
        || !day.iter().chain(year).all(u8::is_ascii_digit)
    {
        return None;
    }
    let day: u32 = std::str::from_utf8(day).ok()?.parse().ok()?;
    let year: i64 = std::str::from_utf8(year).ok()?.parse().ok()?;
    let month = MONTHS
        .iter()
        .position(|name| month.eq_ignore_ascii_case(*name))? as u32
        + 1;
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day == 0 || day > days_in_month {
        return None;
    }
    Some(super::search::days_from_civil(year, month, day))
}

/// For a SEARCH (or a SORT/THREAD already rewritten as one) using a SAVEDATE key: the
/// command with each key rewritten for imap-codec. `Ok(None)`: no such key, the command is
/// left as it is; `Err`: a key with a malformed date.
pub fn rewrite_search(bytes: &[u8]) -> Result<Option<Vec<u8>>, &'static str> {
    if !contains_ignore_case(bytes, b"SAVED") {
        return Ok(None);
    }
    let end = line_end(bytes);
    let mut cursor = Cursor { bytes, pos: 0 };
    // The tag is not a key, whatever it spells.
    cursor.word();
    let mut rewritten: Vec<u8> = Vec::new();
    let mut copied = 0;
    let well_formed = walk_search_keys(&mut cursor, end, |upper, start, cursor| {
        let name = match upper {
            b"SAVEDATESUPPORTED" => {
                rewritten.extend_from_slice(&bytes[copied..start]);
                rewritten.extend_from_slice(b"ALL");
                copied = cursor.pos;
                return Ok(());
            }
            b"SAVEDBEFORE" => SAVEDBEFORE_HEADER,
            b"SAVEDON" => SAVEDON_HEADER,
            b"SAVEDSINCE" => SAVEDSINCE_HEADER,
            _ => return Ok(()),
        };
        const BAD_DATE: &str = "SAVEDBEFORE, SAVEDON and SAVEDSINCE need a date (1-Feb-2024)";
        if cursor.peek() != Some(b' ') {
            return Err(BAD_DATE);
        }
        cursor.pos += 1;
        let date = match cursor.peek() {
            Some(b'"') => cursor.quoted().ok_or(BAD_DATE)?,
            _ => cursor.word(),
        };
        let day = parse_date(date).ok_or(BAD_DATE)?;
        rewritten.extend_from_slice(&bytes[copied..start]);
        rewritten.extend_from_slice(format!("HEADER \"{name}\" \"{day}\"").as_bytes());
        copied = cursor.pos;
        Ok(())
    })?;
    if !well_formed || copied == 0 {
        return Ok(None);
    }
    rewritten.extend_from_slice(&bytes[copied..]);
    Ok(Some(rewritten))
}

/// Whether a HEADER key is a rewritten SAVEDATE key (evaluated from metadata alone).
pub fn is_saved_key(name: &AString<'_>) -> bool {
    let name: &[u8] = name.as_ref();
    [SAVEDBEFORE_HEADER, SAVEDON_HEADER, SAVEDSINCE_HEADER]
        .iter()
        .any(|header| name.eq_ignore_ascii_case(header.as_bytes()))
}

/// The day a message was saved (UTC); for a message without a save date, its INTERNALDATE's
/// day in its own zone, as the BEFORE/ON/SINCE keys see it.
fn saved_day(meta: &MessageMeta) -> i64 {
    if meta.saved_at == 0 {
        let local = meta.internal_date + i64::from(meta.internal_date_offset_min) * 60;
        return local.div_euclid(86_400);
    }
    i64::from(meta.saved_at).div_euclid(86_400)
}

/// Whether `meta` matches a rewritten SAVEDATE key ([`is_saved_key`]); false for any other.
pub fn key_matches(name: &AString<'_>, value: &AString<'_>, meta: &MessageMeta) -> bool {
    let name: &[u8] = name.as_ref();
    let value: &[u8] = value.as_ref();
    let Some(day) = std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
    else {
        return false;
    };
    let saved = saved_day(meta);
    if name.eq_ignore_ascii_case(SAVEDBEFORE_HEADER.as_bytes()) {
        saved < day
    } else if name.eq_ignore_ascii_case(SAVEDON_HEADER.as_bytes()) {
        saved == day
    } else if name.eq_ignore_ascii_case(SAVEDSINCE_HEADER.as_bytes()) {
        saved >= day
    } else {
        false
    }
}

/// Whether a FETCH item list entry is SAVEDATE.
fn is_savedate_item(item: &[u8]) -> bool {
    item.eq_ignore_ascii_case(b"SAVEDATE")
}

/// For `tag [UID] FETCH set items ...` naming SAVEDATE: the command without it (a list left
/// empty becomes `(UID)`). `None` otherwise.
pub fn strip_fetch(bytes: &[u8]) -> Option<Vec<u8>> {
    if !contains_ignore_case(bytes, b"SAVEDATE") {
        return None;
    }
    let fetch = super::fetch_items::split_fetch(bytes)?;
    let mut kept: Vec<&[u8]> = Vec::with_capacity(fetch.items.len());
    let mut found = false;
    for &item in &fetch.items {
        if is_savedate_item(item) {
            found = true;
        } else {
            kept.push(item);
        }
    }
    if !found {
        return None;
    }
    if kept.is_empty() {
        kept.push(b"UID");
    }
    Some(fetch.join(&kept))
}

/// The FETCH item: `SAVEDATE "d-Mon-yyyy hh:mm:ss +0000"`, or `SAVEDATE NIL` when unknown.
pub fn write_item(out: &mut Vec<u8>, meta: &MessageMeta) {
    out.extend_from_slice(b"SAVEDATE ");
    if meta.saved_at == 0 {
        out.extend_from_slice(b"NIL");
    } else {
        super::response::internal_date(out, i64::from(meta.saved_at), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BlobId, FlagSet};

    fn meta(saved_at: u32, internal_date: i64, offset_min: i16) -> MessageMeta {
        MessageMeta {
            uid: 1,
            blob: BlobId([0; 32]),
            size: 1,
            internal_date,
            internal_date_offset_min: offset_min,
            flags: FlagSet::new(),
            modseq: 1,
            saved_at,
        }
    }

    fn text(bytes: Option<Vec<u8>>) -> Option<String> {
        bytes.map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn dates_parse_strictly() {
        assert_eq!(parse_date(b"1-Jan-1970"), Some(0));
        assert_eq!(parse_date(b"02-jan-1970"), Some(1));
        assert_eq!(parse_date(b"29-Feb-2024"), Some(19_782));
        for bad in [
            &b"29-Feb-2023"[..],
            b"0-Jan-2020",
            b"32-Jan-2020",
            b"1-Jan-20",
            b"1-Foo-2020",
            b"1-Jan-2020-1",
            b"",
            b"x1-Jan-2020",
        ] {
            assert_eq!(parse_date(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn search_keys_are_rewritten_and_arguments_left_alone() {
        let check = |input: &str, expected: Option<&str>| {
            assert_eq!(
                text(rewrite_search(input.as_bytes()).unwrap()).as_deref(),
                expected,
                "{input}"
            );
        };
        check(
            "a SEARCH SAVEDSINCE 1-Jan-1970 SAVEDBEFORE \"2-Jan-1970\"\r\n",
            Some(
                "a SEARCH HEADER \"kermail savedsince\" \"0\" HEADER \"kermail savedbefore\" \
                 \"1\"\r\n",
            ),
        );
        check(
            "a UID SEARCH OR SAVEDON 2-Jan-1970 (SAVEDATESUPPORTED)\r\n",
            Some("a UID SEARCH OR HEADER \"kermail savedon\" \"1\" (ALL)\r\n"),
        );
        // Key names as arguments of other keys, quoted or in literals, are not keys.
        check("a SEARCH SUBJECT SAVEDON\r\n", None);
        check("a SEARCH HEADER SAVEDON SAVEDON\r\n", None);
        check("a SEARCH TEXT \"SAVEDON 1-Jan-2020\"\r\n", None);
        check("a SEARCH BODY {7}\r\nSAVEDON\r\n", None);
        check("SAVEDON SEARCH ALL\r\n", None);
        check(
            "a SEARCH FROM {3+}\r\nabc SAVEDATESUPPORTED\r\n",
            Some("a SEARCH FROM {3+}\r\nabc ALL\r\n"),
        );
        for bad in [
            "a SEARCH SAVEDON\r\n",
            "a SEARCH SAVEDON 31-Feb-2020\r\n",
            "a SEARCH SAVEDSINCE yesterday\r\n",
            "a SEARCH SAVEDBEFORE \"1-Jan-2020\r\n",
        ] {
            assert!(rewrite_search(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn fetch_item_is_taken_out() {
        let check = |input: &str, expected: Option<&str>| {
            assert_eq!(
                text(strip_fetch(input.as_bytes())).as_deref(),
                expected,
                "{input}"
            );
        };
        check("a FETCH 1 SAVEDATE\r\n", Some("a FETCH 1 UID\r\n"));
        check("a FETCH 1:* (savedate)\r\n", Some("a FETCH 1:* (UID)\r\n"));
        check(
            "a UID FETCH 1 (FLAGS SAVEDATE BODY.PEEK[HEADER.FIELDS (SAVEDATE)])\r\n",
            Some("a UID FETCH 1 (FLAGS BODY.PEEK[HEADER.FIELDS (SAVEDATE)])\r\n"),
        );
        check(
            "a FETCH 1 (SAVEDATE INTERNALDATE) (CHANGEDSINCE 4)\r\n",
            Some("a FETCH 1 (INTERNALDATE) (CHANGEDSINCE 4)\r\n"),
        );
        check("a FETCH 1 (BODY[HEADER.FIELDS (SAVEDATE)])\r\n", None);
        check("a SEARCH SAVEDATE\r\n", None);
        check("a FETCH 1 (FLAGS\r\n", None);
    }

    #[test]
    fn rewritten_keys_compare_save_days_or_the_internal_day() {
        let key = |name: &'static str, day: i64| {
            (
                AString::try_from(name).unwrap(),
                AString::try_from(day.to_string()).unwrap(),
            )
        };
        // Saved 2 Jan 1970 23:59:59 UTC; internal date 10 days earlier.
        let known = meta(2 * 86_400 - 1, -9 * 86_400, 0);
        // No save date: the internal date's own day counts (+01:00 moves it to day 1).
        let unknown = meta(0, 86_400 - 1800, 60);
        for (name, day, on_known, on_unknown) in [
            (SAVEDON_HEADER, 1, true, true),
            (SAVEDON_HEADER, 0, false, false),
            (SAVEDBEFORE_HEADER, 2, true, true),
            (SAVEDBEFORE_HEADER, 1, false, false),
            (SAVEDSINCE_HEADER, 1, true, true),
            (SAVEDSINCE_HEADER, 2, false, false),
        ] {
            let (name_string, value) = key(name, day);
            assert!(is_saved_key(&name_string));
            assert_eq!(key_matches(&name_string, &value, &known), on_known);
            assert_eq!(key_matches(&name_string, &value, &unknown), on_unknown);
        }
        let (other, value) = key("Subject", 1);
        assert!(!is_saved_key(&other));
        assert!(!key_matches(&other, &value, &known));
    }

    #[test]
    fn fetch_item_is_written_in_utc_or_nil() {
        let mut out = Vec::new();
        write_item(&mut out, &meta(86_400 + 3_661, 0, 120));
        assert_eq!(out, b"SAVEDATE \"02-Jan-1970 01:01:01 +0000\"");
        out.clear();
        write_item(&mut out, &meta(0, 5, 0));
        assert_eq!(out, b"SAVEDATE NIL");
    }
}
