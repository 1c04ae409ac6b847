//! IMAP sequence sets: arbitrary text through `seqset::parse` with an arbitrary largest value.
//! Never panics; the ranges are sorted, disjoint, not touching, inside 1..=max(largest, the
//! numbers written); and for small values they name exactly what expanding the set names.
//!
//! Input layout: bytes 0..4 = largest (little endian), the rest = the set's text.
#![no_main]

use kermail::imap::seqset::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let largest = u32::from_le_bytes([data[0], data[1], data[2], data[3]]).max(1);
    let text = &data[4..];
    let Some(ranges) = parse(text, largest) else {
        return;
    };
    assert!(!ranges.0.is_empty(), "a parsed set names something");
    for &(low, high) in &ranges.0 {
        assert!(1 <= low && low <= high, "bad range {low}:{high}");
    }
    for pair in ranges.0.windows(2) {
        assert!(
            u64::from(pair[0].1) + 1 < u64::from(pair[1].0),
            "ranges overlap or touch: {:?}",
            pair
        );
    }
    // Reference: expand element by element (only when that is cheap).
    if largest <= 1000 {
        let Ok(text) = std::str::from_utf8(text) else {
            return;
        };
        let mut expanded: Vec<u32> = Vec::new();
        for element in text.split(',') {
            let value = |v: &str| {
                if v == "*" {
                    Some(largest)
                } else {
                    v.parse::<u32>().ok()
                }
            };
            let (a, b) = match element.split_once(':') {
                Some((a, b)) => (value(a), value(b)),
                None => (value(element), value(element)),
            };
            let (Some(a), Some(b)) = (a, b) else {
                return;
            };
            let (low, high) = (a.min(b), a.max(b));
            if high - low > 100_000 {
                return;
            }
            expanded.extend(low..=high);
        }
        expanded.sort_unstable();
        expanded.dedup();
        let flat: Vec<u32> = ranges.0.iter().flat_map(|&(l, h)| l..=h).collect();
        assert_eq!(flat, expanded);
    }
});
