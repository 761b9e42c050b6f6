"""The serving measurements: decode, time to first token, response cache, prefix cache,
memory, concurrency. kilnd and llama-server take turns in every round (A B A B ...)."""

import os
import shutil
import subprocess
import threading
import time
import json

from . import procs
from .client import Conn, decode_rate, stream_quiet
from .stats import comparison, figure, percentile, median

CHAT = "/v1/chat/completions"
M = procs.MODEL_ID


def chat(user, max_tokens, system=None, **extra):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return dict({"model": M, "messages": msgs, "max_tokens": max_tokens}, **extra)


def story(i):
    # Unique per request: neither server's response cache answers, and kilnd cannot serve it
    # from its response cache either (temperature > 0 without a seed is never cached anyway).
    return f"Request {i}. Write a long, detailed story about a lighthouse keeper and a storm."


SAMPLING = {"temperature": 0.8, "top_p": 0.95}


def check(res, what):
    if res["status"] != 200 or res.get("ttft") is None:
        raise RuntimeError(f"{what}: status {res['status']} {res.get('body', '')[:300]}")
    return res


def decode(ctx, rounds):
    """Decode tokens/s: kilnd over HTTP, llama-server over HTTP, llama-bench tg128. The client
    only timestamps what arrives while the server generates (`stream_quiet`): on two cores that
    the decode threads fill, a client parsing every chunk as it comes takes its CPU time from
    the decode it measures (a device's clients are on other machines)."""
    k, ls = ctx.kilnd_main(), ctx.llama_main()
    for url in (k.url, ls.url):  # load and warm both
        check(stream_quiet(url, CHAT, chat(story(-1), 16, **SAMPLING)), "warm-up")
    kr, lr, br, lself, ktok, ltok = [], [], [], [], [], []
    for r in range(rounds):
        ctx.quiet()
        res = check(stream_quiet(k.url, CHAT, chat(story(r), 128, **SAMPLING)), "kilnd decode")
        kr.append(decode_rate(res))
        ktok.append(res["completion_tokens"])
        res = check(stream_quiet(ls.url, CHAT, chat(story(r), 128, **SAMPLING)), "llama-server decode")
        lr.append(decode_rate(res))
        ltok.append(res["completion_tokens"])
        if res.get("timings"):
            lself.append(res["timings"].get("predicted_per_second"))
        out = subprocess.run(
            [ctx.llama_bench, "-m", ctx.model, "-t", "2", "-p", "0", "-n", "128", "-r", "1", "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        br.append(json.loads(out.stdout)[0]["avg_ts"])
        ctx.log(f"decode round {r}: kilnd {kr[-1]:.1f} llama-server {lr[-1]:.1f} llama-bench {br[-1]:.1f} tok/s")
    note = (
        "one new connection per request; the client records each arrival's time and parses the stream after "
        "it ends. "
        f"tokens generated per request: kilnd {min(ktok)}-{max(ktok)}, llama-server {min(ltok)}-{max(ltok)} "
        f"(max_tokens 128; both may stop at end of text). llama-server's own timings.predicted_per_second: "
        f"median {median([x for x in lself if x]) or 0:.1f} tok/s"
    )
    return [
        comparison("decode vs llama-bench tg128", "tok/s", "higher", kr, "llama-bench", br, (">=", 0.97), note),
        comparison("decode vs llama-server", "tok/s", "higher", kr, "llama-server", lr, (">=", 1.0), note),
    ], {"kilnd": kr, "llama_server": lr, "llama_bench": br, "llama_server_self": lself}


def ttft(ctx, rounds):
    """Time to first token: not loaded (weights only on disk, evicted from the page cache), in
    the hot tier (tmpfs), loaded."""
    st = ctx.state("ttft")
    spec = procs.device(st, ctx.model)
    store = procs.store_file(st)
    hot_st = ctx.state("ttft-hot")
    hot_spec = procs.device(hot_st, ctx.model)
    ctx.tmpfs(procs.hot_dir(hot_st), "256M")
    out = subprocess.run([ctx.kilnd, "--spec", hot_spec, "--state-dir", hot_st, "prewarm", "--now", M],
                         capture_output=True, text=True, check=True)
    hot_file = ctx.hot_file(hot_st)
    ctx.log(f"hot tier: {out.stdout.strip()} -> {hot_file}")
    s = {k: [] for k in ["k_cold_req", "k_cold_proc", "l_cold", "k_hot_req", "k_hot_proc", "l_hot", "k_loaded", "l_loaded"]}
    port = ctx.port()
    for r in range(rounds):
        ctx.quiet()
        # not loaded: weights in the store, out of the page cache.
        left = procs.evict(store)
        k = procs.Kilnd(ctx.kilnd, spec, st)
        t_req = time.perf_counter()
        res = check(Conn(k.url).stream(CHAT, chat(f"Cold {r}: hello", 8, **SAMPLING)), "kilnd cold")
        s["k_cold_req"].append(res["ttft"])
        s["k_cold_proc"].append(t_req - k.t_spawn + res["ttft"])
        k.stop()
        left2 = procs.evict(store)
        ls = procs.LlamaServer(ctx.llama_server, store, port, ["-c", "2048", "-np", "1"])
        t_req = time.perf_counter()
        res = check(Conn(ls.url).stream(CHAT, chat(f"Cold {r}: hello", 8, **SAMPLING)), "llama-server cold")
        s["l_cold"].append(t_req - ls.t_spawn + res["ttft"])
        ls.stop()
        # hot tier: the weights in tmpfs, no worker yet.
        k = procs.Kilnd(ctx.kilnd, hot_spec, hot_st)
        t_req = time.perf_counter()
        res = check(Conn(k.url).stream(CHAT, chat(f"Hot {r}: hello", 8, **SAMPLING)), "kilnd hot")
        s["k_hot_req"].append(res["ttft"])
        s["k_hot_proc"].append(t_req - k.t_spawn + res["ttft"])
        k.stop()
        ls = procs.LlamaServer(ctx.llama_server, hot_file, port, ["-c", "2048", "-np", "1"])
        t_req = time.perf_counter()
        res = check(Conn(ls.url).stream(CHAT, chat(f"Hot {r}: hello", 8, **SAMPLING)), "llama-server hot")
        s["l_hot"].append(t_req - ls.t_spawn + res["ttft"])
        ls.stop()
        ctx.log(f"ttft round {r}: pages left after eviction {left}/{left2}; "
                f"cold kilnd {s['k_cold_proc'][-1]:.3f} (request {s['k_cold_req'][-1]:.3f}) llama-server {s['l_cold'][-1]:.3f}; "
                f"hot kilnd {s['k_hot_proc'][-1]:.3f} llama-server {s['l_hot'][-1]:.3f}")
    # loaded: both servers up and warm.
    k, ls = ctx.kilnd_main(), ctx.llama_main()
    kc, lc = Conn(k.url), Conn(ls.url)
    for r in range(rounds * 2):
        ctx.quiet()
        s["k_loaded"].append(check(kc.stream(CHAT, chat(f"Loaded {r}: hello", 8, **SAMPLING)), "kilnd")["ttft"])
        s["l_loaded"].append(check(lc.stream(CHAT, chat(f"Loaded {r}: hello", 8, **SAMPLING)), "llama-server")["ttft"])
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    return [
        comparison("TTFT, not loaded (process start to first token)", "ms", "lower", ms(s["k_cold_proc"]),
                   "llama-server", ms(s["l_cold"]), None,
                   "weights in the store, evicted from the page cache before each round; kilnd: spawn of "
                   f"`kilnd run` to first token; request alone (kilnd already running): median "
                   f"{median(ms(s['k_cold_req'])):.0f} ms"),
        comparison("TTFT, in the hot tier (process start to first token)", "ms", "lower", ms(s["k_hot_proc"]),
                   "llama-server", ms(s["l_hot"]), None,
                   "weights in tmpfs (kilnd's hot tier; llama-server reads the same tmpfs file); request alone: "
                   f"median {median(ms(s['k_hot_req'])):.0f} ms"),
        comparison("TTFT, loaded (warm)", "ms", "lower", ms(s["k_loaded"]), "llama-server", ms(s["l_loaded"]),
                   ("<=", 1.0), "short chat prompt, streaming, time to the first content chunk"),
    ], {k2: v for k2, v in s.items()}


def response_cache(ctx, rounds):
    """A repeated deterministic request: kilnd's response-cache hit against a full generation."""
    k = ctx.kilnd_main()
    kc = Conn(k.url)
    hits, misses, bad = [], [], 0
    for r in range(rounds * 2):
        ctx.quiet()
        body = chat(f"Cache {r}: name three rivers in Europe.", 64, temperature=0)
        st, h, _, t = kc.request("POST", CHAT, body)
        if st != 200 or h.get("x-kiln-cache") != "miss":
            bad += 1
        misses.append(t * 1000)
        for _ in range(20):
            st, h, _, t = kc.request("POST", CHAT, body)
            if st != 200 or h.get("x-kiln-cache") != "hit":
                bad += 1
            hits.append(t * 1000)
    if bad:
        raise RuntimeError(f"response cache: {bad} requests without the expected x-kiln-cache header")
    p50, p99 = percentile(hits, 50), percentile(hits, 99)
    note = f"{len(hits)} hits, {len(misses)} full generations (max_tokens 64, temperature 0), one keep-alive connection"
    return [
        comparison("response cache hit vs full generation (p50)", "ms", "lower", [p50], "kilnd, full generation",
                   misses, None, note),
        figure("response cache hit p99", "ms", "lower", [p99], ("<=", 2.0), note),
    ], {"hits_ms": hits, "misses_ms": misses}


def long_system_prompt(rules=41):
    """The serve tests' bakery prompt, cut to about 1,000 tokens."""
    s = "You are the assistant of a small bakery. Follow these house rules.\n"
    for i in range(1, rules + 1):
        s += f"Rule {i}: greet customers warmly, list today's bread number {i}, and never promise delivery.\n"
    return s


def prefix_cache(ctx, rounds):
    """~1,000-token shared system prompt: TTFT with kilnd's prefix cache (restored from disk by a
    fresh worker, and reused in the same worker) vs a fresh worker without it, vs llama-server's
    cache_prompt."""
    st = ctx.state("prefix")
    spec = procs.device(st, ctx.model)
    pdir = procs.prefix_dir(st)
    sysp = long_system_prompt()
    s = {k: [] for k in ["k_none", "k_disk", "k_same", "l_none", "l_cached"]}
    reused, ptoks = [], []
    ls = ctx.llama_main()
    lc = Conn(ls.url)
    n = 0

    def ask(c, cache_prompt=None):
        nonlocal n
        n += 1
        extra = {} if cache_prompt is None else {"cache_prompt": cache_prompt}
        return check(c.stream(CHAT, chat(f"Question {n}: do you deliver?", 4, system=sysp, temperature=0, **extra)),
                     "prefix")

    for r in range(rounds):
        ctx.quiet()
        # without: a fresh worker, no saved state on disk.
        shutil.rmtree(pdir, ignore_errors=True)
        k = procs.Kilnd(ctx.kilnd, spec, st)
        kc = Conn(k.url)
        check(kc.stream(CHAT, chat(f"Warm {r}", 2, temperature=0.5)), "load")
        res = ask(kc)
        assert res["headers"].get("x-kiln-prefix-cache") == "miss", res["headers"]
        s["k_none"].append(res["ttft"])
        ptoks.append(res["prompt_tokens"])
        # the same worker again, another user turn: the KV is reused in place.
        res = ask(kc)
        s["k_same"].append(res["ttft"])
        reused.append(int(res["headers"].get("x-kiln-reused-tokens", 0)))
        k.stop()
        # llama-server without prompt caching, then with it (primed by one request).
        s["l_none"].append(ask(lc, False)["ttft"])
        ask(lc, True)
        s["l_cached"].append(ask(lc, True)["ttft"])
        # with: a fresh worker restores the saved prefix from disk.
        k = procs.Kilnd(ctx.kilnd, spec, st)
        kc = Conn(k.url)
        check(kc.stream(CHAT, chat(f"Warm {r}", 2, temperature=0.5)), "load")
        res = ask(kc)
        if res["headers"].get("x-kiln-prefix-cache") != "hit":
            raise RuntimeError(f"prefix: expected a restored prefix, got {res['headers']}")
        s["k_disk"].append(res["ttft"])
        k.stop()
        ctx.log(f"prefix round {r}: kilnd none {s['k_none'][-1]*1000:.0f} disk {s['k_disk'][-1]*1000:.0f} "
                f"same-worker {s['k_same'][-1]*1000:.0f}; llama-server none {s['l_none'][-1]*1000:.0f} "
                f"cache_prompt {s['l_cached'][-1]*1000:.0f} ms")
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    note = (f"system prompt {min(ptoks)}-{max(ptoks)} prompt tokens; same-worker reuse reported "
            f"x-kiln-reused-tokens {min(reused)}-{max(reused)}")
    return [
        comparison("prefix cache: TTFT restored from disk vs without", "ms", "lower", ms(s["k_disk"]),
                   "kilnd, fresh worker without prefix cache", ms(s["k_none"]), ("<=", 0.25), note),
        comparison("prefix cache: TTFT same worker vs without", "ms", "lower", ms(s["k_same"]),
                   "kilnd, fresh worker without prefix cache", ms(s["k_none"]), ("<=", 0.25), note),
        comparison("prefix cache: kilnd restored from disk vs llama-server cache_prompt", "ms", "lower",
                   ms(s["k_disk"]), "llama-server cache_prompt=true", ms(s["l_cached"]), None, note),
        comparison("prefix cache: kilnd same worker vs llama-server cache_prompt", "ms", "lower",
                   ms(s["k_same"]), "llama-server cache_prompt=true", ms(s["l_cached"]), None, note),
        comparison("long prompt, no cache: kilnd vs llama-server cache_prompt=false", "ms", "lower",
                   ms(s["k_none"]), "llama-server cache_prompt=false", ms(s["l_none"]), None, note),
    ], s


def memory(ctx, rounds):
    """kilnd's idle RSS without workers; a loaded worker's anonymous vs file-backed memory."""
    st = ctx.state("memory")
    spec = procs.device(st, ctx.model)
    idle, anon, filem, lanon, lfile = [], [], [], [], []
    port = ctx.port()
    for r in range(rounds):
        ctx.quiet()
        k = procs.Kilnd(ctx.kilnd, spec, st)
        time.sleep(1.0)
        idle.append(procs.proc_status(k.pid)["VmRSS"] / 2**20)
        kc = Conn(k.url)
        check(kc.stream(CHAT, chat(f"Memory {r}: hello", 16, **SAMPLING)), "kilnd")
        _, _, status, _ = kc.request("GET", "/status")
        pid = status["models"][0]["worker"]["pid"]
        ps = procs.proc_status(pid)
        anon.append(ps["RssAnon"] / 2**20)
        filem.append(ps["RssFile"] / 2**20)
        k.stop()
        ls = procs.LlamaServer(ctx.llama_server, ctx.model, port, ["-c", "2048", "-np", "1"])
        check(Conn(ls.url).stream(CHAT, chat(f"Memory {r}: hello", 16, **SAMPLING)), "llama-server")
        ps = procs.proc_status(ls.pid)
        lanon.append(ps["RssAnon"] / 2**20)
        lfile.append(ps["RssFile"] / 2**20)
        ls.stop()
        ctx.log(f"memory round {r}: kilnd idle {idle[-1]:.1f} MiB; worker anon {anon[-1]:.1f} file {filem[-1]:.1f}; "
                f"llama-server anon {lanon[-1]:.1f} file {lfile[-1]:.1f} MiB")
    return [
        figure("kilnd idle RSS, no workers", "MiB", "lower", idle, ("<=", 20.0), "VmRSS from /proc 1 s after start"),
        comparison("worker anonymous memory (RssAnon)", "MiB", "lower", anon, "llama-server", lanon, None,
                   "context 2048, after one request; weights are file-backed (mmap)"),
        comparison("worker file-backed memory (RssFile)", "MiB", "lower", filem, "llama-server", lfile, None,
                   "mapped weights (and the binary's pages)"),
    ], {"idle": idle, "anon": anon, "file": filem, "l_anon": lanon, "l_file": lfile}


def concurrency(ctx, rounds, levels=(1, 2, 4, 8), per_client=3, max_tokens=64):
    """N clients at once, each sending `per_client` requests back to back. Each server is set up
    for N: llama-server with -np N slots, kilnd with `parallel: N` on the model."""
    port = ctx.port()
    rows, raw = [], {}
    seq = [0]

    def burst(url, n):
        lat, toks, codes, errs = [], [], {}, []
        lock = threading.Lock()

        def client(i):
            c = Conn(url)
            for j in range(per_client):
                if time.perf_counter() > deadline:
                    with lock:
                        errs.append("burst over its time limit: the machine is busy")
                    break
                with lock:
                    seq[0] += 1
                    q = seq[0]
                try:
                    res = c.stream(CHAT, chat(story(100000 + q), max_tokens, **SAMPLING))
                except Exception as e:  # noqa: BLE001 -- counted, not fatal
                    with lock:
                        errs.append(repr(e))
                    continue
                with lock:
                    codes[res["status"]] = codes.get(res["status"], 0) + 1
                    if res["status"] == 200:
                        lat.append(res["total"])
                        toks.append(res["completion_tokens"])

        t0 = time.perf_counter()
        # Four times what the slowest server needs on a quiet machine: past that the round is
        # lost to other work anyway, and is run again.
        deadline = t0 + 10 + 4 * n * per_client * max_tokens / 70
        ts = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
        return {"tps": sum(toks) / wall, "p99_ms": percentile(lat, 99) * 1000 if lat else None, "codes": codes,
                "errors": errs, "wall": wall, "late": any("time limit" in e for e in errs)}

    for n in levels:
        ctx.close()  # the shared servers: out of the way of this level's
        st = ctx.state(f"concurrency-{n}")
        k = procs.Kilnd(ctx.kilnd, procs.device(st, ctx.model, model_extra=f", parallel: {n}"), st)
        check(Conn(k.url).stream(CHAT, chat(story(-2), 8, **SAMPLING)), "warm")
        ls = procs.LlamaServer(ctx.llama_server, ctx.model, port, ["-c", str(2048 * n), "-np", str(n)])
        check(Conn(ls.url).stream(CHAT, chat(story(-2), 8, **SAMPLING)), "warm")
        kt, lt, kp, lp, k429, l429, kerr, lerr, foreign = [], [], [], [], 0, 0, 0, 0, []
        retried = 0
        for r in range(rounds):
            # A round whose bursts met other work on the machine (more than a third of a core
            # that is not ours) is run again, up to twice: a shared 2-core machine otherwise
            # decides these figures.
            for attempt in range(3):
                ctx.quiet()
                fa = procs.ForeignLoad([k.pid])
                a = burst(k.url, n)
                fa = fa.cores()
                ctx.quiet()
                fb = procs.ForeignLoad([ls.pid])
                b = burst(ls.url, n)
                fb = fb.cores()
                if (max(fa, fb) <= 0.33 and not a["late"] and not b["late"]) or attempt == 2:
                    break
                retried += 1
                ctx.log(f"concurrency {n} round {r}: other work on the machine ({fa:.2f}/{fb:.2f} cores), again")
            foreign.append(round(max(fa, fb), 2))
            kt.append(a["tps"]), lt.append(b["tps"]), kp.append(a["p99_ms"]), lp.append(b["p99_ms"])
            k429 += a["codes"].get(429, 0)
            l429 += b["codes"].get(429, 0)
            kerr += len([e for e in a["errors"] if "time limit" not in e]) + sum(v for c, v in a["codes"].items() if c not in (200, 429))
            lerr += len([e for e in b["errors"] if "time limit" not in e]) + sum(v for c, v in b["codes"].items() if c not in (200, 429))
            ctx.log(f"concurrency {n} round {r}: kilnd {a['tps']:.1f} tok/s p99 {a['p99_ms']:.0f} ms {a['codes']} "
                    f"| llama-server {b['tps']:.1f} tok/s p99 {b['p99_ms']:.0f} ms {b['codes']}")
        ls.stop()
        k.stop()
        note = (f"{n} clients x {per_client} requests, max_tokens {max_tokens}; 429s kilnd {k429} llama-server "
                f"{l429}; other errors kilnd {kerr} llama-server {lerr}; llama-server -np {n} -c {2048 * n}, "
                f"kilnd parallel: {n} (context 2048 each); "
                f"rounds run again for other work on the machine: {retried}; other work during the kept rounds "
                f"(cores): {foreign}")
        rows.append(comparison(f"concurrency {n}: throughput", "tok/s", "higher", kt, "llama-server", lt, None, note))
        rows.append(comparison(f"concurrency {n}: p99 latency", "ms", "lower", kp, "llama-server", lp, None, note))
        raw[n] = {"kilnd_tps": kt, "llama_tps": lt, "kilnd_p99": kp, "llama_p99": lp, "k429": k429, "l429": l429,
                  "kerr": kerr, "lerr": lerr, "foreign_cores": foreign, "retried": retried}
    return rows, raw
