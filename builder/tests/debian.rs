//! A `base.debian` build of the generic-x86_64 example (the VM demo): mmdebstrap, then the
//! same rootless assembly; the image has an EFI system partition with systemd-boot, a kernel
//! and initrd, and a root with systemd, kilnd, the model and everything the spec renders.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use kiln_builder::build::build;
use std::os::unix::process::CommandExt as _;

#[test]
fn debian_base_build_of_the_vm_demo() {
    let test = "debian_base_build_of_the_vm_demo";
    let rootless_ok =
        nix::unistd::geteuid().is_root() || std::fs::read_to_string("/etc/subuid").is_ok_and(|s| !s.trim().is_empty());
    if !available(test, "mmdebstrap (as root, or with /etc/subuid for unshare mode)", have("mmdebstrap") && rootless_ok)
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The demo spec with a key this test holds (for the in-guest checks and deploys over SSH).
    let key = tmp.path().join("id_ed25519");
    let ok = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-test", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(ok.success());
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let spec_dir = tmp.path().join("spec");
    let spec = write_demo_spec(&spec_dir, "kiln-demo.yaml", pubkey.trim(), "");
    let r = build(&options(&spec, &tmp.path().join("out"), &kilnd_host()), &Quiet).unwrap();
    let img = &r.image;
    let table = kiln_builder::image::partition::read(img).unwrap();
    assert_eq!(table.kind, kiln_builder::image::partition::Kind::Gpt);
    assert_eq!(table.parts[0].type_id, kiln_builder::image::partition::GPT_ESP);
    assert_eq!(table.parts[1].type_id, kiln_builder::image::partition::GPT_ROOT_X86_64);
    let root_uuid = table.parts[1].uuid.clone().unwrap().to_lowercase();
    assert_eq!(root_uuid, kiln_builder::plan::derived_uuid("kiln-demo", "root").to_lowercase());

    let entry = fat_file(img, 1, "loader/entries/kiln.conf");
    assert!(
        entry.contains(&format!("root=PARTUUID={root_uuid}"))
            && entry.contains("console=ttyS0")
            && entry.contains("zswap.enabled=0"),
        "{entry}"
    );
    assert!(fat_file(img, 1, "loader/loader.conf").contains("default kiln.conf"));
    for f in ["EFI/BOOT/BOOTX64.EFI", "vmlinuz", "initrd.img"] {
        assert!(!fat_file(img, 1, f).is_empty(), "{f} missing from the ESP");
    }

    for path in [
        "/lib/systemd/systemd",
        "/usr/lib/systemd/system-generators/zram-generator",
        "/usr/sbin/sshd",
        "/usr/bin/sudo",
        "/usr/bin/kilnd",
    ] {
        assert!(debugfs(img, 2, &format!("stat {path}")).contains("Inode:"), "{path} missing from the root");
    }
    assert!(debugfs(img, 2, "cat /etc/fstab").contains(&format!("PARTUUID={root_uuid}\t/\text4")));
    assert!(
        debugfs(img, 2, "cat /etc/passwd").contains("kiln-admin:x:1000:1000:kiln-admin:/home/kiln-admin:/bin/bash")
    );
    assert!(debugfs(img, 2, "cat /etc/kiln/spec.yaml").contains("name: kiln-demo"));
    assert!(
        debugfs(img, 2, "ls -l /var/lib/kiln/models")
            .contains("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53.gguf")
    );
    assert_eq!(debugfs(img, 2, "cat /etc/machine-id"), "uninitialized\n");
    // Generation 1: the rendered files and manifest, `current` pointing at it.
    assert!(debugfs(img, 2, "stat /var/lib/kiln/generations/current").contains("Fast link dest: \"1\""));
    assert!(debugfs(img, 2, "cat /var/lib/kiln/generations/1/etc/kiln/manifest.json").contains(&r.generation));

    // The cached base makes a second build quick and identical.
    let again = build(&options(&spec, &tmp.path().join("again"), &kilnd_host()), &Quiet).unwrap();
    assert!(again.base_from_cache);
    assert_eq!(again.sha256, r.sha256);

    boot_and_serve(test, img, &tmp.path().join("serial.log"), &key, &spec_dir, pubkey.trim());
}

/// examples/generic-x86_64.yaml with `key` as kiln-admin's SSH key, paths made absolute and
/// `extra` lines added under `supervisor:`; returns the written spec.
fn write_demo_spec(dir: &std::path::Path, name: &str, key: &str, edit: &str) -> std::path::PathBuf {
    let examples = repo().join("examples");
    let mut text = std::fs::read_to_string(examples.join("generic-x86_64.yaml")).unwrap();
    let demo_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKilnDemoKeyOnlyForTheVmDoNotUseElsewhere0 demo@kiln";
    assert!(text.contains(demo_key));
    text = text.replace(demo_key, key);
    text = text.replace("path: models/", &format!("path: {}/models/", examples.display()));
    text = text.replace("api-token-file: secrets/", &format!("api-token-file: {}/secrets/", examples.display()));
    // Under TCG a restarted kilnd takes a minute or two to be READY and answer the canary.
    text = text.replace("supervisor:\n", "supervisor:\n  deploy: { health-timeout: 10m }\n");
    text.push_str(edit);
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Boots the built image (QEMU, TCG) and talks to the guest's kilnd through the forwarded
/// port: it must report its cgroup, hot tier and model, and answer a chat completion.
fn boot_and_serve(
    test: &str,
    img: &std::path::Path,
    serial: &std::path::Path,
    key: &std::path::Path,
    spec_dir: &std::path::Path,
    pubkey: &str,
) {
    if !available(
        test,
        "qemu-system-x86_64 and OVMF",
        have("qemu-system-x86_64") && std::path::Path::new("/usr/share/OVMF").is_dir(),
    ) {
        return;
    }
    let opts = kiln_builder::vm::VmOptions {
        image: img.to_path_buf(),
        api_port: free_port(),
        ssh_port: free_port(),
        guest_api_port: 8080,
        accel: kiln_builder::vm::Accel::Tcg,
        memory_mib: 2048,
        cpus: 2,
        serial_log: serial.to_path_buf(),
        snapshot: true,
        ready_timeout: std::time::Duration::from_secs(600),
    };
    let vm = kiln_builder::vm::boot(&opts).unwrap_or_else(|e| panic!("{e:#}"));
    let token = std::fs::read_to_string(repo().join("examples/secrets/demo-api-token")).unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(600)))
        .build()
        .into();
    let auth = format!("Bearer {}", token.trim());
    let mut r = agent.get(&format!("{}/status", vm.api_url)).header("authorization", &auth).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let status: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    // cgroup v2 in the guest, the inference cgroup with the spec's 1 GiB memory.max.
    assert_eq!(status["cgroups"]["version"], "v2", "{status}");
    assert_eq!(status["cgroups"]["inference"]["memory_max_bytes"], 1u64 << 30, "{status}");
    assert_eq!(status["hot_tier"]["budget_bytes"], 256u64 << 20, "{status}");
    assert_eq!(status["models"][0]["id"], "smollm2-135m");
    // The spec prewarms at boot: wait for the hot copy, so the worker maps it from tmpfs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let mut r = agent.get(&format!("{}/status", vm.api_url)).header("authorization", &auth).call().unwrap();
        let s: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        if s["models"][0]["hot"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the model never reached the hot tier: {s}");
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    let body = serde_json::json!({
        // Short: the guest's CPU is emulated (TCG), ~15 prompt tokens take a minute.
        "model": "smollm2-135m", "temperature": 0, "max_tokens": 3,
        "messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    });
    let mut r = agent
        .post(&format!("{}/v1/chat/completions", vm.api_url))
        .header("authorization", &auth)
        .send_json(&body)
        .unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    assert_eq!(r.status().as_u16(), 200, "{text}\nserial console: {}", serial.display());
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(!answer["choices"][0]["message"]["content"].as_str().unwrap().trim().is_empty(), "{answer}");
    let mut r = agent.get(&format!("{}/status", vm.api_url)).header("authorization", &auth).call().unwrap();
    let status: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(status["models"][0]["worker"]["loaded_from"], "hot", "{status}");
    assert_eq!(status["generation"]["number"], 1, "{status}");

    if !available(test, "ssh", have("ssh")) {
        return;
    }
    let guest = Guest { key: key.to_path_buf(), port: opts.ssh_port, known_hosts: key.with_file_name("known_hosts") };
    in_guest_checks(&guest);
    oom_kill_under_cgroup_v2(&guest, &vm.api_url, &agent, &auth);
    deploys(&guest, &vm.api_url, &agent, &auth, spec_dir, pubkey, serial);
    drop(vm);
}

/// SSH into the guest as kiln-admin (passwordless sudo, from the spec).
struct Guest {
    key: std::path::PathBuf,
    port: u16,
    known_hosts: std::path::PathBuf,
}

impl Guest {
    fn target(&self) -> String {
        format!("ssh://kiln-admin@127.0.0.1:{}", self.port)
    }
    fn ssh_args(&self) -> Vec<String> {
        vec![
            "--target".into(),
            self.target(),
            "--identity".into(),
            self.key.display().to_string(),
            "--known-hosts".into(),
            self.known_hosts.display().to_string(),
        ]
    }
    /// Runs `cmd` in the guest (through sudo) and returns its stdout.
    fn run(&self, cmd: &str) -> String {
        let mut t = kiln_builder::deploy::Target::parse(&self.target()).unwrap();
        t.identity = Some(self.key.clone());
        t.known_hosts = Some(self.known_hosts.clone());
        let out = t.command(cmd).output().unwrap();
        assert!(out.status.success(), "`{cmd}` in the guest: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// cgroup v2's OOM killer on a loaded worker: its cgroup's memory.max is lowered below what
/// it holds (swap off for it), the kernel kills it, kilnd notices at once (idle), logs it
/// with the cgroup's memory events, and loads a fresh worker for the next request.
fn oom_kill_under_cgroup_v2(g: &Guest, api: &str, agent: &ureq::Agent, auth: &str) {
    let cg = "/sys/fs/cgroup/kiln.slice/kilnd.service/inference/smollm2-135m";
    let status = || -> serde_json::Value {
        let mut r = agent.get(&format!("{api}/status")).header("authorization", auth).call().unwrap();
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    };
    assert_eq!(status()["models"][0]["worker"]["state"], "loaded");
    g.run(&format!("sh -c 'echo 0 > {cg}/memory.swap.max && echo 16M > {cg}/memory.max'"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let worker = loop {
        let w = status()["models"][0]["worker"].clone();
        if w["restarts"] == 1 {
            break w;
        }
        assert!(std::time::Instant::now() < deadline, "the OOM kill went unnoticed: {w}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let phase = worker["phase"].as_str().unwrap_or_default();
    assert!(phase.contains("OOM-killed: memory.events oom_kill +1"), "{worker}");
    let events = g.run(&format!("cat {cg}/memory.events"));
    assert!(events.lines().any(|l| l == "oom_kill 1"), "{events}");
    let journal = g.run("journalctl -u kilnd --no-pager -o cat");
    assert!(journal.contains("the idle worker for smollm2-135m exited") && journal.contains("OOM-killed"), "{journal}");
    g.run(&format!("sh -c 'echo max > {cg}/memory.max && echo max > {cg}/memory.swap.max'"));
    let body = serde_json::json!({"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 1});
    let mut r = agent.post(&format!("{api}/v1/completions")).header("authorization", auth).send_json(&body).unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    assert_eq!(r.status().as_u16(), 200, "{text}");
    let w = status()["models"][0]["worker"].clone();
    assert_eq!((w["state"].as_str(), w["loads"].as_u64()), (Some("loaded"), Some(2)), "{w}");
}

/// Every memory and cache setting of the spec, checked inside the running guest.
fn in_guest_checks(g: &Guest) {
    // zram0: the spec's 768MiB, zstd, used as swap with priority 100.
    assert_eq!(g.run("cat /sys/block/zram0/disksize").trim(), (768u64 << 20).to_string());
    assert!(g.run("cat /sys/block/zram0/comp_algorithm").contains("[zstd]"));
    let swaps = g.run("cat /proc/swaps");
    let zram = swaps.lines().find(|l| l.starts_with("/dev/zram0")).unwrap_or_else(|| panic!("no zram swap: {swaps}"));
    assert_eq!(zram.split_whitespace().nth(4), Some("100"), "{swaps}");
    // sysctls.
    assert_eq!(g.run("cat /proc/sys/vm/swappiness").trim(), "10");
    assert_eq!(g.run("cat /proc/sys/vm/vfs_cache_pressure").trim(), "50");
    // The tmpfs hot tier at its path and size.
    let mounts = g.run("cat /proc/mounts");
    let hot = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/var/cache/kiln/hot"))
        .unwrap_or_else(|| panic!("no tmpfs at /var/cache/kiln/hot: {mounts}"));
    assert!(hot.starts_with("tmpfs ") && hot.contains("size=262144k"), "{hot}");
    assert!(
        g.run("ls /var/cache/kiln/hot")
            .contains("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53.gguf")
    );
    // kilnd in its cgroup, with the unit's ceiling (kilnd 192 + inference 1024 + hot tier 256 MiB).
    let cg = g.run("systemctl show -p ControlGroup --value kilnd.service");
    assert_eq!(cg.trim(), "/kiln.slice/kilnd.service");
    assert_eq!(g.run("cat /sys/fs/cgroup/kiln.slice/kilnd.service/memory.max").trim(), (1472u64 << 20).to_string());
    assert_eq!(
        g.run("cat /sys/fs/cgroup/kiln.slice/kilnd.service/inference/memory.max").trim(),
        (1024u64 << 20).to_string()
    );
    // `kilnd status` and the journal show the model, the prewarm and the listening event.
    let status = g.run("kilnd status");
    assert!(status.contains("smollm2-135m") && status.contains("hot"), "{status}");
    let journal = g.run("journalctl -u kilnd --no-pager -o cat");
    assert!(journal.contains("listening on http://0.0.0.0:8080 (generation 1)"), "{journal}");
    assert!(journal.contains("prewarm done"), "{journal}");
}

fn invocation(g: &Guest, unit: &str) -> String {
    g.run(&format!("systemctl show -p InvocationID --value {unit}")).trim().to_string()
}

fn kiln(args: &[String]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap()
}

/// A copy of the demo model with `extra` bytes appended: another sha256, so another model to send.
fn model_copy(dir: &std::path::Path, extra: usize) -> (std::path::PathBuf, String) {
    let mut bytes = std::fs::read(repo().join("examples/models/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    bytes.extend(std::iter::repeat_n(0u8, extra));
    let path = dir.join(format!("smollm2-copy-{extra}.gguf"));
    std::fs::write(&path, &bytes).unwrap();
    (path, sha256_file(&dir.join(format!("smollm2-copy-{extra}.gguf"))))
}

fn model_yaml(id: &str, path: &std::path::Path, sha: &str) -> String {
    format!("  - id: {id}\n    path: {}\n    sha256: {sha}\n    context: 512\n    threads: 2\n", path.display())
}

/// Re-deploys edited specs to the running guest: a change applied without a reboot and only
/// the needed units restarted; an unhealthy one rolled back by the device; a killed deploy
/// that leaves the device as it was.
fn deploys(
    g: &Guest,
    api: &str,
    agent: &ureq::Agent,
    auth: &str,
    dir: &std::path::Path,
    pubkey: &str,
    serial: &std::path::Path,
) {
    let status = || -> serde_json::Value {
        let mut r = agent.get(&format!("{api}/status")).header("authorization", auth).call().unwrap();
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    };
    let boot_id = g.run("cat /proc/sys/kernel/random/boot_id");
    let units = ["ssh.service", "systemd-zram-setup@zram0.service", "var-cache-kiln-hot.mount", "kilnd.service"];
    let before: Vec<String> = units.iter().map(|u| invocation(g, u)).collect();

    // 1. swappiness 10 -> 20 and a second model.
    let (second, second_sha) = model_copy(dir, 4096);
    let models_edit = model_yaml("smollm2-copy", &second, &second_sha);
    let base = std::fs::read_to_string(write_demo_spec(dir, "probe.yaml", pubkey, "")).unwrap();
    let with_second =
        base.replace("\ncache:\n", &format!("\n{models_edit}cache:\n")).replace("swappiness: 10", "swappiness: 20");
    assert_ne!(with_second, base);
    let spec2 = dir.join("kiln-demo-2.yaml");
    std::fs::write(&spec2, &with_second).unwrap();
    let mut args: Vec<String> = vec!["deploy".into(), spec2.display().to_string()];
    args.extend(g.ssh_args());
    let out = kiln(&args);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("kiln {}:\n{said}", args.join(" "));
    assert!(out.status.success(), "{said}\nserial console: {}", serial.display());
    assert!(said.contains("sending model smollm2-copy"), "{said}");
    assert!(said.contains("systemctl restart systemd-sysctl.service"), "{said}");
    assert!(said.contains("deployed: generation 2"), "{said}");
    assert_eq!(g.run("cat /proc/sys/vm/swappiness").trim(), "20");
    assert_eq!(g.run("cat /proc/sys/kernel/random/boot_id"), boot_id, "no reboot");
    let after: Vec<String> = units.iter().map(|u| invocation(g, u)).collect();
    assert_eq!(after[..3], before[..3], "ssh, zram and the tmpfs were not restarted: {units:?}");
    assert_ne!(after[3], before[3], "kilnd was restarted for its new spec");
    let s = status();
    assert_eq!(s["generation"]["number"], 2, "{s}");
    let ids: Vec<&str> = s["models"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["smollm2-135m", "smollm2-copy"], "{s}");
    assert!(g.run("ls /var/lib/kiln/models").contains(&second_sha));
    // Deploying the same spec again sends nothing.
    let out = kiln(&args);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to do"), "{}", String::from_utf8_lossy(&out.stdout));

    // 2. A generation whose kilnd cannot start (port 22 is sshd's, and kilnd may not bind it).
    let broken = with_second.replace("listen: 0.0.0.0:8080", "listen: 0.0.0.0:22");
    assert_ne!(broken, with_second);
    let spec3 = dir.join("kiln-demo-3.yaml");
    std::fs::write(&spec3, &broken).unwrap();
    args[1] = spec3.display().to_string();
    let out = kiln(&args);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("kiln {}:\n{said}", args.join(" "));
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("rolling back to generation 2") && said.contains("generation 2 is active again"), "{said}");
    let s = status();
    assert_eq!(s["generation"]["number"], 2, "{s}");
    let mut gens_args = vec!["generations".to_string()];
    gens_args.extend(g.ssh_args());
    let listing = String::from_utf8_lossy(&kiln(&gens_args).stdout).into_owned();
    assert!(listing.lines().any(|l| l.starts_with('*') && l.contains(" 2 ")), "{listing}");
    assert!(listing.lines().any(|l| l.contains(" 3 ") && l.contains("failed")), "{listing}");

    // 3. A deploy killed while it sends a model: nothing changes on the device.
    let (third, third_sha) = model_copy(dir, 8192);
    let spec4 = dir.join("kiln-demo-4.yaml");
    std::fs::write(
        &spec4,
        with_second.replace("\ncache:\n", &format!("\n{}cache:\n", model_yaml("smollm2-third", &third, &third_sha))),
    )
    .unwrap();
    args[1] = spec4.display().to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("sending model smollm2-third") {
            std::thread::sleep(std::time::Duration::from_millis(500));
            // As a Ctrl-C would: the whole process group, ssh included.
            nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL)
                .unwrap();
            break;
        }
    }
    let _ = child.wait();
    assert!(seen.contains("sending model smollm2-third"), "{seen}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        !g.run("ls /var/lib/kiln/models").contains(&format!("{third_sha}.gguf\n")),
        "a half-sent model is never stored"
    );
    let s = status();
    assert_eq!(s["generation"]["number"], 2, "{s}");
    let listing = String::from_utf8_lossy(&kiln(&gens_args).stdout).into_owned();
    assert!(!listing.contains(" 4 "), "{listing}");
    assert_eq!(g.run("cat /proc/sys/vm/swappiness").trim(), "20");

    // 4. Back by hand: `kiln rollback` skips the failed generation 3 and returns to 1.
    let mut rb = vec!["rollback".to_string()];
    rb.extend(g.ssh_args());
    let out = kiln(&rb);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("kiln {}:\n{said}", rb.join(" "));
    assert!(out.status.success(), "{said}");
    assert!(said.contains("generation 1 is active and healthy"), "{said}");
    assert_eq!(g.run("cat /proc/sys/vm/swappiness").trim(), "10");
    let s = status();
    assert_eq!(s["generation"]["number"], 1, "{s}");
    let ids: Vec<&str> = s["models"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["smollm2-135m"], "{s}");
}
