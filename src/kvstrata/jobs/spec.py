"""Job files: parsing and validating what `kvstrata jobs run` and `POST /v1/jobs` accept (docs/jobs.md).

A job is a JSON object

    {"kvstrata_job": 1, "tools": [...], "mcp_servers": [...], "defaults": {...}, "tasks": [{...}, ...]}

or, on disk, a JSONL file whose lines are tasks, optionally preceded by one header line holding every
key but "tasks". Unknown keys are errors (a typo must not silently change what an agent may do).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# task key -> (default, what it is); the table docs/jobs.md documents
TASK_FIELDS: dict[str, tuple[Any, str]] = {
    "id": (None, "a name for the task (default task-<index>)"),
    "system": (None, "system prompt"),
    "user": (None, "the first user message (or give `messages`)"),
    "messages": (None, "initial conversation (user / assistant / tool messages), instead of `user`"),
    "followups": ([], "later user messages, each sent after the agent answers the previous one"),
    "tools": ("*", "tool names (or OpenAI tool definitions naming a registered tool) this agent may call; '*' = all"),
    "tool_choice": ("auto", "forces the first step after each user message: auto, required, none, or a function"),
    "max_steps": (8, "most model generations (steps) for the task"),
    "max_tokens": (256, "most tokens one step may generate"),
    "max_total_tokens": (4096, "most generated tokens over all steps"),
    "deadline_s": (None, "seconds from the task's first start after which it stops (wall clock, restarts included)"),
    "deadline": (None, "absolute unix time after which the task stops"),
    "tool_timeout_s": (30.0, "seconds one tool call may take; past it the agent gets a timeout error"),
    "tool_state": ({}, "initial state of stateful toolsets, by toolset name"),
    "sampling": ({}, "temperature, top_p, top_k, min_p, seed, stop, repetition_penalty"),
    "metadata": (None, "anything; copied into the task's result"),
    "compaction": ({}, "near the window the agent's older turns are summarised and it goes on (docs/memory.md): "
                       "false to end at context_length instead, or {threshold, keep_recent_tokens, summary_max_tokens}"),
}
COMPACTION_KEYS = ("threshold", "keep_recent_tokens", "summary_max_tokens")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "repetition_penalty", "ignore_eos",
                 "presence_penalty", "frequency_penalty")
JOB_KEYS = ("kvstrata_job", "name", "tools", "mcp_servers", "defaults", "tasks", "max_concurrent_agents",
            "tool_workers", "max_tool_output_chars")


def _check_keys(d: dict, known, where: str) -> None:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise KvstrataError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")


@dataclass(frozen=True)
class TaskSpec:
    index: int
    id: str
    system: str | None
    messages: tuple[dict, ...]  # the initial conversation (without the system prompt), ends with a user message
    followups: tuple[str, ...]
    tools: Any  # "*" or a list of names / OpenAI tool dicts
    tool_choice: Any
    max_steps: int
    max_tokens: int
    max_total_tokens: int
    deadline_s: float | None
    deadline: float | None
    tool_timeout_s: float
    tool_state: dict
    sampling: dict
    metadata: Any
    compaction: dict | None = None  # None: off; else {threshold, keep_recent_tokens, summary_max_tokens} (each optional)

    @classmethod
    def parse(cls, d: Any, index: int, defaults: dict | None = None) -> "TaskSpec":
        where = f"task {index}"
        if not isinstance(d, dict):
            raise KvstrataError(f"{where}: a task must be a JSON object; got {type(d).__name__}")
        _check_keys(d, TASK_FIELDS, where)
        v = {k: default for k, (default, _) in TASK_FIELDS.items()}
        v.update(defaults or {})
        v.update(d)
        if v["messages"] is not None and v["user"] is not None:
            raise KvstrataError(f"{where}: give either `user` or `messages`, not both")
        if v["messages"] is None:
            if not isinstance(v["user"], str) or not v["user"]:
                raise KvstrataError(f"{where}: needs `user` (the first user message, a non-empty string) or `messages`")
            msgs = [{"role": "user", "content": v["user"]}]
        else:
            msgs = v["messages"]
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
                raise KvstrataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
            if msgs[0]["role"] == "system":
                if v["system"] is not None:
                    raise KvstrataError(f"{where}: give the system prompt as `system` or as the first message, not both")
                v["system"], msgs = msgs[0].get("content"), msgs[1:]
            if not msgs or msgs[-1]["role"] != "user":
                raise KvstrataError(f"{where}: `messages` must end with a user message (the agent answers it)")
        if v["system"] is not None and not isinstance(v["system"], str):
            raise KvstrataError(f"{where}: `system` must be a string")
        fu = v["followups"]
        if not isinstance(fu, list) or not all(isinstance(x, str) and x for x in fu):
            raise KvstrataError(f"{where}: `followups` must be a list of non-empty strings")
        tools = v["tools"]
        if tools != "*" and not (isinstance(tools, list) and all(isinstance(t, (str, dict)) for t in tools)):
            raise KvstrataError(f"{where}: `tools` must be '*' or a list of tool names / OpenAI tool definitions")
        for k in ("max_steps", "max_tokens", "max_total_tokens"):
            if not isinstance(v[k], int) or isinstance(v[k], bool) or v[k] < 1:
                raise KvstrataError(f"{where}: `{k}` must be an integer >= 1; got {v[k]!r}")
        for k in ("deadline_s", "deadline", "tool_timeout_s"):
            if v[k] is not None and (not isinstance(v[k], (int, float)) or isinstance(v[k], bool) or v[k] <= 0):
                raise KvstrataError(f"{where}: `{k}` must be a positive number of seconds; got {v[k]!r}")
        if v["tool_timeout_s"] is None:
            raise KvstrataError(f"{where}: `tool_timeout_s` cannot be null; every tool call has a timeout")
        if not isinstance(v["tool_state"], dict):
            raise KvstrataError(f"{where}: `tool_state` must be an object keyed by toolset name")
        if not isinstance(v["sampling"], dict):
            raise KvstrataError(f"{where}: `sampling` must be an object")
        _check_keys(v["sampling"], SAMPLING_KEYS, f"{where}.sampling")
        tc = v["tool_choice"]
        if not (tc in ("auto", "required", "none") or (isinstance(tc, dict) and tc.get("type") == "function")):
            raise KvstrataError(f"{where}: `tool_choice` must be auto, required, none or "
                                f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}; got {tc!r}")
        comp = v["compaction"]
        if comp is False or comp is None:
            comp = None
        elif not isinstance(comp, dict):
            raise KvstrataError(f"{where}: `compaction` must be false or an object with {list(COMPACTION_KEYS)}")
        else:
            _check_keys(comp, COMPACTION_KEYS, f"{where}.compaction")
            for k, x in comp.items():
                if x is not None and (not isinstance(x, int) or isinstance(x, bool) or x < (0 if k == "keep_recent_tokens" else 1)):
                    raise KvstrataError(f"{where}: compaction.{k} must be a positive integer; got {x!r}")
        tid = v["id"] if v["id"] is not None else f"task-{index}"
        if not isinstance(tid, (str, int)):
            raise KvstrataError(f"{where}: `id` must be a string")
        return cls(index=index, id=str(tid), system=v["system"], messages=tuple(msgs), followups=tuple(fu),
                   tools=tools, tool_choice=tc, max_steps=v["max_steps"], max_tokens=v["max_tokens"],
                   max_total_tokens=v["max_total_tokens"], deadline_s=v["deadline_s"], deadline=v["deadline"],
                   tool_timeout_s=float(v["tool_timeout_s"]), tool_state=dict(v["tool_state"]),
                   sampling=dict(v["sampling"]), metadata=v["metadata"], compaction=comp)


@dataclass(frozen=True)
class MCPServerSpec:
    """An MCP server the job starts over stdio: `command args...`, tools listed by the server."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    cwd: str | None = None
    tool_prefix: str = ""  # prepended to the server's tool names (to avoid clashes)
    startup_timeout_s: float = 30.0

    @classmethod
    def parse(cls, d: Any, i: int) -> "MCPServerSpec":
        where = f"mcp_servers[{i}]"
        if not isinstance(d, dict):
            raise KvstrataError(f"{where} must be an object with at least `command`")
        _check_keys(d, ("name", "command", "args", "env", "cwd", "tool_prefix", "startup_timeout_s"), where)
        if not isinstance(d.get("command"), str) or not d["command"]:
            raise KvstrataError(f"{where}: `command` (the executable that starts the server) is required")
        args = d.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise KvstrataError(f"{where}: `args` must be a list of strings")
        env = d.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in env.items()):
            raise KvstrataError(f"{where}: `env` must map names to string values")
        return cls(name=str(d.get("name") or f"mcp{i}"), command=d["command"], args=tuple(args), env=dict(env),
                   cwd=d.get("cwd"), tool_prefix=str(d.get("tool_prefix") or ""),
                   startup_timeout_s=float(d.get("startup_timeout_s", 30.0)))


@dataclass(frozen=True)
class JobLimits:
    """What a server lets one job ask for (None: no limit, as `kvstrata jobs run` on the user's own file)."""

    max_tasks: int | None = None
    max_agents: int | None = None  # largest max_concurrent_agents
    max_tool_workers: int | None = None  # largest tool_workers; also caps the default (the CPU count)

    def check(self, raw: dict) -> None:
        """KvstrataError naming the limit and the flag that sets it, before anything is parsed or stored."""
        n = len(raw.get("tasks") or []) if isinstance(raw.get("tasks"), list) else 0
        for what, got, cap, flag in (("tasks", n, self.max_tasks, "--max-job-tasks"),
                                     ("max_concurrent_agents", raw.get("max_concurrent_agents"), self.max_agents,
                                      "--max-job-agents"),
                                     ("tool_workers", raw.get("tool_workers"), self.max_tool_workers,
                                      "--max-tool-workers")):
            if cap is not None and isinstance(got, int) and not isinstance(got, bool) and got > cap:
                raise KvstrataError(f"the job asks for {got} {what}; this server allows at most {cap} ({flag}); "
                                    "split the job or lower the value")


@dataclass(frozen=True)
class JobSpec:
    raw: dict  # the job as given (what the store keeps and a resume re-parses)
    name: str | None
    tool_sources: tuple[dict, ...]  # {"python": "pkg.mod[:attr]"} | {"entry_point": "name"}
    mcp_servers: tuple[MCPServerSpec, ...]
    tasks: tuple[TaskSpec, ...]
    max_concurrent_agents: int = 16
    tool_workers: int = 0  # 0: the machine's CPU count
    max_tool_output_chars: int = 8000

    @classmethod
    def parse(cls, raw: Any, limits: JobLimits | None = None) -> "JobSpec":
        if not isinstance(raw, dict):
            raise KvstrataError("a job must be a JSON object with `tasks` (see docs/jobs.md)")
        _check_keys(raw, JOB_KEYS, "job")
        limits = limits or JobLimits()
        limits.check(raw)
        if raw.get("kvstrata_job", FORMAT_VERSION) != FORMAT_VERSION:
            raise KvstrataError(f"job format version {raw['kvstrata_job']!r} is not supported (this build reads {FORMAT_VERSION})")
        tasks = raw.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise KvstrataError("a job needs `tasks`: a non-empty list of task objects")
        defaults = raw.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise KvstrataError("`defaults` must be an object of task keys")
        _check_keys(defaults, [k for k in TASK_FIELDS if k not in ("id", "user", "messages")], "defaults")
        srcs = raw.get("tools") or []
        if not isinstance(srcs, list):
            raise KvstrataError("`tools` must be a list of tool sources ({\"python\": ...} or {\"entry_point\": ...})")
        for i, s in enumerate(srcs):
            if not isinstance(s, dict) or len(s) != 1 or not isinstance(next(iter(s.values())), str) \
                    or next(iter(s)) not in ("python", "entry_point"):
                raise KvstrataError(f"tools[{i}] must be {{\"python\": \"pkg.module[:name]\"}} or "
                                    f"{{\"entry_point\": \"name\"}}; got {s!r}")
        mcps = raw.get("mcp_servers") or []
        if not isinstance(mcps, list):
            raise KvstrataError("`mcp_servers` must be a list")
        parsed = tuple(TaskSpec.parse(t, i, defaults) for i, t in enumerate(tasks))
        ids = [t.id for t in parsed]
        dup = sorted({x for x in ids if ids.count(x) > 1})
        if dup:
            raise KvstrataError(f"task ids must be unique; repeated: {dup[:5]}")
        mca = raw.get("max_concurrent_agents", 16)
        tw = raw.get("tool_workers", 0)
        mo = raw.get("max_tool_output_chars", 8000)
        for k, x, lo in (("max_concurrent_agents", mca, 1), ("tool_workers", tw, 0), ("max_tool_output_chars", mo, 100)):
            if not isinstance(x, int) or isinstance(x, bool) or x < lo:
                raise KvstrataError(f"`{k}` must be an integer >= {lo}; got {x!r}")
        return cls(raw=raw, name=raw.get("name"), tool_sources=tuple(srcs),
                   mcp_servers=tuple(MCPServerSpec.parse(m, i) for i, m in enumerate(mcps)), tasks=parsed,
                   max_concurrent_agents=mca, max_tool_output_chars=mo,
                   tool_workers=tw or min(os.cpu_count() or 2, limits.max_tool_workers or 1 << 30))


def read_job_file(path: str | os.PathLike) -> tuple[dict, str]:
    """(the job as one JSON object, sha256 of the file's bytes). `.json`: one object; else JSONL."""
    p = Path(path)
    if not p.is_file():
        raise KvstrataError(f"job file {p} does not exist")
    data = p.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    text = data.decode("utf-8", errors="replace")
    if p.suffix == ".json":
        try:
            return json.loads(text), digest
        except json.JSONDecodeError as e:
            raise KvstrataError(f"{p}: not valid JSON ({e})") from None
    job: dict[str, Any] = {}
    tasks: list[Any] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KvstrataError(f"{p}:{n}: not valid JSON ({e}); each line must be one JSON object") from None
        if isinstance(obj, dict) and "kvstrata_job" in obj:
            if tasks or job:
                raise KvstrataError(f"{p}:{n}: the job header (the line with `kvstrata_job`) must be the first line")
            if "tasks" in obj:
                raise KvstrataError(f"{p}:{n}: in a JSONL job file tasks are lines, not a `tasks` key")
            job = dict(obj)
        else:
            tasks.append(obj)
    job["tasks"] = tasks
    return job, digest
