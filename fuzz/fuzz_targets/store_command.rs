//! Store commands: arbitrary bytes as log entries applied to a state machine (first brought
//! to a small realistic state by recorded setup commands). Never panics; a refused command
//! leaves the state (snapshot bytes) unchanged; two replicas applying the same entries give
//! the same responses and the same state.
//!
//! Input layout: entries of `u16 little-endian length | bytes`.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::sync::{Arc, OnceLock};

use kermail::store::{fuzz_response_is_refused, MailStateMachine};
use kermail_cluster::AppStateMachine;
use libfuzzer_sys::fuzz_target;

/// Entries applied per run at most.
const MAX_ENTRIES: usize = 16;

struct World {
    dir: tempfile::TempDir,
    setup: Vec<Vec<u8>>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary folder");
        let setup = common::setup_commands(&dir.path().join("record"));
        let seeds: Vec<(String, Vec<u8>)> = setup
            .iter()
            .enumerate()
            .map(|(i, command)| {
                let mut seed = (command.len() as u16).to_le_bytes().to_vec();
                seed.extend_from_slice(command);
                (format!("command-{i:02}"), seed)
            })
            .collect();
        common::maybe_write_seeds("store_command", &seeds);
        World { dir, setup }
    })
}

fn replica(w: &World, name: &str) -> Arc<MailStateMachine> {
    let machine = MailStateMachine::open(&w.dir.path().join(name)).expect("state machine");
    for (i, command) in w.setup.iter().enumerate() {
        let response = machine.apply(i as u64 + 1, command);
        assert_eq!(fuzz_response_is_refused(&response), Some(false));
    }
    machine
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let mut entries = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 && entries.len() < MAX_ENTRIES {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let len = len.min(rest.len() - 2);
        entries.push(&rest[2..2 + len]);
        rest = &rest[2 + len..];
    }
    let a = replica(w, "a");
    let b = replica(w, "b");
    let mut index = w.setup.len() as u64;
    for entry in entries {
        index += 1;
        let before = common::snapshot(&a);
        let response = a.apply(index, entry);
        let refused = fuzz_response_is_refused(&response);
        assert!(refused.is_some(), "apply answered an undecodable response");
        if refused == Some(true) {
            assert!(
                common::snapshot(&a) == before,
                "a refused command changed the state"
            );
        }
        assert_eq!(
            b.apply(index, entry),
            response,
            "replicas answered differently"
        );
        assert_eq!(a.last_applied_index(), index);
    }
    assert!(
        common::snapshot(&a) == common::snapshot(&b),
        "replicas diverged"
    );
});
