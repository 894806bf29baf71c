"""pytest's settings for every run from this repository: tests/ and the docstring examples of
turnctl/ (collected by --doctest-modules, pyproject.toml) share one environment."""

import os

# A CPU run everywhere (DeepSpeed otherwise probes for an accelerator and prints about it), no
# progress bars, and no Hugging Face hub traffic.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TURNCTL_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Programs the tests launch, not test modules: --doctest-modules would import (and run) them.
collect_ignore = ["tests/scripts"]
