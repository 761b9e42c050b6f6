//! `kiln flash`: write an image to a block device (or a regular file) the safe way: refuse
//! disks in use, ask, write all but the first MiB, verify every range against the block map,
//! write the first MiB last, and wipe it again if anything fails once writing has begun.
//!
//! The protocol follows coreos-installer (src/install.rs, src/blockdev.rs): a half-written
//! disk must never look bootable, so the partition table is the last thing written.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{OFlag, PosixFadviseAdvice, posix_fadvise};
use nix::libc;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::image::bmap::{self, Bmap, BmapError, BmapRange};

/// The first MiB holds the MBR/GPT and, on a Pi, nothing else; it is written last.
const HEAD_BYTES: u64 = 1 << 20;
const IO_BUFFER_BYTES: usize = 4 << 20;
/// How much is written before the verifier is handed it to read back.
const WRITTEN_STRETCH_BYTES: u64 = 16 << 20;
const SYS_DEV_BLOCK: &str = "/sys/dev/block";
const SYS_CLASS_BLOCK: &str = "/sys/class/block";
const PROC_MOUNTINFO: &str = "/proc/self/mountinfo";
const PROC_SWAPS: &str = "/proc/swaps";
/// sysfs `size` counts 512-byte sectors whatever the device's sector size (block/genhd.c).
const SYSFS_SECTOR_BYTES: u64 = 512;

/// A range of the block map and its bytes `[start, end)` in the image.
type Part<'r> = (&'r BmapRange, (u64, u64));

/// What to flash where.
#[derive(Debug, Clone)]
pub struct FlashOptions {
    pub image: PathBuf,
    /// The block map; `None` uses IMAGE.bmap when it exists, else maps the image in memory.
    pub bmap: Option<PathBuf>,
    pub target: PathBuf,
    /// Skip the confirmation (`--yes`); the safety checks still run.
    pub assume_yes: bool,
    /// Set (by a SIGINT/SIGTERM handler) to stop: the target's head is then wiped as after
    /// any other failure, so an interrupted flash never leaves a disk that boots half-written.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// What the target is, as shown before asking for confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    pub path: PathBuf,
    pub is_block_device: bool,
    /// Capacity of a block device; current length of a regular file (0 if it is missing).
    pub size_bytes: u64,
    /// The model as lsblk shows it (sysfs `device/model`, or `device/name` for MMC/SD).
    pub model: Option<String>,
    /// The kernel's name for a block device (`sda`, `mmcblk0`).
    pub kernel_name: Option<String>,
    pub removable: bool,
}

/// What a successful flash did.
#[derive(Debug, Clone, PartialEq)]
pub struct FlashReport {
    pub bytes_written: u64,
    pub seconds: f64,
    pub verified_ranges: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("inspecting {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("refusing to flash {path}: it is {kind} (pass a block device or a regular file)")]
    NotFlashable { path: PathBuf, kind: &'static str },
    #[error("refusing to flash {path}: {} (pass a different device)", reasons.join("; "))]
    Busy { path: PathBuf, reasons: Vec<String> },
    #[error("refusing to flash {path}: it is the image itself (pass a different target)")]
    SameAsImage { path: PathBuf },
    #[error(
        "refusing to flash {path}: it holds {target_bytes} bytes but the image is {image_bytes} bytes \
         (pass a device of at least {image_bytes} bytes)"
    )]
    TooSmall { path: PathBuf, image_bytes: u64, target_bytes: u64 },
    #[error("not flashing {path}: not confirmed (pass --yes to skip the question)")]
    NotConfirmed { path: PathBuf },
    #[error("reading the block map of {image}")]
    Bmap {
        image: PathBuf,
        #[source]
        source: BmapError,
    },
    #[error(
        "{bmap} maps an image of {bmap_bytes} bytes but {image} has {image_bytes} \
         (regenerate the block map, or remove it to have kiln map the image)"
    )]
    BmapMismatch { bmap: PathBuf, bmap_bytes: u64, image: PathBuf, image_bytes: u64 },
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("interrupted")]
    Interrupted,
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{image}: blocks {first_block}-{last_block} do not match the block map's sha256 (the image or its bmap is corrupt)"
    )]
    ImageMismatch { image: PathBuf, first_block: u64, last_block: u64 },
    #[error(
        "{path}: blocks {first_block}-{last_block} read back different from what was written (a failing or fake-capacity device?)"
    )]
    VerifyFailed { path: PathBuf, first_block: u64, last_block: u64 },
    #[error(
        "flashing {path} failed after writing began; its first MiB was wiped so the half-written disk will not boot"
    )]
    Wiped {
        path: PathBuf,
        #[source]
        cause: Box<FlashError>,
    },
    #[error(
        "flashing {path} failed after writing began and wiping its first MiB failed too ({wipe_error}); do not boot it, flash it again"
    )]
    NotWiped {
        path: PathBuf,
        wipe_error: String,
        #[source]
        cause: Box<FlashError>,
    },
    #[error("re-reading the partition table of {path} (the image was written and verified; replug the device)")]
    Reread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// IMAGE.bmap: where `kiln build` and `bmaptool create -o` put the block map.
pub fn default_bmap_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_os_string();
    name.push(".bmap");
    PathBuf::from(name)
}

/// Looks at a target without opening it: kind, size, model. A missing path is a regular
/// file to be created; a directory, character device, FIFO or socket is refused.
pub fn inspect_target(path: &Path) -> Result<TargetInfo, FlashError> {
    let mut info = TargetInfo {
        path: path.to_path_buf(),
        is_block_device: false,
        size_bytes: 0,
        model: None,
        kernel_name: None,
        removable: false,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(info),
        Err(source) => return Err(FlashError::Inspect { path: path.to_path_buf(), source }),
    };
    let ft = meta.file_type();
    if ft.is_file() {
        info.size_bytes = meta.len();
        return Ok(info);
    }
    if !ft.is_block_device() {
        let kind = match () {
            () if ft.is_dir() => "a directory",
            () if ft.is_char_device() => "a character device",
            () if ft.is_fifo() => "a FIFO",
            () if ft.is_socket() => "a socket",
            () => "neither a block device nor a regular file",
        };
        return Err(FlashError::NotFlashable { path: path.to_path_buf(), kind });
    }
    let inspect_err = |source| FlashError::Inspect { path: path.to_path_buf(), source };
    let (major, minor) = (nix::sys::stat::major(meta.rdev()), nix::sys::stat::minor(meta.rdev()));
    let name = kernel_name(major, minor).map_err(inspect_err)?;
    let sys = Path::new(SYS_CLASS_BLOCK).join(&name);
    let sectors: u64 = read_trimmed(&sys.join("size")).map_err(inspect_err)?.parse().unwrap_or(0);
    info.is_block_device = true;
    info.size_bytes = sectors * SYSFS_SECTOR_BYTES;
    info.model =
        ["device/model", "device/name"].iter().find_map(|f| read_trimmed(&sys.join(f)).ok()).filter(|m| !m.is_empty());
    info.removable = read_trimmed(&sys.join("removable")).is_ok_and(|r| r == "1");
    info.kernel_name = Some(name);
    Ok(info)
}

/// Refuses a block device that is a partition, read-only, mounted (it or a partition),
/// used as swap, held by another device (LVM, RAID, dm-crypt), or under `/`; lists every
/// reason at once. Regular files always pass.
pub fn check_target(info: &TargetInfo) -> Result<(), FlashError> {
    let Some(name) = info.kernel_name.as_deref().filter(|_| info.is_block_device) else { return Ok(()) };
    let reasons = busy_reasons(name)?;
    if reasons.is_empty() { Ok(()) } else { Err(FlashError::Busy { path: info.path.clone(), reasons }) }
}

/// Refuses a block device smaller than the image; a regular file grows to fit.
pub fn check_fits(image_bytes: u64, info: &TargetInfo) -> Result<(), FlashError> {
    if info.is_block_device && info.size_bytes < image_bytes {
        return Err(FlashError::TooSmall { path: info.path.clone(), image_bytes, target_bytes: info.size_bytes });
    }
    Ok(())
}

/// Flashes `opts.image` to `opts.target`. `confirm` sees the target and says yes or no
/// (not called with `assume_yes`); `progress` gets (done, total) bytes, where total counts
/// each mapped byte twice: once written, once read back.
pub fn flash(
    opts: &FlashOptions,
    confirm: &mut dyn FnMut(&TargetInfo) -> bool,
    progress: &dyn Fn(u64, u64),
) -> Result<FlashReport, FlashError> {
    let image = File::open(&opts.image).map_err(|source| FlashError::Open { path: opts.image.clone(), source })?;
    let image_meta = image.metadata().map_err(|source| FlashError::Read { path: opts.image.clone(), source })?;
    let bmap = load_bmap(opts, image_meta.len())?;

    let info = inspect_target(&opts.target)?;
    if let Ok(m) = std::fs::metadata(&opts.target)
        && (m.dev(), m.ino()) == (image_meta.dev(), image_meta.ino())
    {
        return Err(FlashError::SameAsImage { path: opts.target.clone() });
    }
    check_target(&info)?;
    check_fits(bmap.image_size, &info)?;
    if !opts.assume_yes && !confirm(&info) {
        return Err(FlashError::NotConfirmed { path: opts.target.clone() });
    }

    let target = open_target(&info, bmap.image_size)?;
    let started = Instant::now();
    let job = Job {
        image: &image,
        image_path: &opts.image,
        target: &target,
        info: &info,
        bmap: &bmap,
        done: std::cell::Cell::new(0),
        read_back: AtomicU64::new(0),
        progress,
        cancel: opts.cancel.as_deref(),
    };
    let verified_ranges = match job.write_and_verify() {
        Ok(n) => n,
        Err(cause) => {
            let cause = Box::new(cause);
            let head = HEAD_BYTES.min(if info.is_block_device { info.size_bytes } else { bmap.image_size });
            return Err(match wipe_head(&target, head) {
                Ok(()) => FlashError::Wiped { path: info.path.clone(), cause },
                Err(e) => FlashError::NotWiped { path: info.path.clone(), wipe_error: e.to_string(), cause },
            });
        }
    };
    if info.is_block_device {
        reread_partition_table(&target).map_err(|source| FlashError::Reread { path: info.path.clone(), source })?;
    }
    Ok(FlashReport { bytes_written: bmap.mapped_bytes(), seconds: started.elapsed().as_secs_f64(), verified_ranges })
}

/// Zeroes the first `len` bytes (MBR, GPT header and entries) and flushes them, so firmware
/// finds no partition table on a disk whose contents cannot be trusted.
fn wipe_head(target: &File, len: u64) -> io::Result<()> {
    target.write_all_at(&vec![0u8; len as usize], 0)?;
    target.sync_all()
}

fn load_bmap(opts: &FlashOptions, image_bytes: u64) -> Result<Bmap, FlashError> {
    let bmap_err = |source| FlashError::Bmap { image: opts.image.clone(), source };
    let path = opts.bmap.clone().or_else(|| Some(default_bmap_path(&opts.image)).filter(|p| p.exists()));
    let Some(path) = path else { return bmap::generate(&opts.image).map_err(bmap_err) };
    let bmap = bmap::read(&path).map_err(bmap_err)?;
    if bmap.image_size != image_bytes {
        let image = opts.image.clone();
        return Err(FlashError::BmapMismatch { bmap: path, bmap_bytes: bmap.image_size, image, image_bytes });
    }
    Ok(bmap)
}

/// Opens a block device exclusively (the kernel then refuses if anything mounted or claimed
/// it since the checks); empties a regular file and sizes it to the image, so its holes stay
/// holes and no old bytes survive in them.
fn open_target(info: &TargetInfo, image_bytes: u64) -> Result<File, FlashError> {
    let path = &info.path;
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if info.is_block_device {
        options.custom_flags(OFlag::O_EXCL.bits());
    } else {
        options.create(true).truncate(false);
    }
    let file = options.open(path).map_err(|source| match source.raw_os_error() {
        Some(code) if code == Errno::EBUSY as i32 => FlashError::Busy {
            path: path.clone(),
            reasons: vec!["the kernel reports it in use (exclusive open failed with EBUSY)".into()],
        },
        _ => FlashError::Open { path: path.clone(), source },
    })?;
    if !info.is_block_device {
        let write_err = |source| FlashError::Write { path: path.clone(), source };
        file.set_len(0).map_err(write_err)?;
        file.set_len(image_bytes).map_err(write_err)?;
    }
    Ok(file)
}

/// One flash in progress: the write, verify, write-the-head sequence.
struct Job<'a> {
    image: &'a File,
    image_path: &'a Path,
    target: &'a File,
    info: &'a TargetInfo,
    bmap: &'a Bmap,
    /// Bytes written or compared by this thread.
    done: std::cell::Cell<u64>,
    /// Bytes read back and hashed by the verifying thread.
    read_back: AtomicU64,
    progress: &'a dyn Fn(u64, u64),
    cancel: Option<&'a AtomicBool>,
}

/// A written stretch of one range, handed to the verifying thread.
struct Written {
    part: usize,
    start: u64,
    end: u64,
    /// The range's last stretch: its hash is complete.
    last: bool,
}

impl Job<'_> {
    /// Writes every range past the first MiB while a second thread reads each written stretch
    /// back and hashes it against the map (its first-MiB part from the image, which still
    /// holds it); then fsyncs, writes the first MiB and compares it.
    fn write_and_verify(&self) -> Result<usize, FlashError> {
        let parts: Vec<Part<'_>> = self.bmap.ranges.iter().map(|r| (r, self.bmap.byte_range(r))).collect();
        if let Some(&(range, (start, end))) = self.write_verifying(&parts)? {
            return Err(self.blame(range, start, end));
        }
        for &(_, (start, end)) in &parts {
            self.copy(start, end.min(HEAD_BYTES))?;
        }
        self.sync()?;
        for &(range, (start, end)) in &parts {
            let end = end.min(HEAD_BYTES);
            if start < end && !self.same_bytes(start, end)? {
                let (first_block, last_block) = (range.first_block, range.last_block);
                return Err(FlashError::VerifyFailed { path: self.info.path.clone(), first_block, last_block });
            }
        }
        Ok(parts.len())
    }

    fn report(&self) {
        (self.progress)(self.done.get() + self.read_back.load(Ordering::Relaxed), 2 * self.bmap.mapped_bytes());
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::SeqCst))
    }

    fn tick(&self, bytes: u64) -> Result<(), FlashError> {
        self.done.set(self.done.get() + bytes);
        self.report();
        if self.cancelled() { Err(FlashError::Interrupted) } else { Ok(()) }
    }

    /// Copies image bytes `[start, end)` to the same offset of the target.
    fn copy(&self, start: u64, end: u64) -> Result<(), FlashError> {
        let mut buf = vec![0u8; IO_BUFFER_BYTES.min(end.saturating_sub(start) as usize)];
        self.copy_with(start, end, &mut buf, &mut None)
    }

    /// [`Job::copy`] through `buf` (at most IO_BUFFER_BYTES are used), writing through
    /// `direct` (the target opened with O_DIRECT) when the range and `buf` are aligned for
    /// it. A target that refuses an O_DIRECT write (EINVAL) is written through the page
    /// cache from then on: `direct` becomes None.
    fn copy_with(&self, start: u64, end: u64, buf: &mut [u8], direct: &mut Option<&File>) -> Result<(), FlashError> {
        let write_err = |source| FlashError::Write { path: self.info.path.clone(), source };
        let mut off = start;
        while off < end {
            let n = IO_BUFFER_BYTES.min(buf.len()).min((end - off) as usize);
            let read_err = |source| FlashError::Read { path: self.image_path.to_path_buf(), source };
            self.image.read_exact_at(&mut buf[..n], off).map_err(read_err)?;
            let mut written = false;
            if let Some(d) = direct
                .filter(|_| bmap::direct_aligned(off, off + n as u64) && bmap::direct_aligned(buf.as_ptr() as u64, 0))
            {
                match d.write_all_at(&buf[..n], off) {
                    Ok(()) => written = true,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) && off == start => *direct = None,
                    Err(e) => return Err(write_err(e)),
                }
            }
            if !written {
                self.target.write_all_at(&buf[..n], off).map_err(write_err)?;
            }
            off += n as u64;
            self.tick(n as u64)?;
        }
        Ok(())
    }

    /// fsync, then drop the target's cached pages so a read-back comes from the device
    /// (posix_fadvise(2), advisory).
    fn sync(&self) -> Result<(), FlashError> {
        self.target.sync_all().map_err(|source| FlashError::Write { path: self.info.path.clone(), source })?;
        let _ = posix_fadvise(self.target, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
        Ok(())
    }

    /// Writes the ranges past the first MiB in stretches of WRITTEN_STRETCH_BYTES on this
    /// thread while another reads each written stretch back from the device and hashes it, so
    /// the read-back overlaps the writes instead of following a whole-image fsync. Writes and
    /// reads use O_DIRECT where the target and the range allow it; otherwise a stretch's
    /// writeback starts as soon as it is written (sync_file_range) and the verifier waits for
    /// it and drops the stretch's cached pages before reading. The fsync still comes before the
    /// first MiB is written. Returns the first range whose bytes do not match, if any.
    fn write_verifying<'p, 'r>(&self, parts: &'p [Part<'r>]) -> Result<Option<&'p Part<'r>>, FlashError> {
        let (image, image_path, target, target_path) = (self.image, self.image_path, self.target, &self.info.path);
        let stop_flag = AtomicBool::new(false);
        let (read_back, stop) = (&self.read_back, &stop_flag);
        let (tx, rx) = std::sync::mpsc::channel::<Written>();
        // A second descriptor writes and reads back with O_DIRECT where the target allows it:
        // the device then takes the bytes from the copy buffer and reads them into the hashing
        // buffers, without the page cache's copies, writeback and eviction (on this machine a
        // quarter of the CPU time, and the writes' time halved).
        let direct_file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(target_path).ok();
        let mut direct = direct_file.as_ref();
        let mut verify = move |rx: std::sync::mpsc::Receiver<Written>| -> Result<Option<usize>, FlashError> {
            let mut hashing: Option<(usize, Sha256)> = None;
            for w in rx {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                let mut h = match hashing.take() {
                    Some((part, h)) if part == w.part => h,
                    _ => {
                        let mut h = Sha256::new();
                        let (start, end) = parts[w.part].1;
                        bmap::hash_file_range(&mut h, image, start, end.min(HEAD_BYTES))
                            .map_err(|source| FlashError::Read { path: image_path.to_path_buf(), source })?;
                        h
                    }
                };
                if w.start < w.end {
                    let read_err = |source| FlashError::Read { path: target_path.clone(), source };
                    let write_err = |source| FlashError::Write { path: target_path.clone(), source };
                    let mut direct_h = None;
                    if let Some(d) = direct.filter(|_| bmap::direct_aligned(w.start, w.end)) {
                        sync_range(target, w.start, w.end, SETTLE).map_err(write_err)?;
                        let mut attempt = h.clone();
                        match bmap::hash_direct_range(&mut attempt, d, w.start, w.end) {
                            Ok(()) => direct_h = Some(attempt),
                            // The filesystem refuses O_DIRECT reads: read back through the page cache.
                            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => direct = None,
                            Err(e) => return Err(read_err(e)),
                        }
                    }
                    h = match direct_h {
                        Some(h) => h,
                        None => {
                            settle(target, w.start, w.end).map_err(write_err)?;
                            bmap::hash_file_range(&mut h, target, w.start, w.end).map_err(read_err)?;
                            h
                        }
                    };
                    read_back.fetch_add(w.end - w.start, Ordering::Relaxed);
                }
                if !w.last {
                    hashing = Some((w.part, h));
                } else if hex::encode(h.finalize()) != parts[w.part].0.sha256 {
                    stop.store(true, Ordering::Relaxed);
                    return Ok(Some(w.part));
                }
            }
            Ok(None)
        };
        let write = |tx: std::sync::mpsc::Sender<Written>| -> Result<(), FlashError> {
            let mut direct = direct_file.as_ref();
            // Room for IO_BUFFER_BYTES from an O_DIRECT-aligned start.
            let align = bmap::DIRECT_ALIGN as usize;
            let mut room = vec![0u8; IO_BUFFER_BYTES + align - 1];
            let at = room.as_ptr().align_offset(align).min(align - 1);
            let buf = &mut room[at..at + IO_BUFFER_BYTES];
            for (part, &(_, (start, end))) in parts.iter().enumerate() {
                let mut off = start.max(HEAD_BYTES).min(end);
                loop {
                    let stretch_end = end.min(off + WRITTEN_STRETCH_BYTES);
                    self.copy_with(off, stretch_end, buf, &mut direct)?;
                    if off < stretch_end && direct.is_none() {
                        // Start the writeback now; the verifier waits for it.
                        sync_range(target, off, stretch_end, libc::SYNC_FILE_RANGE_WRITE)
                            .map_err(|source| FlashError::Write { path: target_path.clone(), source })?;
                    }
                    let last = stretch_end == end;
                    if stop.load(Ordering::Relaxed)
                        || tx.send(Written { part, start: off, end: stretch_end, last }).is_err()
                    {
                        return Ok(()); // the verifier stopped: its verdict decides
                    }
                    if last {
                        break;
                    }
                    off = stretch_end;
                }
            }
            drop(tx);
            self.target.sync_all().map_err(|source| FlashError::Write { path: target_path.clone(), source })
        };
        let (written, verdict) = std::thread::scope(|scope| {
            let verifier = scope.spawn(move || verify(rx));
            let written = write(tx);
            if written.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            // This thread reports progress and watches for a cancel until the verifier is done.
            while !verifier.is_finished() {
                self.report();
                if self.cancelled() {
                    stop.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let verdict = verifier.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (written, verdict)
        });
        self.report();
        match verdict? {
            Some(part) => return Ok(Some(&parts[part])),
            None => written?,
        }
        if stop.load(Ordering::Relaxed) || self.cancelled() {
            return Err(FlashError::Interrupted); // stopped with no range failing: the user cancelled
        }
        Ok(None)
    }

    /// A range read back wrong: the image is at fault if it does not match the map either.
    fn blame(&self, range: &BmapRange, start: u64, end: u64) -> FlashError {
        let (first_block, last_block) = (range.first_block, range.last_block);
        let mut hasher = Sha256::new();
        match bmap::hash_file_range(&mut hasher, self.image, start, end) {
            Ok(()) if hex::encode(hasher.finalize()) == range.sha256 => {
                FlashError::VerifyFailed { path: self.info.path.clone(), first_block, last_block }
            }
            _ => FlashError::ImageMismatch { image: self.image_path.to_path_buf(), first_block, last_block },
        }
    }

    fn same_bytes(&self, start: u64, end: u64) -> Result<bool, FlashError> {
        let len = (end - start) as usize;
        let (mut want, mut got) = (vec![0u8; len], vec![0u8; len]);
        let read = |f: &File, p: &Path, buf: &mut [u8]| {
            f.read_exact_at(buf, start).map_err(|source| FlashError::Read { path: p.to_path_buf(), source })
        };
        read(self.image, self.image_path, &mut want)?;
        read(self.target, &self.info.path, &mut got)?;
        self.tick(len as u64)?;
        Ok(want == got)
    }
}

/// Why a whole disk is unsafe to overwrite; empty when it is safe.
fn busy_reasons(name: &str) -> Result<Vec<String>, FlashError> {
    let sys = Path::new(SYS_CLASS_BLOCK).join(name);
    let read =
        |p: &Path| std::fs::read_to_string(p).map_err(|source| FlashError::Read { path: p.to_path_buf(), source });
    let mut reasons = Vec::new();
    if sys.join("partition").exists() {
        reasons.push(format!(
            "it is a partition of {}, not a whole disk",
            parent_disk(name).unwrap_or_else(|| "a disk".into())
        ));
    }
    if read_trimmed(&sys.join("ro")).is_ok_and(|r| r == "1") {
        reasons.push("it is read-only".into());
    }
    let mut nodes = vec![(name.to_string(), read_trimmed(&sys.join("dev")).unwrap_or_default())];
    let entries = std::fs::read_dir(&sys).map_err(|source| FlashError::Read { path: sys.clone(), source })?;
    for entry in entries.flatten() {
        if entry.path().join("partition").exists() {
            nodes.push((
                entry.file_name().to_string_lossy().into_owned(),
                read_trimmed(&entry.path().join("dev")).unwrap_or_default(),
            ));
        }
    }
    let mounts = parse_mountinfo(&read(Path::new(PROC_MOUNTINFO))?);
    // A kernel without CONFIG_SWAP has no /proc/swaps, and no swap in use.
    let swaps = read(Path::new(PROC_SWAPS)).or_else(|e| match e {
        FlashError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        e => Err(e),
    })?;
    for (node, dev) in &nodes {
        let at: Vec<&str> = mounts
            .iter()
            .filter(|m| &m.dev == dev || m.source_dev.as_ref() == Some(dev))
            .map(|m| m.mount_point.as_str())
            .collect();
        if !at.is_empty() {
            let more = if at.len() > 3 { format!(" and {} more", at.len() - 3) } else { String::new() };
            reasons.push(format!("{node} is mounted at {}{more}", at[..at.len().min(3)].join(", ")));
        }
        if swaps
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .any(|f| block_dev_of(&unescape(f)).as_ref() == Some(dev))
        {
            reasons.push(format!("{node} is used as swap"));
        }
        let dir = if node == name { sys.clone() } else { sys.join(node) };
        for holder in std::fs::read_dir(dir.join("holders")).into_iter().flatten().flatten() {
            reasons.push(format!(
                "{node} is held by {} (device mapper, LVM, RAID or crypt)",
                holder.file_name().to_string_lossy()
            ));
        }
    }
    if root_disks(&mounts).iter().any(|d| d == name) {
        reasons.push("it holds /".into());
    }
    Ok(reasons)
}

struct Mount {
    dev: String,
    source_dev: Option<String>,
    mount_point: String,
}

/// proc(5) mountinfo: `id parent major:minor root mount-point options [tags] - type source super`.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let sep = f.iter().skip(6).position(|x| *x == "-")? + 6;
            let source = unescape(f.get(sep + 2)?);
            let source_dev = if source.starts_with('/') { block_dev_of(&source) } else { None };
            Some(Mount { dev: f.get(2)?.to_string(), source_dev, mount_point: unescape(f.get(4)?) })
        })
        .collect()
}

/// The whole disks under `/`: its device, through device-mapper/RAID slaves, up from partitions.
fn root_disks(mounts: &[Mount]) -> Vec<String> {
    let Some(root) = mounts.iter().rev().find(|m| m.mount_point == "/") else { return Vec::new() };
    let mut todo: Vec<String> = [Some(&root.dev), root.source_dev.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|d| std::fs::read_link(Path::new(SYS_DEV_BLOCK).join(d)).ok())
        .filter_map(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let mut disks = Vec::new();
    while let Some(name) = todo.pop() {
        if disks.contains(&name) || todo.len() > 256 {
            continue;
        }
        let sys = Path::new(SYS_CLASS_BLOCK).join(&name);
        todo.extend(
            std::fs::read_dir(sys.join("slaves"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned()),
        );
        todo.extend(parent_disk(&name));
        disks.push(name);
    }
    disks
}

/// The disk a partition belongs to: its parent directory in sysfs.
fn parent_disk(partition: &str) -> Option<String> {
    let sys = Path::new(SYS_CLASS_BLOCK).join(partition);
    if !sys.join("partition").exists() {
        return None;
    }
    let real = std::fs::canonicalize(&sys).ok()?;
    Some(real.parent()?.file_name()?.to_string_lossy().into_owned())
}

/// "major:minor" of a block device node, if `path` is one.
fn block_dev_of(path: &str) -> Option<String> {
    let meta = std::fs::metadata(path).ok().filter(|m| m.file_type().is_block_device())?;
    Some(format!("{}:{}", nix::sys::stat::major(meta.rdev()), nix::sys::stat::minor(meta.rdev())))
}

fn kernel_name(major: u64, minor: u64) -> io::Result<String> {
    let link = std::fs::read_link(Path::new(SYS_DEV_BLOCK).join(format!("{major}:{minor}")))?;
    link.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
}

fn read_trimmed(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

/// Undoes the octal escapes (`\040` for a space) of /proc/self/mountinfo and /proc/swaps.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// BLKRRPART so the kernel sees the new partitions; retried while udev still holds the
/// device open after the last write. EINVAL/ENOTTY (a device without partitions) is fine.
fn reread_partition_table(file: &File) -> io::Result<()> {
    for _ in 0..20 {
        match blkrrpart(file) {
            Ok(()) | Err(Errno::EINVAL | Errno::ENOTTY) => return Ok(()),
            Err(Errno::EBUSY) => std::thread::sleep(std::time::Duration::from_millis(100)),
            Err(e) => return Err(e.into()),
        }
    }
    Err(Errno::EBUSY.into())
}

/// Waits until `[start, end)` of `file` is on the device, then drops its cached pages, so
/// the next read of it comes from the device.
fn settle(file: &File, start: u64, end: u64) -> io::Result<()> {
    sync_range(file, start, end, SETTLE)?;
    let len = i64::try_from(end - start).unwrap_or(0);
    let _ = posix_fadvise(file, i64::try_from(start).unwrap_or(0), len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    Ok(())
}

/// sync_file_range(2) flags that write a range out and wait until it is on the device.
const SETTLE: libc::c_uint =
    libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;

/// sync_file_range(2) (nix has no wrapper). It writes data pages only, no metadata and no
/// device cache flush: the final fsync does those.
#[allow(unsafe_code)]
fn sync_range(file: &File, start: u64, end: u64, flags: libc::c_uint) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(start), i64::try_from(end - start)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: a plain syscall on a descriptor that is valid while `file` is borrowed; no pointers.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[allow(unsafe_code)]
fn blkrrpart(file: &File) -> nix::Result<()> {
    // <linux/fs.h>: #define BLKRRPART _IO(0x12, 95)
    nix::ioctl_none!(ioctl_blkrrpart, 0x12, 95);
    // SAFETY: BLKRRPART takes no argument; the descriptor is valid while `file` is borrowed.
    unsafe { ioctl_blkrrpart(file.as_raw_fd()) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_with_optional_fields_and_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/my\\040disk rw,noatime master:1 shared:2 - ext3 /dev/root rw\n\
                    27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    garbage line\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!((mounts[0].dev.as_str(), mounts[0].mount_point.as_str()), ("98:0", "/mnt/my disk"));
        assert_eq!((mounts[1].dev.as_str(), mounts[1].mount_point.as_str()), ("254:0", "/"));
    }

    #[test]
    fn wipe_head_zeroes_the_first_mib_of_an_old_disk_and_nothing_else() {
        let disk = tempfile::tempfile().unwrap();
        disk.write_all_at(&vec![0xAA; 3 << 20], 0).unwrap();
        wipe_head(&disk, HEAD_BYTES).unwrap();
        let mut all = vec![0u8; 3 << 20];
        disk.read_exact_at(&mut all, 0).unwrap();
        let (head, rest) = all.split_at(HEAD_BYTES as usize);
        assert!(head.iter().all(|&b| b == 0) && rest.iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn unescape_decodes_octal_and_keeps_the_rest() {
        assert_eq!(unescape(r"/swap\040file\011x\9"), "/swap file\tx\\9");
    }
}
