//! `Store`: the persistent, content-addressed model store (`<root>/<sha256>.gguf`).
//! Bytes land in `.<sha256>.gguf.part`, are hashed in the same pass, and get the final
//! name only once verified, so `contains` never sees an unverified file.
//!
//! Next to a verified file the store keeps its check digest, `<sha256>.b3`: the BLAKE3 of
//! the same bytes, computed in the pass that checked the SHA-256 (or, for a file that came
//! without one, in the first full SHA-256 check after). Copies out of the store (prewarm
//! into the hot tier) are checked against it: BLAKE3 hashes ~6 GB/s on one core here
//! against SHA-256's ~1.7 (with the CPU's SHA extensions), so the check no longer bounds
//! the copy. The spec's SHA-256 stays the authority: a copy that does not match the check
//! digest drops it and is redone against the SHA-256.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::io::Write;

use super::copy::{CHUNK_BYTES, Digests, PipelinedHasher, Pump, PumpError, advise_sequential, hash_file};
use super::error::{IoContext, StoreError};
use super::{check_sha256, sync_dir};

/// Suffix of a model file, in the store and in the hot tier.
pub(crate) const MODEL_SUFFIX: &str = ".gguf";
/// Suffix of a partial import or download (after a leading dot).
const PART_SUFFIX: &str = ".gguf.part";
/// Suffix of a model's check digest (its BLAKE3 in hex, one line).
const CHECK_SUFFIX: &str = ".b3";

/// The persistent store rooted at a directory (`/var/lib/kiln/models` on a device).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// An exclusively locked part file; the lock goes with the file when it is dropped.
pub(crate) struct PartFile {
    pub(crate) file: Flock<File>,
    pub(crate) path: PathBuf,
}

impl Store {
    /// Opens the store at `root`, creating the directory if needed.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(root).at("creating", root)?;
        Ok(Store { root: root.to_path_buf() })
    }

    /// The directory this store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the verified file for `sha256` lives (whether or not it exists).
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join(format!("{}{MODEL_SUFFIX}", sha256.to_ascii_lowercase()))
    }

    /// Where an import or download of `sha256` is in progress.
    pub fn part_path_of(&self, sha256: &str) -> PathBuf {
        self.root.join(format!(".{}{PART_SUFFIX}", sha256.to_ascii_lowercase()))
    }

    /// Where the check digest of `sha256` lives (whether or not it exists).
    pub fn check_path_of(&self, sha256: &str) -> PathBuf {
        self.root.join(format!("{}{CHECK_SUFFIX}", sha256.to_ascii_lowercase()))
    }

    /// The BLAKE3 recorded for the verified file of `sha256`, if one was recorded and reads
    /// back as 64 hex digits (anything else counts as none: the SHA-256 decides instead).
    pub fn check_digest(&self, sha256: &str) -> Option<String> {
        let path = self.check_path_of(sha256);
        let text = std::fs::read_to_string(&path).ok()?;
        match check_sha256("", text.trim()) {
            Ok(digest) => Some(digest),
            Err(_) => {
                tracing::warn!(path = %path.display(), "unreadable check digest: ignoring it");
                None
            }
        }
    }

    /// Records `blake3` as the check digest of `sha256`'s verified file: written under a
    /// temporary name, synced and renamed, so a crash leaves the old digest, none, or this one.
    pub fn record_check(&self, sha256: &str, blake3: &str) -> Result<(), StoreError> {
        let sha = check_sha256("", sha256)?;
        let digest = check_sha256("", blake3)?;
        let dest = self.check_path_of(&sha);
        let tmp = self.root.join(format!(".{sha}{CHECK_SUFFIX}.tmp-{}", std::process::id()));
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .and_then(|mut f| f.write_all(format!("{digest}\n").as_bytes()).and_then(|()| f.sync_all()))
            .at("writing", &tmp)
            .and_then(|()| std::fs::rename(&tmp, &dest).at("renaming", &tmp));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(&self.root)
    }

    /// Like `record_check`, for callers to whom the digest is an optimization: a failure is
    /// logged, and the next copy checks the SHA-256 instead.
    pub fn record_check_or_warn(&self, sha256: &str, blake3: &str) {
        if let Err(e) = self.record_check(sha256, blake3) {
            tracing::warn!(sha256, error = format!("{:#}", anyhow::Error::new(e)), "recording the check digest failed");
        }
    }

    /// Drops the check digest of `sha256` (after a copy did not match it).
    pub fn forget_check(&self, sha256: &str) -> Result<(), StoreError> {
        let path = self.check_path_of(sha256);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.root),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("removing", &path, e)),
        }
    }

    /// True when the verified file exists: only verified files ever get the final name.
    pub fn contains(&self, sha256: &str) -> bool {
        check_sha256("", sha256).is_ok() && self.path_of(sha256).is_file()
    }

    /// Checks the hash's form; the stored file if the model is already there, else the
    /// normalized hash and the final path to fill.
    pub(super) fn already(&self, id: &str, sha256: &str) -> Result<Already, StoreError> {
        let sha = check_sha256(id, sha256)?;
        let dest = self.path_of(&sha);
        if dest.is_file() {
            tracing::debug!(model = %id, sha256 = %sha, "model already in store");
            return Ok(Already::Stored(dest));
        }
        Ok(Already::Missing(sha, dest))
    }

    /// Copies `src` into the store, hashing in the same pass; the result gets the final
    /// name only if it hashes to `sha256`. `progress` is called with `(done, total)` bytes.
    pub fn import(
        &self,
        id: &str,
        src: &Path,
        sha256: &str,
        progress: &dyn Fn(u64, u64),
    ) -> Result<PathBuf, StoreError> {
        let (sha, dest) = match self.already(id, sha256)? {
            Already::Stored(dest) => return Ok(dest),
            Already::Missing(sha, dest) => (sha, dest),
        };
        let started = Instant::now();
        let mut src_file = File::open(src).at("opening", src)?;
        advise_sequential(&src_file);
        let total_bytes = src_file.metadata().at("reading metadata of", src)?.len();
        let mut part = self.lock_part(&sha)?;
        part.file.set_len(0).at("truncating", &part.path)?;

        let pump = Pump { total_bytes, rate_limit_bytes_per_sec: None, cancel: None, progress };
        let mut hasher =
            PipelinedHasher::new(CHUNK_BYTES, Digests::default()).at("starting a hasher for", &part.path)?;
        let mut done = 0;
        let pumped = pump.run(&mut src_file, Some(&mut *part.file), &mut hasher, &mut done);
        let digests = match pumped {
            Ok(()) => hasher.into_state().at("hashing", src).map(|d| d.hex()),
            Err(PumpError::Read(e)) => Err(StoreError::io("reading", src, e)),
            Err(PumpError::Write(e)) => Err(StoreError::write(&part.path, total_bytes, e)),
            Err(PumpError::Cancelled) => Err(StoreError::Cancelled),
        };
        let (actual, blake3) = match digests {
            Ok(digests) => digests,
            Err(e) => return Err(part.discard(e)),
        };
        if actual != sha {
            tracing::warn!(model = %id, expected = %sha, actual = %actual, path = %src.display(),
                "import rejected: sha256 mismatch");
            return Err(part.discard(StoreError::HashMismatch {
                model: id.to_owned(),
                path: src.to_path_buf(),
                expected: sha,
                actual,
            }));
        }
        part.commit(&dest)?;
        self.record_check_or_warn(&sha, &blake3);
        tracing::info!(model = %id, sha256 = %sha, tier = "store", bytes = done,
            duration_ms = started.elapsed().as_millis() as u64, "model imported");
        Ok(dest)
    }

    /// Re-hashes the stored file. On a mismatch the file is removed (it must never be
    /// used again) and the error says what was found.
    pub fn verify(&self, sha256: &str) -> Result<(), StoreError> {
        let sha = check_sha256("", sha256)?;
        let path = self.path_of(&sha);
        let (actual, bytes) = hash_file(&path)?;
        if actual == sha {
            tracing::debug!(sha256 = %sha, tier = "store", bytes, "verified");
            return Ok(());
        }
        tracing::warn!(sha256 = %sha, actual = %actual, tier = "store", path = %path.display(),
            "stored model is corrupt: removing it");
        std::fs::remove_file(&path).at("removing corrupt", &path)?;
        self.forget_check(&sha)?;
        sync_dir(&self.root)?;
        Err(StoreError::HashMismatch { model: sha.clone(), path, expected: sha, actual })
    }

    /// Opens (creating) and locks the part file of `sha`, without truncating it.
    pub(crate) fn lock_part(&self, sha: &str) -> Result<PartFile, StoreError> {
        let path = self.part_path_of(sha);
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).at("creating", &path)?;
        let file = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            if errno == Errno::EWOULDBLOCK {
                StoreError::Busy { path: path.clone() }
            } else {
                StoreError::io("locking", &path, errno.into())
            }
        })?;
        Ok(PartFile { file, path })
    }
}

impl PartFile {
    /// Removes the part file and returns `err`, the reason. A failure to remove is
    /// logged: the original error is the one worth reporting.
    pub(crate) fn discard(self, err: StoreError) -> StoreError {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "removing part file failed");
        }
        err
    }

    /// Makes the verified part file durable under `dest`: fsync, rename, fsync the dir.
    pub(crate) fn commit(self, dest: &Path) -> Result<(), StoreError> {
        self.file.sync_all().at("syncing", &self.path)?;
        std::fs::rename(&self.path, dest).at("renaming", &self.path)?;
        if let Some(dir) = dest.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for PartFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartFile").field("path", &self.path).finish()
    }
}

/// What [`Store::already`] found.
pub(super) enum Already {
    Stored(PathBuf),
    Missing(String, PathBuf),
}
