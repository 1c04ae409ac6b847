//! Response writing: small, allocation-free helpers that append wire bytes to the session's
//! output buffer, plus header slicing used by the FETCH and SEARCH fast paths.
//!
//! Simple responses (status lines, FLAGS, numbers, strings) are written directly: a FETCH of
//! 10,000 messages must not build 10,000 response trees. The structured items (ENVELOPE,
//! BODY, BODYSTRUCTURE) are encoded by imap-codec's `ResponseCodec`.

use std::io::Write;
use std::num::NonZeroU32;

use imap_codec::encode::Encoder;
use imap_codec::imap_types::core::NonEmptyVec;
use imap_codec::imap_types::fetch::MessageDataItem;
use imap_codec::imap_types::response::{Data, Response};
use imap_codec::ResponseCodec;

use crate::store::{Flag, FlagSet, StoreError};

/// `tag OK [code] text\r\n` (code optional).
pub fn tagged(out: &mut Vec<u8>, tag: &str, status: &str, code: Option<&str>, text: &str) {
    out.extend_from_slice(tag.as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.as_bytes());
    if let Some(code) = code {
        out.extend_from_slice(b" [");
        out.extend_from_slice(code.as_bytes());
        out.push(b']');
    }
    out.push(b' ');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `* text\r\n`.
pub fn untagged(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(b"* ");
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The response code and text for a failed store call.
pub fn store_error(error: &StoreError) -> (&'static str, String) {
    let code = match error {
        StoreError::Unavailable(_) | StoreError::StorageFailed(_) => "UNAVAILABLE",
        StoreError::InsufficientStorage(_) => "LIMIT",
        StoreError::NotFound(_) => "NONEXISTENT",
        StoreError::AlreadyExists(_) => "ALREADYEXISTS",
        StoreError::Invalid(_) | StoreError::Rejected(_) => "CANNOT",
        StoreError::OverQuota(_) => "OVERQUOTA",
        StoreError::Io(_) => "SERVERBUG",
        StoreError::NoPermission(_) => "NOPERM",
    };
    (code, error.to_string().replace(['\r', '\n'], " "))
}

/// A string as a quoted string when it can be one, else as a literal.
pub fn astring(out: &mut Vec<u8>, bytes: &[u8]) {
    let quotable = bytes
        .iter()
        .all(|&b| b.is_ascii() && b != b'\r' && b != b'\n' && b != 0);
    if quotable {
        out.push(b'"');
        for &b in bytes {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        literal(out, bytes);
    }
}

/// `{n}\r\n` followed by the bytes.
pub fn literal(out: &mut Vec<u8>, bytes: &[u8]) {
    let _ = write!(out, "{{{}}}\r\n", bytes.len());
    out.extend_from_slice(bytes);
}

pub fn flag_name(flag: &Flag) -> &str {
    match flag {
        Flag::Seen => "\\Seen",
        Flag::Answered => "\\Answered",
        Flag::Flagged => "\\Flagged",
        Flag::Deleted => "\\Deleted",
        Flag::Draft => "\\Draft",
        Flag::Keyword(keyword) => keyword,
    }
}

/// `(\Seen kw ... \Recent)`: the stored flags, and `\Recent` when this session owns the
/// message as recent.
pub fn flag_list_recent(out: &mut Vec<u8>, flags: &FlagSet, recent: bool) {
    flag_list(out, flags);
    if recent {
        out.pop();
        if !flags.is_empty() {
            out.push(b' ');
        }
        out.extend_from_slice(b"\\Recent)");
    }
}

/// The flags of a mailbox that knows `keywords`: the system flags and the keywords.
fn mailbox_flags(keywords: &[String]) -> FlagSet {
    let mut flags: FlagSet = [
        Flag::Answered,
        Flag::Flagged,
        Flag::Deleted,
        Flag::Seen,
        Flag::Draft,
    ]
    .into_iter()
    .collect();
    flags.extend(keywords.iter().map(|k| Flag::Keyword(k.clone())));
    flags
}

/// `* FLAGS (...)` for a mailbox that knows `keywords`.
pub fn flags_line(out: &mut Vec<u8>, keywords: &[String]) {
    out.extend_from_slice(b"* FLAGS ");
    flag_list(out, &mailbox_flags(keywords));
    out.extend_from_slice(b"\r\n");
}

/// `* OK [PERMANENTFLAGS (...)]` for a mailbox that knows `keywords` (empty when read-only;
/// `\*`: new keywords may be created).
pub fn permanent_flags_line(out: &mut Vec<u8>, keywords: &[String], read_only: bool) {
    if read_only {
        out.extend_from_slice(b"* OK [PERMANENTFLAGS ()] read-only mailbox\r\n");
    } else {
        let mut flags = mailbox_flags(keywords);
        flags.insert(Flag::Keyword("\\*".to_owned()));
        out.extend_from_slice(b"* OK [PERMANENTFLAGS ");
        flag_list(out, &flags);
        out.extend_from_slice(b"] flags permitted\r\n");
    }
}

/// `(\Seen kw ...)`.
pub fn flag_list(out: &mut Vec<u8>, flags: &FlagSet) {
    out.push(b'(');
    for (i, flag) in flags.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(flag_name(flag).as_bytes());
    }
    out.push(b')');
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Days since 1970-01-01 to (year, month 1-12, day 1-31) (Howard Hinnant's civil_from_days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// An INTERNALDATE as `"dd-Mon-yyyy hh:mm:ss +zzzz"`.
pub fn internal_date(out: &mut Vec<u8>, seconds: i64, offset_min: i16) {
    let local = seconds.saturating_add(i64::from(offset_min) * 60);
    let (year, month, day) = civil_from_days(local.div_euclid(86_400));
    let second_of_day = local.rem_euclid(86_400);
    let sign = if offset_min < 0 { '-' } else { '+' };
    let offset = offset_min.unsigned_abs();
    let _ = write!(
        out,
        "\"{:02}-{}-{:04} {:02}:{:02}:{:02} {}{:02}{:02}\"",
        day,
        MONTHS[(month - 1) as usize],
        year,
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        sign,
        offset / 60,
        offset % 60
    );
}

/// A sorted UID list in compact set syntax (`1:3,7`).
pub fn uid_set(out: &mut Vec<u8>, uids: &[u32]) {
    let mut i = 0;
    let mut first = true;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = uids[i];
        }
        if !first {
            out.push(b',');
        }
        first = false;
        if start == end {
            let _ = write!(out, "{start}");
        } else {
            let _ = write!(out, "{start}:{end}");
        }
        i += 1;
    }
}

/// Encodes one structured FETCH item with imap-codec (without the surrounding response).
pub fn codec_item(out: &mut Vec<u8>, item: MessageDataItem<'static>) {
    const PREFIX: &[u8] = b"* 1 FETCH (";
    const SUFFIX: &[u8] = b")\r\n";
    let response = Response::Data(Data::Fetch {
        seq: NonZeroU32::MIN,
        items: NonEmptyVec::from(item),
    });
    let encoded = ResponseCodec::default().encode(&response).dump();
    if encoded.starts_with(PREFIX) && encoded.ends_with(SUFFIX) {
        out.extend_from_slice(&encoded[PREFIX.len()..encoded.len() - SUFFIX.len()]);
    } else {
        // The codec's framing is fixed; this is a programming error, not a client error.
        debug_assert!(false, "unexpected FETCH encoding");
        out.extend_from_slice(b"NIL");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_render_in_the_imap_format() {
        let mut out = Vec::new();
        internal_date(&mut out, 0, 0);
        assert_eq!(out, b"\"01-Jan-1970 00:00:00 +0000\"");
        out.clear();
        // 2024-02-29 12:34:56 UTC shown at -0130.
        internal_date(&mut out, 1_709_210_096, -90);
        assert_eq!(out, b"\"29-Feb-2024 11:04:56 -0130\"");
    }

    #[test]
    fn uid_sets_are_compacted() {
        let mut out = Vec::new();
        uid_set(&mut out, &[1, 2, 3, 5, 7, 8]);
        assert_eq!(out, b"1:3,5,7:8");
    }

    #[test]
    fn strings_become_literals_when_they_cannot_be_quoted() {
        let mut out = Vec::new();
        astring(&mut out, b"a\"b");
        astring(&mut out, "é".as_bytes());
        assert_eq!(out, b"\"a\\\"b\"{2}\r\n\xc3\xa9");
    }
}
