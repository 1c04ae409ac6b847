//! Headers of recently read messages, shared by all sessions of a listener, so header
//! fetches and header searches over a whole mailbox do not read and decompress every body.
//! Bodies are immutable and content-addressed, so an entry never goes stale.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::BlobId;

pub struct HeaderCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<BlobId, Arc<[u8]>>,
    bytes: usize,
}

impl HeaderCache {
    pub fn new(max_bytes: usize) -> HeaderCache {
        HeaderCache {
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn get(&self, blob: &BlobId) -> Option<Arc<[u8]>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.map.get(blob).cloned()
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
