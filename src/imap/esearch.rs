//! ESEARCH (RFC 4731): `SEARCH RETURN (MIN MAX COUNT ALL) criteria`, answered with
//! `* ESEARCH (TAG "t") [UID] MIN n MAX n COUNT n ALL set`.
//!
//! imap-codec 1.0 does not parse the RETURN clause, so [`strip_return`] takes it out of the
//! command's bytes and the rest is decoded as a plain SEARCH; the session then writes the
//! results with [`write_esearch`] instead of `* SEARCH`.

use std::io::Write;

use super::response::uid_set;

/// The result options of one `SEARCH RETURN (...)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReturnOptions {
    pub min: bool,
    pub max: bool,
    pub count: bool,
    pub all: bool,
}

/// Most bytes of a RETURN list looked at (four short options fit many times over).
const MAX_RETURN_LIST_BYTES: usize = 256;

/// For `tag [UID] SEARCH RETURN (opts) rest`: the command without the RETURN clause and the
/// options. `Ok(None)` for any other command; `Err` for a RETURN list that cannot be honoured.
pub fn strip_return(bytes: &[u8]) -> Result<Option<(Vec<u8>, ReturnOptions)>, &'static str> {
    let mut position = 0;
    let mut next_word = |bytes: &[u8]| -> Option<(usize, usize)> {
        let start = position;
        let len = bytes[start..].iter().position(|&b| b == b' ')?;
        position = start + len + 1;
        Some((start, start + len))
    };
    let Some(_tag) = next_word(bytes) else {
        return Ok(None);
    };
    let Some((start, end)) = next_word(bytes) else {
        return Ok(None);
    };
    let mut verb = &bytes[start..end];
    if verb.eq_ignore_ascii_case(b"UID") {
        let Some((start, end)) = next_word(bytes) else {
            return Ok(None);
        };
        verb = &bytes[start..end];
    }
    if !verb.eq_ignore_ascii_case(b"SEARCH") {
        return Ok(None);
    }
    let rest = &bytes[position..];
    if rest.len() < 7 || !rest[..7].eq_ignore_ascii_case(b"RETURN ") {
        return Ok(None);
    }
    let list = &rest[7..];
    if list.first() != Some(&b'(') {
        return Err("RETURN needs a parenthesized list");
    }
    let Some(close) = list
        .iter()
        .take(MAX_RETURN_LIST_BYTES)
        .position(|&b| b == b')')
    else {
        return Err("RETURN list not closed");
    };
    let mut options = ReturnOptions::default();
    for word in list[1..close]
        .split(|&b| b == b' ')
        .filter(|w| !w.is_empty())
    {
        match word.to_ascii_uppercase().as_slice() {
            b"MIN" => options.min = true,
            b"MAX" => options.max = true,
            b"COUNT" => options.count = true,
            b"ALL" => options.all = true,
            _ => return Err("unsupported RETURN option (MIN MAX COUNT ALL)"),
        }
    }
    if options == ReturnOptions::default() {
        // `RETURN ()` means ALL (RFC 4731 3.1).
        options.all = true;
    }
    let after = &list[close + 1..];
    let after = after.strip_prefix(b" ").unwrap_or(after);
    let mut rewritten = bytes[..position].to_vec();
    rewritten.extend_from_slice(after);
    Ok(Some((rewritten, options)))
}

/// `* ESEARCH (TAG "tag") [UID] ...` for `results` (ascending sequence numbers or UIDs).
pub fn write_esearch(
    out: &mut Vec<u8>,
    tag: &str,
    uid: bool,
    options: ReturnOptions,
    results: &[u32],
) {
    out.extend_from_slice(b"* ESEARCH (TAG \"");
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(b"\")");
    if uid {
        out.extend_from_slice(b" UID");
    }
    if let (true, Some(min)) = (options.min, results.first()) {
        let _ = write!(out, " MIN {min}");
    }
    if let (true, Some(max)) = (options.max, results.last()) {
        let _ = write!(out, " MAX {max}");
    }
    if options.count {
        let _ = write!(out, " COUNT {}", results.len());
    }
    if options.all && !results.is_empty() {
        out.extend_from_slice(b" ALL ");
        uid_set(out, results);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(text: &str) -> Result<Option<(String, ReturnOptions)>, &'static str> {
        strip_return(text.as_bytes())
            .map(|o| o.map(|(bytes, options)| (String::from_utf8(bytes).unwrap(), options)))
    }

    #[test]
    fn the_return_clause_is_taken_out() {
        let (command, options) = strip("A UID SEARCH RETURN (MIN count) UNSEEN\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(command, "A UID SEARCH UNSEEN\r\n");
        assert!(options.min && options.count && !options.max && !options.all);
        let (command, options) = strip("B search return () 1:*\r\n").unwrap().unwrap();
        assert_eq!(command, "B search 1:*\r\n");
        assert!(options.all);
        assert_eq!(strip("C SEARCH UNSEEN\r\n").unwrap(), None);
        assert_eq!(strip("D FETCH 1 (FLAGS)\r\n").unwrap(), None);
        assert!(strip("E SEARCH RETURN (SAVE) ALL\r\n").is_err());
        assert!(strip("F SEARCH RETURN MIN ALL\r\n").is_err());
    }

    #[test]
    fn results_are_written_as_rfc_4731_says() {
        let all = ReturnOptions {
            min: true,
            max: true,
            count: true,
            all: true,
        };
        let mut out = Vec::new();
        write_esearch(&mut out, "A1", true, all, &[2, 3, 4, 9]);
        assert_eq!(
            out,
            b"* ESEARCH (TAG \"A1\") UID MIN 2 MAX 9 COUNT 4 ALL 2:4,9\r\n"
        );
        out.clear();
        write_esearch(&mut out, "A2", false, all, &[]);
        assert_eq!(out, b"* ESEARCH (TAG \"A2\") COUNT 0\r\n");
    }
}
