//! STATUS=SIZE (RFC 8438): `STATUS name (... SIZE ...)` answers `SIZE n`, the mailbox's total
//! RFC822.SIZE in octets.
//!
//! imap-codec 1.0 does not know the SIZE item, so [`strip_size`] takes it out of the item list
//! before imap-codec decodes the rest (a list of SIZE alone becomes `(MESSAGES)`, whose value
//! the session leaves out).

/// What a STATUS asked beyond what imap-codec parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSize {
    /// SIZE was the only item: the MESSAGES put in its place is not reported.
    pub only: bool,
}

/// For `tag STATUS name (items)` naming SIZE: the command without it. `None` otherwise.
pub fn strip_size(bytes: &[u8]) -> Option<(Vec<u8>, StatusSize)> {
    strip_status_item(bytes, b"SIZE").map(|(rewritten, only)| (rewritten, StatusSize { only }))
}

/// For `tag STATUS name (items)` naming `item` (an extension imap-codec does not know): the
/// command without it, and whether it was the only item (then `MESSAGES` stands in its
/// place, so that the list stays valid, and is not to be reported). `None` otherwise.
pub fn strip_status_item(bytes: &[u8], item: &[u8]) -> Option<(Vec<u8>, bool)> {
    let mut words = bytes.splitn(3, |&b| b == b' ');
    let _tag = words.next()?;
    if !words.next()?.eq_ignore_ascii_case(b"STATUS") {
        return None;
    }
    let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let list = line.strip_suffix(b")")?;
    // The item list is the command's last argument and holds no parenthesis; a mailbox name
    // with one comes before it.
    let open = list.iter().rposition(|&b| b == b'(')?;
    let items: Vec<&[u8]> = list[open + 1..]
        .split(|&b| b == b' ')
        .filter(|w| !w.is_empty())
        .collect();
    if !items.iter().any(|w| w.eq_ignore_ascii_case(item)) {
        return None;
    }
    let kept: Vec<&[u8]> = items
        .into_iter()
        .filter(|w| !w.eq_ignore_ascii_case(item))
        .collect();
    let only = kept.is_empty();
    let mut rewritten = bytes[..=open].to_vec();
    if only {
        rewritten.extend_from_slice(b"MESSAGES");
    } else {
        rewritten.extend_from_slice(&kept.join(&b' '));
    }
    rewritten.extend_from_slice(b")");
    rewritten.extend_from_slice(&bytes[line.len()..]);
    Some((rewritten, only))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(text: &str) -> Option<(String, bool)> {
        strip_size(text.as_bytes()).map(|(b, s)| (String::from_utf8(b).unwrap(), s.only))
    }

    #[test]
    fn the_size_item_is_taken_out() {
        assert_eq!(
            strip("A1 STATUS INBOX (MESSAGES SIZE UNSEEN)\r\n"),
            Some(("A1 STATUS INBOX (MESSAGES UNSEEN)\r\n".into(), false))
        );
        assert_eq!(
            strip("A2 status \"a (b\" (size)\r\n"),
            Some(("A2 status \"a (b\" (MESSAGES)\r\n".into(), true))
        );
        assert_eq!(strip("A3 STATUS INBOX (MESSAGES)\r\n"), None);
        assert_eq!(strip("A4 SEARCH SIZE\r\n"), None);
        let command = "A5 STATUS INBOX (SIZE MESSAGES)\r\n";
        for end in 0..=command.len() {
            let _ = strip(&command[..end]);
        }
    }
}
