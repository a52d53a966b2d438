"""The server's limits on what one request, one job or one API key may take (docs/server.md, "Limits").

One frozen dataclass, a help string per field; `kvstrata serve` gets a `--<field>` flag for each
(config.add_config_args, config.config_from_args, as for every configuration dataclass). Every limit answers a client that passes it with a clear 4xx
(413 for a body, 400 for the rest, 429 for a quota) and changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvstrata.config import _f, parse_bytes
from kvstrata.core import KvstrataError

if TYPE_CHECKING:  # (imported where used: the CLI's parser reads this file without torch or FastAPI)
    from kvstrata.engine.admission import AdmissionPolicy
    from kvstrata.jobs.spec import JobLimits


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = _f(8 << 20, "largest request body; a larger one gets 413 while it is read (e.g. 8M)",
                             bytes=True)
    max_metadata_bytes: int = _f(16 << 10, "largest `metadata` of a session or response, as JSON bytes")
    max_lease_s: float = _f(86400.0, "longest `lease_s` a park may ask for, in seconds (KV pinned in a tier)")
    interactive_reserve: int | None = _f(None, "admission slots only interactive requests may take "
                                         "(default: a quarter of --max-waiting)")
    max_concurrent_per_key: int = _f(64, "requests one API key may have in progress at once (0: no limit)")
    max_queued_per_key: int = _f(128, "more requests of one API key that may wait for one of its slots; "
                                 "beyond them 429 (0: none wait)")
    max_job_tasks: int = _f(10_000, "most tasks in one job submitted to /v1/jobs")
    max_job_agents: int = _f(64, "largest `max_concurrent_agents` a job may ask for")
    max_tool_workers: int = _f(16, "largest `tool_workers` a job may ask for (default of a job: min(CPUs, this))")

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_body_bytes", parse_bytes(self.max_body_bytes))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and (isinstance(v, bool) or v < 0):
                raise KvstrataError(f"--{f.name.replace('_', '-')} must be >= 0, got {v!r}")
        if self.max_job_tasks < 1 or self.max_job_agents < 1 or self.max_tool_workers < 1 or self.max_lease_s <= 0:
            raise KvstrataError("--max-job-tasks, --max-job-agents, --max-tool-workers and --max-lease-s must be > 0")

    def admission(self, max_num_seqs: int, max_waiting: int, keyed: bool) -> AdmissionPolicy:
        """Per-key quotas apply only where API keys are configured (an open server has one tenant)."""
        from kvstrata.engine.admission import AdmissionPolicy

        return AdmissionPolicy.for_engine(
            max_num_seqs, max_waiting, interactive_reserve=self.interactive_reserve,
            per_key_concurrency=self.max_concurrent_per_key if keyed else 0,
            per_key_queue=self.max_queued_per_key if keyed else 0)

    def jobs(self) -> JobLimits:
        from kvstrata.jobs.spec import JobLimits

        return JobLimits(self.max_job_tasks, self.max_job_agents, self.max_tool_workers)

    # -- checks the routes call --------------------------------------------------------------------
    def check_metadata(self, metadata: Any, param: str = "metadata") -> None:
        if metadata is None:
            return
        n = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        if n > self.max_metadata_bytes:
            from kvstrata.server.errors import APIError

            raise APIError(400, f"{param} is {n} bytes as JSON; this server keeps at most {self.max_metadata_bytes} "
                           "(--max-metadata-bytes)", code="invalid_request", param=param)

    def check_lease(self, lease_s: float | None) -> None:
        if lease_s is not None and lease_s > self.max_lease_s:
            from kvstrata.server.errors import APIError

            raise APIError(400, f"lease_s {lease_s:g} is longer than this server allows ({self.max_lease_s:g} s, "
                           "--max-lease-s); park again before the lease ends to keep the KV pinned",
                           code="invalid_request", param="lease_s")
