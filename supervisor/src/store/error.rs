//! `StoreError`: what can go wrong in the model store, the hot tier and the page cache.

use std::io;
use std::path::{Path, PathBuf};

/// Every failure of the store and the hot tier. I/O variants name their path; the
/// underlying `io::Error` is the `#[source]`, never also printed in the message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem call failed; `action` is a lowercase gerund ("writing", "renaming").
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The bytes do not hash to what the manifest promised. The file is never used.
    #[error("{path}: sha256 mismatch for model {model}: expected {expected}, got {actual}")]
    HashMismatch { model: String, path: PathBuf, expected: String, actual: String },

    /// A copy out of the store does not hash to the store's recorded check digest (BLAKE3).
    /// The copy was removed; the caller drops the digest and checks the SHA-256 instead.
    #[error("{path}: copy does not match the store's check digest (blake3 {expected}, got {actual})")]
    CheckMismatch { path: PathBuf, expected: String, actual: String },

    /// A download does not hash to what the manifest promised; the part file was removed.
    #[error("model {model}: sha256 mismatch in {url}: expected {expected}, got {actual}")]
    DownloadHashMismatch { model: String, url: String, expected: String, actual: String },

    /// A download finished with a different length than the manifest promised.
    #[error("model {model}: {url} sent {actual} bytes, expected {expected}")]
    SizeMismatch { model: String, url: String, expected: u64, actual: u64 },

    /// The manifest's hash is not 64 hex digits. `model` is empty where none was named.
    #[error("{sha256:?} is not a sha256 (expected 64 hex digits){}", for_model(.model))]
    InvalidHash { model: String, sha256: String },

    /// The server answered with a status that retrying will not fix (e.g. 404).
    #[error("downloading model {model} from {url}: server answered {status}")]
    HttpStatus { model: String, url: String, status: u16 },

    /// Every attempt to download failed; the source is the last attempt's error.
    #[error("downloading model {model} from {url} ({attempts} attempts)")]
    Download {
        model: String,
        url: String,
        attempts: u32,
        #[source]
        source: io::Error,
    },

    /// Another import or fetch of the same hash holds the part file.
    #[error("{path} is locked by another import or fetch of the same model (wait for it)")]
    Busy { path: PathBuf },

    /// The copy would push the hot tier past its budget; nothing was written.
    #[error(
        "hot tier budget exceeded: needs {needed} bytes, {used} of {budget} in use \
         (demote a model or raise the hot tier budget)"
    )]
    OverBudget { needed: u64, used: u64, budget: u64 },

    /// The filesystem under the hot tier filled up (ENOSPC); the temporary file was removed.
    #[error(
        "no space left in {path} for {needed} bytes (the tmpfs is smaller than the hot tier \
         budget: enlarge it or lower the budget)"
    )]
    NoSpace { needed: u64, path: PathBuf },

    /// The copy was cancelled (inference traffic arrived); the temporary file was removed.
    #[error("copy cancelled")]
    Cancelled,
}

impl StoreError {
    /// Wraps `source` with the action and the path it concerned.
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        StoreError::Io { action, path: path.to_path_buf(), source }
    }

    /// Like [`StoreError::io`], but ENOSPC/EDQUOT become [`StoreError::NoSpace`].
    pub(crate) fn write(path: &Path, needed: u64, source: io::Error) -> Self {
        if is_no_space(&source) {
            StoreError::NoSpace { needed, path: path.to_path_buf() }
        } else {
            StoreError::io("writing", path, source)
        }
    }
}

fn for_model(model: &str) -> String {
    if model.is_empty() { String::new() } else { format!(" for model {model}") }
}

/// True for "the filesystem is full" (ENOSPC) and "the quota is used up" (EDQUOT).
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT))
}

/// Shorthand for attaching an action and a path to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, action: &'static str, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, action: &'static str, path: &Path) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::io(action, path, e))
    }
}
