//! IMAP4rev2 (RFC 9051): advertised beside IMAP4rev1; `ENABLE IMAP4rev2` switches this
//! session to the rev2 behaviours where the two versions differ (RFC 9051 Appendix E):
//! - no `\Recent`: the session claims no recent messages (they stay recent for IMAP4rev1
//!   sessions), SELECT/EXAMINE send no `* n RECENT`, NOOP/IDLE none either, FETCH shows no
//!   `\Recent` flag;
//! - a SEARCH without RETURN is answered as `SEARCH RETURN (ALL)`: `* ESEARCH`, never
//!   `* SEARCH`;
//! - LIST names a parent that is no mailbox `\NonExistent` (which implies `\Noselect`)
//!   instead of `\Noselect`.
//!
//! What both versions share needs no switch: STATUS SIZE and DELETED, LITERAL- (LITERAL+
//! is accepted, a superset), NAMESPACE, UNSELECT, UIDPLUS, MOVE, ESEARCH, SEARCHRES, ENABLE,
//! IDLE, SASL-IR, LIST-EXTENDED, LIST-STATUS, SPECIAL-USE, BINARY, `OK [CLOSED]`.

use super::esearch::ReturnOptions;
use super::session::Session;

/// What a plain SEARCH returns under IMAP4rev2 (RFC 9051 6.4.4: as `RETURN (ALL)`).
pub const PLAIN_SEARCH: ReturnOptions = ReturnOptions {
    min: false,
    max: false,
    count: false,
    all: true,
    save: false,
    update: false,
    partial: None,
};

impl Session {
    /// `ENABLE IMAP4rev2`: true when this turned it on (it was off).
    pub(super) fn enable_rev2(&mut self) -> bool {
        if self.rev2 {
            return false;
        }
        self.rev2 = true;
        // `\Recent` goes: what this session owned stops showing (RFC 9051 Appendix E).
        self.recent = Default::default();
        true
    }

    /// The RETURN options of the running SEARCH: those given, or IMAP4rev2's ALL.
    pub(super) fn search_return(&mut self) -> Option<ReturnOptions> {
        self.esearch.take().or(self.rev2.then_some(PLAIN_SEARCH))
    }
}
