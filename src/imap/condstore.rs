//! CONDSTORE and QRESYNC (RFC 7162): the command parts imap-codec 1.0 does not parse, and the
//! responses that carry modseqs.
//!
//! imap-codec 1.0 parses `ENABLE CONDSTORE` and `STATUS (HIGHESTMODSEQ)` only (feature
//! `ext_condstore_qresync`), so, as for ESEARCH, the other parts are taken out of the
//! command's bytes before it decodes the rest ([`strip`]):
//! - `SELECT`/`EXAMINE name (CONDSTORE)` and `(QRESYNC (uidvalidity modseq [known-uids
//!   [(seq-set uid-set)]]))`: the parameter list goes;
//! - `[UID] FETCH set items (CHANGEDSINCE n [VANISHED])`: the modifier list goes, and a
//!   `MODSEQ` item inside `items` too (the session adds it back to every FETCH response);
//! - `[UID] STORE set (UNCHANGEDSINCE n) ...`: the modifier list goes;
//! - `SEARCH ... MODSEQ [entry-name entry-type] n`: the key becomes `HEADER "kermail modseq"
//!   "n"` ([`MODSEQ_HEADER`]: a field name with a space, which no real header has), which
//!   [`super::search`] evaluates as "modseq at least n";
//! - `SEARCH ... OLDER n` / `YOUNGER n` (WITHIN, RFC 5032; not CONDSTORE, but the same search
//!   key scanner): the key becomes `HEADER "kermail older" "n"` ([`OLDER_HEADER`],
//!   [`YOUNGER_HEADER`]), which [`super::search`] evaluates against INTERNALDATE and the time
//!   the search started.
//!
//! Every modseq of a mailbox is in the store (`store::imap_state`), so `NOMODSEQ` is never
//! sent.

use std::io::Write;

use imap_codec::imap_types::sequence::SequenceSet;

use super::recent::RecentUids;
use super::scan::{line_end, walk_search_keys, Cursor};
use super::selected::Selected;
use crate::store::{AccountId, FlagSet, MailStore, MailboxId, Uid};

/// The header name a rewritten `MODSEQ n` search key uses (not a valid field name).
pub const MODSEQ_HEADER: &str = "kermail modseq";
/// The header name a rewritten `OLDER n` search key (RFC 5032) uses.
pub const OLDER_HEADER: &str = "kermail older";
/// The header name a rewritten `YOUNGER n` search key (RFC 5032) uses.
pub const YOUNGER_HEADER: &str = "kermail younger";

/// `(QRESYNC (...))` parameters of SELECT/EXAMINE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qresync {
    pub uidvalidity: u32,
    pub modseq: u64,
    pub known_uids: Option<SequenceSet>,
}

/// What [`strip`] took out of a command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Modifiers {
    /// SELECT/EXAMINE `(CONDSTORE)` (also set by QRESYNC).
    pub select_condstore: bool,
    pub qresync: Option<Qresync>,
    /// FETCH `CHANGEDSINCE n`.
    pub changed_since: Option<u64>,
    /// FETCH `VANISHED` (with CHANGEDSINCE, UID FETCH only).
    pub vanished: bool,
    /// FETCH named the `MODSEQ` item.
    pub fetch_modseq: bool,
    /// STORE `UNCHANGEDSINCE n`.
    pub unchanged_since: Option<u64>,
    /// SEARCH used a `MODSEQ` key.
    pub search_modseq: bool,
}

impl Modifiers {
    /// Whether the command is a CONDSTORE enabling command (RFC 7162 3.1).
    pub fn enables_condstore(&self) -> bool {
        self.select_condstore
            || self.changed_since.is_some()
            || self.fetch_modseq
            || self.unchanged_since.is_some()
            || self.search_modseq
    }
}

fn number<T: std::str::FromStr>(word: &[u8]) -> Option<T> {
    std::str::from_utf8(word).ok()?.parse().ok()
}

/// The words of a flat parenthesized list's inside.
fn words(inside: &[u8]) -> Vec<&[u8]> {
    inside
        .split(|&b| b == b' ')
        .filter(|w| !w.is_empty())
        .collect()
}

/// Takes the CONDSTORE/QRESYNC parts out of `bytes`: `Ok(None)` when there are none (the
/// command is left as it is), `Err` for a malformed or unsupported one.
pub fn strip(bytes: &[u8]) -> Result<Option<(Vec<u8>, Modifiers)>, &'static str> {
    let mut cursor = Cursor { bytes, pos: 0 };
    let _tag = cursor.word();
    if !cursor.space() {
        return Ok(None);
    }
    let mut verb = cursor.word().to_ascii_uppercase();
    let mut uid = false;
    if verb == b"UID" {
        if !cursor.space() {
            return Ok(None);
        }
        uid = true;
        verb = cursor.word().to_ascii_uppercase();
    }
    match verb.as_slice() {
        b"SELECT" | b"EXAMINE" if !uid => strip_select(cursor),
        b"FETCH" => strip_fetch(cursor, uid),
        b"STORE" => strip_store(cursor),
        b"SEARCH" => strip_search(cursor),
        _ => Ok(None),
    }
}

fn strip_select(mut cursor: Cursor<'_>) -> Result<Option<(Vec<u8>, Modifiers)>, &'static str> {
    if !cursor.space() || !cursor.skip_argument() {
        return Ok(None);
    }
    let name_end = cursor.pos;
    if !cursor.space() || cursor.peek() != Some(b'(') {
        return Ok(None);
    }
    let params_start = cursor.pos;
    if !cursor.skip_list() {
        return Err("malformed SELECT parameters");
    }
    let params = &cursor.bytes[params_start + 1..cursor.pos - 1];
    let end = line_end(cursor.bytes);
    if cursor.pos != end {
        return Err("unexpected bytes after SELECT parameters");
    }
    let mut modifiers = Modifiers::default();
    let mut inner = Cursor {
        bytes: params,
        pos: 0,
    };
    loop {
        while inner.space() {}
        if inner.peek().is_none() {
            break;
        }
        let name = inner.word().to_ascii_uppercase();
        match name.as_slice() {
            b"CONDSTORE" => modifiers.select_condstore = true,
            b"QRESYNC" => {
                if !inner.space() || inner.peek() != Some(b'(') {
                    return Err("QRESYNC needs a parameter list");
                }
                let start = inner.pos;
                if !inner.skip_list() {
                    return Err("malformed QRESYNC parameters");
                }
                modifiers.qresync = Some(parse_qresync(&params[start + 1..inner.pos - 1])?);
                modifiers.select_condstore = true;
            }
            _ => return Err("unsupported SELECT parameter (CONDSTORE, QRESYNC)"),
        }
    }
    let mut rewritten = cursor.bytes[..name_end].to_vec();
    rewritten.extend_from_slice(&cursor.bytes[end..]);
    Ok(Some((rewritten, modifiers)))
}

fn parse_qresync(inside: &[u8]) -> Result<Qresync, &'static str> {
    // uidvalidity SP modseq [SP known-uids] [SP "(" seq-set SP uid-set ")"]; the
    // sequence-match data is a hint this server does not need.
    let list_start = inside.iter().position(|&b| b == b'(');
    let head = &inside[..list_start.unwrap_or(inside.len())];
    let parts = words(head);
    let bad = "QRESYNC needs (uidvalidity modseq [known-uids])";
    let (uidvalidity, modseq) = match (parts.first(), parts.get(1)) {
        (Some(v), Some(m)) => (
            number::<u32>(v).filter(|&v| v > 0).ok_or(bad)?,
            number::<u64>(m).ok_or(bad)?,
        ),
        _ => return Err(bad),
    };
    let known_uids = match parts.get(2) {
        None => None,
        Some(set) => Some(
            std::str::from_utf8(set)
                .ok()
                .and_then(|s| s.parse::<SequenceSet>().ok())
                .ok_or("invalid known-uids in QRESYNC")?,
        ),
    };
    if parts.len() > 3 {
        return Err(bad);
    }
    Ok(Qresync {
        uidvalidity,
        modseq,
        known_uids,
    })
}

fn strip_fetch(
    mut cursor: Cursor<'_>,
    uid: bool,
) -> Result<Option<(Vec<u8>, Modifiers)>, &'static str> {
    if !cursor.space() || !cursor.skip_argument() || !cursor.space() {
        return Ok(None);
    }
    let items_start = cursor.pos;
    if !cursor.skip_argument() {
        return Ok(None);
    }
    let items_end = cursor.pos;
    let mut modifiers = Modifiers::default();
    let end = line_end(cursor.bytes);
    let mut tail_start = end;
    if cursor.pos < end {
        if !cursor.space() || cursor.peek() != Some(b'(') {
            return Ok(None);
        }
        let start = cursor.pos;
        if !cursor.skip_list() || cursor.pos != end {
            return Err("malformed FETCH modifiers");
        }
        let list = words(&cursor.bytes[start + 1..cursor.pos - 1]);
        let mut i = 0;
        while i < list.len() {
            match list[i].to_ascii_uppercase().as_slice() {
                b"CHANGEDSINCE" => {
                    let n = list
                        .get(i + 1)
                        .and_then(|w| number::<u64>(w))
                        .ok_or("CHANGEDSINCE needs a modseq")?;
                    modifiers.changed_since = Some(n);
                    i += 2;
                }
                b"VANISHED" => {
                    modifiers.vanished = true;
                    i += 1;
                }
                _ => return Err("unsupported FETCH modifier (CHANGEDSINCE, VANISHED)"),
            }
        }
        if modifiers.vanished && (!uid || modifiers.changed_since.is_none()) {
            return Err("VANISHED needs UID FETCH with CHANGEDSINCE");
        }
        tail_start = items_end;
    }
    // The MODSEQ item.
    let items = &cursor.bytes[items_start..items_end];
    let mut new_items: Option<Vec<u8>> = None;
    if items.eq_ignore_ascii_case(b"MODSEQ") {
        modifiers.fetch_modseq = true;
        new_items = Some(b"UID".to_vec());
    } else if items.first() == Some(&b'(') {
        let mut inner = Cursor {
            bytes: items,
            pos: 1,
        };
        let mut kept: Vec<&[u8]> = Vec::new();
        loop {
            while inner.space() {}
            match inner.peek() {
                Some(b')') | None => break,
                _ => {}
            }
            let start = inner.pos;
            if !inner.skip_argument() {
                return Ok(None);
            }
            let item = &items[start..inner.pos];
            if item.eq_ignore_ascii_case(b"MODSEQ") {
                modifiers.fetch_modseq = true;
            } else {
                kept.push(item);
            }
        }
        if modifiers.fetch_modseq {
            let mut list = b"(".to_vec();
            if kept.is_empty() {
                list.extend_from_slice(b"UID");
            }
            list.extend_from_slice(&kept.join(&b' '));
            list.push(b')');
            new_items = Some(list);
        }
    }
    if modifiers == Modifiers::default() {
        return Ok(None);
    }
    let mut rewritten = cursor.bytes[..items_start].to_vec();
    match new_items {
        Some(items) => rewritten.extend_from_slice(&items),
        None => rewritten.extend_from_slice(items),
    }
    if tail_start == end {
        rewritten.extend_from_slice(&cursor.bytes[items_end..]);
    } else {
        rewritten.extend_from_slice(&cursor.bytes[end..]);
    }
    Ok(Some((rewritten, modifiers)))
}

fn strip_store(mut cursor: Cursor<'_>) -> Result<Option<(Vec<u8>, Modifiers)>, &'static str> {
    if !cursor.space() || !cursor.skip_argument() {
        return Ok(None);
    }
    let set_end = cursor.pos;
    if !cursor.space() || cursor.peek() != Some(b'(') {
        return Ok(None);
    }
    let start = cursor.pos;
    if !cursor.skip_list() {
        return Err("malformed STORE modifiers");
    }
    let list = words(&cursor.bytes[start + 1..cursor.pos - 1]);
    let mut modifiers = Modifiers::default();
    match list.as_slice() {
        [name, n] if name.eq_ignore_ascii_case(b"UNCHANGEDSINCE") => {
            modifiers.unchanged_since = Some(number(n).ok_or("UNCHANGEDSINCE needs a modseq")?);
        }
        _ => return Err("unsupported STORE modifier (UNCHANGEDSINCE)"),
    }
    let mut rewritten = cursor.bytes[..set_end].to_vec();
    rewritten.extend_from_slice(&cursor.bytes[cursor.pos..]);
    Ok(Some((rewritten, modifiers)))
}

fn strip_search(mut cursor: Cursor<'_>) -> Result<Option<(Vec<u8>, Modifiers)>, &'static str> {
    let bytes = cursor.bytes;
    let end = line_end(bytes);
    let mut rewritten: Vec<u8> = Vec::new();
    let mut copied = 0;
    let mut modifiers = Modifiers::default();
    let mut rewrote_within = false;
    let well_formed = walk_search_keys(&mut cursor, end, |upper, start, cursor| {
        if upper == b"OLDER" || upper == b"YOUNGER" {
            // WITHIN (RFC 5032): OLDER/YOUNGER interval-in-seconds (nz-number).
            if !cursor.space() {
                return Err("OLDER and YOUNGER need an interval in seconds");
            }
            let n: u32 = number(cursor.word())
                .filter(|&n: &u32| n > 0)
                .ok_or("OLDER and YOUNGER need an interval in seconds")?;
            let name = if upper == b"OLDER" {
                OLDER_HEADER
            } else {
                YOUNGER_HEADER
            };
            rewritten.extend_from_slice(&bytes[copied..start]);
            let _ = write!(rewritten, "HEADER \"{name}\" \"{n}\"");
            copied = cursor.pos;
            rewrote_within = true;
            return Ok(());
        }
        if upper != b"MODSEQ" {
            return Ok(());
        }
        // MODSEQ [entry-name entry-type] n
        if !cursor.space() {
            return Err("MODSEQ needs a modseq");
        }
        if cursor.peek() == Some(b'"') {
            if !cursor.skip_quoted() || !cursor.space() {
                return Err("malformed MODSEQ search key");
            }
            let kind = cursor.word().to_ascii_lowercase();
            if !matches!(kind.as_slice(), b"priv" | b"shared" | b"all") || !cursor.space() {
                return Err("malformed MODSEQ search key");
            }
        }
        let n: u64 = number(cursor.word()).ok_or("MODSEQ needs a modseq")?;
        modifiers.search_modseq = true;
        rewritten.extend_from_slice(&bytes[copied..start]);
        let _ = write!(rewritten, "HEADER \"{MODSEQ_HEADER}\" \"{n}\"");
        copied = cursor.pos;
        Ok(())
    })?;
    if !well_formed || (!modifiers.search_modseq && !rewrote_within) {
        return Ok(None);
    }
    rewritten.extend_from_slice(&bytes[copied..]);
    Ok(Some((rewritten, modifiers)))
}

/// Inclusive UID ranges as a sequence set (`1:3,5`).
pub fn write_ranges(out: &mut Vec<u8>, ranges: &[(Uid, Uid)]) {
    for (i, &(first, last)) in ranges.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if first == last {
            let _ = write!(out, "{first}");
        } else {
            let _ = write!(out, "{first}:{last}");
        }
    }
}

/// `* VANISHED [(EARLIER) ]set` for non-empty `ranges`.
pub fn write_vanished(out: &mut Vec<u8>, earlier: bool, ranges: &[(Uid, Uid)]) {
    if ranges.is_empty() {
        return;
    }
    out.extend_from_slice(if earlier {
        b"* VANISHED (EARLIER) "
    } else {
        b"* VANISHED "
    });
    write_ranges(out, ranges);
    out.extend_from_slice(b"\r\n");
}

/// An untagged FETCH reporting a message's flags (and its UID and modseq when the session
/// asked for them), as sent for changes the client did not fetch.
pub fn write_flags_update(
    out: &mut Vec<u8>,
    seq: usize,
    uid: Option<Uid>,
    flags: &FlagSet,
    recent: bool,
    modseq: Option<u64>,
) {
    let _ = write!(out, "* {seq} FETCH (");
    if let Some(uid) = uid {
        let _ = write!(out, "UID {uid} ");
    }
    out.extend_from_slice(b"FLAGS ");
    super::response::flag_list_recent(out, flags, recent);
    if let Some(modseq) = modseq {
        let _ = write!(out, " MODSEQ ({modseq})");
    }
    out.extend_from_slice(b")\r\n");
}

/// The UIDs of `ranges` (sorted, disjoint) that are not in `present` (sorted), as ranges.
pub fn subtract_present(ranges: &[(Uid, Uid)], present: &[Uid]) -> Vec<(Uid, Uid)> {
    let mut out = Vec::new();
    let mut p = 0;
    for &(first, last) in ranges {
        let mut next = first;
        while p < present.len() && present[p] < first {
            p += 1;
        }
        while p < present.len() && present[p] <= last {
            if present[p] > next {
                out.push((next, present[p] - 1));
            }
            next = present[p].saturating_add(1);
            p += 1;
        }
        if next <= last && next >= first {
            out.push((next, last));
        }
    }
    out
}

/// The intersection of two sorted, disjoint range lists.
pub fn intersect(a: &[(Uid, Uid)], b: &[(Uid, Uid)]) -> Vec<(Uid, Uid)> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let first = a[i].0.max(b[j].0);
        let last = a[i].1.min(b[j].1);
        if first <= last {
            out.push((first, last));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Ranges of a UID set, `*` standing for `largest`.
pub fn uid_ranges_of(set: &SequenceSet, largest: Uid) -> Vec<(Uid, Uid)> {
    super::seqset::Ranges::of(set, largest).0
}

/// The UIDs of `within` (sorted, disjoint ranges) expunged after `since` and no longer in
/// `present` (the session's sorted UIDs). When the store has forgotten expunges that old,
/// every UID of `within` that is not present (RFC 7162 3.2.5.1 allows UIDs the client
/// may not know).
pub fn vanished_in(
    store: &MailStore,
    account: AccountId,
    mailbox: MailboxId,
    since: u64,
    within: &[(Uid, Uid)],
    present: &[Uid],
) -> Vec<(Uid, Uid)> {
    let candidates = match store.vanished_since(account, mailbox, since) {
        Some(expunged) => intersect(&expunged, within),
        None => within.to_vec(),
    };
    subtract_present(&candidates, present)
}

/// The QRESYNC part of SELECT/EXAMINE (RFC 7162 3.2.5): `VANISHED (EARLIER)` for the
/// known UIDs expunged since the client's modseq, then a FETCH (UID, FLAGS, MODSEQ) for each
/// message changed since. Nothing when the UIDVALIDITY is not the mailbox's.
#[allow(clippy::too_many_arguments)]
pub fn resync(
    out: &mut Vec<u8>,
    store: &MailStore,
    account: AccountId,
    mailbox: &Selected,
    uidnext: Uid,
    qresync: &Qresync,
    recent: &RecentUids,
) {
    if qresync.uidvalidity != mailbox.uidvalidity {
        return;
    }
    let largest = uidnext.saturating_sub(1).max(mailbox.last_uid());
    let known: Option<Vec<(Uid, Uid)>> = qresync
        .known_uids
        .as_ref()
        .map(|set| uid_ranges_of(set, largest));
    let everything = [(1, largest.max(1))];
    let within = known.as_deref().unwrap_or(&everything);
    let present: Vec<Uid> = mailbox.messages.iter().map(|m| m.uid).collect();
    let vanished = vanished_in(store, account, mailbox.id, qresync.modseq, within, &present);
    write_vanished(out, true, &vanished);
    for (i, message) in mailbox.messages.iter().enumerate() {
        if message.modseq <= qresync.modseq {
            continue;
        }
        if let Some(known) = &known {
            let k = known.partition_point(|&(_, last)| last < message.uid);
            if known.get(k).is_none_or(|&(first, _)| first > message.uid) {
                continue;
            }
        }
        write_flags_update(
            out,
            i + 1,
            Some(message.uid),
            &message.flags,
            recent.contains(message.uid),
            Some(message.modseq),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stripped(command: &str) -> (String, Modifiers) {
        let (bytes, modifiers) = strip(command.as_bytes())
            .expect("valid")
            .expect("has modifiers");
        (String::from_utf8(bytes).unwrap(), modifiers)
    }

    #[test]
    fn select_parameters_come_out() {
        let (command, modifiers) = stripped("a SELECT INBOX (CONDSTORE)\r\n");
        assert_eq!(command, "a SELECT INBOX\r\n");
        assert!(modifiers.select_condstore);
        let (command, modifiers) =
            stripped("a EXAMINE \"a (b)\" (QRESYNC (67890007 20050715194045000 41,43:211))\r\n");
        assert_eq!(command, "a EXAMINE \"a (b)\"\r\n");
        let qresync = modifiers.qresync.expect("qresync");
        assert_eq!(qresync.uidvalidity, 67890007);
        assert_eq!(qresync.modseq, 20050715194045000);
        assert!(qresync.known_uids.is_some());
        let (_, modifiers) = stripped("a SELECT INBOX (QRESYNC (1 2 1:9 (1,3 5,7)))\r\n");
        assert_eq!(modifiers.qresync.map(|q| q.modseq), Some(2));
        assert_eq!(strip(b"a SELECT INBOX\r\n"), Ok(None));
        assert_eq!(strip(b"a SELECT \"x (y)\"\r\n"), Ok(None));
        assert!(strip(b"a SELECT INBOX (BOGUS)\r\n").is_err());
        assert!(strip(b"a SELECT INBOX (QRESYNC (0 1))\r\n").is_err());
    }

    #[test]
    fn fetch_modifiers_and_the_modseq_item_come_out() {
        let (command, modifiers) = stripped("a FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)\r\n");
        assert_eq!(command, "a FETCH 1:* (FLAGS)\r\n");
        assert_eq!(modifiers.changed_since, Some(12345));
        let (command, modifiers) =
            stripped("a UID FETCH 1:* (FLAGS MODSEQ) (CHANGEDSINCE 5 VANISHED)\r\n");
        assert_eq!(command, "a UID FETCH 1:* (FLAGS)\r\n");
        assert!(modifiers.fetch_modseq && modifiers.vanished);
        let (command, _) = stripped("a FETCH 2 (MODSEQ)\r\n");
        assert_eq!(command, "a FETCH 2 (UID)\r\n");
        let (command, _) = stripped("a FETCH 2 (BODY.PEEK[HEADER.FIELDS (FROM TO)] modseq)\r\n");
        assert_eq!(
            command,
            "a FETCH 2 (BODY.PEEK[HEADER.FIELDS (FROM TO)])\r\n"
        );
        assert_eq!(strip(b"a FETCH 1 (FLAGS BODY[])\r\n"), Ok(None));
        assert!(strip(b"a FETCH 1 FLAGS (CHANGEDSINCE 5 VANISHED)\r\n").is_err());
        assert!(strip(b"a FETCH 1 FLAGS (CHANGEDSINCE x)\r\n").is_err());
    }

    #[test]
    fn store_and_search_modifiers_come_out() {
        let (command, modifiers) =
            stripped("a UID STORE 1:5 (UNCHANGEDSINCE 320162338) +FLAGS.SILENT (\\Deleted)\r\n");
        assert_eq!(command, "a UID STORE 1:5 +FLAGS.SILENT (\\Deleted)\r\n");
        assert_eq!(modifiers.unchanged_since, Some(320162338));
        assert_eq!(strip(b"a STORE 1 +FLAGS (\\Seen)\r\n"), Ok(None));
        let (command, modifiers) = stripped("a SEARCH OR MODSEQ 7 SUBJECT MODSEQ\r\n");
        assert_eq!(
            command,
            "a SEARCH OR HEADER \"kermail modseq\" \"7\" SUBJECT MODSEQ\r\n"
        );
        assert!(modifiers.search_modseq);
        let (command, _) =
            stripped("a UID SEARCH MODSEQ \"/flags/\\\\draft\" all 620162338 UNSEEN\r\n");
        assert_eq!(
            command,
            "a UID SEARCH HEADER \"kermail modseq\" \"620162338\" UNSEEN\r\n"
        );
        assert_eq!(strip(b"a SEARCH SUBJECT \"MODSEQ 5\"\r\n"), Ok(None));
        assert!(strip(b"a SEARCH MODSEQ x\r\n").is_err());
        // WITHIN (RFC 5032) keys go through the same scanner.
        let (command, modifiers) = stripped("a SEARCH OR OLDER 60 YOUNGER 5 FROM OLDER\r\n");
        assert_eq!(
            command,
            "a SEARCH OR HEADER \"kermail older\" \"60\" HEADER \"kermail younger\" \"5\" FROM OLDER\r\n"
        );
        assert!(!modifiers.enables_condstore());
        assert_eq!(strip(b"a SEARCH SUBJECT \"OLDER 5\"\r\n"), Ok(None));
        assert!(strip(b"a SEARCH OLDER 0\r\n").is_err());
        assert!(strip(b"a SEARCH YOUNGER\r\n").is_err());
    }

    #[test]
    fn range_helpers() {
        assert_eq!(
            subtract_present(&[(1, 10)], &[2, 3, 7, 10]),
            vec![(1, 1), (4, 6), (8, 9)]
        );
        assert_eq!(subtract_present(&[(5, 5)], &[5]), vec![]);
        assert_eq!(
            intersect(&[(1, 5), (8, 9)], &[(3, 8)]),
            vec![(3, 5), (8, 8)]
        );
        let mut out = Vec::new();
        write_vanished(&mut out, true, &[(1, 3), (5, 5)]);
        assert_eq!(out, b"* VANISHED (EARLIER) 1:3,5\r\n");
    }

    #[test]
    fn every_prefix_and_mangling_of_a_command_is_handled_without_panic() {
        let commands: [&[u8]; 6] = [
            b"a SELECT {5}\r\nIN(OX (QRESYNC (1 2 1:9 (1,3 5,7))))\r\n",
            b"a UID FETCH 1:* (FLAGS BODY[HEADER.FIELDS (\"A\" B)] MODSEQ) (CHANGEDSINCE 5 VANISHED)\r\n",
            b"a STORE 1 (UNCHANGEDSINCE 9) +FLAGS (\\Seen)\r\n",
            b"a SEARCH OR (MODSEQ \"/x\\\"\" all 5) {3}\r\nabc HEADER a MODSEQ\r\n",
            b"a EXAMINE \"\\\r\n",
            b"a FETCH 1 MODSEQ\r\n",
        ];
        for command in commands {
            for end in 0..=command.len() {
                let _ = strip(&command[..end]);
                let mut mangled = command[..end].to_vec();
                mangled.extend_from_slice(b"\r\n");
                let _ = strip(&mangled);
            }
        }
    }
}
