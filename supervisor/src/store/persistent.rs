//! `Store`: the persistent, content-addressed model store (`<root>/<sha256>.gguf`).
//! Bytes land in `.<sha256>.gguf.part`, are hashed in the same pass, and get the final
//! name only once verified, so `contains` never sees an unverified file.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::copy::{CHUNK_BYTES, PipelinedHasher, Pump, PumpError, advise_sequential, hash_file};
use super::error::{IoContext, StoreError};
use super::{check_sha256, sync_dir};

/// Suffix of a model file, in the store and in the hot tier.
pub(crate) const MODEL_SUFFIX: &str = ".gguf";
/// Suffix of a partial import or download (after a leading dot).
const PART_SUFFIX: &str = ".gguf.part";

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
        let mut hasher = PipelinedHasher::new(CHUNK_BYTES, Sha256::new()).at("starting a hasher for", &part.path)?;
        let mut done = 0;
        let pumped = pump.run(&mut src_file, Some(&mut *part.file), &mut hasher, &mut done);
        let actual = match pumped {
            Ok(()) => hasher.finish().at("hashing", src),
            Err(PumpError::Read(e)) => Err(StoreError::io("reading", src, e)),
            Err(PumpError::Write(e)) => Err(StoreError::write(&part.path, total_bytes, e)),
            Err(PumpError::Cancelled) => Err(StoreError::Cancelled),
        };
        let actual = match actual {
            Ok(actual) => actual,
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
