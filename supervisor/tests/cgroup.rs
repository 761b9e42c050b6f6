//! Cgroup backends: v1 on the machine's real hierarchies (probed; skipped without a writable
//! memory controller), v2 against a plain directory that imitates cgroupfs, and `detect`.

use std::fs;
use std::io::{self, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_supervisor::cgroup::{
    CgroupBackend, CgroupError, CgroupFs, CgroupHandle, Limits, MemoryEvents, NoCgroups, V1Backend, V2Backend, Version,
    detect,
};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use nix::unistd::{AccessFlags, Pid, access};

const MIB: u64 = 1 << 20;
const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
const V1_MEMORY: &str = "/sys/fs/cgroup/memory";

/// True (go ahead) when cgroup v1's memory controller is writable; otherwise prints SKIP,
/// or fails when KILN_REQUIRE_TOOLS=1.
fn v1_available(test: &str) -> bool {
    let usable = v1_writable();
    if !usable {
        assert!(
            std::env::var("KILN_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "{test}: no writable cgroup v1 memory controller (KILN_REQUIRE_TOOLS=1)"
        );
        println!("SKIP {test}: no writable cgroup v1 memory controller");
    }
    usable
}

fn v1_writable() -> bool {
    Path::new(V1_MEMORY).join("cgroup.procs").exists() && access(V1_MEMORY, AccessFlags::W_OK).is_ok()
}

/// Kills the test's processes and removes `<every v1 mount>/<top>` bottom-up, so a failed
/// assertion leaves nothing behind.
struct V1Cleanup {
    top: String,
    children: Vec<Child>,
}

impl V1Cleanup {
    fn new(top: String) -> Self {
        V1Cleanup { top, children: Vec::new() }
    }

    fn leftovers(&self) -> Vec<PathBuf> {
        let Ok(mounts) = fs::read_dir(CGROUP_MOUNT) else { return Vec::new() };
        mounts.flatten().map(|m| m.path().join(&self.top)).filter(|p| p.exists()).collect()
    }
}

impl Drop for V1Cleanup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in self.leftovers() {
            remove_tree(&dir);
        }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())).trim().to_owned()
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"))
}

/// Kills whatever is left in `cg` and waits (bounded) until it is empty.
fn drain(backend: &dyn CgroupBackend, cg: &CgroupHandle) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = backend.procs(cg).expect("reading cgroup.procs");
        if pids.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{} still holds {pids:?}", cg.name());
        for pid in pids {
            let _ = kill(Pid::from_raw(i32::try_from(pid).expect("pids fit in i32")), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            return status;
        }
        assert!(Instant::now() < deadline, "process {} still running after {timeout:?}", child.id());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn v1_worker_is_placed_and_limited() {
    if !v1_available("v1_worker_is_placed_and_limited") {
        return;
    }
    let top = format!("kiln-test-{}", std::process::id());
    let mut guard = V1Cleanup::new(top.clone());
    let backend = V1Backend::new(&top).unwrap();
    assert_eq!(backend.version(), Version::V1);

    let shared = backend.create("inference", &Limits::default()).unwrap();
    let limits = Limits { memory_max_bytes: Some(64 * MIB), cpus: Some(vec![0]), ..Limits::default() };
    let m1 = backend.create("inference/m1", &limits).unwrap();
    assert_eq!(backend.create("inference/m1", &limits).unwrap(), m1, "create is idempotent");
    let dir = Path::new(V1_MEMORY).join(&top).join("inference/m1");
    assert_eq!(m1.path(), dir);

    guard.children.push(Command::new("sleep").arg("30").spawn().unwrap());
    let pid = pid_of(&guard.children[0]);
    backend.attach(&m1, pid).unwrap();
    let pid_u32 = u32::try_from(pid.as_raw()).unwrap();
    assert_eq!(backend.procs(&m1).unwrap(), [pid_u32]);
    let placement = read(format!("/proc/{pid}/cgroup"));
    for controller in ["memory", "cpuset", "cpu"] {
        let line = format!(":{controller}:/{top}/inference/m1");
        assert!(placement.lines().any(|l| l.ends_with(&line)), "{line} not in /proc/{pid}/cgroup:\n{placement}");
    }

    assert_eq!(backend.memory_max(&m1).unwrap(), Some(64 * MIB));
    assert_eq!(backend.memory_max(&shared).unwrap(), None, "the shared parent got no limit");
    assert_eq!(read(dir.join("memory.limit_in_bytes")), (64 * MIB).to_string());
    let cpuset = Path::new(CGROUP_MOUNT).join("cpuset").join(&top).join("inference/m1");
    assert_eq!(read(cpuset.join("cpuset.cpus")), "0");
    assert!(!read(cpuset.join("cpuset.mems")).is_empty(), "cpuset.mems inherited from the parent");
    backend.memory_current(&m1).unwrap();
    assert_eq!(backend.memory_events(&m1).unwrap().oom_kill, 0);

    let busy = backend.remove(&m1).unwrap_err();
    assert!(matches!(&busy, CgroupError::Busy { pids, .. } if *pids == [pid_u32]), "{busy}");
    assert!(busy.to_string().contains("inference/m1"), "{busy}");

    // CPU weight and quota land in cpu.shares and the CFS files; clearing them resets.
    let cpu_dir = Path::new(CGROUP_MOUNT).join("cpu").join(&top).join("inference/m2");
    let m2 = backend
        .create(
            "inference/m2",
            &Limits { cpu_weight: Some(200), cpu_quota_percent: Some(250), io_weight: Some(300), ..Limits::default() },
        )
        .unwrap();
    assert_eq!(read(cpu_dir.join("cpu.shares")), "2048");
    assert_eq!(read(cpu_dir.join("cpu.cfs_quota_us")), "250000");
    assert_eq!(read(cpu_dir.join("cpu.cfs_period_us")), "100000");
    backend.set_limits(&m2, &Limits::default()).unwrap();
    assert_eq!(read(cpu_dir.join("cpu.shares")), "1024");
    assert_eq!(read(cpu_dir.join("cpu.cfs_quota_us")), "-1");
    backend.remove(&m2).unwrap();

    let mut sleeper = guard.children.remove(0);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert_eq!(backend.procs(&m1).unwrap(), Vec::<u32>::new());
    backend.remove(&m1).unwrap();
    backend.remove(&m1).unwrap(); // already gone: not an error
    backend.remove(&shared).unwrap();
    for dir in guard.leftovers() {
        // Only the parent itself, which no handle names, may remain; it must be empty.
        fs::remove_dir(&dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
    }
    assert_eq!(guard.leftovers(), Vec::<PathBuf>::new());
}

#[test]
fn v1_memory_hog_is_oom_killed() {
    if !v1_available("v1_memory_hog_is_oom_killed") {
        return;
    }
    let top = format!("kiln-test-{}-oom", std::process::id());
    let mut guard = V1Cleanup::new(top.clone());
    let backend = V1Backend::new(&top).unwrap();
    let limits = Limits { memory_max_bytes: Some(32 * MIB), swap_max_bytes: Some(0), ..Limits::default() };
    let hog = backend.create("hog", &limits).unwrap();
    let dir = Path::new(V1_MEMORY).join(&top).join("hog");
    if dir.join("memory.memsw.limit_in_bytes").exists() {
        assert_eq!(read(dir.join("memory.memsw.limit_in_bytes")), (32 * MIB).to_string(), "no swap escape");
    } else {
        assert_eq!(read(dir.join("memory.swappiness")), "0", "no swap escape without memsw");
    }

    // The hog waits for a line on stdin so that it allocates only once it is in the cgroup.
    let script = r#"read go; x=$(head -c 200000000 /dev/zero | tr "\0" a); echo "survived ${#x}""#;
    let child = Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    guard.children.push(child);
    let child = &mut guard.children[0];
    backend.attach(&hog, pid_of(child)).unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let status = wait_with_timeout(child, Duration::from_secs(120));
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "the hog was not OOM-killed: {status}");

    let events = backend.memory_events(&hog).unwrap();
    if read(dir.join("memory.oom_control")).contains("oom_kill ") {
        assert!(events.oom_kill >= 1, "memory.oom_control counts no OOM kill: {events:?}");
        assert_eq!(events.oom, events.oom_kill);
    } else {
        assert!(events.max > 0, "kernel < 4.13 has no oom_kill counter; memory.failcnt is 0 too: {events:?}");
    }
    drain(&backend, &hog);
    backend.remove(&hog).unwrap();
}

#[test]
fn detect_probes_the_machine() {
    let cgroup2 = statfs(CGROUP_MOUNT).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC);
    if cgroup2 {
        println!("SKIP detect_probes_the_machine: /sys/fs/cgroup is cgroup2 (this test expects v1 or none)");
        return;
    }
    let expected = if v1_writable() { Version::V1 } else { Version::None };
    let backend = detect(&format!("kiln-test-{}-detect", std::process::id()));
    assert_eq!(backend.version(), expected);
}

#[test]
fn no_cgroups_places_nothing() {
    let backend = NoCgroups;
    let cg = backend.create("inference/m1", &Limits { memory_max_bytes: Some(MIB), ..Limits::default() }).unwrap();
    assert_eq!(backend.version(), Version::None);
    backend.attach(&cg, Pid::this()).unwrap();
    assert_eq!(backend.memory_max(&cg).unwrap(), None);
    assert_eq!(backend.memory_events(&cg).unwrap(), MemoryEvents::default());
    assert!(matches!(backend.memory_current(&cg), Err(CgroupError::NoCgroups { .. })));
    assert!(matches!(backend.create("../x", &Limits::default()), Err(CgroupError::InvalidName { .. })));
    backend.remove(&cg).unwrap();
}

// ---- cgroup v2 against a directory that behaves like cgroupfs ----

const CONTROLLERS: &str = "cpuset cpu io memory pids";

/// A plain directory imitating a cgroup2 fs: mkdir populates the interface files of the
/// controllers the parent delegates, `cgroup.subtree_control` accepts only offered
/// controllers and refuses (EBUSY) while the cgroup holds processes, writing a pid to
/// `cgroup.procs` moves it, writes to missing files fail. Every change is logged.
#[derive(Debug, Clone)]
struct FakeCgroup2 {
    root: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl FakeCgroup2 {
    fn new(root: &Path, controllers: &str) -> Self {
        for (file, content) in
            [("cgroup.controllers", controllers), ("cgroup.subtree_control", ""), ("cgroup.procs", "")]
        {
            fs::write(root.join(file), content).expect("writing the fake root");
        }
        FakeCgroup2 { root: root.to_owned(), log: Arc::default() }
    }

    fn backend(&self) -> V2Backend {
        V2Backend::with_fs(self.root.clone(), Box::new(self.clone()))
    }

    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.root).expect("path under the fake root").display().to_string()
    }

    fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().expect("log lock"))
    }

    fn add_interface_files(dir: &Path, controller: &str) -> io::Result<()> {
        let files: &[(&str, &str)] = match controller {
            "memory" => &[
                ("memory.max", "max"),
                ("memory.high", "max"),
                ("memory.swap.max", "max"),
                ("memory.current", "0"),
                ("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"),
            ],
            "cpu" => &[("cpu.weight", "100"), ("cpu.max", "max 100000")],
            "cpuset" => &[("cpuset.cpus", ""), ("cpuset.mems", "")],
            "io" => &[("io.weight", "default 100")],
            _ => &[],
        };
        for (file, content) in files {
            if !dir.join(file).exists() {
                fs::write(dir.join(file), content)?;
            }
        }
        Ok(())
    }

    fn subdirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
        Ok(fs::read_dir(dir)?.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()).collect())
    }

    fn enable(&self, dir: &Path, request: &str) -> io::Result<()> {
        let offered = fs::read_to_string(dir.join("cgroup.controllers"))?;
        if !fs::read_to_string(dir.join("cgroup.procs"))?.trim().is_empty() {
            return Err(io::Error::from_raw_os_error(Errno::EBUSY as i32));
        }
        let mut enabled: Vec<String> =
            fs::read_to_string(dir.join("cgroup.subtree_control"))?.split_whitespace().map(str::to_owned).collect();
        for token in request.split_whitespace() {
            let c = token.strip_prefix('+').ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            if !offered.split_whitespace().any(|o| o == c) {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            if !enabled.iter().any(|e| e == c) {
                enabled.push(c.to_owned());
                for child in Self::subdirs(dir)? {
                    Self::add_interface_files(&child, c)?;
                    fs::write(child.join("cgroup.controllers"), enabled.join(" "))?;
                }
            }
        }
        enabled.sort_by_key(|c| CONTROLLERS.split(' ').position(|k| k == c));
        fs::write(dir.join("cgroup.subtree_control"), enabled.join(" "))
    }

    fn move_pid(&self, dir: &Path, pid: &str) -> io::Result<()> {
        fn strip(dir: &Path, pid: &str) -> io::Result<()> {
            let procs = dir.join("cgroup.procs");
            let kept: Vec<String> =
                fs::read_to_string(&procs)?.lines().filter(|p| *p != pid).map(|p| format!("{p}\n")).collect();
            fs::write(procs, kept.concat())?;
            FakeCgroup2::subdirs(dir)?.iter().try_for_each(|d| strip(d, pid))
        }
        strip(&self.root, pid)?;
        let procs = dir.join("cgroup.procs");
        let content = fs::read_to_string(&procs)? + pid + "\n";
        fs::write(procs, content)
    }
}

impl CgroupFs for FakeCgroup2 {
    fn read(&self, path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }

    fn write(&self, path: &Path, contents: &str) -> io::Result<()> {
        if !path.is_file() {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let dir = path.parent().expect("files have a parent");
        match path.file_name().and_then(|n| n.to_str()) {
            Some("cgroup.subtree_control") => self.enable(dir, contents)?,
            Some("cgroup.procs") => self.move_pid(dir, contents.trim())?,
            _ => fs::write(path, contents)?,
        }
        self.log.lock().expect("log lock").push(format!("write {} {contents}", self.rel(path)));
        Ok(())
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)?;
        let parent = path.parent().expect("cgroups have a parent");
        let delegated = fs::read_to_string(parent.join("cgroup.subtree_control"))?;
        fs::write(path.join("cgroup.controllers"), &delegated)?;
        fs::write(path.join("cgroup.subtree_control"), "")?;
        fs::write(path.join("cgroup.procs"), "")?;
        for c in delegated.split_whitespace() {
            Self::add_interface_files(path, c)?;
        }
        self.log.lock().expect("log lock").push(format!("mkdir {}", self.rel(path)));
        Ok(())
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        if !Self::subdirs(path)?.is_empty() || !fs::read_to_string(path.join("cgroup.procs"))?.trim().is_empty() {
            return Err(io::Error::from_raw_os_error(Errno::EBUSY as i32));
        }
        fs::remove_dir_all(path)?;
        self.log.lock().expect("log lock").push(format!("rmdir {}", self.rel(path)));
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

fn fake_v2(controllers: &str) -> (tempfile::TempDir, FakeCgroup2, V2Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeCgroup2::new(dir.path(), controllers);
    let backend = fake.backend();
    (dir, fake, backend)
}

#[test]
fn v2_enables_controllers_top_down_before_writing_limits() {
    let (_dir, fake, backend) = fake_v2(CONTROLLERS);
    let limits = Limits { memory_max_bytes: Some(64 * MIB), cpu_quota_percent: Some(250), ..Limits::default() };
    backend.create("inference/m1", &limits).unwrap();
    assert_eq!(
        fake.take_log(),
        [
            "write cgroup.subtree_control +cpu +memory",
            "mkdir inference",
            "write inference/cgroup.subtree_control +cpu +memory",
            "mkdir inference/m1",
            "write inference/m1/memory.max 67108864",
            "write inference/m1/memory.high max",
            "write inference/m1/memory.swap.max max",
            "write inference/m1/cpu.weight 100",
            "write inference/m1/cpu.max 250000 100000",
        ]
    );
    // Idempotent: nothing to enable or create the second time, the limits are rewritten.
    backend.create("inference/m1", &limits).unwrap();
    assert!(fake.take_log().iter().all(|l| l.starts_with("write inference/m1/memory.") || l.contains("/cpu.")));
}

#[test]
fn v2_limits_map_to_file_contents() {
    let (dir, _fake, backend) = fake_v2(CONTROLLERS);
    let shared = Limits { memory_max_bytes: Some(6 << 30), cpus: Some(vec![1, 2, 3]), ..Limits::default() };
    backend.create("inference", &shared).unwrap();
    let limits = Limits {
        memory_max_bytes: Some(64 * MIB),
        memory_high_bytes: Some(48 * MIB),
        swap_max_bytes: Some(0),
        cpus: Some(vec![6, 0, 1, 2, 3]),
        cpu_weight: Some(200),
        cpu_quota_percent: Some(250),
        io_weight: Some(300),
    };
    let m1 = backend.create("inference/m1", &limits).unwrap();
    assert_eq!(m1.path(), dir.path().join("inference/m1"));
    let file = |f: &str| read(dir.path().join(f));
    assert_eq!(file("cgroup.subtree_control"), "cpuset cpu io memory");
    assert_eq!(file("inference/cgroup.subtree_control"), "cpuset cpu io memory");
    assert_eq!(file("inference/memory.max"), "6442450944");
    assert_eq!(file("inference/cpuset.cpus"), "1-3");
    for (name, want) in [
        ("memory.max", "67108864"),
        ("memory.high", "50331648"),
        ("memory.swap.max", "0"),
        ("cpuset.cpus", "0-3,6"),
        ("cpu.weight", "200"),
        ("cpu.max", "250000 100000"),
        ("io.weight", "default 300"),
    ] {
        assert_eq!(file(&format!("inference/m1/{name}")), want, "{name}");
    }
    assert_eq!(backend.memory_max(&m1).unwrap(), Some(64 * MIB));

    // Clearing every limit writes the kernel's defaults.
    backend.set_limits(&m1, &Limits::default()).unwrap();
    for (name, want) in [
        ("memory.max", "max"),
        ("memory.high", "max"),
        ("memory.swap.max", "max"),
        ("cpuset.cpus", ""),
        ("cpu.weight", "100"),
        ("cpu.max", "max 100000"),
        ("io.weight", "default 100"),
    ] {
        assert_eq!(file(&format!("inference/m1/{name}")), want, "{name}");
    }
    assert_eq!(backend.memory_max(&m1).unwrap(), None);
}

#[test]
fn v2_reads_memory_events_and_usage() {
    let (dir, _fake, backend) = fake_v2(CONTROLLERS);
    let m1 = backend.create("inference/m1", &Limits::default()).unwrap();
    let events = dir.path().join("inference/m1/memory.events");
    fs::write(&events, "oom 1\noom_kill 1\nhigh 3\nmax 2\n").unwrap();
    assert_eq!(backend.memory_events(&m1).unwrap(), MemoryEvents { oom: 1, oom_kill: 1, high: 3, max: 2 });
    fs::write(dir.path().join("inference/m1/memory.current"), "123456\n").unwrap();
    assert_eq!(backend.memory_current(&m1).unwrap(), 123_456);

    fs::write(&events, "oom lots\n").unwrap();
    let err = backend.memory_events(&m1).unwrap_err();
    assert!(matches!(err, CgroupError::Parse { .. }), "{err}");
    assert!(err.to_string().contains("inference/m1/memory.events"), "{err}");
}

#[test]
fn v2_kilnd_enters_its_leaf_before_delegating() {
    let (dir, _fake, backend) = fake_v2(CONTROLLERS);
    let me = std::process::id().to_string();
    fs::write(dir.path().join("cgroup.procs"), format!("{me}\n")).unwrap(); // started by systemd
    let err = backend.create("inference/m1", &Limits::default()).unwrap_err();
    assert!(matches!(err, CgroupError::InternalProcesses { .. }), "{err}");
    assert!(err.to_string().contains("enter_leaf"), "{err}");

    let supervisor = backend.enter_leaf("supervisor").unwrap();
    assert_eq!(read(dir.path().join("cgroup.procs")), "");
    assert_eq!(backend.procs(&supervisor).unwrap(), [std::process::id()]);
    backend.create("inference/m1", &Limits::default()).unwrap();
    backend.set_limits(&supervisor, &Limits { memory_max_bytes: Some(256 * MIB), ..Limits::default() }).unwrap();
    assert_eq!(read(dir.path().join("supervisor/memory.max")), (256 * MIB).to_string());
}

#[test]
fn v2_remove_refuses_while_processes_remain() {
    let (dir, fake, backend) = fake_v2(CONTROLLERS);
    let parent = backend.create("inference", &Limits::default()).unwrap();
    let m1 = backend.create("inference/m1", &Limits::default()).unwrap();
    let prewarm = backend.create("prewarm", &Limits::default()).unwrap();
    backend.attach(&m1, Pid::from_raw(4242)).unwrap();
    assert_eq!(backend.procs(&m1).unwrap(), [4242]);

    let err = backend.remove(&m1).unwrap_err();
    assert!(matches!(&err, CgroupError::Busy { pids, .. } if *pids == [4242]), "{err}");
    assert!(backend.remove(&parent).is_err(), "a parent with a child cannot go first");

    backend.attach(&prewarm, Pid::from_raw(4242)).unwrap();
    fake.take_log();
    backend.remove(&m1).unwrap();
    backend.remove(&parent).unwrap();
    backend.remove(&m1).unwrap(); // already gone
    assert_eq!(fake.take_log(), ["rmdir inference/m1", "rmdir inference"]);
    assert!(!dir.path().join("inference").exists());
}

#[test]
fn v2_refuses_controllers_the_parent_does_not_offer_and_bad_names() {
    let (_dir, _fake, backend) = fake_v2("memory pids");
    let err = backend.create("inference/m1", &Limits { cpu_weight: Some(50), ..Limits::default() }).unwrap_err();
    assert!(matches!(err, CgroupError::ControllerUnavailable { controller: "cpu", .. }), "{err}");
    backend.create("inference/m1", &Limits { memory_max_bytes: Some(MIB), ..Limits::default() }).unwrap();
    for bad in ["../escape", "/abs", "inference//m1", "cgroup.procs"] {
        assert!(matches!(backend.create(bad, &Limits::default()), Err(CgroupError::InvalidName { .. })), "{bad}");
    }
}
