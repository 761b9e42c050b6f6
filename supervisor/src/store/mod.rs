//! Model weights in tiers: the persistent content-addressed store (`Store`), the tmpfs hot
//! tier (`HotTier`), and page-cache warming when no tmpfs is configured. A file whose
//! sha256 does not match is never used: every copy is hashed in the pass that writes it,
//! and only verified files get a final name.

mod copy;
mod error;
mod fetch;
mod hot;
mod persistent;
mod residency;

use std::fs::File;
use std::path::Path;

pub use error::StoreError;
pub use fetch::FetchOptions;
pub use hot::{CopyOptions, CopyReport, HotTier};
pub use persistent::Store;
pub use residency::{Residency, residency, warm_page_cache};

use error::IoContext;

/// Checks that `sha256` is 64 hex digits and returns it in lowercase, the form used in
/// file names.
pub(crate) fn check_sha256(model: &str, sha256: &str) -> Result<String, StoreError> {
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(sha256.to_ascii_lowercase())
    } else {
        Err(StoreError::InvalidHash { model: model.to_owned(), sha256: sha256.to_owned() })
    }
}

/// Fsyncs a directory so a rename or an unlink in it survives a power cut.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).at("syncing directory", dir)
}
