//! Helpers for the builder's integration tests: tools, the Raspberry Pi-like fixture image,
//! an aarch64 kilnd, a shared cache, and reading files out of built images without mounting.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("builder/ has a parent").to_path_buf()
}

fn required() -> bool {
    std::env::var("KILN_REQUIRE_TOOLS").as_deref() == Ok("1")
}

/// True when `what` is available; otherwise prints SKIP (or fails under KILN_REQUIRE_TOOLS=1).
pub fn available(test: &str, what: &str, ok: bool) -> bool {
    if !ok {
        assert!(!required(), "{test}: {what} not found and KILN_REQUIRE_TOOLS=1");
        eprintln!("SKIP {test}: {what} not found");
    }
    ok
}

pub fn have(tool: &str) -> bool {
    kiln_builder::tools::find(tool).is_ok()
}

/// The cache the tests share (bases and models), under the target directory.
pub fn cache_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let target = exe.ancestors().nth(3).expect("target dir").to_path_buf();
    target.join("kiln-test-cache")
}

static FIXTURE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// The Raspberry Pi OS-like image from tests/fixtures/make-rpi-image (cached by its script).
pub fn rpi_fixture(test: &str) -> Option<PathBuf> {
    let made = FIXTURE.get_or_init(|| {
        let root = nix::unistd::geteuid().is_root();
        if !root || !have("mmdebstrap") || !have("mkfs.fat") || !have("mke2fs") {
            return None;
        }
        let out = cache_dir().join("rpi-like.img");
        std::fs::create_dir_all(cache_dir()).expect("cache dir");
        let status =
            Command::new(repo().join("tests/fixtures/make-rpi-image")).arg(&out).status().expect("fixture script runs");
        assert!(status.success(), "tests/fixtures/make-rpi-image failed");
        Some(out)
    });
    if available(test, "root with mmdebstrap, dosfstools and e2fsprogs (for the fixture image)", made.is_some()) {
        made.clone()
    } else {
        None
    }
}

static KILND_ARM64: OnceLock<Option<PathBuf>> = OnceLock::new();

/// kilnd cross-built for aarch64 (rustup's target and Debian's gcc-aarch64-linux-gnu).
pub fn kilnd_aarch64(test: &str) -> Option<PathBuf> {
    let built = KILND_ARM64.get_or_init(|| {
        if !have("aarch64-linux-gnu-gcc") {
            return None;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--target", "aarch64-unknown-linux-gnu", "-p", "kiln-supervisor", "--bin", "kilnd"])
            .current_dir(repo())
            .status()
            .expect("cargo runs");
        if !status.success() {
            return None;
        }
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from);
        Some(target.join("aarch64-unknown-linux-gnu/debug/kilnd"))
    });
    if available(
        test,
        "an aarch64 cross toolchain (rustup target aarch64-unknown-linux-gnu, gcc-aarch64-linux-gnu)",
        built.is_some(),
    ) {
        built.clone()
    } else {
        None
    }
}

/// The x86_64 kilnd of this test run.
pub fn kilnd_host() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = dir.join("kilnd");
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-p", "kiln-supervisor", "--bin", "kilnd"])
            .current_dir(repo())
            .status()
            .expect("cargo");
        assert!(ok.success());
    }
    bin
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).expect("read");
    hex::encode(sha2::Sha256::digest(&bytes))
}

/// A spec for the fixture: a Pi 5 on NVMe with a user, Wi-Fi, a token and the demo model.
pub fn pi_spec(dir: &Path, image: &Path, swappiness: u32) -> PathBuf {
    let examples = repo().join("examples");
    let sha = sha256_file(image);
    let text = format!(
        r#"api-version: kiln/v1
name: fixture-pi
hardware: {{ board: pi5, ram: 8GiB, storage: nvme, pcie-gen: 3, overclock: {{ arm-freq-mhz: 2600 }} }}
base: {{ image: {image}, sha256: {sha} }}
system:
  hostname: fixture
  timezone: Europe/Berlin
  users:
    - name: ops
      sudo: true
      password-hash: "$6$kilnexample$0.F3rRGu0Zx219T9hsKoXzmHNL1DhGMPTMTXsSmihVeEAnMAB8RZkwS0kE4hnZ9th.5NWgKAluj5jYxYT9uJN."
      ssh-authorized-keys: [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyReplaceWithYourOwnPublicKey000 ops@desk" ]
  wifi: {{ ssid: home, country: DE, psk-file: {examples}/secrets/wifi.psk }}
memory:
  zram: {{ size: 2GiB, algorithm: lz4 }}
  swappiness: {swappiness}
  tmpfs: {{ size: 512MiB }}
cgroups:
  inference: {{ memory-max: 4GiB }}
models:
  - id: smollm2-135m
    path: {examples}/models/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256: b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    pin: true
supervisor: {{ listen: 0.0.0.0:8080, api-token-file: {examples}/secrets/api-token }}
"#,
        image = image.display(),
        examples = examples.display()
    );
    let path = dir.join("pi.yaml");
    std::fs::write(&path, text).expect("spec");
    path
}

/// A partition of an image as a debugfs/mtools argument (no mount, no loop device).
pub fn part_offset(image: &Path, n: usize) -> u64 {
    let t = kiln_builder::image::partition::read(image).expect("partition table");
    t.parts[n - 1].start_bytes
}

pub fn debugfs(image: &Path, n: usize, cmd: &str) -> String {
    let dev = format!("{}?offset={}", image.display(), part_offset(image, n));
    let out = Command::new(kiln_builder::tools::find("debugfs").expect("debugfs"))
        .args(["-R", cmd, &dev])
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn fat_file(image: &Path, n: usize, name: &str) -> String {
    let dev = format!("{}@@{}", image.display(), part_offset(image, n));
    let out = Command::new("mtype")
        .args(["-i", &dev, &format!("::{name}")])
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .expect("mtype");
    assert!(out.status.success(), "mtype {name}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Quiet;
impl kiln_builder::build::Ui for Quiet {
    fn step(&self, _: &str) {}
    fn progress(&self, _: &str, _: u64, _: u64) {}
}

pub fn options(spec: &Path, out: &Path, kilnd: &Path) -> kiln_builder::build::Options {
    kiln_builder::build::Options {
        spec: spec.to_path_buf(),
        out: out.to_path_buf(),
        kilnd: Some(kilnd.to_path_buf()),
        compress: None,
        epoch: 1_700_000_000,
        cache: kiln_builder::base::Cache { root: cache_dir() },
    }
}
