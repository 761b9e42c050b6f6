"""Medians, percentiles and ratios: every comparison is kiln's figure over the peer's, from the same run."""

import statistics


def median(xs):
    return statistics.median(xs) if xs else None


def percentile(xs, p):
    """Nearest-rank percentile (p in 0..100): with few samples p99 is the maximum, which is honest."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def summary(xs):
    return {"median": median(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None, "n": len(xs)}


def comparison(name, unit, better, kiln, peer_name, peer, target=None, note=None):
    """One row of docs/benchmarks.json. `kiln` and `peer` are lists of per-round samples (or
    one-element lists for a single figure such as a p99); the ratio is median(kiln) / median(peer)."""
    k, p = summary(kiln), summary(peer)
    ratio = k["median"] / p["median"] if k["median"] is not None and p["median"] else None
    row = {
        "name": name,
        "unit": unit,
        "better": better,
        "kiln": k["median"],
        "kiln_min": k["min"],
        "kiln_max": k["max"],
        "peer": peer_name,
        "peer_value": p["median"],
        "peer_min": p["min"],
        "peer_max": p["max"],
        "ratio": ratio,
        "rounds": min(k["n"], p["n"]),
    }
    if target is not None:
        op, bound = target
        row["target"] = f"ratio {op} {bound}"
        row["target_met"] = None if ratio is None else (ratio >= bound if op == ">=" else ratio <= bound)
    if note:
        row["note"] = note
    return row


def figure(name, unit, better, samples, target=None, note=None):
    """A kiln figure without a peer (idle RSS, cache-hit p99, rebuild time): target is absolute."""
    s = summary(samples)
    row = {
        "name": name,
        "unit": unit,
        "better": better,
        "kiln": s["median"],
        "kiln_min": s["min"],
        "kiln_max": s["max"],
        "peer": None,
        "peer_value": None,
        "peer_min": None,
        "peer_max": None,
        "ratio": None,
        "rounds": s["n"],
    }
    if target is not None:
        op, bound = target
        row["target"] = f"{op} {bound} {unit}"
        v = s["median"]
        row["target_met"] = None if v is None else (v >= bound if op == ">=" else v <= bound)
    if note:
        row["note"] = note
    return row
