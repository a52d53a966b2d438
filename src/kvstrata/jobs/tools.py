"""Tools an agent may call: Python callables (by module path or entry point), stateful toolsets, MCP tools.

Registration (docs/jobs.md):

* `{"python": "pkg.mod:fn"}`: one function; `{"python": "pkg.mod:NAME"}` may also name a list of
  functions or a `Toolset` subclass; `{"python": "pkg.mod"}`: the module's `KVSTRATA_TOOLS` list if it
  has one, else every public function and Toolset subclass defined in it.
* `{"entry_point": "name"}`: the object an installed package registers under the `kvstrata.tools`
  entry-point group (resolved as above).

A function's schema comes from `@tool(...)` if present, else its signature (type hints) and
docstring. A parameter annotated `ToolContext` (or named `tool_context`) is not shown to the model;
the runner passes the call's context (call id, task, session) in it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable

from kvstrata.core import KvstrataError

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "kvstrata.tools"


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about the call it serves (pass it on to make side effects idempotent)."""

    call_id: str
    tool_name: str
    job_id: str
    task_id: str
    task_index: int
    session_id: str
    attempt: int  # 1 on the first execution; > 1 when a crash interrupted an earlier one


class Toolset:
    """Tools that share per-task state (a file system, an inbox): one instance per agent.

    Contract: `__init__(self, state: dict | None)` builds the state from the task's
    `tool_state[<name>]` or from a `snapshot()` taken earlier (the two must be interchangeable);
    `snapshot()` returns that state as JSON-able data, small (it is stored after every call, with the
    call's result, so a resumed agent sees exactly the state its recorded calls left). Public methods
    listed in `tools` (default: every public method but `snapshot`) are the tools. Calls on one
    instance run one at a time.
    """

    name: str = ""  # key in the task's tool_state; default: the class name
    tools: tuple[str, ...] | None = None

    def __init__(self, state: dict | None = None) -> None:
        self.state = state

    def snapshot(self) -> Any:
        return None

    @classmethod
    def toolset_name(cls) -> str:
        return cls.name or cls.__name__

    @classmethod
    def tool_methods(cls) -> list[str]:
        if cls.tools is not None:
            return list(cls.tools)
        skip = {"snapshot", "toolset_name", "tool_methods"}
        return [n for n, f in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_") and n not in skip]


def tool(name: str | None = None, description: str | None = None, parameters: dict | None = None):
    """Decorator: give a function (or Toolset method) an explicit tool name, description or schema."""

    def wrap(fn):
        fn.__kvstrata_tool__ = {"name": name, "description": description, "parameters": parameters}
        return fn

    return wrap


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON Schema (type object)
    source: str
    fn: Callable | None = None  # a plain function
    toolset: type | None = None  # or a Toolset subclass and the method name
    method: str | None = None
    ctx_param: str | None = None  # parameter that receives the ToolContext
    mcp: Any = None  # or an MCP connection (jobs/mcp_tools.py)
    mcp_name: str | None = None

    def openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


# -- schemas from Python signatures ----------------------------------------------------------------
_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object",
               tuple: "array"}


def _json_type(hint: Any) -> dict:
    origin = typing.get_origin(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _json_type(args[0]) if len(args) == 1 else {}
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return {"type": "array", **({"items": _json_type(args[0])} if args and args[0] is not Ellipsis else {})}
    if origin is dict:
        return {"type": "object"}
    if origin is typing.Literal:
        return {"enum": list(typing.get_args(hint))}
    t = _JSON_TYPES.get(hint)
    return {"type": t} if t else {}


def _doc_params(doc: str) -> tuple[str, dict[str, str]]:
    """(summary, {param: description}) from a Google-style docstring (`Args:` section)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary, params, in_args, cur = [], {}, False, None
    for ln in lines:
        s = ln.strip()
        if s.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args:
            if s.endswith(":") and not ln.startswith((" ", "\t")):
                in_args = False
                continue
            if ":" in s and ln.startswith((" ", "\t")) and not ln.startswith(("        ", "\t\t")):
                key, _, desc = s.partition(":")
                cur = key.split("(")[0].strip()
                params[cur] = desc.strip()
            elif cur and s:
                params[cur] += " " + s
        elif not params:
            summary.append(s)
    return " ".join(x for x in summary if x).strip(), params


def schema_from_callable(fn: Callable) -> tuple[str, dict, str | None]:
    """(description, JSON Schema of the parameters, name of the ToolContext parameter or None)."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    summary, pdocs = _doc_params(fn.__doc__ or "")
    props, required, ctx = {}, [], None
    for p in sig.parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        h = hints.get(p.name, p.annotation)
        if h is ToolContext or p.name == "tool_context":
            ctx = p.name
            continue
        prop = _json_type(h) if h is not inspect.Parameter.empty else {}
        if p.name in pdocs:
            prop["description"] = pdocs[p.name]
        props[p.name] = prop
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    schema = {"type": "object", "properties": props, **({"required": required} if required else {})}
    return summary, schema, ctx


def _from_function(fn: Callable, source: str, toolset: type | None = None) -> Tool:
    desc, schema, ctx = schema_from_callable(fn)
    over = getattr(fn, "__kvstrata_tool__", {}) or {}
    name = over.get("name") or fn.__name__
    return Tool(name=name, description=over.get("description") or desc or name,
                parameters=over.get("parameters") or schema, source=source,
                fn=None if toolset else fn, toolset=toolset, method=fn.__name__ if toolset else None, ctx_param=ctx)


def tools_from_object(obj: Any, source: str) -> list[Tool]:
    """A function, a Toolset subclass, a list of those, or a module -> Tools."""
    if inspect.ismodule(obj):
        listed = getattr(obj, "KVSTRATA_TOOLS", None)
        if listed is not None:
            return tools_from_object(list(listed), source)
        members = [v for n, v in vars(obj).items() if not n.startswith("_") and getattr(v, "__module__", None) == obj.__name__
                   and (inspect.isfunction(v) or (inspect.isclass(v) and issubclass(v, Toolset)))]
        if not members:
            raise KvstrataError(f"tool source {source}: the module defines no public functions or Toolsets")
        return tools_from_object(members, source)
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in tools_from_object(x, source)]
    if inspect.isclass(obj) and issubclass(obj, Toolset):
        return [_from_function(getattr(obj, m), source, toolset=obj) for m in obj.tool_methods()]
    if callable(obj):
        return [_from_function(obj, source)]
    raise KvstrataError(f"tool source {source}: {obj!r} is not a function, a list of functions, a Toolset or a module")


def load_source(src: dict, allow_python: bool = True) -> list[Tool]:
    """Tools of one `tools` entry of a job file."""
    kind, ref = next(iter(src.items()))
    if kind == "python":
        if not allow_python:
            raise KvstrataError(f"tool source {ref!r}: module paths are not allowed here; register the tools "
                                f"through the {ENTRY_POINT_GROUP!r} entry-point group instead")
        mod_name, _, attr = ref.partition(":")
        try:
            obj = importlib.import_module(mod_name)
        except ImportError as e:
            raise KvstrataError(f"tool source {ref!r}: cannot import module {mod_name!r} ({e}); check the name and "
                                "that it is on PYTHONPATH") from None
        for part in filter(None, attr.split(".")):
            if not hasattr(obj, part):
                raise KvstrataError(f"tool source {ref!r}: {mod_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        return tools_from_object(obj, f"python:{ref}")
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == ref]
    if not eps:
        have = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise KvstrataError(f"no tool entry point {ref!r} in group {ENTRY_POINT_GROUP!r}; installed: {have or 'none'}")
    try:
        obj = eps[0].load()
    except Exception as e:
        raise KvstrataError(f"entry point {ref!r} ({eps[0].value}) failed to load: {e!r}") from None
    return tools_from_object(obj, f"entry_point:{ref}")


# -- what a tool returned -> what the model reads --------------------------------------------------
def _json_safe(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if v is None or isinstance(v, (str, int, bool)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_json_safe(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _json_safe(x) for k, x in v.items())
    return False


def render_output(value: Any, max_chars: int) -> tuple[str, str | None]:
    """(content for the model, error or None). Strings pass as they are; JSON-able values become JSON;
    anything else (objects, bytes, NaN, ...) is an error the model is told about. Long output is cut."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, str):
        text = value.encode("utf-8", errors="replace").decode("utf-8")
    elif _json_safe(value):
        text = json.dumps(value, ensure_ascii=False)
    else:
        r = repr(value)
        r = r[:200] + ("..." if len(r) > 200 else "")
        err = f"the tool returned a value that is not JSON ({type(value).__name__}): {r}"
        return f"Error: {err}", err
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n[... output cut: {len(text)} characters, {max_chars} shown]"
    return text, None
