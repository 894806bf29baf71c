"""Rank 0 fails inside run_on_main; every rank must stop with an error, none may wait for the timeout."""
import sys

from turnctl import distributed as dist
from turnctl.errors import DistributedError

dist.init_distributed(timeout_minutes=10)


def boom():
    raise ValueError("the probe exploded")


try:
    dist.run_on_main(boom, what="the test step")
except ValueError as exc:
    sys.stdout.write(f"rank {dist.rank()}: own error: {exc}\n"); sys.stdout.flush()
    code = 3
except DistributedError as exc:
    sys.stdout.write(f"rank {dist.rank()}: {exc}\n"); sys.stdout.flush()
    code = 4
else:
    code = 0
value = dist.run_on_main(lambda: [1, 2, 3], what="a good step")
# One write per line: both ranks share stdout, and print()'s separate writes interleave.
sys.stdout.write(f"rank {dist.rank()}: value {value}\n")
sys.stdout.flush()
dist.destroy()
sys.exit(code)
