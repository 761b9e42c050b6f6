//! Generations on a device, without the device: `receive` builds them from the stream `kiln
//! deploy` sends, `activate` installs them into a root directory (commands reported, not run:
//! the VM test in builder/tests/debian.rs runs them for real under systemd).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kiln_spec::render::{Manifest, pack, render};
use kiln_spec::validate::{Context, load_str};
use kiln_supervisor::activate::{Options, Outcome, activate, previous_good};
use kiln_supervisor::generations::{GenState, Generations};

const SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn spec(swappiness: u32, hostname: &str, extra: &str) -> String {
    format!(
        "api-version: kiln/v1
name: gen-test
hardware: {{ board: generic-x86_64, ram: 2GiB }}
base: {{ debian: {{ suite: bookworm }} }}
system: {{ hostname: {hostname} }}
memory:
  swappiness: {swappiness}
  tmpfs: {{ path: /var/cache/kiln/hot, size: 64MiB }}
supervisor:
  deploy: {{ keep-generations: 2 }}
{extra}"
    )
}

fn manifest(text: &str) -> Manifest {
    let loaded =
        load_str(text, Path::new("spec.yaml"), Path::new("."), Context::Host).unwrap_or_else(|d| panic!("{d}"));
    render(&loaded).unwrap()
}

fn known(m: &Manifest) -> BTreeSet<String> {
    m.entries.iter().map(|e| e.sha256.clone()).filter(|s| !s.is_empty()).collect()
}

struct Device {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    gens: Generations,
}

impl Device {
    fn new() -> Device {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&root).unwrap();
        let gens = Generations::at(&state);
        Device { root, state, gens, _tmp: tmp }
    }
    fn opts(&self) -> Options {
        Options { root: self.root.clone(), live: false, health_timeout: None, state: self.state.clone() }
    }
    fn activate(&self, n: u32) -> (Outcome, Vec<String>) {
        let mut lines = Vec::new();
        let out = activate(&self.gens, n, &self.opts(), &mut |l| lines.push(l.to_string())).unwrap();
        (out, lines)
    }
    fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.root.join(path.trim_start_matches('/'))).unwrap()
    }
}

fn tar_names(stream: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(stream);
    a.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect()
}

#[test]
fn a_new_generation_carries_only_changed_files_and_applies_only_what_its_diff_needs() {
    let dev = Device::new();
    let m1 = manifest(&spec(10, "kiln-a", ""));
    let n1 = dev.gens.receive(pack(&m1, &BTreeSet::new()).unwrap().as_slice()).unwrap();
    assert_eq!(n1, 1);
    let (out, _) = dev.activate(1);
    assert!(matches!(out, Outcome::Activated { number: 1, .. }), "{out:?}");
    assert_eq!(dev.gens.current().unwrap(), Some(1));
    assert!(dev.read("/etc/sysctl.d/90-kiln.conf").contains("vm.swappiness = 10"));
    assert_eq!(dev.read("/etc/hostname"), "kiln-a\n");

    // swappiness and the hostname change: three files differ (sysctl, hostname + hosts, the spec).
    let m2 = manifest(&spec(20, "kiln-b", ""));
    let stream = pack(&m2, &known(&m1)).unwrap();
    let mut names = tar_names(&stream);
    names.sort();
    assert_eq!(
        names,
        [
            "files/etc/hostname",
            "files/etc/hosts",
            "files/etc/kiln/spec.yaml",
            "files/etc/sysctl.d/90-kiln.conf",
            "manifest.json"
        ]
    );
    let n2 = dev.gens.receive(stream.as_slice()).unwrap();
    assert_eq!(n2, 2);
    // Files it did not carry come from generation 1, checked by hash.
    assert_eq!(dev.gens.manifest(2).unwrap().entries, m2.entries);
    let (out, lines) = dev.activate(2);
    let Outcome::Activated { actions, reboot_for, .. } = out else { panic!("{out:?}") };
    assert_eq!(
        actions,
        [
            "systemctl restart systemd-sysctl.service",
            "systemctl reset-failed kilnd.service",
            "systemctl restart --no-block kilnd.service",
            "hostname kiln-b"
        ],
        "{lines:#?}"
    );
    assert!(reboot_for.is_empty());
    assert!(dev.read("/etc/sysctl.d/90-kiln.conf").contains("vm.swappiness = 20"));
    assert_eq!(dev.read("/etc/hostname"), "kiln-b\n");
    assert_eq!(dev.gens.current().unwrap(), Some(2));
    assert_eq!(dev.gens.meta(2).state, GenState::Good);

    // Back by hand: generation 1's files return; a third keeps two generations (the spec's count).
    assert_eq!(previous_good(&dev.gens).unwrap(), 1);
    let (out, _) = dev.activate(1);
    assert!(matches!(out, Outcome::Activated { number: 1, .. }), "{out:?}");
    assert!(dev.read("/etc/sysctl.d/90-kiln.conf").contains("vm.swappiness = 10"));
    let m3 = manifest(&spec(30, "kiln-a", ""));
    let n3 = dev.gens.receive(pack(&m3, &known(&m1)).unwrap().as_slice()).unwrap();
    assert_eq!(n3, 3);
    dev.activate(3);
    assert_eq!(
        dev.gens.numbers().unwrap(),
        [1, 3],
        "the oldest beyond keep-generations (2) goes, never the one rolled back from"
    );
}

#[test]
fn damaged_or_interrupted_transfers_never_become_generations() {
    let dev = Device::new();
    let m1 = manifest(&spec(10, "kiln-a", ""));
    let full = pack(&m1, &BTreeSet::new()).unwrap();
    // Cut short: the stream ends mid-file.
    let err = dev.gens.receive(&full[..full.len() / 2]).unwrap_err();
    assert!(format!("{err:#}").contains("generation stream"), "{err:#}");
    assert!(dev.gens.numbers().unwrap().is_empty());
    // A file that was not sent and is nowhere on the device.
    let err = dev.gens.receive(pack(&m1, &known(&m1)).unwrap().as_slice()).unwrap_err();
    assert!(format!("{err:#}").contains("was neither sent nor found"), "{err:#}");
    // A file whose bytes do not match the manifest.
    let mut bad = m1.clone();
    let e = bad.entries.iter_mut().find(|e| e.path == "/etc/hostname").unwrap();
    e.content = b"evil\n".to_vec();
    let err = dev.gens.receive(pack(&bad, &BTreeSet::new()).unwrap().as_slice()).unwrap_err();
    assert!(format!("{err:#}").contains("/etc/hostname arrived damaged"), "{err:#}");
    assert!(dev.gens.numbers().unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(dev.gens.dir()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(leftovers.iter().all(|n| !n.to_string_lossy().contains("kiln-tmp")), "{leftovers:?}");
    assert_eq!(dev.gens.receive(full.as_slice()).unwrap(), 1);
}

#[test]
fn an_activation_killed_half_way_is_undone_before_anything_else() {
    let dev = Device::new();
    let m1 = manifest(&spec(10, "kiln-a", ""));
    dev.gens.receive(pack(&m1, &BTreeSet::new()).unwrap().as_slice()).unwrap();
    dev.activate(1);
    let m2 = manifest(&spec(20, "kiln-b", ""));
    dev.gens.receive(pack(&m2, &known(&m1)).unwrap().as_slice()).unwrap();
    // What a kill -9 after the first files leaves: the marker, one new file, `current` switched.
    std::fs::write(dev.gens.dir().join(".activating.json"), r#"{"from":1,"to":2}"#).unwrap();
    std::fs::write(dev.root.join("etc/sysctl.d/90-kiln.conf"), &m2.get("/etc/sysctl.d/90-kiln.conf").unwrap().content)
        .unwrap();
    dev.gens.switch(2).unwrap();
    let (out, lines) = dev.activate(1);
    assert!(lines[0].contains("was interrupted: restoring generation 1"), "{lines:#?}");
    assert!(matches!(out, Outcome::Unchanged { number: 1 } | Outcome::Activated { number: 1, .. }), "{out:?}");
    assert!(dev.read("/etc/sysctl.d/90-kiln.conf").contains("vm.swappiness = 10"));
    assert_eq!(dev.gens.current().unwrap(), Some(1));
    assert_eq!(dev.gens.meta(2).state, GenState::Failed);
    assert!(!dev.gens.dir().join(".activating.json").exists());
}

#[test]
fn a_generation_whose_models_are_not_in_the_store_is_refused_before_anything_changes() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model.is_file() {
        eprintln!("SKIP: {} is missing (scripts/fetch-model)", model.display());
        assert!(std::env::var_os("KILN_REQUIRE_TOOLS").is_none(), "the demo model is required");
        return;
    }
    let dev = Device::new();
    let m1 = manifest(&spec(10, "kiln-a", ""));
    dev.gens.receive(pack(&m1, &BTreeSet::new()).unwrap().as_slice()).unwrap();
    dev.activate(1);
    let with_model =
        spec(10, "kiln-a", &format!("models:\n  - id: smollm2\n    path: {}\n    sha256: {SHA}\n", model.display()));
    let m2 = manifest(&with_model);
    dev.gens.receive(pack(&m2, &known(&m1)).unwrap().as_slice()).unwrap();
    let mut lines = Vec::new();
    let err = activate(&dev.gens, 2, &dev.opts(), &mut |l| lines.push(l.to_string())).unwrap_err();
    assert!(format!("{err:#}").contains(&format!("model smollm2 (sha256 {SHA}) is not in the store")), "{err:#}");
    assert_eq!(dev.gens.current().unwrap(), Some(1));
    assert!(!dev.root.join("etc/kiln/spec.yaml").exists() || !dev.read("/etc/kiln/spec.yaml").contains(SHA));
    // Once the store has it, the same generation activates.
    let store = kiln_supervisor::store::Store::open(&dev.state.join("models")).unwrap();
    store.import("smollm2", &model, SHA, &|_, _| {}).unwrap();
    let (out, _) = dev.activate(2);
    assert!(matches!(out, Outcome::Activated { number: 2, .. }), "{out:?}");
    assert!(dev.read("/etc/kiln/spec.yaml").contains(SHA));
}
