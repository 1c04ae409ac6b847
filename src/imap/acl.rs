//! ACL (RFC 4314, issue 13): SETACL, DELETEACL, GETACL, LISTRIGHTS and MYRIGHTS, the names of
//! other accounts' mailboxes (`Other Users/owner@domain/Box`, the NAMESPACE's other users
//! namespace) and the refusal every command on such a mailbox answers when a right is missing.
//!
//! imap-codec 1.0 does not parse the ACL commands: `parse_arguments` reads their astring
//! arguments from the raw command (literals included, as framed). A mailbox name is resolved by
//! [`Session::resolve_mailbox`] into its owner, its id and the user's rights on it; the owner
//! has every right on their own mailboxes. A mailbox on which the user lacks the right a
//! command needs is answered `NO [NOPERM]` when the user may see it (holds `l`), and exactly
//! like a mailbox that does not exist otherwise.

use super::response::{astring, tagged};
use super::session::{Session, State};
use crate::store::{
    AccountId, MailboxId, MailboxView, Rights, RightsChange, StoreError, RIGHT_LETTERS,
};

/// The prefix of the other users namespace (NAMESPACE's second part).
pub const OTHER_USERS: &str = "Other Users";
/// The namespace's hierarchy separator.
const SEPARATOR: char = '/';
/// Most arguments an ACL command takes (SETACL: mailbox, identifier, rights).
const MAX_ARGUMENTS: usize = 3;

/// A mailbox name as the user gave it, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub owner: AccountId,
    pub id: MailboxId,
    /// The user's rights on it (every right when the user owns it).
    pub rights: Rights,
}

/// Whether `name` is in the other users namespace (or is its root).
pub fn is_other_users(name: &str) -> bool {
    name.len() >= OTHER_USERS.len()
        && name.is_char_boundary(OTHER_USERS.len())
        && name[..OTHER_USERS.len()].eq_ignore_ascii_case(OTHER_USERS)
        && (name.len() == OTHER_USERS.len() || name[OTHER_USERS.len()..].starts_with(SEPARATOR))
}

/// `Other Users/owner@domain/Box` as (owner address, Box).
fn split_other_users(name: &str) -> Option<(&str, &str)> {
    if !is_other_users(name) {
        return None;
    }
    let rest = name.get(OTHER_USERS.len() + 1..)?;
    let (owner, mailbox) = rest.split_once(SEPARATOR)?;
    (!owner.is_empty() && !mailbox.is_empty()).then_some((owner, mailbox))
}

/// The name a shared mailbox has for other users.
pub fn shared_name(owner_address: &str, name: &str) -> String {
    format!("{OTHER_USERS}{SEPARATOR}{owner_address}{SEPARATOR}{name}")
}

/// The rights a STORE needs (RFC 4314 4: `s` for `\Seen`, `t` for `\Deleted`, `w` for
/// any other flag). A replacement may take any flag away, so it needs all three.
pub fn rights_for_flags(op: crate::store::FlagOp, flags: &crate::store::FlagSet) -> Rights {
    use crate::store::{Flag, FlagOp};
    if op == FlagOp::Replace {
        return Rights::SEEN
            .union(Rights::DELETE_MESSAGES)
            .union(Rights::WRITE);
    }
    let mut needed = Rights::NONE;
    for flag in flags {
        needed = needed.union(match flag {
            Flag::Seen => Rights::SEEN,
            Flag::Deleted => Rights::DELETE_MESSAGES,
            _ => Rights::WRITE,
        });
    }
    needed
}

/// Answers a refusal when `rights` lack `needed` and says whether it did: `NO [NOPERM]` when
/// the user may see the mailbox (`l`), else the answer a missing mailbox gets.
pub fn refuse(out: &mut Vec<u8>, tag: &str, rights: Rights, needed: Rights) -> bool {
    if rights.contains(needed) {
        return false;
    }
    if rights.contains(Rights::LOOKUP) {
        let text = format!("permission denied: the {needed} right is needed");
        tagged(out, tag, "NO", Some("NOPERM"), &text);
    } else {
        tagged(out, tag, "NO", Some("NONEXISTENT"), "no such mailbox");
    }
    true
}

/// Reads `n` astrings (atoms, quoted strings, literals) separated by single spaces, and
/// nothing after them.
fn parse_arguments(mut rest: &[u8], n: usize) -> Option<Vec<Vec<u8>>> {
    let mut arguments = Vec::with_capacity(n.min(MAX_ARGUMENTS));
    for i in 0..n {
        if i > 0 {
            rest = rest.strip_prefix(b" ")?;
        }
        let (argument, after) = parse_astring(rest)?;
        arguments.push(argument);
        rest = after;
    }
    rest.is_empty().then_some(arguments)
}

fn parse_astring(bytes: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    match bytes.first()? {
        b'"' => {
            let mut value = Vec::new();
            let mut i = 1;
            loop {
                match *bytes.get(i)? {
                    b'"' => return Some((value, &bytes[i + 1..])),
                    b'\\' => {
                        value.push(*bytes.get(i + 1)?);
                        i += 2;
                    }
                    b'\r' | b'\n' => return None,
                    byte => {
                        value.push(byte);
                        i += 1;
                    }
                }
            }
        }
        b'{' => {
            let close = bytes.iter().position(|&b| b == b'}')?;
            let digits = bytes[1..close]
                .strip_suffix(b"+")
                .unwrap_or(&bytes[1..close]);
            let len: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
            let body = bytes.get(close + 1..)?.strip_prefix(b"\r\n")?;
            Some((body.get(..len)?.to_vec(), &body[len..]))
        }
        _ => {
            let end = bytes
                .iter()
                .position(|&b| b == b' ' || b.is_ascii_control() || b"(){%*\"\\".contains(&b))
                .unwrap_or(bytes.len());
            (end > 0).then(|| (bytes[..end].to_vec(), &bytes[end..]))
        }
    }
}

/// The ACL verbs, for the session's dispatch.
pub fn is_acl_verb(verb: &[u8]) -> bool {
    [
        &b"SETACL"[..],
        b"DELETEACL",
        b"GETACL",
        b"LISTRIGHTS",
        b"MYRIGHTS",
    ]
    .iter()
    .any(|v| verb.eq_ignore_ascii_case(v))
}

impl Session {
    /// Resolves a mailbox name the user gave: one of their own, or another account's in the
    /// other users namespace (`None` when there is no such mailbox).
    pub(super) fn resolve_mailbox(&self, user: AccountId, name: &str) -> Option<Target> {
        match split_other_users(name) {
            None => {
                if is_other_users(name) {
                    return None;
                }
                let (id, rights) = self.store.access_mailbox(user, user, name)?;
                Some(Target {
                    owner: user,
                    id,
                    rights,
                })
            }
            Some((owner_address, mailbox)) => {
                let owner = self.store.account_of_address(owner_address)?;
                let (id, rights) = self.store.access_mailbox(user, owner, mailbox)?;
                Some(Target { owner, id, rights })
            }
        }
    }

    /// The user's rights on the selected mailbox now (a grant revoked since SELECT counts):
    /// every right on their own.
    pub(super) fn selected_rights(&self) -> Rights {
        match &self.state {
            State::Selected { account, mailbox } => {
                self.store.rights_on(*account, mailbox.owner, mailbox.id)
            }
            _ => Rights::NONE,
        }
    }

    /// Resolves `name` for `user` and checks `needed`: the owner, the mailbox and the
    /// user's rights, or `None` once the refusal is answered (`missing_code` for a mailbox
    /// that does not exist or that the user may not see).
    pub(super) fn accessible_mailbox(
        &self,
        tag: &str,
        user: AccountId,
        name: Option<&str>,
        needed: Rights,
        missing_code: &str,
        out: &mut Vec<u8>,
    ) -> Option<(AccountId, MailboxView, Rights)> {
        let target = name.and_then(|name| self.resolve_mailbox(user, name));
        let view = target
            .as_ref()
            .and_then(|t| self.store.mailbox_view(t.owner, t.id));
        let (Some(target), Some(view)) = (target, view) else {
            tagged(out, tag, "NO", Some(missing_code), "no such mailbox");
            return None;
        };
        if !target.rights.contains(needed) {
            if target.rights.contains(Rights::LOOKUP) {
                refuse(out, tag, target.rights, needed);
            } else {
                tagged(out, tag, "NO", Some(missing_code), "no such mailbox");
            }
            return None;
        }
        Some((target.owner, view, target.rights))
    }

    /// LIST's lines for the shared mailboxes `user` holds `l` on that `pattern` matches, with
    /// their parents (`Other Users`, `Other Users/owner@domain`, ...) as `\Noselect`.
    pub(super) fn list_shared(&self, user: AccountId, pattern: &[u8], out: &mut Vec<u8>) {
        let shared: Vec<String> = self
            .store
            .shared_with(user)
            .iter()
            .map(|m| shared_name(&m.owner_address, &m.name))
            .collect();
        let mut names: Vec<(String, bool)> = Vec::new();
        for name in &shared {
            names.push((name.clone(), true));
            let mut end = 0;
            while let Some(offset) = name[end..].find(SEPARATOR) {
                let parent = &name[..end + offset];
                names.push((parent.to_owned(), false));
                end += offset + 1;
            }
        }
        // A name both shared and a parent is listed once, selectable.
        names.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        names.dedup_by(|later, earlier| later.0 == earlier.0);
        for (name, selectable) in &names {
            if !super::mailboxes::matches_pattern(pattern, name.as_bytes()) {
                continue;
            }
            let prefix = format!("{name}{SEPARATOR}");
            let children = shared.iter().any(|n| n.starts_with(&prefix));
            let mut attributes: Vec<&str> = Vec::new();
            if !selectable {
                attributes.push("\\Noselect");
            }
            attributes.push(if children {
                "\\HasChildren"
            } else {
                "\\HasNoChildren"
            });
            out.extend_from_slice(format!("* LIST ({}) \"/\" ", attributes.join(" ")).as_bytes());
            astring(out, name.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The name the user knows `owner`'s mailbox `name` by.
    pub(super) fn name_for_user(&self, user: AccountId, owner: AccountId, name: &str) -> String {
        if user == owner {
            return name.to_owned();
        }
        let owner_address = self.store.account_address(owner).unwrap_or_default();
        shared_name(&owner_address, name)
    }

    /// One of the ACL commands (`rest`: the bytes after the verb and its space, without the
    /// final CRLF).
    pub(super) async fn acl_command(
        &mut self,
        tag: &str,
        verb: &[u8],
        rest: &[u8],
        out: &mut Vec<u8>,
    ) {
        let Some(user) = self.account() else {
            tagged(out, tag, "BAD", None, "log in first");
            return;
        };
        let verb = String::from_utf8_lossy(verb).to_ascii_uppercase();
        let n = match verb.as_str() {
            "SETACL" => 3,
            "DELETEACL" | "LISTRIGHTS" => 2,
            _ => 1,
        };
        let Some(arguments) = parse_arguments(rest, n) else {
            tagged(
                out,
                tag,
                "BAD",
                None,
                &format!("{verb} arguments are invalid"),
            );
            return;
        };
        let Ok(name) = String::from_utf8(arguments[0].clone()) else {
            tagged(out, tag, "BAD", None, "invalid mailbox name");
            return;
        };
        let name = if name.eq_ignore_ascii_case("INBOX") {
            "INBOX".to_owned()
        } else {
            name.trim_end_matches('/').to_owned()
        };
        let Some(target) = self.resolve_mailbox(user, &name) else {
            tagged(out, tag, "NO", Some("NONEXISTENT"), "no such mailbox");
            return;
        };
        let identifier = arguments
            .get(1)
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned());
        match verb.as_str() {
            "MYRIGHTS" => {
                // RFC 4314 3.5: any right lets the user read its own rights.
                if target.rights.is_empty() {
                    tagged(out, tag, "NO", Some("NONEXISTENT"), "no such mailbox");
                    return;
                }
                let mut line = b"* MYRIGHTS ".to_vec();
                astring(&mut line, name.as_bytes());
                line.extend_from_slice(format!(" {}\r\n", target.rights).as_bytes());
                out.extend_from_slice(&line);
                tagged(out, tag, "OK", None, "MYRIGHTS completed");
            }
            "GETACL" => {
                if refuse(out, tag, target.rights, Rights::ADMIN) {
                    return;
                }
                let mut line = b"* ACL ".to_vec();
                astring(&mut line, name.as_bytes());
                for (identifier, rights) in self.store.acl_entries(target.owner, target.id) {
                    line.push(b' ');
                    astring(&mut line, identifier.as_bytes());
                    line.extend_from_slice(format!(" {rights}").as_bytes());
                }
                line.extend_from_slice(b"\r\n");
                out.extend_from_slice(&line);
                tagged(out, tag, "OK", None, "GETACL completed");
            }
            "LISTRIGHTS" => {
                if refuse(out, tag, target.rights, Rights::ADMIN) {
                    return;
                }
                let identifier = identifier.unwrap_or_default();
                let owner_address = self.store.account_address(target.owner);
                let mut line = b"* LISTRIGHTS ".to_vec();
                astring(&mut line, name.as_bytes());
                line.push(b' ');
                astring(&mut line, identifier.as_bytes());
                if owner_address.is_some_and(|a| a.eq_ignore_ascii_case(&identifier)) {
                    // The owner always has every right: all are required, none optional.
                    line.extend_from_slice(format!(" {}", Rights::ALL).as_bytes());
                } else {
                    line.extend_from_slice(b" \"\"");
                    for letter in RIGHT_LETTERS {
                        line.extend_from_slice(format!(" {letter}").as_bytes());
                    }
                }
                line.extend_from_slice(b"\r\n");
                out.extend_from_slice(&line);
                tagged(out, tag, "OK", None, "LISTRIGHTS completed");
            }
            "SETACL" | "DELETEACL" => {
                if refuse(out, tag, target.rights, Rights::ADMIN) {
                    return;
                }
                let identifier = identifier.unwrap_or_default();
                let grantee = match self.store.grantee_for(target.owner, &identifier) {
                    Ok(grantee) => grantee,
                    Err(error) => return acl_refused(out, tag, &error),
                };
                let result = if verb == "SETACL" {
                    let text = String::from_utf8_lossy(&arguments[2]).into_owned();
                    let (change, letters) = match text.strip_prefix('+') {
                        Some(letters) => (RightsChange::Add, letters),
                        None => match text.strip_prefix('-') {
                            Some(letters) => (RightsChange::Remove, letters),
                            None => (RightsChange::Replace, text.as_str()),
                        },
                    };
                    let rights = match Rights::parse(letters) {
                        Ok(rights) => rights,
                        Err(letter) => {
                            // RFC 4314 3.1: an unknown right is refused with BAD.
                            let text = format!("unknown right {letter:?}");
                            tagged(out, tag, "BAD", None, &text);
                            return;
                        }
                    };
                    self.store
                        .set_acl(user, target.owner, target.id, grantee, change, rights)
                        .await
                } else {
                    self.store
                        .delete_acl(user, target.owner, target.id, grantee)
                        .await
                };
                match result {
                    Ok(()) => tagged(out, tag, "OK", None, &format!("{verb} completed")),
                    Err(error) => acl_refused(out, tag, &error),
                }
            }
            _ => tagged(out, tag, "BAD", None, "unknown ACL command"),
        }
    }
}

/// A refused ACL change: the store's answer with its response code.
fn acl_refused(out: &mut Vec<u8>, tag: &str, error: &StoreError) {
    super::mailboxes::no(out, tag, error);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_atoms_quoted_strings_and_literals() {
        let parsed = parse_arguments(b"INBOX \"b@example.org\" {3}\r\nlrs", 3).unwrap();
        assert_eq!(
            parsed,
            vec![
                b"INBOX".to_vec(),
                b"b@example.org".to_vec(),
                b"lrs".to_vec()
            ]
        );
        let parsed = parse_arguments(b"\"Other Users/a@x.org/A \\\"q\\\"\"", 1).unwrap();
        assert_eq!(parsed, vec![b"Other Users/a@x.org/A \"q\"".to_vec()]);
        // Too few, too many, or unterminated arguments are refused.
        assert_eq!(parse_arguments(b"INBOX", 2), None);
        assert_eq!(parse_arguments(b"INBOX extra", 1), None);
        assert_eq!(parse_arguments(b"\"INBOX", 1), None);
        assert_eq!(parse_arguments(b"{9}\r\nab", 1), None);
        assert_eq!(parse_arguments(b"", 1), None);
    }

    #[test]
    fn other_users_names_split_into_owner_and_mailbox() {
        assert_eq!(
            split_other_users("Other Users/a@x.org/Projects/2026"),
            Some(("a@x.org", "Projects/2026"))
        );
        assert_eq!(
            split_other_users("other users/a@x.org/INBOX"),
            Some(("a@x.org", "INBOX"))
        );
        assert_eq!(split_other_users("Other Users/a@x.org"), None);
        assert_eq!(split_other_users("Other Users"), None);
        assert!(is_other_users("Other Users"));
        assert!(!is_other_users("Other Usersx/a"));
        assert_eq!(split_other_users("INBOX"), None);
    }
}
