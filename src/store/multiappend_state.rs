//! MULTIAPPEND (RFC 3502, issue 13): several messages appended to one mailbox by one
//! replicated command, so that either all of them are added or none is.
//!
//! [`CommandV9::AppendMany`] carries every body; apply checks the whole batch first (UIDs
//! left, quota for the sum, the keywords of all messages together) and only then adds the
//! messages with consecutive UIDs, so no replica and no session ever sees part of a batch.

use serde::{Deserialize, Serialize};

use super::command::{ApplyError, BodyV1, Response};
use super::quota::Usage;
use super::state::{Effects, Outcome, State};
use super::{AccountId, FlagSet, MailboxId, MessageMeta, Uid};

/// Most messages in one MULTIAPPEND.
pub const MAX_MESSAGES_PER_MULTIAPPEND: usize = 1_000;

/// One message of a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    pub flags: FlagSet,
    pub internal_date: i64,
    pub internal_date_offset_min: i16,
    pub body: BodyV1,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV9 {
    /// Appends `messages` in order; answered [`Response::AppendedMany`].
    AppendMany {
        account: AccountId,
        mailbox: MailboxId,
        messages: Vec<NewMessage>,
    },
}

impl CommandV9 {
    /// The bodies this command carries (written before it is applied).
    pub fn bodies(&self) -> Vec<&BodyV1> {
        match self {
            CommandV9::AppendMany { messages, .. } => messages.iter().map(|m| &m.body).collect(),
        }
    }
}

impl State {
    pub fn apply_v9(&mut self, command: CommandV9) -> Outcome {
        let mut effects = Effects::default();
        let carried: Vec<_> = command.bodies().iter().map(|b| b.blob).collect();
        let result = match command {
            CommandV9::AppendMany {
                account,
                mailbox,
                messages,
            } => self.append_many(account, mailbox, messages, &mut effects),
        };
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                effects = Effects::default();
                for blob in carried {
                    if !self.blobs.contains_key(&blob) && !effects.released.contains(&blob) {
                        effects.released.push(blob);
                    }
                }
                Response::Refused(error)
            }
        };
        Outcome { response, effects }
    }

    fn append_many(
        &mut self,
        account_id: AccountId,
        mailbox_id: MailboxId,
        messages: Vec<NewMessage>,
        effects: &mut Effects,
    ) -> Result<Response, ApplyError> {
        if messages.is_empty() || messages.len() > MAX_MESSAGES_PER_MULTIAPPEND {
            return Err(ApplyError::Invalid(format!(
                "a MULTIAPPEND holds 1 to {MAX_MESSAGES_PER_MULTIAPPEND} messages"
            )));
        }
        // Every check before the first change: all or nothing.
        let mut total = Usage {
            bytes: 0,
            messages: 0,
        };
        let mut all_flags = FlagSet::new();
        for message in &messages {
            Self::check_body(&message.body)?;
            total.bytes += u64::from(message.body.raw_size);
            total.messages += 1;
            all_flags.extend(message.flags.iter().cloned());
        }
        let mailbox = self.account(account_id)?.mailbox(mailbox_id)?;
        mailbox.has_room_for(messages.len())?;
        // The keywords of the whole batch fit together, so each message's fit after the
        // earlier ones were remembered.
        mailbox.canonical_flags(&all_flags)?;
        self.check_quota(account_id, total)?;
        let mut uids: Vec<Uid> = Vec::with_capacity(messages.len());
        let mut uidvalidity = 0;
        for message in messages {
            let mailbox = self.account(account_id)?.mailbox(mailbox_id)?;
            let (flags, new_keywords) = mailbox.canonical_flags(&message.flags)?;
            let modseq = self.imap.modseq.bump(account_id, mailbox_id);
            let saved_at = self.save_time();
            let mailbox = self.account_mut(account_id)?.mailbox_mut(mailbox_id)?;
            mailbox.remember_keywords(new_keywords);
            let uid = mailbox.uidnext;
            mailbox.uidnext += 1;
            uidvalidity = mailbox.uidvalidity;
            mailbox.chunk_stamps.touch(uid);
            mailbox.messages.push(MessageMeta {
                uid,
                blob: message.body.blob,
                size: message.body.raw_size,
                internal_date: message.internal_date,
                internal_date_offset_min: message.internal_date_offset_min,
                flags,
                modseq,
                saved_at,
            });
            self.add_ref(
                message.body.blob,
                message.body.raw_size,
                message.body.compressed.len() as u64,
            );
            self.charge_usage(account_id, Usage::one(message.body.raw_size));
            uids.push(uid);
        }
        let mailbox = self.account_mut(account_id)?.mailbox_mut(mailbox_id)?;
        mailbox.touch(account_id, effects);
        Ok(Response::AppendedMany { uidvalidity, uids })
    }
}
