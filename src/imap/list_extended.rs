//! LIST-EXTENDED (RFC 5258) and LIST-STATUS (RFC 5819):
//! `LIST (selection options) reference (patterns) RETURN (return options)`.
//!
//! imap-codec 1.0 parses the RFC 3501 LIST only, so [`parse`] reads an extended LIST itself
//! (a LIST with selection options, a pattern list or RETURN; a plain one is left to
//! imap-codec) and the session answers it with [`Session::list_extended`]. Selection options:
//! SUBSCRIBED, REMOTE (nothing is remote), RECURSIVEMATCH, SPECIAL-USE (RFC 6154). Return
//! options: CHILDREN and SPECIAL-USE (their attributes are always given), SUBSCRIBED, and
//! STATUS (items), which adds a `* STATUS` line after each selectable mailbox listed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use imap_codec::imap_types::status::StatusDataItemName;

use super::mailboxes::matches_pattern;
use super::response::{astring, tagged};
use super::session::Session;
use super::status_size::StatusSize;
use crate::store::{MailboxInfo, SpecialUse};

/// Most patterns in one LIST.
const MAX_PATTERNS: usize = 64;

/// An extended LIST.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListRequest {
    pub subscribed: bool,
    pub recursive: bool,
    pub special_use: bool,
    pub return_subscribed: bool,
    /// `RETURN (STATUS (...))`: the items (SIZE apart).
    pub status: Option<Vec<StatusDataItemName>>,
    pub status_size: bool,
    /// `STATUS (MAILBOXID)` (OBJECTID).
    pub status_mailboxid: bool,
    pub reference: Vec<u8>,
    pub patterns: Vec<Vec<u8>>,
}

/// A word of the command: a string (atom, quoted or literal) or a parenthesized list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(Vec<u8>),
    List(Vec<Token>),
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn skip_space(&mut self) {
        while self.bytes.get(self.at) == Some(&b' ') {
            self.at += 1;
        }
    }

    fn at_end(&self) -> bool {
        matches!(
            self.bytes.get(self.at..),
            Some(b"\r\n") | Some(b"\n") | Some(b"")
        )
    }

    /// One token, lists nested at most `depth` deep.
    fn token(&mut self, depth: u8) -> Result<Token, &'static str> {
        self.skip_space();
        match self.bytes.get(self.at) {
            None => Err("unexpected end of LIST"),
            Some(b'(') => {
                if depth == 0 {
                    return Err("LIST options nested too deep");
                }
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_space();
                    match self.bytes.get(self.at) {
                        Some(b')') => {
                            self.at += 1;
                            return Ok(Token::List(items));
                        }
                        None | Some(b'\r') | Some(b'\n') => return Err("LIST list not closed"),
                        _ => items.push(self.token(depth - 1)?),
                    }
                }
            }
            Some(b'"') => {
                let mut word = Vec::new();
                let mut i = self.at + 1;
                loop {
                    match self.bytes.get(i) {
                        Some(b'\\') => {
                            word.push(*self.bytes.get(i + 1).ok_or("bad quoted string")?);
                            i += 2;
                        }
                        Some(b'"') => break,
                        Some(b'\r') | Some(b'\n') | None => return Err("bad quoted string"),
                        Some(&b) => {
                            word.push(b);
                            i += 1;
                        }
                    }
                }
                self.at = i + 1;
                Ok(Token::Word(word))
            }
            Some(b'{') => {
                let close = self.bytes[self.at..]
                    .iter()
                    .take(16)
                    .position(|&b| b == b'}')
                    .ok_or("bad literal")?
                    + self.at;
                let digits = &self.bytes[self.at + 1..close];
                let digits = digits.strip_suffix(b"+").unwrap_or(digits);
                let length: usize = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse().ok())
                    .ok_or("bad literal")?;
                let start = close + 3;
                let word = self
                    .bytes
                    .get(start..start.checked_add(length).ok_or("bad literal")?)
                    .ok_or("bad literal")?;
                self.at = start + length;
                Ok(Token::Word(word.to_vec()))
            }
            Some(_) => {
                let start = self.at;
                while let Some(&b) = self.bytes.get(self.at) {
                    if matches!(b, b' ' | b'(' | b')' | b'\r' | b'\n') {
                        break;
                    }
                    self.at += 1;
                }
                Ok(Token::Word(self.bytes[start..self.at].to_vec()))
            }
        }
    }
}

fn words(items: &[Token]) -> Result<Vec<String>, &'static str> {
    items
        .iter()
        .map(|t| match t {
            Token::Word(w) => Ok(String::from_utf8_lossy(w).to_ascii_uppercase()),
            Token::List(_) => Err("unexpected list in LIST options"),
        })
        .collect()
}

/// For an extended `tag LIST ...`: the request. `Ok(None)` for any other command, and for a
/// plain RFC 3501 LIST; `Err` for an extended LIST that is malformed or asks for options this
/// server does not know.
pub fn parse(bytes: &[u8]) -> Result<Option<ListRequest>, &'static str> {
    let mut reader = Reader { bytes, at: 0 };
    let Ok(Token::Word(_tag)) = reader.token(0) else {
        return Ok(None);
    };
    match reader.token(0) {
        Ok(Token::Word(verb)) if verb.eq_ignore_ascii_case(b"LIST") => {}
        _ => return Ok(None),
    }
    let mut request = ListRequest::default();
    let mut extended = false;
    let mut next = reader.token(2)?;
    if let Token::List(options) = &next {
        extended = true;
        for option in words(options)? {
            match option.as_str() {
                "SUBSCRIBED" => request.subscribed = true,
                "REMOTE" => {}
                "RECURSIVEMATCH" => request.recursive = true,
                "SPECIAL-USE" => request.special_use = true,
                _ => return Err("unknown LIST selection option"),
            }
        }
        if request.recursive && !request.subscribed && !request.special_use {
            return Err("RECURSIVEMATCH needs another selection option");
        }
        next = reader.token(1)?;
    }
    let Token::Word(reference) = next else {
        return Err("LIST reference expected");
    };
    request.reference = reference;
    match reader.token(1)? {
        Token::Word(pattern) => request.patterns.push(pattern),
        Token::List(patterns) => {
            extended = true;
            for pattern in patterns {
                match pattern {
                    Token::Word(pattern) => request.patterns.push(pattern),
                    Token::List(_) => return Err("LIST pattern expected"),
                }
            }
            if request.patterns.is_empty() || request.patterns.len() > MAX_PATTERNS {
                return Err("LIST takes 1 to 64 patterns");
            }
        }
    }
    reader.skip_space();
    if !reader.at_end() {
        match reader.token(0)? {
            Token::Word(word) if word.eq_ignore_ascii_case(b"RETURN") => {}
            _ => return Err("RETURN expected"),
        }
        extended = true;
        let Token::List(options) = reader.token(3)? else {
            return Err("RETURN needs a parenthesized list");
        };
        let mut i = 0;
        while i < options.len() {
            let Token::Word(option) = &options[i] else {
                return Err("unknown LIST return option");
            };
            match option.to_ascii_uppercase().as_slice() {
                b"CHILDREN" | b"SPECIAL-USE" => {}
                b"SUBSCRIBED" => request.return_subscribed = true,
                b"STATUS" => {
                    i += 1;
                    let Some(Token::List(items)) = options.get(i) else {
                        return Err("STATUS needs a list of items");
                    };
                    let mut names = Vec::new();
                    for item in words(items)? {
                        names.push(match item.as_str() {
                            "MESSAGES" => StatusDataItemName::Messages,
                            "RECENT" => StatusDataItemName::Recent,
                            "UIDNEXT" => StatusDataItemName::UidNext,
                            "UIDVALIDITY" => StatusDataItemName::UidValidity,
                            "UNSEEN" => StatusDataItemName::Unseen,
                            "DELETED" => StatusDataItemName::Deleted,
                            "HIGHESTMODSEQ" => StatusDataItemName::HighestModSeq,
                            "SIZE" => {
                                request.status_size = true;
                                continue;
                            }
                            "MAILBOXID" => {
                                request.status_mailboxid = true;
                                continue;
                            }
                            _ => return Err("unknown STATUS item"),
                        });
                    }
                    request.status = Some(names);
                }
                _ => return Err("unknown LIST return option"),
            }
            i += 1;
        }
        reader.skip_space();
        if !reader.at_end() {
            return Err("unexpected text after RETURN");
        }
    }
    Ok(extended.then_some(request))
}

/// One name a LIST may show.
#[derive(Default)]
struct Entry<'a> {
    info: Option<&'a MailboxInfo>,
    subscribed: bool,
    /// Some existing mailbox lies below it.
    has_children: bool,
}

/// Adds the hierarchy parents of `name`; `exists`: `name` is a mailbox.
fn add_parents(name: &str, entries: &mut BTreeMap<String, Entry<'_>>, exists: bool) {
    let mut end = 0;
    while let Some(offset) = name[end..].find('/') {
        let parent = &name[..end + offset];
        let entry = entries.entry(parent.to_owned()).or_default();
        entry.has_children |= exists;
        end += offset + 1;
    }
}

impl Session {
    /// Answers an extended LIST.
    pub(super) fn list_extended(&mut self, tag: &str, request: ListRequest, out: &mut Vec<u8>) {
        let Some(account) = self.account() else {
            tagged(out, tag, "BAD", None, "log in first");
            return;
        };
        if request.patterns.iter().all(|p| p.is_empty()) && !request.subscribed {
            let _ = write!(out, "* LIST (\\Noselect) \"/\" \"\"\r\n");
            tagged(out, tag, "OK", None, "LIST completed");
            return;
        }
        let patterns: Vec<Vec<u8>> = request
            .patterns
            .iter()
            .filter(|p| !p.is_empty())
            .map(|wildcard| {
                let mut pattern = request.reference.clone();
                pattern.extend_from_slice(wildcard);
                if pattern.len() >= 5
                    && pattern[..5].eq_ignore_ascii_case(b"INBOX")
                    && (pattern.len() == 5 || pattern[5] == b'/')
                {
                    pattern[..5].copy_from_slice(b"INBOX");
                }
                pattern
            })
            .collect();
        let mailboxes = self.store.list_mailboxes(account);
        let subscriptions: BTreeSet<String> =
            self.store.subscriptions(account).into_iter().collect();
        let mut entries: BTreeMap<String, Entry<'_>> = BTreeMap::new();
        for info in &mailboxes {
            entries.entry(info.name.clone()).or_default().info = Some(info);
            add_parents(&info.name, &mut entries, true);
        }
        for name in &subscriptions {
            entries.entry(name.clone()).or_default().subscribed = true;
            add_parents(name, &mut entries, false);
        }
        let selected = |entry: &Entry<'_>| -> bool {
            if !request.subscribed && !request.special_use {
                return entry.info.is_some() || entry.has_children;
            }
            (!request.subscribed || entry.subscribed)
                && (!request.special_use || entry.info.is_some_and(|i| i.special_use.is_some()))
        };
        let childinfo = match (request.subscribed, request.special_use) {
            (true, true) => "(\"CHILDINFO\" (\"SUBSCRIBED\" \"SPECIAL-USE\"))",
            (true, false) => "(\"CHILDINFO\" (\"SUBSCRIBED\"))",
            _ => "(\"CHILDINFO\" (\"SPECIAL-USE\"))",
        };
        let names: Vec<&String> = entries.keys().collect();
        for (index, name) in names.iter().enumerate() {
            let entry = &entries[*name];
            if !patterns.iter().any(|p| matches_pattern(p, name.as_bytes())) {
                continue;
            }
            let is_selected = selected(entry);
            let child_selected = request.recursive && {
                let prefix = format!("{name}/");
                names[index + 1..]
                    .iter()
                    .take_while(|n| n.starts_with(&prefix))
                    .any(|n| selected(&entries[*n]))
            };
            if !is_selected && !child_selected {
                continue;
            }
            let mut attributes: Vec<&str> = Vec::new();
            match entry.info {
                None if entry.has_children => attributes.push("\\Noselect"),
                None => attributes.push("\\NonExistent"),
                Some(_) => {}
            }
            if entry.info.is_some() || entry.has_children {
                attributes.push(if entry.has_children {
                    "\\HasChildren"
                } else {
                    "\\HasNoChildren"
                });
            }
            if entry.subscribed && (request.subscribed || request.return_subscribed) {
                attributes.push("\\Subscribed");
            }
            if let Some(special) = entry.info.and_then(|i| i.special_use) {
                attributes.push(match special {
                    SpecialUse::Sent => "\\Sent",
                    SpecialUse::Drafts => "\\Drafts",
                    SpecialUse::Trash => "\\Trash",
                    SpecialUse::Junk => "\\Junk",
                    SpecialUse::Archive => "\\Archive",
                });
            }
            let _ = write!(out, "* LIST ({}) \"/\" ", attributes.join(" "));
            astring(out, name.as_bytes());
            if child_selected {
                out.push(b' ');
                out.extend_from_slice(childinfo.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            if let (Some(items), Some(info)) = (&request.status, entry.info) {
                // RFC 5819: the STATUS of each selectable mailbox, right after its LIST.
                if let Some(view) = self.store.mailbox_view(account, info.id) {
                    let size = request.status_size.then_some(StatusSize {
                        only: items.is_empty(),
                    });
                    let mut values = self.status_values(account, &view, items, size);
                    if request.status_mailboxid {
                        values.push(format!(
                            "MAILBOXID ({})",
                            super::objectid::mailbox_id(view.id, view.uidvalidity)
                        ));
                    }
                    out.extend_from_slice(b"* STATUS ");
                    astring(out, view.name.as_bytes());
                    let _ = write!(out, " ({})\r\n", values.join(" "));
                }
            }
        }
        if request
            .status
            .as_ref()
            .is_some_and(|items| items.contains(&StatusDataItemName::HighestModSeq))
        {
            self.enable_condstore(false);
        }
        tagged(out, tag, "OK", None, "LIST completed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_lists_are_parsed_and_plain_ones_left_alone() {
        assert_eq!(parse(b"A LIST \"\" %\r\n"), Ok(None));
        assert_eq!(parse(b"A FETCH 1 (FLAGS)\r\n"), Ok(None));
        let request = parse(b"A LIST (SUBSCRIBED RECURSIVEMATCH) \"\" (% \"a/*\") RETURN (CHILDREN STATUS (MESSAGES SIZE unseen))\r\n")
            .unwrap()
            .unwrap();
        assert!(request.subscribed && request.recursive && !request.special_use);
        assert_eq!(request.patterns, vec![b"%".to_vec(), b"a/*".to_vec()]);
        assert_eq!(
            request.status,
            Some(vec![
                StatusDataItemName::Messages,
                StatusDataItemName::Unseen
            ])
        );
        assert!(request.status_size);
        let request = parse(b"A list \"\" {1}\r\n* return (subscribed)\r\n")
            .unwrap()
            .unwrap();
        assert!(request.return_subscribed && request.patterns == vec![b"*".to_vec()]);
        assert!(parse(b"A LIST (RECURSIVEMATCH) \"\" %\r\n").is_err());
        assert!(parse(b"A LIST (BOGUS) \"\" %\r\n").is_err());
        assert!(parse(b"A LIST \"\" % RETURN (STATUS (NOPE))\r\n").is_err());
        let command = b"A LIST (SUBSCRIBED) \"\" (% *) RETURN (STATUS (MESSAGES))\r\n";
        for end in 0..=command.len() {
            let _ = parse(&command[..end]);
        }
    }
}
