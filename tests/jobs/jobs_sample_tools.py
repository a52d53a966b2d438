"""Tools for the jobs tests, loaded by module path (`jobs_sample_tools`) and through an entry point.

`pick` appends one line per execution to $KVSTRATA_TEST_SIDE_EFFECTS (when set): the tests count
executions with it. Before that it writes its call id and start time to $KVSTRATA_TEST_TOOL_BEGIN and sleeps
$KVSTRATA_TEST_TOOL_DELAY seconds, so a test can kill the process inside a call that has started but
not had its effect.
"""

from __future__ import annotations

import json
import os
import time

from kvstrata.jobs.tools import ToolContext, tool

DIGITS = {"type": "object", "properties": {"n": {"type": "integer", "enum": [1, 2, 3, 4]}}, "required": ["n"]}


@tool(description="Pick a number.", parameters=DIGITS)
def pick(n: int, tool_context: ToolContext) -> dict:
    begin = os.environ.get("KVSTRATA_TEST_TOOL_BEGIN")
    if begin:  # "this call has started (at this wall time)", no effect yet
        with open(begin, "a") as f:
            f.write(f"{tool_context.call_id} {time.time()}\n")
    time.sleep(float(os.environ.get("KVSTRATA_TEST_TOOL_DELAY", "0")))
    path = os.environ.get("KVSTRATA_TEST_SIDE_EFFECTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"call_id": tool_context.call_id, "task_id": tool_context.task_id, "n": n,
                                "attempt": tool_context.attempt, "pid": os.getpid()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return {"picked": n, "double": 2 * n}


def explode() -> str:
    """Always fails."""
    raise ValueError("boom: this tool fails on purpose")


def hang() -> str:
    """Never answers in time."""
    time.sleep(20)
    return "too late"


def garbage() -> object:
    """Returns something that is not JSON."""
    return {1, 2, 3}
