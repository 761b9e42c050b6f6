//! The expensive part of an image, prepared once and cached by a hash of its inputs: an
//! unpacked Raspberry Pi OS image (`rpi`) or a Debian root filesystem (`debian`). A build
//! copies the cached root filesystem and edits the copy, so a config-only change costs seconds.

pub mod debian;
pub mod rpi;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::image::partition;

/// Bumped when the cached layout changes, so old cache entries are not misread.
pub const CACHE_FORMAT: &str = "kiln-base-v1";

/// Where kiln caches bases and verified models: $KILN_CACHE, else $XDG_CACHE_HOME/kiln, else ~/.cache/kiln.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

impl Cache {
    pub fn from_env() -> Cache {
        let root = std::env::var_os("KILN_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache")
            });
            base.join("kiln")
        });
        Cache { root }
    }
    pub fn base_dir(&self, key: &str) -> PathBuf {
        self.root.join("bases").join(key)
    }
    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }
}

/// What a prepared base holds besides its root filesystem.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Boot {
    /// The base image's FAT boot partition (`boot.vfat`) and its original partition table.
    Rpi { table: SavedTable, boot_index: usize, root_index: usize },
    /// Kernel, initrd and systemd-boot for an EFI system partition (files under `esp/`).
    Efi { kernel: String, initrd: String, loader: String },
}

/// A partition table as stored in base.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedTable {
    pub gpt: bool,
    pub id: String,
    /// (start, size) in bytes, and type, per partition.
    pub parts: Vec<(u64, u64, String)>,
}

impl From<&partition::Table> for SavedTable {
    fn from(t: &partition::Table) -> Self {
        SavedTable {
            gpt: t.kind == partition::Kind::Gpt,
            id: t.id.clone(),
            parts: t.parts.iter().map(|p| (p.start_bytes, p.size_bytes, p.type_id.clone())).collect(),
        }
    }
}

/// base.json in a cache entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaseInfo {
    pub format: String,
    pub key: String,
    pub boot: Boot,
}

/// A base ready to build from.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub dir: PathBuf,
    pub info: BaseInfo,
    /// True when the cache already held it.
    pub from_cache: bool,
}

impl Prepared {
    pub fn root_ext4(&self) -> PathBuf {
        self.dir.join("root.ext4")
    }
    pub fn boot_vfat(&self) -> PathBuf {
        self.dir.join("boot.vfat")
    }
    pub fn esp_dir(&self) -> PathBuf {
        self.dir.join("esp")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "base image {path}: sha256 is {actual}, but the spec pins {expected}; download the right image or fix base.sha256"
    )]
    Hash { path: PathBuf, expected: String, actual: String },
    #[error("base image {path}: {message}")]
    Layout { path: PathBuf, message: String },
    #[error(transparent)]
    Tool(#[from] crate::tools::ToolError),
    #[error(transparent)]
    Partition(#[from] partition::PartitionError),
    #[error("cache entry {path} is unreadable ({message}); delete it and build again")]
    Cache { path: PathBuf, message: String },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BaseError + '_ {
    move |source| BaseError::Io { path: path.to_path_buf(), source }
}

/// Loads a complete cache entry (one that has its base.json), if present.
pub(crate) fn load_cached(dir: &Path) -> Result<Option<Prepared>, BaseError> {
    let info_path = dir.join("base.json");
    if !info_path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&info_path).map_err(io(&info_path))?;
    let info: BaseInfo = serde_json::from_str(&text)
        .map_err(|e| BaseError::Cache { path: dir.to_path_buf(), message: e.to_string() })?;
    if info.format != CACHE_FORMAT {
        return Ok(None);
    }
    Ok(Some(Prepared { dir: dir.to_path_buf(), info, from_cache: true }))
}

/// Publishes a staged cache entry: base.json last, then one rename, so a killed preparation
/// never leaves an entry that looks complete.
pub(crate) fn publish(staging: &Path, dir: &Path, info: BaseInfo) -> Result<Prepared, BaseError> {
    let info_path = staging.join("base.json");
    let text = serde_json::to_string_pretty(&info)
        .map_err(|e| BaseError::Cache { path: info_path.clone(), message: e.to_string() })?;
    std::fs::write(&info_path, text).map_err(io(&info_path))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::rename(staging, dir).map_err(io(dir))?;
    Ok(Prepared { dir: dir.to_path_buf(), info, from_cache: false })
}

/// A fresh staging directory next to the cache entry.
pub(crate) fn staging_for(dir: &Path) -> Result<PathBuf, BaseError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let staging = parent.join(format!(
        ".{}.tmp-{}",
        dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    Ok(staging)
}
