//! Golden tests of every rendered file of every example, the listing of paths, modes and
//! owners, the budget table; plus determinism and the device spec's round trip.

mod common;

use common::{EXAMPLES, load_example, repo_root};
use kiln_spec::render::{Kind, read_manifest, render, write_tree};
use kiln_spec::validate::{Context, load_str};

fn snapshot_name(example: &str, path: &str) -> String {
    format!("{example}__{}", path.trim_start_matches('/').replace('/', "__"))
}

#[test]
fn every_rendered_file_of_every_example_matches_its_snapshot() {
    for example in EXAMPLES {
        let loaded = load_example(example);
        let manifest = render(&loaded).expect("renders");
        insta::assert_snapshot!(format!("{example}__listing"), manifest.to_string());
        insta::assert_snapshot!(format!("{example}__budget"), loaded.budget.to_string());
        for e in &manifest.entries {
            if matches!(e.kind, Kind::File | Kind::Block | Kind::Args) {
                let text = String::from_utf8(e.content.clone()).expect("rendered files are text");
                insta::assert_snapshot!(snapshot_name(example, &e.path), text);
            }
        }
    }
}

#[test]
fn rendering_twice_gives_identical_bytes_and_generation_id() {
    for example in EXAMPLES {
        let a = render(&load_example(example)).expect("renders");
        let b = render(&load_example(example)).expect("renders");
        assert_eq!(a, b, "{example}: two renders differ");
        let contents =
            |m: &kiln_spec::render::Manifest| m.entries.iter().map(|e| e.content.clone()).collect::<Vec<_>>();
        assert_eq!(contents(&a), contents(&b));
    }
}

#[test]
fn written_trees_are_byte_identical_and_read_back_to_the_same_manifest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for example in EXAMPLES {
        let m = render(&load_example(example)).expect("renders");
        let (one, two) = (tmp.path().join(format!("{example}-1")), tmp.path().join(format!("{example}-2")));
        write_tree(&m, &one).expect("writes");
        write_tree(&m, &two).expect("writes");
        let back = read_manifest(&one).expect("reads back");
        assert_eq!(back, m, "{example}: manifest read back differs");
        for e in &m.entries {
            let rel = e.path.trim_start_matches('/');
            let (p1, p2) = (one.join(rel), two.join(rel));
            let meta = std::fs::symlink_metadata(&p1).expect("entry exists");
            match &e.kind {
                Kind::Symlink { target } => {
                    assert_eq!(&std::fs::read_link(&p1).expect("symlink").to_string_lossy(), target)
                }
                Kind::Dir => assert!(meta.is_dir()),
                _ => {
                    use std::os::unix::fs::PermissionsExt;
                    assert_eq!(std::fs::read(&p1).expect("read"), std::fs::read(&p2).expect("read"));
                    assert_eq!(meta.permissions().mode() & 0o7777, e.mode, "{}: mode", e.path);
                }
            }
        }
        let manifest_text = |d: &std::path::Path| std::fs::read(d.join("etc/kiln/manifest.json")).expect("manifest");
        assert_eq!(manifest_text(&one), manifest_text(&two));
    }
}

#[test]
fn the_generation_does_not_depend_on_where_the_spec_lives() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path().join("elsewhere");
    std::fs::create_dir_all(copy.join("models")).expect("mkdir");
    std::fs::create_dir_all(copy.join("secrets")).expect("mkdir");
    let root = repo_root().join("examples");
    std::os::unix::fs::symlink(
        root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        copy.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    .expect("link");
    for f in ["demo-api-token", "wifi.psk", "api-token"] {
        std::fs::copy(root.join("secrets").join(f), copy.join("secrets").join(f)).expect("copy");
    }
    for example in EXAMPLES {
        std::fs::copy(root.join(format!("{example}.yaml")), copy.join(format!("{example}.yaml"))).expect("copy");
        let moved = kiln_spec::load_file(&copy.join(format!("{example}.yaml")), Context::Host).expect("checks");
        assert_eq!(
            render(&moved).expect("renders").generation,
            render(&load_example(example)).expect("renders").generation
        );
    }
}

#[test]
fn the_normalized_device_spec_reads_back_to_the_same_spec() {
    for example in EXAMPLES {
        let loaded = load_example(example);
        let text = kiln_spec::render::normalized_spec(&loaded.spec, &loaded.raw).expect("normalizes");
        let path = std::path::Path::new("/etc/kiln/spec.yaml");
        let device = load_str(&text, path, std::path::Path::new("/etc/kiln"), Context::Device)
            .unwrap_or_else(|d| panic!("{example}: the device cannot read its own spec:\n{d}\n---\n{text}"));
        // Normalizing is idempotent: the device's spec normalizes to itself.
        let again = kiln_spec::render::normalized_spec(&device.spec, &device.raw).expect("normalizes");
        assert_eq!(text, again, "{example}: normalizing twice changes the spec");
        let (h, d) = (&loaded.spec, &device.spec);
        assert_eq!(
            (&h.memory, &h.cgroups, &h.cache, &h.supervisor.listen),
            (&d.memory, &d.cgroups, &d.cache, &d.supervisor.listen)
        );
        for (a, b) in h.models.iter().zip(&d.models) {
            assert_eq!(
                (&a.id, &a.sha256, a.size_bytes, a.context, a.threads, a.pin),
                (&b.id, &b.sha256, b.size_bytes, b.context, b.threads, b.pin)
            );
        }
    }
}
