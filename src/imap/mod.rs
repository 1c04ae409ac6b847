//! IMAP server (IMAP4rev1 with IDLE, UIDPLUS, MOVE, LITERAL+, SASL-IR, SPECIAL-USE, NAMESPACE,
//! ID, ENABLE, UNSELECT, CHILDREN, QUOTA, ESEARCH, CONDSTORE, QRESYNC, SORT, SORT=DISPLAY,
//! THREAD=ORDEREDSUBJECT, THREAD=REFERENCES, STATUS=SIZE, WITHIN, CREATE-SPECIAL-USE,
//! MULTIAPPEND, LIST-EXTENDED, LIST-STATUS, OBJECTID, BINARY, CATENATE, COMPRESS=DEFLATE, NOTIFY,
//! SAVEDATE, ACL, SEARCHRES, CONTEXT=SEARCH, ESORT, IMAP4rev2).
//!
//! Code map:
//! - [`config`]: the `[imap]` section ([`ImapConfig`]).
//! - `framing`: splits the byte stream into complete commands (literals, limits).
//! - `session`: the sans-IO [`Session`]: state, authentication, command dispatch.
//! - `mailboxes`, `messages`: the command families (mailbox commands; message commands).
//! - `quota`: RFC 9208 GETQUOTAROOT, GETQUOTA, SETQUOTA (refused).
//! - `esearch`: RFC 4731 `SEARCH RETURN (MIN MAX COUNT ALL)` (the RETURN clause is taken out
//!   before imap-codec decodes the rest) and `* ESEARCH`.
//! - `context_search`: RFC 5267 CONTEXT=SEARCH: `RETURN (UPDATE)` contexts, their
//!   ADDTO/REMOVEFROM updates, CANCELUPDATE.
//! - `rev2`: IMAP4rev2 (RFC 9051) after `ENABLE IMAP4rev2`: no `\Recent`, SEARCH answered
//!   as ESEARCH, `\NonExistent` in LIST.
//! - `searchres`: RFC 5182 SEARCHRES: the saved result and `$` in later commands.
//! - `compress`: RFC 4978 COMPRESS=DEFLATE: the [`compress::Deflate`] stream the driver
//!   wraps around the connection once the session accepted the command.
//! - `condstore`: RFC 7162 CONDSTORE and QRESYNC: the SELECT, FETCH, STORE and SEARCH
//!   parts imap-codec does not parse (taken out before it decodes the rest), VANISHED and
//!   the FETCH responses with MODSEQ.
//! - `sort`: RFC 5256 SORT and RFC 5957 SORT=DISPLAY: the sort criteria and charset taken out
//!   before imap-codec decodes the rest as a SEARCH, sort keys, base subject extraction and
//!   the `i;unicode-casemap` approximation.
//! - `thread`: RFC 5256 THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (pure functions over the
//!   matched messages' headers) and `* THREAD`.
//! - `create_special_use`: RFC 6154 `CREATE name (USE (\Archive))` (the list taken out).
//! - `status_size`: RFC 8438 STATUS=SIZE (the SIZE item taken out before imap-codec decodes).
//! - `list_extended`: RFC 5258 LIST-EXTENDED (selection and return options, several
//!   patterns) and RFC 5819 LIST-STATUS, parsed here (imap-codec knows the plain LIST only).
//! - `multiappend`: RFC 3502 MULTIAPPEND (an APPEND of several messages cut into one APPEND
//!   per message for imap-codec; appended all or none by one replicated command).
//! - `objectid`: RFC 8474 MAILBOXID, EMAILID, THREADID (derived from replicated state, the
//!   same on every replica; the items taken out before imap-codec decodes).
//! - `binary`: RFC 3516 BINARY FETCH items (rewritten to their BODY twins before imap-codec
//!   decodes; the FETCH loop answers them with the transfer encoding undone).
//! - `notify`: RFC 5465 NOTIFY (parsed here; STATUS, EXISTS/EXPUNGE/FETCH and LIST
//!   notifications written whenever the session may speak, overflow past a bound).
//! - `catenate`: RFC 4469 CATENATE (TEXT and URL parts; RFC 5092 URLs of the account's own
//!   mailboxes) and, with `multiappend`, APPEND of literal8 data (RFC 3516 4.4).
//! - `fetch_items`: the FETCH item-list splitter behind the `binary` and `objectid` rewrites.
//! - `recent`: the `\Recent` UIDs this session owns, and the claims that give them to it.
//! - `selected`: the selected mailbox's sequence numbers and change reporting.
//! - `seqset`: sequence sets merged into sorted disjoint ranges before anything is expanded.
//! - `response`, `cache`: response writing helpers; the shared header cache.
//! - `fetch`, `search`: message parsing for FETCH and SEARCH keys (imapmsg branch).
//! - `server`: the thin tokio driver ([`serve`]): TLS, timeouts, IDLE wake-ups, shutdown.
//!
//! Invariant: the session talks to mail state only through [`crate::store::MailStore`], and
//! never holds a store lock across an await (the store API gives owned snapshots).

mod acl;
/// Public for the fuzz targets (`fuzz/`); not an API for other modules.
#[doc(hidden)]
pub mod binary;
mod cache;
/// Public for the fuzz targets (`fuzz/`); not an API for other modules.
#[doc(hidden)]
pub mod catenate;
pub use cache::{AuthCache, HeaderCache};
mod compress;
mod condstore;
pub mod config;
mod context_search;
mod create_special_use;
mod esearch;
pub mod fetch;
mod fetch_items;
/// Public for the fuzz targets (`fuzz/`); not an API for other modules.
#[doc(hidden)]
pub mod framing;
mod list_extended;
mod mailboxes;
mod messages;
/// Public for the fuzz targets (`fuzz/`); not an API for other modules.
#[doc(hidden)]
pub mod multiappend;
mod notify;
mod objectid;
mod order_cache;
mod quota;
mod recent;
mod response;
mod rev2;
mod savedate;
mod scan;
pub mod search;
mod searchres;
mod selected;
/// Public for the fuzz targets (`fuzz/`); not an API for other modules.
#[doc(hidden)]
pub mod seqset;
mod server;
mod session;
mod sort;
mod sort_keys;
mod status_size;
mod thread;

pub use config::ImapConfig;
pub use server::serve;
pub use session::{Action, ConnectionInfo, Session};

#[cfg(test)]
mod tests;
