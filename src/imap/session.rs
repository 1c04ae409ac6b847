//! The sans-IO IMAP session: bytes in, response bytes and an [`Action`] out.
//!
//! The session owns the protocol state ([`State`]), the input buffer and the framer. Store
//! calls are awaited inside [`Session::handle_input`], so the tokio driver only moves bytes,
//! upgrades to TLS and wakes an idling session; every protocol decision is made here, which
//! keeps the session testable as byte transcripts.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::auth::AuthMechanism;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::mailbox::Mailbox;
use imap_codec::CommandCodec;

use super::cache::{AuthCache, HeaderCache};
use super::condstore::Modifiers;
use super::config::ImapConfig;
use super::create_special_use::{strip_use, UseRequest};
use super::esearch::{strip_return, ReturnOptions};
use super::framing::{first_line, first_token, Frame, Framer};
use super::objectid::{FetchIds, StatusMailboxId};
use super::recent::RecentUids;
use super::response::{tagged, untagged};
use super::selected::Selected;
use super::sort::{strip_ordering, Ordering};
use super::status_size::{strip_size, StatusSize};
use crate::store::{AccountId, MailStore};

/// Longest AUTHENTICATE response or IDLE "DONE" line accepted.
const MAX_CONTINUATION_LINE_BYTES: usize = 8 * 1024;
/// Largest literal accepted before login (a username or password); a larger synchronizing
/// literal is refused with `NO [TOOBIG]` (no continuation request), a larger LITERAL+ one
/// closes the session with BYE.
pub const PREAUTH_MAX_LITERAL_BYTES: u32 = 4 * 1024;
/// An APPEND literal over this size is written to an anonymous temporary file while it
/// arrives instead of being held in memory.
pub const APPEND_SPILL_THRESHOLD_BYTES: u32 = 64 * 1024;
/// The input buffer's capacity is given back above this once it is empty.
const INPUT_KEEP_CAPACITY_BYTES: usize = 128 * 1024;
/// Client-given strings (usernames) are cut to this many bytes in log lines.
pub const MAX_LOGGED_CLIENT_STRING_BYTES: usize = 256;

/// `text` cut to at most [`MAX_LOGGED_CLIENT_STRING_BYTES`] (on a character boundary).
pub(super) fn log_capped(text: &str) -> &str {
    if text.len() <= MAX_LOGGED_CLIENT_STRING_BYTES {
        return text;
    }
    let mut end = MAX_LOGGED_CLIENT_STRING_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
/// A long response (FETCH over many messages) is handed to the driver in pieces of about
/// this size while the rest is being built, so the client reads and parses the first
/// messages while the server works on the next ones.
pub const OUTPUT_AHEAD_CHUNK_BYTES: usize = 16 * 1024;

/// Where a session may send response bytes ahead of the end of the command: the driver
/// writes them to the client in order, before whatever is left in `out` afterwards.
pub type OutputAhead = tokio::sync::mpsc::Sender<Vec<u8>>;

/// Hands `out` to the driver once it holds at least [`OUTPUT_AHEAD_CHUNK_BYTES`] (waiting
/// while the driver's queue is full), then yields so that the driver writes the piece at
/// once: the session and its writer share one task, and building from cached headers never
/// waits, so without the yield the first bytes would leave only when the queue is full.
/// Without a driver stream the bytes stay in `out`.
pub(super) async fn send_ahead(ahead: &Option<OutputAhead>, out: &mut Vec<u8>) {
    let Some(ahead) = ahead else {
        return;
    };
    if out.len() < OUTPUT_AHEAD_CHUNK_BYTES {
        return;
    }
    let chunk = std::mem::replace(out, Vec::with_capacity(2 * OUTPUT_AHEAD_CHUNK_BYTES));
    if let Err(returned) = ahead.send(chunk).await {
        // The driver stopped listening: keep the bytes in order in `out`.
        let mut chunk = returned.0;
        chunk.append(out);
        *out = chunk;
        return;
    }
    tokio::task::yield_now().await;
}

/// What the driver must do after feeding input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Keep reading.
    Continue,
    /// Write the output, then run the TLS handshake (the session has dropped any input that
    /// followed STARTTLS).
    StartTls,
    /// Write the output, then close the connection.
    Close,
    /// Write the output, then deflate both directions (COMPRESS=DEFLATE, RFC 4978; the
    /// session has dropped any input that followed the command).
    Compress,
}

/// RFC 3501 connection states.
pub enum State {
    NotAuthenticated,
    Authenticated {
        account: AccountId,
    },
    Selected {
        account: AccountId,
        mailbox: Box<Selected>,
    },
    Logout,
}

/// How the next input line is read.
enum Mode {
    Commands,
    /// Waiting for the base64 response of AUTHENTICATE PLAIN.
    AuthenticatePlain {
        tag: String,
    },
    /// In IDLE, waiting for DONE.
    Idle {
        tag: String,
    },
    /// Copying the bytes of a large APPEND literal to [`Spill::file`].
    Spilling,
}

/// A large APPEND literal on its way to a temporary file.
struct Spill {
    file: std::fs::File,
    /// The command's bytes before the literal, with `{0+}` in place of its announcement.
    prefix: Vec<u8>,
    remaining: u64,
}

/// What the session knows about its connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub peer: SocketAddr,
    /// TLS is active (implicit TLS or after STARTTLS).
    pub secure: bool,
    /// The listener is on a loopback address, where plaintext passwords are acceptable.
    pub loopback: bool,
}

pub struct Session {
    pub(super) state: State,
    mode: Mode,
    pub(super) store: MailStore,
    pub(super) config: Arc<ImapConfig>,
    pub(super) headers: Arc<HeaderCache>,
    logins: Arc<AuthCache>,
    pub(super) user: String,
    conn: ConnectionInfo,
    framer: Framer,
    /// Bytes received; `input[consumed..]` are not handled yet (consumed by moving the
    /// offset, compacted at the next read).
    input: Vec<u8>,
    consumed: usize,
    spill: Option<Spill>,
    /// The spilled literal of the command being run (an APPEND whose literal was `{0+}`).
    pub(super) spilled: Option<std::fs::File>,
    /// Where, in that command, the placeholder `{0+}` of the spilled literal puts its (empty)
    /// data: a client's own `{0+}` elsewhere in the command is not the spilled literal.
    spilled_at: Option<usize>,
    failed_auth: u32,
    client_name: Option<String>,
    /// Set by the driver while it feeds input: see [`send_ahead`].
    pub(super) output_ahead: Option<OutputAhead>,
    /// The UIDs of the selected mailbox that are `\Recent` in this session (reset by each
    /// SELECT/EXAMINE; meaningless in other states).
    pub(super) recent: RecentUids,
    /// The RETURN options of the running `SEARCH RETURN (...)` (ESEARCH), if it is one.
    pub(super) esearch: Option<ReturnOptions>,
    /// CONDSTORE is on (ENABLE, or a CONDSTORE enabling command, RFC 7162 3.1).
    pub(super) condstore: bool,
    /// QRESYNC is enabled (ENABLE QRESYNC).
    pub(super) qresync: bool,
    /// The CONDSTORE/QRESYNC parts of the running command (`condstore::strip`).
    pub(super) modifiers: Modifiers,
    /// The running command is a SORT or THREAD rewritten as a SEARCH (`sort::strip_ordering`).
    pub(super) ordering: Option<Ordering>,
    /// The running STATUS asked for SIZE (`status_size::strip_size`).
    pub(super) status_size: Option<StatusSize>,
    /// The running CREATE asked for a special use (`create_special_use::strip_use`).
    pub(super) create_use: Option<UseRequest>,
    /// The running FETCH asked for EMAILID/THREADID (`objectid::strip_fetch`).
    pub(super) fetch_ids: FetchIds,
    /// The running STATUS asked for MAILBOXID (`objectid::strip_status`).
    pub(super) status_mailboxid: Option<StatusMailboxId>,
    /// The running FETCH asked for SAVEDATE (`savedate::strip_fetch`).
    pub(super) fetch_savedate: bool,
    /// COMPRESS DEFLATE was accepted on this connection.
    compressing: bool,
    /// The BINARY items of the running FETCH (`binary::rewrite_fetch`).
    pub(super) binary: super::binary::BinaryItems,
    /// NOTIFY SET in force (RFC 5465), with what is pending and what the client was told.
    pub(super) notify: Option<Box<super::notify::Notify>>,
    /// Counts NOTIFY SET commands (the driver restarts its change feeds on a new one).
    pub(super) notify_generation: u64,
    /// `ENABLE IMAP4rev2` was accepted (`rev2`).
    pub(super) rev2: bool,
}

impl Session {
    pub fn new(
        store: MailStore,
        config: Arc<ImapConfig>,
        headers: Arc<HeaderCache>,
        logins: Arc<AuthCache>,
        conn: ConnectionInfo,
    ) -> Session {
        let framer = Framer::new(config.max_line_length_bytes, config.max_literal_size_bytes);
        Session {
            state: State::NotAuthenticated,
            mode: Mode::Commands,
            store,
            config,
            headers,
            logins,
            user: String::new(),
            conn,
            framer,
            input: Vec::new(),
            consumed: 0,
            spill: None,
            spilled: None,
            spilled_at: None,
            failed_auth: 0,
            client_name: None,
            output_ahead: None,
            recent: RecentUids::default(),
            esearch: None,
            condstore: false,
            qresync: false,
            modifiers: Modifiers::default(),
            ordering: None,
            status_size: None,
            create_use: None,
            fetch_ids: FetchIds::default(),
            status_mailboxid: None,
            fetch_savedate: false,
            compressing: false,
            binary: Vec::new(),
            notify: None,
            notify_generation: 0,
            rev2: false,
        }
    }

    /// Lets long responses go out in pieces through `ahead` (the driver drains it while
    /// [`Session::handle_input`] runs); `None` keeps every response in `out`.
    pub fn set_output_ahead(&mut self, ahead: Option<OutputAhead>) {
        self.output_ahead = ahead;
    }

    /// The server greeting.
    pub fn greeting(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"* OK [CAPABILITY ");
        out.extend_from_slice(self.capabilities().as_bytes());
        out.extend_from_slice(b"] kermail ready\r\n");
    }

    pub fn is_authenticated(&self) -> bool {
        matches!(
            self.state,
            State::Authenticated { .. } | State::Selected { .. }
        )
    }

    pub fn is_idling(&self) -> bool {
        matches!(self.mode, Mode::Idle { .. })
    }

    /// Between commands: no partial command line, literal or continuation is pending.
    pub(super) fn waiting_for_command(&self) -> bool {
        matches!(self.mode, Mode::Commands) && self.pending().is_empty()
    }

    /// Store changes matter now: the session idles, or NOTIFY is on.
    pub fn wants_changes(&self) -> bool {
        self.is_idling() || self.notify.is_some()
    }

    /// The selected mailbox, for the driver to filter change notifications.
    pub fn selected_mailbox(&self) -> Option<(AccountId, crate::store::MailboxId)> {
        match &self.state {
            // ACL: the changes that matter are those of the mailbox's owner.
            State::Selected { mailbox, .. } => Some((mailbox.owner, mailbox.id)),
            _ => None,
        }
    }

    /// The TLS handshake after STARTTLS succeeded.
    pub fn tls_established(&mut self) {
        self.conn.secure = true;
        self.input.clear();
        self.consumed = 0;
    }

    /// The server is shutting down.
    pub fn shutdown(&mut self, out: &mut Vec<u8>) {
        untagged(out, "BYE server shutting down");
        self.state = State::Logout;
    }

    /// The client was silent for too long.
    pub fn timed_out(&mut self, out: &mut Vec<u8>) {
        untagged(out, "BYE autologout; idle for too long");
        self.state = State::Logout;
    }

    /// A change to the selected mailbox was applied while the client idles (or the change
    /// feed lagged): report it.
    pub fn idle_wakeup(&mut self, out: &mut Vec<u8>) {
        // ACL: a session whose r right on the mailbox was revoked hears of no more changes.
        if !self.selected_rights().contains(crate::store::Rights::READ) {
            return;
        }
        if let State::Selected { mailbox, .. } = &mut self.state {
            let owner = mailbox.owner;
            mailbox.refresh(&self.store, owner, true, &[], out);
        }
    }

    fn plaintext_refused(&self) -> bool {
        !self.conn.secure && !self.conn.loopback
    }

    /// Answers LOGIN or AUTHENTICATE that may not proceed (already logged in, or a password
    /// before TLS on a non-loopback listener) and says whether it did.
    fn refuse_login(&self, tag: &str, out: &mut Vec<u8>) -> bool {
        if self.is_authenticated() {
            tagged(out, tag, "BAD", None, "already logged in");
        } else if self.plaintext_refused() {
            tagged(
                out,
                tag,
                "NO",
                Some("PRIVACYREQUIRED"),
                "use STARTTLS first",
            );
        } else {
            return false;
        }
        true
    }

    pub(super) fn capabilities(&self) -> String {
        let mut caps = String::from("IMAP4rev1 IMAP4rev2 LITERAL+ SASL-IR ID ENABLE IDLE NAMESPACE UIDPLUS MOVE UNSELECT CHILDREN SPECIAL-USE ESEARCH CONDSTORE QRESYNC SORT SORT=DISPLAY THREAD=ORDEREDSUBJECT THREAD=REFERENCES STATUS=SIZE WITHIN CREATE-SPECIAL-USE MULTIAPPEND LIST-EXTENDED LIST-STATUS OBJECTID BINARY CATENATE SAVEDATE NOTIFY SEARCHRES CONTEXT=SEARCH ESORT");
        if self.is_authenticated() {
            caps.push_str(" QUOTA QUOTA=RES-STORAGE QUOTA=RES-MESSAGE");
            // ACL (RFC 4314, `acl.rs`).
            caps.push_str(" ACL RIGHTS=texk");
            if !self.compressing {
                caps.push_str(" COMPRESS=DEFLATE");
            }
        }
        if !self.is_authenticated() {
            if !self.conn.secure {
                caps.push_str(" STARTTLS");
            }
            if self.plaintext_refused() {
                caps.push_str(" LOGINDISABLED");
            } else {
                caps.push_str(" AUTH=PLAIN");
            }
        }
        caps
    }

    /// The bytes not handled yet.
    fn pending(&self) -> &[u8] {
        &self.input[self.consumed..]
    }

    /// Literal limits for the next frame: small before login; a large APPEND literal after
    /// login goes to a spill file.
    fn frame_limits(&self) -> (u32, Option<u32>) {
        if !self.is_authenticated() {
            return (
                PREAUTH_MAX_LITERAL_BYTES.min(self.config.max_literal_size_bytes),
                None,
            );
        }
        let pending = self.pending();
        let head = &pending[..pending.len().min(64)];
        let mut words = head.splitn(3, |&b| b == b' ');
        let is_append = words.next().is_some()
            && words
                .next()
                .is_some_and(|verb| verb.eq_ignore_ascii_case(b"APPEND"));
        let spill = (is_append && self.spilled.is_none()).then_some(APPEND_SPILL_THRESHOLD_BYTES);
        (self.config.max_literal_size_bytes, spill)
    }

    /// Feeds bytes read from the client; appends responses to `out`.
    pub async fn handle_input(&mut self, data: &[u8], out: &mut Vec<u8>) -> Action {
        // Compact: drop what was consumed when it is at least half the buffer, so each byte
        // is moved at most about once.
        if self.consumed == self.input.len() {
            self.input.clear();
            self.consumed = 0;
            if self.input.capacity() > INPUT_KEEP_CAPACITY_BYTES {
                self.input.shrink_to(INPUT_KEEP_CAPACITY_BYTES);
            }
        } else if self.consumed > 0 && self.consumed >= self.input.len() / 2 {
            self.input.drain(..self.consumed);
            self.consumed = 0;
        }
        self.input.extend_from_slice(data);
        loop {
            if matches!(self.state, State::Logout) {
                return Action::Close;
            }
            match &self.mode {
                Mode::Idle { tag } => {
                    let tag = tag.clone();
                    match first_line(self.pending(), MAX_CONTINUATION_LINE_BYTES) {
                        Err(()) => return self.fatal(out, "line too long"),
                        Ok(None) => return Action::Continue,
                        Ok(Some((line, consumed))) => {
                            let done = line.eq_ignore_ascii_case(b"DONE");
                            self.consumed += consumed;
                            self.mode = Mode::Commands;
                            if done {
                                let mark = out.len();
                                self.idle_wakeup(out);
                                self.claim_new_recent(out).await;
                                tagged(out, &tag, "OK", None, "IDLE terminated");
                                self.search_updates_after_command(mark, out).await;
                            } else {
                                tagged(out, &tag, "BAD", None, "expected DONE");
                            }
                        }
                    }
                }
                Mode::AuthenticatePlain { tag } => {
                    let tag = tag.clone();
                    match first_line(self.pending(), MAX_CONTINUATION_LINE_BYTES) {
                        Err(()) => return self.fatal(out, "line too long"),
                        Ok(None) => return Action::Continue,
                        Ok(Some((line, consumed))) => {
                            let cancelled = line == b"*";
                            let decoded = base64::engine::general_purpose::STANDARD.decode(line);
                            self.consumed += consumed;
                            self.mode = Mode::Commands;
                            if cancelled {
                                tagged(out, &tag, "BAD", None, "AUTHENTICATE cancelled");
                                continue;
                            }
                            match decoded {
                                Ok(response) => {
                                    let action =
                                        self.authenticate_plain(&tag, &response, out).await;
                                    if action != Action::Continue {
                                        return action;
                                    }
                                }
                                Err(_) => tagged(out, &tag, "BAD", None, "invalid base64"),
                            }
                        }
                    }
                }
                Mode::Spilling => {
                    if let Some(action) = self.spill_input(out) {
                        return action;
                    }
                }
                Mode::Commands => {
                    let (max_literal, spill) = self.frame_limits();
                    self.framer.set_limits(max_literal, spill);
                    match self.framer.next(&self.input[self.consumed..]) {
                        Frame::Incomplete => return Action::Continue,
                        Frame::ContinuationNeeded => {
                            out.extend_from_slice(b"+ Ready for literal data\r\n")
                        }
                        Frame::Fatal(reason) => return self.fatal(out, reason),
                        Frame::LiteralTooBig { tag, len } => {
                            self.consumed += len;
                            tagged(out, &tag, "NO", Some("TOOBIG"), "literal too large");
                        }
                        Frame::Spill {
                            len,
                            length,
                            synchronizing,
                        } => {
                            let mut prefix = self.pending()[..len].to_vec();
                            self.consumed += len;
                            if let Some(open) = prefix.iter().rposition(|&b| b == b'{') {
                                prefix.truncate(open);
                            }
                            prefix.extend_from_slice(b"{0+}\r\n");
                            match tempfile::tempfile() {
                                Ok(file) => {
                                    self.spill = Some(Spill {
                                        file,
                                        prefix,
                                        remaining: u64::from(length),
                                    });
                                    self.mode = Mode::Spilling;
                                    if synchronizing {
                                        out.extend_from_slice(b"+ Ready for literal data\r\n");
                                    }
                                }
                                Err(error) => {
                                    tracing::warn!(%error, "cannot create an APPEND spill file");
                                    if !synchronizing {
                                        return self.fatal(out, "cannot take the literal now");
                                    }
                                    let tag = first_token(&prefix);
                                    tagged(out, &tag, "NO", Some("SERVERBUG"), "try again later");
                                }
                            }
                        }
                        Frame::Command { len } => {
                            let start = self.consumed;
                            self.consumed += len;
                            let command = std::mem::take(&mut self.input);
                            let mark = out.len();
                            let action = self.command(&command[start..start + len], out).await;
                            self.search_updates_after_command(mark, out).await;
                            self.input = command;
                            self.spilled = None;
                            self.spilled_at = None;
                            match action {
                                Action::Continue => {}
                                Action::StartTls => {
                                    // Anything pipelined after STARTTLS was sent in plaintext
                                    // and must not be taken as coming over TLS.
                                    self.input.clear();
                                    self.consumed = 0;
                                    return action;
                                }
                                Action::Close => return action,
                                Action::Compress => {
                                    // The client waits for the answer before it compresses
                                    // (RFC 4978 3): anything after the command is dropped.
                                    self.input.clear();
                                    self.consumed = 0;
                                    return action;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Copies pending input into the spill file; when the literal is complete, puts the
    /// command's prefix (with an empty literal) back in front of the rest of the input.
    /// `Some` when the session must stop here.
    fn spill_input(&mut self, out: &mut Vec<u8>) -> Option<Action> {
        use std::io::Write as _;
        let Some(spill) = self.spill.as_mut() else {
            self.mode = Mode::Commands;
            return None;
        };
        let available = self.input.len() - self.consumed;
        let n = (available as u64).min(spill.remaining) as usize;
        if n == 0 {
            return Some(Action::Continue);
        }
        if let Err(error) = spill
            .file
            .write_all(&self.input[self.consumed..self.consumed + n])
        {
            tracing::warn!(%error, "cannot write an APPEND spill file");
            self.spill = None;
            return Some(self.fatal(out, "cannot take the literal now"));
        }
        self.consumed += n;
        spill.remaining -= n as u64;
        if spill.remaining > 0 {
            return Some(Action::Continue);
        }
        let Spill { file, prefix, .. } = self.spill.take()?;
        self.spilled_at = Some(prefix.len());
        let mut input = prefix;
        input.extend_from_slice(self.pending());
        self.input = input;
        self.consumed = 0;
        self.spilled = Some(file);
        self.mode = Mode::Commands;
        None
    }

    fn fatal(&mut self, out: &mut Vec<u8>, reason: &str) -> Action {
        tracing::info!(reason, "closing session on bad input");
        untagged(out, &format!("BYE {reason}"));
        self.state = State::Logout;
        Action::Close
    }

    /// Runs a command the session makes itself (NOTIFY's FETCH for new messages).
    pub(super) async fn run_internal(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Action {
        self.command(bytes, out).await
    }

    /// Runs one complete command (literals included).
    async fn command(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Action {
        let tag = first_token(bytes);
        // SORT and THREAD: the sort criteria (or algorithm) and the charset come out, the
        // rest is a SEARCH whose matches are then ordered.
        // The verb (after UID, if any) decides which of the rewrites below may apply, so that
        // other commands pay one short scan for all of them.
        let verb = if bytes.len() >= MIN_REWRITTEN_COMMAND_BYTES {
            command_verb(bytes).to_ascii_uppercase()
        } else {
            Vec::new()
        };
        // MULTIAPPEND: an APPEND of several messages is cut into one APPEND per message.
        // (Short lines have no verb: one test keeps them cheap.)
        let has_verb = !verb.is_empty();
        if has_verb && verb.as_slice() == b"APPEND" {
            // Also an APPEND of literal8 (BINARY) or CATENATE data, which imap-codec lacks.
            let spilled_at = self.spilled.as_ref().and(self.spilled_at);
            match super::multiappend::split(bytes, spilled_at) {
                Ok(None) => {}
                Ok(Some(parts)) => {
                    if self.is_authenticated() {
                        // Boxed: its state stays out of every other command's future.
                        Box::pin(self.multiappend(&tag, parts, out)).await;
                    } else {
                        tagged(out, &tag, "BAD", None, "log in first");
                    }
                    return Action::Continue;
                }
                Err(reason) => {
                    tagged(out, &tag, "BAD", None, reason);
                    return Action::Continue;
                }
            }
        }
        // NOTIFY (RFC 5465): parsed by `notify`, before any rewrite could touch its lists.
        if has_verb && verb.as_slice() == b"NOTIFY" {
            let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let args = line.splitn(3, |&b| b == b' ').nth(2).unwrap_or_default();
            self.notify_command(&tag, args, out);
            return Action::Continue;
        }
        // LIST-EXTENDED / LIST-STATUS: answered here, a plain LIST is left to imap-codec.
        if has_verb && verb.as_slice() == b"LIST" {
            match super::list_extended::parse(bytes) {
                Ok(None) => {}
                Ok(Some(request)) => {
                    if self.is_authenticated() {
                        self.list_extended(&tag, request, out);
                    } else {
                        tagged(out, &tag, "BAD", None, "log in first");
                    }
                    return Action::Continue;
                }
                Err(reason) => {
                    tagged(out, &tag, "BAD", None, reason);
                    return Action::Continue;
                }
            }
        }
        // ESORT (RFC 5267 3): the RETURN clause of a SORT comes out before its criteria.
        let rewritten_esort: Vec<u8>;
        let mut esort = None;
        let bytes = match verb.as_slice() {
            b"SORT" => match super::esearch::strip_return_of(bytes, b"SORT") {
                Ok(None) => bytes,
                Ok(Some((command, options))) => {
                    if options.save || options.update {
                        tagged(out, &tag, "BAD", None, "SORT takes no SAVE or UPDATE here");
                        return Action::Continue;
                    }
                    rewritten_esort = command;
                    esort = Some(options);
                    &rewritten_esort
                }
                Err(reason) => {
                    tagged(out, &tag, "BAD", None, reason);
                    return Action::Continue;
                }
            },
            _ => bytes,
        };
        let rewritten_ordering: Vec<u8>;
        self.ordering = None;
        let ordering = match verb.as_slice() {
            b"SORT" | b"THREAD" => strip_ordering(bytes),
            _ => Ok(None),
        };
        let bytes = match ordering {
            Ok(None) => bytes,
            Ok(Some((command, ordering))) => {
                rewritten_ordering = command;
                self.ordering = Some(ordering);
                &rewritten_ordering
            }
            Err(reason) => {
                tagged(out, &tag, "BAD", None, reason);
                return Action::Continue;
            }
        };
        // OBJECTID: the EMAILID/THREADID FETCH items and the MAILBOXID STATUS item come out.
        let rewritten_ids: Vec<u8>;
        self.fetch_ids = FetchIds {
            email_id: false,
            thread_id: false,
        };
        self.status_mailboxid = None;
        let bytes = match verb.as_slice() {
            _ if !has_verb => bytes,
            b"FETCH" => match super::objectid::strip_fetch(bytes) {
                Some((command, ids)) => {
                    rewritten_ids = command;
                    self.fetch_ids = ids;
                    &rewritten_ids
                }
                None => bytes,
            },
            b"STATUS" => match super::objectid::strip_status(bytes) {
                Some((command, only)) => {
                    rewritten_ids = command;
                    self.status_mailboxid = Some(only);
                    &rewritten_ids
                }
                None => bytes,
            },
            _ => bytes,
        };
        // SAVEDATE: the FETCH item comes out, the search keys are rewritten.
        let rewritten_savedate: Vec<u8>;
        self.fetch_savedate = false;
        let savedate = match verb.as_slice() {
            b"FETCH" => Ok(super::savedate::strip_fetch(bytes)),
            b"SEARCH" | b"SORT" | b"THREAD" => super::savedate::rewrite_search(bytes),
            _ => Ok(None),
        };
        let bytes = match savedate {
            Ok(None) => bytes,
            Ok(Some(command)) => {
                self.fetch_savedate = verb.as_slice() == b"FETCH";
                rewritten_savedate = command;
                &rewritten_savedate
            }
            Err(reason) => {
                tagged(out, &tag, "BAD", None, reason);
                return Action::Continue;
            }
        };
        // STATUS=SIZE: the SIZE item comes out.
        let rewritten_status: Vec<u8>;
        self.status_size = None;
        let size = match verb.as_slice() {
            b"STATUS" => strip_size(bytes),
            _ => None,
        };
        let bytes = match size {
            None => bytes,
            Some((command, size)) => {
                rewritten_status = command;
                self.status_size = Some(size);
                &rewritten_status
            }
        };
        // CREATE-SPECIAL-USE: the USE parameter list comes out.
        let rewritten_create: Vec<u8>;
        self.create_use = None;
        let create_use = match verb.as_slice() {
            b"CREATE" => strip_use(bytes),
            _ => None,
        };
        let bytes = match create_use {
            None => bytes,
            Some((command, request)) => {
                rewritten_create = command;
                self.create_use = Some(request);
                &rewritten_create
            }
        };
        // ESEARCH: the RETURN clause comes out, the rest is an ordinary SEARCH.
        let rewritten: Vec<u8>;
        self.esearch = esort;
        let bytes = match strip_return(bytes) {
            Ok(None) => bytes,
            Ok(Some((command, options))) => {
                rewritten = command;
                self.esearch = Some(options);
                &rewritten
            }
            Err(reason) => {
                tagged(out, &tag, "BAD", None, reason);
                return Action::Continue;
            }
        };
        // SEARCHRES: `$` stands for the saved result (after the RETURN clause is out).
        let rewritten_dollar: Vec<u8>;
        let bytes = match self.substitute_saved(bytes) {
            Some(command) => {
                rewritten_dollar = command;
                &rewritten_dollar
            }
            None => bytes,
        };
        // CONDSTORE/QRESYNC: modifiers and the MODSEQ item and key come out too.
        let rewritten_modseq: Vec<u8>;
        self.modifiers = Modifiers::default();
        let bytes = match super::condstore::strip(bytes) {
            Ok(None) => bytes,
            Ok(Some((command, modifiers))) => {
                if !self.is_authenticated() {
                    tagged(out, &tag, "BAD", None, "log in first");
                    return Action::Continue;
                }
                if (modifiers.qresync.is_some() || modifiers.vanished) && !self.qresync {
                    tagged(out, &tag, "BAD", None, "ENABLE QRESYNC first");
                    return Action::Continue;
                }
                if modifiers.enables_condstore() {
                    self.enable_condstore(false);
                }
                rewritten_modseq = command;
                self.modifiers = modifiers;
                &rewritten_modseq
            }
            Err(reason) => {
                tagged(out, &tag, "BAD", None, reason);
                return Action::Continue;
            }
        };
        // BINARY: each BINARY item becomes its BODY twin, answered decoded by the FETCH loop.
        // Last of the rewrites, so that the positions it records are those imap-codec sees.
        let rewritten_binary: Vec<u8>;
        self.binary.clear();
        let bytes = match verb.as_slice() {
            b"FETCH" => match super::binary::rewrite_fetch(bytes) {
                Ok(None) => bytes,
                Ok(Some((command, items))) => {
                    rewritten_binary = command;
                    self.binary = items;
                    &rewritten_binary
                }
                Err(reason) => {
                    tagged(out, &tag, "BAD", None, reason);
                    return Action::Continue;
                }
            },
            _ => bytes,
        };
        // IMAP4rev2: UTF-8 in quoted strings, as literals for imap-codec.
        let rewritten_utf8: Vec<u8>;
        let bytes = match self
            .rev2
            .then(|| super::rev2::utf8_quoted_as_literals(bytes))
        {
            Some(Some(command)) => {
                rewritten_utf8 = command;
                &rewritten_utf8
            }
            _ => bytes,
        };
        if let Some(action) = self.extension_command(&tag, bytes, out).await {
            return action;
        }
        if self.esearch.is_some_and(|options| options.update) {
            self.keep_context_command(bytes);
        }
        let command = match CommandCodec::default().decode(bytes) {
            Ok((_, command)) => command,
            Err(_) => {
                self.saved_search_failed();
                let valid_tag = !tag.is_empty()
                    && tag
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b"(){%*\"\\+".contains(&b));
                let tag = if valid_tag { tag.as_str() } else { "*" };
                tagged(out, tag, "BAD", None, "syntax error in command");
                return Action::Continue;
            }
        };
        let tag = command.tag.inner().to_owned();
        match command.body {
            CommandBody::Capability => {
                untagged(out, &format!("CAPABILITY {}", self.capabilities()));
                tagged(out, &tag, "OK", None, "CAPABILITY completed");
            }
            CommandBody::Check if !matches!(self.state, State::Selected { .. }) => {
                tagged(out, &tag, "BAD", None, "no mailbox selected");
            }
            CommandBody::Noop | CommandBody::Check => {
                // ACL: no news of a mailbox whose r right was revoked.
                let readable = self.selected_rights().contains(crate::store::Rights::READ);
                if let (true, State::Selected { mailbox, .. }) = (readable, &mut self.state) {
                    let owner = mailbox.owner;
                    mailbox.refresh(&self.store, owner, true, &[], out);
                }
                self.claim_new_recent(out).await;
                tagged(out, &tag, "OK", None, "completed");
            }
            CommandBody::Logout => {
                untagged(out, "BYE logging out");
                tagged(out, &tag, "OK", None, "LOGOUT completed");
                self.state = State::Logout;
                return Action::Close;
            }
            CommandBody::StartTLS => {
                if self.conn.secure {
                    tagged(out, &tag, "BAD", None, "TLS is already active");
                } else if self.is_authenticated() {
                    tagged(
                        out,
                        &tag,
                        "BAD",
                        None,
                        "STARTTLS is only allowed before login",
                    );
                } else {
                    tagged(out, &tag, "OK", None, "begin TLS negotiation now");
                    return Action::StartTls;
                }
            }
            CommandBody::Login { username, password } => {
                if !self.refuse_login(&tag, out) {
                    let user = String::from_utf8_lossy(username.as_ref()).into_owned();
                    let password =
                        String::from_utf8_lossy(password.declassify().as_ref()).into_owned();
                    return self.login(&tag, &user, &password, "LOGIN", out).await;
                }
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                if self.refuse_login(&tag, out) {
                    // Answered by refuse_login.
                } else if mechanism != AuthMechanism::Plain {
                    tagged(out, &tag, "NO", Some("CANNOT"), "unsupported mechanism");
                } else if let Some(response) = initial_response {
                    let response = response.declassify().to_vec();
                    return self.authenticate_plain(&tag, &response, out).await;
                } else {
                    out.extend_from_slice(b"+ \r\n");
                    self.mode = Mode::AuthenticatePlain { tag };
                }
            }
            CommandBody::Enable { capabilities } => {
                if self.is_authenticated() {
                    let mut enabled = String::from("ENABLED");
                    for capability in capabilities.as_ref() {
                        let name = capability.to_string().to_ascii_uppercase();
                        if name == "CONDSTORE" && !self.condstore {
                            self.enable_condstore(false);
                            enabled.push_str(" CONDSTORE");
                        } else if name == "QRESYNC" && !self.qresync {
                            self.enable_condstore(true);
                            enabled.push_str(" QRESYNC");
                        } else if name == "IMAP4REV2" && self.enable_rev2() {
                            enabled.push_str(" IMAP4rev2");
                        }
                    }
                    untagged(out, &enabled);
                    tagged(out, &tag, "OK", None, "ENABLE completed");
                } else {
                    tagged(out, &tag, "BAD", None, "log in first");
                }
            }
            CommandBody::Idle => {
                if self.is_authenticated() {
                    out.extend_from_slice(b"+ idling\r\n");
                    self.idle_wakeup(out);
                    self.mode = Mode::Idle { tag };
                } else {
                    tagged(out, &tag, "BAD", None, "log in first");
                }
            }
            body => {
                if !self.is_authenticated() {
                    tagged(out, &tag, "BAD", None, "log in first");
                } else {
                    self.authenticated_command(&tag, body, out).await;
                }
            }
        }
        Action::Continue
    }

    /// ID, NAMESPACE, UID EXPUNGE and COMPRESS, which imap-codec 1.0 does not parse.
    async fn extension_command(
        &mut self,
        tag: &str,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<Action> {
        let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut words = line.splitn(3, |&b| b == b' ');
        let _tag = words.next()?;
        let verb = words.next()?;
        let rest = words.next();
        if verb.eq_ignore_ascii_case(b"ID") {
            if let Some(params) = rest {
                self.client_name = client_name(params);
            }
            untagged(out, "ID (\"name\" \"kermail\" \"vendor\" \"kermail\")");
            tagged(out, tag, "OK", None, "ID completed");
            return Some(Action::Continue);
        }
        if verb.eq_ignore_ascii_case(b"COMPRESS") {
            if !self.is_authenticated() {
                tagged(out, tag, "BAD", None, "log in first");
            } else if self.compressing {
                tagged(
                    out,
                    tag,
                    "NO",
                    Some("COMPRESSIONACTIVE"),
                    "DEFLATE is already active",
                );
            } else if !rest.is_some_and(|r| r.eq_ignore_ascii_case(b"DEFLATE")) {
                tagged(out, tag, "BAD", None, "only COMPRESS DEFLATE is supported");
            } else {
                self.compressing = true;
                tagged(out, tag, "OK", None, "DEFLATE active");
                return Some(Action::Compress);
            }
            return Some(Action::Continue);
        }
        if verb.eq_ignore_ascii_case(b"NOTIFY") {
            self.notify_command(tag, rest.unwrap_or_default(), out);
            return Some(Action::Continue);
        }
        if verb.eq_ignore_ascii_case(b"CANCELUPDATE") {
            self.cancel_update(tag, rest, out);
            return Some(Action::Continue);
        }
        if verb.eq_ignore_ascii_case(b"NAMESPACE") && rest.is_none() {
            if self.is_authenticated() {
                // ACL: other accounts' shared mailboxes are under "Other Users/".
                untagged(
                    out,
                    "NAMESPACE ((\"\" \"/\")) ((\"Other Users/\" \"/\")) NIL",
                );
                tagged(out, tag, "OK", None, "NAMESPACE completed");
            } else {
                tagged(out, tag, "BAD", None, "log in first");
            }
            return Some(Action::Continue);
        }
        // ACL (RFC 4314): SETACL, DELETEACL, GETACL, LISTRIGHTS, MYRIGHTS (`acl.rs`).
        if super::acl::is_acl_verb(verb) {
            if self.is_authenticated() {
                self.acl_command(tag, verb, rest.unwrap_or_default(), out)
                    .await;
            } else {
                tagged(out, tag, "BAD", None, "log in first");
            }
            return Some(Action::Continue);
        }
        if verb.eq_ignore_ascii_case(b"UID") {
            let rest = rest?;
            let mut words = rest.splitn(2, |&b| b == b' ');
            if !words.next()?.eq_ignore_ascii_case(b"EXPUNGE") {
                return None;
            }
            let set = std::str::from_utf8(words.next().unwrap_or_default())
                .ok()
                .and_then(|s| {
                    s.parse::<imap_codec::imap_types::sequence::SequenceSet>()
                        .ok()
                });
            match set {
                None => tagged(out, tag, "BAD", None, "UID EXPUNGE needs a UID set"),
                Some(set) => self.expunge(tag, Some(&set), out).await,
            }
            return Some(Action::Continue);
        }
        None
    }

    async fn authenticate_plain(
        &mut self,
        tag: &str,
        response: &[u8],
        out: &mut Vec<u8>,
    ) -> Action {
        let mut parts = response.split(|&b| b == 0);
        let (Some(authzid), Some(authcid), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            tagged(out, tag, "BAD", None, "malformed PLAIN response");
            return Action::Continue;
        };
        let user = String::from_utf8_lossy(authcid).into_owned();
        if !authzid.is_empty() && authzid != authcid {
            return self.login_failed(tag, &user, "AUTHENTICATE", "NO", out);
        }
        let password = String::from_utf8_lossy(password).into_owned();
        self.login(tag, &user, &password, "AUTHENTICATE", out).await
    }

    async fn login(
        &mut self,
        tag: &str,
        user: &str,
        password: &str,
        method: &str,
        out: &mut Vec<u8>,
    ) -> Action {
        let cached = self.logins.get(user, password).filter(|&account| {
            // The account may have been removed since.
            self.store
                .account_address(account)
                .is_some_and(|address| address.eq_ignore_ascii_case(user))
        });
        let verified = match cached {
            Some(account) => Some(account),
            // Throttled (too many recent failures): answered like a failed login.
            None => (self.store)
                .authenticate_from(self.conn.peer.ip(), user, password)
                .await
                .unwrap_or(None),
        };
        match verified {
            Some(account) => {
                if cached.is_none() {
                    self.logins.insert(user, password, account);
                }
                tracing::info!(
                    peer = %self.conn.peer,
                    client = self.client_name.as_deref().unwrap_or("-"),
                    user = log_capped(user),
                    method,
                    tls = self.conn.secure,
                    outcome = "ok",
                    cached = cached.is_some(),
                    "imap login"
                );
                self.state = State::Authenticated { account };
                self.user = user.to_owned();
                let code = format!("CAPABILITY {}", self.capabilities());
                tagged(out, tag, "OK", Some(&code), "logged in");
                Action::Continue
            }
            None => self.login_failed(tag, user, method, "NO", out),
        }
    }

    fn login_failed(
        &mut self,
        tag: &str,
        user: &str,
        method: &str,
        status: &str,
        out: &mut Vec<u8>,
    ) -> Action {
        self.failed_auth += 1;
        tracing::info!(
            peer = %self.conn.peer,
            client = self.client_name.as_deref().unwrap_or("-"),
            user = log_capped(user),
            method,
            tls = self.conn.secure,
            outcome = "failed",
            "imap login"
        );
        tagged(
            out,
            tag,
            status,
            Some("AUTHENTICATIONFAILED"),
            "invalid credentials",
        );
        if self.failed_auth >= self.config.max_failed_auth_per_session {
            untagged(out, "BYE too many failed login attempts");
            self.state = State::Logout;
            return Action::Close;
        }
        Action::Continue
    }

    /// Turns CONDSTORE (and QRESYNC with `qresync`) on for the rest of the session.
    pub(super) fn enable_condstore(&mut self, qresync: bool) {
        self.condstore = true;
        self.qresync |= qresync;
        if let State::Selected { mailbox, .. } = &mut self.state {
            mailbox.condstore = true;
            mailbox.qresync = self.qresync;
        }
    }

    pub(super) fn account(&self) -> Option<AccountId> {
        match &self.state {
            State::Authenticated { account } | State::Selected { account, .. } => Some(*account),
            _ => None,
        }
    }
}

/// The shortest command that a rewrite or an extension parsed here may apply to
/// (`a LIST "" (%)\r\n`): shorter lines (pipelined junk) skip looking for a verb.
const MIN_REWRITTEN_COMMAND_BYTES: usize = 12;

/// The command's verb, after `UID` when it is one (at most 16 bytes; empty when the line
/// has no verb).
fn command_verb(bytes: &[u8]) -> &[u8] {
    let word = |from: usize| -> &[u8] {
        let rest = bytes.get(from..).unwrap_or_default();
        let len = rest
            .iter()
            .take(17)
            .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
            .unwrap_or(rest.len().min(17));
        &rest[..len]
    };
    let Some(space) = bytes.iter().take(65).position(|&b| b == b' ') else {
        return &[];
    };
    let verb = word(space + 1);
    if verb.eq_ignore_ascii_case(b"UID") {
        return word(space + 1 + verb.len() + 1);
    }
    verb
}

/// The client's "name" from ID parameters, for login log lines.
fn client_name(params: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(params);
    let lower = text.to_ascii_lowercase();
    let at = lower.find("\"name\"")?;
    let rest = &text[at + 6..];
    let start = rest.find('"')? + 1;
    let end = start + rest[start..].find('"')?;
    let name: String = rest[start..end]
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect();
    Some(name)
}

/// The mailbox name of a command argument ("INBOX" for any spelling of it).
pub(super) fn mailbox_name(mailbox: &Mailbox<'_>) -> Option<String> {
    match mailbox {
        Mailbox::Inbox => Some("INBOX".to_owned()),
        Mailbox::Other(other) => {
            let name = std::str::from_utf8(other.inner().as_ref()).ok()?;
            Some(name.trim_end_matches('/').to_owned())
        }
    }
}
