//! `V1Backend`: cgroup v1's memory, cpuset, cpu and blkio hierarchies, under a parent
//! cgroup (e.g. `kiln`) in each.
//!
//! cgroups-rs creates, deletes and attaches (across every mounted hierarchy, blkio before
//! memory for writeback accounting) and writes the limits it has setters for. Counters and
//! limits are read back with plain file I/O: cgroups-rs's readers turn read errors into
//! zeroes (`memory_stat`, `procs`) and `memory.oom_control` parsing panics on surprises.
//! Plain I/O also fills the gaps: memsw ordering, inherited cpuset values, `blkio.bfq.weight`.

use std::path::{Path, PathBuf};

use cgroups_rs::CgroupPid;
use cgroups_rs::fs::blkio::BlkIoController;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuset::CpuSetController;
use cgroups_rs::fs::hierarchies::V1;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::{Cgroup, Controller, Hierarchy};
use nix::unistd::Pid;

use super::error::IoContext;
use super::v2::parse_error;
use super::values::{self, CPU_PERIOD_US, WEIGHT_DEFAULT, cpuset_list, parse_flat_keyed, parse_procs, parse_u64};
use super::{CGROUP_PROCS, CgroupBackend, CgroupError, CgroupFs, CgroupHandle, Limits, MemoryEvents, RealFs, Version};

const MEMORY: &str = "memory";
const CPUSET: &str = "cpuset";
const CPU: &str = "cpu";
const BLKIO: &str = "blkio";
const CONTROLLERS: [&str; 4] = [MEMORY, CPUSET, CPU, BLKIO];

const MEMORY_LIMIT_IN_BYTES: &str = "memory.limit_in_bytes";
const MEMORY_SOFT_LIMIT_IN_BYTES: &str = "memory.soft_limit_in_bytes";
const MEMORY_MEMSW_LIMIT_IN_BYTES: &str = "memory.memsw.limit_in_bytes";
const MEMORY_SWAPPINESS: &str = "memory.swappiness";
const MEMORY_USAGE_IN_BYTES: &str = "memory.usage_in_bytes";
const MEMORY_OOM_CONTROL: &str = "memory.oom_control";
const MEMORY_FAILCNT: &str = "memory.failcnt";
const MEMORY_MEMSW_FAILCNT: &str = "memory.memsw.failcnt";
const OOM_KILL: &str = "oom_kill";
const CPUSET_CPUS: &str = "cpuset.cpus";
const CPUSET_MEMS: &str = "cpuset.mems";
const CPU_SHARES: &str = "cpu.shares";
const CPU_CFS_QUOTA_US: &str = "cpu.cfs_quota_us";
const BLKIO_WEIGHT: &str = "blkio.weight";
/// BFQ's weight under v1: same 1-1000 scale as io.weight up to 1000, default 100.
const BLKIO_BFQ_WEIGHT: &str = "blkio.bfq.weight";
const BFQ_WEIGHT_MAX: u32 = 1000;

/// cgroup v1, rooted at `<mount>/<parent>` in each of the memory, cpuset, cpu and blkio
/// hierarchies that are mounted (memory is required). Handles' paths are in the memory
/// hierarchy.
#[derive(Debug)]
pub struct V1Backend {
    hier: V1,
    parent: String,
    controllers: Vec<String>,
    memory_mount: PathBuf,
}

impl V1Backend {
    /// Finds the hierarchies in /proc/self/mountinfo; creates nothing yet.
    pub fn new(parent_name: &str) -> Result<Self, CgroupError> {
        super::components(parent_name)?;
        let hier = V1::new();
        let mounted = hier.subsystems();
        let memory_mount = mounted
            .iter()
            .find(|s| s.controller_name() == MEMORY)
            .map(|s| s.to_controller().path().to_owned())
            .ok_or(CgroupError::NotMounted { controller: MEMORY })?;
        let controllers =
            mounted.iter().map(|s| s.controller_name()).filter(|n| CONTROLLERS.contains(&n.as_str())).collect();
        Ok(V1Backend { hier, parent: parent_name.to_owned(), controllers, memory_mount })
    }

    /// The parent cgroup's directory in the memory hierarchy.
    pub fn root(&self) -> PathBuf {
        self.memory_mount.join(&self.parent)
    }

    fn load(&self, name: &str) -> Result<Cgroup, CgroupError> {
        super::components(name)?;
        let path = format!("{}/{name}", self.parent);
        Ok(Cgroup::load_with_specified_controllers(Box::new(self.hier.clone()), path, self.controllers.clone()))
    }

    /// v1 refuses tasks in a cpuset whose cpus or mems are empty, and a new cpuset starts
    /// empty. cgroups-rs copies them from the parent on create but only logs failures, so
    /// check each level from the top and copy what is still missing.
    fn inherit_cpuset(&self, name: &str, cpuset: &CpuSetController) -> Result<(), CgroupError> {
        let depth = self.parent.split('/').count() + name.split('/').count();
        let levels: Vec<&Path> = cpuset.path().ancestors().take(depth).collect();
        for dir in levels.into_iter().rev() {
            for file in [CPUSET_CPUS, CPUSET_MEMS] {
                if read(name, &dir.join(file))?.trim().is_empty() {
                    let value = read(name, &parent_file(dir, file))?;
                    write(name, &dir.join(file), value.trim())?;
                }
            }
        }
        Ok(())
    }

    fn set_memory(&self, name: &str, mem: &MemController, limits: &Limits) -> Result<(), CgroupError> {
        let dir = mem.path();
        let limit = as_v1(limits.memory_max_bytes);
        let set_limit = || lib(mem.set_limit(limit), name, dir.join(MEMORY_LIMIT_IN_BYTES));
        let memsw_file = dir.join(MEMORY_MEMSW_LIMIT_IN_BYTES);
        if memsw_file.exists() {
            // memory.limit_in_bytes may never exceed memsw: raise memsw first, lower it last.
            let memsw = values::v1_memsw_limit(limits.memory_max_bytes, limits.swap_max_bytes);
            let current = parse_u64(&read(name, &memsw_file)?).and_then(values::v1_limit);
            let set_memsw = || lib(mem.set_memswap_limit(as_v1(memsw)), name, memsw_file.clone());
            if memsw.unwrap_or(u64::MAX) >= current.unwrap_or(u64::MAX) {
                set_memsw()?;
                set_limit()?;
            } else {
                set_limit()?;
                set_memsw()?;
            }
        } else {
            set_limit()?;
            match limits.swap_max_bytes {
                // Without swap accounting the next best thing to "no swap" is not swapping.
                Some(0) => lib(mem.set_swappiness(0), name, dir.join(MEMORY_SWAPPINESS))?,
                Some(_) => tracing::warn!(cgroup = name, "no swap accounting (memsw): swap-max not enforced"),
                None => {}
            }
        }
        lib(mem.set_soft_limit(as_v1(limits.memory_high_bytes)), name, dir.join(MEMORY_SOFT_LIMIT_IN_BYTES))
    }

    fn set_io_weight(
        &self,
        name: &str,
        blkio: Option<&BlkIoController>,
        weight: Option<u32>,
    ) -> Result<(), CgroupError> {
        let Some(blkio) = blkio else {
            if weight.is_some() {
                tracing::warn!(cgroup = name, "blkio hierarchy not mounted: io-weight not enforced");
            }
            return Ok(());
        };
        let dir = blkio.path();
        let w = weight.unwrap_or(WEIGHT_DEFAULT);
        if dir.join(BLKIO_WEIGHT).exists() {
            lib(blkio.set_weight(values::io_weight_to_blkio(w)), name, dir.join(BLKIO_WEIGHT))
        } else if dir.join(BLKIO_BFQ_WEIGHT).exists() {
            // cgroups-rs has no setter for BFQ's v1 file.
            write(name, &dir.join(BLKIO_BFQ_WEIGHT), &w.min(BFQ_WEIGHT_MAX).to_string())
        } else {
            if weight.is_some() {
                tracing::warn!(
                    cgroup = name,
                    "no blkio weight file (the I/O scheduler has none): io-weight not enforced"
                );
            }
            Ok(())
        }
    }

    fn memory_dir(&self, cg: &CgroupHandle) -> Result<PathBuf, CgroupError> {
        super::components(cg.name())?;
        Ok(self.root().join(cg.name()))
    }
}

impl CgroupBackend for V1Backend {
    fn version(&self) -> Version {
        Version::V1
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<CgroupHandle, CgroupError> {
        let cgroup = self.load(name)?;
        for sub in cgroup.subsystems() {
            let controller = sub.to_controller();
            lib_action(controller.create(), name, "creating", controller.path().to_owned())?;
        }
        if let Some(cpuset) = cgroup.controller_of::<CpuSetController>() {
            self.inherit_cpuset(name, cpuset)?;
        }
        let handle = CgroupHandle::new(name, self.root().join(name));
        self.set_limits(&handle, limits)?;
        Ok(handle)
    }

    fn set_limits(&self, cg: &CgroupHandle, limits: &Limits) -> Result<(), CgroupError> {
        let name = cg.name();
        let cgroup = self.load(name)?;
        let mem = cgroup.controller_of::<MemController>().ok_or(CgroupError::NotMounted { controller: MEMORY })?;
        self.set_memory(name, mem, limits)?;

        match cgroup.controller_of::<CpuSetController>() {
            Some(cpuset) => {
                let cpus = match &limits.cpus {
                    Some(cpus) => cpuset_list(cpus),
                    // v1 cannot leave cpus empty: "no limit" is the parent's set.
                    None => read(name, &parent_file(cpuset.path(), CPUSET_CPUS))?.trim().to_owned(),
                };
                lib(cpuset.set_cpus(&cpus), name, cpuset.path().join(CPUSET_CPUS))?;
            }
            None if limits.cpus.is_some() => return Err(CgroupError::NotMounted { controller: CPUSET }),
            None => {}
        }

        match cgroup.controller_of::<CpuController>() {
            Some(cpu) => {
                let shares = values::cpu_weight_to_shares(limits.cpu_weight.unwrap_or(WEIGHT_DEFAULT));
                lib(cpu.set_shares(shares), name, cpu.path().join(CPU_SHARES))?;
                let quota = limits.cpu_quota_percent.map_or(-1, |p| as_v1(Some(values::cpu_quota_us(p))));
                lib(
                    cpu.set_cfs_quota_and_period(Some(quota), Some(CPU_PERIOD_US)),
                    name,
                    cpu.path().join(CPU_CFS_QUOTA_US),
                )?;
            }
            None if limits.cpu_weight.is_some() || limits.cpu_quota_percent.is_some() => {
                return Err(CgroupError::NotMounted { controller: CPU });
            }
            None => {}
        }

        self.set_io_weight(name, cgroup.controller_of::<BlkIoController>(), limits.io_weight)
    }

    fn attach(&self, cg: &CgroupHandle, pid: Pid) -> Result<(), CgroupError> {
        let cgroup = self.load(cg.name())?;
        let pid = CgroupPid::from(u64::try_from(pid.as_raw()).unwrap_or_default());
        for sub in cgroup.subsystems() {
            let controller = sub.to_controller();
            lib_action(
                controller.add_task_by_tgid(&pid),
                cg.name(),
                "attaching a process to",
                controller.path().join(CGROUP_PROCS),
            )?;
        }
        Ok(())
    }

    fn memory_events(&self, cg: &CgroupHandle) -> Result<MemoryEvents, CgroupError> {
        let dir = self.memory_dir(cg)?;
        let file = dir.join(MEMORY_OOM_CONTROL);
        let text = read(cg.name(), &file)?;
        let fields =
            parse_flat_keyed(&text).ok_or_else(|| parse_error(cg, file, text.clone(), "\"<key> <number>\" lines"))?;
        // oom_kill appeared in kernel 4.13; before that only failcnt tells.
        let oom_kill = fields.iter().find(|(k, _)| *k == OOM_KILL).map_or(0, |(_, v)| *v);
        // A failed charge counts in exactly one of the two: memsw is tried first.
        let memsw_failcnt = dir.join(MEMORY_MEMSW_FAILCNT);
        let memsw_max = if memsw_failcnt.exists() { read_u64(cg, &memsw_failcnt)? } else { 0 };
        let max = read_u64(cg, &dir.join(MEMORY_FAILCNT))? + memsw_max;
        Ok(MemoryEvents { high: 0, max, oom: oom_kill, oom_kill })
    }

    fn memory_current(&self, cg: &CgroupHandle) -> Result<u64, CgroupError> {
        read_u64(cg, &self.memory_dir(cg)?.join(MEMORY_USAGE_IN_BYTES))
    }

    fn memory_max(&self, cg: &CgroupHandle) -> Result<Option<u64>, CgroupError> {
        read_u64(cg, &self.memory_dir(cg)?.join(MEMORY_LIMIT_IN_BYTES)).map(values::v1_limit)
    }

    fn procs(&self, cg: &CgroupHandle) -> Result<Vec<u32>, CgroupError> {
        let file = self.memory_dir(cg)?.join(CGROUP_PROCS);
        let text = read(cg.name(), &file)?;
        parse_procs(&text).ok_or_else(|| parse_error(cg, file, text, "one pid per line"))
    }

    fn remove(&self, cg: &CgroupHandle) -> Result<(), CgroupError> {
        let cgroup = self.load(cg.name())?;
        if self.memory_dir(cg)?.exists() {
            let pids = self.procs(cg)?;
            if !pids.is_empty() {
                return Err(CgroupError::Busy { cgroup: cg.name().to_owned(), pids });
            }
        }
        // Controller::delete skips missing directories and retries rmdir briefly, as runc does.
        for sub in cgroup.subsystems() {
            let controller = sub.to_controller();
            lib_action(controller.delete(), cg.name(), "removing", controller.path().to_owned())?;
        }
        Ok(())
    }
}

/// A v1 limit value: bytes, or -1 for none.
fn as_v1(value: Option<u64>) -> i64 {
    value.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

fn lib<T>(result: cgroups_rs::fs::error::Result<T>, cgroup: &str, file: PathBuf) -> Result<T, CgroupError> {
    lib_action(result, cgroup, "writing", file)
}

fn lib_action<T>(
    result: cgroups_rs::fs::error::Result<T>,
    cgroup: &str,
    action: &'static str,
    file: PathBuf,
) -> Result<T, CgroupError> {
    result.map_err(|source| CgroupError::Controller {
        cgroup: cgroup.to_owned(),
        action,
        file,
        source: Box::new(source),
    })
}

/// `file` in the parent of the cgroup directory `dir`.
fn parent_file(dir: &Path, file: &str) -> PathBuf {
    dir.parent().unwrap_or(dir).join(file)
}

fn read(cgroup: &str, file: &Path) -> Result<String, CgroupError> {
    RealFs.read(file).ctx(cgroup, "reading", file)
}

fn write(cgroup: &str, file: &Path, value: &str) -> Result<(), CgroupError> {
    RealFs.write(file, value).ctx(cgroup, "writing", file)
}

fn read_u64(cg: &CgroupHandle, file: &Path) -> Result<u64, CgroupError> {
    let text = read(cg.name(), file)?;
    parse_u64(&text).ok_or_else(|| parse_error(cg, file.to_owned(), text, "a number"))
}
