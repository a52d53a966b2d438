"""Markdown tables and PNG plots of peer results, with an optional engine column and ratios.

`res` is what `run_peers.run` returns. `engine` (optional) is kvstrata's result in the same shape:
{"name": "kvstrata", "single_stream": {"prefill": [{"tokens", "tps"}], "decode": [{"depth", "tps"}]},
 "concurrency": [LoadResult dicts], "tau": tau summary}; any part may be missing.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _f(x, nd: int = 1) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


def _ratio(a, b) -> str:
    return "–" if not a or not b else f"{a / b:.2f}×"


def _by(rows: list[dict] | None, key: str) -> dict:
    return {r[key]: r for r in rows or []}


def single_stream_table(res: dict, engine: dict | None = None) -> str:
    ss, tf = res.get("single_stream", {}), res.get("transformers") or {}
    eng = (engine or {}).get("single_stream", {})
    name = (engine or {}).get("name", "kvstrata")
    head = "| workload | llama.cpp tok/s, mean (best repetition) | transformers tok/s | llama.cpp / transformers |"
    sep = "|---|---:|---:|---:|"
    if engine:
        head += f" {name} tok/s | {name} / llama.cpp |"
        sep += "---:|---:|"
    lines = [head, sep]
    for kind, key, label in (("prefill", "tokens", "prefill {} tokens"), ("decode", "depth", "decode at {} context")):
        tfr, er = _by(tf.get(kind), key), _by(eng.get(kind), key)
        for row in ss.get(kind, []):
            k = row[key]
            t = tfr.get(k, {}).get("tps")
            best = max((row.get("raw") or {}).get("samples_ts") or [row["tps"]])
            line = (f"| {label.format(f'{k:,}')} | {_f(row['tps'])} (best {_f(best)}) | {_f(t)} | "
                    f"{_ratio(row['tps'], t)} |")
            if engine:
                e = er.get(k, {}).get("tps")
                line += f" {_f(e)} | {_ratio(e, row['tps'])} |"
            lines.append(line)
    return "\n".join(lines)


def concurrency_table(res: dict, engine: dict | None = None) -> str:
    eng = _by((engine or {}).get("concurrency"), "concurrency")
    lines = ["| streams | peer | ok / requests | tokens/s | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms | ratio |",
             "|---:|---|---:|---:|---|---|---:|"]
    for row in res.get("concurrency", []):
        c = row["concurrency"]
        peers = [("llama.cpp", row)] + ([((engine or {}).get("name", "kvstrata"), eng[c])] if c in eng else [])
        for name, r in peers:
            t, i = r["ttft_ms"], r["itl_ms"]
            ratio = "1.00×" if r is row else _ratio(r["tokens_per_s"], row["tokens_per_s"])
            lines.append(f"| {c} | {name} | {r['ok']} / {r['requests']} | {_f(r['tokens_per_s'])} | "
                         f"{_f(t['p50'], 0)} / {_f(t['p90'], 0)} / {_f(t['p99'], 0)} | "
                         f"{_f(i['p50'], 0)} / {_f(i['p90'], 0)} / {_f(i['p99'], 0)} | {ratio} |")
    return "\n".join(lines)


def tau_table(res: dict, engine: dict | None = None) -> str:
    rows = [("llama.cpp (--cache-ram on)", res.get("tau"))]
    if res.get("tau_no_cache_ram"):
        rows.append(("llama.cpp (--cache-ram 0)", res["tau_no_cache_ram"]))
    if engine and engine.get("tau"):
        rows.append((engine.get("name", "kvstrata"), engine["tau"]))
    lines = ["| peer | sessions / turns | wall s | gen tokens/s | prompt tokens/s | prompt cache hit | "
             "JCT mean / p50 / p90 s | turn TTFT p50 / p90 / p99 ms |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for name, t in rows:
        if not t:
            continue
        j, tt = t["jct_s"], t["turn_ttft_ms"]
        hit = "–" if t.get("cache_hit_rate") is None else f"{100 * t['cache_hit_rate']:.0f}%"
        lines.append(f"| {name} | {t['sessions']} / {t['ok_turns']} | {_f(t['wall_s'])} | {_f(t['tokens_per_s'])} | "
                     f"{_f(t['prompt_tokens_per_s'])} | {hit} | {_f(j['mean'])} / {_f(j['p50'])} / {_f(j['p90'])} | "
                     f"{_f(tt['p50'], 0)} / {_f(tt['p90'], 0)} / {_f(tt['p99'], 0)} |")
    return "\n".join(lines)


def commands(res: dict) -> list[str]:
    cmds = [r["command"] for k in ("prefill", "decode") for r in res.get("single_stream", {}).get(k, [])]
    cmds += [r["server_command"] for r in res.get("concurrency", [])]
    cmds += [res[k]["server_command"] for k in ("tau", "tau_no_cache_ram") if res.get(k)]
    return cmds


def markdown(res: dict, engine: dict | None = None) -> str:
    v = res.get("versions", {})
    w = res.get("workloads", {})
    tf = res.get("transformers") or {}
    t = w.get("tau", {})
    out = [
        "## Peers: llama.cpp and transformers",
        "",
        f"Model `{res.get('model')}`; machine {res.get('machine')}. llama.cpp from llama-cpp-python "
        f"{v.get('llama_cpp_python')} (vendored ggml-org/llama.cpp@{v.get('llama_cpp_commit')}), CPU build, "
        f"2 threads. transformers {tf.get('transformers', '–')} / torch {tf.get('torch', '–')}, fp32, 2 threads.",
        "",
        "### Single stream",
        "",
        single_stream_table(res, engine),
        "",
        f"### Concurrency ({w.get('max_tokens')} tokens per request, ~{w.get('prompt_words')}-word prompts, "
        f"streaming, ignore_eos)",
        "",
        concurrency_table(res, engine),
        "",
        f"### Agentic: tau-bench airline replay ({t.get('n_sessions')} sessions, {t.get('concurrency')} at a time, "
        f"tool wait {t.get('tool_wait_s')} s, ≤{t.get('max_tokens_cap')} tokens per turn)",
        "",
        tau_table(res, engine),
        "",
        "### Commands",
        "",
        "```",
        *commands(res),
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
    """peers_single_stream.png and peers_concurrency.png in `out_dir`; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib not installed; no plots")
        return []
    paths = []
    ss, tf = res.get("single_stream", {}), res.get("transformers") or {}
    series = [("llama.cpp", ss), ("transformers", tf)] + ([(engine.get("name", "kvstrata"), engine.get("single_stream", {}))] if engine else [])
    labels = [f"pp{r['tokens']}" for r in ss.get("prefill", [])] + [f"tg@{r['depth']}" for r in ss.get("decode", [])]
    keys = [("prefill", "tokens", r["tokens"]) for r in ss.get("prefill", [])] + \
           [("decode", "depth", r["depth"]) for r in ss.get("decode", [])]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for i, (name, data) in enumerate(series):
        vals = [(_by(data.get(kind), key).get(k) or {}).get("tps", 0) for kind, key, k in keys]
        ax.bar([x + i * width for x in range(len(keys))], vals, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(keys))], labels)
    ax.set_ylabel("tokens/s"), ax.set_title("single stream (2 threads)"), ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "peers_single_stream.png")
    fig.savefig(paths[-1], dpi=100), plt.close(fig)
    conc = res.get("concurrency", [])
    if conc:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        runs = [("llama.cpp", conc)] + ([(engine.get("name", "kvstrata"), engine["concurrency"])] if engine and engine.get("concurrency") else [])
        for name, rows in runs:
            cs = [r["concurrency"] for r in rows]
            a1.plot(cs, [r["tokens_per_s"] for r in rows], "o-", label=name)
            a2.plot(cs, [r["ttft_ms"]["p50"] for r in rows], "o-", label=f"{name} TTFT p50")
            a2.plot(cs, [r["itl_ms"]["p50"] for r in rows], "s--", label=f"{name} ITL p50")
        a1.set_xlabel("concurrent streams"), a1.set_ylabel("aggregate tokens/s"), a1.legend()
        a2.set_xlabel("concurrent streams"), a2.set_ylabel("ms"), a2.set_yscale("log"), a2.legend()
        fig.tight_layout()
        paths.append(out_dir / "peers_concurrency.png")
        fig.savefig(paths[-1], dpi=100), plt.close(fig)
    return paths
