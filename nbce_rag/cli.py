"""The ``nbce-rag`` command. Each subcommand lives in ``nbce_rag/commands/<name>.py`` and
exposes ``register(subparsers)``; heavy imports (torch, models) happen inside its handler so
that ``--help`` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from typing import List, Optional

from nbce_rag import __version__
from nbce_rag.errors import CorruptFileError, NBCERagError

#: Subcommands in the order ``--help`` lists them. A module that is not there yet is skipped.
#: (``ask`` also registers ``chat``: questions read in a loop with the models loaded once.)
COMMANDS = ["generate", "ask", "index", "cache", "search", "train", "calibrate", "serve", "demo"]

#: Exit status for bad input (an option, a question, a file): argparse's own, and the one of
#: every error raised by checking what the user gave. Other failures exit with 1.
EXIT_BAD_INPUT = 2

logger = logging.getLogger("nbce_rag.cli")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one ``--help`` away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from nbce_rag.commands.arguments import HelpFormatter, examples

    parser = _Parser(
        prog="nbce-rag",
        description="Answer questions from many passages with NBCE decoding "
        "(CoSENT retrieval, margin-calibrated filtering).",
        epilog=examples(
            "nbce-rag demo                                   # index Python's docs, answer a question",
            "nbce-rag index docs/ --out my_index             # chunk and embed a folder of documents",
            "nbce-rag ask \"How do I open a file?\" --index my_index",
            "nbce-rag chat --index my_index                  # several questions, models loaded once",
            "nbce-rag COMMAND --help                         # options and examples of a command",
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nbce-rag {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug, with the traceback of an error)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"nbce_rag.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"nbce_rag.commands.{name}":
                continue
            raise
        mod.register(sub)
    for p in sub.choices.values():
        if p.formatter_class is argparse.HelpFormatter:
            p.formatter_class = HelpFormatter  # keeps the examples of each epilog as written
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from nbce_rag.runtime import keep_freed_memory

    keep_freed_memory()  # big KV buffers are recycled instead of page-faulted in afresh (nbce_rag/runtime.py)
    try:
        with warnings.catch_warnings():  # a library warning is one line that names the command, not a source line
            warnings.showwarning = _warning_printer(args.command, args.verbose)
            rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001 - sorted below; anything else propagates
        code = exit_code(e)
        if code is None:
            raise
        logger.debug("the traceback of the error below", exc_info=True)
        print(f"nbce-rag {args.command}: error: {one_line(e)}", file=sys.stderr)
        return code
    return int(rc or 0)


def _warning_printer(command: str, verbose: int):
    """``warnings.showwarning`` for the CLI: ``nbce-rag COMMAND: warning: message`` on stderr
    (the source path and line only with ``-vv``)."""

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001 - the signature of showwarning
        where = f" ({filename}:{lineno})" if verbose >= 2 else ""
        print(f"nbce-rag {command}: warning: {one_line(message) if isinstance(message, Warning) else message}{where}",
              file=file or sys.stderr)

    return show


def exit_code(e: BaseException) -> Optional[int]:
    """2 for bad input: an option or question out of range (``ConfigError``, ``ValueError``,
    ``TypeError``), a damaged or mismatched file (``CorruptFileError``, ...), a path that does
    not exist; 1 for the other errors nbce-rag raises on purpose (a model that cannot load) and
    for other I/O errors; ``None`` for a bug (the traceback is shown)."""
    if isinstance(e, (CorruptFileError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_BAD_INPUT
    if isinstance(e, (NBCERagError, OSError)):
        return 1
    return None


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (a multi-line message is joined)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text += f": {e.filename}"
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
