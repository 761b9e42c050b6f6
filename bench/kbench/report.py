"""docs/benchmarks.md, .json and .png from the saved sections: every figure comes from a run."""

import json
import os

TITLES = {
    "decode": "Decode speed",
    "ttft": "Time to first token",
    "response-cache": "Response cache",
    "prefix-cache": "Prefix cache (long shared system prompt)",
    "memory": "Memory",
    "concurrency": "Concurrency",
    "prewarm": "Prewarm (store -> tmpfs hot tier)",
    "builder": "Builder",
}

# Why a figure looks the way it does: bench/explain.json, written by a person after reading
# the run, keyed by row name. Only words, no numbers: the numbers come from the run.
EXPLAIN_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "explain.json")


def fmt(v, unit=None):
    if v is None:
        return "-"
    if unit == "ratio":
        return f"{v:.3f}" if v >= 0.01 else f"{v:.2g}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def rng(lo, hi):
    return "" if lo is None else f" ({fmt(lo)}–{fmt(hi)})"


def verdict(row):
    if "target" not in row:
        return ""
    if row.get("target_met") is None:
        return "no figure"
    if row["target_met"]:
        return "met"
    t = row["target"]
    bound = float(t.split()[-1]) if t.startswith("ratio") else float(t.split()[1])
    value = row["ratio"] if t.startswith("ratio") else row["kiln"]
    off = abs(value / bound - 1) * 100
    side = "over" if value > bound else "under"
    # A miss too small to show at the figures' precision gets four places, not "0.0%".
    tiny = off < 0.05
    if t.startswith("ratio"):
        what = f"ratio {value:.4f}" if tiny else "ratio " + fmt(value, "ratio")
    else:
        what = f"{value:.4g} {row['unit']}" if tiny else f"{fmt(value)} {row['unit']}"
    return f"**missed**: {what}, {off:.{2 if tiny else 1}f}% {side} the target"


def write(repo, results_dir, order, machine, commands):
    sections = []
    for name in order:
        p = os.path.join(results_dir, f"{name}.json")
        if os.path.exists(p):
            with open(p) as f:
                sections.append(json.load(f))
    explain = {}
    if os.path.exists(EXPLAIN_FILE):
        with open(EXPLAIN_FILE) as f:
            explain = json.load(f)
    rows = [dict(r, section=s["section"]) for s in sections for r in s["rows"]]
    docs = os.path.join(repo, "docs")
    with open(os.path.join(docs, "benchmarks.json"), "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    chart(rows, os.path.join(docs, "benchmarks.png"))
    md = []
    w = md.append
    w("# Benchmarks")
    w("")
    w("kilnd and kiln against their peers on one machine, written by `bench/run` (figures also in")
    w("[benchmarks.json](benchmarks.json), ratios charted in [benchmarks.png](benchmarks.png)).")
    w("Each pair runs interleaved (A B A B ...) for several rounds; a figure is the median, with the")
    w("minimum and maximum in brackets; a **ratio is kiln's median over the peer's median from the same")
    w("run** (for times lower is better, for rates higher is better). Targets are reported, not asserted.")
    w("")
    w("## Machine")
    w("")
    w(f"- CPU: {machine['cpu']}, {machine['cores']} cores visible ({machine['cpu_flags']})")
    w(f"- RAM: {machine['ram_gib']} GiB; cgroups {machine['cgroups']}; Debian {machine.get('debian', '?')}")
    w(f"- Kernel: `{machine['kernel']}`")
    revs = sorted({s.get("revision") or "unknown" for s in sections})
    w(f"- kiln measured: commit {', '.join(f'`{r}`' for r in revs)} (each built from a `git archive` of it)")
    w(f"- llama.cpp: {os.environ.get('KILN_BENCH_ENGINES', 'see the commands below')}. The two are not the same")
    w("  llama.cpp release, so every serving ratio includes the engine's own version difference.")
    w("- Shared: another engineer's builds and a QEMU VM ran on the same 2 cores at times during the run")
    w("  (the load average before and after each section is listed below). Interleaving keeps each ratio")
    w("  fair; absolute figures are noisier than on an idle machine.")
    w("")
    w("Each section's figures come from one invocation of `bench/run` (its kiln commit and time are listed);")
    w("a ratio never mixes invocations.")
    w("")
    w("Before each round the harness waits (up to BENCH_QUIET_WAIT seconds, within a budget for the run) for the")
    w("CPUs to be at least 80% idle; the idle fraction it saw last is summarized per section (1.00 = nothing else")
    w("running).")
    w("")
    w("| section | kiln commit | rounds | run (UTC) | load average before -> after | CPU idle before rounds: median (min) |")
    w("|---|---|---|---|---|---|")
    for s in sections:
        idle = s.get("idle_before_rounds") or []
        idle_txt = f"{sorted(idle)[len(idle) // 2]:.2f} ({min(idle):.2f})" if idle else "-"
        w(f"| {TITLES.get(s['section'], s['section'])} | {(s.get('revision') or '?')[:10]} | {s['rounds']} | {s['started']} – {s['finished'][11:]} | "
          f"{s['loadavg_before']} -> {s['loadavg_after']} | {idle_txt} |")
    w("")
    w("## Targets")
    w("")
    w("| measurement | kiln | peer | ratio | target | result |")
    w("|---|---|---|---|---|---|")
    for r in rows:
        if "target" in r:
            peer = f"{r['peer']}: {fmt(r['peer_value'])} {r['unit']}" if r["peer"] else "-"
            w(f"| {r['name']} | {fmt(r['kiln'])} {r['unit']} | {peer} | {fmt(r['ratio'], 'ratio')} | "
              f"{r['target']} | {verdict(r)} |")
    w("")
    for s in sections:
        w(f"## {TITLES.get(s['section'], s['section'])}")
        w("")
        w("| measurement | kiln (min–max) | peer | peer (min–max) | ratio | target |")
        w("|---|---|---|---|---|---|")
        for r in s["rows"]:
            w(f"| {r['name']} | {fmt(r['kiln'])}{rng(r['kiln_min'], r['kiln_max'])} {r['unit']} | {r['peer'] or '-'} | "
              f"{fmt(r['peer_value'])}{rng(r['peer_min'], r['peer_max'])}{' ' + r['unit'] if r['peer'] else ''} | "
              f"{fmt(r['ratio'], 'ratio')} | {r.get('target', '')} {verdict(r)} |")
        w("")
        notes = []
        for r in s["rows"]:
            n = r.get("note")
            if n and n not in notes:
                notes.append(n)
        for n in notes + (s.get("raw") or {}).get("notes", []):
            w(f"- {n}")
        for r in s["rows"]:
            if r["name"] in explain:
                w(f"- *{r['name']}*: {explain[r['name']]}")
        if s["section"] in explain:
            w("")
            w(explain[s["section"]])
        w("")
    missing = [n for n in order if n not in {s["section"] for s in sections}]
    if missing or "not-done" in explain:
        w("## Not measured")
        w("")
        for n in missing:
            w(f"- {TITLES.get(n, n)}: no saved result from a run.")
        if "not-done" in explain:
            w(explain["not-done"])
        w("")
    w("## Exact commands")
    w("")
    w("```sh")
    w(commands.rstrip())
    w("```")
    w("")
    with open(os.path.join(docs, "benchmarks.md"), "w") as f:
        f.write("\n".join(md))


def chart(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib missing; no chart")
        return
    rs = [r for r in rows if r["ratio"]]
    if not rs:
        return
    # Oriented so that right of 1.0 is always better for kiln.
    vals = [r["ratio"] if r["better"] == "higher" else 1 / r["ratio"] for r in rs]
    labels = [r["name"] if r["peer"].split()[0] in r["name"] else f"{r['name']} [{r['peer']}]" for r in rs]
    colors = []
    for r in rs:
        met = r.get("target_met")
        colors.append("#2a7" if met else "#c33" if met is False else "#58a")
    lo, hi = 0.2, 50.0
    fig, ax = plt.subplots(figsize=(12, 0.32 * len(rs) + 1.4))
    y = list(range(len(rs)))
    ax.barh(y, [min(max(v, lo), hi) for v in vals], color=colors)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi * 3)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(vals):
        ax.text(min(max(v, lo), hi), i, f" {v:,.2f}x" + (" (off scale)" if v > hi or v < lo else ""), va="center",
                fontsize=7)
    ax.set_xlabel("kiln's advantage (x, log scale): > 1 kiln better, < 1 the peer better")
    ax.set_title("kiln vs peers, ratios of medians (green: target met, red: missed, blue: no target)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
