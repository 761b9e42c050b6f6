//! `detect`: picks the backend this machine supports by probing what kilnd can actually
//! write (mount type, write access), never by checking its uid.

use std::fs;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use nix::unistd::{AccessFlags, access};

use super::{CgroupBackend, CgroupFs, NoCgroups, RealFs, V1Backend, V2Backend};

const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
const PROC_SELF_CGROUP: &str = "/proc/self/cgroup";
const CGROUP_SUBTREE_CONTROL: &str = "cgroup.subtree_control";
const CGROUP_CONTROLLERS: &str = "cgroup.controllers";
/// What a top-level kiln cgroup delegates when kilnd runs in the root cgroup.
const TOP_LEVEL_CONTROLLERS: [&str; 4] = ["cpuset", "cpu", "io", "memory"];

/// cgroup v2 if /sys/fs/cgroup is a cgroup2 mount and kilnd's own cgroup (its delegated
/// subtree) is writable; else cgroup v1 under `parent_name` if the memory hierarchy is
/// mounted and writable; else [`NoCgroups`]. Logs the choice at debug level; the caller
/// logs the consequence of `Version::None` once.
pub fn detect(parent_name: &str) -> Box<dyn CgroupBackend> {
    match v2_root(parent_name) {
        Ok(Some(root)) => {
            tracing::debug!(root = %root.display(), "using cgroup v2");
            return Box::new(V2Backend::new(root));
        }
        Ok(None) => {}
        Err(reason) => tracing::debug!(%reason, "cgroup v2 is mounted but not usable"),
    }
    match V1Backend::new(parent_name) {
        Ok(v1) => {
            let root = v1.root();
            // The parent cgroup may not exist yet: then what matters is the mount itself.
            let probe = if root.exists() { root.clone() } else { root.parent().unwrap_or(&root).to_owned() };
            match writable(&probe) {
                Ok(()) => {
                    tracing::debug!(root = %root.display(), "using cgroup v1");
                    return Box::new(v1);
                }
                Err(reason) => tracing::debug!(%reason, "cgroup v1 memory hierarchy is not writable"),
            }
        }
        Err(e) => tracing::debug!(error = %e, "cgroup v1 is not usable"),
    }
    Box::new(NoCgroups)
}

/// The root of kilnd's subtree, `None` if /sys/fs/cgroup is not cgroup2.
fn v2_root(parent_name: &str) -> Result<Option<PathBuf>, String> {
    let mount = Path::new(CGROUP_MOUNT);
    match statfs(mount) {
        Ok(st) if st.filesystem_type() == CGROUP2_SUPER_MAGIC => {}
        _ => return Ok(None),
    }
    let text = fs::read_to_string(PROC_SELF_CGROUP).map_err(|e| format!("reading {PROC_SELF_CGROUP}: {e}"))?;
    let own = own_cgroup(&text).ok_or_else(|| format!("{PROC_SELF_CGROUP} has no cgroup v2 (0::) line"))?;
    if own != "/" {
        // Delegate=yes: the unit's own cgroup is ours to subdivide.
        let root = mount.join(own.trim_start_matches('/'));
        writable(&root)?;
        writable(&root.join(CGROUP_SUBTREE_CONTROL))?;
        return Ok(Some(root));
    }
    // In the root cgroup (no systemd): make a top-level cgroup of our own. The root cgroup
    // is exempt from "no internal processes", so it can delegate controllers to it.
    super::components(parent_name).map_err(|e| e.to_string())?;
    writable(mount)?;
    let root = mount.join(parent_name);
    if let Err(e) = fs::create_dir(&root)
        && e.kind() != std::io::ErrorKind::AlreadyExists
    {
        return Err(format!("creating {}: {e}", root.display()));
    }
    let offered = fs::read_to_string(mount.join(CGROUP_CONTROLLERS)).unwrap_or_default();
    let enable: Vec<String> = TOP_LEVEL_CONTROLLERS
        .iter()
        .filter(|c| offered.split_whitespace().any(|o| o == **c))
        .map(|c| format!("+{c}"))
        .collect();
    let file = mount.join(CGROUP_SUBTREE_CONTROL);
    if enable.is_empty() {
        return Err(format!("{} offers none of {TOP_LEVEL_CONTROLLERS:?}", mount.join(CGROUP_CONTROLLERS).display()));
    }
    RealFs.write(&file, &enable.join(" ")).map_err(|e| format!("enabling controllers in {}: {e}", file.display()))?;
    Ok(Some(root))
}

/// The cgroup v2 path in a /proc/<pid>/cgroup text ("0::/system.slice/kilnd.service").
pub(crate) fn own_cgroup(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

fn writable(path: &Path) -> Result<(), String> {
    access(path, AccessFlags::W_OK).map_err(|e| format!("{} is not writable: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_is_the_unified_line() {
        let text = "12:memory:/x\n0::/system.slice/kilnd.service\n";
        assert_eq!(own_cgroup(text), Some("/system.slice/kilnd.service"));
        assert_eq!(own_cgroup("4:memory:/\n"), None);
    }
}
