"""turnctl's CLI with one fault injected, for tests/test_faults.py.

    TURNCTL_TEST_FAULT=SIGNAL:RANK:EPOCH:STEP  python fault_inject.py train ...

Rank RANK sends itself SIGNAL (KILL, STOP, TERM, USR1) at fine-tuning epoch EPOCH, micro-step STEP,
after that step's forward and before its all-reduce: the process really gets the signal, at a
point in the middle of an epoch that the test can name, with no hook in turnctl itself.
``SLOW:*:EPOCH:STEP`` instead makes every rank (or RANK) sleep 0.5 s per micro-step from there on,
which gives a test that signals from outside a window in the middle of an epoch.
Launched like turnctl (``deepspeed fault_inject.py ...`` or one process per rank by hand).
"""

import os
import signal
import sys
import time


def _arm(spec: str) -> None:
    from turnctl.finetune import FineTuner

    name, rank, epoch, step = spec.split(":")
    if rank != "*" and int(os.environ.get("RANK", "0")) != int(rank):
        return
    original = FineTuner._check_step

    def check_step(self, per_sample, batch, e, s, stop):
        if name == "SLOW":
            if (e, s) >= (int(epoch), int(step)):
                time.sleep(0.5)
        elif (e, s) == (int(epoch), int(step)):
            sig = getattr(signal, f"SIG{name}")
            sys.stderr.write(f"fault_inject: rank {rank} sends itself SIG{name} at epoch {e} step {s}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), sig)
        return original(self, per_sample, batch, e, s, stop)

    FineTuner._check_step = check_step


if __name__ == "__main__":
    if os.environ.get("TURNCTL_TEST_FAULT"):
        _arm(os.environ["TURNCTL_TEST_FAULT"])
    from turnctl.cli import main

    main(sys.argv[1:])
