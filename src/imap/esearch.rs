//! ESEARCH (RFC 4731): `SEARCH RETURN (MIN MAX COUNT ALL) criteria`, answered with
//! `* ESEARCH (TAG "t") [UID] MIN n MAX n COUNT n ALL set`.
//!
//! imap-codec 1.0 does not parse the RETURN clause, so [`strip_return`] takes it out of the
//! command's bytes and the rest is decoded as a plain SEARCH; the session then writes the
//! results with [`write_esearch`] instead of `* SEARCH`.
//!
//! The RETURN list also carries SAVE (RFC 5182, see `searchres`), UPDATE (RFC 5267, see
//! `context_search`) and PARTIAL (RFC 5267 as extended by RFC 9394: `1:100` counts from the
//! first match, `-1:-100` from the last).

use std::io::Write;

use super::response::uid_set;

/// The result options of one `SEARCH RETURN (...)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReturnOptions {
    pub min: bool,
    pub max: bool,
    pub count: bool,
    pub all: bool,
    /// RFC 5182: keep the result as `$`.
    pub save: bool,
    /// RFC 5267: keep the search as a context and report its changes (ADDTO/REMOVEFROM).
    pub update: bool,
    /// RFC 5267/9394: the matches at these 1-based positions (negative: from the last),
    /// both of one sign, as the client wrote them (echoed so; either order means the same).
    pub partial: Option<(i64, i64)>,
}

impl ReturnOptions {
    /// Whether a `* ESEARCH` line is written (SAVE alone asks for none, RFC 5182 2.1).
    pub fn answers(&self) -> bool {
        self.min || self.max || self.count || self.all || self.partial.is_some()
    }
}

/// Parses a PARTIAL range: `a:b` of non-zero numbers of one sign, in either order.
fn partial_range(word: &[u8]) -> Option<(i64, i64)> {
    let text = std::str::from_utf8(word).ok()?;
    let (a, b) = text.split_once(':')?;
    let number = |s: &str| -> Option<i64> {
        let digits = s.strip_prefix('-').unwrap_or(s);
        if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: i64 = s.parse().ok()?;
        (n != 0 && n.abs() <= i64::from(u32::MAX)).then_some(n)
    };
    let (a, b) = (number(a)?, number(b)?);
    if (a < 0) != (b < 0) {
        return None;
    }
    Some((a, b))
}

/// The matches a PARTIAL range names (`results` ascending).
pub fn partial_slice(results: &[u32], (a, b): (i64, i64)) -> &[u32] {
    let (low, high) = if a.abs() <= b.abs() { (a, b) } else { (b, a) };
    let len = results.len() as i64;
    let (start, end) = if low > 0 {
        (low - 1, high)
    } else {
        (len + high, len + low + 1)
    };
    let start = start.clamp(0, len) as usize;
    let end = end.clamp(0, len) as usize;
    if start >= end {
        return &[];
    }
    &results[start..end]
}

/// Most bytes of a RETURN list looked at (four short options fit many times over).
const MAX_RETURN_LIST_BYTES: usize = 256;

/// For `tag [UID] SEARCH RETURN (opts) rest`: the command without the RETURN clause and the
/// options. `Ok(None)` for any other command; `Err` for a RETURN list that cannot be honoured.
pub fn strip_return(bytes: &[u8]) -> Result<Option<(Vec<u8>, ReturnOptions)>, &'static str> {
    strip_return_of(bytes, b"SEARCH")
}

/// [`strip_return`] for the command `verb` (SEARCH, or SORT for ESORT, RFC 5267 3).
pub fn strip_return_of(
    bytes: &[u8],
    expected_verb: &[u8],
) -> Result<Option<(Vec<u8>, ReturnOptions)>, &'static str> {
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
    if !verb.eq_ignore_ascii_case(expected_verb) {
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
    let mut words = list[1..close]
        .split(|&b| b == b' ')
        .filter(|w| !w.is_empty());
    while let Some(word) = words.next() {
        match word.to_ascii_uppercase().as_slice() {
            b"MIN" => options.min = true,
            b"MAX" => options.max = true,
            b"COUNT" => options.count = true,
            b"ALL" => options.all = true,
            b"SAVE" => options.save = true,
            b"UPDATE" => options.update = true,
            b"PARTIAL" => {
                let range = words.next().and_then(partial_range);
                options.partial =
                    Some(range.ok_or("PARTIAL needs a range such as 1:100 or -1:-100")?);
            }
            _ => return Err("unsupported RETURN option (MIN MAX COUNT ALL SAVE UPDATE PARTIAL)"),
        }
    }
    if options.partial.is_some() && options.all {
        // RFC 9394 3.1: PARTIAL and ALL exclude each other.
        return Err("RETURN cannot hold both PARTIAL and ALL");
    }
    if !options.answers() && (options.update || !options.save) {
        // `RETURN ()` means ALL (RFC 4731 3.1); so does UPDATE alone, whose client needs the
        // matches it will get changes of. SAVE alone answers nothing (RFC 5182 2.1).
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
    if let Some((low, high)) = options.partial {
        let _ = write!(out, " PARTIAL ({low}:{high} ");
        let named = partial_slice(results, (low, high));
        if named.is_empty() {
            out.extend_from_slice(b"NIL");
        } else {
            uid_set(out, named);
        }
        out.push(b')');
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
        let (_, options) = strip("E SEARCH RETURN (SAVE) ALL\r\n").unwrap().unwrap();
        assert!(options.save && !options.answers());
        let (_, options) = strip("E SEARCH RETURN (SAVE MIN) ALL\r\n")
            .unwrap()
            .unwrap();
        assert!(options.save && options.min && !options.all);
        let (_, options) = strip("E SEARCH RETURN (UPDATE) ALL\r\n").unwrap().unwrap();
        assert!(options.update && options.all);
        let (_, options) = strip("E SEARCH RETURN (PARTIAL -1:-5 COUNT) ALL\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(options.partial, Some((-1, -5)));
        assert!(options.count && !options.all);
        let (_, options) = strip("E SEARCH RETURN (PARTIAL 9:3) ALL\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(options.partial, Some((9, 3)));
        assert!(strip("E SEARCH RETURN (PARTIAL 1:-3) ALL\r\n").is_err());
        assert!(strip("E SEARCH RETURN (PARTIAL 0:3) ALL\r\n").is_err());
        assert!(strip("E SEARCH RETURN (PARTIAL) ALL\r\n").is_err());
        assert!(strip("E SEARCH RETURN (PARTIAL 1:3 ALL) ALL\r\n").is_err());
        assert!(strip("E SEARCH RETURN (FUZZY) ALL\r\n").is_err());
        assert!(strip("F SEARCH RETURN MIN ALL\r\n").is_err());
        let (command, options) = strip_return_of(
            b"G UID SORT RETURN (MIN COUNT) (DATE) UTF-8 ALL\r\n",
            b"SORT",
        )
        .unwrap()
        .unwrap();
        assert_eq!(command, b"G UID SORT (DATE) UTF-8 ALL\r\n");
        assert!(options.min && options.count);
    }

    #[test]
    fn results_are_written_as_rfc_4731_says() {
        let all = ReturnOptions {
            min: true,
            max: true,
            count: true,
            all: true,
            ..ReturnOptions::default()
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

    #[test]
    fn partial_names_positions_from_either_end() {
        let results = [2, 3, 4, 9, 11];
        assert_eq!(partial_slice(&results, (1, 2)), &[2, 3]);
        assert_eq!(partial_slice(&results, (4, 100)), &[9, 11]);
        assert_eq!(partial_slice(&results, (100, 4)), &[9, 11]);
        assert_eq!(partial_slice(&results, (-2, -1)), &[9, 11]);
        assert_eq!(partial_slice(&results, (6, 9)), &[] as &[u32]);
        assert_eq!(partial_slice(&results, (-1, -2)), &[9, 11]);
        assert_eq!(partial_slice(&results, (-3, -100)), &[2, 3, 4]);
        assert_eq!(partial_slice(&results, (-6, -7)), &[] as &[u32]);
        let options = ReturnOptions {
            partial: Some((-1, -2)),
            ..ReturnOptions::default()
        };
        let mut out = Vec::new();
        write_esearch(&mut out, "P", true, options, &results);
        assert_eq!(out, b"* ESEARCH (TAG \"P\") UID PARTIAL (-1:-2 9,11)\r\n");
        out.clear();
        write_esearch(&mut out, "P", false, options, &[]);
        assert_eq!(out, b"* ESEARCH (TAG \"P\") PARTIAL (-1:-2 NIL)\r\n");
    }
}
