"""The ``kvagent`` command line.

Subcommand groups live in their own modules, listed in :data:`COMMAND_MODULES`. Each module
defines ``add_parser(subparsers)``: it adds its group with ``subparsers.add_parser(...)`` and
sets ``func=handler`` on every leaf parser (``parser.set_defaults(func=...)``); a handler takes
the parsed ``argparse.Namespace`` and returns the exit status. Import heavy dependencies
(torch, transformers) inside handlers, not at module level, so ``kvagent --help`` stays fast.

Run as ``kvagent ...`` (installed entry point) or ``python -m kv_agent.cli ...``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# The one list of subcommand groups. Add a module here to plug in a new group.
COMMAND_MODULES = ("kv_agent.commands.memory", "kv_agent.commands.bench", "kv_agent.commands.store")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvagent", description="kv-agent: KV-cache memory for LLM agents")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
        return 2
    from kv_agent.errors import KvAgentError

    try:
        return int(func(args) or 0)
    except KvAgentError as e:
        print(f"kvagent: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `kvagent store ls PATH | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
