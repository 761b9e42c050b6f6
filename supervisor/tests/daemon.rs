//! `kilnd run` as systemd runs it: cgroups created with the spec's limits (this machine's
//! cgroup v1), the at-boot prewarm done by a child in the prewarm cgroup, a clean exit on
//! SIGTERM that removes kilnd's cgroups.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SMOL_SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn spec(state: &Path) -> PathBuf {
    let model = repo().join("examples/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "run scripts/fetch-model first");
    let store = state.join("var/lib/kiln/models");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::copy(&model, store.join(format!("{SMOL_SHA}.gguf"))).unwrap();
    let text = format!(
        r#"api-version: kiln/v1
name: daemon-test
hardware: {{ board: generic-x86_64, ram: 4GiB }}
memory:
  tmpfs: {{ size: 256MiB }}
cgroups:
  inference: {{ memory-max: 1GiB, memory-high: 768MiB }}
  prewarm: {{ io-weight: 10 }}
models:
  - {{ id: smollm2-135m, sha256: {SMOL_SHA}, size: 98362432, pin: true }}
cache:
  prewarm: {{ at-boot: true }}
"#
    );
    let path = state.join("spec.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn run_places_cgroups_prewarms_at_boot_and_stops_cleanly() {
    let memory = Path::new("/sys/fs/cgroup/memory");
    let writable = nix::unistd::access(memory, nix::unistd::AccessFlags::W_OK).is_ok();
    if !writable {
        assert!(std::env::var("KILN_REQUIRE_TOOLS").as_deref() != Ok("1"), "no writable cgroup v1 memory controller");
        eprintln!(
            "SKIP run_places_cgroups_prewarms_at_boot_and_stops_cleanly: no writable cgroup v1 memory controller"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec(tmp.path());
    let parent = format!("kiln-daemon-test-{}", std::process::id());
    let mut child = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--spec")
        .arg(&spec)
        .arg("--state-dir")
        .arg(tmp.path())
        .arg("run")
        .env("KILND_CGROUP_PARENT", &parent)
        .env_remove("NOTIFY_SOCKET")
        .spawn()
        .unwrap();
    let hot = tmp.path().join(format!("var/cache/kiln/hot/{SMOL_SHA}.gguf"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !hot.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let cg = memory.join(&parent);
    let limit = std::fs::read_to_string(cg.join("inference/memory.limit_in_bytes"));
    let soft = std::fs::read_to_string(cg.join("inference/memory.soft_limit_in_bytes"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "kilnd did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let left_inference = cg.join("inference").exists();
    // kilnd leaves the parent it was given (on a device, its unit's cgroup): remove it, and
    // anything left below it, in every v1 hierarchy kilnd used (memory, cpu, cpuset, blkio).
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().filter_map(Result::ok) {
        let dir = h.path().join(&parent);
        let _ = std::fs::remove_dir(dir.join("inference"));
        let _ = std::fs::remove_dir(dir.join("prewarm"));
        let _ = std::fs::remove_dir(&dir);
    }
    assert!(hot.exists(), "the at-boot prewarm did not bring the model into the hot tier");
    assert_eq!(limit.unwrap().trim(), "1073741824");
    assert_eq!(soft.unwrap().trim(), (768u64 << 20).to_string());
    assert!(status.success(), "kilnd exited with {status}");
    assert!(!left_inference, "kilnd left its inference cgroup behind");
}
