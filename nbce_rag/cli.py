"""The ``nbce-rag`` command. Each subcommand lives in ``nbce_rag/commands/<name>.py`` and
exposes ``register(subparsers)``; heavy imports (torch, models) happen inside its handler so
that ``--help`` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from . import __version__
from .errors import NBCERagError

#: Subcommands in the order ``--help`` lists them. A module that is not there yet is skipped.
COMMANDS = ["generate", "ask", "index", "cache", "search", "train", "calibrate", "serve", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbce-rag",
        description="Answer questions from many passages with NBCE decoding "
        "(CoSENT retrieval, margin-calibrated filtering).",
    )
    parser.add_argument("--version", action="version", version=f"nbce-rag {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"nbce_rag.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"nbce_rag.commands.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        rc = args.func(args)
    except NBCERagError as e:
        print(f"nbce-rag {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
