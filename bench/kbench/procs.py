"""The servers under test as processes: kilnd (as its tests start it) and llama-server; page
cache control and /proc readings."""

import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request

SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_ID = "smollm2-135m"

_starts = 0


def device(state, model, supervisor="", extra="", model_extra=""):
    """A state dir with the model hard-linked into its store and a spec, as supervisor/tests/serve.rs does."""
    store = os.path.join(state, "var/lib/kiln/models")
    os.makedirs(store, exist_ok=True)
    dest = os.path.join(store, f"{SMOL_SHA}.gguf")
    if not os.path.exists(dest):
        try:
            os.link(model, dest)
        except OSError:
            shutil.copyfile(model, dest)
    size = os.path.getsize(model)
    spec = f"""api-version: kiln/v1
name: kiln-bench
hardware: {{ board: generic-x86_64, ram: 4GiB }}
system: {{ timezone: UTC }}
memory:
  tmpfs: {{ path: /var/cache/kiln/hot, size: 256MiB }}
models:
  - {{ id: {MODEL_ID}, sha256: {SMOL_SHA}, size: {size}, context: 2048, threads: 2, pin: true{model_extra} }}
cache:
  responses: {{ memory: 16MiB, disk: 64MiB, ttl: 1h }}
  prefix: {{ size: 64MiB, ttl: 1d }}
{extra}supervisor:
  log-level: warn
{supervisor}
"""
    path = os.path.join(state, "spec.yaml")
    with open(path, "w") as f:
        f.write(spec)
    return path


class _Process:
    """A server process the harness started (`self.p`)."""

    @property
    def pid(self):
        return self.p.pid


def terminate(p):
    """SIGTERM, then SIGKILL after 15 s."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def store_file(state):
    return os.path.join(state, "var/lib/kiln/models", f"{SMOL_SHA}.gguf")


def hot_dir(state):
    return os.path.join(state, "var/cache/kiln/hot")


def prefix_dir(state):
    return os.path.join(state, "var/cache/kiln/prefix")


class Kilnd(_Process):
    """`kilnd run` on a free loopback port with its own cgroup parent; stopped with SIGTERM."""

    def __init__(self, kilnd, spec, state):
        global _starts
        _starts += 1
        self.parent = f"kiln-bench-{os.getpid()}-{_starts}"
        env = dict(os.environ, KILND_CGROUP_PARENT=self.parent)
        self.t_spawn = time.perf_counter()
        self.p = subprocess.Popen(
            [kilnd, "--spec", spec, "--state-dir", state, "run", "--listen", "127.0.0.1:0"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.log = []
        found = threading.Event()
        self.url = None

        def reader():
            for raw in self.p.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                self.log.append(line)
                if line.startswith("kilnd: listening on ") and self.url is None:
                    self.url = line[len("kilnd: listening on ") :].strip()
                    found.set()

        threading.Thread(target=reader, daemon=True).start()
        if not found.wait(60):
            self.stop()
            raise RuntimeError("kilnd did not start:\n" + "\n".join(self.log[-40:]))
        self.t_ready = time.perf_counter()

    def stop(self):
        terminate(self.p)
        remove_cgroups(self.parent)


def remove_cgroups(parent):
    """Removes the cgroup parent of one kilnd in every hierarchy, after its workers (kilnd stops
    them; one may still be exiting) are gone."""
    roots = ["/sys/fs/cgroup"] + [e.path for e in os.scandir("/sys/fs/cgroup") if e.is_dir()]
    for _ in range(50):
        left = False
        for root in roots:
            top = os.path.join(root, parent)
            if not os.path.isdir(top):
                continue
            for d, _dirs, _files in sorted(os.walk(top), key=lambda x: -len(x[0])):
                try:
                    os.rmdir(d)
                except OSError:
                    left = True
        if not left:
            return
        time.sleep(0.1)


class LlamaServer(_Process):
    """llama-server on a port; `ready` is when /health first answers 200 (after the model loaded)."""

    def __init__(self, exe, model, port, args=(), wait=True):
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [exe, "-m", model, "-t", "2", "--port", str(port), "--host", "127.0.0.1", *args]
        self.t_spawn = time.perf_counter()
        self.p = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.t_ready = None
        if wait:
            self.wait_ready()

    def wait_ready(self, poll=0.005):
        deadline = time.perf_counter() + 300
        while time.perf_counter() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.cmd}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.t_ready = time.perf_counter()
                        return
            except OSError:
                pass
            time.sleep(poll)
        raise RuntimeError("llama-server did not become ready")

    def stop(self):
        terminate(self.p)


def drop_page_cache(*paths):
    """Evicts these files from the page cache (posix_fadvise DONTNEED after an fsync): cold
    reads without disturbing the rest of a shared machine. Returns the pages still resident."""
    left = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        left += resident_pages(path)
    return left


def evict(path):
    """drop_page_cache for a cold measurement: refuses to go on when the file stays resident
    (a process that maps it, such as a server left running from something else, pins its pages,
    and the "cold" figure would be a warm one)."""
    left = drop_page_cache(path)
    size = os.path.getsize(path)
    if left > size // 100:
        users = subprocess.run(["fuser", path], capture_output=True, text=True)
        raise RuntimeError(f"{path}: {left} of {size} bytes still in the page cache after eviction; processes "
                           f"that may map it (fuser): {users.stdout.strip() or 'none found'}; stop them and rerun")
    return left


def resident_pages(path):
    out = subprocess.run(["fincore", "-nb", "-o", "RES", path], capture_output=True, text=True)
    try:
        return int(out.stdout.split()[0])
    except (IndexError, ValueError):
        return -1


def warm_page_cache(path):
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def proc_status(pid):
    """VmRSS, RssAnon, RssFile, RssShmem of a process in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            m = re.match(r"(VmRSS|RssAnon|RssFile|RssShmem|VmHWM):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2)) * 1024
    return out


def children(pid):
    """Child processes of any of pid's threads (kilnd starts workers from its runtime's threads)."""
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def machine():
    """The machine as /proc describes it."""
    info = {}
    with open("/proc/cpuinfo") as f:
        text = f.read()
    m = re.search(r"model name\s*:\s*(.+)", text)
    info["cpu"] = m.group(1).strip() if m else "unknown"
    info["cores"] = os.cpu_count()
    flags = re.search(r"flags\s*:\s*(.+)", text)
    fl = set(flags.group(1).split()) if flags else set()
    info["cpu_flags"] = " ".join(x for x in ["avx", "avx2", "fma", "f16c", "avx512f", "amx_tile"] if x in fl)
    with open("/proc/meminfo") as f:
        mt = re.search(r"MemTotal:\s+(\d+) kB", f.read())
    info["ram_gib"] = round(int(mt.group(1)) / 1024 / 1024, 1) if mt else None
    with open("/proc/version") as f:
        info["kernel"] = f.read().strip()
    try:
        with open("/etc/debian_version") as f:
            info["debian"] = f.read().strip()
    except OSError:
        pass
    info["cgroups"] = "v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "v1"
    return info


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_idle(interval=0.5):
    """Fraction of all CPUs idle over `interval` seconds (from /proc/stat)."""

    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])

    i0, t0 = sample()
    time.sleep(interval)
    i1, t1 = sample()
    return (i1 - i0) / (t1 - t0) if t1 > t0 else 0.0


def wait_quiet(min_idle, max_wait):
    """Waits (up to max_wait seconds) until the machine is mostly idle: the machine is shared, and
    llama.cpp's decode threads slow down badly when other processes want the same cores.
    Returns the idle fraction seen last."""
    deadline = time.perf_counter() + max_wait
    idle = cpu_idle()
    while idle < min_idle and time.perf_counter() < deadline:
        idle = cpu_idle()
    return idle


def _busy_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]


def _tree_jiffies(pids):
    total = 0
    for pid in pids:
        for p in [pid, *children(pid)]:
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
    return total


class ForeignLoad:
    """CPU that processes other than ours (the servers under test, their workers, this harness)
    used over an interval, in cores: the shared machine's interference during a measurement."""

    def __init__(self, pids):
        self.pids = pids
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t0 = time.perf_counter()
        self.busy0, self.ours0 = _busy_jiffies(), _tree_jiffies(pids)
        self.self0 = sum(os.times()[:2])

    def cores(self):
        dt = time.perf_counter() - self.t0
        busy = _busy_jiffies() - self.busy0
        ours = _tree_jiffies(self.pids) - self.ours0 + (sum(os.times()[:2]) - self.self0) * self.hz
        return max(0.0, (busy - ours) / self.hz / dt) if dt > 0 else 0.0
