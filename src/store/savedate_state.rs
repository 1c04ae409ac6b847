//! SAVEDATE (RFC 8514): when a message was saved into its current mailbox.
//!
//! Each message holds its save date in [`MessageMeta::saved_at`] (seconds since the Unix
//! epoch; 0: unknown). The time is never read from a clock in apply:
//! - a delivery (SMTP, a DSN, a Sieve `fileinto`) saves at the command's `received_at`,
//!   which the proposer chose;
//! - APPEND, MULTIAPPEND, COPY and MOVE carry no time of their own (APPEND's internal date
//!   may be the client's), so the store proposes them wrapped in
//!   [`CommandV11::Saved`], whose `saved_at` the proposer read from its clock; apply sets
//!   [`State::saved_clock`] around the wrapped command, and each message it creates takes that
//!   time;
//! - the same commands found unwrapped (a log written before this version) save at 0
//!   (unknown), as do messages restored from a snapshot written before it.
//!
//! A renamed INBOX keeps its messages' save dates (the messages were not saved again).
//!
//! Snapshots: the struct's serde layout is unchanged (`saved_at` is skipped: backups and the
//! whole-state snapshot formats stay readable); a snapshot's message chunk carries the save
//! dates in a format of its own, [`encode_message_chunk`], which starts with
//! [`CHUNK_MARKER`]: a byte that no bincode varint, so no earlier chunk, begins with. A chunk
//! without it is decoded as before (every save date unknown), so an old snapshot still loads
//! and a new snapshot may go on naming an old chunk for a range that did not change since.

use bincode::Options;
use serde::{Deserialize, Serialize};

use super::command::{ApplyError, CommandV1, Response};
use super::multiappend_state::CommandV9;
use super::state::{Effects, Outcome, State};
use super::MessageMeta;

/// The first bytes of a message chunk that carries save dates. bincode's varint encoding
/// (the length of a chunk's `Vec<MessageMeta>`) never starts with 0xFF, so a chunk written
/// before save dates is never mistaken for one; the second byte is this format's version.
pub const CHUNK_MARKER: [u8; 2] = [0xFF, 1];

/// SAVEDATE commands (issue 13).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV11 {
    /// `command` saves messages at `saved_at` (seconds since the epoch, the proposer's
    /// clock). Answered as `command` is.
    Saved {
        saved_at: i64,
        command: SavedCommand,
    },
}

/// The commands that save messages without carrying a time of their own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedCommand {
    /// `CommandV1::Append` or `CommandV1::Copy` (COPY, MOVE); any other is refused.
    V1(CommandV1),
    /// MULTIAPPEND.
    V9(CommandV9),
}

impl CommandV11 {
    /// The bodies this command carries (written before it is applied).
    pub fn bodies(&self) -> Vec<&super::command::BodyV1> {
        match self {
            CommandV11::Saved {
                command: SavedCommand::V1(CommandV1::Append { body, .. }),
                ..
            } => vec![body],
            CommandV11::Saved {
                command: SavedCommand::V9(command),
                ..
            } => command.bodies(),
            CommandV11::Saved { .. } => Vec::new(),
        }
    }
}

/// A save time as a message holds it: seconds since the epoch, 0 (unknown) for a time
/// before 1970, the largest u32 for one after 2106.
pub fn saved_at_of(seconds: i64) -> u32 {
    u32::try_from(seconds.max(0)).unwrap_or(u32::MAX)
}

impl State {
    /// The save time of a message created now by a command without a time of its own: the
    /// wrapping [`CommandV11::Saved`]'s, else 0 (unknown).
    pub(super) fn save_time(&self) -> u32 {
        self.saved_clock.unwrap_or(0)
    }

    pub fn apply_v11(&mut self, command: CommandV11) -> Outcome {
        let CommandV11::Saved { saved_at, command } = command;
        match command {
            SavedCommand::V1(command @ (CommandV1::Append { .. } | CommandV1::Copy { .. })) => {
                self.saved_clock = Some(saved_at_of(saved_at));
                let outcome = self.apply(command);
                self.saved_clock = None;
                outcome
            }
            SavedCommand::V9(command) => {
                self.saved_clock = Some(saved_at_of(saved_at));
                let outcome = self.apply_v9(command);
                self.saved_clock = None;
                outcome
            }
            SavedCommand::V1(_) => Outcome {
                response: Response::Refused(ApplyError::Invalid(
                    "only APPEND, COPY and MOVE carry a save time".into(),
                )),
                effects: Effects::default(),
            },
        }
    }
}

fn chunk_codec(limit: u64) -> impl Options {
    bincode::DefaultOptions::new().with_limit(limit)
}

/// One message as a chunk with save dates encodes it: the struct as before, then the date.
#[derive(Serialize)]
struct SavedMessageRef<'a>(&'a MessageMeta, u32);

#[derive(Deserialize)]
struct SavedMessage(MessageMeta, u32);

/// A snapshot's message chunk: [`CHUNK_MARKER`], then bincode of (message, save date) pairs.
pub fn encode_message_chunk(messages: &[MessageMeta], limit: u64) -> Result<Vec<u8>, String> {
    let pairs: Vec<SavedMessageRef<'_>> = messages
        .iter()
        .map(|m| SavedMessageRef(m, m.saved_at))
        .collect();
    let mut bytes = CHUNK_MARKER.to_vec();
    chunk_codec(limit)
        .serialize_into(&mut bytes, &pairs)
        .map_err(|e| format!("cannot encode the state: {e}"))?;
    Ok(bytes)
}

/// Decodes a message chunk written by [`encode_message_chunk`], or, without its marker, one
/// written before save dates (with `legacy`, every save date unknown).
pub fn decode_message_chunk(
    bytes: &[u8],
    legacy: impl FnOnce(&[u8]) -> Result<Vec<MessageMeta>, String>,
) -> Result<Vec<MessageMeta>, String> {
    let Some(rest) = bytes.strip_prefix(&CHUNK_MARKER) else {
        if bytes.first() == Some(&CHUNK_MARKER[0]) {
            return Err("message chunk of an unknown format (written by a newer version)".into());
        }
        return legacy(bytes);
    };
    let pairs: Vec<SavedMessage> = chunk_codec(rest.len() as u64)
        .deserialize(rest)
        .map_err(|e| format!("snapshot section messages is corrupt: {e}"))?;
    Ok(pairs
        .into_iter()
        .map(|SavedMessage(mut meta, saved_at)| {
            meta.saved_at = saved_at;
            meta
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::command::{BodyV1, Command};
    use crate::store::{BlobId, FlagSet, MailboxId};

    const ACCOUNT: &str = "saver@example.org";

    fn body(byte: u8) -> BodyV1 {
        BodyV1 {
            blob: BlobId([byte; 32]),
            raw_size: 10,
            compressed: vec![byte; 4],
        }
    }

    /// A state with one account (id 1), its INBOX and a second mailbox.
    fn state() -> (State, MailboxId, MailboxId) {
        let mut state = State::default();
        let setup = [
            CommandV1::AddDomain {
                domain: "example.org".into(),
            },
            CommandV1::AddAccount {
                address: ACCOUNT.into(),
                password_hash: "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
                    .into(),
                now: 1_000,
            },
        ];
        for command in setup {
            let outcome = state.apply(command);
            assert!(
                !matches!(outcome.response, Response::Refused(_)),
                "{:?}",
                outcome.response
            );
        }
        let account = state.account_id_of(ACCOUNT).unwrap();
        let outcome = state.apply(CommandV1::CreateMailbox {
            account,
            name: "Later".into(),
            special_use: None,
            now: 1_000,
        });
        let Response::Mailbox(other) = outcome.response else {
            panic!("{:?}", outcome.response)
        };
        let inbox = state.accounts[&account].inbox_id().unwrap();
        (state, inbox, other)
    }

    fn saved_dates(state: &State, mailbox: MailboxId) -> Vec<(u32, u32)> {
        let account = state.account_id_of(ACCOUNT).unwrap();
        state.accounts[&account].mailboxes[&mailbox]
            .messages
            .iter()
            .map(|m| (m.uid, m.saved_at))
            .collect()
    }

    fn append(mailbox: MailboxId, internal_date: i64, byte: u8) -> CommandV1 {
        CommandV1::Append {
            account: 1,
            mailbox,
            flags: FlagSet::new(),
            internal_date,
            internal_date_offset_min: 0,
            body: body(byte),
        }
    }

    fn saved(saved_at: i64, command: SavedCommand) -> CommandV11 {
        CommandV11::Saved { saved_at, command }
    }

    #[test]
    fn message_meta_keeps_its_size() {
        // The save date lives in the struct's padding: a u32 more must not cost a word.
        #[cfg(target_pointer_width = "64")]
        assert_eq!(std::mem::size_of::<MessageMeta>(), 88);
    }

    #[test]
    fn append_copy_move_and_delivery_take_the_proposers_time() {
        let (mut state, inbox, later) = state();
        // APPEND with an old internal date: saved at the wrapper's time, not at it.
        let outcome = state.apply_v11(saved(
            2_000_000_000,
            SavedCommand::V1(append(inbox, 1_000_000, 1)),
        ));
        assert!(matches!(
            outcome.response,
            Response::Appended { uid: 1, .. }
        ));
        // A delivery saves at its own received_at.
        let outcome = state.apply(CommandV1::Deliver {
            mail_from: "a@b.example".into(),
            recipients: vec![ACCOUNT.into()],
            received_at: 2_000_000_100,
            body: body(2),
        });
        assert!(matches!(outcome.response, Response::Delivered(_)));
        assert_eq!(
            saved_dates(&state, inbox),
            vec![(1, 2_000_000_000), (2, 2_000_000_100)]
        );
        // COPY later: the copy is saved later, the original keeps its date.
        state.apply_v11(saved(
            2_000_000_200,
            SavedCommand::V1(CommandV1::Copy {
                account: 1,
                from: inbox,
                uids: vec![(1, 1)],
                to: later,
                remove_source: false,
            }),
        ));
        // MOVE: the moved message is saved at the MOVE's time.
        state.apply_v11(saved(
            2_000_000_300,
            SavedCommand::V1(CommandV1::Copy {
                account: 1,
                from: inbox,
                uids: vec![(2, 2)],
                to: later,
                remove_source: true,
            }),
        ));
        assert_eq!(saved_dates(&state, inbox), vec![(1, 2_000_000_000)]);
        assert_eq!(
            saved_dates(&state, later),
            vec![(1, 2_000_000_200), (2, 2_000_000_300)]
        );
        // The internal date is untouched by all this.
        let account = state.account_id_of(ACCOUNT).unwrap();
        assert_eq!(
            state.accounts[&account].mailboxes[&later].messages[0].internal_date,
            1_000_000
        );
        // The clock is the command's only: a later unwrapped APPEND (an old log) is unknown.
        state.apply(append(inbox, 5, 3));
        assert_eq!(saved_dates(&state, inbox), vec![(1, 2_000_000_000), (3, 0)]);
    }

    #[test]
    fn multiappend_takes_the_proposers_time_and_other_commands_are_refused() {
        let (mut state, inbox, _) = state();
        let message = |byte| crate::store::multiappend_state::NewMessage {
            flags: FlagSet::new(),
            internal_date: 7,
            internal_date_offset_min: 0,
            body: body(byte),
        };
        let outcome = state.apply_v11(saved(
            1_900_000_000,
            SavedCommand::V9(CommandV9::AppendMany {
                account: 1,
                mailbox: inbox,
                messages: vec![message(1), message(2)],
            }),
        ));
        assert!(matches!(outcome.response, Response::AppendedMany { .. }));
        assert_eq!(
            saved_dates(&state, inbox),
            vec![(1, 1_900_000_000), (2, 1_900_000_000)]
        );
        let before = state.clone();
        let outcome = state.apply_v11(saved(
            5,
            SavedCommand::V1(CommandV1::AddDomain {
                domain: "other.example".into(),
            }),
        ));
        assert!(matches!(
            outcome.response,
            Response::Refused(ApplyError::Invalid(_))
        ));
        assert_eq!(state, before);
    }

    #[test]
    fn replicas_applying_the_same_log_agree() {
        // Apply takes the time from the command alone: two replicas, applying at different
        // moments, hold the same save dates (and a refused command leaves no clock behind).
        let commands = |inbox, later| {
            vec![
                Command::V11(saved(1_800_000_000, SavedCommand::V1(append(inbox, 3, 1)))),
                Command::V11(saved(
                    1_800_000_050,
                    SavedCommand::V1(append(MailboxId::MAX, 3, 2)),
                )),
                Command::V11(saved(
                    1_800_000_100,
                    SavedCommand::V1(CommandV1::Copy {
                        account: 1,
                        from: inbox,
                        uids: vec![(1, 1)],
                        to: later,
                        remove_source: false,
                    }),
                )),
                Command::V1(append(later, 3, 3)),
            ]
        };
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let (mut state, inbox, later) = state();
            for command in commands(inbox, later) {
                let bytes = crate::store::command::encode_command(&command).unwrap();
                match crate::store::command::decode_command(&bytes).unwrap() {
                    Command::V11(command) => state.apply_v11(command),
                    Command::V1(command) => state.apply(command),
                    other => panic!("{other:?}"),
                };
            }
            assert_eq!(saved_dates(&state, later), vec![(1, 1_800_000_100), (2, 0)]);
            replicas.push(state);
        }
        assert_eq!(replicas[0], replicas[1]);
    }

    #[test]
    fn save_dates_survive_a_snapshot_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = crate::store::blob::BlobStore::open(dir.path().join("blobs")).unwrap();
        let chunks =
            crate::store::snapshot_chunks::ChunkStore::open(dir.path().join("chunks")).unwrap();
        let (mut state, inbox, later) = state();
        state.apply_v11(saved(1_750_000_000, SavedCommand::V1(append(inbox, 9, 1))));
        state.apply(append(inbox, 9, 2));
        state.apply_v11(saved(
            1_750_000_500,
            SavedCommand::V1(CommandV1::Copy {
                account: 1,
                from: inbox,
                uids: vec![(1, 2)],
                to: later,
                remove_source: true,
            }),
        ));
        let mut bytes = Vec::new();
        crate::store::snapshot::write_snapshot(&state, &chunks, &mut bytes).unwrap();
        let restored =
            crate::store::snapshot::read_snapshot(&mut bytes.as_slice(), &blobs, &chunks, true)
                .unwrap();
        assert_eq!(
            saved_dates(&restored, later),
            vec![(1, 1_750_000_500), (2, 1_750_000_500)]
        );
        let account = state.account_id_of(ACCOUNT).unwrap();
        assert_eq!(
            restored.accounts[&account].mailboxes[&later].messages,
            state.accounts[&account].mailboxes[&later].messages
        );
    }

    #[test]
    fn save_dates_survive_a_backup_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = crate::store::blob::BlobStore::open(dir.path().join("blobs")).unwrap();
        let (mut state, inbox, later) = state();
        state.apply_v11(saved(1_750_000_000, SavedCommand::V1(append(inbox, 9, 1))));
        state.apply(append(inbox, 9, 2));
        state.apply_v11(saved(1_750_000_700, SavedCommand::V1(append(later, 9, 3))));
        let view = crate::store::backup_state::BackupView {
            state: state.clone(),
            applied_index: 0,
            _guard: blobs.begin_read(),
            blobs,
        };
        let bytes = view.encode_meta().unwrap();
        let meta = crate::store::backup_state::BackupMeta::decode(&bytes).unwrap();
        let restored = meta.account_mail(ACCOUNT, None).unwrap();
        let dates: Vec<(String, Vec<u32>)> = restored
            .into_iter()
            .filter(|(_, messages)| !messages.is_empty())
            .map(|(name, messages)| (name, messages.iter().map(|m| m.saved_at).collect()))
            .collect();
        assert_eq!(
            dates,
            vec![
                ("INBOX".to_string(), vec![1_750_000_000, 0]),
                ("Later".to_string(), vec![1_750_000_700]),
            ]
        );
    }

    #[test]
    fn save_times_are_clamped_to_what_a_message_holds() {
        assert_eq!(saved_at_of(-5), 0);
        assert_eq!(saved_at_of(1_700_000_000), 1_700_000_000);
        assert_eq!(saved_at_of(i64::MAX), u32::MAX);
    }

    #[test]
    fn chunks_round_trip_and_old_chunks_still_decode() {
        let messages: Vec<MessageMeta> = (1..=300u32)
            .map(|uid| MessageMeta {
                uid,
                blob: BlobId([uid as u8; 32]),
                size: uid,
                internal_date: i64::from(uid),
                internal_date_offset_min: 60,
                flags: FlagSet::new(),
                modseq: u64::from(uid) + 1,
                saved_at: if uid % 7 == 0 { 0 } else { 1_700_000_000 + uid },
            })
            .collect();
        let bytes = encode_message_chunk(&messages, 1 << 20).unwrap();
        assert_eq!(bytes[..2], CHUNK_MARKER);
        let decoded = decode_message_chunk(&bytes, |_| panic!("not a legacy chunk")).unwrap();
        assert_eq!(decoded, messages);
        // A chunk written before save dates (plain bincode of the list) never starts with
        // the marker's first byte, whatever its length, and decodes through `legacy`.
        for count in [1usize, 250, 251, 300] {
            let old = chunk_codec(1 << 20)
                .serialize(&messages[..count.min(messages.len())])
                .unwrap();
            assert_ne!(old[0], CHUNK_MARKER[0]);
            let decoded = decode_message_chunk(&old, |bytes| {
                chunk_codec(bytes.len() as u64)
                    .deserialize::<Vec<MessageMeta>>(bytes)
                    .map_err(|e| e.to_string())
            })
            .unwrap();
            assert_eq!(decoded.len(), count.min(messages.len()));
            assert!(decoded.iter().all(|m| m.saved_at == 0));
        }
        // A marker of a later format is refused, not guessed at.
        assert!(decode_message_chunk(&[0xFF, 2, 0], |_| Ok(Vec::new())).is_err());
        assert!(decode_message_chunk(&[0xFF, 1, 0xFF], |_| Ok(Vec::new())).is_err());
    }
}
