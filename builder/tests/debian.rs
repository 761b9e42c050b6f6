//! A `base.debian` build of the generic-x86_64 example (the VM demo): mmdebstrap, then the
//! same rootless assembly; the image has an EFI system partition with systemd-boot, a kernel
//! and initrd, and a root with systemd, kilnd, the model and everything the spec renders.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use kiln_builder::build::build;

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
    let spec = repo().join("examples/generic-x86_64.yaml");
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

    // The cached base makes a second build quick and identical.
    let again = build(&options(&spec, &tmp.path().join("again"), &kilnd_host()), &Quiet).unwrap();
    assert!(again.base_from_cache);
    assert_eq!(again.sha256, r.sha256);

    boot_and_serve(test, img, &tmp.path().join("serial.log"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Boots the built image (QEMU, TCG) and talks to the guest's kilnd through the forwarded
/// port: it must report its cgroup, hot tier and model, and answer a chat completion.
fn boot_and_serve(test: &str, img: &std::path::Path, serial: &std::path::Path) {
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
    drop(vm);
}
