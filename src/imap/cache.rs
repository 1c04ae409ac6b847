//! Headers of recently read messages, shared by all sessions of a listener, so header
//! fetches and header searches over a whole mailbox do not read and decompress every body.
//! Bodies are immutable and content-addressed, so an entry never goes stale.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use super::fetch::top_header;
use crate::store::{AccountId, BlobId, MailStore, MailboxId, MessageList};

/// Most messages whose headers a SELECT warms in the background (the newest ones).
const WARM_MAX_MESSAGES: usize = 20_000;

/// Hashes a [`BlobId`] by its first 8 bytes: ids are BLAKE3 digests, already uniform, so
/// SipHash over all 32 bytes (a quarter of a warm header fetch's time) buys nothing. Bodies
/// are content-addressed by the server, so a client cannot choose colliding ids cheaply.
#[derive(Default)]
pub(super) struct BlobIdHasher(u64);

impl Hasher for BlobIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // A [u8; 32] is hashed as its length (a usize) then its bytes; keep the first 8
        // bytes of the id.
        for &b in bytes.iter().take(8) {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_usize(&mut self, _len: usize) {}
}

pub struct HeaderCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
    /// Recent SORT and THREAD answers (shared by the same sessions).
    pub orders: super::order_cache::OrderCache,
    /// SORT and THREAD keys by message body (shared by the same sessions), bounded by half
    /// the header cache's bytes: keys are a small part of a header.
    pub keys: super::sort_keys::SortKeyCache,
}

#[derive(Default)]
struct Inner {
    /// Mailboxes being warmed right now (at most one warmer each).
    warming: std::collections::HashSet<(AccountId, MailboxId)>,
    map: HashMap<BlobId, Arc<[u8]>, BuildHasherDefault<BlobIdHasher>>,
    bytes: usize,
}

impl HeaderCache {
    pub fn new(max_bytes: usize) -> HeaderCache {
        HeaderCache {
            max_bytes,
            inner: Mutex::new(Inner::default()),
            orders: Default::default(),
            keys: super::sort_keys::SortKeyCache::new(max_bytes / 2),
        }
    }

    pub fn get(&self, blob: &BlobId) -> Option<Arc<[u8]>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.map.get(blob).cloned()
    }

    /// The headers of `blobs`, from the cache or read (concurrently) and cached.
    pub async fn headers_of(&self, store: &MailStore, blobs: &[BlobId]) -> Vec<Option<Arc<[u8]>>> {
        let mut headers: Vec<Option<Arc<[u8]>>> = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            blobs.iter().map(|b| inner.map.get(b).cloned()).collect()
        };
        let missing: Vec<usize> = (0..blobs.len()).filter(|&k| headers[k].is_none()).collect();
        if missing.is_empty() {
            return headers;
        }
        let to_read: Vec<BlobId> = missing.iter().map(|&k| blobs[k]).collect();
        let bodies = read_bodies(store, &to_read).await;
        for (k, body) in missing.into_iter().zip(bodies) {
            if let Some(body) = body {
                let header: Arc<[u8]> = Arc::from(top_header(&body));
                self.insert(blobs[k], Arc::clone(&header));
                headers[k] = Some(header);
            }
        }
        headers
    }

    /// After a SELECT: reads the headers the cache lacks in the background, newest messages
    /// first, so the header fetches and searches that usually follow find them.
    pub fn warm(
        self: &Arc<Self>,
        store: &MailStore,
        account: AccountId,
        mailbox: MailboxId,
        messages: &MessageList,
    ) {
        if self.max_bytes == 0 || messages.is_empty() {
            return;
        }
        // Only the ids are kept: holding the message list itself would make the store copy
        // it on every change while the warmer runs.
        let newest: Vec<BlobId> = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            messages
                .iter()
                .rev()
                .take(WARM_MAX_MESSAGES)
                .map(|m| m.blob)
                .filter(|blob| !inner.map.contains_key(blob))
                .collect()
        };
        if newest.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if !inner.warming.insert((account, mailbox)) {
                return;
            }
        }
        let cache = Arc::clone(self);
        let store = store.clone();
        runtime.spawn(async move {
            for chunk in newest.chunks(BODY_BATCH) {
                if chunk.iter().all(|blob| cache.get(blob).is_some()) {
                    continue;
                }
                cache.headers_of(&store, chunk).await;
            }
            let mut inner = cache.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.warming.remove(&(account, mailbox));
        });
    }

    pub fn insert(&self, blob: BlobId, header: Arc<[u8]>) {
        if header.len() > self.max_bytes / 4 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.bytes + header.len() > self.max_bytes {
            // Simplest bounded policy: start over. A mailbox scan refills it in one pass.
            inner.map.clear();
            inner.bytes = 0;
        }
        inner.bytes += header.len();
        if let Some(previous) = inner.map.insert(blob, header) {
            inner.bytes -= previous.len();
        }
    }
}

/// Most remembered logins; the cache starts over when full.
const AUTH_CACHE_MAX_ENTRIES: usize = 10_000;

/// Recently verified logins, so that a client reconnecting often does not pay an argon2id
/// verification each time. Keys are keyed BLAKE3 hashes of (address, password) under a
/// per-process random key: no password is kept. An entry lives `ttl`, which is also how long
/// an old password keeps working for repeat logins after a password change.
pub struct AuthCache {
    key: [u8; 32],
    ttl: std::time::Duration,
    entries: Mutex<HashMap<[u8; 32], (crate::store::AccountId, std::time::Instant)>>,
}

impl AuthCache {
    pub fn new(ttl: std::time::Duration) -> AuthCache {
        AuthCache {
            key: rand::random(),
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn digest(&self, address: &str, password: &str) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(address.to_lowercase().as_bytes());
        hasher.update(&[0]);
        hasher.update(password.as_bytes());
        *hasher.finalize().as_bytes()
    }

    pub fn get(&self, address: &str, password: &str) -> Option<crate::store::AccountId> {
        if self.ttl.is_zero() {
            return None;
        }
        let digest = self.digest(address, password);
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (account, at) = entries.get(&digest)?;
        (at.elapsed() < self.ttl).then_some(*account)
    }

    pub fn insert(&self, address: &str, password: &str, account: crate::store::AccountId) {
        if self.ttl.is_zero() {
            return;
        }
        let digest = self.digest(address, password);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= AUTH_CACHE_MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(digest, (account, std::time::Instant::now()));
    }
}

/// Messages whose bodies are read concurrently before their responses are written: enough
/// to keep the blocking pool busy, few enough to bound memory.
pub const BODY_BATCH: usize = 64;

/// Bodies read by one blocking task: enough to amortise the task, small enough that a
/// batch is split over the cores.
const BODIES_PER_READ_TASK: usize = 16;

/// Reads the bodies of `blobs`; `None` for a body that cannot be read (logged by the store).
/// Cached bodies come without any task; the others are read in groups of
/// [`BODIES_PER_READ_TASK`], the groups concurrently.
pub async fn read_bodies(store: &MailStore, blobs: &[BlobId]) -> Vec<Option<Arc<Vec<u8>>>> {
    let mut bodies: Vec<Option<Arc<Vec<u8>>>> =
        blobs.iter().map(|blob| store.cached_body(blob)).collect();
    let missing: Vec<usize> = (0..blobs.len()).filter(|&k| bodies[k].is_none()).collect();
    if missing.is_empty() {
        return bodies;
    }
    let mut reads = tokio::task::JoinSet::new();
    for group in missing.chunks(BODIES_PER_READ_TASK) {
        let store = store.clone();
        let group = group.to_vec();
        let wanted: Vec<BlobId> = group.iter().map(|&k| blobs[k]).collect();
        reads.spawn(async move { (group, store.bodies(wanted).await) });
    }
    while let Some(joined) = reads.join_next().await {
        match joined {
            Ok((group, read)) => {
                for (k, body) in group.into_iter().zip(read) {
                    bodies[k] = body;
                }
            }
            Err(error) => tracing::warn!(%error, "body read task failed"),
        }
    }
    bodies
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_cache_needs_the_same_password_and_expires() {
        let cache = AuthCache::new(std::time::Duration::from_secs(60));
        cache.insert("A@example.org", "secret one", 7);
        assert_eq!(cache.get("a@example.org", "secret one"), Some(7));
        assert_eq!(cache.get("a@example.org", "secret two"), None);
        let disabled = AuthCache::new(std::time::Duration::ZERO);
        disabled.insert("a@example.org", "secret one", 7);
        assert_eq!(disabled.get("a@example.org", "secret one"), None);
    }

    #[test]
    fn header_cache_stays_within_its_bound() {
        let cache = HeaderCache::new(100);
        for i in 0..50u8 {
            cache.insert(BlobId([i; 32]), Arc::from(&[i; 20][..]));
            let inner = cache.inner.lock().unwrap();
            assert!(inner.bytes <= 100);
        }
    }
}
