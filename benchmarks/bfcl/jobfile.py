"""A job file from the BFCL v4 multi-turn base traces: one task per BFCL entry whose API classes are
implemented here (apis.py), its turns as the first user message and follow-ups, its function docs as the
task's tools (converted to OpenAI / JSON Schema), its initial_config as the toolsets' state.

    python -m benchmarks.bfcl --out bfcl.jsonl --limit 5 [--data-dir DIR]
    PYTHONPATH=. kvstrata jobs run bfcl.jsonl      # from the repository root: the tools are benchmarks.bfcl.apis

The traces are looked up in --data-dir, else $KVSTRATA_TRACE_DIR/bfcl, else the `shared/data/traces/bfcl`
folder beside the repository checkout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)

IMPLEMENTED = {"GorillaFileSystem": "gorilla_file_system", "MathAPI": "math_api", "MessageAPI": "message_api"}
TOOLSETS = {c: f"benchmarks.bfcl.apis:{c}" for c in IMPLEMENTED}
SYSTEM = ("You are an assistant that completes the user's requests by calling the available functions. "
          "Call a function when it helps; when the request is done, answer briefly without a function call.")
_TYPES = {"dict": "object", "float": "number", "integer": "integer", "int": "integer", "string": "string",
          "boolean": "boolean", "array": "array", "tuple": "array", "list": "array", "any": None}


def bfcl_schema(s: Any) -> Any:
    """A BFCL parameter schema (types dict / float / tuple / any) as JSON Schema."""
    if not isinstance(s, dict):
        return s
    out: dict[str, Any] = {}
    for k, v in s.items():
        if k == "type":
            t = _TYPES.get(v, v)
            if t is not None:
                out["type"] = t
        elif k == "properties" and isinstance(v, dict):
            out[k] = {n: bfcl_schema(x) for n, x in v.items()}
        elif k == "items":
            out[k] = bfcl_schema(v)
        elif k in ("description", "required", "enum", "default"):
            out[k] = v
    return out


def load_func_docs(data_dir: Path, cls: str) -> list[dict]:
    path = data_dir / "multi_turn_func_doc" / f"{IMPLEMENTED[cls]}.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def openai_tool(doc: dict) -> dict:
    params = bfcl_schema(doc.get("parameters") or {"type": "dict", "properties": {}})
    params["type"] = "object"
    return {"type": "function", "function": {"name": doc["name"], "description": doc.get("description", ""),
                                             "parameters": params}}


def data_dirs(given: str | None = None) -> list[Path]:
    """Where the BFCL traces are looked for: --data-dir, else the traces folder (benchmarks.common.trace_dir)."""
    from benchmarks.common import trace_dir

    return [Path(given)] if given else [trace_dir() / "bfcl"]


def find_data_dir(given: str | None) -> Path:
    for p in data_dirs(given):
        if (p / "BFCL_v4_multi_turn_base.json").is_file():
            return p
    raise KvstrataError(f"BFCL data not found in {' or '.join(map(str, data_dirs(given)))}; pass --data-dir "
                        "(the folder with BFCL_v4_multi_turn_base.json and multi_turn_func_doc/)")


def build_job(data_dir: Path, limit: int | None = None, max_turns: int | None = None, **task_defaults: Any) -> dict:
    """The job object: entries whose involved classes are all implemented, in file order."""
    answers = {}
    pa = data_dir / "possible_answer" / "BFCL_v4_multi_turn_base.json"
    if pa.is_file():
        for line in pa.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                answers[r["id"]] = r.get("ground_truth")
    docs = {c: load_func_docs(data_dir, c) for c in IMPLEMENTED}
    tasks = []
    for line in (data_dir / "BFCL_v4_multi_turn_base.json").read_text().splitlines():
        if not line.strip():
            continue
        e = json.loads(line)
        classes = e.get("involved_classes") or []
        if not classes or not set(classes) <= set(IMPLEMENTED):
            continue
        turns = ["\n".join(m["content"] for m in turn if m.get("role") == "user") for turn in e["question"]]
        turns = [t for t in turns if t.strip()][: max_turns or None]
        if not turns:
            continue
        excluded = set(e.get("excluded_function") or [])
        tools = [openai_tool(d) for c in classes for d in docs[c] if d["name"] not in excluded]
        state = {c: (e.get("initial_config") or {}).get(c) or {} for c in classes}
        tasks.append({"id": e["id"], "system": SYSTEM, "user": turns[0], "followups": turns[1:], "tools": tools,
                      "tool_state": state, **task_defaults,
                      "metadata": {"bfcl_id": e["id"], "involved_classes": classes,
                                   "ground_truth": (answers.get(e["id"]) or [])[: len(turns)]}})
        if limit and len(tasks) >= limit:
            break
    return {"kvstrata_job": 1, "name": "bfcl-multi-turn-base", "tools": [{"python": TOOLSETS[c]} for c in IMPLEMENTED],
            "tasks": tasks}


def write_jsonl(job: dict, out: str | os.PathLike) -> None:
    with open(out, "w", encoding="utf-8") as f:
        f.write(json.dumps({k: v for k, v in job.items() if k != "tasks"}) + "\n")
        for t in job["tasks"]:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")


def add_bfcl_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="job file to write (JSONL)")
    p.add_argument("--data-dir", help="BFCL folder (default $KVSTRATA_TRACE_DIR/bfcl, else shared/data/traces/bfcl "
                                       "beside the checkout)")
    p.add_argument("--limit", type=int, default=None, help="at most this many tasks")
    p.add_argument("--max-turns", type=int, default=None, help="keep only the first N user turns of each task")
    p.add_argument("--max-steps", type=int, default=None, help="task max_steps")
    p.add_argument("--max-tokens", type=int, default=None, help="task max_tokens (per step)")
    p.add_argument("--tool-choice", default=None, help="task tool_choice (e.g. required: force a call after each user turn)")


def run_bfcl(a: argparse.Namespace) -> int:
    d = {k: v for k, v in (("max_steps", a.max_steps), ("max_tokens", a.max_tokens), ("tool_choice", a.tool_choice))
         if v is not None}
    job = build_job(find_data_dir(a.data_dir), a.limit, a.max_turns, **d)
    write_jsonl(job, a.out)
    print(f"wrote {len(job['tasks'])} tasks to {a.out}")
    return 0
