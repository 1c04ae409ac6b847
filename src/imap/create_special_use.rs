//! CREATE-SPECIAL-USE (RFC 6154 section 3): `CREATE name (USE (\Archive))`.
//!
//! imap-codec 1.0 does not parse CREATE parameters, so [`strip_use`] takes the `(USE (...))`
//! list out before it decodes the rest; the session creates the mailbox with that use.

use crate::store::SpecialUse;

/// What the USE list asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UseRequest {
    Use(SpecialUse),
    /// `(USE ())`: a plain mailbox.
    Nothing,
    /// A use this server cannot give (`\All`, `\Flagged`, an unknown one, or more than one):
    /// answered `NO [USEATTR]`.
    Unsupported,
}

/// For `tag CREATE name (USE (uses))`: the command without the parameter list and the use.
/// `None` for any other command.
pub fn strip_use(bytes: &[u8]) -> Option<(Vec<u8>, UseRequest)> {
    let mut words = bytes.splitn(3, |&b| b == b' ');
    let _tag = words.next()?;
    if !words.next()?.eq_ignore_ascii_case(b"CREATE") {
        return None;
    }
    let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b")")?.strip_suffix(b")")?;
    let open = inner.iter().rposition(|&b| b == b'(')?;
    let uses = &inner[open + 1..];
    let before = inner[..open].strip_suffix(b" ").unwrap_or(&inner[..open]);
    if before.len() < 4 || !before[before.len() - 4..].eq_ignore_ascii_case(b"(USE") {
        return None;
    }
    let name_end = before.len() - 4;
    let command_part = before[..name_end].strip_suffix(b" ")?;
    let mut found: Vec<UseRequest> = uses
        .split(|&b| b == b' ')
        .filter(|w| !w.is_empty())
        .map(|word| match word.to_ascii_lowercase().as_slice() {
            b"\\sent" => UseRequest::Use(SpecialUse::Sent),
            b"\\drafts" => UseRequest::Use(SpecialUse::Drafts),
            b"\\trash" => UseRequest::Use(SpecialUse::Trash),
            b"\\junk" => UseRequest::Use(SpecialUse::Junk),
            b"\\archive" => UseRequest::Use(SpecialUse::Archive),
            _ => UseRequest::Unsupported,
        })
        .collect();
    let request = match found.len() {
        0 => UseRequest::Nothing,
        1 => found.pop().unwrap_or(UseRequest::Unsupported),
        _ => UseRequest::Unsupported,
    };
    let mut rewritten = command_part.to_vec();
    rewritten.extend_from_slice(&bytes[line.len()..]);
    Some((rewritten, request))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(text: &str) -> Option<(String, UseRequest)> {
        strip_use(text.as_bytes()).map(|(b, u)| (String::from_utf8(b).unwrap(), u))
    }

    #[test]
    fn the_use_list_is_taken_out() {
        assert_eq!(
            strip("A1 CREATE Archive (USE (\\Archive))\r\n"),
            Some((
                "A1 CREATE Archive\r\n".into(),
                UseRequest::Use(SpecialUse::Archive)
            ))
        );
        assert_eq!(
            strip("A2 create \"My (Sent)\" (use (\\sent))\r\n"),
            Some((
                "A2 create \"My (Sent)\"\r\n".into(),
                UseRequest::Use(SpecialUse::Sent)
            ))
        );
        assert_eq!(
            strip("A3 CREATE x (USE (\\All))\r\n").map(|s| s.1),
            Some(UseRequest::Unsupported)
        );
        assert_eq!(
            strip("A4 CREATE x (USE (\\Sent \\Junk))\r\n").map(|s| s.1),
            Some(UseRequest::Unsupported)
        );
        assert_eq!(strip("A5 CREATE x\r\n"), None);
        assert_eq!(strip("A6 CREATE \"a (b)\"\r\n"), None);
        let command = "A7 CREATE x (USE (\\Trash))\r\n";
        for end in 0..=command.len() {
            let _ = strip(&command[..end]);
        }
    }
}
