"""A stand-in for ``srun`` on one machine, for tests/test_slurm_examples.py.

    fake_srun.py [srun options] COMMAND ...

Starts the step's tasks as srun does on one node: SLURM_NTASKS tasks (``--ntasks-per-node`` x
SLURM_NNODES when given), each with the variables srun sets for a task (SLURM_STEP_ID, SLURM_PROCID,
SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_NUM_TASKS, SLURM_STEP_TASKS_PER_NODE, SLURM_STEP_NODELIST),
waits for all of them, and exits with the first non-zero status (``--kill-on-bad-exit``: the others
are killed then).
"""

import os
import signal
import subprocess
import sys
import time


def main() -> int:
    args = sys.argv[1:]
    per_node = None
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt.startswith("--ntasks-per-node="):
            per_node = int(opt.split("=", 1)[1])
        elif opt in ("-n", "--ntasks"):
            os.environ["SLURM_NTASKS"] = args.pop(0)
        # anything else (--kill-on-bad-exit=1, ...) changes nothing on one machine
    nodes = int(os.environ.get("SLURM_NNODES", "1"))
    ntasks = per_node * nodes if per_node else int(os.environ.get("SLURM_NTASKS", "1"))
    procs = []
    for task in range(ntasks):
        env = dict(os.environ, SLURM_STEP_ID="0", SLURM_PROCID=str(task), SLURM_LOCALID=str(task),
                   SLURM_NODEID="0", SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_STEP_TASKS_PER_NODE=str(ntasks),
                   SLURM_STEP_NODELIST=os.environ.get("SLURM_JOB_NODELIST", "localhost"))
        procs.append(subprocess.Popen(args, env=env, start_new_session=True))
    code = 0
    while any(p.poll() is None for p in procs):
        bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if bad:
            code = bad[0]
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
        time.sleep(0.1)
    return code or next((p.returncode for p in procs if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
