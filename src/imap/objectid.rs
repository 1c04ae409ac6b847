//! OBJECTID (RFC 8474): `MAILBOXID` (SELECT/EXAMINE response code, CREATE response code, STATUS
//! and LIST-STATUS item), `EMAILID` and `THREADID` (FETCH items).
//!
//! Every id is a pure function of replicated state, so every replica gives the same one:
//! - MAILBOXID from the mailbox's id and UIDVALIDITY (unchanged by RENAME, new when a name
//!   is deleted and created again);
//! - EMAILID from the body's content hash (the blob id): a COPY or MOVE keeps it, the same
//!   bytes appended twice share it (RFC 8474 5.1 allows that);
//! - THREADID from the first Message-ID of References (else In-Reply-To, else the message's
//!   own Message-ID, else its EMAILID): replies that keep the thread's root in References,
//!   as RFC 5322 3.6.4 asks, share it.
//!
//! imap-codec 1.0 knows none of these items: [`strip_fetch`] and [`strip_status`] take them
//! out before it decodes the rest, and the session writes them itself.

use crate::store::{BlobId, MailboxId};

/// What a FETCH asked beyond what imap-codec parses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchIds {
    pub email_id: bool,
    pub thread_id: bool,
}

/// A STATUS asked for MAILBOXID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusMailboxId {
    /// MAILBOXID was the only item: the MESSAGES put in its place is not reported.
    pub only: bool,
}

fn hex12(bytes: &[u8]) -> String {
    bytes.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// The MAILBOXID of a mailbox.
pub fn mailbox_id(id: MailboxId, uidvalidity: u32) -> String {
    let mut input = b"kermail mailboxid ".to_vec();
    input.extend_from_slice(&id.to_be_bytes());
    input.extend_from_slice(&uidvalidity.to_be_bytes());
    format!("M{}", hex12(blake3::hash(&input).as_bytes()))
}

/// The EMAILID of a message.
pub fn email_id(blob: &BlobId) -> String {
    format!("E{}", hex12(&blob.0))
}

/// The THREADID of a message with this header block.
pub fn thread_id(header: Option<&[u8]>, blob: &BlobId) -> String {
    let message = super::thread::thread_message(0, header, 0);
    let root = message
        .references
        .first()
        .cloned()
        .or(message.message_id)
        .map_or_else(|| email_id(blob), |id| id.to_string());
    let mut input = b"kermail threadid ".to_vec();
    input.extend_from_slice(root.as_bytes());
    format!("T{}", hex12(blake3::hash(&input).as_bytes()))
}

fn is_id_item(word: &[u8]) -> Option<bool> {
    if word.eq_ignore_ascii_case(b"EMAILID") {
        Some(true)
    } else if word.eq_ignore_ascii_case(b"THREADID") {
        Some(false)
    } else {
        None
    }
}

/// For `tag [UID] FETCH set items ...` naming EMAILID or THREADID: the command without them
/// (a list left empty becomes `(UID)`). `None` otherwise.
pub fn strip_fetch(bytes: &[u8]) -> Option<(Vec<u8>, FetchIds)> {
    let fetch = super::fetch_items::split_fetch(bytes)?;
    let mut ids = FetchIds::default();
    let mut kept: Vec<&[u8]> = Vec::with_capacity(fetch.items.len());
    for &item in &fetch.items {
        match is_id_item(item) {
            Some(true) => ids.email_id = true,
            Some(false) => ids.thread_id = true,
            None => kept.push(item),
        }
    }
    if ids == FetchIds::default() {
        return None;
    }
    if kept.is_empty() {
        kept.push(b"UID");
    }
    Some((fetch.join(&kept), ids))
}

/// For `tag STATUS name (items)` naming MAILBOXID: the command without it. `None` otherwise.
pub fn strip_status(bytes: &[u8]) -> Option<(Vec<u8>, StatusMailboxId)> {
    super::status_size::strip_status_item(bytes, b"MAILBOXID")
        .map(|(rewritten, only)| (rewritten, StatusMailboxId { only }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetch(text: &str) -> Option<(String, FetchIds)> {
        strip_fetch(text.as_bytes()).map(|(b, i)| (String::from_utf8(b).unwrap(), i))
    }

    #[test]
    fn id_items_are_taken_out_of_fetch_and_status() {
        let both = FetchIds {
            email_id: true,
            thread_id: true,
        };
        assert_eq!(
            fetch("a UID FETCH 1:* (FLAGS EMAILID BODY.PEEK[HEADER.FIELDS (SUBJECT EMAILID)] threadid)\r\n"),
            Some((
                "a UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT EMAILID)])\r\n".into(),
                both
            ))
        );
        assert_eq!(
            fetch("b FETCH 2 (EMAILID THREADID) (CHANGEDSINCE 4)\r\n"),
            Some(("b FETCH 2 (UID) (CHANGEDSINCE 4)\r\n".into(), both))
        );
        assert_eq!(
            fetch("c FETCH 3 EMAILID\r\n").map(|f| f.0),
            Some("c FETCH 3 UID\r\n".into())
        );
        assert_eq!(fetch("d FETCH 1 (FLAGS)\r\n"), None);
        assert_eq!(fetch("e SEARCH EMAILID\r\n"), None);
        let (command, only) = strip_status(b"f STATUS INBOX (MAILBOXID)\r\n").unwrap();
        assert_eq!(command, b"f STATUS INBOX (MESSAGES)\r\n");
        assert!(only.only);
        let (command, only) = strip_status(b"g STATUS x (UNSEEN mailboxid)\r\n").unwrap();
        assert_eq!(command, b"g STATUS x (UNSEEN)\r\n");
        assert!(!only.only);
        let command = "h FETCH 1:* (EMAILID BODY[1.MIME])\r\n";
        for end in 0..=command.len() {
            let _ = fetch(&command[..end]);
        }
    }

    #[test]
    fn ids_are_stable_and_threads_follow_references() {
        let blob = BlobId([7; 32]);
        assert_eq!(email_id(&blob), "E070707070707070707070707");
        assert_eq!(mailbox_id(3, 99), mailbox_id(3, 99));
        assert_ne!(mailbox_id(3, 99), mailbox_id(3, 100));
        let root = thread_id(Some(b"Message-ID: <root@x>\r\n\r\n"), &blob);
        let reply = thread_id(
            Some(b"Message-ID: <r2@x>\r\nReferences: <root@x> <r1@x>\r\n\r\n"),
            &BlobId([8; 32]),
        );
        assert_eq!(root, reply);
        assert_ne!(root, thread_id(None, &blob));
    }
}
