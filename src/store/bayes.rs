//! The server's Bayes classifier state (issue 12, spam scoring): token counts learned from the
//! users' moves into and out of Junk, in the replicated state so that every node scores alike.
//!
//! Tokens are 64-bit hashes computed by the proposer (`crate::filter::spam::tokens`); apply
//! only adds counts, in a `BTreeMap`, and bounds the table by a constant (never by a node's
//! configuration), so every replica holds the same table after the same commands.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::command::Response;
use super::state::{Effects, Outcome, State};
use super::MailStore;

/// Snapshot section carrying [`BayesState`].
pub const SECTION_BAYES: &str = "bayes";

/// Most distinct tokens the table keeps. Past it, apply drops the tokens seen once, then, if
/// still over, halves every count (dropping zeros): deterministic, and old rare tokens go
/// first.
pub const BAYES_MAX_TOKENS: usize = 1_000_000;

/// Most tokens one learned message contributes (the proposer cuts; apply checks).
pub const BAYES_MAX_TOKENS_PER_MESSAGE: usize = 2_000;

/// Most messages one move into or out of Junk teaches (the first ones of the set).
pub const BAYES_MAX_MESSAGES_PER_LESSON: usize = 200;

/// Token counts: token -> (spam messages, ham messages) containing it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BayesState {
    pub spam_learned: u64,
    pub ham_learned: u64,
    pub tokens: BTreeMap<u64, (u32, u32)>,
}

/// Bayes commands (`Command::V8`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV8 {
    /// Learn messages as spam (moved into Junk) or ham (moved out of it): each entry is one
    /// message's distinct tokens.
    Learn { spam: bool, messages: Vec<Vec<u64>> },
}

/// What the scorer needs for one message: the learned totals and each token's counts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BayesCounts {
    pub spam_learned: u64,
    pub ham_learned: u64,
    /// (spam, ham) of each token asked about, in the order asked (0, 0 when unknown).
    pub tokens: Vec<(u32, u32)>,
}

impl BayesState {
    fn learn(&mut self, spam: bool, messages: Vec<Vec<u64>>) {
        self.learn_bounded(spam, messages, BAYES_MAX_TOKENS);
    }

    fn learn_bounded(&mut self, spam: bool, messages: Vec<Vec<u64>>, max_tokens: usize) {
        for tokens in messages {
            if spam {
                self.spam_learned += 1;
            } else {
                self.ham_learned += 1;
            }
            for token in tokens.into_iter().take(BAYES_MAX_TOKENS_PER_MESSAGE) {
                let counts = self.tokens.entry(token).or_insert((0, 0));
                if spam {
                    counts.0 = counts.0.saturating_add(1);
                } else {
                    counts.1 = counts.1.saturating_add(1);
                }
            }
        }
        if self.tokens.len() > max_tokens {
            self.tokens
                .retain(|_, (s, h)| u64::from(*s) + u64::from(*h) > 1);
        }
        if self.tokens.len() > max_tokens {
            self.tokens.retain(|_, (s, h)| {
                *s /= 2;
                *h /= 2;
                *s + *h > 0
            });
        }
    }

    pub fn counts(&self, tokens: &[u64]) -> BayesCounts {
        BayesCounts {
            spam_learned: self.spam_learned,
            ham_learned: self.ham_learned,
            tokens: tokens
                .iter()
                .map(|t| self.tokens.get(t).copied().unwrap_or((0, 0)))
                .collect(),
        }
    }
}

impl State {
    pub fn apply_v8(&mut self, command: CommandV8) -> Outcome {
        match command {
            CommandV8::Learn { spam, messages } => self.bayes.learn(spam, messages),
        }
        Outcome {
            response: Response::Done,
            effects: Effects::default(),
        }
    }
}

impl MailStore {
    /// The Bayes counts of `tokens` in this node's replica.
    pub fn bayes_counts(&self, tokens: &[u64]) -> BayesCounts {
        self.state().bayes.counts(tokens)
    }

    /// Whether copying or moving `uids` from `from` to `to` teaches the classifier (spam
    /// into Junk, ham out of Junk to anything but Trash), and the bodies it would learn:
    /// only when this node scores with Bayes.
    pub(super) fn bayes_lesson(
        &self,
        account: super::AccountId,
        from: super::MailboxId,
        uids: &[super::Uid],
        to: super::MailboxId,
    ) -> Option<(bool, Vec<super::BlobId>)> {
        use super::SpecialUse;
        if !self
            .filter_settings()
            .spam
            .as_ref()
            .is_some_and(|spam| spam.learns())
        {
            return None;
        }
        let state = self.state();
        let mailboxes = &state.accounts.get(&account)?.mailboxes;
        let from_box = mailboxes.get(&from)?;
        let to_use = mailboxes.get(&to)?.special_use;
        let from_junk = from_box.special_use == Some(SpecialUse::Junk);
        let spam = match (from_junk, to_use) {
            (false, Some(SpecialUse::Junk)) => true,
            (true, Some(SpecialUse::Junk | SpecialUse::Trash)) => return None,
            (true, _) => false,
            (false, _) => return None,
        };
        let wanted: std::collections::BTreeSet<super::Uid> = uids.iter().copied().collect();
        let blobs: Vec<super::BlobId> = from_box
            .messages
            .iter()
            .filter(|m| wanted.contains(&m.uid))
            .take(BAYES_MAX_MESSAGES_PER_LESSON)
            .map(|m| m.blob)
            .collect();
        Some((spam, blobs))
    }

    /// Reads `blobs`, tokenizes them (before proposing: apply only counts) and proposes the
    /// lesson. A failure costs the lesson only: logged, the move already succeeded.
    pub(super) async fn bayes_train(&self, spam: bool, blobs: Vec<super::BlobId>) {
        let bodies = self.bodies(blobs).await;
        let messages: Vec<Vec<u64>> = bodies
            .iter()
            .flatten()
            .map(|body| crate::filter::spam::tokens(body))
            .collect();
        let n = messages.len();
        match self.bayes_learn(spam, messages).await {
            Ok(()) => tracing::info!(spam, messages = n, "bayes classifier trained"),
            Err(error) => tracing::warn!(%error, spam, "bayes training not recorded"),
        }
    }

    /// Teaches the classifier `bodies` as spam or ham (one command).
    pub async fn bayes_learn(
        &self,
        spam: bool,
        messages: Vec<Vec<u64>>,
    ) -> Result<(), super::StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        self.submit_command(super::command::Command::V8(CommandV8::Learn {
            spam,
            messages,
        }))
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_counts_tokens_per_class_and_stays_bounded_alike() {
        let mut state = BayesState::default();
        state.learn(true, vec![vec![1, 2, 3], vec![2]]);
        state.learn(false, vec![vec![3, 4]]);
        assert_eq!(state.spam_learned, 2);
        assert_eq!(state.ham_learned, 1);
        assert_eq!(
            state.counts(&[2, 3, 9]).tokens,
            vec![(2, 0), (1, 1), (0, 0)]
        );

        let mut big = BayesState::default();
        big.learn_bounded(true, vec![vec![1, 2], vec![1, 3]], 2);
        assert_eq!(
            big.tokens.len(),
            1,
            "tokens seen once dropped past the bound"
        );
        assert_eq!(big.tokens.get(&1), Some(&(2, 0)));
        big.learn_bounded(false, vec![vec![5, 6, 7]], 2);
        assert!(big.tokens.len() <= 2);
    }
}
