"""Long agent sessions from the BFCL multi-turn traces, for the memory benchmarks and tests.

`replay_session`: several BFCL entries chained into one conversation, each turn its user message, the
ground-truth function calls (possible_answer) as the assistant's tool calls, their results from our API
implementations (apis.py) as tool messages, and a short closing answer: a realistic transcript, made
without running a model, long enough to pass an 8k window.

`long_task`: the same entries as one agent task (their user turns as the first message and follow-ups,
their tools, the first entry's state), for a job that outgrows the window.
"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path
from typing import Any

from benchmarks.bfcl import apis
from benchmarks.bfcl.jobfile import IMPLEMENTED, SYSTEM, load_func_docs, openai_tool


def _entries(data_dir: Path, classes: tuple[str, ...]) -> list[tuple[dict, list]]:
    answers = {}
    for line in (data_dir / "possible_answer" / "BFCL_v4_multi_turn_base.json").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            answers[r["id"]] = r.get("ground_truth") or []
    out = []
    for line in (data_dir / "BFCL_v4_multi_turn_base.json").read_text().splitlines():
        if not line.strip():
            continue
        e = json.loads(line)
        if e.get("involved_classes") and set(e["involved_classes"]) <= set(classes) and e["id"] in answers:
            out.append((e, answers[e["id"]]))
    return out


def _parse_call(text: str) -> tuple[str, list, dict]:
    node = ast.parse(text.strip(), mode="eval").body
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name), text
    return (node.func.id, [ast.literal_eval(a) for a in node.args],
            {k.arg: ast.literal_eval(k.value) for k in node.keywords})


def _tools(classes: list[str]) -> list[dict]:
    return [openai_tool(d) for c in classes for d in load_func_docs_cached(c)]


_DOCS: dict[str, list[dict]] = {}
_DATA: list[Path] = []


def load_func_docs_cached(cls: str) -> list[dict]:
    if cls not in _DOCS:
        _DOCS[cls] = load_func_docs(_DATA[0], cls)
    return _DOCS[cls]


def replay_session(data_dir: Path, n_entries: int = 8, classes: tuple[str, ...] = ("GorillaFileSystem",)
                   ) -> tuple[str, list[dict], list[dict]]:
    """(system prompt, tools, messages) of a long session chained from `n_entries` BFCL entries."""
    _DATA[:] = [Path(data_dir)]
    msgs: list[dict[str, Any]] = []
    used: list[str] = []
    n = 0
    for e, truth in _entries(Path(data_dir), classes)[:n_entries]:
        used += [c for c in e["involved_classes"] if c not in used]
        inst = {c: getattr(apis, c)((e.get("initial_config") or {}).get(c) or {}) for c in e["involved_classes"]}
        turns = ["\n".join(m["content"] for m in t if m.get("role") == "user") for t in e["question"]]
        for user, calls in zip(turns, truth):
            msgs.append({"role": "user", "content": user})
            parsed = [_parse_call(c) for c in calls]
            tool_calls = []
            results = []
            for name, args, kwargs in parsed:
                n += 1
                owner = next((i for i in inst.values() if hasattr(i, name)), None)
                try:
                    fn = getattr(owner, name)
                    bound = inspect.signature(fn).bind(*args, **kwargs)
                    res = fn(*bound.args, **bound.kwargs)
                except Exception as ex:  # a call our implementation does not take: its error is the result
                    res = {"error": f"{type(ex).__name__}: {ex}"}
                cid = f"call_{n}"
                arguments = dict(zip(inspect.signature(fn).parameters, args)) if owner else {}
                arguments.update(kwargs)
                tool_calls.append({"id": cid, "type": "function",
                                   "function": {"name": name, "arguments": json.dumps(arguments)}})
                results.append({"role": "tool", "tool_call_id": cid, "name": name, "content": json.dumps(res)})
            if tool_calls:
                msgs.append({"role": "assistant", "content": None, "tool_calls": tool_calls})
                msgs.extend(results)
            msgs.append({"role": "assistant", "content": "Done."})
    return SYSTEM, _tools(used), msgs


def long_task(data_dir: Path, n_entries: int = 8, classes: tuple[str, ...] = ("GorillaFileSystem",),
              **task: Any) -> dict:
    """A job object with one task chaining the user turns of `n_entries` BFCL entries."""
    _DATA[:] = [Path(data_dir)]
    entries = _entries(Path(data_dir), classes)[:n_entries]
    turns = []
    for e, _ in entries:
        turns += ["\n".join(m["content"] for m in t if m.get("role") == "user") for t in e["question"]]
    first = entries[0][0]
    cls = list(first["involved_classes"])
    t = {"id": f"bfcl-long-{n_entries}", "system": SYSTEM, "user": turns[0], "followups": turns[1:],
         "tools": _tools(cls), "tool_state": {c: (first.get("initial_config") or {}).get(c) or {} for c in cls}, **task}
    return {"kvstrata_job": 1, "name": "bfcl-long", "tools": [{"python": f"benchmarks.bfcl.apis:{c}"} for c in IMPLEMENTED],
            "tasks": [t]}
