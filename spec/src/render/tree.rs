//! Writing a generation to a directory (and reading it back): files with their modes,
//! symlinks, directories and the manifest. The tree appears under its final name only when
//! complete: it is written beside it under a temporary name and renamed into place.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use super::{Kind, MANIFEST_PATH, Manifest};

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing to write into {path}: it is not empty and holds no kiln generation (pass a new or empty directory)"
    )]
    NotOurs { path: PathBuf },
    #[error("{path} is not a kiln manifest: {message}")]
    BadManifest { path: PathBuf, message: String },
}

fn werr(path: &Path) -> impl FnOnce(std::io::Error) -> TreeError + '_ {
    move |source| TreeError::Write { path: path.to_path_buf(), source }
}

/// Writes the generation rooted at `out` (`out/etc/...`), replacing an earlier generation there.
pub fn write_tree(manifest: &Manifest, out: &Path) -> Result<(), TreeError> {
    if out.exists() {
        let empty =
            fs::read_dir(out).map_err(|source| TreeError::Read { path: out.to_path_buf(), source })?.next().is_none();
        if !empty && !out.join(MANIFEST_PATH).is_file() {
            return Err(TreeError::NotOurs { path: out.to_path_buf() });
        }
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(werr(parent))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "generation".into());
    let staging = parent.join(format!(".{name}.kiln-tmp-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(werr(&staging))?;
    }
    let result = write_into(manifest, &staging).and_then(|()| swap_into_place(&staging, out));
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

fn write_into(manifest: &Manifest, root: &Path) -> Result<(), TreeError> {
    fs::create_dir_all(root).map_err(werr(root))?;
    for e in &manifest.entries {
        let path = root.join(e.path.trim_start_matches('/'));
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(werr(dir))?;
        }
        match &e.kind {
            Kind::Dir => {
                fs::create_dir_all(&path).map_err(werr(&path))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(e.mode)).map_err(werr(&path))?;
            }
            Kind::Symlink { target } => symlink(target, &path).map_err(werr(&path))?,
            Kind::File | Kind::Block | Kind::Args => {
                let mut f = fs::File::create(&path).map_err(werr(&path))?;
                f.write_all(&e.content).map_err(werr(&path))?;
                f.set_permissions(fs::Permissions::from_mode(e.mode)).map_err(werr(&path))?;
                f.sync_all().map_err(werr(&path))?;
            }
        }
    }
    let path = root.join(MANIFEST_PATH);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(werr(dir))?;
    }
    let text = serde_json::to_string_pretty(manifest)
        .map_err(|e| TreeError::Write { path: path.clone(), source: e.into() })?;
    fs::write(&path, text + "\n").map_err(werr(&path))?;
    Ok(())
}

/// Renames the staged tree to `out`; an earlier tree there is moved aside first and removed after.
fn swap_into_place(staging: &Path, out: &Path) -> Result<(), TreeError> {
    if out.exists() {
        let old = staging.with_extension("old");
        fs::rename(out, &old).map_err(werr(out))?;
        fs::rename(staging, out).map_err(werr(out))?;
        fs::remove_dir_all(&old).map_err(werr(&old))?;
    } else {
        fs::rename(staging, out).map_err(werr(out))?;
    }
    Ok(())
}

/// Reads a rendered generation back: its manifest, with each file's content from the tree.
pub fn read_manifest(root: &Path) -> Result<Manifest, TreeError> {
    let path = root.join(MANIFEST_PATH);
    let text = fs::read_to_string(&path).map_err(|source| TreeError::Read { path: path.clone(), source })?;
    let mut manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| TreeError::BadManifest { path: path.clone(), message: e.to_string() })?;
    for e in &mut manifest.entries {
        if matches!(e.kind, Kind::File | Kind::Block | Kind::Args) {
            let file = root.join(e.path.trim_start_matches('/'));
            e.content = fs::read(&file).map_err(|source| TreeError::Read { path: file.clone(), source })?;
        }
    }
    Ok(manifest)
}

/// Where the manifest sits in the stream a generation is sent as.
pub const PACK_MANIFEST: &str = "manifest.json";
/// Where file contents sit in that stream: `files/<path without the leading slash>`.
pub const PACK_FILES: &str = "files";

/// A generation as a tar stream for the device: the manifest, then the content of each file
/// whose sha256 is not in `known` (the device has those already). Deterministic.
pub fn pack(manifest: &Manifest, known: &std::collections::BTreeSet<String>) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data)
    };
    let text = serde_json::to_vec_pretty(manifest).map_err(std::io::Error::other)?;
    add(PACK_MANIFEST, &text)?;
    for e in &manifest.entries {
        if matches!(e.kind, Kind::File | Kind::Block | Kind::Args) && !known.contains(&e.sha256) {
            add(&format!("{PACK_FILES}/{}", e.path.trim_start_matches('/')), &e.content)?;
        }
    }
    b.into_inner()
}
