"""Task results: the summary of a finished agent (from its transcript) and the results JSONL file.

One line per task, written once: lines are appended as tasks finish, and a run that starts over a job
already part done first rewrites the file from the session store (the source of truth), so a crash
between "task done" and "line written" never loses or repeats a line. At the end the file is
rewritten in task order (temp file + rename).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULT_KEYS = ("job_id", "task_index", "task_id", "status", "finish_reason", "final_answer", "error", "steps",
               "tool_calls", "tool_errors", "compactions", "compaction_refused", "prompt_tokens", "completion_tokens", "cached_prompt_tokens",
               "computed_prompt_tokens", "timings", "session_id", "metadata", "transcript")


def summarize(messages: list[dict], meta: dict, reason: str | None, error: str | None,
              compaction_refused: str | None = None) -> dict:
    """A finished task's result without its transcript: counts and timings read from the messages, and
    why compacting last failed to shorten the context (None: it never did)."""
    steps = [m for m in messages if m.get("role") == "assistant" and "kvstrata" in m]
    tools = [m for m in messages if m.get("role") == "tool" and "kvstrata" in m]
    k = [m["kvstrata"] for m in steps]
    final = None
    if reason == "answered" and messages and messages[-1].get("role") == "assistant":
        final = messages[-1].get("content")
    started = float(meta.get("started_at") or time.time())
    now = time.time()
    return {
        "status": "failed" if error else "done",
        "finish_reason": reason,
        "final_answer": final,
        "error": error,
        "steps": len(steps),
        "tool_calls": len(tools),
        "tool_errors": sum(1 for m in tools if m["kvstrata"].get("error")),
        "compactions": sum(1 for m in messages if m.get("role") == "compaction"),
        "compaction_refused": compaction_refused,
        "prompt_tokens": sum(x.get("prompt_tokens", 0) for x in k),
        "completion_tokens": sum(x.get("completion_tokens", 0) for x in k),
        "cached_prompt_tokens": sum(x.get("cached_prompt_tokens", 0) for x in k),
        "computed_prompt_tokens": sum(x.get("computed_prompt_tokens", 0) for x in k),
        "timings": {"started_at": started, "finished_at": now, "wall_s": round(now - started, 6),
                    "generate_s": round(sum(x.get("generate_s", 0.0) for x in k), 6),
                    "tool_s": round(sum(m["kvstrata"].get("duration_s", 0.0) for m in tools), 6)},
    }


def result_record(job_id: str, task, session) -> dict:
    """One results-file line for a finished JobTask (`task`) and its Session (or None)."""
    summary = dict(task.result or {})
    if not summary:
        summary = {"status": task.state.value, "finish_reason": None, "error": task.error}
    rec: dict[str, Any] = {"job_id": job_id, "task_index": task.index,
                           "task_id": (task.input or {}).get("id", f"task-{task.index}") if isinstance(task.input, dict) else f"task-{task.index}"}
    rec.update(summary)
    rec["session_id"] = task.session_id
    rec["metadata"] = (task.input or {}).get("metadata") if isinstance(task.input, dict) else None
    transcript = []
    if session is not None:
        if session.system_prompt:
            transcript.append({"role": "system", "content": session.system_prompt})
        transcript.extend(session.messages)
    rec["transcript"] = transcript
    return {k: rec.get(k) for k in RESULT_KEYS}


class ResultsFile:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.written: set[int] = set()

    def rewrite(self, records: list[dict]) -> None:
        """Atomically replace the file with `records` (one line each)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.written = {r["task_index"] for r in records}

    def append(self, record: dict) -> None:
        if record["task_index"] in self.written:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.written.add(record["task_index"])
