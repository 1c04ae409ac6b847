//! Syntax rules for domains, addresses and mailbox names.
//!
//! Pure functions used both by the proposer (to refuse early, without a log entry) and by apply
//! (so that a command that slipped past a proposer still cannot create a bad name).

use super::command::ApplyError;

/// RFC 5321: a domain is at most 255 octets; DNS names at most 253 characters.
pub const MAX_DOMAIN_LEN: usize = 253;
/// RFC 1035: a DNS label is at most 63 octets.
pub const MAX_LABEL_LEN: usize = 63;
/// RFC 5321: a local part is at most 64 octets.
pub const MAX_LOCAL_PART_LEN: usize = 64;
/// A mailbox name in bytes (UTF-8); Dovecot's own limit is of the same order.
pub const MAX_MAILBOX_NAME_LEN: usize = 255;
/// Hierarchy depth of a mailbox name, so that creating parents stays bounded.
pub const MAX_MAILBOX_DEPTH: usize = 16;
/// A keyword's length in bytes.
pub const MAX_KEYWORD_LEN: usize = 64;

pub const INBOX: &str = "INBOX";
pub const SEPARATOR: char = '/';

fn invalid(why: impl Into<String>) -> ApplyError {
    ApplyError::Invalid(why.into())
}

/// Lowercases and checks a domain name (ASCII; IDNs are given in their xn-- form).
pub fn normalize_domain(domain: &str) -> Result<String, ApplyError> {
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    if domain.is_empty() {
        return Err(invalid("domain must not be empty"));
    }
    if domain.len() > MAX_DOMAIN_LEN {
        return Err(invalid(format!(
            "domain is longer than {MAX_DOMAIN_LEN} characters"
        )));
    }
    for label in domain.split('.') {
        let sane = !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !sane {
            return Err(invalid(format!(
                "invalid domain {domain:?}: use letters, digits and '-' in dot-separated labels"
            )));
        }
    }
    Ok(domain)
}

fn is_local_part_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b)
}

/// Lowercases and checks an address `local@domain` (dot-atom local part, ASCII).
pub fn normalize_address(address: &str) -> Result<String, ApplyError> {
    let address = address.trim().to_ascii_lowercase();
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err(invalid(format!(
            "invalid address {address:?}: expected local@domain"
        )));
    };
    let sane_local = !local.is_empty()
        && local.len() <= MAX_LOCAL_PART_LEN
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.bytes().all(is_local_part_byte);
    if !sane_local {
        return Err(invalid(format!(
            "invalid address {address:?}: bad local part"
        )));
    }
    let domain = normalize_domain(domain)?;
    Ok(format!("{local}@{domain}"))
}

/// The domain of a normalized address.
pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, domain)| domain)
}

/// Checks a mailbox name and gives its canonical spelling: INBOX (any case) becomes "INBOX",
/// and so does the first component of its children; one trailing separator is dropped.
pub fn normalize_mailbox_name(name: &str) -> Result<String, ApplyError> {
    let name = name.strip_suffix(SEPARATOR).unwrap_or(name);
    if name.is_empty() {
        return Err(invalid("mailbox name must not be empty"));
    }
    if name.len() > MAX_MAILBOX_NAME_LEN {
        return Err(invalid(format!(
            "mailbox name is longer than {MAX_MAILBOX_NAME_LEN} bytes"
        )));
    }
    if name.chars().any(|c| c.is_control() || c == '*' || c == '%') {
        return Err(invalid(
            "mailbox name must not contain control characters, '*' or '%'",
        ));
    }
    let mut parts: Vec<&str> = name.split(SEPARATOR).collect();
    if parts.iter().any(|part| part.is_empty()) {
        return Err(invalid("mailbox name must not have empty levels"));
    }
    if parts.len() > MAX_MAILBOX_DEPTH {
        return Err(invalid(format!(
            "mailbox name is deeper than {MAX_MAILBOX_DEPTH} levels"
        )));
    }
    if parts[0].eq_ignore_ascii_case(INBOX) {
        parts[0] = INBOX;
    }
    Ok(parts.join("/"))
}

/// The names of every strict ancestor of a normalized name, shortest first.
pub fn ancestors(name: &str) -> Vec<String> {
    name.match_indices(SEPARATOR)
        .map(|(at, _)| name[..at].to_string())
        .collect()
}

/// Checks a keyword flag's spelling (the IMAP layer checks atom syntax; this keeps the state
/// free of empty, huge or whitespace-bearing keywords).
pub fn check_keyword(keyword: &str) -> Result<(), ApplyError> {
    if keyword.is_empty() || keyword.len() > MAX_KEYWORD_LEN {
        return Err(invalid(format!(
            "a keyword must have 1 to {MAX_KEYWORD_LEN} bytes"
        )));
    }
    // IMAP keywords are atoms: printable ASCII without atom-specials. ASCII also keeps the
    // case folding in apply independent of the Unicode tables of the compiler that built it.
    if keyword
        .bytes()
        .any(|b| !b.is_ascii_graphic() || b"(){%*\"\\]".contains(&b))
    {
        return Err(invalid(format!("invalid keyword {keyword:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_and_addresses_are_lowercased_and_checked() {
        assert_eq!(normalize_domain("Example.ORG.").unwrap(), "example.org");
        assert_eq!(normalize_domain("localhost").unwrap(), "localhost");
        for bad in ["", "a..b", "-a.org", "a-.org", "a_b.org", "é.org"] {
            assert!(normalize_domain(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            normalize_address("Alice.B+x@Example.org").unwrap(),
            "alice.b+x@example.org"
        );
        for bad in [
            "alice",
            "@example.org",
            ".a@x.org",
            "a..b@x.org",
            "a b@x.org",
            "a@",
        ] {
            assert!(normalize_address(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mailbox_names_are_canonical() {
        assert_eq!(normalize_mailbox_name("inbox").unwrap(), "INBOX");
        assert_eq!(normalize_mailbox_name("Inbox/Sub/").unwrap(), "INBOX/Sub");
        assert_eq!(normalize_mailbox_name("Work/2024").unwrap(), "Work/2024");
        for bad in ["", "/", "a//b", "/a", "a*", "a%b", "a\r\nb"] {
            assert!(normalize_mailbox_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ancestors("a/b/c"), vec!["a".to_string(), "a/b".to_string()]);
    }
}
