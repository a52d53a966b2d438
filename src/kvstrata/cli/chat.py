"""`kvstrata chat`: an interactive conversation, streaming tokens as they come.

Each turn reuses the previous turns' KV through the prefix cache, so only the new message is computed.
Commands: /reset clears the history, /exit (or EOF) quits.
"""

from __future__ import annotations

import argparse
import sys

from kvstrata.cli.generate import add_sampling_args, sampling_from_args
from kvstrata.config import add_engine_args, engine_config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p)
    p.set_defaults(max_tokens=512)
    add_engine_args(p)


def run(a: argparse.Namespace) -> int:
    from kvstrata.engine.llm_engine import LLMEngine

    params = sampling_from_args(a)
    engine = LLMEngine(engine_config_from_args(a))
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = history[:1] if a.system else []
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        rid = engine.add_request(engine.tokenizer.encode_chat(history), params)
        shown = 0
        reply = ""
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id != rid:
                    continue
                reply = out.outputs[0].text
                sys.stdout.write(reply[shown:])
                sys.stdout.flush()
                shown = len(reply)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
