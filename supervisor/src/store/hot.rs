//! `HotTier`: verified copies of models in a tmpfs directory under a byte budget. A copy
//! is read once from the store, hashed in that pass, written under a temporary name and
//! renamed only when the hash matches; temporaries left by a crash are removed on open.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::copy::{
    BLAKE3_BUFFERS, BLAKE3_CHUNK_BYTES, BUFFERS, CHUNK_BYTES, ChunkHash, Digests, KERNEL_COPY_CHUNK_BYTES,
    KernelCopyError, PipelinedHasher, Pump, PumpError, advise_sequential, blake3_file, hash_file,
};
use super::error::{IoContext, StoreError, is_no_space};
use super::persistent::MODEL_SUFFIX;
use super::{check_sha256, sync_dir};

/// Marks a copy in progress: `.<sha256>.gguf.tmp-<pid>-<n>`. Never counted as hot.
const TMP_MARKER: &str = ".gguf.tmp-";

/// Numbers temporaries so two copies in one process never share a name.
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// The hot tier: a directory (a tmpfs on a device) holding `<sha256>.gguf` copies.
#[derive(Debug)]
pub struct HotTier {
    dir: PathBuf,
    budget_bytes: u64,
    /// Bytes promised to copies in flight, so two copies cannot both squeeze in.
    reserved_bytes: Mutex<u64>,
}

/// How a promotion copies.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Throttle to this rate by sleeping between chunks (`None` or 0: as fast as possible).
    pub rate_limit_bytes_per_sec: Option<u64>,
    /// Set by kilnd when inference traffic arrives: the copy stops within a chunk,
    /// removes its temporary file and returns [`StoreError::Cancelled`].
    pub cancel: Option<Arc<AtomicBool>>,
}

/// What a finished promotion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub bytes: u64,
    pub duration: Duration,
    pub bytes_per_sec: u64,
    /// The BLAKE3 of the copied bytes when the copy was checked against the SHA-256 (for the
    /// store to record as its check digest); `None` when it was checked against that digest.
    pub blake3: Option<String>,
}

/// Removes a temporary copy unless it was renamed into place (also on early return).
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "removing temporary copy failed");
        }
    }
}

/// Gives back reserved budget when a copy ends, however it ends.
struct Reservation<'a> {
    tier: &'a HotTier,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        *self.tier.reserved() -= self.bytes;
    }
}

impl HotTier {
    /// Opens the hot tier at `dir` (creating it) and removes temporaries left by a crash.
    pub fn open(dir: &Path, budget_bytes: u64) -> Result<HotTier, StoreError> {
        std::fs::create_dir_all(dir).at("creating", dir)?;
        let mut removed = 0;
        for entry in std::fs::read_dir(dir).at("reading", dir)? {
            let entry = entry.at("reading", dir)?;
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.starts_with('.') && n.contains(TMP_MARKER)) {
                let path = entry.path();
                std::fs::remove_file(&path).at("removing leftover", &path)?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(dir = %dir.display(), tier = "hot", removed, "removed leftover temporary copies");
            sync_dir(dir)?;
        }
        Ok(HotTier { dir: dir.to_path_buf(), budget_bytes, reserved_bytes: Mutex::new(0) })
    }

    /// The directory of the hot tier.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The byte budget given at open.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Where the hot copy of `sha256` lives (whether or not it exists).
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{}{MODEL_SUFFIX}", sha256.to_ascii_lowercase()))
    }

    /// True when a verified copy of `sha256` is in the hot tier.
    pub fn contains(&self, sha256: &str) -> bool {
        check_sha256("", sha256).is_ok() && self.path_of(sha256).is_file()
    }

    /// Bytes held by finished hot copies (copies in flight are not counted).
    pub fn used_bytes(&self) -> u64 {
        self.list().iter().map(|(_, bytes)| bytes).sum()
    }

    /// Hot copies as `(sha256, bytes)`, sorted by hash. An unreadable directory is
    /// logged and lists as empty.
    pub fn list(&self) -> Vec<(String, u64)> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "listing hot tier failed");
                return Vec::new();
            }
        };
        let mut hot: Vec<(String, u64)> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name();
                let sha = name.to_str()?.strip_suffix(MODEL_SUFFIX)?;
                let sha = check_sha256("", sha).ok()?;
                let meta = entry.metadata().ok().filter(|m| m.is_file())?;
                Some((sha, meta.len()))
            })
            .collect();
        hot.sort();
        hot
    }

    fn reserved(&self) -> std::sync::MutexGuard<'_, u64> {
        self.reserved_bytes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves `needed` bytes of budget, or refuses. A copy of the same hash already
    /// hot does not count: the new one replaces it.
    fn reserve(&self, sha: &str, needed: u64) -> Result<Reservation<'_>, StoreError> {
        let mut reserved = self.reserved();
        let used = self.list().iter().filter(|(hot, _)| hot != sha).map(|(_, bytes)| bytes).sum::<u64>() + *reserved;
        if used.saturating_add(needed) > self.budget_bytes {
            return Err(StoreError::OverBudget { needed, used, budget: self.budget_bytes });
        }
        *reserved += needed;
        Ok(Reservation { tier: self, bytes: needed })
    }

    /// Copies `src` (the store's file) into the hot tier, hashing the bytes that landed
    /// there on the way (see `Pump::run_in_kernel`); the copy gets its final name only if it
    /// hashes to `sha256`. The report
    /// carries the BLAKE3 of the same bytes, for the store to record as its check digest.
    pub fn promote(
        &self,
        src: &Path,
        sha256: &str,
        opts: &CopyOptions,
        progress: &dyn Fn(u64, u64),
    ) -> Result<CopyReport, StoreError> {
        let sha = check_sha256("", sha256)?;
        let expected = sha.clone();
        self.copy_in(src, &sha, opts, progress, CHUNK_BYTES, BUFFERS, Digests::default(), |digests| {
            let (actual, blake3) = digests.hex();
            if actual == expected {
                return Ok(Some(blake3));
            }
            tracing::warn!(sha256 = %expected, actual = %actual, path = %src.display(),
                "prewarm copy rejected: the source does not match its hash");
            Err(StoreError::HashMismatch {
                model: expected.clone(),
                path: src.to_path_buf(),
                expected: expected.clone(),
                actual,
            })
        })
    }

    /// As `promote`, checked against the store's check digest `blake3` instead of the
    /// SHA-256 (see `Store::check_digest`): the same guarantee for the bytes written, at
    /// the speed of the copy. A mismatch is [`StoreError::CheckMismatch`].
    pub fn promote_checked(
        &self,
        src: &Path,
        sha256: &str,
        blake3: &str,
        opts: &CopyOptions,
        progress: &dyn Fn(u64, u64),
    ) -> Result<CopyReport, StoreError> {
        let sha = check_sha256("", sha256)?;
        let expected = check_sha256("", blake3)?;
        self.copy_in(src, &sha, opts, progress, BLAKE3_CHUNK_BYTES, BLAKE3_BUFFERS, blake3::Hasher::new(), |hasher| {
            let actual = hasher.finalize().to_hex().to_string();
            if actual == expected {
                return Ok(None);
            }
            tracing::warn!(sha256 = %sha256, blake3 = %expected, actual = %actual, path = %src.display(),
                "prewarm copy rejected: the source does not match the store's check digest");
            Err(StoreError::CheckMismatch { path: src.to_path_buf(), expected: expected.clone(), actual })
        })
    }

    /// The copy both promotions share: reserve, write a temporary, hash with `state` on the
    /// way, let `check` accept the final state (returning the BLAKE3 to report, if it knows
    /// one), then sync and rename.
    #[allow(clippy::too_many_arguments)]
    fn copy_in<H: ChunkHash>(
        &self,
        src: &Path,
        sha: &str,
        opts: &CopyOptions,
        progress: &dyn Fn(u64, u64),
        chunk_bytes: usize,
        buffers: usize,
        state: H,
        check: impl FnOnce(&H) -> Result<Option<String>, StoreError>,
    ) -> Result<CopyReport, StoreError> {
        let started = Instant::now();
        let mut src_file = File::open(src).at("opening", src)?;
        advise_sequential(&src_file);
        let needed = src_file.metadata().at("reading metadata of", src)?.len();
        let _reservation = self.reserve(sha, needed)?;
        self.check_room(needed)?;

        let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
        let tmp_path = self.dir.join(format!(".{sha}{TMP_MARKER}{}-{n}", std::process::id()));
        let mut tmp_file =
            OpenOptions::new().read(true).write(true).create_new(true).open(&tmp_path).at("creating", &tmp_path)?;
        let mut tmp = TempFile { path: tmp_path, armed: true };

        let pump = Pump {
            total_bytes: needed,
            rate_limit_bytes_per_sec: opts.rate_limit_bytes_per_sec,
            cancel: opts.cancel.as_deref(),
            progress,
        };
        // A throttled copy goes in the pump's smaller chunks, so its rate stays smooth.
        let throttled = opts.rate_limit_bytes_per_sec.is_some_and(|r| r > 0);
        let cancelled = |bytes| {
            tracing::info!(sha256 = %sha, tier = "hot", bytes, "prewarm copy cancelled");
            StoreError::Cancelled
        };
        let mut bytes = 0;
        let kernel_chunk = if throttled { pump.chunk_bytes() } else { KERNEL_COPY_CHUNK_BYTES };
        let state = match pump.run_in_kernel(&src_file, &tmp_file, kernel_chunk, state, &mut bytes) {
            Ok(state) => state,
            Err(KernelCopyError::Pump(PumpError::Read(e))) => return Err(StoreError::io("reading", src, e)),
            Err(KernelCopyError::Pump(PumpError::Write(e))) => return Err(self.write_error(needed, &tmp.path, e)),
            Err(KernelCopyError::Pump(PumpError::Cancelled)) => return Err(cancelled(bytes)),
            Err(KernelCopyError::ReadBack(e)) => return Err(StoreError::io("reading back", &tmp.path, e)),
            // Files the kernel cannot copy between (a source without a page cache): through user space.
            Err(KernelCopyError::Unsupported(state)) => {
                let chunk_bytes = if throttled { pump.chunk_bytes() } else { chunk_bytes };
                let mut hasher = PipelinedHasher::with_buffers(chunk_bytes, buffers, state)
                    .at("starting a hasher for", &tmp.path)?;
                match pump.run(&mut src_file, Some(&mut tmp_file), &mut hasher, &mut bytes) {
                    Ok(()) => {}
                    Err(PumpError::Read(e)) => return Err(StoreError::io("reading", src, e)),
                    Err(PumpError::Write(e)) => return Err(self.write_error(needed, &tmp.path, e)),
                    Err(PumpError::Cancelled) => return Err(cancelled(bytes)),
                }
                hasher.into_state().at("hashing", src)?
            }
        };
        let blake3 = check(&state)?;
        if bytes != needed {
            tmp_file.set_len(bytes).at("truncating", &tmp.path)?;
        }
        tmp_file.sync_data().at("syncing", &tmp.path)?;
        std::fs::rename(&tmp.path, self.path_of(sha)).at("renaming", &tmp.path)?;
        tmp.armed = false;

        let duration = started.elapsed();
        let bytes_per_sec = (bytes as f64 / duration.as_secs_f64().max(1e-9)) as u64;
        let checked = if blake3.is_some() { "sha256" } else { "blake3" };
        tracing::info!(sha256 = %sha, tier = "hot", bytes, duration_ms = duration.as_millis() as u64,
            bytes_per_sec, checked, "prewarm copy done");
        Ok(CopyReport { bytes, duration, bytes_per_sec, blake3 })
    }

    /// Refuses a copy the filesystem has no room for before any copying. The room is asked
    /// of statvfs rather than taken with fallocate: on tmpfs fallocate zeroes every page
    /// first, which cost 8-10 ms of a ~50 ms copy of the 98 MB demo model here. A writer
    /// that fills the filesystem meanwhile is still caught by the writes (ENOSPC).
    fn check_room(&self, needed: u64) -> Result<(), StoreError> {
        let Ok(fs) = nix::sys::statvfs::statvfs(&self.dir) else {
            // Unknown room: the writes find out instead.
            return Ok(());
        };
        let available = fs.blocks_available().saturating_mul(fs.fragment_size());
        if needed > available {
            tracing::warn!(dir = %self.dir.display(), tier = "hot", needed, available, "hot tier filesystem is full");
            return Err(StoreError::NoSpace { needed, path: self.dir.clone() });
        }
        Ok(())
    }

    fn write_error(&self, needed: u64, tmp: &Path, e: io::Error) -> StoreError {
        if is_no_space(&e) {
            tracing::warn!(dir = %self.dir.display(), tier = "hot", needed, "hot tier filesystem is full");
            StoreError::NoSpace { needed, path: self.dir.clone() }
        } else {
            StoreError::io("writing", tmp, e)
        }
    }

    /// Removes the hot copy of `sha256` (nothing to do when it is not hot).
    pub fn demote(&self, sha256: &str) -> Result<(), StoreError> {
        let sha = check_sha256("", sha256)?;
        let path = self.path_of(&sha);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(sha256 = %sha, tier = "hot", "demoted");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("removing", &path, e)),
        }
    }

    /// Re-hashes the hot copy of `sha256` with BLAKE3 against the store's check digest
    /// `blake3`: `false` means it is corrupt, or the digest is (re-copy it).
    pub fn verify_checked(&self, sha256: &str, blake3: &str) -> Result<bool, StoreError> {
        let expected = check_sha256("", blake3)?;
        self.verify_with(sha256, &expected, "blake3", blake3_file)
    }

    /// Re-hashes the hot copy of `sha256`: `false` means it is corrupt (re-copy it).
    pub fn verify(&self, sha256: &str) -> Result<bool, StoreError> {
        let sha = check_sha256("", sha256)?;
        self.verify_with(&sha, &sha, "sha256", hash_file)
    }

    /// Hashes the hot copy of `sha256` with `hash` (`checked` names it) and compares with `expected`.
    fn verify_with(
        &self,
        sha256: &str,
        expected: &str,
        checked: &str,
        hash: fn(&Path) -> Result<(String, u64), StoreError>,
    ) -> Result<bool, StoreError> {
        let sha = check_sha256("", sha256)?;
        let (actual, bytes) = hash(&self.path_of(&sha))?;
        let ok = actual == expected;
        if ok {
            tracing::debug!(sha256 = %sha, tier = "hot", bytes, checked, "verified");
        } else {
            tracing::warn!(sha256 = %sha, expected, actual = %actual, tier = "hot", checked, "hot copy is corrupt");
        }
        Ok(ok)
    }
}
