//! `NoCgroups`: the backend for machines without a writable cgroup fs. Workers run
//! without limits; the caller logs that once.

use nix::unistd::Pid;

use super::{CgroupBackend, CgroupError, CgroupHandle, Limits, MemoryEvents, Version};

/// Creates nothing and attaches nothing. Readings with a truthful answer get it (no limit,
/// no events, no processes placed); `memory_current` has none and is an error.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCgroups;

impl CgroupBackend for NoCgroups {
    fn version(&self) -> Version {
        Version::None
    }

    fn create(&self, name: &str, _limits: &Limits) -> Result<CgroupHandle, CgroupError> {
        super::components(name)?;
        Ok(CgroupHandle::new(name, ""))
    }

    fn set_limits(&self, _cg: &CgroupHandle, _limits: &Limits) -> Result<(), CgroupError> {
        Ok(())
    }

    fn attach(&self, _cg: &CgroupHandle, _pid: Pid) -> Result<(), CgroupError> {
        Ok(())
    }

    fn memory_events(&self, _cg: &CgroupHandle) -> Result<MemoryEvents, CgroupError> {
        Ok(MemoryEvents::default())
    }

    fn memory_current(&self, cg: &CgroupHandle) -> Result<u64, CgroupError> {
        Err(CgroupError::NoCgroups { cgroup: cg.name().to_owned(), what: "memory use" })
    }

    fn memory_max(&self, _cg: &CgroupHandle) -> Result<Option<u64>, CgroupError> {
        Ok(None)
    }

    fn procs(&self, _cg: &CgroupHandle) -> Result<Vec<u32>, CgroupError> {
        Ok(Vec::new())
    }

    fn remove(&self, _cg: &CgroupHandle) -> Result<(), CgroupError> {
        Ok(())
    }
}
