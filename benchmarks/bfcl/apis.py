"""Three BFCL multi-turn API classes as kvstrata Toolsets over in-memory state (our own implementation
of the behaviour their function docs describe): MathAPI, MessageAPI, GorillaFileSystem.

Errors come back as {"error": ...} results, as in BFCL; the state is JSON, so `snapshot()` is the
state itself and a resumed agent continues on exactly the file system / inbox its calls left.
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

from kvstrata.jobs.tools import Toolset


class MathAPI(Toolset):
    """Stateless arithmetic (BFCL math_api)."""

    def absolute_value(self, number: float) -> dict:
        return {"result": abs(number)}

    def add(self, a: float, b: float) -> dict:
        return {"result": a + b}

    def subtract(self, a: float, b: float) -> dict:
        return {"result": a - b}

    def multiply(self, a: float, b: float) -> dict:
        return {"result": a * b}

    def divide(self, a: float, b: float) -> dict:
        return {"error": "Cannot divide by zero"} if b == 0 else {"result": a / b}

    def power(self, base: float, exponent: float) -> dict:
        try:
            return {"result": base ** exponent}
        except (OverflowError, ZeroDivisionError) as e:
            return {"error": str(e)}

    def square_root(self, number: float, precision: int) -> dict:
        if number < 0:
            return {"error": "Cannot calculate square root of a negative number"}
        return {"result": round(math.sqrt(number), int(precision))}

    def logarithm(self, value: float, base: float, precision: int) -> dict:
        if value <= 0 or base <= 0 or base == 1:
            return {"error": "value and base must be positive and base != 1"}
        return {"result": round(math.log(value, base), int(precision))}

    def round_number(self, number: float, decimal_places: int = 0) -> dict:
        return {"result": round(number, int(decimal_places))}

    def percentage(self, part: float, whole: float) -> dict:
        return {"error": "Whole cannot be zero"} if whole == 0 else {"result": part / whole * 100}

    def mean(self, numbers: list) -> dict:
        return {"error": "Cannot calculate mean of an empty list"} if not numbers else {"result": statistics.fmean(numbers)}

    def standard_deviation(self, numbers: list) -> dict:
        return {"error": "empty list"} if not numbers else {"result": statistics.pstdev(numbers)}

    def max_value(self, numbers: list) -> dict:
        return {"error": "empty list"} if not numbers else {"result": max(numbers)}

    def min_value(self, numbers: list) -> dict:
        return {"error": "empty list"} if not numbers else {"result": min(numbers)}

    def sum_values(self, numbers: list) -> dict:
        return {"result": sum(numbers)}

    _SI = {"m": 1.0, "cm": 0.01, "mm": 0.001, "km": 1000.0, "kg": 1.0, "g": 0.001, "mg": 1e-6, "l": 1.0, "ml": 0.001,
           "s": 1.0, "min": 60.0, "h": 3600.0}
    _IMP = {("inch", "cm"): 2.54, ("foot", "m"): 0.3048, ("mile", "km"): 1.609344, ("pound", "kg"): 0.45359237,
            ("ounce", "g"): 28.349523125, ("gallon", "l"): 3.785411784, ("yard", "m"): 0.9144}

    def si_unit_conversion(self, value: float, unit_in: str, unit_out: str) -> dict:
        a, b = self._SI.get(unit_in), self._SI.get(unit_out)
        if a is None or b is None:
            return {"error": f"unknown unit {unit_in if a is None else unit_out!r}; known: {sorted(self._SI)}"}
        return {"result": value * a / b}

    def imperial_si_conversion(self, value: float, unit_in: str, unit_out: str) -> dict:
        if (unit_in, unit_out) in self._IMP:
            return {"result": value * self._IMP[(unit_in, unit_out)]}
        if (unit_out, unit_in) in self._IMP:
            return {"result": value / self._IMP[(unit_out, unit_in)]}
        return {"error": f"no conversion from {unit_in!r} to {unit_out!r}"}


class MessageAPI(Toolset):
    """A workspace inbox (BFCL message_api)."""

    DEFAULT = {"user_map": {"Alice": "USR001", "Bob": "USR002", "Catherine": "USR003", "Daniel": "USR004"},
               "inbox": [], "message_count": 0, "current_user": None}

    def __init__(self, state: dict | None = None) -> None:
        s = copy.deepcopy(self.DEFAULT)
        s.update(copy.deepcopy(state or {}))
        s.setdefault("user_count", len(s["user_map"]))
        super().__init__(s)

    def snapshot(self) -> Any:
        return copy.deepcopy(self.state)

    def _login_needed(self) -> dict | None:
        return None if self.state["current_user"] else {"error": "No user is currently logged in."}

    def list_users(self) -> dict:
        return {"user_list": list(self.state["user_map"])}

    def get_user_id(self, user: str) -> dict:
        uid = self.state["user_map"].get(user)
        return {"user_id": uid} if uid else {"error": f"User '{user}' not found in the workspace."}

    def message_login(self, user_id: str) -> dict:
        if user_id not in self.state["user_map"].values():
            return {"login_status": False, "message": f"User ID '{user_id}' not found."}
        self.state["current_user"] = user_id
        return {"login_status": True, "message": f"User '{user_id}' logged in successfully."}

    def message_get_login_status(self) -> dict:
        return {"login_status": bool(self.state["current_user"])}

    def add_contact(self, user_name: str) -> dict:
        if user_name in self.state["user_map"]:
            return {"added_status": False, "user_id": self.state["user_map"][user_name], "message": "Contact already exists."}
        self.state["user_count"] += 1
        uid = f"USR{self.state['user_count']:03d}"
        self.state["user_map"][user_name] = uid
        return {"added_status": True, "user_id": uid, "message": f"Contact '{user_name}' added successfully."}

    def send_message(self, receiver_id: str, message: str) -> dict:
        if (e := self._login_needed()) is not None:
            return e
        if receiver_id not in self.state["user_map"].values():
            return {"sent_status": False, "message_id": None, "message": f"Receiver ID '{receiver_id}' not found."}
        self.state["message_count"] += 1
        mid = self.state["message_count"]
        self.state["inbox"].append({"id": mid, "from": self.state["current_user"], "to": receiver_id, "message": message})
        return {"sent_status": True, "message_id": mid, "message": f"Message sent to '{receiver_id}' successfully."}

    def delete_message(self, receiver_id: str) -> dict:
        if (e := self._login_needed()) is not None:
            return e
        me = self.state["current_user"]
        for i in range(len(self.state["inbox"]) - 1, -1, -1):
            m = self.state["inbox"][i]
            if m.get("from") == me and m.get("to") == receiver_id:
                del self.state["inbox"][i]
                return {"deleted_status": True, "receiver_id": receiver_id, "message": "Message deleted."}
        return {"deleted_status": False, "receiver_id": receiver_id, "message": "No message to this receiver."}

    def view_messages_sent(self) -> dict:
        if (e := self._login_needed()) is not None:
            return e
        out: dict[str, list[str]] = {}
        for m in self.state["inbox"]:
            if m.get("from") == self.state["current_user"]:
                out.setdefault(m["to"], []).append(m["message"])
        return {"messages": out}

    def search_messages(self, keyword: str) -> dict:
        if (e := self._login_needed()) is not None:
            return e
        k = keyword.lower()
        return {"results": [{"receiver_id": m.get("to"), "message": m.get("message")}
                            for m in self.state["inbox"] if k in str(m.get("message", "")).lower()]}

    def get_message_stats(self) -> dict:
        if (e := self._login_needed()) is not None:
            return e
        me = self.state["current_user"]
        sent = [m for m in self.state["inbox"] if m.get("from") == me]
        got = [m for m in self.state["inbox"] if m.get("to") == me]
        return {"stats": {"received_count": len(got), "total_contacts": len({m["to"] for m in sent} | {m.get("from") for m in got})}}


class GorillaFileSystem(Toolset):
    """A small in-memory file system (BFCL gorilla_file_system): {"root": {name: node}, "cwd": [path]};
    a node is {"type": "directory", "contents": {...}} or {"type": "file", "content": "..."}."""

    def __init__(self, state: dict | None = None) -> None:
        s = copy.deepcopy(state or {})
        root = s.get("root") or {"workspace": {"type": "directory", "contents": {}}}
        top = next(iter(root))
        super().__init__({"root": root, "cwd": s.get("cwd") or [top]})

    def snapshot(self) -> Any:
        return copy.deepcopy(self.state)

    def _node(self, path: list[str]) -> dict | None:
        node = self.state["root"].get(path[0])
        for p in path[1:]:
            if node is None or node["type"] != "directory":
                return None
            node = node["contents"].get(p)
        return node

    def _resolve(self, rel: str) -> list[str]:
        path = list(self.state["cwd"]) if not rel.startswith("/") else [next(iter(self.state["root"]))]
        for part in rel.strip("/").split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if len(path) > 1:
                    path.pop()
            else:
                path.append(part)
        return path

    def _dir(self) -> dict:
        return self._node(self.state["cwd"])["contents"]

    def _file(self, name: str) -> dict | str:
        node = self._node(self._resolve(name))
        if node is None:
            return f"No such file: {name}"
        if node["type"] != "file":
            return f"{name} is a directory"
        return node

    def pwd(self) -> dict:
        return {"current_working_directory": "/" + "/".join(self.state["cwd"])}

    def ls(self, a: bool = False) -> dict:
        return {"current_directory_content": [n for n in self._dir() if a or not n.startswith(".")]}

    def cd(self, folder: str) -> dict:
        path = self._resolve(folder)
        node = self._node(path)
        if node is None or node["type"] != "directory":
            return {"error": f"cd: {folder}: No such directory"}
        self.state["cwd"] = path
        return {"current_working_directory": path[-1]}

    def mkdir(self, dir_name: str) -> dict:
        if dir_name in self._dir():
            return {"error": f"mkdir: cannot create directory '{dir_name}': File exists"}
        self._dir()[dir_name] = {"type": "directory", "contents": {}}
        return {}

    def touch(self, file_name: str) -> dict:
        if file_name in self._dir():
            return {"error": f"touch: cannot touch '{file_name}': File exists"}
        self._dir()[file_name] = {"type": "file", "content": ""}
        return {}

    def echo(self, content: str, file_name: str | None = None) -> dict:
        if file_name is None:
            return {"terminal_output": content}
        node = self._dir().setdefault(file_name, {"type": "file", "content": ""})
        if node["type"] != "file":
            return {"error": f"echo: {file_name}: is a directory"}
        node["content"] = content
        return {"terminal_output": None}

    def cat(self, file_name: str) -> dict:
        f = self._file(file_name)
        return {"error": f"cat: {f}"} if isinstance(f, str) else {"file_content": f["content"]}

    def wc(self, file_name: str, mode: str = "l") -> dict:
        f = self._file(file_name)
        if isinstance(f, str):
            return {"error": f"wc: {f}"}
        c = f["content"]
        n = {"l": len(c.splitlines()), "w": len(c.split()), "c": len(c)}.get(mode)
        return {"error": f"wc: invalid mode {mode!r}"} if n is None else {"count": n, "type": {"l": "lines", "w": "words", "c": "characters"}[mode]}

    def sort(self, file_name: str) -> dict:
        f = self._file(file_name)
        return {"error": f"sort: {f}"} if isinstance(f, str) else {"sorted_content": "\n".join(sorted(f["content"].splitlines()))}

    def grep(self, file_name: str, pattern: str) -> dict:
        f = self._file(file_name)
        return {"error": f"grep: {f}"} if isinstance(f, str) else {"matching_lines": [ln for ln in f["content"].splitlines() if pattern in ln]}

    def tail(self, file_name: str, lines: int = 10) -> dict:
        f = self._file(file_name)
        return {"error": f"tail: {f}"} if isinstance(f, str) else {"last_lines": "\n".join(f["content"].splitlines()[-int(lines):])}

    def diff(self, file_name1: str, file_name2: str) -> dict:
        a, b = self._file(file_name1), self._file(file_name2)
        for x in (a, b):
            if isinstance(x, str):
                return {"error": f"diff: {x}"}
        la, lb = a["content"].splitlines(), b["content"].splitlines()
        out = [f"- {x}\n+ {y}" for x, y in zip(la, lb) if x != y]
        out += [f"- {x}" for x in la[len(lb):]] + [f"+ {y}" for y in lb[len(la):]]
        return {"diff_lines": "\n".join(out)}

    def find(self, path: str = ".", name: str | None = None) -> dict:
        start = self._resolve(path)
        node = self._node(start)
        if node is None:
            return {"error": f"find: '{path}': No such file or directory"}
        found: list[str] = []

        def walk(n: dict, rel: str) -> None:
            for k, v in n.get("contents", {}).items():
                p = f"{rel}/{k}"
                if name is None or name in k:
                    found.append(p)
                if v["type"] == "directory":
                    walk(v, p)

        walk(node, path.rstrip("/") or ".")
        return {"matches": found}

    def _move(self, source: str, destination: str, keep: bool, cmd: str) -> dict:
        d = self._dir()
        if source not in d:
            return {"error": f"{cmd}: cannot stat '{source}': No such file or directory"}
        node = d[source] if not keep else copy.deepcopy(d[source])
        target = self._node(self._resolve(destination))
        if target is not None and target["type"] == "directory":
            if source in target["contents"]:
                return {"error": f"{cmd}: '{destination}/{source}' already exists"}
            target["contents"][source] = node
            where = f"{destination}/{source}"
        elif target is None and "/" not in destination.strip("/"):
            d[destination] = node
            where = destination
        else:
            return {"error": f"{cmd}: cannot {cmd} '{source}' to '{destination}'"}
        if not keep:
            del d[source]
        return {"result": f"'{source}' {'copied' if keep else 'moved'} to '{where}'"}

    def mv(self, source: str, destination: str) -> dict:
        return self._move(source, destination, keep=False, cmd="mv")

    def cp(self, source: str, destination: str) -> dict:
        return self._move(source, destination, keep=True, cmd="cp")

    def rm(self, file_name: str) -> dict:
        if file_name not in self._dir():
            return {"error": f"rm: cannot remove '{file_name}': No such file or directory"}
        del self._dir()[file_name]
        return {"result": f"'{file_name}' removed"}

    def rmdir(self, dir_name: str) -> dict:
        node = self._dir().get(dir_name)
        if node is None or node["type"] != "directory":
            return {"error": f"rmdir: failed to remove '{dir_name}': No such directory"}
        if node["contents"]:
            return {"error": f"rmdir: failed to remove '{dir_name}': Directory not empty"}
        del self._dir()[dir_name]
        return {"result": f"'{dir_name}' removed"}

    def du(self, human_readable: bool = False) -> dict:
        def size(n: dict) -> int:
            return len(n["content"].encode()) if n["type"] == "file" else sum(size(v) for v in n["contents"].values())

        b = size(self._node(self.state["cwd"]))
        return {"disk_usage": f"{b / 1024:.2f} KB" if human_readable else f"{b} bytes"}
