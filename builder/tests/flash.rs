//! Block maps and flashing, on sparse temp files only (and a loop device over one): never a
//! real disk is written.

use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_builder::flash::{self, FlashError, FlashOptions, TargetInfo};
use kiln_builder::image::bmap::{self, BmapError};
use kiln_builder::image::sparse;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// Not a multiple of the block size, so the last block is partial.
const IMAGE_BYTES: u64 = 8 * MIB + 1000;

/// A sparse image with data in block 0, blocks 256-257 (straddling the 1 MiB mark) and a
/// partial last block; everything else is a hole.
fn sparse_image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    let write = || -> std::io::Result<()> {
        let f = File::create(&path)?;
        f.set_len(IMAGE_BYTES)?;
        f.write_all_at(&[0xA5; 4096], 0)?;
        f.write_all_at(&pattern(5000), MIB - 100)?;
        f.write_all_at(&[0x5A; 1000], 8 * MIB)?;
        f.sync_all()
    };
    write().expect("writing the test image");
    path
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn sha256_of(path: &Path, start: u64, end: u64) -> String {
    let bytes = std::fs::read(path).expect("reading the test image");
    hex::encode(Sha256::digest(&bytes[start as usize..end as usize]))
}

/// bmaptool's path, or None after printing SKIP; a failure when KILN_REQUIRE_TOOLS=1.
fn bmaptool(test: &str) -> Option<PathBuf> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("bmaptool"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(std::env::var("KILN_REQUIRE_TOOLS").as_deref() != Ok("1"), "{test}: bmaptool not found");
        eprintln!("SKIP {test}: bmaptool not found");
    }
    found
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.env("LC_ALL", "C").output().expect("running bmaptool");
    eprintln!("{cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

fn opts(image: &Path, target: &Path) -> FlashOptions {
    FlashOptions { image: image.into(), bmap: None, target: target.into(), assume_yes: true, cancel: None }
}

fn never_asked(_: &TargetInfo) -> bool {
    panic!("confirmation asked despite assume_yes")
}

#[test]
fn bmap_maps_data_islands_block_aligned_with_range_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path());
    let map = bmap::generate(&image).unwrap();
    assert_eq!((map.image_size, map.block_size, map.blocks_count()), (IMAGE_BYTES, 4096, 2049));
    let blocks: Vec<(u64, u64)> = map.ranges.iter().map(|r| (r.first_block, r.last_block)).collect();
    assert_eq!(blocks, [(0, 0), (255, 257), (2048, 2048)]);
    assert_eq!(map.ranges[0].sha256, sha256_of(&image, 0, 4096));
    assert_eq!(map.ranges[1].sha256, sha256_of(&image, 255 * 4096, 258 * 4096));
    // The partial last block is hashed up to the end of the image, as bmaptool reads it.
    assert_eq!(map.ranges[2].sha256, sha256_of(&image, 8 * MIB, IMAGE_BYTES));
    assert_eq!(map.mapped_bytes(), 4 * 4096 + 1000);
}

#[test]
fn bmap_file_round_trips_and_bmaptool_copies_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path());
    let ours = dir.path().join("ours.bmap");
    let written = bmap::write(&image, &ours).unwrap();
    assert_eq!(bmap::read(&ours).unwrap(), written);

    let Some(tool) = bmaptool("bmap_file_round_trips_and_bmaptool_copies_with_it") else { return };
    let dest = dir.path().join("copy.img");
    let out = run(Command::new(&tool).arg("copy").arg("--bmap").arg(&ours).arg(&image).arg(&dest));
    assert!(out.status.success(), "bmaptool copy refused our bmap");
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&image).unwrap());
}

/// Same bytes for: the sparse image; a tiny dense one ("300 bytes", 100.0%); and one whose
/// mapped size prints longer than its image size, which bmaptool lets run into the padding.
#[test]
fn bmap_file_is_byte_for_byte_what_bmaptool_create_writes() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tool) = bmaptool("bmap_file_is_byte_for_byte_what_bmaptool_create_writes") else { return };
    let tiny = dir.path().join("tiny.img");
    std::fs::write(&tiny, pattern(300)).unwrap();
    let scattered = dir.path().join("scattered.img");
    let f = File::create(&scattered).unwrap();
    f.set_len(3 * MIB).unwrap();
    for i in 0..40 {
        f.write_all_at(&pattern(4096), i * 5 * 4096).unwrap();
    }
    f.sync_all().unwrap();
    for image in [sparse_image(dir.path()), tiny, scattered] {
        let theirs = dir.path().join("theirs.bmap");
        let out = run(Command::new(&tool).arg("create").arg("-o").arg(&theirs).arg(&image));
        assert!(out.status.success());
        let theirs = std::fs::read_to_string(&theirs).unwrap();
        assert_eq!(bmap::to_xml(&bmap::generate(&image).unwrap()), theirs, "{}", image.display());
    }
}

#[test]
fn tampered_bmap_is_rejected_by_read_and_by_bmaptool() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path());
    let path = dir.path().join("tampered.bmap");
    let map = bmap::write(&image, &path).unwrap();
    let good = &map.ranges[1].sha256;
    let bad = format!("{}{}", if good.starts_with('0') { "1" } else { "0" }, &good[1..]);
    let text = std::fs::read_to_string(&path).unwrap().replace(good.as_str(), &bad);
    std::fs::write(&path, text).unwrap();

    let err = bmap::read(&path).unwrap_err();
    assert!(matches!(err, BmapError::Checksum { .. }), "{err:?}");
    assert!(err.to_string().starts_with(&format!("{}: BmapFileChecksum is ", path.display())), "{err}");

    let Some(tool) = bmaptool("tampered_bmap_is_rejected_by_read_and_by_bmaptool") else { return };
    let dest = dir.path().join("copy.img");
    let out = run(Command::new(&tool).arg("copy").arg("--bmap").arg(&path).arg(&image).arg(&dest));
    assert!(!out.status.success(), "bmaptool accepted a tampered bmap");
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"));
}

#[test]
fn flash_to_a_regular_file_reproduces_the_image_holes_and_all() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path());
    let target = dir.path().join("target.img");
    // Old bytes where the image has holes, and past its end, must not survive.
    std::fs::write(&target, vec![0xEE; 10 * MIB as usize]).unwrap();
    let last = Cell::new((0, 0));
    let progress = |done: u64, total: u64| {
        assert!(done >= last.get().0 && done <= total);
        last.set((done, total));
    };
    let report = flash::flash(&opts(&image, &target), &mut never_asked, &progress).unwrap();

    assert_eq!(std::fs::read(&target).unwrap(), std::fs::read(&image).unwrap());
    let mapped = 4 * 4096 + 1000;
    assert_eq!((report.bytes_written, report.verified_ranges), (mapped, 3));
    assert_eq!(last.get(), (2 * mapped, 2 * mapped));
    let data: u64 = sparse::data_ranges(&File::open(&target).unwrap()).unwrap().iter().map(|(s, e)| e - s).sum();
    assert!(data < MIB, "the target lost its holes: {data} bytes of data");
}

#[test]
fn flash_creates_a_missing_target_and_uses_the_bmap_beside_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path());
    bmap::write(&image, &flash::default_bmap_path(&image)).unwrap();
    let target = dir.path().join("new.img");
    flash::flash(&opts(&image, &target), &mut never_asked, &|_, _| {}).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), std::fs::read(&image).unwrap());

    // A map of another image is caught before anything is written.
    std::fs::OpenOptions::new().append(true).open(&image).unwrap().write_all_at(b"x", IMAGE_BYTES).unwrap();
    let err = flash::flash(&opts(&image, &dir.path().join("other.img")), &mut never_asked, &|_, _| {}).unwrap_err();
    assert!(matches!(err, FlashError::BmapMismatch { .. }), "{err:?}");
    assert!(!dir.path().join("other.img").exists());
}

#[test]
fn flash_asks_first_and_writes_nothing_on_no() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path());
    let target = dir.path().join("target.img");
    let mut asked = None;
    let mut say_no = |info: &TargetInfo| {
        asked = Some(info.clone());
        false
    };
    let o = FlashOptions { assume_yes: false, ..opts(&image, &target) };
    let err = flash::flash(&o, &mut say_no, &|_, _| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("not flashing {}: not confirmed (pass --yes to skip the question)", target.display())
    );
    let asked = asked.unwrap();
    assert!(!asked.is_block_device && asked.size_bytes == 0 && asked.path == target);
    assert!(!target.exists());
}

/// Flashes a bootable head onto a target, then flashes again with Ctrl-C (what kiln's
/// SIGINT/SIGTERM handler sets) once `now(done, total)` holds: the flash must stop with
/// Interrupted and leave the head wiped, so neither image boots from the disk.
#[allow(clippy::unwrap_used)] // a test helper: a failure is the test failing
fn interrupt_when(now: impl Fn(u64, u64) -> bool) {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path());
    let target = dir.path().join("target.img");
    flash::flash(&opts(&image, &target), &mut never_asked, &|_, _| {}).unwrap();
    let mut head = vec![0u8; 4096];
    File::open(&target).unwrap().read_exact_at(&mut head, 0).unwrap();
    assert!(head.iter().any(|&b| b != 0), "the first flash wrote the head");

    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let o = FlashOptions { cancel: Some(cancel.clone()), ..opts(&image, &target) };
    let progress = |done: u64, total: u64| {
        if now(done, total) {
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    };
    let err = flash::flash(&o, &mut never_asked, &progress).unwrap_err();
    let FlashError::Wiped { cause, .. } = &err else { panic!("{err:?}") };
    assert!(matches!(**cause, FlashError::Interrupted), "{cause:?}");
    let mut head = vec![0xEEu8; MIB as usize];
    File::open(&target).unwrap().read_exact_at(&mut head, 0).unwrap();
    assert!(head.iter().all(|&b| b == 0), "the old head survived an interrupted flash");
}

/// Ctrl-C while writing: the copy stops and the old head is wiped.
#[test]
fn an_interrupted_flash_wipes_the_old_partition_table() {
    interrupt_when(|done, _| done > 0);
}

/// Ctrl-C late, when the ranges are written and being read back (on another thread): the
/// read-back stops and the head is wiped all the same.
#[test]
fn an_interrupted_read_back_wipes_the_head_too() {
    interrupt_when(|done, total| done > total / 2);
}

/// An image edited after its bmap was made: verification fails and the head is wiped.
#[test]
fn corrupt_image_fails_verification_and_leaves_the_first_mib_zeroed() {
    for (what, offset) in [("past the first MiB", 8 * MIB + 10), ("in the first MiB", 100)] {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_image(dir.path());
        bmap::write(&image, &flash::default_bmap_path(&image)).unwrap();
        File::options().write(true).open(&image).unwrap().write_all_at(&[0xFF], offset).unwrap();
        let target = dir.path().join("target.img");

        let err = flash::flash(&opts(&image, &target), &mut never_asked, &|_, _| {}).unwrap_err();
        let FlashError::Wiped { cause, .. } = &err else { panic!("{what}: {err:?}") };
        assert!(matches!(**cause, FlashError::ImageMismatch { .. }), "{what}: {cause:?}");
        assert!(err.to_string().contains("its first MiB was wiped"), "{err}");
        let mut head = vec![0xEEu8; MIB as usize];
        File::open(&target).unwrap().read_exact_at(&mut head, 0).unwrap();
        assert!(head.iter().all(|&b| b == 0), "{what}: the first MiB survived");
    }
}

/// A range longer than the stretches the writer hands to the verifier (16 MiB) is hashed
/// across them, from the image's first MiB into the read-back, in order: the flash verifies,
/// and a byte changed in the image (not in its map) past the first stretch is still caught.
#[test]
fn a_range_longer_than_a_written_stretch_is_verified_across_stretches() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("long.img");
    let (start, len) = (MIB / 2, 40 * MIB as usize);
    let f = File::create(&image).unwrap();
    f.set_len(48 * MIB).unwrap();
    f.write_all_at(&pattern(len), start).unwrap();
    drop(f);
    let map = bmap::generate(&image).unwrap();
    assert_eq!(map.ranges.len(), 1, "{map:?}");
    bmap::write(&image, &flash::default_bmap_path(&image)).unwrap();
    let target = dir.path().join("target.img");

    let report = flash::flash(&opts(&image, &target), &mut never_asked, &|_, _| {}).unwrap();
    assert_eq!((report.bytes_written, report.verified_ranges), (len as u64, 1));
    assert_eq!(std::fs::read(&target).unwrap(), std::fs::read(&image).unwrap());

    File::options().write(true).open(&image).unwrap().write_all_at(&[0xFF], 35 * MIB).unwrap();
    let err = flash::flash(&opts(&image, &target), &mut never_asked, &|_, _| {}).unwrap_err();
    let FlashError::Wiped { cause, .. } = &err else { panic!("{err:?}") };
    let FlashError::ImageMismatch { first_block, last_block, .. } = **cause else { panic!("{cause:?}") };
    assert_eq!((first_block, last_block), (start / 4096, (start + len as u64) / 4096 - 1));
}

/// A loop device over a temp file, detached when dropped (also when the test fails).
struct Loop(PathBuf);

impl Loop {
    /// Attaches `backing`. None (SKIP) on a kernel without loop devices (no /dev/loop-control,
    /// as in many containers); when it has them, a failing losetup is a SKIP only without
    /// KILN_REQUIRE_TOOLS=1 (CI).
    fn attach(test: &str, backing: &Path) -> Option<Loop> {
        if !Path::new("/dev/loop-control").exists() {
            eprintln!("SKIP {test}: this kernel has no loop devices (/dev/loop-control is missing)");
            return None;
        }
        let out = Command::new("losetup").arg("--find").arg("--show").arg(backing).output();
        match out {
            Ok(out) if out.status.success() => {
                Some(Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string())))
            }
            other => {
                let why = format!("{test}: losetup could not attach a loop device: {other:?}");
                assert!(std::env::var("KILN_REQUIRE_TOOLS").as_deref() != Ok("1"), "{why}");
                eprintln!("SKIP {why}");
                None
            }
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("--detach").arg(&self.0).status();
    }
}

/// A real block device: opened exclusively, written and read back with O_DIRECT through a
/// second descriptor, the partition table re-read (BLKRRPART) at the end; the device then
/// holds the image, byte for byte.
#[test]
fn flash_to_a_loop_device_writes_and_verifies_through_the_block_layer() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("long.img");
    let f = File::create(&image).unwrap();
    f.set_len(48 * MIB).unwrap();
    f.write_all_at(&pattern(40 * MIB as usize), MIB / 2).unwrap();
    f.write_all_at(&[0x5A; 512], 0).unwrap();
    drop(f);
    let backing = dir.path().join("disk");
    File::create(&backing).unwrap().set_len(64 * MIB).unwrap();
    let Some(dev) = Loop::attach("flash_to_a_loop_device", &backing) else { return };

    let seen = std::cell::RefCell::new(None);
    let mut confirm = |t: &TargetInfo| {
        *seen.borrow_mut() = Some(t.clone());
        true
    };
    let o = FlashOptions { assume_yes: false, ..opts(&image, &dev.0) };
    let report = flash::flash(&o, &mut confirm, &|_, _| {}).unwrap();
    let t = seen.borrow().clone().unwrap();
    assert!(t.is_block_device && t.size_bytes == 64 * MIB, "{t:?}");
    assert_eq!(report.verified_ranges, 2);
    let mut got = vec![0u8; 48 * MIB as usize];
    File::open(&dev.0).unwrap().read_exact_at(&mut got, 0).unwrap();
    assert!(got == std::fs::read(&image).unwrap(), "the device does not hold the image");
}

#[test]
fn a_block_device_smaller_than_the_image_is_refused_with_both_sizes() {
    let small = TargetInfo {
        path: "/dev/sdz".into(),
        is_block_device: true,
        size_bytes: 4 * MIB,
        model: Some("Tiny".into()),
        kernel_name: Some("sdz".into()),
        removable: true,
    };
    let err = flash::check_fits(IMAGE_BYTES, &small).unwrap_err();
    assert_eq!(
        err.to_string(),
        "refusing to flash /dev/sdz: it holds 4194304 bytes but the image is 8389608 bytes \
         (pass a device of at least 8389608 bytes)"
    );
    flash::check_fits(IMAGE_BYTES, &TargetInfo { size_bytes: 16 * MIB, ..small.clone() }).unwrap();
    // A regular file grows to fit.
    flash::check_fits(IMAGE_BYTES, &TargetInfo { is_block_device: false, ..small }).unwrap();
}

#[test]
fn directories_character_devices_and_the_image_itself_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = flash::inspect_target(dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "refusing to flash {}: it is a directory (pass a block device or a regular file)",
            dir.path().display()
        )
    );
    let err = flash::inspect_target(Path::new("/dev/null")).unwrap_err();
    assert!(err.to_string().contains("it is a character device"), "{err}");

    let image = sparse_image(dir.path());
    let before = std::fs::read(&image).unwrap();
    let err = flash::flash(&opts(&image, dir.path()), &mut never_asked, &|_, _| {}).unwrap_err();
    assert!(matches!(err, FlashError::NotFlashable { .. }), "{err:?}");
    let err = flash::flash(&opts(&image, &image), &mut never_asked, &|_, _| {}).unwrap_err();
    assert!(matches!(err, FlashError::SameAsImage { .. }), "{err:?}");
    assert_eq!(std::fs::read(&image).unwrap(), before);
}

/// The device this machine runs from is refused, naming `/`. Only inspected and checked:
/// `flash` is never called on it.
#[test]
fn the_disk_holding_root_is_refused() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut sources = mountinfo.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (f.get(4) == Some(&"/")).then(|| f.get(sep + 2).map(|s| s.to_string()))?
    });
    // The last mount on / is the one in effect.
    let Some(root) = sources.next_back() else { panic!("no / in mountinfo") };
    let is_block = std::fs::metadata(&root).is_ok_and(|m| m.file_type().is_block_device());
    if !is_block {
        eprintln!("SKIP the_disk_holding_root_is_refused: / is on {root}, not a block device");
        return;
    }
    let info = flash::inspect_target(Path::new(&root)).unwrap();
    assert!(info.is_block_device && info.size_bytes > 0, "{info:?}");
    let err = flash::check_target(&info).unwrap_err();
    let FlashError::Busy { reasons, .. } = &err else { panic!("{err:?}") };
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(reasons.iter().any(|r| r.contains("is mounted at /")), "{msg}");
    assert!(reasons.iter().any(|r| r == "it holds /"), "{msg}");
    assert!(
        msg.starts_with(&format!("refusing to flash {root}: ")) && msg.ends_with(" (pass a different device)"),
        "{msg}"
    );
}
