//! FAT filesystems in image files, with dosfstools and mtools: no mounts. Files kiln writes
//! get the build's timestamp, so the same inputs give the same bytes.

use std::ffi::OsString;
use std::path::Path;

use crate::tools::{self, ToolError};

fn image_arg(vfat: &Path) -> OsString {
    vfat.as_os_str().to_os_string()
}

/// mtools refuses some geometries that are fine for firmware; kiln checks sizes itself.
fn mtools(tool: &str, args: Vec<OsString>) -> Result<Vec<u8>, ToolError> {
    tools::run_env(tool, args, None, &[("MTOOLS_SKIP_CHECK", "1")])
}

/// Creates a FAT filesystem filling `vfat` (FAT32 from 256 MiB, else FAT16), with a fixed
/// volume id and no time-based fields.
pub fn mkfs(vfat: &Path, size_bytes: u64, label: &str) -> Result<(), ToolError> {
    let file = std::fs::File::create(vfat).map_err(|source| ToolError::Spawn { tool: "mkfs.fat".into(), source })?;
    file.set_len(size_bytes).map_err(|source| ToolError::Spawn { tool: "mkfs.fat".into(), source })?;
    let fat = if size_bytes >= 256 * 1024 * 1024 { "32" } else { "16" };
    tools::run(
        "mkfs.fat",
        ["-F", fat, "-n", label, "--invariant"].iter().map(OsString::from).chain([image_arg(vfat)]),
        None,
    )?;
    Ok(())
}

/// Reads `::name` from the filesystem; None when it does not exist.
pub fn read_file(vfat: &Path, name: &str) -> Result<Option<Vec<u8>>, ToolError> {
    let listing = mtools("mdir", vec!["-b".into(), "-i".into(), image_arg(vfat), "::".into()])?;
    let wanted = format!("::/{}", name.trim_start_matches('/')).to_lowercase();
    let exists = String::from_utf8_lossy(&listing).lines().any(|l| l.trim().to_lowercase() == wanted);
    if !exists {
        return Ok(None);
    }
    let out = mtools("mtype", vec!["-i".into(), image_arg(vfat), format!("::{name}").into()])?;
    Ok(Some(out))
}

/// Copies a host directory tree into the filesystem root, keeping the host files' mtimes.
pub fn copy_tree(vfat: &Path, dir: &Path) -> Result<(), ToolError> {
    let mut args: Vec<OsString> = vec!["-s".into(), "-m".into(), "-o".into(), "-i".into(), image_arg(vfat)];
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| ToolError::Spawn { tool: "mcopy".into(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    if entries.is_empty() {
        return Ok(());
    }
    args.extend(entries.into_iter().map(|p| p.into_os_string()));
    args.push("::".into());
    mtools("mcopy", args)?;
    Ok(())
}
