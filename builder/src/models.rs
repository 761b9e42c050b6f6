//! Models baked into an image: each `path` model is copied once into kiln's content-addressed
//! cache, its sha256 computed while copying; a file whose hash does not match never gets the
//! final name. Builds then write from the verified cache copy, and put its check digest
//! (`<sha256>.b3`: the BLAKE3 of the verified bytes, one hex line) beside it in the device's
//! store, as kilnd's store records one for each model it imports or fetches: the device's
//! first prewarm is then checked against it at copy speed instead of hashing SHA-256.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "model `{id}` ({path}): sha256 is {actual}, but the spec says {expected}; the file is not the model the spec pins"
    )]
    Hash { id: String, path: PathBuf, expected: String, actual: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.to_path_buf(), source }
}

/// A model in the verified cache.
#[derive(Debug, Clone)]
pub struct Cached {
    /// The verified copy, `<sha256>.gguf`.
    pub path: PathBuf,
    /// Its check digest, `<sha256>.b3`.
    pub check: PathBuf,
    /// It was in the cache already.
    pub hit: bool,
}

/// The verified cache copy of a model and its check digest, making them if needed.
pub fn cached(
    id: &str,
    src: &Path,
    sha256: &str,
    dir: &Path,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<Cached, ModelError> {
    let (path, hit) = verified_copy(id, src, sha256, dir, progress)?;
    let check = check_digest(&path)?;
    Ok(Cached { path, check, hit })
}

/// The `<sha256>.b3` beside the verified `gguf`, hashing it once if it has none yet (a cache
/// filled before check digests existed). Written under a temporary name and renamed.
fn check_digest(gguf: &Path) -> Result<PathBuf, ModelError> {
    let check = gguf.with_extension("b3");
    if check.is_file() {
        return Ok(check);
    }
    let mut input = File::open(gguf).map_err(io(gguf))?;
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut input, &mut hasher).map_err(io(gguf))?;
    let part = gguf.with_extension(format!("b3.part-{}", std::process::id()));
    let written = std::fs::write(&part, format!("{}\n", hasher.finalize().to_hex()))
        .and_then(|()| std::fs::rename(&part, &check))
        .map_err(io(&check));
    if written.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    written.map(|()| check)
}

/// The verified cache copy of a model, making it if needed. Returns (path, was it cached).
fn verified_copy(
    id: &str,
    src: &Path,
    sha256: &str,
    dir: &Path,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<(PathBuf, bool), ModelError> {
    let dest = dir.join(format!("{sha256}.gguf"));
    if dest.is_file() {
        return Ok((dest, true));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let part = dir.join(format!(".{sha256}.gguf.part-{}", std::process::id()));
    let result =
        copy_verified(id, src, sha256, &part, progress).and_then(|()| std::fs::rename(&part, &dest).map_err(io(&dest)));
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result.map(|()| (dest, false))
}

fn copy_verified(
    id: &str,
    src: &Path,
    expected: &str,
    part: &Path,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<(), ModelError> {
    let mut input = File::open(src).map_err(io(src))?;
    let total = input.metadata().map_err(io(src))?.len();
    let mut out = File::create(part).map_err(io(part))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(io(src))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io(part))?;
        done += n as u64;
        progress(&format!("copying model {id}"), done, total);
    }
    out.sync_all().map_err(io(part))?;
    let actual = hex::encode(h.finalize());
    if actual != expected {
        return Err(ModelError::Hash { id: id.into(), path: src.to_path_buf(), expected: expected.into(), actual });
    }
    Ok(())
}
