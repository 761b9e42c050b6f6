"""Runs the sections (all, or BENCH_SECTIONS=a,b), saves each one's figures under the cache,
and writes docs/benchmarks.{md,json,png} from every saved section."""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
import atexit

from . import procs, report, serving, storage

SECTIONS = {
    "memory": serving.memory,
    "decode": serving.decode,
    "ttft": serving.ttft,
    "response-cache": serving.response_cache,
    "prefix-cache": serving.prefix_cache,
    "concurrency": serving.concurrency,
    "prewarm": storage.prewarm,
    "builder": storage.builder,
}
ROUNDS = {"builder": 3, "concurrency": 3}
# Sections cheap enough to run more rounds than the default, whose rounds vary most: prewarm's
# cold rows (the disk's speed varies from read to read) and decode (a round is one request of 128
# tokens on a 2-core machine: +-5% between rounds). 2n-1 rounds, 9 by default.
MORE_ROUNDS = {"prewarm", "decode"}


class Ctx:
    def __init__(self, a):
        self.repo, self.src, self.model, self.kilnd, self.kiln = a.repo, a.src, a.model, a.kilnd, a.kiln
        self.llama_server, self.llama_bench, self.bmaptool = a.llama_server, a.llama_bench, a.bmaptool
        self.mkosi = a.mkosi
        self.work = os.path.join(a.cache, "work")
        self.results = os.path.join(a.cache, "results")
        os.makedirs(self.results, exist_ok=True)
        self.mounts, self._kilnd, self._llama = [], None, None
        self.idle = []
        self.quiet_wait = float(os.environ.get("BENCH_QUIET_WAIT", "60"))
        self.quiet_budget = float(os.environ.get("BENCH_QUIET_BUDGET", "1200"))

    def quiet(self):
        """Before a round: wait for the shared machine to be mostly idle (within a total budget
        for the whole run, BENCH_QUIET_BUDGET seconds); record how idle it was."""
        t0 = time.perf_counter()
        idle = procs.wait_quiet(0.8, min(self.quiet_wait, max(self.quiet_budget, 0)))
        self.quiet_budget -= time.perf_counter() - t0
        self.idle.append(round(idle, 2))

    def log(self, msg):
        print(f"bench: {msg}", flush=True)

    def state(self, name):
        d = os.path.join(self.work, name)
        os.makedirs(d, exist_ok=True)
        return d

    def tmpfs(self, path, size):
        os.makedirs(path, exist_ok=True)
        if subprocess.run(["mountpoint", "-q", path]).returncode != 0:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)
            self.mounts.append(path)

    def hot_file(self, state):
        return os.path.join(procs.hot_dir(state), f"{procs.SMOL_SHA}.gguf")

    def port(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def kilnd_main(self):
        if self._kilnd is None:
            st = self.state("main")
            self._kilnd = procs.Kilnd(self.kilnd, procs.device(st, self.model), st)
        return self._kilnd

    def llama_main(self):
        if self._llama is None:
            self._llama = procs.LlamaServer(self.llama_server, self.model, self.port(), ["-c", "2048", "-np", "1"])
        return self._llama

    def close(self):
        for p in (self._kilnd, self._llama):
            if p is not None:
                p.stop()
        self._kilnd = self._llama = None
        for m in reversed(self.mounts):
            subprocess.run(["umount", m])
        self.mounts = []


def main():
    ap = argparse.ArgumentParser()
    for opt in ("repo", "src", "cache", "model", "kilnd", "kiln", "llama-server", "llama-bench", "bmaptool", "mkosi", "commands"):
        ap.add_argument(f"--{opt}", required=True)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "5")))
    ap.add_argument("--sections", default=os.environ.get("BENCH_SECTIONS", ",".join(SECTIONS)))
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    ctx = Ctx(a)
    atexit.register(ctx.close)
    failed = []
    if not a.report_only:
        shutil.rmtree(ctx.work, ignore_errors=True)
        for name in [s for s in a.sections.split(",") if s]:
            fn = SECTIONS[name]
            rounds = 2 * a.rounds - 1 if name in MORE_ROUNDS else min(a.rounds, ROUNDS.get(name, a.rounds))
            ctx.log(f"== {name} ({rounds} rounds), load average {procs.loadavg()}")
            started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            la0 = procs.loadavg()
            ctx.idle = []
            try:
                rows, raw = fn(ctx, rounds)
            except Exception:  # noqa: BLE001 -- one section failing must not lose the others
                traceback.print_exc()
                failed.append(name)
                ctx.close()
                continue
            with open(os.path.join(ctx.results, f"{name}.json"), "w") as f:
                json.dump({"section": name, "rounds": rounds, "started": started,
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "revision": os.environ.get("KILN_BENCH_REVISION"), "loadavg_before": la0, "loadavg_after": procs.loadavg(), "idle_before_rounds": ctx.idle,
                           "rows": rows, "raw": raw},
                          f, indent=1, default=str)
            # Each section starts from fresh servers.
            ctx.close()
        ctx.close()
    with open(a.commands) as f:
        commands = f.read()
    report.write(a.repo, ctx.results, list(SECTIONS), procs.machine(), commands)
    if failed:
        print(f"bench: sections failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
