"""The harness's messages: one `logging` logger, "bench", that knows its rank; and the console renderer (`show`).

- Messages (`log.info`, `note`, `log.warning`, `log.debug`) come from rank 0 by default; `--log_ranks all` lets
  every rank speak, each line then starting `[rank N] `. Errors come from every rank: each rank that refuses says so.
- `--log_level` sets how much is said (debug < info < note < warning < error); the level names are logging's.
  Warnings, notes and errors go to stderr as `warning: ...`, `note: ...`, `error: ...`; info and debug to stdout.
- `show(text)` is the console renderer: the configuration and result tables, the step lines and a command line
  tool's answer go to stdout whatever the level, since they are what the user asked for.

Each message is one write(2), so the lines of ranks sharing a terminal or a log file never interleave. Another
program embedding the harness can attach its own handlers to logging.getLogger("bench") (configure(own=False)).
"""
from __future__ import annotations

import logging
import os
import sys

NOTE = 25  # between INFO and WARNING: worth saying on a quiet run (a resume, a stop before the run began)
logging.addLevelName(NOTE, "NOTE")
LEVELS = ("debug", "info", "note", "warning", "error")

log = logging.getLogger("bench")
_PREFIX = {logging.WARNING: "warning: ", NOTE: "note: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, every_rank: bool):
        super().__init__()
        self.rank, self.every_rank = rank, every_rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.every_rank or self.rank == 0 or record.levelno >= logging.ERROR


class _Handler(logging.Handler):
    """stdout below NOTE, stderr from it; every line of an error carries the prefix (a refusal listing several
    problems), the rank's tag when every rank speaks."""

    def __init__(self, rank: int, every_rank: bool):
        super().__init__()
        self.tag = f"[rank {rank}] " if every_rank else ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = self.tag + _PREFIX.get(record.levelno, "")
            lines = record.getMessage().splitlines() or [""]
            if record.levelno >= logging.ERROR:
                text = "".join(f"{prefix}{line}\n" for line in lines)
            else:
                text = prefix + "\n".join(lines) + "\n"
            if record.exc_info:
                text += logging.Formatter().formatException(record.exc_info) + "\n"
            stream = sys.stderr if record.levelno >= NOTE else sys.stdout
            _write(stream, text)
        except Exception:  # noqa: BLE001 - logging's contract: a message that cannot be written ends nothing
            self.handleError(record)


def _write(stream, text: str) -> None:
    stream.flush()  # what Python buffered goes first, so the order on the terminal is the order of the calls
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a captured or replaced stream (pytest, a notebook)
        stream.write(text)
        stream.flush()
        return
    os.write(fd, text.encode())


def configure(rank: int | None = None, level: str = "info", every_rank: bool = False, own: bool = True) -> None:
    """Set the rank, level and which ranks speak (bench/run.py once its flags are parsed). own=False leaves the
    handlers to the embedding program."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    log.setLevel(NOTE if level == "note" else getattr(logging, level.upper()))
    log.propagate = not own
    for old in list(log.handlers):
        log.removeHandler(old)
    if own:
        handler = _Handler(rank, every_rank)
        handler.addFilter(_RankFilter(rank, every_rank))
        log.addHandler(handler)


def note(message: str) -> None:
    log.log(NOTE, message)


def show(text: str) -> None:
    """The console renderer: a table, a step line or a tool's answer, to stdout in one write."""
    _write(sys.stdout, text if text.endswith("\n") else text + "\n")


configure()  # until bench/run.py knows its flags: info, rank 0 speaks (RANK from the launcher)
