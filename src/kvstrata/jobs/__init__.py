"""Agentic batch jobs: agent loops run by the engine, tools on CPU workers, checkpointed progress.

See docs/jobs.md. `JobManager` (manager.py) is the API the CLI (`kvstrata jobs`) and the HTTP routes
(routes.py, `POST /v1/jobs`) wrap.
"""

from kvstrata.jobs.manager import JobManager
from kvstrata.jobs.spec import JobSpec, TaskSpec, read_job_file
from kvstrata.jobs.tools import Tool, ToolContext, Toolset, tool

__all__ = ["JobManager", "JobSpec", "TaskSpec", "Tool", "ToolContext", "Toolset", "read_job_file", "tool"]
