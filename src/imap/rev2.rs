//! IMAP4rev2 (RFC 9051): advertised beside IMAP4rev1; `ENABLE IMAP4rev2` switches this
//! session to the rev2 behaviours where the two versions differ (RFC 9051 Appendix E):
//! - no `\Recent`: the session claims no recent messages (they stay recent for IMAP4rev1
//!   sessions), SELECT/EXAMINE send no `* n RECENT`, NOOP/IDLE none either, FETCH shows no
//!   `\Recent` flag;
//! - SELECT/EXAMINE send no `OK [UNSEEN n]` and name the mailbox in `* LIST () "/" name`;
//! - a SEARCH without RETURN is answered as `SEARCH RETURN (ALL)`: `* ESEARCH`, never
//!   `* SEARCH`;
//! - LIST names a parent that is no mailbox `\NonExistent` (which implies `\Noselect`)
//!   instead of `\Noselect`;
//! - quoted strings may hold UTF-8 (RFC 9051 4.3, for mailbox names and search strings):
//!   imap-codec 1.0 takes only ASCII in a quoted string, so [`utf8_quoted_as_literals`]
//!   turns each such string into a LITERAL+ literal of the same bytes before it decodes.
//!
//! What both versions share needs no switch: STATUS SIZE and DELETED, LITERAL- (LITERAL+
//! is accepted, a superset), NAMESPACE, UNSELECT, UIDPLUS, MOVE, ESEARCH, SEARCHRES, ENABLE,
//! IDLE, SASL-IR, LIST-EXTENDED, LIST-STATUS, SPECIAL-USE, BINARY, `OK [CLOSED]`.

use super::esearch::ReturnOptions;
use super::session::Session;

/// What a plain SEARCH returns under IMAP4rev2 (RFC 9051 6.4.4: as `RETURN (ALL)`).
pub const PLAIN_SEARCH: ReturnOptions = ReturnOptions {
    min: false,
    max: false,
    count: false,
    all: true,
    save: false,
    update: false,
    partial: None,
};

/// Longest quoted string rewritten as a literal (a command line is shorter anyway).
const MAX_QUOTED_BYTES: usize = 64 * 1024;

/// The command with every quoted string holding valid UTF-8 beyond ASCII written as a
/// non-synchronizing literal (escapes undone); `None` when there is none. Literals already
/// in the command are skipped unread; a quoted string that is not valid UTF-8 is left for
/// imap-codec to refuse.
pub fn utf8_quoted_as_literals(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.is_ascii() {
        return None;
    }
    let mut rewritten: Vec<u8> = Vec::new();
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'{' => {
                let close = at + bytes[at..].iter().take(16).position(|&b| b == b'}')?;
                let digits = std::str::from_utf8(&bytes[at + 1..close]).ok()?;
                let length: usize = digits.trim_end_matches(['+', '-']).parse().ok()?;
                at = close + 3 + length;
            }
            b'"' => {
                let start = at;
                let mut content: Vec<u8> = Vec::new();
                at += 1;
                while at < bytes.len() && bytes[at] != b'"' && content.len() <= MAX_QUOTED_BYTES {
                    if bytes[at] == b'\\' {
                        at += 1;
                    }
                    if let Some(&b) = bytes.get(at) {
                        content.push(b);
                    }
                    at += 1;
                }
                if bytes.get(at) != Some(&b'"') {
                    return None;
                }
                at += 1;
                if content.is_ascii() || std::str::from_utf8(&content).is_err() {
                    continue;
                }
                rewritten.extend_from_slice(&bytes[copied..start]);
                rewritten.extend_from_slice(format!("{{{}+}}\r\n", content.len()).as_bytes());
                rewritten.extend_from_slice(&content);
                copied = at;
            }
            _ => at += 1,
        }
    }
    if copied == 0 {
        return None;
    }
    rewritten.extend_from_slice(&bytes[copied.min(bytes.len())..]);
    Some(rewritten)
}

impl Session {
    /// `ENABLE IMAP4rev2`: true when this turned it on (it was off).
    pub(super) fn enable_rev2(&mut self) -> bool {
        if self.rev2 {
            return false;
        }
        self.rev2 = true;
        // `\Recent` goes: what this session owned stops showing (RFC 9051 Appendix E).
        self.recent = Default::default();
        true
    }

    /// The RETURN options of the running SEARCH: those given, or IMAP4rev2's ALL.
    pub(super) fn search_return(&mut self) -> Option<ReturnOptions> {
        self.esearch.take().or(self.rev2.then_some(PLAIN_SEARCH))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_quoted_strings_become_literals() {
        let check = |input: &str, expected: Option<&str>| {
            let got =
                utf8_quoted_as_literals(input.as_bytes()).map(|b| String::from_utf8(b).unwrap());
            assert_eq!(got.as_deref(), expected, "{input}");
        };
        check("a CREATE \"Küche\"\r\n", Some("a CREATE {6+}\r\nKüche\r\n"));
        check(
            "a RENAME \"Küche\" \"K\\\"ü\"\r\n",
            Some("a RENAME {6+}\r\nKüche {4+}\r\nK\"ü\r\n"),
        );
        check("a SELECT \"plain\"\r\n", None);
        check("a SEARCH SUBJECT {2}\r\n\"é \"x\"\r\n", None);
        check(
            "a SEARCH SUBJECT {2}\r\né \"ü\"\r\n",
            Some("a SEARCH SUBJECT {2}\r\né {2+}\r\nü\r\n"),
        );
        let latin1 = b"a CREATE \"K\xfcche\"\r\n";
        assert_eq!(utf8_quoted_as_literals(latin1), None);
    }
}
