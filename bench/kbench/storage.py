"""Prewarm (store -> tmpfs with hash-on-copy vs `cat`) and the builder (build, config-only
rebuild, flash vs bmaptool)."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import json

from . import procs
from .stats import comparison, figure

HASHLIB = """
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb", buffering=0) as f:
    while b := f.read(4 << 20):
        h.update(b)
print(h.hexdigest())
"""
PREWARM_DONE = "5c0a0f1e8f6b4f43a3a1d2a8e0b7c104"  # kiln_supervisor::log::message_id::PREWARM_DONE


def prewarm(ctx, rounds):
    st = ctx.state("prewarm")
    spec = procs.device(st, ctx.model)
    hot = procs.hot_dir(st)
    ctx.tmpfs(hot, "512M")
    store = procs.store_file(st)
    check = store[: -len(".gguf")] + ".b3"
    size = os.path.getsize(store)
    plain = os.path.join(hot, "cat-copy")

    def clear_hot():
        for f in os.listdir(hot):
            os.unlink(os.path.join(hot, f))

    def run_prewarm():
        t0 = time.perf_counter()
        p = subprocess.Popen([ctx.kilnd, "--spec", spec, "--state-dir", st, "prewarm", "--now", procs.MODEL_ID],
                             env=dict(os.environ, KILND_LOG="info"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = p.communicate()
        rate = size / (time.perf_counter() - t0) / 1e6
        if p.returncode != 0:
            raise RuntimeError(f"kilnd prewarm failed: {err.decode(errors='replace')[-2000:]}")
        if not os.path.exists(ctx.hot_file(st)):
            raise RuntimeError("prewarm left no hot copy")
        os.unlink(ctx.hot_file(st))
        return rate, _prewarm_ms(p.pid, err.decode(errors="replace"))

    def page_cache(mode):
        if mode == "cold":
            procs.evict(store)
        else:
            procs.warm_page_cache(store)

    # The store's check digest (BLAKE3) as a device has it after the model came in (import,
    # fetch) or after its first prewarm: the state every later prewarm runs in.
    clear_hot()
    if os.path.exists(check):
        os.unlink(check)
    run_prewarm()
    if not os.path.exists(check):
        raise RuntimeError("kilnd prewarm recorded no check digest in the store")
    with open(check) as f:
        digest = f.read()
    rows, raw = [], {}
    for mode in ("warm", "cold"):
        k, c, own, first, h, o = [], [], [], [], [], []
        if mode == "cold":
            # One untimed read from the disk first: on a VM the first read of these blocks in a
            # long while also misses the host's cache (half speed here, whichever command comes
            # first in round 0); every timed read should find the host as the others do.
            page_cache("cold")
            with open(store, "rb") as f:
                while f.read(1 << 20):
                    pass
        def kilnd_round():
            clear_hot()
            page_cache(mode)
            rate, ms = run_prewarm()
            k.append(rate)
            if ms:
                own.append(size / (ms / 1000) / 1e6)

        def cat_round():
            page_cache(mode)
            t0 = time.perf_counter()
            subprocess.run(f"cat '{store}' > '{plain}'", shell=True, check=True)
            c.append(size / (time.perf_counter() - t0) / 1e6)
            os.unlink(plain)

        for r in range(rounds):
            ctx.quiet()
            # Who goes first alternates (A B, B A, ...): neither command always gets the place
            # right after the wait for an idle machine.
            for step in (kilnd_round, cat_round) if r % 2 == 0 else (cat_round, kilnd_round):
                step()
            # A model without a check digest yet (a built image's store): checked against the
            # sha256, recording the digest on the way.
            os.unlink(check)
            page_cache(mode)
            first.append(run_prewarm()[0])
            with open(check) as f:
                if f.read() != digest:
                    raise RuntimeError("kilnd recorded a different check digest for the same file")
            page_cache(mode)
            t0 = time.perf_counter()
            subprocess.run(["sha256sum", store], check=True, capture_output=True)
            h.append(size / (time.perf_counter() - t0) / 1e6)
            page_cache(mode)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", HASHLIB, store], check=True, capture_output=True)
            o.append(size / (time.perf_counter() - t0) / 1e6)
            ctx.log(f"prewarm {mode} round {r}: kilnd {k[-1]:.0f} MB/s (own copy timing {own[-1] if own else 0:.0f}), "
                    f"first copy (sha256) {first[-1]:.0f} MB/s, cat {c[-1]:.0f} MB/s, sha256sum {h[-1]:.0f} MB/s, "
                    f"openssl {o[-1]:.0f} MB/s")
        rows.append(comparison(f"prewarm store -> tmpfs, page cache {mode}", "MB/s", "higher", k, "cat", c,
                               (">=", 0.9),
                               f"{size / 1e6:.0f} MB GGUF; kilnd: wall time of `kilnd prewarm --now` (process start, "
                               "spec parse, copy checked on the fly against the store's BLAKE3 check digest, "
                               "fsync/rename) vs `cat STORE > TMPFS/x`"))
        if own:
            rows.append(comparison(f"prewarm copy alone (kilnd's own duration_ms), page cache {mode}", "MB/s",
                                   "higher", own, "cat", c, (">=", 0.9),
                                   "the copy as kilnd times it (PREWARM_DONE duration_ms), without process start "
                                   "and spec loading"))
        rows.append(comparison(f"first prewarm, no check digest yet (SHA-256), page cache {mode}", "MB/s", "higher",
                               first, "cat", c, None,
                               "the store's .b3 removed before the run: the copy is checked against the spec's "
                               "SHA-256 and records the BLAKE3 as it goes (a model whose store copy came without "
                               "one, as in a built image); every later prewarm is the first row"))
        rows.append(comparison(f"first prewarm vs hashing alone, page cache {mode}", "MB/s", "higher", first,
                               "sha256sum STORE", h, None,
                               "coreutils sha256sum of the same file: the speed of the hash alone, for reference"))
        rows.append(comparison(f"first prewarm vs hashing alone with SHA extensions, page cache {mode}", "MB/s",
                               "higher", first, "OpenSSL sha256 (Python hashlib)", o, None,
                               "OpenSSL's SHA-256 (uses the CPU's SHA extensions) reading the same file in 4 MiB "
                               "chunks, as a separate process: one core's hash rate, for reference"))
        raw[mode] = {"kilnd": k, "cat": c, "kilnd_own": own, "kilnd_first_sha256": first, "sha256sum": h,
                     "openssl": o}
    return rows, raw


def _prewarm_ms(pid, stderr):
    """duration_ms of kilnd's PREWARM_DONE event: from stderr, else from the journal (kilnd logs
    to journald when its socket exists)."""
    m = re.search(r"duration_ms=(\d+)", re.sub(r"\x1b\[[0-9;]*m", "", stderr))
    if m:
        return int(m.group(1))
    subprocess.run(["journalctl", "--sync"], capture_output=True)
    for _ in range(20):
        out = subprocess.run(["journalctl", "-o", "json", "--no-pager", f"_PID={pid}",
                              f"MESSAGE_ID={PREWARM_DONE}"], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            try:
                return int(json.loads(line)["DURATION_MS"])
            except (ValueError, KeyError):
                pass
        time.sleep(0.1)
    return None


def _copy_spec(ctx, src, swappiness):
    """A copy of the spec in its own directory, with models/ and secrets/ linked from the original's."""
    d = ctx.state(f"spec-swappiness-{swappiness}")
    base = os.path.dirname(os.path.abspath(src))
    for sub in ("models", "secrets", "images"):
        link = os.path.join(d, sub)
        if os.path.exists(os.path.join(base, sub)) and not os.path.lexists(link):
            os.symlink(os.path.join(base, sub), link)
    with open(src) as f:
        text = f.read()
    text, n = re.subn(r"(?m)^(\s*swappiness:\s*)\d+", rf"\g<1>{swappiness}", text)
    if n != 1:
        raise RuntimeError("the spec has no memory.swappiness to change")
    path = os.path.join(d, os.path.basename(src))
    with open(path, "w") as f:
        f.write(text)
    return path


def _timed(cmd, env=None, steps=None):
    """Wall seconds of a command; with `steps` (a dict), also kiln build's own step timings."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    if steps is not None:
        for m in re.finditer(r"(?m)^\s+([0-9.]+)s  ([a-z][^(\n]*?)\s*(?:\(.*)?$", p.stdout + p.stderr):
            steps.setdefault(m.group(2), []).append(float(m.group(1)))
    return dt


def builder(ctx, rounds):
    """`kiln build` of the demo spec into a fresh output directory, then a config-only rebuild;
    `kiln flash` to a regular file vs `bmaptool copy`."""
    spec = os.path.join(ctx.src, "examples/generic-x86_64.yaml")
    kilnd = ctx.kilnd
    full, rebuild, steps = [], [], {}

    def build(spec_path, out_dir, **kw):
        return _timed([ctx.kiln, "build", spec_path, "--out", out_dir, "--kilnd", kilnd], **kw)

    # One untimed build first: on a machine whose kiln cache has no Debian base yet it is
    # bootstrapped here, so that every timed round finds it cached (the build from scratch is
    # measured on its own below).
    out = ctx.state("build-warm-up")
    shutil.rmtree(out, ignore_errors=True)
    ctx.log(f"build warm-up (base into the cache if missing): {build(spec, out):.1f} s")
    shutil.rmtree(out, ignore_errors=True)
    for r in range(rounds):
        ctx.quiet()
        out = ctx.state(f"build-{r}")
        shutil.rmtree(out, ignore_errors=True)
        full.append(build(spec, out))
        changed = _copy_spec(ctx, spec, 20 + r)
        rebuild.append(build(changed, out, steps=steps))
        ctx.log(f"build round {r}: build {full[-1]:.1f} s, config-only rebuild {rebuild[-1]:.1f} s")
    images = [f for f in os.listdir(out) if f.endswith(".img")]
    if len(images) != 1:
        raise RuntimeError(f"expected one image in {out}: {os.listdir(out)}")
    image = os.path.join(out, images[0])
    img_size = os.path.getsize(image)
    target = os.path.join(ctx.state("flash"), "disk.img")
    kf, bf = [], []
    for r in range(rounds):
        ctx.quiet()
        pair = (("kiln", [ctx.kiln, "flash", image, target, "--yes"], kf),
                ("bmaptool", [ctx.bmaptool, "copy", image, target], bf))
        # Who goes first alternates (A B, B A, ...), as in the prewarm section.
        for which, cmd, acc in pair if r % 2 == 0 else pair[::-1]:
            if os.path.exists(target):
                os.unlink(target)
            procs.warm_page_cache(image)
            acc.append(_timed(cmd))
        ctx.log(f"flash round {r}: kiln {kf[-1]:.2f} s, bmaptool {bf[-1]:.2f} s")
    # From scratch: an empty KILN_CACHE, so the Debian base is bootstrapped (mmdebstrap, from the
    # Debian mirror) and the model verified into the cache again. One round: it takes minutes.
    cold_cache = ctx.state("empty-cache")
    shutil.rmtree(cold_cache, ignore_errors=True)
    os.makedirs(cold_cache)
    cold_out = ctx.state("build-cold")
    shutil.rmtree(cold_out, ignore_errors=True)
    cold_steps = {}
    ctx.quiet()
    cold = build(spec, cold_out, env=dict(os.environ, KILN_CACHE=cold_cache), steps=cold_steps)
    shutil.rmtree(cold_cache, ignore_errors=True)
    shutil.rmtree(cold_out, ignore_errors=True)
    ctx.log(f"build from scratch: {cold:.1f} s")
    cold_txt = ", ".join(f"{k} {v[0]:.1f} s" for k, v in cold_steps.items() if k != "total")
    mk = _mkosi(ctx, spec)
    ctx.log(f"mkosi: {mk}")
    step_txt = ", ".join(f"{k} {sorted(v)[len(v) // 2]:.2f} s" for k, v in steps.items() if k != "total")
    note_b = ("the Debian base comes from kiln's cache (~/.cache/kiln/bases, built once by mmdebstrap); "
              "each round builds into an empty output directory; the build from scratch is the next row")
    note_cold = ("one round, empty KILN_CACHE and output directory: mmdebstrap bootstraps bookworm from the Debian "
                 "mirror (the packages the spec needs, the kernel included); kiln's own step timings: " + cold_txt)
    rows = [
        figure("kiln build, \"cold\": empty output directory, Debian base cached", "s", "lower", full, None, note_b),
        figure("kiln build, config-only rebuild (memory.swappiness changed)", "s", "lower", rebuild, ("<=", 15.0),
               "same output directory, right after the full build; kiln's own step timings (median): " + step_txt),
        comparison("flash image to a regular file", "s", "lower", kf, "bmaptool copy", bf, ("<=", 1.0),
                   f"image {img_size / 2**20:.0f} MiB (sparse; the .img.bmap next to it drives both); image in the "
                   "page cache; target removed before each run; who goes first alternates by round; ratio is time (<= 1.0 means kiln is as fast or faster)"),
    ]
    notes = []
    if mk["ok"]:
        rows.append(comparison("build from scratch (empty caches): kiln vs mkosi", "s", "lower", [cold], "mkosi build",
                               [mk["seconds"]], None, note_cold + "; mkosi: one round, debootstrap from the same mirror"))
    else:
        rows.append(figure("kiln build from scratch (empty KILN_CACHE)", "s", "lower", [cold], None, note_cold))
        notes.append(f"{mk['version']} could not build the equivalent image here (`mkosi --force build` exited "
                     f"{mk['status']} after {mk['seconds']:.1f} s; first error: `{mk['error']}`), so it has no row. "
                     "mkosi 14 formats gpt_ext4 images on a loop device and mounts the partitions to fill them (the "
                     "ESP too, as vfat); kiln fills its filesystems without mounting anything (mke2fs -d, mtools), "
                     "which is also why it builds on this machine, whose kernel cannot mount vfat.")
    return rows, {"build": full, "rebuild": rebuild, "flash_kiln": kf, "flash_bmaptool": bf, "image_bytes": img_size,
                  "rebuild_steps": steps, "cold": cold, "cold_steps": cold_steps, "mkosi": mk, "notes": notes}


# kiln's Debian base beyond minbase (builder/src/base/debian.rs BASE_PACKAGES + the kernel).
KILN_BASE_PACKAGES = ["systemd", "systemd-sysv", "udev", "dbus", "systemd-zram-generator", "systemd-boot-efi", "kmod",
                      "iproute2", "linux-image-cloud-amd64"]


def _mkosi(ctx, spec):
    """One `mkosi build` of the image kiln builds from `spec`: the same Debian suite and packages,
    the rendered generation, kilnd and the model as extra trees, a bootable gpt_ext4 disk."""
    d = ctx.state("mkosi")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    extra = os.path.join(d, "extra")
    subprocess.run([ctx.kiln, "render", spec, "--out", extra], check=True, capture_output=True)
    os.makedirs(os.path.join(extra, "usr/bin"), exist_ok=True)
    shutil.copy2(ctx.kilnd, os.path.join(extra, "usr/bin/kilnd"))
    store = os.path.join(extra, "var/lib/kiln/models")
    os.makedirs(store, exist_ok=True)
    h = hashlib.sha256()
    with open(ctx.model, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    dest = os.path.join(store, f"{h.hexdigest()}.gguf")
    try:
        os.link(ctx.model, dest)
    except OSError:
        shutil.copy2(ctx.model, dest)
    with open(os.path.join(extra, "etc/kiln/packages.list")) as f:
        packages = sorted(set(KILN_BASE_PACKAGES) | {p.strip() for p in f if p.strip()})
    with open(os.path.join(d, "mkosi.default"), "w") as f:
        f.write("[Distribution]\nDistribution=debian\nRelease=bookworm\nMirror=http://deb.debian.org/debian\n\n"
                "[Output]\nFormat=gpt_ext4\nBootable=yes\nOutput=image.raw\n\n"
                f"[Content]\nPackages={','.join(packages)}\nExtraTrees=extra\n")
    version = subprocess.run([ctx.mkosi, "--version"], capture_output=True, text=True).stdout.strip()
    t0 = time.perf_counter()
    try:
        p = subprocess.run([ctx.mkosi, "--force", "build"], cwd=d, capture_output=True, text=True, timeout=3600)
        status, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        status, out = "timeout", str(e)
    secs = time.perf_counter() - t0
    ok = status == 0 and os.path.exists(os.path.join(d, "image.raw"))
    # What failed first: a tool's own message (mount: ...), else the first exception line.
    lines = [l.strip() for l in out.splitlines()]
    first = [l for l in lines if re.match(r"^(mount|umount|mkfs[.\w]*|losetup|debootstrap|E):", l)]
    errors = [l for l in lines if "Error" in l or "error:" in l or "returned non-zero" in l]
    error = (first or errors or lines[-1:] or ["no output"])[0][:400]
    return {"ok": ok, "status": status, "seconds": secs, "version": version, "error": error}
