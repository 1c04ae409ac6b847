//! Replicated IMAP state (issue 13): which messages have already been given to a session as
//! `\Recent`.
//!
//! RFC 3501 makes a message recent in exactly one session. In a cluster the sessions of one
//! mailbox may sit on different nodes, so the choice goes through the log: each mailbox has a
//! *recent boundary*, a UID. Every message above it is still unclaimed. A read-write session
//! that sees UIDs above the boundary (at SELECT, or when it polls with NOOP/CHECK/IDLE)
//! proposes [`CommandV6::ClaimRecent`] up to the last UID it sees; apply moves the boundary and
//! answers the boundary it found, so the proposer owns exactly the UIDs between the two, and a
//! session whose claim comes second owns none of them. EXAMINE and STATUS read the boundary
//! and claim nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::command::{ApplyError, Response};
use super::state::{Effects, Outcome, State};
use super::{AccountId, MailboxId, Uid};

/// The replicated IMAP state: one struct, carried by the snapshot as a field of its own
/// (`SnapshotMeta::V4`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImapState {
    /// (account, mailbox) -> the greatest UID already given to a session as `\Recent`. No
    /// entry: 0 (every message is still recent).
    pub recent_boundary: BTreeMap<(AccountId, MailboxId), Uid>,
}

/// IMAP commands (issue 13).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV6 {
    /// A read-write session takes the UIDs above the mailbox's recent boundary, up to `up_to`
    /// (the last UID it has seen), as its `\Recent` messages. Answered with
    /// [`Response::RecentClaimed`].
    ClaimRecent {
        account: AccountId,
        mailbox: MailboxId,
        up_to: Uid,
    },
}

impl ImapState {
    /// The greatest UID of `mailbox` already given to a session as `\Recent`.
    pub fn recent_boundary(&self, account: AccountId, mailbox: MailboxId) -> Uid {
        self.recent_boundary
            .get(&(account, mailbox))
            .copied()
            .unwrap_or(0)
    }
}

impl State {
    /// Applies one IMAP command. Pure; a refusal changes nothing.
    pub fn apply_v6(&mut self, command: CommandV6) -> Outcome {
        let result = match command {
            CommandV6::ClaimRecent {
                account,
                mailbox,
                up_to,
            } => self.claim_recent(account, mailbox, up_to),
        };
        Outcome {
            response: result.unwrap_or_else(Response::Refused),
            effects: Effects::default(),
        }
    }

    fn claim_recent(
        &mut self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        up_to: Uid,
    ) -> Result<Response, ApplyError> {
        let account = self
            .accounts
            .get(&account_id)
            .ok_or_else(|| ApplyError::NotFound("account".into()))?;
        let mailbox = account
            .mailboxes
            .get(&mailbox_id)
            .ok_or_else(|| ApplyError::NotFound("mailbox".into()))?;
        // Nobody can own a UID the mailbox has not given out yet.
        let up_to = up_to.min(mailbox.uidnext.saturating_sub(1));
        let previous = self.imap.recent_boundary(account_id, mailbox_id);
        if up_to > previous {
            // Entries of this account's deleted mailboxes go when it next claims something.
            let gone: Vec<(AccountId, MailboxId)> = self
                .imap
                .recent_boundary
                .range((account_id, 0)..=(account_id, MailboxId::MAX))
                .map(|(key, _)| *key)
                .filter(|(_, id)| !account.mailboxes.contains_key(id))
                .collect();
            for key in gone {
                self.imap.recent_boundary.remove(&key);
            }
            self.imap
                .recent_boundary
                .insert((account_id, mailbox_id), up_to);
        }
        Ok(Response::RecentClaimed {
            previous,
            up_to: up_to.max(previous),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::command::CommandV1;

    fn state_with_messages(count: usize) -> (State, AccountId, MailboxId) {
        let mut state = State::default();
        let outcome = state.apply(CommandV1::AddDomain {
            domain: "example.org".into(),
        });
        assert_eq!(outcome.response, Response::Done);
        let outcome = state.apply(CommandV1::AddAccount {
            address: "a@example.org".into(),
            password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
            now: 1,
        });
        let Response::Account(account) = outcome.response else {
            panic!("{:?}", outcome.response);
        };
        let inbox = state.accounts[&account].inbox_id().expect("inbox");
        // Raise uidnext as deliveries would; the claim only looks at it.
        if let Some(mailbox) = state
            .accounts
            .get_mut(&account)
            .and_then(|a| a.mailboxes.get_mut(&inbox))
        {
            mailbox.uidnext = count as Uid + 1;
        }
        (state, account, inbox)
    }

    fn claim(state: &mut State, account: AccountId, mailbox: MailboxId, up_to: Uid) -> Response {
        state
            .apply_v6(CommandV6::ClaimRecent {
                account,
                mailbox,
                up_to,
            })
            .response
    }

    #[test]
    fn the_first_claim_owns_the_uids_and_the_second_gets_none() {
        let (mut state, account, inbox) = state_with_messages(3);
        assert_eq!(
            claim(&mut state, account, inbox, 2),
            Response::RecentClaimed {
                previous: 0,
                up_to: 2
            }
        );
        // The same range again: nothing new (up_to never goes below the boundary).
        assert_eq!(
            claim(&mut state, account, inbox, 2),
            Response::RecentClaimed {
                previous: 2,
                up_to: 2
            }
        );
        // Beyond uidnext is cut to the last UID given out.
        assert_eq!(
            claim(&mut state, account, inbox, 99),
            Response::RecentClaimed {
                previous: 2,
                up_to: 3
            }
        );
        assert_eq!(state.imap.recent_boundary(account, inbox), 3);
        assert!(matches!(
            claim(&mut state, account, 999, 1),
            Response::Refused(ApplyError::NotFound(_))
        ));
        assert!(matches!(
            claim(&mut state, 999, inbox, 1),
            Response::Refused(ApplyError::NotFound(_))
        ));
    }
}
