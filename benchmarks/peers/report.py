"""Markdown tables and PNG plots of one side-by-side run: kvstrata beside llama.cpp and transformers.

`res` is what `run_peers.run` returns: the peers' parts plus kvstrata's (`kvstrata_single_stream`,
`kvstrata_concurrency`, `kvstrata_tau`). `engine` (optional) overrides kvstrata's parts with a dict of
the shape `goals.engine_view` builds: {"name", "single_stream": {"prefill": [{"tokens", "tps"}],
"decode": [{"depth", "tps"}]}, "concurrency": [LoadResult dicts], "tau": tau summary}; any part may be
missing. Ratios are kvstrata / peer and compare best repetitions; for latencies lower is better.
"""

from __future__ import annotations

import logging
from pathlib import Path

from benchmarks.peers.goals import best_tps, engine_view, goals, goals_table, roofline_share

logger = logging.getLogger(__name__)


def _f(x, nd: int = 1) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


def _ratio(a, b) -> str:
    return "–" if not a or not b else f"{a / b:.2f}×"


def _by(rows: list[dict] | None, key: str) -> dict:
    return {r[key]: r for r in rows or []}


# one colour per engine in every plot
_COLORS = {"llama.cpp": "C0", "transformers": "C1", "llama.cpp cache-ram 0": "C3"}


def _color(who: str) -> str:
    return _COLORS.get(who.replace("llama.cpp cache-ram on", "llama.cpp"), "C2")


def _engine(res: dict, engine: dict | None) -> dict | None:
    return engine if engine is not None else engine_view(res)


def single_stream_table(res: dict, engine: dict | None = None) -> str:
    engine = _engine(res, engine)
    ss, tf = res.get("single_stream", {}), res.get("transformers") or {}
    eng = (engine or {}).get("single_stream", {})
    name = (engine or {}).get("name", "kvstrata")
    head = "| workload | llama.cpp tok/s, mean (best) | transformers tok/s |"
    sep = "|---|---:|---:|"
    if engine:
        head += f" {name} tok/s, best (mean) | {name} / llama.cpp | {name} / transformers |"
        sep += "---:|---:|---:|"
    lines = [head + " llama.cpp / transformers |", sep + "---:|"]
    notes = []
    for kind, key, label in (("prefill", "tokens", "prefill {} tokens"), ("decode", "depth", "decode at {} context")):
        lr, tr, er = _by(ss.get(kind), key), _by(tf.get(kind), key), _by(eng.get(kind), key)
        for k in sorted(set(lr) | set(tr) | set(er)):
            lrow, t = lr.get(k), (tr.get(k) or {}).get("tps")
            lbest = best_tps(lrow)
            line = f"| {label.format(f'{k:,}')} | " + (f"{_f(lrow['tps'])} ({_f(lbest)})" if lrow else "–") + f" | {_f(t)} |"
            if engine:
                erow = er.get(k)
                ebest = best_tps(erow)
                mean = sum(erow["samples_ts"]) / len(erow["samples_ts"]) if erow and erow.get("samples_ts") else None
                line += f" {_f(ebest)} ({_f(mean)}) | {_ratio(ebest, lbest)} | {_ratio(ebest, t)} |"
                if erow and erow.get("tokens_measured", k) != k:
                    notes.append(f"{name} prefill {k:,}: measured on {erow['tokens_measured']:,} tokens (its "
                                 f"max_model_len {eng.get('max_model_len')} leaves room for the one generated token)")
            lines.append(line + f" {_ratio(lbest, t)} |")
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


def roofline_table(res: dict, engine: dict | None = None) -> str:
    """Each engine's decode rows against this machine's memory-bandwidth roofline, measured in the same run:
    what the best repetition reads (bytes one token reads: weights as stored + K/V of the context, times
    tokens/s) over the bandwidth sampled beside it, and over the run's highest sample."""
    engine = _engine(res, engine)
    bw = (res.get("ceilings") or {}).get("memory_bw_GBps")
    if not bw:
        return "(no memory-bandwidth ceiling measured in this run)"
    rows = [("llama.cpp", (res.get("single_stream") or {}).get("decode"))]
    if engine:
        rows.append((engine.get("name", "kvstrata"), (engine.get("single_stream") or {}).get("decode")))
    ceil = res.get("ceilings") or {}
    samples = ceil.get("memory_bw_samples_GBps")
    how = (f" (samples {', '.join(f'{x:.1f}' for x in samples)} GB/s; {ceil.get('method', '')})" if samples else "")
    lines = [f"Highest memory read bandwidth measured in this run: {bw:.1f} GB/s{how}.", "",
             "| engine | context | MB read per token | measured tok/s (best) | GB/s read | bandwidth sampled beside it, GB/s "
             "| share of that | share of the run's highest |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for who, dec in rows:
        for r in dec or []:
            sh = roofline_share(r, bw)
            if sh is None:
                continue
            beside = (f"{_f(sh['beside_GBps'])} | {sh['beside']:.0%}" if sh["beside"] is not None else "– | –")
            lines.append(f"| {who} | {r['depth']:,} | {r['bytes_per_token'] / 1e6:,.1f} | {_f(best_tps(r))} | "
                         f"{_f(sh['read_GBps'])} | {beside} | {sh['run']:.0%} |")
    return "\n".join(lines)


def _pcts(d: dict, nd: int = 0) -> str:
    return " / ".join(_f(d.get(p), nd) for p in ("p50", "p90", "p99"))


def _pct_ratios(a: dict, b: dict) -> str:
    return " / ".join(_ratio(a.get(p), b.get(p)) for p in ("p50", "p90", "p99"))


def _server_notes(r: dict) -> str:
    """Preemptions and non-200 chat answers from kvstrata's /metrics, plus the first error seen."""
    m = r.get("server_metrics") or {}
    if not m:
        return ""
    if "error" in m:
        return f"metrics: {m['error']}"
    pre = m.get('kvstrata_engine_counter{name="preemptions"}')
    bad = {k.split('status="')[1].rstrip('"}'): int(v) for k, v in m.items()
           if k.startswith("kvstrata_http_requests_total{") and "chat/completions" in k and 'status="200"' not in k}
    out = f"preemptions {_f(pre, 0)}" + (f"; HTTP {bad}" if bad else "")
    tiers = sorted({k.split('tier="')[1].split('"')[0] for k in m if k.startswith("kvstrata_kv_tier{")})
    for t in tiers:
        hits, blocks = m.get(f'kvstrata_kv_tier{{stat="hits",tier="{t}"}}'), m.get(f'kvstrata_kv_tier{{stat="blocks",tier="{t}"}}')
        out += f"; {t} tier: {_f(hits, 0)} block hits, {_f(blocks, 0)} blocks held"
    if r.get("server_graceful_stop") is False:
        out += "; server did not stop gracefully"
    return out + (f"; error: {r['errors'][0][:80]}" if r.get("errors") else "")


def concurrency_table(res: dict, engine: dict | None = None) -> str:
    engine = _engine(res, engine)
    name = (engine or {}).get("name", "kvstrata")
    eng, peer = _by((engine or {}).get("concurrency"), "concurrency"), _by(res.get("concurrency"), "concurrency")
    lines = [f"| streams | engine | ok / requests | tokens/s | {name} / llama.cpp | TTFT p50 / p90 / p99 ms | "
             f"{name} / llama.cpp | ITL p50 / p90 / p99 ms | {name} / llama.cpp | notes |",
             "|---:|---|---:|---:|---:|---|---|---|---|---|"]
    for c in sorted(set(eng) | set(peer)):
        base = peer.get(c)
        for who, r in (("llama.cpp", base), (name, eng.get(c))):
            if not r:
                continue
            t, i = r["ttft_ms"], r["itl_ms"]
            mine = r is not base
            rt = _ratio(r["tokens_per_s"], base["tokens_per_s"]) if mine and base else ""
            rtt = _pct_ratios(t, base["ttft_ms"]) if mine and base else ""
            ri = _pct_ratios(i, base["itl_ms"]) if mine and base else ""
            notes = _server_notes(r) if mine else ("; ".join(e[:80] for e in r.get("errors", [])[:1]))
            lines.append(f"| {c} | {who} | {r['ok']} / {r['requests']} | {_f(r['tokens_per_s'])} | {rt} | {_pcts(t)} | "
                         f"{rtt} | {_pcts(i)} | {ri} | {notes} |")
    return "\n".join(lines)


def tau_table(res: dict, engine: dict | None = None) -> str:
    engine = _engine(res, engine)
    name = (engine or {}).get("name", "kvstrata")
    rows = [("llama.cpp (--cache-ram on)", res.get("tau")), ("llama.cpp (--cache-ram 0)", res.get("tau_no_cache_ram"))]
    if engine and engine.get("tau"):
        rows.append((name, engine["tau"]))
    lines = ["| engine | sessions / ok turns of turns | wall s | gen tokens/s | prompt tokens/s | prompt cache hit | "
             "JCT mean / p50 / p90 s | turn TTFT p50 / p90 / p99 ms |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for who, t in rows:
        if not t:
            continue
        j, tt = t["jct_s"], t["turn_ttft_ms"]
        hit = "–" if t.get("cache_hit_rate") is None else f"{100 * t['cache_hit_rate']:.0f}%"
        lines.append(f"| {who} | {t['sessions']} / {t['ok_turns']} of {t.get('turns', '?')} | {_f(t['wall_s'])} | "
                     f"{_f(t['tokens_per_s'])} | {_f(t['prompt_tokens_per_s'])} | {hit} | "
                     f"{_f(j['mean'])} / {_f(j['p50'])} / {_f(j['p90'])} | {_pcts(tt)} |")
    k, base = (engine or {}).get("tau"), res.get("tau")
    if k and base:
        kj, bj = k["jct_s"], base["jct_s"]
        lines.append(f"| {name} / llama.cpp (cache on) | | {_ratio(k['wall_s'], base['wall_s'])} | "
                     f"{_ratio(k['tokens_per_s'], base['tokens_per_s'])} | "
                     f"{_ratio(k['prompt_tokens_per_s'], base['prompt_tokens_per_s'])} | "
                     f"{_ratio(k.get('cache_hit_rate'), base.get('cache_hit_rate'))} | "
                     f"{_ratio(kj['mean'], bj['mean'])} / {_ratio(kj['p50'], bj['p50'])} / {_ratio(kj['p90'], bj['p90'])} | "
                     f"{_pct_ratios(k['turn_ttft_ms'], base['turn_ttft_ms'])} |")
    if k and _server_notes(k):
        lines += ["", f"{name} server: {_server_notes(k)}."]
    return "\n".join(lines)


def commands(res: dict, engine: dict | None = None) -> list[str]:
    engine = _engine(res, engine) or {}
    cmds = ["# llama.cpp"]
    cmds += [r["command"] for k in ("prefill", "decode") for r in res.get("single_stream", {}).get(k, [])]
    cmds += [r["server_command"] for r in res.get("concurrency", [])]
    cmds += [res[k]["server_command"] for k in ("tau", "tau_no_cache_ram") if res.get(k)]
    cmds += ["# kvstrata"]
    if engine.get("single_stream", {}).get("method"):
        cmds.append(engine["single_stream"]["method"])
    cmds += [r["server_command"] for r in engine.get("concurrency", []) if r.get("server_command")]
    if (engine.get("tau") or {}).get("server_command"):
        cmds.append(engine["tau"]["server_command"])
    return cmds


def _versions(res: dict) -> str:
    v, tf = res.get("versions", {}), res.get("transformers") or {}
    k = v.get("kvstrata") or {}
    dirty = " (src/ had uncommitted changes)" if k.get("src_dirty") else ""
    return (f"kvstrata {k.get('version', k.get('kvstrata', '–'))} at commit {k.get('commit', '–')}{dirty}, torch "
            f"{k.get('torch', '–')}, engine settings `{res.get('kvstrata_engine')}` (each part's full EngineConfig is "
            f"in peers.json). llama.cpp from llama-cpp-python {v.get('llama_cpp_python', '–')} (vendored "
            f"ggml-org/llama.cpp@{v.get('llama_cpp_commit', '–')}), CPU build, 2 threads. transformers "
            f"{tf.get('transformers', '–')} / torch {tf.get('torch', '–')}, fp32, 2 threads.")


def markdown(res: dict, engine: dict | None = None) -> str:
    """The whole benchmarks/results/peers.md."""
    engine = _engine(res, engine)
    w = res.get("workloads", {})
    tf = res.get("transformers") or {}
    t = w.get("tau", {})
    runs = res.get("part_runs") or {}
    quick = sorted(k for k, r in runs.items() if r.get("quick"))
    out = [
        "# kvstrata beside llama.cpp and transformers",
        "",
        "Generated by `python -m benchmarks.peers.run_peers` (docs/peers.md); do not edit. Every engine ran the same "
        "workloads on the same GGUF in one run. Ratios are kvstrata / peer, comparing best repetitions; for "
        "latencies (TTFT, ITL, JCT, wall) lower is better.",
        "",
        f"Model `{res.get('model')}`; machine {res.get('machine')}.",
        "",
        _versions(res),
        "",
        *([f"**Smoke-test settings (`--quick`) in: {', '.join(quick)}** — not the benchmark.", ""] if quick else []),
        "## Goals",
        "",
        goals_table(goals(res, engine)),
        "",
        "## Single stream",
        "",
        single_stream_table(res, engine),
        "",
        "### Decode against the memory-bandwidth roofline",
        "",
        roofline_table(res, engine),
        "",
        f"## Concurrency ({w.get('max_tokens')} tokens per request, ~{w.get('prompt_words')}-word prompts, "
        f"streaming, ignore_eos; {w.get('slot_ctx')} KV tokens per stream for every engine)",
        "",
        concurrency_table(res, engine),
        "",
        f"## Agentic: tau-bench airline replay ({t.get('n_sessions')} sessions, {t.get('concurrency')} at a time, "
        f"tool wait {t.get('tool_wait_s')} s, ≤{t.get('max_tokens_cap')} tokens per turn)",
        "",
        tau_table(res, engine),
        "",
        "## Commands",
        "",
        "```",
        *commands(res, engine),
        "```",
        "",
        f"transformers: {tf.get('method', 'not run')}",
        "",
        f"Run time by part (s): {res.get('seconds')}.",
        "",
        "CPU contention while each part ran (load average 1/5/15 min; PSI `some` avg10 = % of the last 10 s "
        "in which a runnable task waited for a CPU). Other work on the 2 cores skews the numbers; llama.cpp's "
        "2 threads synchronise at every op and suffer most when a core is taken:",
        "",
        *[f"- {k}: before {v.get('before')}, after {v.get('after')}" for k, v in (res.get("cpu_pressure") or {}).items()],
        "",
    ]
    for p in res.get("plots", []):
        out.append(f"![{Path(p).stem}]({Path(p).name})")
    return "\n".join(out) + "\n"


def plots(res: dict, out_dir: Path, engine: dict | None = None) -> list[Path]:
    """peers_single_stream.png, peers_concurrency.png and peers_tau.png in `out_dir` (each when it has data);
    [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib not installed; no plots")
        return []
    engine = _engine(res, engine)
    name = (engine or {}).get("name", "kvstrata")
    paths = []
    ss, tf = res.get("single_stream", {}), res.get("transformers") or {}
    series = [("llama.cpp", ss), ("transformers", tf)] + ([(name, engine.get("single_stream", {}))] if engine else [])
    keys = sorted({("prefill", "tokens", r["tokens"]) for _, d in series for r in d.get("prefill", [])}, key=lambda x: x[2])
    keys += sorted({("decode", "depth", r["depth"]) for _, d in series for r in d.get("decode", [])}, key=lambda x: x[2])
    if keys:
        labels = [f"pp{k}" if kind == "prefill" else f"tg{res.get('workloads', {}).get('decode_n_gen', 128)}@d{k}"
                  for kind, _, k in keys]
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(series)
        for i, (who, data) in enumerate(series):
            vals = [best_tps(_by(data.get(kind), key).get(k)) or 0 for kind, key, k in keys]
            ax.bar([x + i * width for x in range(len(keys))], vals, width, label=who, color=_color(who))
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(keys))], labels)
        ax.set_ylabel("tokens/s (best repetition)"), ax.set_title("single stream (2 threads)"), ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "peers_single_stream.png")
        fig.savefig(paths[-1], dpi=100), plt.close(fig)
    runs = [(w, rows) for w, rows in (("llama.cpp", res.get("concurrency") or []),
                                      (name, (engine or {}).get("concurrency") or [])) if rows]
    if runs:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for who, rows in runs:
            cs = [r["concurrency"] for r in rows]
            a1.plot(cs, [r["tokens_per_s"] for r in rows], "o-", label=who, color=_color(who))
            a2.plot(cs, [r["ttft_ms"]["p50"] or float("nan") for r in rows], "o-", label=f"{who} TTFT p50", color=_color(who))
            a2.plot(cs, [r["itl_ms"]["p50"] or float("nan") for r in rows], "s--", label=f"{who} ITL p50", color=_color(who))
        a1.set_xlabel("concurrent streams"), a1.set_ylabel("aggregate tokens/s"), a1.set_ylim(bottom=0), a1.legend()
        a2.set_xlabel("concurrent streams"), a2.set_ylabel("ms"), a2.set_yscale("log"), a2.legend()
        fig.tight_layout()
        paths.append(out_dir / "peers_concurrency.png")
        fig.savefig(paths[-1], dpi=100), plt.close(fig)
    taus = [(w, t) for w, t in (("llama.cpp cache-ram on", res.get("tau")), ("llama.cpp cache-ram 0", res.get("tau_no_cache_ram")),
                                (name, (engine or {}).get("tau"))) if t]
    if taus:
        fig, ax = plt.subplots(figsize=(8, 4))
        metrics = [("wall", lambda t: t["wall_s"]), ("JCT mean", lambda t: t["jct_s"]["mean"]),
                   ("JCT p50", lambda t: t["jct_s"]["p50"]), ("JCT p90", lambda t: t["jct_s"]["p90"])]
        width = 0.8 / len(taus)
        for i, (who, t) in enumerate(taus):
            ax.bar([x + i * width for x in range(len(metrics))], [f(t) or 0 for _, f in metrics], width, label=who,
                   color=_color(who))
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend
        ax.set_xticks([x + width * (len(taus) - 1) / 2 for x in range(len(metrics))], [m for m, _ in metrics])
        ax.set_ylabel("seconds (lower is better)"), ax.set_title("tau-bench airline replay"), ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "peers_tau.png")
        fig.savefig(paths[-1], dpi=100), plt.close(fig)
    return paths
