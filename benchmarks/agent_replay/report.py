"""Figures of one replay, the markdown table across peers, and the plot.

Per peer: sessions completed per hour (a session counts when all its requests and its sub-agents' answered
before the time limit), session-equivalents per hour (each session's share of requests answered, so a
run cut by the time limit still ranks peers), prompt tokens served from cache (per tier where the server
says) and recomputed, TTFT p50 / p99 of first and of resumed turns, decode tokens/s (per request: tokens
after the first over the time after the first; aggregate: all generated tokens over the wall time).
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

from benchmarks.agent_replay.traces import Session


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile, None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 1)


def summarize(run: dict, sessions: list[Session]) -> dict:
    recs = run["records"]
    wall = run["wall_s"]
    total = {s.id: s.all_requests() for s in sessions}
    ok_by_root: dict[str, int] = {}
    failed_roots = set()
    for r in recs:
        if r["ok"]:
            ok_by_root[r["root"]] = ok_by_root.get(r["root"], 0) + 1
        elif r["error"]:
            failed_roots.add(r["root"])
    completed = [sid for sid in run["done"] if sid not in failed_roots and ok_by_root.get(sid, 0) == total[sid]]
    equiv = sum(min(1.0, ok_by_root.get(sid, 0) / n) for sid, n in total.items())
    ok = [r for r in recs if r["ok"]]
    prompt = sum(r["prompt_tokens"] for r in ok)
    cached_known = [r for r in ok if r["cached_tokens"] is not None]
    cached = sum(r["cached_tokens"] for r in cached_known)
    tiers: dict[str, int] = {}
    for r in ok:
        for t, n in (r["cached_by_tier"] or {}).items():
            tiers[t] = tiers.get(t, 0) + n
    gen = sum(r["completion_tokens"] for r in ok)
    dec = [(r["completion_tokens"] - 1) / (r["latency_s"] - r["ttft_s"]) for r in ok
           if r["completion_tokens"] > 1 and r["latency_s"] > r["ttft_s"]]
    first = [r["ttft_s"] for r in ok if r["first"]]
    resumed = [r["ttft_s"] for r in ok if not r["first"]]
    jct = [run["done"][sid] - run["started"][sid] for sid in completed]
    return {
        "wall_s": wall,
        "sessions": len(sessions), "sessions_started": len(run["started"]), "sessions_completed": len(completed),
        "sessions_per_hour": round(len(completed) / wall * 3600, 2) if wall else 0.0,
        "session_equivalents_per_hour": round(equiv / wall * 3600, 2) if wall else 0.0,
        "requests": len(recs), "requests_ok": len(ok), "requests_failed": sum(1 for r in recs if r["error"]),
        "requests_cancelled": sum(1 for r in recs if not r["ok"] and not r["error"]),
        "errors": sorted({r["error"][:200] for r in recs if r["error"]})[:5],
        "prompt_tokens": prompt,
        "reusable_tokens": sum(r.get("reusable_tokens", 0) for r in ok),
        "cached_tokens": cached if cached_known else None,
        "cached_share": round(cached / prompt, 4) if cached_known and prompt else None,
        "cached_by_tier": tiers,
        "recomputed_tokens": prompt - cached if cached_known else None,
        "generated_tokens": gen,
        "ttft_first_ms": {"n": len(first), "p50": _ms(pct(first, 50)), "p99": _ms(pct(first, 99))},
        "ttft_resumed_ms": {"n": len(resumed), "p50": _ms(pct(resumed, 50)), "p99": _ms(pct(resumed, 99))},
        "decode_tps_per_request_median": round(statistics.median(dec), 2) if dec else None,
        "decode_tps_aggregate": round(gen / wall, 2) if wall else 0.0,
        "jct_s_median": round(statistics.median(jct), 2) if jct else None,
    }


def _f(x, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}"


def peer_table(results: list[dict], baseline: str | None) -> str:
    """One row per peer; ratios of sessions per hour against `baseline` (a peer of the same run)."""
    base = next((r for r in results if r["peer"] == baseline and "summary" in r), None)
    head = ["peer", "sessions done / started", "sessions per hour", f"vs {baseline}" if baseline else "ratio",
            "session-equiv. per hour", "prompt tokens from cache (by tier)", "recomputed", "TTFT first p50 / p99 ms",
            "TTFT resumed p50 / p99 ms", "decode tok/s per request (agg.)", "peak RSS MiB", "failed / cancelled"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "summary" not in r:
            rows.append(f"| {r['peer']} | {r.get('skipped') or r.get('error', 'no result')} |" + " |" * (len(head) - 2))
            continue
        s = r["summary"]
        ratio = "-"
        if base and base["summary"]["sessions_per_hour"]:
            ratio = f"{s['sessions_per_hour'] / base['summary']['sessions_per_hour']:.2f}x"
        elif base:
            b_eq = max(base["summary"]["session_equivalents_per_hour"], 1e-9)
            ratio = f"{s['session_equivalents_per_hour'] / b_eq:.2f}x (equiv.)"
        share = "-" if s["cached_share"] is None else f"{100 * s['cached_share']:.1f} %"
        if s["cached_tokens"] is not None and s.get("reusable_tokens"):
            share += f" = {100 * s['cached_tokens'] / s['reusable_tokens']:.0f} % of the shareable"
        if s["cached_by_tier"]:
            share += " (" + ", ".join(f"{t} {n:,}" for t, n in sorted(s["cached_by_tier"].items())) + ")"
        tf, tr = s["ttft_first_ms"], s["ttft_resumed_ms"]
        rows.append("| " + " | ".join([
            r["peer"], f"{s['sessions_completed']} / {s['sessions_started']}", _f(s["sessions_per_hour"]), ratio,
            _f(s["session_equivalents_per_hour"]), share, _f(s["recomputed_tokens"]),
            f"{_f(tf['p50'], 0)} / {_f(tf['p99'], 0)}", f"{_f(tr['p50'], 0)} / {_f(tr['p99'], 0)}",
            f"{_f(s['decode_tps_per_request_median'])} ({_f(s['decode_tps_aggregate'])})",
            _f(round(r["peak_rss_bytes"] / 2**20)) if r.get("peak_rss_bytes") else "-",
            f"{s['requests_failed']} / {s['requests_cancelled']}"]) + " |")
    return "\n".join(rows)


def _labels(key: str) -> dict:
    return dict(re.findall(r'(\w+)="([^"]*)"', key))


_COUNTERS = ("preemptions", "blocks_written_down", "blocks_loaded", "blocks_load_failed")
_PAUSES = ("program_pauses", "program_resumes", "ttl_expiries", "prefetched_tokens", "prefetched_ahead_tokens")


def server_notes(metrics: dict) -> str:
    """What kvstrata's /metrics says the tiers and the placement model did (bytes moved, hits, decisions)."""
    tiers: dict[str, dict] = {}
    placement, counters = {}, {}
    for key, v in metrics.items():
        lab = _labels(key)
        if key.startswith("kvstrata_kv_tier{"):
            tiers.setdefault(lab.get("tier", "?"), {})[lab.get("stat", "?")] = v
        elif key.startswith("kvstrata_placement_decisions{"):
            placement[lab.get("action", "?")] = int(v)
        elif key.startswith("kvstrata_engine_counter{") and lab.get("name") in _COUNTERS:
            counters[lab["name"]] = int(v)
        elif key.startswith("kvstrata_session_kv{") and lab.get("what") in _PAUSES:
            counters[lab["what"]] = int(v)
    parts = [f"{t}: {d.get('bytes_written', 0) / 2**20:,.0f} MiB written, {d.get('bytes_read', 0) / 2**20:,.0f} MiB "
             f"read, {int(d.get('hits', 0)):,} hits" for t, d in sorted(tiers.items())]
    parts.append("placement decisions " + (", ".join(f"{a} {n}" for a, n in sorted(placement.items())) or "none"))
    parts += [f"{k} {n:,}" for k, n in sorted(counters.items())]
    return "; ".join(parts)


def plot(results: list[dict], path: Path, title: str) -> Path | None:
    """Sessions per hour, TTFT p50 / p99 (first, resumed) and where prompt tokens came from, per peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if "summary" in r]
    if not done:
        return None
    names = [r["peer"] for r in done]
    x = range(len(done))
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    ax[0].bar(x, [r["summary"]["sessions_per_hour"] for r in done], color="tab:blue", label="completed")
    ax[0].bar(x, [r["summary"]["session_equivalents_per_hour"] for r in done], color="none", edgecolor="k",
              linestyle="--", label="session-equivalents")
    ax[0].set_title("sessions per hour")
    ax[0].legend(fontsize=8)
    w = 0.2
    for k, (key, p, c) in enumerate([("ttft_first_ms", "p50", "tab:green"), ("ttft_first_ms", "p99", "darkgreen"),
                                     ("ttft_resumed_ms", "p50", "tab:orange"), ("ttft_resumed_ms", "p99", "darkred")]):
        ax[1].bar([i + (k - 1.5) * w for i in x], [r["summary"][key][p] or 0 for r in done], w, color=c,
                  label=f"{key.split('_')[1]} {p}")
    ax[1].set_yscale("log")
    ax[1].set_title("TTFT, ms")
    ax[1].legend(fontsize=8)
    tiers = sorted({t for r in done for t in r["summary"]["cached_by_tier"]})
    bottom = [0.0] * len(done)
    for t in tiers + ["cache (tier not reported)", "recomputed"]:
        vals = []
        for r in done:
            s = r["summary"]
            if t == "recomputed":
                v = s["recomputed_tokens"] if s["recomputed_tokens"] is not None else s["prompt_tokens"]
            elif t.startswith("cache (tier"):
                v = (s["cached_tokens"] or 0) - sum(s["cached_by_tier"].values())
            else:
                v = s["cached_by_tier"].get(t, 0)
            vals.append(v)
        color = {"recomputed": "lightgray", "cache (tier not reported)": "tab:purple"}.get(t)
        ax[2].bar(x, vals, bottom=bottom, label=t, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax[2].set_title("prompt tokens: from cache / recomputed")
    ax[2].legend(fontsize=8)
    for a in ax:
        a.set_xticks(list(x))
        a.set_xticklabels(names, rotation=15, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
