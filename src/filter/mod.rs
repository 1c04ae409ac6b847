//! Checks of incoming mail on the MX listener (issue 12): SPF (RFC 7208) for the HELO and
//! MAIL FROM identities, DKIM (RFC 6376) for every signature, the ARC chain (RFC 8617,
//! reported, decides nothing), DMARC (RFC 7489) with the
//! organisational domain from the public suffix list, all through mail-auth; the verdict
//! becomes an `Authentication-Results` field (RFC 8601) prepended to the message, and a
//! disposition (deliver, Junk, refuse, defer).
//!
//! Module map:
//! - [`inbound`]: `[inbound]` ([`InboundConfig`]), [`InboundAuth`] (the resolver, its caches
//!   and the checks), [`Disposition`].
//! - [`spam`]: `[spam]` ([`SpamConfig`]), [`SpamFilter`]: the scoring rules (authentication
//!   results, DNSBL, header sanity, HTML-only, URLs, GTUBE, Bayes), `X-Spam-Status`, the
//!   Bayes tokenizer; [`rspamd`]: the `/checkv2` client of the rspamd backend.
//! - [`headers`]: removal of forged `Authentication-Results` fields carrying our authserv-id
//!   (pure, unit-tested).
//!
//! Invariants:
//! - Only the MX listener's unauthenticated deliveries are checked; submissions never are.
//! - The header is added to the message BEFORE it is proposed, so every replica stores the
//!   same bytes (the checks use DNS and time: never in apply).
//! - A DNS failure (timeout, SERVFAIL) in any authentication check is `451 4.7.x`, never a
//!   silent pass (a DNSBL that fails counts as not listed: an opinion, not an
//!   authentication).
//! - Spam scores are computed before proposing; apply only counts Bayes tokens.

pub mod headers;
pub mod inbound;
pub mod rspamd;
pub mod spam;

pub use inbound::{Disposition, InboundAuth, InboundConfig};
pub use spam::{SpamConfig, SpamFilter};
