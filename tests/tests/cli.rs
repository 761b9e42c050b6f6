//! The `kiln` CLI as users run it: check, render, diff and schema on the real examples.

use std::process::{Command, Output};

use kiln_tests::{EXAMPLES, binary, example, repo_root};

fn kiln(args: &[&str]) -> Output {
    Command::new(binary("kiln")).args(args).current_dir(repo_root()).output().expect("kiln runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn check_accepts_every_example_and_prints_its_budget() {
    for name in EXAMPLES {
        let path = example(name);
        let out = kiln(&["check", path.to_str().expect("utf-8")]);
        assert!(out.status.success(), "{name}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        for row in ["os", "kilnd", "inference", "total", "headroom"] {
            assert!(stdout.lines().any(|l| l.starts_with(row)), "{name}: no `{row}` row in\n{stdout}");
        }
    }
}

#[test]
fn check_rejects_a_broken_spec_with_positions_and_exit_code() {
    let out = kiln(&["check", "spec/tests/fixtures/invalid/unknown-keys.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec/tests/fixtures/invalid/unknown-keys.yaml:8:3: memory.swapiness: unknown key `swapiness`; did you mean `swappiness`?"), "{stderr}");
    assert!(stderr.contains("5 error(s)"), "{stderr}");
    let out = kiln(&["check", "no/such/spec.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no/such/spec.yaml:1:1: cannot read the spec"));
}

#[test]
fn render_refuses_a_directory_that_is_not_a_generation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("precious.txt"), "keep me").expect("write");
    let path = example("generic-x86_64");
    let out = kiln(&["render", path.to_str().expect("utf-8"), "--out", tmp.path().to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not empty and holds no kiln generation"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(tmp.path().join("precious.txt")).expect("kept"), "keep me");
    // A directory holding an earlier generation is replaced as a whole.
    let gen_dir = tmp.path().join("gen");
    for _ in 0..2 {
        let out = kiln(&["render", path.to_str().expect("utf-8"), "--out", gen_dir.to_str().expect("utf-8")]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let leftovers: Vec<_> =
        std::fs::read_dir(tmp.path()).expect("dir").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 2, "staging directories left behind: {leftovers:?}");
}

#[test]
fn diff_explains_what_an_edit_takes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = std::fs::read_to_string(example("pi5-8gb-nvme")).expect("example");
    let edited = src
        .replace("swappiness: 10", "swappiness: 20")
        .replace("arm-freq-mhz: 2800", "arm-freq-mhz: 2600")
        .replace("keep-alive: 30m", "keep-alive: 45m");
    let examples = repo_root().join("examples");
    let edited_path = examples.join(format!(".diff-test-{}.yaml", std::process::id()));
    std::fs::write(&edited_path, edited).expect("write");
    let old_dir = tmp.path().join("old");
    let path = example("pi5-8gb-nvme");
    assert!(
        kiln(&["render", path.to_str().expect("utf-8"), "--out", old_dir.to_str().expect("utf-8")]).status.success()
    );
    let out = kiln(&["diff", old_dir.to_str().expect("utf-8"), edited_path.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&edited_path);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "~ /boot/firmware/config.txt (content)",
        "~ /etc/sysctl.d/90-kiln.conf (content)",
        "~ /etc/kiln/spec.yaml (content)",
        "systemctl restart systemd-sysctl.service",
        "systemctl restart kilnd.service",
        "reboot: /boot/firmware/config.txt",
    ] {
        assert!(stdout.contains(expected), "missing `{expected}` in\n{stdout}");
    }
    assert!(!stdout.contains("daemon-reload"), "no unit changed, yet:\n{stdout}");
    let same = kiln(&["diff", path.to_str().expect("utf-8"), path.to_str().expect("utf-8")]);
    assert!(String::from_utf8_lossy(&same.stdout).contains("no changes"));
}

#[test]
fn schema_prints_the_committed_json_schema() {
    let out = kiln(&["schema"]);
    assert!(out.status.success());
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("docs/kiln-v1.schema.json")).expect("file"))
            .expect("json");
    assert_eq!(printed, committed);
}
