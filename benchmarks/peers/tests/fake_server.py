"""A tiny OpenAI-compatible streaming chat server for tests: real HTTP on a free 127.0.0.1 port.

It streams `max_tokens` content chunks ``tok0 tok1 ...`` `delay_s` apart, then a usage chunk, and
records every request body. ``"fail"`` in the last message's content answers HTTP 500.
``/v1/completions`` takes token-id prompts the same way, reports as cached the longest prefix it shares with
any earlier prompt (a perfect prefix cache), and records each request's (start, end) time in `spans`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from benchmarks.agent_replay.prompts import common_prefix


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    def __init__(self, delay_s: float = 0.01, send_usage: bool = True):
        self.delay_s, self.send_usage = delay_s, send_usage
        self.requests: list[dict] = []
        self.spans: list[list] = []  # completions: [received, last chunk sent, body] (perf_counter)
        self.port = _free_port()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(req: Request):
            body = await req.json()
            self.requests.append(body)
            if "fail" in body["messages"][-1]["content"]:
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            n = body["max_tokens"]
            prompt = sum(len(m["content"].split()) for m in body["messages"])

            async def gen():
                for i in range(n):
                    await asyncio.sleep(self.delay_s)
                    yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f"tok{i} "}}]}) + "\n\n"
                if self.send_usage:
                    usage = {"prompt_tokens": prompt, "completion_tokens": n, "prompt_tokens_details": {"cached_tokens": 3}}
                    yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(req: Request):
            body = await req.json()
            t0 = time.perf_counter()
            ids = body["prompt"]
            cached = max((common_prefix(ids, b["prompt"]) for _, _, b in self.spans), default=0)
            span = [t0, t0, body]
            self.spans.append(span)

            async def gen():
                for i in range(body["max_tokens"]):
                    await asyncio.sleep(self.delay_s)
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": f"t{i} "}]}) + "\n\n"
                usage = {"prompt_tokens": len(ids), "completion_tokens": body["max_tokens"],
                         "prompt_tokens_details": {"cached_tokens": cached, "cached_tokens_by_tier": {"device": cached}}}
                yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
                span[1] = time.perf_counter()
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
