//! Snapshot restore: arbitrary bytes as a snapshot stream into a state machine. Never panics,
//! never allocates more than libFuzzer's malloc limit (run with `-malloc_limit_mb`); a failed
//! restore leaves the state unchanged; a successful one gives a state whose own snapshot
//! restores to the same bytes.
//!
//! Input layout: byte 0 = mode; when bit 0 is set the BLAKE3 trailer is computed and appended
//! here, so that the fuzzer reaches the metadata decoding and the state checks behind it.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::sync::{Arc, OnceLock};

use kermail::store::MailStateMachine;
use kermail_cluster::AppStateMachine;
use libfuzzer_sys::fuzz_target;

struct World {
    _dir: tempfile::TempDir,
    machine: Arc<MailStateMachine>,
    other: Arc<MailStateMachine>,
    base: Vec<u8>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary folder");
        let setup = common::setup_commands(&dir.path().join("record"));
        let machine = MailStateMachine::open(&dir.path().join("a")).expect("state machine");
        for (i, command) in setup.iter().enumerate() {
            machine.apply(i as u64 + 1, command);
        }
        let base = common::snapshot(&machine);
        let other = MailStateMachine::open(&dir.path().join("b")).expect("state machine");
        // Seeds: the snapshot without its trailer (mode 1), whole (mode 0), and empty.
        let mut fixed = vec![1u8];
        fixed.extend_from_slice(&base[..base.len() - 32]);
        let mut whole = vec![0u8];
        whole.extend_from_slice(&base);
        let empty = common::snapshot(&other);
        let mut empty_fixed = vec![1u8];
        empty_fixed.extend_from_slice(&empty[..empty.len() - 32]);
        common::maybe_write_seeds(
            "snapshot_restore",
            &[
                ("state-fixed".into(), fixed),
                ("state-whole".into(), whole),
                ("empty-fixed".into(), empty_fixed),
            ],
        );
        World {
            _dir: dir,
            machine,
            other,
            base,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let w = world();
    let mut bytes = stream.to_vec();
    if mode & 1 != 0 {
        bytes.extend_from_slice(blake3::hash(stream).as_bytes());
    }
    match w.machine.restore(&mut bytes.as_slice(), false) {
        Err(_) => assert!(
            common::snapshot(&w.machine) == w.base,
            "a failed restore changed the state"
        ),
        Ok(()) => {
            let written = common::snapshot(&w.machine);
            w.other
                .restore(&mut written.as_slice(), false)
                .expect("a snapshot of a restored state restores");
            assert!(
                common::snapshot(&w.other) == written,
                "a restored state does not survive a second snapshot"
            );
            w.machine
                .restore(&mut w.base.as_slice(), false)
                .expect("the base snapshot restores");
        }
    }
});
