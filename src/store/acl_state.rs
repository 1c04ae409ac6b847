//! Access control lists (RFC 4314, issue 13): the replicated part.
//!
//! An ACL belongs to one mailbox of one account (its owner) and grants rights to other
//! accounts of the owner's domain, or to `anyone` of that domain. The owner always has every
//! right and never appears in the list. Entries are keyed by account and mailbox ids, so a
//! mailbox renamed keeps its ACL, and a mailbox or account deleted and created again (new
//! ids) never inherits an old one; apply removes an ACL with its mailbox or owner, and an
//! account's grants with the account.
//!
//! [`CommandV10`] carries the acting account: apply checks again that it is the owner or holds
//! the `a` right, so a right revoked between the session's check and the commit is honoured.
//! The snapshot carries [`AclState`] as its own section (`acl`; absent in older snapshots:
//! no ACLs).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::command::{ApplyError, Response};
use super::names::domain_of;
use super::state::{Effects, Outcome, State};
use super::{AccountId, MailboxChanged, MailboxId};

/// The snapshot section holding [`AclState`].
pub const SECTION_ACL: &str = "acl";
/// Identifiers in one mailbox's ACL: GETACL answers and snapshot entries stay bounded.
pub const MAX_ACL_ENTRIES_PER_MAILBOX: usize = 256;

/// The RFC 4314 rights this server knows, in the order they are written.
pub const RIGHT_LETTERS: [char; 11] = ['l', 'r', 's', 'w', 'i', 'p', 'k', 'x', 't', 'e', 'a'];

/// A set of RFC 4314 rights, one bit per letter of [`RIGHT_LETTERS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rights(u16);

impl Rights {
    pub const NONE: Rights = Rights(0);
    pub const ALL: Rights = Rights((1 << RIGHT_LETTERS.len()) - 1);
    pub const LOOKUP: Rights = Rights::letter('l');
    pub const READ: Rights = Rights::letter('r');
    pub const SEEN: Rights = Rights::letter('s');
    pub const WRITE: Rights = Rights::letter('w');
    pub const INSERT: Rights = Rights::letter('i');
    pub const POST: Rights = Rights::letter('p');
    pub const CREATE: Rights = Rights::letter('k');
    pub const DELETE_MAILBOX: Rights = Rights::letter('x');
    pub const DELETE_MESSAGES: Rights = Rights::letter('t');
    pub const EXPUNGE: Rights = Rights::letter('e');
    pub const ADMIN: Rights = Rights::letter('a');

    const fn letter(letter: char) -> Rights {
        let mut i = 0;
        while i < RIGHT_LETTERS.len() {
            if RIGHT_LETTERS[i] == letter {
                return Rights(1 << i);
            }
            i += 1;
        }
        Rights(0)
    }

    /// Parses a rights string. The obsolete RFC 2086 rights are mapped as RFC 4314 2.1.1
    /// says for a server that keeps the new rights apart (`RIGHTS=texk`): `c` is every
    /// "create" right (`k` and `x`), `d` every "delete" right (`e`, `t` and `x`). Any other
    /// letter is refused with the letter.
    pub fn parse(text: &str) -> Result<Rights, char> {
        let mut rights = Rights::NONE;
        for letter in text.chars() {
            rights = rights.union(match letter {
                'c' => Rights::CREATE.union(Rights::DELETE_MAILBOX),
                'd' => Rights::EXPUNGE
                    .union(Rights::DELETE_MESSAGES)
                    .union(Rights::DELETE_MAILBOX),
                other => {
                    let right = Rights::letter(other);
                    if right == Rights::NONE {
                        return Err(other);
                    }
                    right
                }
            });
        }
        Ok(rights)
    }

    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }

    pub fn without(self, other: Rights) -> Rights {
        Rights(self.0 & !other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Keeps only bits of known rights (a decoded value from a corrupt source cannot carry
    /// more).
    fn known(self) -> Rights {
        Rights(self.0 & Rights::ALL.0)
    }
}

impl std::fmt::Display for Rights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, letter) in RIGHT_LETTERS.iter().enumerate() {
            if self.0 & (1 << i) != 0 {
                write!(f, "{letter}")?;
            }
        }
        Ok(())
    }
}

/// Who an ACL entry grants rights to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Grantee {
    /// Every account of the owner's domain (never another domain's).
    Anyone,
    Account(AccountId),
}

/// How SETACL changes an identifier's rights (RFC 4314 3.1: no sign, `+` or `-`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RightsChange {
    Replace,
    Add,
    Remove,
}

/// Every ACL: (owner, mailbox) -> grantee -> rights. An entry never holds empty rights, and
/// a mailbox without entries has no key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclState {
    pub mailboxes: BTreeMap<(AccountId, MailboxId), BTreeMap<Grantee, Rights>>,
}

impl AclState {
    /// The rights `account` has on `owner`'s `mailbox` (every right for the owner).
    pub fn rights_of(&self, account: AccountId, owner: AccountId, mailbox: MailboxId) -> Rights {
        if account == owner {
            return Rights::ALL;
        }
        let Some(entries) = self.mailboxes.get(&(owner, mailbox)) else {
            return Rights::NONE;
        };
        let own = entries
            .get(&Grantee::Account(account))
            .copied()
            .unwrap_or_default();
        let anyone = entries.get(&Grantee::Anyone).copied().unwrap_or_default();
        own.union(anyone).known()
    }

    /// The entries of one mailbox's ACL (the owner not included).
    pub fn entries(&self, owner: AccountId, mailbox: MailboxId) -> Vec<(Grantee, Rights)> {
        self.mailboxes
            .get(&(owner, mailbox))
            .map(|entries| entries.iter().map(|(g, r)| (*g, *r)).collect())
            .unwrap_or_default()
    }

    /// Drops a deleted mailbox's ACL.
    pub fn forget_mailbox(&mut self, owner: AccountId, mailbox: MailboxId) {
        self.mailboxes.remove(&(owner, mailbox));
    }

    /// Drops a removed account's ACLs and every right granted to it.
    pub fn forget_account(&mut self, account: AccountId) {
        self.mailboxes.retain(|(owner, _), _| *owner != account);
        for entries in self.mailboxes.values_mut() {
            entries.remove(&Grantee::Account(account));
        }
        self.mailboxes.retain(|_, entries| !entries.is_empty());
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV10 {
    /// SETACL by `actor` (the owner, or an account holding `a` on the mailbox).
    SetAcl {
        actor: AccountId,
        owner: AccountId,
        mailbox: MailboxId,
        grantee: Grantee,
        change: RightsChange,
        rights: Rights,
    },
    /// DELETEACL by `actor`: the grantee's entry goes (answered `Done` when there was none).
    DeleteAcl {
        actor: AccountId,
        owner: AccountId,
        mailbox: MailboxId,
        grantee: Grantee,
    },
}

impl State {
    pub fn apply_v10(&mut self, command: CommandV10) -> Outcome {
        let mut effects = Effects::default();
        let result = match command {
            CommandV10::SetAcl {
                actor,
                owner,
                mailbox,
                grantee,
                change,
                rights,
            } => self.set_acl(actor, owner, mailbox, grantee, change, rights, &mut effects),
            CommandV10::DeleteAcl {
                actor,
                owner,
                mailbox,
                grantee,
            } => self.delete_acl(actor, owner, mailbox, grantee, &mut effects),
        };
        let response = result.unwrap_or_else(Response::Refused);
        Outcome { response, effects }
    }

    /// Checks that the mailbox exists, that `actor` may administer it and that `grantee` is
    /// an account of the owner's domain other than the owner.
    fn check_acl_change(
        &self,
        actor: AccountId,
        owner: AccountId,
        mailbox: MailboxId,
        grantee: Grantee,
    ) -> Result<(), ApplyError> {
        let owner_account = self.account(owner)?;
        owner_account.mailbox(mailbox)?;
        if !self
            .rights_on(actor, owner, mailbox)
            .contains(Rights::ADMIN)
        {
            return Err(ApplyError::NoPermission(
                "the a right is needed to change this mailbox's ACL".into(),
            ));
        }
        if let Grantee::Account(grantee) = grantee {
            if grantee == owner {
                return Err(ApplyError::Invalid(
                    "the owner always has every right; its rights cannot change".into(),
                ));
            }
            let grantee = self.account(grantee)?;
            if domain_of(&grantee.address) != domain_of(&owner_account.address) {
                return Err(ApplyError::NoPermission(
                    "rights can only be granted within the owner's domain".into(),
                ));
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn set_acl(
        &mut self,
        actor: AccountId,
        owner: AccountId,
        mailbox: MailboxId,
        grantee: Grantee,
        change: RightsChange,
        rights: Rights,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        self.check_acl_change(actor, owner, mailbox, grantee)?;
        let rights = rights.known();
        let key = (owner, mailbox);
        let current = self.acl.mailboxes.get(&key);
        let known_grantee = current.is_some_and(|entries| entries.contains_key(&grantee));
        let n_entries = current.map_or(0, BTreeMap::len);
        let before = current
            .and_then(|entries| entries.get(&grantee))
            .copied()
            .unwrap_or_default();
        let updated = match change {
            RightsChange::Replace => rights,
            RightsChange::Add => before.union(rights),
            RightsChange::Remove => before.without(rights),
        };
        if !known_grantee && !updated.is_empty() && n_entries >= MAX_ACL_ENTRIES_PER_MAILBOX {
            return Err(ApplyError::Invalid(format!(
                "a mailbox's ACL holds at most {MAX_ACL_ENTRIES_PER_MAILBOX} identifiers"
            )));
        }
        let entries = self.acl.mailboxes.entry(key).or_default();
        if updated.is_empty() {
            entries.remove(&grantee);
        } else {
            entries.insert(grantee, updated);
        }
        if entries.is_empty() {
            self.acl.mailboxes.remove(&key);
        }
        // Sessions of the grantee holding the mailbox selected re-check their rights.
        effects.changed.push(MailboxChanged {
            account: owner,
            mailbox,
        });
        Ok(Response::Done)
    }

    fn delete_acl(
        &mut self,
        actor: AccountId,
        owner: AccountId,
        mailbox: MailboxId,
        grantee: Grantee,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        self.check_acl_change(actor, owner, mailbox, grantee)?;
        if let Some(entries) = self.acl.mailboxes.get_mut(&(owner, mailbox)) {
            entries.remove(&grantee);
            if entries.is_empty() {
                self.acl.mailboxes.remove(&(owner, mailbox));
            }
        }
        effects.changed.push(MailboxChanged {
            account: owner,
            mailbox,
        });
        Ok(Response::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::command::CommandV1;

    /// A state with a domain, three accounts of it (ids 1, 2, 3) and one of another domain
    /// (id 4).
    fn state() -> State {
        let mut state = State::default();
        for domain in ["example.org", "other.org"] {
            let outcome = state.apply(CommandV1::AddDomain {
                domain: domain.into(),
            });
            assert_eq!(outcome.response, Response::Done);
        }
        for address in [
            "owner@example.org",
            "friend@example.org",
            "third@example.org",
            "stranger@other.org",
        ] {
            let outcome = state.apply(CommandV1::AddAccount {
                address: address.into(),
                // A valid argon2id form (apply checks the form only).
                password_hash: "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$9Yc4dSHW1rjZn6HLZoPRDw"
                    .into(),
                now: 1_700_000_000,
            });
            assert!(matches!(outcome.response, Response::Account(_)));
        }
        state
    }

    fn inbox(state: &State, account: AccountId) -> MailboxId {
        state.accounts[&account].inbox_id().unwrap()
    }

    fn set(
        state: &mut State,
        actor: AccountId,
        grantee: Grantee,
        change: RightsChange,
        rights: &str,
    ) -> Response {
        let mailbox = inbox(state, 1);
        state
            .apply_v10(CommandV10::SetAcl {
                actor,
                owner: 1,
                mailbox,
                grantee,
                change,
                rights: Rights::parse(rights).unwrap(),
            })
            .response
    }

    #[test]
    fn rights_parse_and_print_in_rfc_order() {
        assert_eq!(Rights::parse("rl").unwrap().to_string(), "lr");
        assert_eq!(Rights::ALL.to_string(), "lrswipkxtea");
        assert_eq!(Rights::parse("c").unwrap().to_string(), "kx");
        assert_eq!(Rights::parse("d").unwrap().to_string(), "xte");
        assert_eq!(Rights::parse("lz"), Err('z'));
        assert_eq!(Rights::parse("").unwrap(), Rights::NONE);
    }

    #[test]
    fn owner_grants_replace_add_remove_and_delete() {
        let mut state = state();
        let mailbox = inbox(&state, 1);
        let friend = Grantee::Account(2);
        assert_eq!(state.acl.rights_of(2, 1, mailbox), Rights::NONE);
        assert_eq!(state.acl.rights_of(1, 1, mailbox), Rights::ALL);
        assert_eq!(
            set(&mut state, 1, friend, RightsChange::Replace, "lr"),
            Response::Done
        );
        assert_eq!(state.acl.rights_of(2, 1, mailbox).to_string(), "lr");
        set(&mut state, 1, friend, RightsChange::Add, "si");
        assert_eq!(state.acl.rights_of(2, 1, mailbox).to_string(), "lrsi");
        set(&mut state, 1, friend, RightsChange::Remove, "r");
        assert_eq!(state.acl.rights_of(2, 1, mailbox).to_string(), "lsi");
        // The third account got nothing.
        assert_eq!(state.acl.rights_of(3, 1, mailbox), Rights::NONE);
        let outcome = state.apply_v10(CommandV10::DeleteAcl {
            actor: 1,
            owner: 1,
            mailbox,
            grantee: friend,
        });
        assert_eq!(outcome.response, Response::Done);
        assert_eq!(state.acl.rights_of(2, 1, mailbox), Rights::NONE);
        // No empty entry is left behind.
        assert!(state.acl.mailboxes.is_empty());
        // Removing every right leaves no entry either.
        set(&mut state, 1, friend, RightsChange::Replace, "l");
        set(&mut state, 1, friend, RightsChange::Remove, "l");
        assert!(state.acl.mailboxes.is_empty());
    }

    #[test]
    fn anyone_means_the_owner_domain_only() {
        let mut state = state();
        let mailbox = inbox(&state, 1);
        set(&mut state, 1, Grantee::Anyone, RightsChange::Replace, "lr");
        assert_eq!(state.acl.rights_of(3, 1, mailbox).to_string(), "lr");
        // `rights_of` is asked only for accounts of the domain by the store's access check;
        // a grant to another domain's account is refused outright.
        let refused = set(
            &mut state,
            1,
            Grantee::Account(4),
            RightsChange::Replace,
            "lr",
        );
        assert!(matches!(
            refused,
            Response::Refused(ApplyError::NoPermission(_))
        ));
        assert_eq!(state.acl.entries(1, mailbox).len(), 1);
    }

    #[test]
    fn only_owner_or_admin_changes_an_acl() {
        let mut state = state();
        let mailbox = inbox(&state, 1);
        // A stranger to the mailbox cannot grant itself anything.
        let refused = set(&mut state, 2, Grantee::Account(2), RightsChange::Add, "lr");
        assert!(matches!(
            refused,
            Response::Refused(ApplyError::NoPermission(_))
        ));
        assert!(state.acl.mailboxes.is_empty());
        // Without `a`, lookup and read are not enough.
        set(
            &mut state,
            1,
            Grantee::Account(2),
            RightsChange::Replace,
            "lr",
        );
        let refused = set(&mut state, 2, Grantee::Account(3), RightsChange::Add, "lr");
        assert!(matches!(
            refused,
            Response::Refused(ApplyError::NoPermission(_))
        ));
        // With `a`, the grantee administers.
        set(&mut state, 1, Grantee::Account(2), RightsChange::Add, "a");
        assert_eq!(
            set(&mut state, 2, Grantee::Account(3), RightsChange::Add, "l"),
            Response::Done
        );
        assert_eq!(state.acl.rights_of(3, 1, mailbox).to_string(), "l");
        // The owner's own rights never change.
        let refused = set(
            &mut state,
            1,
            Grantee::Account(1),
            RightsChange::Replace,
            "",
        );
        assert!(matches!(refused, Response::Refused(ApplyError::Invalid(_))));
        assert_eq!(state.acl.rights_of(1, 1, mailbox), Rights::ALL);
    }

    #[test]
    fn acl_goes_with_its_mailbox_and_accounts() {
        let mut state = state();
        let outcome = state.apply(CommandV1::CreateMailbox {
            account: 1,
            name: "Shared".into(),
            special_use: None,
            now: 1_700_000_001,
        });
        let Response::Mailbox(shared) = outcome.response else {
            panic!("mailbox not created: {:?}", outcome.response);
        };
        let grant = |state: &mut State, mailbox, grantee| {
            state.apply_v10(CommandV10::SetAcl {
                actor: 1,
                owner: 1,
                mailbox,
                grantee: Grantee::Account(grantee),
                change: RightsChange::Replace,
                rights: Rights::parse("lr").unwrap(),
            })
        };
        grant(&mut state, shared, 2);
        let inbox_id = inbox(&state, 1);
        grant(&mut state, inbox_id, 2);
        grant(&mut state, inbox_id, 3);
        // Deleting the mailbox drops its ACL: one created again under the name gets none.
        state.apply(CommandV1::DeleteMailbox {
            account: 1,
            name: "Shared".into(),
        });
        assert_eq!(state.acl.entries(1, shared), Vec::new());
        let recreated = match state
            .apply(CommandV1::CreateMailbox {
                account: 1,
                name: "Shared".into(),
                special_use: None,
                now: 1_700_000_002,
            })
            .response
        {
            Response::Mailbox(id) => id,
            other => panic!("mailbox not created: {other:?}"),
        };
        assert_eq!(state.acl.rights_of(2, 1, recreated), Rights::NONE);
        // Removing a grantee drops its grants; removing the owner drops its ACLs.
        state.apply(CommandV1::RemoveAccount {
            address: "friend@example.org".into(),
        });
        assert_eq!(state.acl.entries(1, inbox_id).len(), 1);
        state.apply(CommandV1::RemoveAccount {
            address: "owner@example.org".into(),
        });
        assert!(state.acl.mailboxes.is_empty());
    }

    #[test]
    fn an_acl_change_on_a_missing_mailbox_is_refused() {
        let mut state = state();
        let outcome = state.apply_v10(CommandV10::SetAcl {
            actor: 1,
            owner: 1,
            mailbox: 9_999,
            grantee: Grantee::Account(2),
            change: RightsChange::Replace,
            rights: Rights::READ,
        });
        assert!(matches!(
            outcome.response,
            Response::Refused(ApplyError::NotFound(_))
        ));
        assert!(state.acl.mailboxes.is_empty());
    }
}
