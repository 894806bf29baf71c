"""Entry point for ``python -m turnctl`` and for ``deepspeed turnctl ...`` / ``python turnctl ...``.

DeepSpeed's launcher runs ``python -u turnctl --local_rank=N <args>`` from the current directory,
which executes this *directory* as a script: ``sys.path[0]`` is then ``.../turnctl`` itself, so
``import turnctl`` would fail and any module in here could shadow a top-level module. We therefore
swap that entry for the parent directory before importing anything else.
"""

import os
import sys

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == _here:
        sys.path[0] = os.path.dirname(_here)
    else:  # pragma: no cover - executed by some other path form
        sys.path.insert(0, os.path.dirname(_here))

from turnctl.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
