//! Cgroup placement for kilnd and its workers: the `CgroupBackend` trait, its cgroupfs
//! implementations (v2 rooted at kilnd's delegated subtree, v1 through cgroups-rs), a
//! do-nothing backend for machines without a writable cgroup fs, and `detect` to pick one.
//!
//! The layout kilnd builds under the backend's root:
//! ```text
//! supervisor/            kilnd itself (v2: enter_leaf, "no internal processes")
//! inference/             the spec's shared inference limits
//! inference/<model-id>/  one worker each
//! prewarm/               store -> tmpfs copies
//! ```

mod detect;
mod error;
mod fs;
mod none;
mod v1;
mod v2;
mod values;

use std::fmt;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

pub use detect::detect;
pub use error::CgroupError;
pub use fs::{CgroupFs, RealFs};
/// The limits of one cgroup, straight from the validated spec: `None` means "no limit"
/// (the kernel's default), so `set_limits` with a field cleared lifts that limit.
pub use kiln_spec::model::Limits;
pub use none::NoCgroups;
pub use v1::V1Backend;
pub use v2::V2Backend;
pub use values::{cpu_max, cpu_weight_to_shares, cpuset_list, io_weight_to_blkio};

/// Every cgroup's list of member processes (v1 and v2).
pub(crate) const CGROUP_PROCS: &str = "cgroup.procs";

/// Which cgroup interface a backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
    /// No writable cgroup fs: workers run without limits.
    None,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
            Version::None => "none",
        })
    }
}

/// A cgroup a backend created. `name` is relative to the backend's root
/// ("inference/smollm2"); `path` is its directory (v1: in the memory hierarchy; empty for
/// `NoCgroups`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupHandle {
    name: String,
    path: PathBuf,
}

impl CgroupHandle {
    /// For backends, including test doubles outside this crate.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        CgroupHandle { name: name.into(), path: path.into() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Memory event counters since the cgroup was created (cgroup v2 `memory.events`).
/// v1 has fewer: `oom_kill` comes from `memory.oom_control` (kernel >= 4.13, else 0),
/// `max` is `memory.failcnt` plus `memory.memsw.failcnt` (charges that hit a limit; it
/// undercounts: kernel 6.18 left both at 0 when the memsw limit was the one hit),
/// `oom` equals `oom_kill`, and `high` is always 0 (v1 counts no soft-limit breaches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEvents {
    /// Times usage went over memory.high and was throttled.
    pub high: u64,
    /// Times usage was about to go over memory.max.
    pub max: u64,
    /// Times the cgroup ran out of memory (the OOM killer was invoked).
    pub oom: u64,
    /// Processes in the cgroup killed by the OOM killer.
    pub oom_kill: u64,
}

/// Where kilnd puts processes so that their memory, CPU and I/O are limited. The policy
/// code takes `&dyn CgroupBackend`, so it can be tested with a double.
pub trait CgroupBackend: Send + Sync + fmt::Debug {
    fn version(&self) -> Version;
    /// Creates `name` ("inference/smollm2") and any missing parents, then applies `limits`
    /// to it (not to the parents). Idempotent: an existing cgroup gets the new limits.
    fn create(&self, name: &str, limits: &Limits) -> Result<CgroupHandle, CgroupError>;
    /// Applies every field of `limits`; a `None` field resets that limit to the default.
    fn set_limits(&self, cg: &CgroupHandle, limits: &Limits) -> Result<(), CgroupError>;
    /// Moves a process (all its threads) into the cgroup.
    fn attach(&self, cg: &CgroupHandle, pid: Pid) -> Result<(), CgroupError>;
    fn memory_events(&self, cg: &CgroupHandle) -> Result<MemoryEvents, CgroupError>;
    /// Bytes charged to the cgroup now.
    fn memory_current(&self, cg: &CgroupHandle) -> Result<u64, CgroupError>;
    /// The hard memory limit in bytes; `None` for unlimited.
    fn memory_max(&self, cg: &CgroupHandle) -> Result<Option<u64>, CgroupError>;
    /// Pids of the processes in the cgroup itself (not its children).
    fn procs(&self, cg: &CgroupHandle) -> Result<Vec<u32>, CgroupError>;
    /// Removes the cgroup (children first: this does not recurse). Fails with
    /// [`CgroupError::Busy`] if processes remain; a cgroup already gone is not an error.
    fn remove(&self, cg: &CgroupHandle) -> Result<(), CgroupError>;
    /// Moves the calling process into the leaf `leaf` (cgroup v2's "no internal processes"
    /// rule: kilnd must leave its delegated root before children get controllers). None
    /// where there is nothing to do (v1, no cgroups).
    fn enter_leaf(&self, _leaf: &str) -> Result<Option<CgroupHandle>, CgroupError> {
        Ok(None)
    }
}

/// Splits a cgroup name into its directory components, refusing anything that could leave
/// the backend's root or collide with the kernel's own files.
pub(crate) fn components(name: &str) -> Result<Vec<&str>, CgroupError> {
    let invalid = |reason| CgroupError::InvalidName { name: name.to_owned(), reason };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.starts_with('/') {
        return Err(invalid("it is absolute; names are relative to kilnd's cgroup"));
    }
    let parts: Vec<&str> = name.split('/').collect();
    for part in &parts {
        match *part {
            "" => return Err(invalid("it has an empty component")),
            "." | ".." => return Err(invalid("it has a . or .. component")),
            p if p.chars().any(|c| c.is_control()) => return Err(invalid("it has a control character")),
            p if p.starts_with("cgroup.") => return Err(invalid("cgroup.* names are the kernel's")),
            _ => {}
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_under_the_root() {
        assert_eq!(components("inference/smollm2").unwrap(), ["inference", "smollm2"]);
        for bad in ["", "/inference", "inference/../..", "a//b", "a/", "cgroup.procs", "a\nb"] {
            assert!(matches!(components(bad), Err(CgroupError::InvalidName { .. })), "{bad:?}");
        }
    }
}
