//! Every unit kiln renders passes `systemd-analyze verify` with no complaint, in a root that
//! holds the rendered generation, the distribution's units and the real kilnd binary.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use kiln_tests::{EXAMPLES, binary, example, have_tool};

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().expect("cp");
    assert!(status.success(), "copying {}", from.display());
}

/// A root for `systemd-analyze verify --root`: merged /usr like Debian, systemd's own units,
/// the binaries the units run, and the generation on top.
fn verify_root(dir: &Path, generation: &Path) {
    copy_dir(generation, dir);
    for d in ["usr/lib/systemd", "usr/bin", "usr/sbin"] {
        fs::create_dir_all(dir.join(d)).expect("mkdir");
    }
    copy_dir(Path::new("/usr/lib/systemd/system"), &dir.join("usr/lib/systemd/system"));
    for (link, target) in [("lib", "usr/lib"), ("bin", "usr/bin"), ("sbin", "usr/sbin")] {
        symlink(target, dir.join(link)).expect("symlink");
    }
    fs::copy(binary("kilnd"), dir.join("usr/bin/kilnd")).expect("kilnd");
    for tool in ["/usr/bin/kill", "/usr/sbin/chpasswd"] {
        if Path::new(tool).exists() {
            fs::copy(tool, dir.join(tool.trim_start_matches('/'))).expect("tool");
        }
    }
}

#[test]
fn rendered_units_pass_systemd_analyze_verify() {
    if !have_tool("rendered_units_pass_systemd_analyze_verify", "systemd-analyze") {
        return;
    }
    for name in EXAMPLES {
        let tmp = tempfile::tempdir().expect("tempdir");
        let generation = tmp.path().join("generation");
        let out = Command::new(binary("kiln"))
            .arg("render")
            .arg(example(name))
            .arg("--out")
            .arg(&generation)
            .output()
            .expect("kiln");
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let root = tmp.path().join("root");
        verify_root(&root, &generation);
        let unit_dir = root.join("etc/systemd/system");
        let mut units: Vec<String> = fs::read_dir(&unit_dir)
            .expect("units")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| format!("/etc/systemd/system/{}", e.file_name().to_string_lossy()))
            .collect();
        units.sort();
        assert!(units.iter().any(|u| u.ends_with("kilnd.service")), "{name}: no kilnd.service in {units:?}");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg("--man=no")
            .arg(format!("--root={}", root.display()))
            .args(&units)
            .output()
            .expect("systemd-analyze");
        let complaints = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success() && complaints.trim().is_empty(),
            "{name}: systemd-analyze verify {units:?}:\n{complaints}"
        );
    }
}

#[test]
fn verify_catches_a_broken_unit() {
    // The check above can fail: a misspelt key in a rendered unit is reported.
    if !have_tool("verify_catches_a_broken_unit", "systemd-analyze") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let generation = tmp.path().join("generation");
    let out = Command::new(binary("kiln"))
        .arg("render")
        .arg(example("generic-x86_64"))
        .arg("--out")
        .arg(&generation)
        .output()
        .expect("kiln");
    assert!(out.status.success());
    let root = tmp.path().join("root");
    verify_root(&root, &generation);
    let unit = root.join("etc/systemd/system/kilnd.service");
    let text = fs::read_to_string(&unit).expect("unit").replace("Delegate=yes", "Delegat=yes");
    fs::write(&unit, text).expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(format!("--root={}", root.display()))
        .arg("/etc/systemd/system/kilnd.service")
        .output()
        .expect("systemd-analyze");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unknown key 'Delegat'"));
}
