//! `CgroupFs`: the file operations the v2 backend performs, behind a seam so tests can
//! root it at a plain directory and see exactly what was written where.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// The handful of calls a cgroup2 filesystem needs. Implementations must not create
/// missing files on `write`: on cgroupfs a missing interface file means the controller is
/// not enabled, and that must surface as an error, not as a stray regular file.
pub trait CgroupFs: Send + Sync + fmt::Debug {
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Writes `contents` with a single `write(2)`, as cgroupfs expects, to an existing file.
    fn write(&self, path: &Path, contents: &str) -> io::Result<()>;
    /// `mkdir(2)`: creates one cgroup; the kernel populates its interface files.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// `rmdir(2)`: removes an empty cgroup (interface files do not count).
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
}

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl CgroupFs for RealFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }

    fn write(&self, path: &Path, contents: &str) -> io::Result<()> {
        // A zero-length write need not reach the kernel's handler; cgroup files strip
        // whitespace, so a lone newline means "empty" (e.g. cpuset.cpus: inherit).
        let contents = if contents.is_empty() { "\n" } else { contents };
        let mut file = OpenOptions::new().write(true).open(path)?;
        let written = file.write(contents.as_bytes())?;
        if written == contents.len() {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::WriteZero, format!("short write: {written} of {} bytes", contents.len())))
        }
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}
