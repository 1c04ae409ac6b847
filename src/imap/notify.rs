//! RFC 5465 NOTIFY: `NOTIFY SET [STATUS] (filter events)...` and `NOTIFY NONE`, parsed here
//! (imap-codec 1.0 does not know the command), and the notifications themselves.
//!
//! How events travel: the store broadcasts every applied change ([`MailboxChanged`]) and every
//! change of an account's mailbox names or subscriptions (`MailStore::subscribe_listings`).
//! The driver hands them to [`Session::notify_changed`] / [`Session::notify_listing`], which
//! only record them (a set of changed mailboxes, deduplicated, and a "names changed" flag),
//! and calls [`Session::notify_flush`] whenever the session may speak: between commands, in
//! IDLE, or while it simply waits for the next command. The flush compares the store with what
//! the client was last told: STATUS for other mailboxes, EXISTS/EXPUNGE/FETCH for the selected
//! one (through [`super::selected::Selected::refresh`]), LIST for created, deleted and renamed
//! mailboxes (names compared by mailbox id) and for subscription changes.
//!
//! Events that arrive while the session cannot report them (inside a command, a partial
//! command line, a literal still arriving) are counted; past [`MAX_UNREPORTED_EVENTS`], or
//! when the store's change feed lagged, the session sends `* OK [NOTIFICATIONOVERFLOW]` and
//! acts as after NOTIFY NONE (RFC 5465 5.8).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use imap_codec::decode::Decoder;
use imap_codec::CommandCodec;

use super::response::{astring, tagged, untagged};
use super::session::{Session, State};
use crate::store::{AccountId, MailboxChanged, MailboxId, MailboxInfo, MailboxView};

/// Changes the session may leave unreported before it gives up with NOTIFICATIONOVERFLOW.
/// Events, not distinct mailboxes (those are deduplicated, so memory is bounded by the
/// account's mailboxes anyway): a client that missed this many changes during one command or
/// one partial command line is better served by resynchronizing (RFC 5465 5.8) than by a
/// burst of stale STATUS lines.
pub const MAX_UNREPORTED_EVENTS: usize = 256;
/// Event groups in one NOTIFY SET.
pub const MAX_EVENT_GROUPS: usize = 32;
/// Mailbox names over all `subtree` and `mailboxes` filters of one NOTIFY SET.
pub const MAX_FILTER_MAILBOXES: usize = 1_000;
/// Nesting of parenthesized lists in the command (NOTIFY needs three levels).
const MAX_LIST_DEPTH: u8 = 4;

/// The events this server reports, for `BADEVENT`.
const SUPPORTED_EVENTS: &str =
    "MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange";

/// Which events a filter asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events {
    pub message_new: bool,
    pub message_expunge: bool,
    pub flag_change: bool,
    pub mailbox_name: bool,
    pub subscription_change: bool,
}

impl Events {
    fn message(&self) -> bool {
        self.message_new || self.message_expunge
    }
}

/// `filter-mailboxes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    Selected,
    SelectedDelayed,
    Inboxes,
    Personal,
    Subscribed,
    Subtree(Vec<String>),
    Mailboxes(Vec<String>),
}

impl Filter {
    fn is_selected(&self) -> bool {
        matches!(self, Filter::Selected | Filter::SelectedDelayed)
    }

    /// Whether a mailbox other than the selected one falls under this filter.
    fn matches(&self, name: &str, subscriptions: &BTreeSet<String>) -> bool {
        match self {
            Filter::Selected | Filter::SelectedDelayed => false,
            // Mail is delivered to INBOX only (Sieve's fileinto aside).
            Filter::Inboxes => name == "INBOX",
            Filter::Personal => true,
            Filter::Subscribed => subscriptions.contains(name),
            Filter::Subtree(roots) => roots.iter().any(|root| {
                name == root
                    || (name.len() > root.len()
                        && name.starts_with(root.as_str())
                        && name.as_bytes()[root.len()] == b'/')
            }),
            Filter::Mailboxes(names) => names.iter().any(|n| n == name),
        }
    }
}

/// One `event-group`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventGroup {
    pub filter: Filter,
    /// All false for `NONE`.
    pub events: Events,
}

/// A parsed `NOTIFY SET`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifyRequest {
    /// The STATUS indicator: send the current STATUS of each watched mailbox now.
    pub status: bool,
    pub groups: Vec<EventGroup>,
    /// The FETCH items of the selected filter's MessageNew, as a parenthesized list ready to
    /// follow `UID FETCH set` (BODY[...] rewritten as BODY.PEEK[...]: a notification must not
    /// set \Seen).
    pub fetch_items: Option<String>,
}

impl NotifyRequest {
    /// The events of the selected mailbox (`None`: no selected filter, RFC 3501 rules only).
    fn selected(&self) -> Option<&EventGroup> {
        self.groups.iter().find(|g| g.filter.is_selected())
    }

    /// The events of another mailbox: the first filter that names it decides.
    fn events_for(&self, name: &str, subscriptions: &BTreeSet<String>) -> Events {
        self.groups
            .iter()
            .find(|g| g.filter.matches(name, subscriptions))
            .map(|g| g.events)
            .unwrap_or_default()
    }
}

/// What the NOTIFY command asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    None,
    Set(NotifyRequest),
}

/// Why a NOTIFY command is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotifyError {
    /// `BAD`: the command is malformed or breaks a rule of RFC 5465 3.1.
    #[error("{0}")]
    Bad(&'static str),
    /// `NO [BADEVENT (...)]`: an event this server does not report.
    #[error("unsupported event {0}")]
    BadEvent(String),
}

#[derive(Debug)]
enum Token {
    Word(String),
    /// A list and the bytes it spans in the arguments (parentheses included).
    List(Vec<Token>, std::ops::Range<usize>),
}

struct Tokens<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Tokens<'_> {
    fn skip_space(&mut self) {
        while self.bytes.get(self.at) == Some(&b' ') {
            self.at += 1;
        }
    }

    fn at_end(&self) -> bool {
        self.at >= self.bytes.len()
    }

    /// One atom, quoted string, literal or parenthesized list.
    fn token(&mut self, depth: u8) -> Result<Token, NotifyError> {
        self.skip_space();
        let start = self.at;
        match self.bytes.get(self.at) {
            None => Err(NotifyError::Bad("missing NOTIFY arguments")),
            Some(b'(') => {
                if depth >= MAX_LIST_DEPTH {
                    return Err(NotifyError::Bad("lists nested too deeply"));
                }
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_space();
                    match self.bytes.get(self.at) {
                        None => return Err(NotifyError::Bad("unbalanced parentheses")),
                        Some(b')') => {
                            self.at += 1;
                            return Ok(Token::List(items, start..self.at));
                        }
                        Some(_) => items.push(self.token(depth + 1)?),
                    }
                }
            }
            Some(b')') => Err(NotifyError::Bad("unbalanced parentheses")),
            Some(b'"') => {
                self.at += 1;
                let mut value = Vec::new();
                loop {
                    match self.bytes.get(self.at) {
                        None | Some(b'\r' | b'\n') => {
                            return Err(NotifyError::Bad("unterminated quoted string"))
                        }
                        Some(b'"') => {
                            self.at += 1;
                            break;
                        }
                        Some(b'\\') => {
                            let escaped = *self
                                .bytes
                                .get(self.at + 1)
                                .ok_or(NotifyError::Bad("unterminated quoted string"))?;
                            value.push(escaped);
                            self.at += 2;
                        }
                        Some(&b) => {
                            value.push(b);
                            self.at += 1;
                        }
                    }
                }
                String::from_utf8(value)
                    .map(Token::Word)
                    .map_err(|_| NotifyError::Bad("mailbox names must be UTF-8"))
            }
            Some(b'{') => {
                let close = self.bytes[self.at..]
                    .iter()
                    .position(|&b| b == b'}')
                    .ok_or(NotifyError::Bad("malformed literal"))?;
                let digits = &self.bytes[self.at + 1..self.at + close];
                let digits = digits.strip_suffix(b"+").unwrap_or(digits);
                let len: usize = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse().ok())
                    .ok_or(NotifyError::Bad("malformed literal"))?;
                let data_start = self.at + close + 1;
                let data_start = if self.bytes[data_start..].starts_with(b"\r\n") {
                    data_start + 2
                } else if self.bytes[data_start..].starts_with(b"\n") {
                    data_start + 1
                } else {
                    return Err(NotifyError::Bad("malformed literal"));
                };
                let data = self
                    .bytes
                    .get(data_start..data_start + len)
                    .ok_or(NotifyError::Bad("literal shorter than announced"))?;
                self.at = data_start + len;
                String::from_utf8(data.to_vec())
                    .map(Token::Word)
                    .map_err(|_| NotifyError::Bad("mailbox names must be UTF-8"))
            }
            Some(_) => {
                let len = self.bytes[self.at..]
                    .iter()
                    .position(|&b| matches!(b, b' ' | b'(' | b')' | b'\r' | b'\n'))
                    .unwrap_or(self.bytes.len() - self.at);
                let word = &self.bytes[self.at..self.at + len];
                self.at += len;
                String::from_utf8(word.to_vec())
                    .map(Token::Word)
                    .map_err(|_| NotifyError::Bad("mailbox names must be UTF-8"))
            }
        }
    }
}

/// A mailbox name as the store spells it (INBOX in any case is INBOX; no trailing '/').
fn mailbox_name(word: &str) -> String {
    if word.eq_ignore_ascii_case("INBOX") {
        return "INBOX".to_owned();
    }
    word.trim_end_matches('/').to_owned()
}

/// Parses what follows `NOTIFY ` (without the line end).
pub fn parse(args: &[u8]) -> Result<Parsed, NotifyError> {
    let mut tokens = Tokens { bytes: args, at: 0 };
    let first = match tokens.token(0)? {
        Token::Word(word) => word,
        Token::List(..) => return Err(NotifyError::Bad("expected NOTIFY SET or NOTIFY NONE")),
    };
    if first.eq_ignore_ascii_case("NONE") {
        tokens.skip_space();
        if !tokens.at_end() {
            return Err(NotifyError::Bad("NOTIFY NONE takes no arguments"));
        }
        return Ok(Parsed::None);
    }
    if !first.eq_ignore_ascii_case("SET") {
        return Err(NotifyError::Bad("expected NOTIFY SET or NOTIFY NONE"));
    }
    let mut request = NotifyRequest {
        status: false,
        groups: Vec::new(),
        fetch_items: None,
    };
    let mut unsupported: Option<String> = None;
    let mut n_names = 0usize;
    let mut first_group = true;
    loop {
        tokens.skip_space();
        if tokens.at_end() {
            break;
        }
        let items = match tokens.token(0)? {
            Token::Word(word) if first_group && word.eq_ignore_ascii_case("STATUS") => {
                request.status = true;
                first_group = false;
                continue;
            }
            Token::Word(_) => return Err(NotifyError::Bad("expected an event group")),
            Token::List(items, _) => items,
        };
        first_group = false;
        if request.groups.len() >= MAX_EVENT_GROUPS {
            return Err(NotifyError::Bad("too many event groups"));
        }
        let mut items = items.into_iter();
        let filter = match items.next() {
            Some(Token::Word(word)) => word.to_ascii_lowercase(),
            _ => return Err(NotifyError::Bad("expected a mailbox filter")),
        };
        let filter = match filter.as_str() {
            "selected" => Filter::Selected,
            "selected-delayed" => Filter::SelectedDelayed,
            "inboxes" => Filter::Inboxes,
            "personal" => Filter::Personal,
            "subscribed" => Filter::Subscribed,
            "subtree" | "mailboxes" => {
                let names: Vec<String> = match items.next() {
                    Some(Token::Word(word)) => vec![mailbox_name(&word)],
                    Some(Token::List(list, _)) if !list.is_empty() => list
                        .into_iter()
                        .map(|token| match token {
                            Token::Word(word) => Ok(mailbox_name(&word)),
                            Token::List(..) => Err(NotifyError::Bad("expected a mailbox name")),
                        })
                        .collect::<Result<_, _>>()?,
                    _ => return Err(NotifyError::Bad("expected mailbox names")),
                };
                n_names += names.len();
                if n_names > MAX_FILTER_MAILBOXES {
                    return Err(NotifyError::Bad("too many mailbox names"));
                }
                if filter == "subtree" {
                    Filter::Subtree(names)
                } else {
                    Filter::Mailboxes(names)
                }
            }
            _ => return Err(NotifyError::Bad("unknown mailbox filter")),
        };
        let events = match items.next() {
            Some(Token::Word(word)) if word.eq_ignore_ascii_case("NONE") => Events::default(),
            Some(Token::List(list, _)) if !list.is_empty() => {
                parse_events(list, &filter, &mut request, &mut unsupported, args)?
            }
            _ => return Err(NotifyError::Bad("expected events or NONE")),
        };
        if items.next().is_some() {
            return Err(NotifyError::Bad("unexpected data in an event group"));
        }
        if filter.is_selected() && request.groups.iter().any(|g| g.filter.is_selected()) {
            return Err(NotifyError::Bad("selected given twice"));
        }
        request.groups.push(EventGroup { filter, events });
    }
    if request.groups.is_empty() {
        return Err(NotifyError::Bad(
            "NOTIFY SET needs at least one event group",
        ));
    }
    if let Some(event) = unsupported {
        return Err(NotifyError::BadEvent(event));
    }
    Ok(Parsed::Set(request))
}

/// The events of one group; the FETCH items of MessageNew go to `request`.
fn parse_events(
    list: Vec<Token>,
    filter: &Filter,
    request: &mut NotifyRequest,
    unsupported: &mut Option<String>,
    args: &[u8],
) -> Result<Events, NotifyError> {
    let mut events = Events::default();
    let mut list = list.into_iter().peekable();
    while let Some(token) = list.next() {
        let Token::Word(name) = token else {
            return Err(NotifyError::Bad("expected an event name"));
        };
        match name.to_ascii_lowercase().as_str() {
            "messagenew" => {
                events.message_new = true;
                if let Some(Token::List(_, span)) = list.peek() {
                    if !filter.is_selected() {
                        return Err(NotifyError::Bad(
                            "FETCH items are only allowed for the selected mailbox",
                        ));
                    }
                    request.fetch_items = Some(fetch_items(&args[span.clone()])?);
                    list.next();
                }
            }
            "messageexpunge" => events.message_expunge = true,
            "flagchange" => events.flag_change = true,
            "mailboxname" | "subscriptionchange" if filter.is_selected() => {
                return Err(NotifyError::Bad(
                    "only message events apply to the selected mailbox",
                ));
            }
            "mailboxname" => events.mailbox_name = true,
            "subscriptionchange" => events.subscription_change = true,
            _ => {
                if !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(NotifyError::Bad("malformed event name"));
                }
                unsupported.get_or_insert(name);
            }
        }
    }
    if events.message_new != events.message_expunge {
        return Err(NotifyError::Bad(
            "MessageNew and MessageExpunge go together",
        ));
    }
    if events.flag_change && !events.message_new {
        return Err(NotifyError::Bad(
            "FlagChange needs MessageNew and MessageExpunge",
        ));
    }
    Ok(events)
}

/// Checks MessageNew's FETCH items with imap-codec and makes every body section a PEEK.
fn fetch_items(list: &[u8]) -> Result<String, NotifyError> {
    let text =
        std::str::from_utf8(list).map_err(|_| NotifyError::Bad("FETCH items must be ASCII"))?;
    let mut peeked = String::with_capacity(text.len() + 16);
    let upper = text.to_ascii_uppercase();
    let mut at = 0;
    while at < text.len() {
        let rest = &upper[at..];
        if rest.starts_with("BODY[") || rest.starts_with("BINARY[") {
            let word = if rest.starts_with("BODY[") {
                "BODY"
            } else {
                "BINARY"
            };
            peeked.push_str(word);
            peeked.push_str(".PEEK[");
            at += word.len() + 1;
        } else {
            let c = text[at..].chars().next().unwrap_or(' ');
            peeked.push(c);
            at += c.len_utf8();
        }
    }
    let words = upper.split([' ', '(', ')']);
    if words
        .into_iter()
        .any(|w| w == "RFC822" || w == "RFC822.TEXT")
    {
        return Err(NotifyError::Bad(
            "RFC822 and RFC822.TEXT would set \\Seen: use BODY.PEEK[] or BODY.PEEK[TEXT]",
        ));
    }
    let command = format!("n UID FETCH 1 {peeked}\r\n");
    match CommandCodec::default().decode(command.as_bytes()) {
        Ok(([], _)) => Ok(peeked),
        _ => Err(NotifyError::Bad("invalid FETCH items in MessageNew")),
    }
}

/// The STATUS values the client was last told of a mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StatusValues {
    messages: usize,
    uidnext: u32,
    uidvalidity: u32,
    unseen: usize,
    highest_modseq: u64,
}

impl StatusValues {
    fn of_info(info: &MailboxInfo) -> StatusValues {
        StatusValues {
            messages: info.exists as usize,
            uidnext: info.uidnext,
            uidvalidity: info.uidvalidity,
            unseen: info.unseen as usize,
            highest_modseq: info.highest_modseq,
        }
    }

    fn of_view(view: &MailboxView) -> StatusValues {
        StatusValues {
            messages: view.messages.len(),
            uidnext: view.uidnext,
            uidvalidity: view.uidvalidity,
            unseen: view
                .messages
                .iter()
                .filter(|m| !m.flags.contains(&crate::store::Flag::Seen))
                .count(),
            highest_modseq: view.highest_modseq,
        }
    }

    fn write(&self, out: &mut Vec<u8>, name: &str, condstore: bool) {
        out.extend_from_slice(b"* STATUS ");
        astring(out, name.as_bytes());
        let _ = write!(
            out,
            " (MESSAGES {} UIDNEXT {} UIDVALIDITY {} UNSEEN {}",
            self.messages, self.uidnext, self.uidvalidity, self.unseen
        );
        if condstore {
            let _ = write!(out, " HIGHESTMODSEQ {}", self.highest_modseq);
        }
        out.extend_from_slice(b")\r\n");
    }
}

/// A session's NOTIFY state: what it asked for, what it was told, what is pending.
pub struct Notify {
    request: NotifyRequest,
    /// Mailboxes changed since the last flush.
    pending: BTreeSet<MailboxId>,
    /// Mailbox names or subscriptions changed since the last flush.
    listing_pending: bool,
    /// Events recorded since the last flush (see [`MAX_UNREPORTED_EVENTS`]).
    unreported: usize,
    overflowed: bool,
    /// The account's mailboxes by id, as the client was last told.
    names: BTreeMap<MailboxId, String>,
    subscriptions: BTreeSet<String>,
    /// The last STATUS values told (or seen at NOTIFY SET) per mailbox.
    told: BTreeMap<MailboxId, StatusValues>,
}

impl Notify {
    fn record(&mut self) {
        self.unreported += 1;
        if self.unreported > MAX_UNREPORTED_EVENTS {
            self.overflowed = true;
        }
    }
}

impl Session {
    /// `NOTIFY ...` (the arguments after the verb).
    pub(super) fn notify_command(&mut self, tag: &str, args: &[u8], out: &mut Vec<u8>) {
        let Some(account) = self.account() else {
            tagged(out, tag, "BAD", None, "log in first");
            return;
        };
        match parse(args) {
            Err(NotifyError::Bad(reason)) => tagged(out, tag, "BAD", None, reason),
            Err(NotifyError::BadEvent(_)) => tagged(
                out,
                tag,
                "NO",
                Some(&format!("BADEVENT ({SUPPORTED_EVENTS})")),
                "unsupported event",
            ),
            Ok(Parsed::None) => {
                self.notify = None;
                tagged(out, tag, "OK", None, "NOTIFY completed");
            }
            Ok(Parsed::Set(request)) => {
                let mailboxes = self.store.list_mailboxes(account);
                let subscriptions: BTreeSet<String> =
                    self.store.subscriptions(account).into_iter().collect();
                let selected = self.selected_mailbox().map(|(_, id)| id);
                let mut told = BTreeMap::new();
                for info in &mailboxes {
                    let values = StatusValues::of_info(info);
                    if Some(info.id) != selected
                        && request.status
                        && request.events_for(&info.name, &subscriptions).message()
                    {
                        values.write(out, &info.name, self.condstore);
                    }
                    told.insert(info.id, values);
                }
                self.notify = Some(Box::new(Notify {
                    request,
                    pending: BTreeSet::new(),
                    listing_pending: false,
                    unreported: 0,
                    overflowed: false,
                    names: mailboxes.into_iter().map(|m| (m.id, m.name)).collect(),
                    subscriptions,
                    told,
                }));
                self.notify_generation = self.notify_generation.wrapping_add(1);
                tagged(out, tag, "OK", None, "NOTIFY completed");
            }
        }
    }

    /// NOTIFY SET is in force: the driver must pass on store changes.
    pub fn notify_active(&self) -> bool {
        self.notify.is_some()
    }

    /// Changes with every NOTIFY SET: the driver then starts its change feeds afresh, so
    /// that changes from before the command are not reported as new.
    pub fn notify_generation(&self) -> u64 {
        self.notify_generation
    }

    /// A change applied to some mailbox (`None`: the feed lagged, changes were lost).
    pub fn notify_changed(&mut self, change: Option<MailboxChanged>) {
        let account = self.account();
        let selected = self.selected_mailbox().map(|(_, id)| id);
        let Some(notify) = self.notify.as_mut() else {
            return;
        };
        match change {
            None => notify.overflowed = true,
            Some(change) if Some(change.account) == account => {
                // Only changes the client asked about count towards the overflow. A mailbox
                // not named yet (created since the last flush) counts: its name is unknown.
                let watched = if Some(change.mailbox) == selected {
                    notify
                        .request
                        .selected()
                        .is_some_and(|group| group.events.message())
                } else {
                    notify.names.get(&change.mailbox).is_none_or(|name| {
                        notify
                            .request
                            .events_for(name, &notify.subscriptions)
                            .message()
                    })
                };
                if watched {
                    notify.pending.insert(change.mailbox);
                    notify.record();
                }
            }
            Some(_) => {}
        }
    }

    /// An account's mailbox names or subscriptions changed (`None`: the feed lagged; names
    /// are compared, so nothing is lost but the wake-up).
    pub fn notify_listing(&mut self, account: Option<AccountId>) {
        let own = self.account();
        let Some(notify) = self.notify.as_mut() else {
            return;
        };
        if account.is_none() || account == own {
            notify.listing_pending = true;
            notify.record();
        }
    }

    /// Whether untagged notifications may be written now: not inside a command (a partial
    /// line or a literal still arriving), or in IDLE.
    fn may_notify(&self) -> bool {
        self.is_idling() || self.waiting_for_command()
    }

    /// Writes the notifications due (if the session may speak now).
    pub async fn notify_flush(&mut self, out: &mut Vec<u8>) {
        let Some(account) = self.account() else {
            return;
        };
        if !self.may_notify() {
            return;
        }
        let Some(mut notify) = self.notify.take() else {
            return;
        };
        if notify.overflowed {
            untagged(
                out,
                "OK [NOTIFICATIONOVERFLOW] too many changes to report; NOTIFY is off",
            );
            return;
        }
        notify.unreported = 0;
        if std::mem::take(&mut notify.listing_pending) {
            self.notify_listing_changes(account, &mut notify, out);
        }
        let selected = self.selected_mailbox().map(|(_, id)| id);
        let pending = std::mem::take(&mut notify.pending);
        let mut selected_changed = false;
        for id in pending {
            if Some(id) == selected {
                selected_changed = true;
                continue;
            }
            let Some(view) = self.store.mailbox_view(account, id) else {
                notify.told.remove(&id);
                continue;
            };
            let events = notify.request.events_for(&view.name, &notify.subscriptions);
            if !events.message() {
                continue;
            }
            let values = StatusValues::of_view(&view);
            let told = notify.told.insert(id, values);
            let worth_telling = match told {
                None => true,
                Some(told) => {
                    told.messages != values.messages
                        || told.uidnext != values.uidnext
                        || told.uidvalidity != values.uidvalidity
                        || (events.flag_change
                            && (told.unseen != values.unseen
                                || (self.condstore
                                    && told.highest_modseq != values.highest_modseq)))
                }
            };
            if worth_telling {
                values.write(out, &view.name, self.condstore);
            }
        }
        let selected_group = notify.request.selected().cloned();
        let fetch_items = notify.request.fetch_items.clone();
        self.notify = Some(notify);
        if selected_changed {
            if let Some(group) = selected_group.filter(|g| g.events.message()) {
                self.notify_selected(&group, fetch_items.as_deref(), out)
                    .await;
            }
        }
    }

    /// LIST responses for created, deleted and renamed mailboxes and for subscription changes.
    fn notify_listing_changes(&self, account: AccountId, notify: &mut Notify, out: &mut Vec<u8>) {
        let mailboxes = self.store.list_mailboxes(account);
        let subscriptions: BTreeSet<String> =
            self.store.subscriptions(account).into_iter().collect();
        let both: BTreeSet<String> = subscriptions
            .union(&notify.subscriptions)
            .cloned()
            .collect();
        let wants_name = |name: &str| notify.request.events_for(name, &both).mailbox_name;
        let current: BTreeMap<MailboxId, &str> =
            mailboxes.iter().map(|m| (m.id, m.name.as_str())).collect();
        for (id, old) in &notify.names {
            if !current.contains_key(id) && wants_name(old) {
                out.extend_from_slice(b"* LIST (\\NonExistent) \"/\" ");
                astring(out, old.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        for info in &mailboxes {
            match notify.names.get(&info.id) {
                None if wants_name(&info.name) => {
                    out.extend_from_slice(b"* LIST () \"/\" ");
                    astring(out, info.name.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                Some(old) if *old != info.name && (wants_name(old) || wants_name(&info.name)) => {
                    out.extend_from_slice(b"* LIST () \"/\" ");
                    astring(out, info.name.as_bytes());
                    out.extend_from_slice(b" (\"OLDNAME\" (");
                    astring(out, old.as_bytes());
                    out.extend_from_slice(b"))\r\n");
                }
                _ => {}
            }
        }
        let exists = |name: &str| current.values().any(|n| *n == name);
        let wants_subscription =
            |name: &str| notify.request.events_for(name, &both).subscription_change;
        for name in subscriptions.difference(&notify.subscriptions) {
            if wants_subscription(name) {
                let attributes = if exists(name) {
                    "\\Subscribed"
                } else {
                    "\\Subscribed \\NonExistent"
                };
                let _ = write!(out, "* LIST ({attributes}) \"/\" ");
                astring(out, name.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        for name in notify.subscriptions.difference(&subscriptions) {
            if wants_subscription(name) {
                let attributes = if exists(name) { "" } else { "\\NonExistent" };
                let _ = write!(out, "* LIST ({attributes}) \"/\" ");
                astring(out, name.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        notify.told.retain(|id, _| current.contains_key(id));
        notify.names = mailboxes.into_iter().map(|m| (m.id, m.name)).collect();
        notify.subscriptions = subscriptions;
    }

    /// EXISTS, EXPUNGE (not for `selected-delayed`) and flag updates of the selected mailbox,
    /// then the FETCH items MessageNew asked for, for the new messages.
    async fn notify_selected(
        &mut self,
        group: &EventGroup,
        fetch_items: Option<&str>,
        out: &mut Vec<u8>,
    ) {
        let allow_expunge = group.filter == Filter::Selected;
        let State::Selected { account, mailbox } = &mut self.state else {
            return;
        };
        let last_uid_before = mailbox.last_uid();
        mailbox.refresh(&self.store, *account, allow_expunge, &[], out);
        let last_uid_after = mailbox.last_uid();
        let Some(items) = fetch_items else {
            return;
        };
        if last_uid_after <= last_uid_before {
            return;
        }
        // The session's own FETCH answers the items (the client's view already holds the new
        // messages, so no second EXISTS); its tagged line is dropped.
        let command = format!(
            "{INTERNAL_TAG} UID FETCH {}:{} {items}\r\n",
            last_uid_before + 1,
            last_uid_after
        );
        let mut answer = Vec::new();
        let _ = Box::pin(self.run_internal(command.as_bytes(), &mut answer)).await;
        let tagged_at = answer
            .windows(INTERNAL_TAG.len() + 3)
            .rposition(|w| w.starts_with(b"\r\n") && w[2..].starts_with(INTERNAL_TAG.as_bytes()))
            .map(|at| at + 2)
            .or_else(|| answer.starts_with(INTERNAL_TAG.as_bytes()).then_some(0));
        if let Some(at) = tagged_at {
            answer.truncate(at);
        }
        out.extend_from_slice(&answer);
    }
}

/// The tag of the FETCH a notification runs for MessageNew (never written to the client).
const INTERNAL_TAG: &str = "kermail-notify";

#[cfg(test)]
mod tests {
    use super::*;

    fn check(args: &str, expected: Result<Parsed, NotifyError>) {
        assert_eq!(parse(args.as_bytes()), expected, "{args}");
    }

    fn bad(reason: &'static str) -> Result<Parsed, NotifyError> {
        Err(NotifyError::Bad(reason))
    }

    #[test]
    fn notify_commands_parse() {
        check("NONE", Ok(Parsed::None));
        check("none", Ok(Parsed::None));
        let message = Events {
            message_new: true,
            message_expunge: true,
            ..Events::default()
        };
        check(
            "SET STATUS (selected (MessageNew (UID BODY[HEADER.FIELDS (SUBJECT)]) MessageExpunge FlagChange)) (subtree (Lists \"Work/x\") (MessageNew MessageExpunge MailboxName)) (mailboxes {3}\r\nfoo NONE)",
            Ok(Parsed::Set(NotifyRequest {
                status: true,
                groups: vec![
                    EventGroup {
                        filter: Filter::Selected,
                        events: Events {
                            flag_change: true,
                            ..message
                        },
                    },
                    EventGroup {
                        filter: Filter::Subtree(vec!["Lists".into(), "Work/x".into()]),
                        events: Events {
                            mailbox_name: true,
                            ..message
                        },
                    },
                    EventGroup {
                        filter: Filter::Mailboxes(vec!["foo".into()]),
                        events: Events::default(),
                    },
                ],
                fetch_items: Some("(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])".into()),
            })),
        );
        check(
            "set (personal (SubscriptionChange))",
            Ok(Parsed::Set(NotifyRequest {
                status: false,
                groups: vec![EventGroup {
                    filter: Filter::Personal,
                    events: Events {
                        subscription_change: true,
                        ..Events::default()
                    },
                }],
                fetch_items: None,
            })),
        );
    }

    #[test]
    fn rule_breaking_commands_are_bad() {
        check("SET", bad("NOTIFY SET needs at least one event group"));
        check(
            "SET STATUS",
            bad("NOTIFY SET needs at least one event group"),
        );
        check("NONE x", bad("NOTIFY NONE takes no arguments"));
        check(
            "SET (selected (MessageNew))",
            bad("MessageNew and MessageExpunge go together"),
        );
        check(
            "SET (inboxes (FlagChange))",
            bad("FlagChange needs MessageNew and MessageExpunge"),
        );
        check(
            "SET (inboxes (MessageNew (UID) MessageExpunge))",
            bad("FETCH items are only allowed for the selected mailbox"),
        );
        check(
            "SET (selected (MailboxName))",
            bad("only message events apply to the selected mailbox"),
        );
        check(
            "SET (elsewhere (MailboxName))",
            bad("unknown mailbox filter"),
        );
        check("SET (personal ())", bad("expected events or NONE"));
        check("SET (personal (MailboxName)", bad("unbalanced parentheses"));
        check(
            "SET (selected (MessageNew (UID NOSUCH) MessageExpunge))",
            bad("invalid FETCH items in MessageNew"),
        );
        check(
            "SET (selected (MessageNew (RFC822) MessageExpunge))",
            bad("RFC822 and RFC822.TEXT would set \\Seen: use BODY.PEEK[] or BODY.PEEK[TEXT]"),
        );
        check("SET ((((((x))))))", bad("lists nested too deeply"));
        let many = "(personal NONE) ".repeat(MAX_EVENT_GROUPS + 1);
        check(&format!("SET {many}"), bad("too many event groups"));
    }

    #[test]
    fn unsupported_events_are_badevent_after_the_syntax_is_checked() {
        check(
            "SET (personal (AnnotationChange MailboxName))",
            Err(NotifyError::BadEvent("AnnotationChange".into())),
        );
        check(
            "SET (personal (ServerMetadataChange)) (selected (MessageNew))",
            bad("MessageNew and MessageExpunge go together"),
        );
    }

    #[test]
    fn filters_match_names() {
        let subscribed: BTreeSet<String> = ["Lists".to_string()].into_iter().collect();
        let subtree = Filter::Subtree(vec!["Work".into()]);
        assert!(subtree.matches("Work", &subscribed));
        assert!(subtree.matches("Work/2026", &subscribed));
        assert!(!subtree.matches("Workshop", &subscribed));
        assert!(Filter::Subscribed.matches("Lists", &subscribed));
        assert!(!Filter::Subscribed.matches("Work", &subscribed));
        assert!(Filter::Inboxes.matches("INBOX", &subscribed));
        assert!(!Filter::Inboxes.matches("Lists", &subscribed));
        assert!(!Filter::Selected.matches("INBOX", &subscribed));
    }
}
