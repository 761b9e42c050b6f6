//! Models baked into an image: each `path` model is copied once into kiln's content-addressed
//! cache, its sha256 computed while copying; a file whose hash does not match never gets the
//! final name. Builds then write from the verified cache copy.

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

/// The verified cache copy of a model, making it if needed. Returns (path, was it cached).
pub fn cached(
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
