"""`kvstrata` command line: one sub-command per module, imported only when used.

Each sub-command module defines `add_arguments(parser)` and `run(args) -> int`. User errors
(KvstrataError) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from kvstrata.core import KvstrataError
from kvstrata.startup import arena_key, discard_arena, hold_gc, prefault_arena, release_gc

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("kvstrata.cli.generate", "generate text for prompts or chat messages"),
    "chat": ("kvstrata.cli.chat", "interactive chat, streaming tokens as they come"),
    "serve": ("kvstrata.cli.serve", "run the OpenAI-compatible HTTP server"),
    "cache": ("kvstrata.cli.cache", "inspect, verify or clear the KV tiers"),
    "plan": ("kvstrata.cli.plan", "predict where bytes live, speed and cost across hardware"),
    "jobs": ("kvstrata.cli.jobs", "run files of agent tasks without a person in the loop"),
}


def builds_engine(args: argparse.Namespace) -> bool:
    """Whether this command builds an engine in this process (then its weight arena is backed while torch
    imports, startup.py): not `serve` as a cluster (the replicas build theirs) nor `jobs status|results`.
    A map nobody takes stays until the command ends, so a long-running command must not get one."""
    if args.command == "serve":
        from kvstrata.cli.serve import wants_cluster

        return not wants_cluster(args)
    if args.command == "jobs":
        return getattr(args, "jobs_command", None) == "run"
    return args.command in ("generate", "chat")


def _back_the_arena_early(args: argparse.Namespace) -> None:
    from kvstrata.config import engine_config_from_args

    try:
        cfg = engine_config_from_args(args)
    except (KvstrataError, AttributeError, TypeError, ValueError):  # (the command reports a bad setting itself)
        return
    prefault_arena(arena_key(cfg.model, cfg.quantization, cfg.device, cfg.dtype))


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstrata", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen command's module is imported (torch stays out of `kvstrata plan`).
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name == module:
                    raise KvstrataError(f"`kvstrata {name}` is not available in this build") from e
                raise
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv_given_by_process = argv is None  # (a call from a program keeps its own collector's generations)
    argv = list(sys.argv[1:] if argv is None else argv)
    hold_gc(freeze=argv_given_by_process)  # until the engine is built (or the command ends): see startup.py
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        if argv_given_by_process and builds_engine(args):
            _back_the_arena_early(args)
        return int(args._run(args) or 0)
    except KvstrataError as e:
        print(f"kvstrata: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        release_gc()
        discard_arena()  # (one the command never took)


if __name__ == "__main__":
    sys.exit(main())
