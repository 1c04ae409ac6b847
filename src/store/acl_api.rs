//! [`MailStore`] methods for access control lists (RFC 4314, issue 13): the access check every
//! command on another account's mailbox goes through, the ACL reads GETACL, LISTRIGHTS and
//! MYRIGHTS answer from, and SETACL/DELETEACL proposed as `Command::V10`.
//!
//! An account reaches another account's mailbox only through [`MailStore::access_mailbox`]
//! (or [`MailStore::rights_on`] for a mailbox it already holds), which answers the rights the
//! caller must check before it reads or changes anything. Accounts of different domains never
//! have rights on each other's mailboxes, whatever the ACL says.

use super::acl_state::{CommandV10, Grantee, Rights, RightsChange};
use super::command::Command;
use super::names::{domain_of, normalize_address, normalize_mailbox_name};
use super::state::State;
use super::{unexpected, AccountId, MailStore, MailboxId, Response, StoreError};

/// The identifier RFC 4314 reserves for every user (here: every account of the owner's
/// domain).
pub const ANYONE: &str = "anyone";

/// A mailbox of another account that an account may see (it holds `l` on it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedMailbox {
    pub owner: AccountId,
    pub owner_address: String,
    pub mailbox: MailboxId,
    pub name: String,
    pub rights: Rights,
}

impl State {
    /// The rights `account` has on `owner`'s `mailbox`: every right for the owner, none for
    /// an account of another domain or when either account is unknown, else what the ACL
    /// grants the account and `anyone`.
    pub fn rights_on(&self, account: AccountId, owner: AccountId, mailbox: MailboxId) -> Rights {
        let (Some(who), Some(owner_account)) =
            (self.accounts.get(&account), self.accounts.get(&owner))
        else {
            return Rights::NONE;
        };
        if !owner_account.mailboxes.contains_key(&mailbox) {
            return Rights::NONE;
        }
        if account == owner {
            return Rights::ALL;
        }
        if domain_of(&who.address) != domain_of(&owner_account.address) {
            return Rights::NONE;
        }
        self.acl.rights_of(account, owner, mailbox)
    }
}

impl MailStore {
    /// The id of `owner`'s mailbox `name` and the rights `account` has on it, or `None` when
    /// there is no such mailbox. The caller must check the rights before anything else: a
    /// mailbox without `l` (nor `r`) must look like one that does not exist.
    pub fn access_mailbox(
        &self,
        account: AccountId,
        owner: AccountId,
        name: &str,
    ) -> Option<(MailboxId, Rights)> {
        let name = normalize_mailbox_name(name).ok()?;
        let state = self.state();
        let mailbox = state.accounts.get(&owner)?.mailbox_by_name(&name)?.id;
        Some((mailbox, state.rights_on(account, owner, mailbox)))
    }

    /// The rights `account` has now on `owner`'s `mailbox` (none once it is gone).
    pub fn rights_on(&self, account: AccountId, owner: AccountId, mailbox: MailboxId) -> Rights {
        self.state().rights_on(account, owner, mailbox)
    }

    /// The account of an address (lowercase), if it exists.
    pub fn account_of_address(&self, address: &str) -> Option<AccountId> {
        let address = normalize_address(address).ok()?;
        self.state().account_ids.get(&address).copied()
    }

    /// Mailboxes of other accounts of its domain that `account` holds `l` on, by owner
    /// address then name. Walks every ACL: bounded by the number of ACL entries.
    pub fn shared_with(&self, account: AccountId) -> Vec<SharedMailbox> {
        let state = self.state();
        let mut shared = Vec::new();
        for &(owner, mailbox) in state.acl.mailboxes.keys() {
            if owner == account {
                continue;
            }
            let rights = state.rights_on(account, owner, mailbox);
            if !rights.contains(Rights::LOOKUP) {
                continue;
            }
            let Some(owner_account) = state.accounts.get(&owner) else {
                continue;
            };
            let Some(found) = owner_account.mailboxes.get(&mailbox) else {
                continue;
            };
            shared.push(SharedMailbox {
                owner,
                owner_address: owner_account.address.clone(),
                mailbox,
                name: found.name.clone(),
                rights,
            });
        }
        shared.sort_by(|a, b| (&a.owner_address, &a.name).cmp(&(&b.owner_address, &b.name)));
        shared
    }

    /// The ACL of `owner`'s `mailbox` as (identifier, rights), the owner first (every right).
    pub fn acl_entries(&self, owner: AccountId, mailbox: MailboxId) -> Vec<(String, Rights)> {
        let state = self.state();
        let Some(owner_account) = state.accounts.get(&owner) else {
            return Vec::new();
        };
        let mut entries = vec![(owner_account.address.clone(), Rights::ALL)];
        for (grantee, rights) in state.acl.entries(owner, mailbox) {
            let identifier = match grantee {
                Grantee::Anyone => ANYONE.to_owned(),
                Grantee::Account(id) => match state.accounts.get(&id) {
                    Some(account) => account.address.clone(),
                    None => continue,
                },
            };
            entries.push((identifier, rights));
        }
        entries
    }

    /// The grantee an identifier names for `owner`'s mailboxes: `anyone`, or an account of
    /// the owner's domain. Another domain is refused before looking the account up, so the
    /// answer says nothing about that domain's accounts.
    pub fn grantee_for(&self, owner: AccountId, identifier: &str) -> Result<Grantee, StoreError> {
        if identifier.eq_ignore_ascii_case(ANYONE) {
            return Ok(Grantee::Anyone);
        }
        if identifier.starts_with('-') {
            return Err(StoreError::Invalid(
                "negative rights are not supported".into(),
            ));
        }
        let address = normalize_address(identifier).map_err(StoreError::from)?;
        let state = self.state();
        let owner_address = state
            .accounts
            .get(&owner)
            .map(|a| a.address.clone())
            .ok_or_else(|| StoreError::NotFound("account".into()))?;
        if domain_of(&address) != domain_of(&owner_address) {
            return Err(StoreError::NoPermission(
                "identifiers must be accounts of the mailbox owner's domain".into(),
            ));
        }
        state
            .account_ids
            .get(&address)
            .map(|id| Grantee::Account(*id))
            .ok_or_else(|| StoreError::NotFound(format!("account {address}")))
    }

    /// SETACL by `actor` on `owner`'s `mailbox` (apply checks `actor`'s `a` right again).
    pub async fn set_acl(
        &self,
        actor: AccountId,
        owner: AccountId,
        mailbox: MailboxId,
        grantee: Grantee,
        change: RightsChange,
        rights: Rights,
    ) -> Result<(), StoreError> {
        let command = CommandV10::SetAcl {
            actor,
            owner,
            mailbox,
            grantee,
            change,
            rights,
        };
        match self.submit_command(Command::V10(command)).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// DELETEACL by `actor` on `owner`'s `mailbox`.
    pub async fn delete_acl(
        &self,
        actor: AccountId,
        owner: AccountId,
        mailbox: MailboxId,
        grantee: Grantee,
    ) -> Result<(), StoreError> {
        let command = CommandV10::DeleteAcl {
            actor,
            owner,
            mailbox,
            grantee,
        };
        match self.submit_command(Command::V10(command)).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MailStateMachine;
    use kermail_cluster::AppStateMachine;

    const PASSWORD: &str = "correct horse battery";

    async fn store_with_accounts(dir: &std::path::Path) -> (MailStore, [AccountId; 3]) {
        let store = MailStore::open_local(dir).unwrap();
        store.add_domain("example.org").await.unwrap();
        store.add_domain("other.org").await.unwrap();
        let mut ids = [0; 3];
        for (id, address) in ids.iter_mut().zip([
            "owner@example.org",
            "friend@example.org",
            "stranger@other.org",
        ]) {
            *id = store.add_account(address, PASSWORD).await.unwrap();
        }
        (store, ids)
    }

    #[tokio::test]
    async fn access_follows_grants_and_never_crosses_domains() {
        let dir = tempfile::tempdir().unwrap();
        let (store, [owner, friend, stranger]) = store_with_accounts(dir.path()).await;
        let (inbox, rights) = store.access_mailbox(friend, owner, "INBOX").unwrap();
        assert_eq!(rights, Rights::NONE);
        assert_eq!(
            store.access_mailbox(owner, owner, "inbox").unwrap().1,
            Rights::ALL
        );
        let friend_grantee = store.grantee_for(owner, "FRIEND@example.org").unwrap();
        store
            .set_acl(
                owner,
                owner,
                inbox,
                friend_grantee,
                RightsChange::Replace,
                Rights::parse("lr").unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(store.rights_on(friend, owner, inbox).to_string(), "lr");
        let shared = store.shared_with(friend);
        assert_eq!(shared.len(), 1);
        assert_eq!(shared[0].owner_address, "owner@example.org");
        assert_eq!(shared[0].name, "INBOX");
        // Another domain's account cannot be named, and `anyone` does not reach it.
        assert!(matches!(
            store.grantee_for(owner, "stranger@other.org"),
            Err(StoreError::NoPermission(_))
        ));
        store
            .set_acl(
                owner,
                owner,
                inbox,
                Grantee::Anyone,
                RightsChange::Replace,
                Rights::ALL,
            )
            .await
            .unwrap();
        assert_eq!(store.rights_on(stranger, owner, inbox), Rights::NONE);
        assert!(store.shared_with(stranger).is_empty());
        // The friend without `a` cannot change the ACL (apply refuses).
        store
            .delete_acl(owner, owner, inbox, Grantee::Anyone)
            .await
            .unwrap();
        let refused = store
            .set_acl(
                friend,
                owner,
                inbox,
                friend_grantee,
                RightsChange::Add,
                Rights::ALL,
            )
            .await;
        assert!(matches!(refused, Err(StoreError::NoPermission(_))));
        assert_eq!(store.rights_on(friend, owner, inbox).to_string(), "lr");
        // Negative rights are refused with a reason.
        assert!(matches!(
            store.grantee_for(owner, "-friend@example.org"),
            Err(StoreError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn acl_survives_a_snapshot_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (store, [owner, friend, _]) = store_with_accounts(dir.path()).await;
        let (inbox, _) = store.access_mailbox(owner, owner, "INBOX").unwrap();
        store
            .set_acl(
                owner,
                owner,
                inbox,
                Grantee::Account(friend),
                RightsChange::Replace,
                Rights::parse("lrs").unwrap(),
            )
            .await
            .unwrap();
        let machine = store.machine();
        let mut local = Vec::new();
        machine.begin_snapshot().write_to(&mut local).unwrap();
        let mut transfer = Vec::new();
        machine
            .write_transfer(&mut local.as_slice(), &mut transfer)
            .unwrap();
        let restored_dir = tempfile::tempdir().unwrap();
        let restored = MailStateMachine::open(restored_dir.path()).unwrap();
        restored.restore(&mut transfer.as_slice(), false).unwrap();
        assert_eq!(restored.read().acl, machine.read().acl);
        assert_eq!(
            restored.read().rights_on(friend, owner, inbox).to_string(),
            "lrs"
        );
        // A node's own snapshot restores it too (a restart).
        let again_dir = tempfile::tempdir().unwrap();
        let again = MailStateMachine::open(again_dir.path()).unwrap();
        let mut transfer_again = Vec::new();
        machine
            .write_transfer(&mut local.as_slice(), &mut transfer_again)
            .unwrap();
        again
            .restore(&mut transfer_again.as_slice(), false)
            .unwrap();
        assert_eq!(*again.read(), *machine.read());
    }
}
