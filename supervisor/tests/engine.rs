//! kilnd's cache engine on real files and a real journald: prewarm now, a corrupt hot copy
//! re-copied, memory pressure demoting unpinned hot copies (pinned kept), every decision in
//! the journal under its MESSAGE_ID, and `kilnd status`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest;

mod common;
use common::{journal, journald, since};

const SMOL_SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A device spec with the demo model (pinned) and a small unpinned one, both in the store
/// under `state`, as a built image would have them.
fn device(state: &Path) -> PathBuf {
    let model = repo().join("examples/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "run scripts/fetch-model first");
    let store = state.join("var/lib/kiln/models");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::copy(&model, store.join(format!("{SMOL_SHA}.gguf"))).unwrap();
    let tiny: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    let tiny_sha = hex::encode(sha2::Sha256::digest(&tiny));
    std::fs::write(store.join(format!("{tiny_sha}.gguf")), &tiny).unwrap();
    let spec = format!(
        r#"api-version: kiln/v1
name: engine-test
hardware: {{ board: generic-x86_64, ram: 4GiB }}
system: {{ timezone: Europe/Berlin }}
memory:
  tmpfs: {{ path: /var/cache/kiln/hot, size: 256MiB }}
models:
  - {{ id: smollm2-135m, sha256: {SMOL_SHA}, size: 98362432, pin: true }}
  - {{ id: tiny, sha256: {tiny_sha}, size: 3MiB }}
cache:
  prewarm: {{ windows: ["01:00-05:00"], models: [smollm2-135m, tiny] }}
"#
    );
    let path = state.join("spec.yaml");
    std::fs::write(&path, spec).unwrap();
    path
}

fn kilnd(spec: &Path, state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--spec")
        .arg(spec)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn prewarm_now_copies_verifies_and_logs_to_journald() {
    let test = "prewarm_now_copies_verifies_and_logs_to_journald";
    let have_journal = journald(test);
    let tmp = tempfile::tempdir().unwrap();
    let spec = device(tmp.path());
    let start = since();
    let out = kilnd(&spec, tmp.path(), &["prewarm", "--now"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hot = tmp.path().join(format!("var/cache/kiln/hot/{SMOL_SHA}.gguf"));
    assert_eq!(hex::encode(sha2::Sha256::digest(std::fs::read(&hot).unwrap())), SMOL_SHA);
    if have_journal {
        let entries = journal(kiln_supervisor::log::message_id::PREWARM_DONE, "smollm2-135m", &start);
        let e = entries.last().unwrap_or_else(|| panic!("no PREWARM_DONE entry for smollm2-135m in the journal"));
        assert_eq!(e["TIER"], "hot");
        assert_eq!(e["BYTES"], "98362432");
        assert_eq!(e["SHA256"], SMOL_SHA);
        assert!(e["DURATION_MS"].as_str().unwrap().parse::<u64>().is_ok());
    }

    // A flipped byte in the hot copy is found and the copy redone.
    let mut bytes = std::fs::read(&hot).unwrap();
    bytes[12345] ^= 0xff;
    std::fs::write(&hot, &bytes).unwrap();
    let out = kilnd(&spec, tmp.path(), &["prewarm", "--now", "smollm2-135m"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(hex::encode(sha2::Sha256::digest(std::fs::read(&hot).unwrap())), SMOL_SHA);

    let status = kilnd(&spec, tmp.path(), &["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let smol = s["models"].as_array().unwrap().iter().find(|m| m["id"] == "smollm2-135m").unwrap();
    assert_eq!(smol["hot"], true);
    assert_eq!(smol["pinned"], true);
    assert!(s["hot_used_bytes"].as_u64().unwrap() >= 98_362_432);

    let unknown = kilnd(&spec, tmp.path(), &["prewarm", "--now", "nope"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no model `nope` in the spec; it has smollm2-135m, tiny")
    );
}

/// Prewarm checks copies against the store's BLAKE3 check digest, records one for a file that
/// came without (a built image's store), and lets the sha256 decide when the two disagree.
#[test]
fn prewarm_records_and_uses_the_store_check_digest_and_the_sha256_decides() {
    let tmp = tempfile::tempdir().unwrap();
    let spec_path = device(tmp.path());
    let loaded = kiln_spec::load_file(&spec_path, kiln_spec::Context::Device).unwrap();
    let engine = kiln_supervisor::engine::Engine::open(loaded.spec, Some(tmp.path())).unwrap();
    let sha = engine.model("tiny").unwrap().sha256.clone();
    let stored = tmp.path().join(format!("var/lib/kiln/models/{sha}.gguf"));
    let digest = tmp.path().join(format!("var/lib/kiln/models/{sha}.b3"));
    let hot = tmp.path().join(format!("var/cache/kiln/hot/{sha}.gguf"));
    let b3 = blake3::hash(&std::fs::read(&stored).unwrap()).to_hex().to_string();
    let tiny = ["tiny".to_string()];
    assert!(!digest.exists());

    // First copy: checked against the sha256; the BLAKE3 of those bytes is recorded.
    assert_eq!(engine.prewarm(&tiny, None).unwrap(), tiny);
    assert_eq!(std::fs::read_to_string(&digest).unwrap().trim(), b3);
    assert_eq!(std::fs::read(&hot).unwrap(), std::fs::read(&stored).unwrap());

    // The hot copy is verified against the digest; a flipped byte in it is found and re-copied.
    let mut bytes = std::fs::read(&hot).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&hot, &bytes).unwrap();
    engine.prewarm(&tiny, None).unwrap();
    assert_eq!(std::fs::read(&hot).unwrap(), std::fs::read(&stored).unwrap());

    // A wrong digest (the store file is fine): the copy misses it, the digest is dropped, the
    // copy is made again against the sha256, and the right digest recorded.
    std::fs::remove_file(&hot).unwrap();
    std::fs::write(&digest, format!("{}\n", "0".repeat(64))).unwrap();
    engine.prewarm(&tiny, None).unwrap();
    assert_eq!(std::fs::read(&hot).unwrap(), std::fs::read(&stored).unwrap());
    assert_eq!(std::fs::read_to_string(&digest).unwrap().trim(), b3);

    // The store file rots after its digest was recorded: the digest catches it, the sha256
    // confirms it, and nothing lands in the hot tier.
    std::fs::remove_file(&hot).unwrap();
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[2 << 20] ^= 0x10;
    std::fs::write(&stored, &bytes).unwrap();
    let err = format!("{:#}", engine.prewarm(&tiny, None).unwrap_err());
    assert!(err.contains("prewarming tiny") && err.contains("sha256 mismatch"), "{err}");
    assert!(!hot.exists());
    assert!(!digest.exists(), "a digest that no copy matches was kept");
    let leftovers: Vec<_> =
        std::fs::read_dir(hot.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn memory_pressure_demotes_unpinned_hot_copies_and_keeps_pinned() {
    let test = "memory_pressure_demotes_unpinned_hot_copies_and_keeps_pinned";
    let have_journal = journald(test);
    if have_journal {
        kiln_supervisor::log::init("info");
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec_path = device(tmp.path());
    let loaded = kiln_spec::load_file(&spec_path, kiln_spec::Context::Device).unwrap();
    let mut engine = kiln_supervisor::engine::Engine::open(loaded.spec, Some(tmp.path())).unwrap();
    engine.prewarm(&["smollm2-135m".into(), "tiny".into()], None).unwrap();
    let tiny_sha = engine.model("tiny").unwrap().sha256.clone();
    let hot = |sha: &str| tmp.path().join(format!("var/cache/kiln/hot/{sha}.gguf")).exists();
    assert!(hot(SMOL_SHA) && hot(&tiny_sha));
    let start = since();
    let gib = 1u64 << 30;
    let calm =
        kiln_supervisor::policy::MemReading { total_bytes: 4 * gib, available_bytes: 3 * gib, psi_some_avg10: None };
    assert_eq!(engine.react_to_pressure(calm).unwrap(), kiln_supervisor::policy::Level::Normal);
    assert!(hot(&tiny_sha));
    // 80% used: past the 70% evict threshold.
    let tight = kiln_supervisor::policy::MemReading {
        total_bytes: 4 * gib,
        available_bytes: 4 * gib / 5,
        psi_some_avg10: None,
    };
    // A tmpfs copy a worker maps is left until the worker unloads (deleting it frees nothing).
    engine.set_mapped_hot(["tiny".to_string()]);
    assert_eq!(engine.react_to_pressure(tight).unwrap(), kiln_supervisor::policy::Level::Evict);
    assert!(hot(&tiny_sha), "a mapped hot copy was demoted");
    engine.set_mapped_hot([]);
    assert_eq!(engine.react_to_pressure(tight).unwrap(), kiln_supervisor::policy::Level::Evict);
    assert!(!hot(&tiny_sha), "the unpinned model stays hot under pressure");
    assert!(hot(SMOL_SHA), "the pinned model was evicted");
    if have_journal {
        let e = journal(kiln_supervisor::log::message_id::EVICTION, "tiny", &start);
        let e = e.last().expect("no EVICTION entry for tiny in the journal");
        assert_eq!(e["TIER"], "hot");
        assert_eq!(e["REASON"], "Evict");
    }
    assert_eq!(engine.status(Some(tight)).pressure, "Evict");
}

#[test]
fn live_memory_readings_parse() {
    let r = kiln_supervisor::engine::read_memory().unwrap();
    assert!(r.total_bytes > 0 && r.available_bytes <= r.total_bytes);
}

#[test]
fn demand_is_recorded_saved_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let spec_path = device(tmp.path());
    let open = || {
        let loaded = kiln_spec::load_file(&spec_path, kiln_spec::Context::Device).unwrap();
        kiln_supervisor::engine::Engine::open(loaded.spec, Some(tmp.path())).unwrap()
    };
    let mut engine = open();
    assert_eq!(engine.demand().total("tiny"), 0.0);
    for _ in 0..3 {
        engine.record_request("tiny");
    }
    engine.save_demand().unwrap();
    let again = open();
    assert!((again.demand().total("tiny") - 3.0).abs() < 0.01, "{}", again.demand().total("tiny"));
    // A damaged file starts afresh instead of failing kilnd.
    std::fs::write(tmp.path().join("var/lib/kiln/demand.json"), "{not json").unwrap();
    assert_eq!(open().demand().total("tiny"), 0.0);
}

/// The time zone read straight from its TZif file is the one jiff's own lookup finds; names
/// that are not plain paths under the zoneinfo directory go through jiff (or fail there).
#[test]
fn time_zone_is_read_from_its_file_and_matches_jiff() {
    use kiln_supervisor::engine::time_zone;
    let instants: Vec<jiff::Timestamp> =
        ["2026-01-15T12:00:00Z", "2026-03-29T00:59:59Z", "2026-03-29T01:00:00Z", "2026-07-01T00:00:00Z"]
            .iter()
            .map(|t| t.parse().unwrap())
            .collect();
    for name in ["Europe/Berlin", "America/New_York", "UTC", "Asia/Kolkata", "europe/berlin"] {
        let ours = time_zone(name).unwrap();
        let jiffs = jiff::tz::TimeZone::get(name).unwrap();
        for t in &instants {
            assert_eq!(ours.to_offset(*t), jiffs.to_offset(*t), "{name} at {t}");
        }
    }
    assert_eq!(time_zone("Europe/Berlin").unwrap().iana_name(), Some("Europe/Berlin"));
    for bad in ["../../etc/passwd", "/etc/localtime", "Nowhere/Atlantis", ""] {
        let err = time_zone(bad).unwrap_err();
        assert!(format!("{err:#}").contains("loading time zone"), "{bad}: {err:#}");
    }
}
