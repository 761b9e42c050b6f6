//! `V2Backend`: cgroup v2, rooted at a directory of a cgroup2 fs (in production kilnd's
//! own, delegated cgroup), driven by plain file I/O through the [`CgroupFs`] seam.
//!
//! Not cgroups-rs: its v2 hierarchy is fixed at /sys/fs/cgroup (`UNIFIED_MOUNTPOINT`),
//! reads the available controllers from there, and ignores failed writes to
//! `cgroup.subtree_control`; kilnd needs to root the tree at its delegated subtree (and tests
//! at a plain directory) and to report why a controller could not be enabled. The files
//! involved are a dozen one-line writes, documented in
//! <https://docs.kernel.org/admin-guide/cgroup-v2.html>.

use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::Pid;

use super::error::IoContext;
use super::values::{
    WEIGHT_DEFAULT, bytes_or_max, cpu_max, cpuset_list, parse_max, parse_memory_events, parse_procs, parse_u64,
};
use super::{
    CGROUP_PROCS, CgroupBackend, CgroupError, CgroupFs, CgroupHandle, Limits, MemoryEvents, RealFs, Version, components,
};

const CGROUP_CONTROLLERS: &str = "cgroup.controllers";
const CGROUP_SUBTREE_CONTROL: &str = "cgroup.subtree_control";
const MEMORY_MAX: &str = "memory.max";
const MEMORY_HIGH: &str = "memory.high";
const MEMORY_SWAP_MAX: &str = "memory.swap.max";
const MEMORY_EVENTS: &str = "memory.events";
const MEMORY_CURRENT: &str = "memory.current";
const CPUSET_CPUS: &str = "cpuset.cpus";
const CPU_WEIGHT: &str = "cpu.weight";
const CPU_MAX: &str = "cpu.max";
const IO_WEIGHT: &str = "io.weight";

const MEMORY: &str = "memory";
const CPUSET: &str = "cpuset";
const CPU: &str = "cpu";
const IO: &str = "io";

/// cgroup v2 under `root`. Cgroup names are paths relative to it.
#[derive(Debug)]
pub struct V2Backend {
    root: PathBuf,
    fs: Box<dyn CgroupFs>,
}

/// One file write a set of limits implies. `required`: the limit was asked for, so a
/// missing file is an error; otherwise the default is written only where the file exists
/// (a controller that is not enabled already behaves as its default).
#[derive(Debug, PartialEq, Eq)]
struct Setting {
    file: &'static str,
    value: String,
    required: bool,
}

impl V2Backend {
    pub fn new(root: PathBuf) -> Self {
        Self::with_fs(root, Box::new(RealFs))
    }

    /// A backend whose file operations go through `fs` (tests: a plain directory that
    /// imitates cgroupfs and records what was written).
    pub fn with_fs(root: PathBuf, fs: Box<dyn CgroupFs>) -> Self {
        V2Backend { root, fs }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Moves the calling process (all its threads) into the leaf `leaf` ("supervisor"),
    /// creating it. Call it at start-up, before `create`: cgroup v2 will not enable
    /// controllers for the children of a cgroup that holds processes, and kilnd starts in
    /// the root of its subtree. Apply kilnd's own limits to the returned handle after the
    /// move (`set_limits`), once the root is empty.
    pub fn enter_leaf(&self, leaf: &str) -> Result<CgroupHandle, CgroupError> {
        let mut dir = self.root.clone();
        for part in components(leaf)? {
            dir.push(part);
            self.mkdir(leaf, &dir)?;
        }
        let file = dir.join(CGROUP_PROCS);
        self.fs.write(&file, &std::process::id().to_string()).ctx(leaf, "moving kilnd into", &file)?;
        tracing::debug!(cgroup = %dir.display(), "kilnd entered its leaf cgroup");
        Ok(CgroupHandle::new(leaf, dir))
    }

    fn mkdir(&self, name: &str, dir: &Path) -> Result<(), CgroupError> {
        match self.fs.create_dir(dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e).ctx(name, "creating", dir),
            _ => Ok(()),
        }
    }

    /// Walks from the root down to `name`, enabling `needed` in each ancestor's
    /// `cgroup.subtree_control` before descending (a child can only enable what its parent
    /// delegates); with `mkdir`, creates each missing level on the way.
    fn prepare(&self, name: &str, needed: &[&'static str], mkdir: bool) -> Result<PathBuf, CgroupError> {
        let parts = components(name)?;
        let offered_file = self.root.join(CGROUP_CONTROLLERS);
        let offered = self.fs.read(&offered_file).ctx(name, "reading", &offered_file)?;
        if let Some(controller) = needed.iter().find(|c| !offered.split_whitespace().any(|o| o == **c)) {
            return Err(CgroupError::ControllerUnavailable { cgroup: name.to_owned(), controller, file: offered_file });
        }
        let mut dir = self.root.clone();
        for part in parts {
            self.enable(name, &dir, needed)?;
            dir.push(part);
            if mkdir {
                self.mkdir(name, &dir)?;
            }
        }
        Ok(dir)
    }

    fn enable(&self, name: &str, dir: &Path, needed: &[&'static str]) -> Result<(), CgroupError> {
        let file = dir.join(CGROUP_SUBTREE_CONTROL);
        let current = self.fs.read(&file).ctx(name, "reading", &file)?;
        let missing: Vec<String> =
            needed.iter().filter(|c| !current.split_whitespace().any(|e| e == **c)).map(|c| format!("+{c}")).collect();
        if missing.is_empty() {
            return Ok(());
        }
        match self.fs.write(&file, &missing.join(" ")) {
            Err(source) if source.raw_os_error() == Some(Errno::EBUSY as i32) => {
                Err(CgroupError::InternalProcesses { cgroup: name.to_owned(), file, source })
            }
            other => other.ctx(name, "enabling controllers in", &file),
        }
    }

    fn write_limits(&self, name: &str, dir: &Path, limits: &Limits) -> Result<(), CgroupError> {
        for Setting { file, value, required } in settings(limits) {
            let path = dir.join(file);
            if !required && !self.fs.exists(&path) {
                continue;
            }
            if file == MEMORY_SWAP_MAX && !self.fs.exists(&path) {
                return Err(CgroupError::Unsupported {
                    cgroup: name.to_owned(),
                    setting: "swap-max",
                    file: path,
                    hint: "the kernel accounts no swap: CONFIG_MEMCG_SWAP is off",
                });
            }
            self.fs.write(&path, &value).ctx(name, "writing", &path)?;
        }
        Ok(())
    }

    fn read(&self, cg: &CgroupHandle, file: &str) -> Result<(PathBuf, String), CgroupError> {
        let path = cg.path().join(file);
        let text = self.fs.read(&path).ctx(cg.name(), "reading", &path)?;
        Ok((path, text))
    }
}

/// The controllers a set of limits needs enabled. Memory always: kilnd reads every
/// cgroup's memory.current and memory.events.
fn needed(limits: &Limits) -> Vec<&'static str> {
    let mut needed = Vec::new();
    if limits.cpus.is_some() {
        needed.push(CPUSET);
    }
    if limits.cpu_weight.is_some() || limits.cpu_quota_percent.is_some() {
        needed.push(CPU);
    }
    if limits.io_weight.is_some() {
        needed.push(IO);
    }
    needed.push(MEMORY);
    needed
}

/// Every file a set of limits maps to, with its content; unset fields write the default.
fn settings(limits: &Limits) -> Vec<Setting> {
    let set = |file, value, required| Setting { file, value, required };
    let weight = |w: Option<u32>| w.unwrap_or(WEIGHT_DEFAULT).to_string();
    vec![
        set(MEMORY_MAX, bytes_or_max(limits.memory_max_bytes), true),
        set(MEMORY_HIGH, bytes_or_max(limits.memory_high_bytes), true),
        set(MEMORY_SWAP_MAX, bytes_or_max(limits.swap_max_bytes), limits.swap_max_bytes.is_some()),
        // An empty cpuset.cpus in v2 means "the parent's CPUs".
        set(CPUSET_CPUS, limits.cpus.as_deref().map(cpuset_list).unwrap_or_default(), limits.cpus.is_some()),
        set(CPU_WEIGHT, weight(limits.cpu_weight), limits.cpu_weight.is_some()),
        set(CPU_MAX, cpu_max(limits.cpu_quota_percent), limits.cpu_quota_percent.is_some()),
        set(IO_WEIGHT, format!("default {}", weight(limits.io_weight)), limits.io_weight.is_some()),
    ]
}

impl CgroupBackend for V2Backend {
    fn enter_leaf(&self, leaf: &str) -> Result<Option<CgroupHandle>, CgroupError> {
        V2Backend::enter_leaf(self, leaf).map(Some)
    }

    fn version(&self) -> Version {
        Version::V2
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<CgroupHandle, CgroupError> {
        let dir = self.prepare(name, &needed(limits), true)?;
        self.write_limits(name, &dir, limits)?;
        Ok(CgroupHandle::new(name, dir))
    }

    fn set_limits(&self, cg: &CgroupHandle, limits: &Limits) -> Result<(), CgroupError> {
        let dir = self.prepare(cg.name(), &needed(limits), false)?;
        self.write_limits(cg.name(), &dir, limits)
    }

    fn attach(&self, cg: &CgroupHandle, pid: Pid) -> Result<(), CgroupError> {
        let file = cg.path().join(CGROUP_PROCS);
        self.fs.write(&file, &pid.to_string()).ctx(cg.name(), "attaching a process to", &file)
    }

    fn memory_events(&self, cg: &CgroupHandle) -> Result<MemoryEvents, CgroupError> {
        let (file, text) = self.read(cg, MEMORY_EVENTS)?;
        parse_memory_events(&text).ok_or_else(|| parse_error(cg, file, text, "lines of \"<event> <count>\""))
    }

    fn memory_current(&self, cg: &CgroupHandle) -> Result<u64, CgroupError> {
        let (file, text) = self.read(cg, MEMORY_CURRENT)?;
        parse_u64(&text).ok_or_else(|| parse_error(cg, file, text, "a byte count"))
    }

    fn memory_max(&self, cg: &CgroupHandle) -> Result<Option<u64>, CgroupError> {
        let (file, text) = self.read(cg, MEMORY_MAX)?;
        parse_max(&text).ok_or_else(|| parse_error(cg, file, text, "a byte count or \"max\""))
    }

    fn procs(&self, cg: &CgroupHandle) -> Result<Vec<u32>, CgroupError> {
        let (file, text) = self.read(cg, CGROUP_PROCS)?;
        parse_procs(&text).ok_or_else(|| parse_error(cg, file, text, "one pid per line"))
    }

    fn remove(&self, cg: &CgroupHandle) -> Result<(), CgroupError> {
        if !self.fs.exists(cg.path()) {
            return Ok(());
        }
        let pids = self.procs(cg)?;
        if !pids.is_empty() {
            return Err(CgroupError::Busy { cgroup: cg.name().to_owned(), pids });
        }
        match self.fs.remove_dir(cg.path()) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.ctx(cg.name(), "removing", cg.path()),
        }
    }
}

pub(crate) fn parse_error(cg: &CgroupHandle, file: PathBuf, content: String, expected: &'static str) -> CgroupError {
    CgroupError::Parse { cgroup: cg.name().to_owned(), file, content, expected }
}
