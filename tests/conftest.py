import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TURNCTL_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CIFAR10_JPG = SHARED_DATA / "cifar10-jpg.tar.gz"


@pytest.fixture
def repo() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _no_shm_left_behind():
    """After each module (its launches have all exited): free what killed ranks left in /dev/shm."""
    yield
    from launch import remove_leftover_shm

    remove_leftover_shm()


@pytest.fixture(autouse=True)
def _clean_dist_env(monkeypatch):
    """In-process tests are a world of one whatever the outer environment says."""
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    yield
