"""Rank-aware logging and progress.

The rank is read from the environment before any rich object exists, so that only rank 0 builds a
live display: rank 0 logs INFO with rich formatting and progress bars, every other rank logs WARNING
and above with a ``[rank N]`` prefix and no bars. Logs go to stderr; results (tables, JSON) go to
stdout through :func:`result_console`, on rank 0 only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from typing import Dict, Iterable, Iterator, Optional, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from turnctl.distributed import env_rank

LOGGER_NAME = "turnctl"
log = logging.getLogger(LOGGER_NAME)
T = TypeVar("T")

_stderr_console: Optional[Console] = None
_stdout_console: Optional[Console] = None



def printable_name(name: str) -> str:
    """``name`` as a UTF-8 file or a terminal can hold it: the bytes of a file name that are not UTF-8
    (Python reads them as lone surrogates: os.listdir, tar member names) become ``\\xNN``.

    Keys and class names come from file names (an ImageFolder's folders and files), which on Linux
    are bytes: ``caf\\xe9.jpg`` written in Latin-1 is a valid name there and a valid shard key, but
    not text; the report shows it escaped rather than fail on it.

    >>> printable_name(os.fsdecode(b"caf\\xe9_jpg")), printable_name("na\u00efve")
    ('caf\\\\xe9_jpg', 'naïve')
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name produced (e.g. from JSON): its code point
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def shown(value: object) -> str:
    """``value`` as rich prints it verbatim: :func:`printable_name`, then markup escaped (a path
    holding ``[red]x`` or ``[/x]`` is shown as it is, never read as a style or refused).

    >>> print(shown("runs/[red]x"))
    runs/\\[red]x
    """
    from rich.markup import escape

    return escape(printable_name(str(value)))


def _is_ci() -> bool:
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record, not the one at setup: a
    redirect or a test's capture made later (and then closed) must not turn records into
    "--- Logging error ---" tracebacks."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Configure the ``turnctl`` logger for this process's rank (idempotent)."""
    global _stderr_console
    rank = env_rank()
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.propagate = False
    if rank == 0:
        _stderr_console = Console(stderr=True)
        handler: logging.Handler
        if _stderr_console.is_terminal:
            handler = RichHandler(console=_stderr_console, show_path=False, rich_tracebacks=False, markup=False,
                                  log_time_format="[%X]")
            handler.setFormatter(logging.Formatter("%(message)s"))
        else:
            # A batch job's log file: one line per record (rich would wrap at 80 columns, splitting
            # paths and messages that people grep for).
            handler = _StderrHandler()
            # The date too: a job runs for days.
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.setLevel(logging.DEBUG if verbose else logging.INFO)
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        log.setLevel(logging.WARNING)
    log.addHandler(handler)
    # Third-party chatter (DeepSpeed prints INFO on every rank) stays quiet unless asked for.
    if not verbose:
        # torch deprecates the collective that DeepSpeed's all_gather_into_tensor wrapper calls; it
        # is DeepSpeed's to change, and the warning repeats on every rank of every run.
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
        for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return log


def result_console() -> Console:
    """Console for results on stdout (use on rank 0 only)."""
    global _stdout_console
    if _stdout_console is None:
        _stdout_console = Console(soft_wrap=True)
    return _stdout_console


def error_console() -> Console:
    global _stderr_console
    if _stderr_console is None:
        _stderr_console = Console(stderr=True)
    return _stderr_console


PROGRESS_EVERY_S = 60.0  # output.progress_every_s's default


def env_flag(name: str) -> bool:
    """An on/off environment variable: unset, empty, 0, false, no and off are off (so that
    ``TURNCTL_NO_PROGRESS=0`` keeps the bars, as it reads)."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


_progress_every: Dict[str, float] = {}


def set_progress_every(seconds: float) -> None:
    """The interval of plain progress lines (``output.progress_every_s``; the runner sets it)."""
    _progress_every["s"] = float(seconds)


def progress_every_s() -> float:
    """``TURNCTL_PROGRESS_EVERY_S`` if set (a number > 0), else the recipe's, else 60 s."""
    try:
        value = float(os.environ["TURNCTL_PROGRESS_EVERY_S"])
        if value > 0:
            return value
    except (KeyError, ValueError):
        pass
    return _progress_every.get("s", PROGRESS_EVERY_S)


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(description: str, done: int, total: Optional[int], elapsed: float,
                  batch_size: Optional[int] = None) -> str:
    """One plain progress line for a log file: phase, done / total, rate, elapsed, ETA.

    >>> progress_line("fine-tune epoch 3", 120, 390, 150.0, batch_size=16)
    'fine-tune epoch 3: 120/390 (31%), 12.8 samples/s, elapsed 0:02:30, ETA 0:05:37'
    >>> progress_line("writing train", 5, None, 10.0)
    'writing train: 5, 0.50 steps/s, elapsed 0:00:10'
    """
    rate = done / elapsed if elapsed > 0 else 0.0
    head = f"{description}: {done}/{total} ({100 * done / total:.0f}%)" if total else f"{description}: {done}"
    speed = f"{rate * batch_size:.1f} samples/s" if batch_size else f"{rate:.2f} steps/s"
    eta = f", ETA {_clock((total - done) / rate)}" if total and rate > 0 and done < total else ""
    return f"{head}, {speed}, elapsed {_clock(elapsed)}{eta}"


@contextlib.contextmanager
def progress(disable: bool = False) -> Iterator[Optional[Progress]]:
    """A rich progress display on rank 0 (None elsewhere, in CI, or when disabled)."""
    if disable or env_rank() != 0 or env_flag("TURNCTL_NO_PROGRESS"):
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=error_console(),
        transient=True, disable=_is_ci(),
    )
    with bar:
        yield bar


def track(items: Iterable[T], description: str, total: Optional[int] = None, *,
          batch_size: Optional[int] = None) -> Iterator[T]:
    """Iterate with progress on rank 0 only: a rich bar in a terminal; in a log file (stderr not a
    terminal, or CI) one plain :func:`progress_line` at most every :func:`progress_every_s`, and a
    last one when the phase took longer than that. ``batch_size`` turns steps/s into samples/s."""
    if env_rank() != 0 or env_flag("TURNCTL_NO_PROGRESS"):
        yield from items
        return
    if not _is_ci():
        with progress() as bar:
            assert bar is not None
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    every = progress_every_s()
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every:
            log.info("%s", progress_line(description, done, total, now - start, batch_size))
            last = now
    if last > start:  # lines were written: say that the phase ended
        log.info("%s", progress_line(description, done, total, time.monotonic() - start, batch_size) + ", done")
