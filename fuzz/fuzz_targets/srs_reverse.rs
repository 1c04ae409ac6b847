//! SRS parsing: an arbitrary address through `srs_reverse` never panics, and an address it
//! accepts is one `srs_rewrite` made under the same key (the original comes back intact).
//!
//! Input layout: bytes 0..8 = "now" in seconds (little endian), the rest = the address.
#![no_main]

use kermail::store::{looks_like_srs, srs_reverse, srs_rewrite, SrsKey};
use libfuzzer_sys::fuzz_target;

const KEY: SrsKey = SrsKey([42; 32]);

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let mut now = [0u8; 8];
    now.copy_from_slice(&data[..8]);
    let now_secs = i64::from_le_bytes(now);
    let Ok(address) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    let _ = looks_like_srs(address);
    if let Some(original) = srs_reverse(&KEY, address, now_secs) {
        // Only a well-formed SRS0 address with the right hash gets here.
        assert!(looks_like_srs(address));
        assert!(original.contains('@'));
    }
    // Rewriting any sender, then reversing it the same day, gives the sender back
    // (lowercased local part is hashed; the local part itself is kept).
    if let Some((local, domain)) = address.rsplit_once('@') {
        if !local.is_empty() && !domain.is_empty() && !domain.contains('=') {
            let rewritten = srs_rewrite(&KEY, address, "example.org", now_secs);
            assert!(srs_reverse(&KEY, &rewritten, now_secs).is_some());
        }
    }
});
