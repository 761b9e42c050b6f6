//! ext4 filesystems in image files, edited in place with e2fsprogs' debugfs: no mount, no
//! root, and everything kiln does not touch (owners, modes, hardlinks, xattrs and file
//! capabilities of the base) stays exactly as it was. Writing into an existing filesystem is
//! why debugfs beats extracting and rebuilding with `mke2fs -d`: an extraction loses what the
//! unprivileged extractor cannot represent (other owners, capabilities).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::tools::{self, ToolError};

#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("debugfs reported errors editing {image}:\n{errors}")]
    Debugfs { image: PathBuf, errors: String },
    #[error("writing the debugfs script for {image}")]
    Script {
        image: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One directory entry as `ls -p` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub inode: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl DirEntry {
    pub fn is_dir(&self) -> bool {
        self.mode & 0o170000 == 0o040000
    }
}

/// debugfs prints its version banner on stderr; anything else there is an error.
fn errors_in(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs ")).collect()
}

/// Reads a file from the filesystem; None when it does not exist.
pub fn read_file(image: &Path, path: &str) -> Result<Option<Vec<u8>>, Ext4Error> {
    let out =
        tools::run_full("debugfs", [OsString::from("-R"), format!("cat \"{path}\"").into(), image.into()], None, &[])?;
    let errors = errors_in(&out.stderr);
    if errors.iter().any(|e| e.contains("File not found")) {
        return Ok(None);
    }
    if !errors.is_empty() {
        return Err(Ext4Error::Debugfs { image: image.to_path_buf(), errors: errors.join("\n") });
    }
    Ok(Some(out.stdout))
}

/// Lists directories in one debugfs run; a directory that does not exist maps to None.
pub fn list_dirs(image: &Path, dirs: &[String]) -> Result<BTreeMap<String, Option<Vec<DirEntry>>>, Ext4Error> {
    let script: String = dirs.iter().map(|d| format!("ls -p \"{d}\"\n")).collect();
    let out = run_script(image, &script, None)?;
    let mut result: BTreeMap<String, Option<Vec<DirEntry>>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(cmd) = line.strip_prefix("debugfs: ls -p ") {
            let dir = cmd.trim().trim_matches('"').to_string();
            result.insert(dir.clone(), None);
            current = Some(dir);
            continue;
        }
        // `/inode/mode/uid/gid/name/size/`
        let fields: Vec<&str> = line.split('/').collect();
        if fields.len() < 7 {
            continue;
        }
        let (Some(dir), Ok(inode), Ok(mode)) = (&current, fields[1].parse(), u32::from_str_radix(fields[2], 8)) else {
            continue;
        };
        let entry = DirEntry {
            name: fields[5].to_string(),
            inode,
            mode,
            uid: fields[3].parse().unwrap_or(0),
            gid: fields[4].parse().unwrap_or(0),
        };
        result.entry(dir.clone()).or_insert(None).get_or_insert_with(Vec::new).push(entry);
    }
    // A directory that exists lists at least `.`.
    for v in result.values_mut() {
        if v.as_ref().is_some_and(|e| !e.iter().any(|x| x.name == ".")) {
            *v = None;
        }
    }
    Ok(result)
}

/// e2fsprogs stamp superblocks and the inodes they touch with this instead of the wall
/// clock when it is set (libext2fs reads E2FSPROGS_FAKE_TIME), which makes edits reproducible.
fn fake_time(epoch: Option<i64>) -> Vec<(&'static str, String)> {
    epoch.map(|e| vec![("E2FSPROGS_FAKE_TIME", e.to_string())]).unwrap_or_default()
}

fn env_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, val)| (*k, val.as_str())).collect()
}

fn run_script(image: &Path, script: &str, write: Option<i64>) -> Result<tools::Output, Ext4Error> {
    let mut file =
        tempfile::NamedTempFile::new().map_err(|source| Ext4Error::Script { image: image.to_path_buf(), source })?;
    file.write_all(script.as_bytes()).map_err(|source| Ext4Error::Script { image: image.to_path_buf(), source })?;
    let mut args: Vec<OsString> = Vec::new();
    if write.is_some() {
        args.push("-w".into());
    }
    args.extend(["-f".into(), file.path().into(), image.into()]);
    let env = fake_time(write);
    Ok(tools::run_full("debugfs", args, None, &env_refs(&env))?)
}

/// A batch of edits, applied in one debugfs session.
#[derive(Debug, Default)]
pub struct Edits {
    script: String,
}

impl Edits {
    pub fn is_empty(&self) -> bool {
        self.script.is_empty()
    }
    pub fn mkdir(&mut self, path: &str) {
        self.script.push_str(&format!("mkdir \"{path}\"\n"));
    }
    pub fn rm(&mut self, path: &str) {
        self.script.push_str(&format!("rm \"{path}\"\n"));
    }
    pub fn write(&mut self, host: &Path, path: &str) {
        self.script.push_str(&format!("write \"{}\" \"{path}\"\n", host.display()));
    }
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.script.push_str(&format!("symlink \"{path}\" \"{target}\"\n"));
    }
    /// Sets owner, full mode (file type bits included) and all four timestamps.
    pub fn set_inode(&mut self, path: &str, mode: u32, uid: u32, gid: u32, epoch: i64) {
        self.script
            .push_str(&format!("sif \"{path}\" mode 0{mode:o}\nsif \"{path}\" uid {uid}\nsif \"{path}\" gid {gid}\n"));
        self.set_times(path, epoch);
    }
    pub fn set_times(&mut self, path: &str, epoch: i64) {
        for field in ["atime", "mtime", "ctime", "crtime"] {
            self.script.push_str(&format!("sif \"{path}\" {field} @{epoch}\n"));
        }
    }
    /// Runs the batch with `epoch` as the clock; any error debugfs prints fails the whole edit.
    pub fn apply(&self, image: &Path, epoch: i64) -> Result<(), Ext4Error> {
        if self.script.is_empty() {
            return Ok(());
        }
        let out = run_script(image, &self.script, Some(epoch))?;
        let errors = errors_in(&out.stderr);
        if !errors.is_empty() {
            return Err(Ext4Error::Debugfs { image: image.to_path_buf(), errors: errors.join("\n") });
        }
        Ok(())
    }
}

/// Checks the filesystem read-only (`e2fsck -fn`): any problem fails the build.
pub fn check(image: &Path) -> Result<(), Ext4Error> {
    tools::run("e2fsck", [OsString::from("-fn"), image.into()], None)?;
    Ok(())
}

/// Grows the filesystem in a file to `size_bytes` (the file grows sparsely first), with
/// `epoch` as the clock.
pub fn grow(image: &Path, size_bytes: u64, epoch: i64) -> Result<(), Ext4Error> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|source| Ext4Error::Script { image: image.to_path_buf(), source })?;
    if file.metadata().map(|m| m.len()).unwrap_or(0) < size_bytes {
        file.set_len(size_bytes).map_err(|source| Ext4Error::Script { image: image.to_path_buf(), source })?;
    }
    let env = fake_time(Some(epoch));
    let args = [OsString::from("-f"), image.into(), format!("{}K", size_bytes / 1024).into()];
    tools::run_env("resize2fs", args, None, &env_refs(&env))?;
    Ok(())
}

/// Block size and block count from the superblock.
pub fn geometry(image: &Path) -> Result<(u64, u64), Ext4Error> {
    let out = tools::run("dumpe2fs", [OsString::from("-h"), image.into()], None)?;
    let text = String::from_utf8_lossy(&out);
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<u64>().unwrap_or(0))).unwrap_or(0)
    };
    Ok((field("Block size:"), field("Block count:")))
}
