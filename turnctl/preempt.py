"""SIGTERM / SIGUSR1 during fine-tuning -> a checkpoint, then a clean exit that ``--resume`` continues.

Schedulers give a job a grace period between SIGTERM and SIGKILL (Slurm's ``KillWait``, 30 s by
default; DeepSpeed's launcher also waits 30 s; Kubernetes 30 s), and Slurm can send SIGUSR1 ahead of
the time limit (``--signal=USR1@120``). Within that period turnctl finishes the optimizer step it is
in, writes a mid-epoch checkpoint and exits with :data:`EXIT_PREEMPTED` (128 + SIGTERM).

A signal often reaches only some ranks (``kill`` by hand, Kubernetes' PID 1). The flag is therefore
only a local wish: the training loop all-reduces it (MAX) with the non-finite-loss flag it already
reduces every micro-step, so every rank stops at the same optimizer-step boundary, at no extra
collective. Repeated signals are ignored: under Slurm every process of the job gets SIGTERM, and
DeepSpeed's launcher, getting its own, sends each rank another one at once; the checkpoint must
survive that. The scheduler's SIGKILL at the end of the grace period remains the hard stop.

    >>> with StopRequest() as stop:
    ...     stop.requested
    False
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

from turnctl.errors import TurnctlError
from turnctl.logger import log

EXIT_PREEMPTED = 128 + int(signal.SIGTERM)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(TurnctlError):
    """The run stopped on a signal after writing a checkpoint (not a failure of the run itself)."""

    exit_code = EXIT_PREEMPTED
    label = "stopped: "

    def __init__(self, message: str, *, signum: Optional[int] = None) -> None:
        super().__init__(message)
        self.signum = signum  # this rank's signal (None: another rank's): SIGUSR1 may requeue (turnctl/slurm.py)


class StopRequest:
    """While active, SIGTERM/SIGUSR1 set :attr:`requested` instead of killing the process.

    Installs handlers only in the main thread (Python's rule) and restores the previous ones on exit,
    so outside the fine-tuning loop a SIGTERM keeps its default meaning (nothing to checkpoint there).
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # already stopping (see the module docstring)
            return
        self.signum = signum
        log.warning("received %s: finishing this optimizer step, then writing a checkpoint",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
