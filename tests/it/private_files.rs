//! The node's data stays private: every file 0600 and every folder 0700 whatever the umask it
//! was started with and whoever created the data folder, and the admin socket answers only
//! root and the node's own user even when its mode has been loosened.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::harness::{files_under, python_output, Node, PASSWORD, USER};

fn mode_of(path: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn data_files_are_private_whatever_the_umask_and_the_folders_creator() {
    let mut node = Node::create();
    // An admin prepared the folder with a permissive umask, and an older version left a
    // readable file in it.
    std::fs::create_dir_all(node.data_dir.join("old")).expect("mkdir");
    std::fs::set_permissions(&node.data_dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::set_permissions(
        node.data_dir.join("old"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let leftover = node.data_dir.join("old").join("leftover");
    std::fs::write(&leftover, b"x").expect("write");
    std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o644)).expect("chmod");

    node.set_wrapper(&[
        "sh",
        "-c",
        "umask 000; exec \"$@\"",
        "kermail-under-umask-000",
    ]);
    node.spawn();
    node.add_account(USER, PASSWORD);
    // A delivery writes bodies, the log and (on a new account) state.
    let out = node.py(
        "s = smtp(); s.sendmail('a@else.test', [USER], b'Subject: private\\r\\n\\r\\nbody\\r\\n'); s.quit(); print('sent')",
        &[],
    );
    assert!(out.contains("sent"), "{out}");

    let mut paths = files_under(&node.data_dir);
    paths.push(node.data_dir.clone());
    let mut dirs = vec![node.data_dir.clone()];
    for path in &paths {
        let mut parent = path.parent();
        while let Some(dir) = parent {
            if !dir.starts_with(&node.data_dir) {
                break;
            }
            dirs.push(dir.to_path_buf());
            parent = dir.parent();
        }
    }
    dirs.sort();
    dirs.dedup();
    let mut open = Vec::new();
    for path in paths.iter().chain(dirs.iter()) {
        let mode = mode_of(path);
        if mode & 0o077 != 0 {
            open.push(format!("{} {:o}", path.display(), mode));
        }
    }
    assert!(
        open.is_empty(),
        "files or folders readable by others: {open:?}"
    );
    assert_eq!(mode_of(&node.data_dir), 0o700);
    assert_eq!(mode_of(&leftover), 0o600);
}

#[test]
fn the_admin_socket_refuses_other_users_even_when_its_mode_is_loosened() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to connect as another user");
        return;
    }
    let node = Node::start();
    let socket = node.data_dir.join("admin.sock");
    // Someone loosens the modes by hand.
    std::fs::set_permissions(&node.data_dir, std::fs::Permissions::from_mode(0o711))
        .expect("chmod");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    std::fs::set_permissions(node.dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod");

    let script = r#"
import os, socket, sys
path, uid = sys.argv[1], int(sys.argv[2])
if uid:
    os.setgid(65534); os.setuid(uid)
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
s.connect(path)
data = b''
try:
    s.sendall(b'{"op": "status"}\n')
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except (ConnectionResetError, BrokenPipeError):
    pass
print('ANSWER' if data else 'CLOSED', data[:200])
"#;
    let path = socket.display().to_string();
    let nobody = python_output(script, &[&path, "65534"]);
    let nobody_out = String::from_utf8_lossy(&nobody.stdout);
    assert!(
        nobody_out.starts_with("CLOSED"),
        "uid 65534 was not refused: {nobody_out} {}",
        String::from_utf8_lossy(&nobody.stderr)
    );
    let root = python_output(script, &[&path, "0"]);
    let root_out = String::from_utf8_lossy(&root.stdout);
    assert!(
        root_out.starts_with("ANSWER"),
        "root got no answer: {root_out} {}",
        String::from_utf8_lossy(&root.stderr)
    );
    crate::harness::wait_for("the refusal in the log", Duration::from_secs(10), || {
        node.stderr()
            .contains("admin connection refused")
            .then_some(())
    });
}
