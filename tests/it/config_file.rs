//! `config/kermail.toml` (every key, commented, with its default) parses and passes
//! `kermail serve --config FILE --check`; a file with a mistake is refused.

use std::path::Path;
use std::process::Command;

use crate::harness::KERMAIL;

#[test]
fn shipped_config_passes_check() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kermail.toml");
    assert!(path.exists(), "{} is missing", path.display());
    let out = Command::new(KERMAIL)
        .args(["serve", "--check", "--config"])
        .arg(&path)
        .output()
        .expect("run kermail");
    assert!(
        out.status.success(),
        "kermail serve --check refused {}:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn config_with_an_unknown_key_or_bad_value_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in [
        (
            "unknown-key.toml",
            "[smtp]\nlisten = [\"127.0.0.1:2525\"]\nno_such_key = 1\n",
        ),
        ("bad-value.toml", "[smtp]\nlisten = \"not a list\"\n"),
        ("not-toml.toml", "[node\ndata_dir = \n"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        let out = Command::new(KERMAIL)
            .args(["serve", "--check", "--config"])
            .arg(&path)
            .output()
            .expect("run kermail");
        assert!(!out.status.success(), "{name} accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(name),
            "{name}: the message should name the file: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
