"""What every command-line tool shares: one-line errors, and ``--debug`` for the traceback.

A tool's failure is said in one line that names the file and the problem; the traceback is for
developers and shows with ``--debug`` (or ``SHARP_FPN_DEBUG=1``)::

    def main(argv=None) -> int:
        parser = build_parser()          # has add_debug_argument(parser)
        args = parser.parse_args(argv)
        ...

    if __name__ == "__main__":
        sys.exit(run(main))

No torch, no detectron2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

__all__ = ["EXIT_ERROR", "UserError", "add_debug_argument", "debug_requested", "one_line", "run"]

#: Exit status of a run that stopped on an error (argparse's usage errors exit with 2).
EXIT_ERROR = 1


class UserError(Exception):
    """A problem with what the user gave (a file, an option): its message is the whole story."""


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the whole traceback, not one line")


def debug_requested(argv: Optional[List[str]] = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("SHARP_FPN_DEBUG", "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """``error`` as one line: its message; the exception's kind too where it is not a problem
    of the user's input (a bug, which ``--debug`` shows in full)."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (UserError, FileNotFoundError, PermissionError, IsADirectoryError,
                          NotADirectoryError, ValueError, RuntimeError, OSError)):
        return message
    return f"{type(error).__name__}: {message} (run again with --debug for the traceback)"


def run(main: Callable[..., int], argv: Optional[List[str]] = None) -> int:
    """``main(argv)``'s exit status; an exception becomes one line on stderr and status 1,
    unless ``--debug`` is among the arguments (then it propagates, traceback and all)."""
    try:
        return main(argv) if argv is not None else main()
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (every failure is reported, in one line)
        if debug_requested(argv):
            raise
        print(f"{Path(sys.argv[0]).name}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
