//! `kiln build` end to end on the Raspberry Pi OS-like fixture image: everything the spec says
//! is inside, the base's files are intact, builds are bit-reproducible, a config-only change
//! reuses the cached base, a killed build leaves nothing that looks finished, and the image
//! flashes (kiln flash, bmaptool) byte for byte.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kiln_builder::build::build;

#[test]
fn rpi_base_build_holds_the_spec_and_keeps_the_base_intact() {
    let test = "rpi_base_build_holds_the_spec_and_keeps_the_base_intact";
    let (Some(fixture), Some(kilnd)) = (rpi_fixture(test), kilnd_aarch64(test)) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let spec = pi_spec(tmp.path(), &fixture, 10);
    let out = tmp.path().join("out");
    let report = build(&options(&spec, &out, &kilnd), &Quiet).unwrap();
    let img = out.join("fixture-pi.img");
    assert_eq!(report.image, img);
    for name in ["fixture-pi.img", "fixture-pi.img.bmap", "fixture-pi.img.sha256"] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    let sums = std::fs::read_to_string(out.join("fixture-pi.img.sha256")).unwrap();
    assert_eq!(sums, format!("{}  fixture-pi.img\n", sha256_file(&img)));
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "work files left: {leftovers:?}");

    // Partition table: MBR, the base's boot partition, a new disk id derived from the name.
    let table = kiln_builder::image::partition::read(&img).unwrap();
    let disk = kiln_builder::plan::mbr_disk_id("fixture-pi");
    assert_eq!(table.id, disk);
    assert_eq!(table.parts[0].start_bytes, 8 << 20);
    assert_eq!(table.parts[0].size_bytes, 512 << 20);
    let partuuid = format!("{}-02", disk.trim_start_matches("0x"));

    // FAT: the base's config.txt with kiln's block after it; cmdline.txt pointed at the new root.
    let config = fat_file(&img, 1, "config.txt");
    assert!(config.contains("dtparam=audio=on"), "the base's settings are kept:\n{config}");
    assert!(
        config.contains("# BEGIN kiln") && config.contains("dtparam=pciex1_gen=3") && config.contains("arm_freq=2600")
    );
    assert_eq!(config.matches("# BEGIN kiln").count(), 1);
    let cmdline = fat_file(&img, 1, "cmdline.txt");
    assert_eq!(cmdline.lines().count(), 1);
    assert!(cmdline.contains(&format!("root=PARTUUID={partuuid}")), "{cmdline}");
    assert!(
        cmdline.contains("console=serial0,115200")
            && cmdline.contains("resize")
            && cmdline.contains("cgroup_enable=memory")
            && cmdline.contains("cfg80211.ieee80211_regdom=DE")
    );
    assert!(fat_file(&img, 1, "issue.txt").contains("start_file"), "untouched boot files survive");

    // ext4: fstab, accounts, generation, kilnd, model.
    let fstab = debugfs(&img, 2, "cat /etc/fstab");
    assert!(fstab.contains(&format!("PARTUUID={partuuid}  /")) && !fstab.contains("4b1c3a5e"), "{fstab}");
    let passwd = debugfs(&img, 2, "cat /etc/passwd");
    assert!(passwd.contains("kiln:x:999:999:kiln supervisor:/var/lib/kiln:/usr/sbin/nologin"), "{passwd}");
    assert!(passwd.contains("ops:x:1001:1001:ops:/home/ops:/bin/bash"));
    assert!(debugfs(&img, 2, "cat /etc/shadow").contains("ops:$6$kilnexample$"));
    let installed: kiln_spec::render::Manifest =
        serde_json::from_str(&debugfs(&img, 2, "cat /etc/kiln/manifest.json")).unwrap();
    let loaded = kiln_spec::load_file(&spec, kiln_spec::Context::Host).unwrap();
    let manifest = kiln_spec::render::render(&loaded).unwrap();
    assert_eq!(installed.generation, report.generation);
    assert_eq!(manifest.generation, report.generation);
    for e in &manifest.entries {
        if e.path.starts_with("/boot/firmware/") {
            continue;
        }
        let stat = debugfs(&img, 2, &format!("stat \"{}\"", e.path));
        let mode = match &e.kind {
            kiln_spec::render::Kind::Dir => format!("Mode:  0{:o}", e.mode),
            kiln_spec::render::Kind::Symlink { .. } => "Type: symlink".to_string(),
            _ => format!("Mode:  0{:o}", e.mode),
        };
        assert!(stat.contains(&mode), "{}: expected {mode} in\n{stat}", e.path);
        let (user, _) = e.owner.split_once(':').unwrap();
        let uid = match user {
            "root" => 0,
            "kiln" => 999,
            "ops" => 1001,
            other => panic!("owner {other}"),
        };
        assert!(stat.contains(&format!("User: {uid:>5}")), "{}: uid {uid} in\n{stat}", e.path);
        if matches!(e.kind, kiln_spec::render::Kind::File) {
            let content = debugfs(&img, 2, &format!("cat \"{}\"", e.path));
            assert_eq!(content.as_bytes(), e.content.as_slice(), "{} differs from its rendered content", e.path);
        }
    }
    let kilnd_stat = debugfs(&img, 2, "stat /usr/bin/kilnd");
    assert!(
        kilnd_stat.contains("Mode:  0755")
            && kilnd_stat.contains(&format!("Size: {}", std::fs::metadata(&kilnd).unwrap().len()))
    );
    let model = debugfs(&img, 2, "ls -l /var/lib/kiln/models");
    assert!(
        model.contains("100640") && model.contains("999") && model.contains("98362432  ") || model.contains("98362432"),
        "{model}"
    );
    let dumped = tmp.path().join("model.gguf");
    debugfs(
        &img,
        2,
        &format!(
            "dump /var/lib/kiln/models/b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53.gguf {}",
            dumped.display()
        ),
    );
    assert_eq!(sha256_file(&dumped), "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53");
    // Beside it the store's check digest, so the device's first prewarm is checked at copy speed.
    let check = tmp.path().join("model.b3");
    debugfs(
        &img,
        2,
        &format!(
            "dump /var/lib/kiln/models/b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53.b3 {}",
            check.display()
        ),
    );
    let digest = blake3::hash(&std::fs::read(&dumped).unwrap()).to_hex().to_string();
    assert_eq!(std::fs::read_to_string(&check).unwrap(), format!("{digest}\n"));
    let stat = debugfs(
        &img,
        2,
        "stat /var/lib/kiln/models/b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53.b3",
    );
    assert!(stat.contains("Mode:  0640") && stat.contains("User:   999"), "{stat}");

    // The base's own files: owners, modes, setuid, hardlinks and capabilities untouched.
    let notes = debugfs(&img, 2, "stat /home/pi/notes.txt");
    assert!(notes.contains("Mode:  0640") && notes.contains("User:  1000"), "{notes}");
    assert!(debugfs(&img, 2, "stat /usr/bin/passwd").contains("Mode:  04755"));
    let ping = debugfs(&img, 2, "stat /usr/bin/ping");
    assert!(ping.contains("Links: 2"), "hardlink kept:\n{ping}");
    assert!(debugfs(&img, 2, "ea_list /usr/bin/ping").contains("security.capability"), "capability kept");

    // The filesystem is consistent.
    let dev = format!("{}?offset={}", img.display(), part_offset(&img, 2));
    let fsck = Command::new(kiln_builder::tools::find("e2fsck").unwrap()).args(["-fn", &dev]).output().unwrap();
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
}

#[test]
fn builds_are_bit_reproducible_and_a_config_change_reuses_the_base() {
    let test = "builds_are_bit_reproducible_and_a_config_change_reuses_the_base";
    let (Some(fixture), Some(kilnd)) = (rpi_fixture(test), kilnd_aarch64(test)) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let spec = pi_spec(tmp.path(), &fixture, 10);
    let a = build(&options(&spec, &tmp.path().join("a"), &kilnd), &Quiet).unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // a different wall clock must not matter
    let b = build(&options(&spec, &tmp.path().join("b"), &kilnd), &Quiet).unwrap();
    assert_eq!(a.sha256, b.sha256, "two builds of the same spec differ");
    assert_eq!(sha256_file(&a.image), sha256_file(&b.image));
    assert!(b.base_from_cache);

    let edited = pi_spec(tmp.path(), &fixture, 20);
    let started = Instant::now();
    let c = build(&options(&edited, &tmp.path().join("c"), &kilnd), &Quiet).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(c.base_from_cache, "a sysctl change must reuse the cached base");
    assert_ne!(c.generation, a.generation);
    assert_ne!(c.sha256, a.sha256);
    assert!(debugfs(&c.image, 2, "cat /etc/sysctl.d/90-kiln.conf").contains("vm.swappiness = 20"));
    eprintln!("config-only rebuild of a {} MiB image: {seconds:.1}s", c.image_bytes >> 20);
}

#[test]
fn a_killed_build_leaves_nothing_that_looks_finished() {
    let test = "a_killed_build_leaves_nothing_that_looks_finished";
    let (Some(fixture), Some(kilnd)) = (rpi_fixture(test), kilnd_aarch64(test)) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let spec = pi_spec(tmp.path(), &fixture, 10);
    let cache = tmp.path().join("fresh-cache");
    for (label, wait_for) in [("during base preparation", "cache"), ("during assembly", "work")] {
        let out = tmp.path().join(format!("out-{wait_for}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["build", spec.to_str().unwrap(), "--out", out.to_str().unwrap(), "--kilnd", kilnd.to_str().unwrap()])
            .env("KILN_CACHE", &cache)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let hit = match wait_for {
                "cache" => std::fs::read_dir(cache.join("bases")).map(|d| d.count() > 0).unwrap_or(false),
                _ => {
                    std::fs::read_dir(&out)
                        .map(|d| {
                            d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().starts_with(".kiln-build"))
                        })
                        .unwrap_or(false)
                        && std::fs::read_dir(&out)
                            .unwrap()
                            .filter_map(|e| e.ok())
                            .any(|e| e.path().join("root.ext4").exists())
                }
            };
            if hit || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for name in ["fixture-pi.img", "fixture-pi.img.bmap", "fixture-pi.img.sha256"] {
            assert!(!out.join(name).exists(), "{label}: {name} exists after kill -9");
        }
        if wait_for == "cache" {
            let complete = std::fs::read_dir(cache.join("bases"))
                .unwrap()
                .filter_map(|e| e.ok())
                .any(|e| e.path().join("base.json").exists());
            assert!(!complete, "{label}: a half-prepared base looks complete");
        }
    }
    // The next build succeeds from whatever the killed ones left.
    let opts = kiln_builder::build::Options {
        cache: kiln_builder::base::Cache { root: cache },
        ..options(&spec, &tmp.path().join("again"), &kilnd)
    };
    build(&opts, &Quiet).unwrap();
}

#[test]
fn a_kilnd_for_the_wrong_architecture_is_refused() {
    let test = "a_kilnd_for_the_wrong_architecture_is_refused";
    let Some(fixture) = rpi_fixture(test) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let spec = pi_spec(tmp.path(), &fixture, 10);
    let err = build(&options(&spec, &tmp.path().join("out"), &kilnd_host()), &Quiet).unwrap_err();
    assert!(format!("{err:#}").contains("is built for x86_64, but the board runs aarch64"), "{err:#}");
    assert!(!tmp.path().join("out/fixture-pi.img").exists());
}

#[test]
fn a_kilnd_needing_a_library_the_root_lacks_is_refused() {
    let test = "a_kilnd_needing_a_library_the_root_lacks_is_refused";
    let Some(fixture) = rpi_fixture(test) else { return };
    if !available(test, "aarch64-linux-gnu-gcc", have("aarch64-linux-gnu-gcc")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // An aarch64 executable that needs libkilnfake.so.1, which no Debian root has.
    let dir = tmp.path();
    std::fs::write(dir.join("lib.c"), "int kiln_fake(void) { return 0; }\n").unwrap();
    std::fs::write(dir.join("main.c"), "int kiln_fake(void);\nint main(void) { return kiln_fake(); }\n").unwrap();
    let gcc = |args: &[&str]| {
        let out = std::process::Command::new("aarch64-linux-gnu-gcc").args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    gcc(&["-shared", "-fPIC", "-Wl,-soname,libkilnfake.so.1", "-o", "libkilnfake.so.1", "lib.c"]);
    gcc(&["-o", "kilnd", "main.c", "-L.", "-l:libkilnfake.so.1"]);
    let spec = pi_spec(dir, &fixture, 10);
    let err = build(&options(&spec, &dir.join("out"), &dir.join("kilnd")), &Quiet).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("needs libkilnfake.so.1, which the image's root does not have"), "{msg}");
    assert!(msg.contains("/lib/aarch64-linux-gnu"), "{msg}");
    assert!(!dir.join("out/fixture-pi.img").exists());
}

#[test]
fn the_image_flashes_byte_for_byte_with_kiln_and_bmaptool() {
    let test = "the_image_flashes_byte_for_byte_with_kiln_and_bmaptool";
    let (Some(fixture), Some(kilnd)) = (rpi_fixture(test), kilnd_aarch64(test)) else { return };
    if !available(test, "bmaptool", have("bmaptool")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec = pi_spec(tmp.path(), &fixture, 10);
    let r = build(&options(&spec, &tmp.path().join("out"), &kilnd), &Quiet).unwrap();
    let bmap = tmp.path().join("out/fixture-pi.img.bmap");
    let copy = tmp.path().join("bmaptool-copy.img");
    let out = Command::new("bmaptool").arg("copy").arg("--bmap").arg(&bmap).arg(&r.image).arg(&copy).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha256_file(&copy), r.sha256);
    let flashed = tmp.path().join("flashed.img");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("flash")
        .arg(&r.image)
        .arg(&flashed)
        .arg("--yes")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha256_file(&flashed), r.sha256);
}

#[test]
fn compressed_bases_and_outputs_give_the_same_image() {
    let test = "compressed_bases_and_outputs_give_the_same_image";
    let (Some(fixture), Some(kilnd)) = (rpi_fixture(test), kilnd_aarch64(test)) else { return };
    if !available(test, "zstd and xz", have("zstd") && have("xz")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let plain = build(&options(&pi_spec(tmp.path(), &fixture, 10), &tmp.path().join("plain"), &kilnd), &Quiet).unwrap();
    for (tool, args, ext) in
        [("zstd", vec!["-q", "-T0", "-3", "-c"], "zst"), ("xz", vec!["-q", "-T0", "-0", "-c"], "xz")]
    {
        let packed = tmp.path().join(format!("rpi-like.img.{ext}"));
        let out = Command::new(tool).args(&args).arg(&fixture).output().unwrap();
        assert!(out.status.success());
        std::fs::write(&packed, out.stdout).unwrap();
        let dir = tmp.path().join(ext);
        std::fs::create_dir_all(&dir).unwrap();
        let spec = pi_spec(&dir, &packed, 10);
        let mut opts = options(&spec, &dir.join("out"), &kilnd);
        opts.compress = Some(if ext == "zst" {
            kiln_builder::build::Compression::Zstd
        } else {
            kiln_builder::build::Compression::Xz
        });
        let r = build(&opts, &Quiet).unwrap();
        // The pin differs (so the generation does), but the unpacked base must not.
        for part in ["root.ext4", "boot.vfat"] {
            let cached = |key: &str| sha256_file(&cache_dir().join("bases").join(key).join(part));
            assert_eq!(cached(&r.base_key), cached(&plain.base_key), "a .img.{ext} base unpacks to a different {part}");
        }
        let compressed = dir.join(format!("out/fixture-pi.img.{ext}"));
        let sums = std::fs::read_to_string(dir.join("out/fixture-pi.img.sha256")).unwrap();
        assert!(sums.contains(&format!("{}  fixture-pi.img.{ext}", sha256_file(&compressed))), "{sums}");
        let unpacked = Command::new(tool).args(["-d", "-c"]).arg(&compressed).output().unwrap();
        assert!(unpacked.status.success());
        use sha2::Digest;
        assert_eq!(hex::encode(sha2::Sha256::digest(&unpacked.stdout)), r.sha256);
    }
}
