//! Helpers the supervisor's integration tests share: a real journald to log to and query.

#![allow(dead_code, clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// A journald to test against: the running one, or one started by hand (as root) once per
/// test process. A socket left by a journald that died is cleared first: sending to it
/// succeeds at nothing.
pub fn journald(test: &str) -> bool {
    static STARTED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut started = STARTED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let listening = kiln_supervisor::log::journald_listening;
    if !listening()
        && !*started
        && nix::unistd::geteuid().is_root()
        && Path::new("/lib/systemd/systemd-journald").exists()
    {
        let _ = std::fs::remove_file(kiln_supervisor::log::JOURNALD_SOCKET);
        let _ = Command::new("/lib/systemd/systemd-journald")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn();
        *started = true;
        for _ in 0..100 {
            if listening() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    let ok = listening() && Command::new("journalctl").arg("--version").output().is_ok();
    if !ok {
        assert!(
            std::env::var("KILN_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "{test}: no journald and KILN_REQUIRE_TOOLS=1"
        );
        eprintln!("SKIP {test}: no journald listening (start /lib/systemd/systemd-journald as root)");
    }
    ok
}

/// Journal entries with this MESSAGE_ID for this model, as JSON objects. journald reads its
/// socket on its own schedule: ask a few times before concluding there is none.
pub fn journal(message_id: &str, model: &str, since: &str) -> Vec<serde_json::Value> {
    journal_matching(message_id, &format!("MODEL={model}"), since)
}

/// Journal entries with this MESSAGE_ID and the journalctl match `filter` (`FIELD=value`).
pub fn journal_matching(message_id: &str, filter: &str, since: &str) -> Vec<serde_json::Value> {
    for _ in 0..50 {
        let _ = Command::new("journalctl").arg("--sync").output();
        let out = Command::new("journalctl")
            .args(["--no-pager", "-o", "json", "--since", since, &format!("MESSAGE_ID={message_id}"), filter])
            .output()
            .unwrap();
        let entries: Vec<serde_json::Value> =
            String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        if !entries.is_empty() {
            return entries;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Vec::new()
}

pub fn since() -> String {
    let out = Command::new("date").args(["+%Y-%m-%d %H:%M:%S"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
