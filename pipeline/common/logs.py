"""Logging set-up for the entry points. Library code logs through ``logging.getLogger(__name__)``
and never configures logging itself; an entry point (``python -m dasheng_pipeline...``, the command line)
calls :func:`setup` once. Progress bars stay on tqdm. (And the entry points' argument parser,
:func:`entry_parser`.)"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager


class _Formatter(logging.Formatter):
    """Plain messages; warnings and errors prefixed with their level (``WARNING: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname}: {message}"


def entry_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The argument parser of the entry point ``python -m <module>``, described by the first
    paragraph of its docstring ``doc``."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])


def setup(level: int = logging.INFO, stream=None) -> None:
    """Send log records of this project (and warnings of the libraries) to ``stream`` (stdout:
    the rules capture stdout and stderr into their log files)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("dasheng_pipeline", "dasheng_model"):
        logging.getLogger(name).setLevel(level)


@contextmanager
def one_line_errors(*expected: type[BaseException]):
    """For entry points: an expected error (``ValueError`` by default: bad task folders, bad
    input, bad config) becomes one ``error: ...`` line on stderr and exit status 1 instead of a
    traceback; anything else still raises with its traceback (a bug, not bad input)."""
    caught = expected or (ValueError,)
    try:
        yield
    except caught as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
