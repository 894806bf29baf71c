"""The run directory: the resolved recipe, metrics, selections, checkpoints and exports of one run.

    <run>/recipe.yaml            the resolved recipe (what --resume checks against)
    <run>/metrics.jsonl          one line per LP epoch and per FFT epoch
    <run>/selection/epoch_E.npz  idx, loss, clean_prob, selected (+ keep, given, clean, pred, heldout)
    <run>/validation_holdout.npz the train idx held out for validation (data.val_fraction > 0)
    <run>/checkpoints/epoch_E/   DeepSpeed checkpoints (every rank's shard), the last K kept
    <run>/final/  <run>/best/    Hugging Face exports (config + safetensors, classifier included)
    <run>/summary.json           the run's result, written last

Only rank 0 writes these files (DeepSpeed checkpoints excepted), always to a temporary name that is
then renamed, so an interrupted run never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from turnctl import distributed as dist
from turnctl.errors import TurnctlError
from turnctl.logger import log
from turnctl.recipe import Recipe


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)  # a full disk or a signal leaves no stray temporary behind
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    from turnctl.commands.common import _jsonable

    atomic_write_text(path, json.dumps(_jsonable(payload), indent=2) + "\n")


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink()
    except OSError:
        pass


def _fresh_default_dir(name: str) -> Path:
    """runs/<name>-<time>, created here: a -2, -3 ... suffix when two runs start in the same second (a
    job array), so that two runs never share a directory."""
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "too many runs of this name started this second", str(base))


def _comparable(recipe: Recipe) -> Dict[str, Any]:
    d = recipe.model_dump(mode="json")
    d["output"].pop("dir", None)
    return d


class RunDir:
    """Paths and rank-0 writers of one run; created collectively so every rank agrees on it."""

    def __init__(self, path: Path, recipe: Recipe):
        self.path = Path(path)
        self.recipe = recipe
        self.history: List[Dict[str, Any]] = []
        self._tb = None

    @classmethod
    def open(cls, recipe: Recipe, *, resume: bool) -> "RunDir":
        """Create (or, with resume, reopen) the run directory. Collective.

        Rank 0 decides, creates the directory and writes ``recipe.yaml`` (which proves the location
        writable) before any long work; a problem is broadcast so that every rank stops with the same
        line. Files turnctl did not write are never touched: a directory that exists must be empty,
        or with ``--resume`` hold a run whose ``recipe.yaml`` equals this recipe.
        """
        if dist.rank() == 0:
            path, problem = cls._decide(recipe, resume)
            decision = {"path": str(path) if path else None, "problem": problem}
        else:
            decision = None
        decision = dist.broadcast_object(decision)
        if decision["problem"]:
            raise TurnctlError(decision["problem"])
        run = cls(Path(decision["path"]), recipe)
        dist.barrier()
        return run

    @staticmethod
    def _decide(recipe: Recipe, resume: bool):
        """(path, None) with the run directory created and recipe.yaml written, or (path, problem)."""
        if recipe.output.dir:
            path = Path(recipe.output.dir)
        elif resume:
            return None, "--resume needs the run to continue: pass --out RUN_DIR"
        else:
            try:
                path = _fresh_default_dir(recipe.name)
            except OSError as exc:
                return Path("runs"), (f"runs/: cannot create the run directory there ({exc.filename or 'runs'}: "
                                      f"{exc.strerror or exc}); set output.dir or --out")
        try:
            if path.exists() and not path.is_dir():
                return path, (f"output.dir {path} is a file, not a directory; choose another --out "
                              "or output.dir")
            if resume:
                if not (path / "recipe.yaml").is_file():
                    return path, f"--resume: {path} holds no run (no recipe.yaml)"
                from turnctl.recipe import load_recipe

                saved = load_recipe(str(path / "recipe.yaml"))
                if _comparable(saved) != _comparable(recipe):
                    return path, (f"--resume: the recipe differs from the one saved in {path / 'recipe.yaml'}; "
                                  "resume with the same recipe and --set overrides")
            elif path.exists() and any(path.iterdir()):
                return path, (f"run directory {path} is not empty; pass --resume to continue it or choose "
                              "another --out")
            path.mkdir(parents=True, exist_ok=True)
            resolved = recipe.model_copy(deep=True)
            resolved.output.dir = str(path)
            atomic_write_text(path / "recipe.yaml", resolved.to_yaml())
        except TurnctlError as exc:  # the saved recipe.yaml is unreadable: every rank stops, not rank 0 alone
            return path, str(exc)
        except OSError as exc:
            where = exc.filename or path
            return path, (f"run directory {path}: cannot write there ({where}: {exc.strerror or exc}); "
                          "choose another --out or output.dir")
        return path, None

    # ---- paths ----
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def best(self) -> Path:
        return self.path / "best"

    def selection_file(self, epoch: int) -> Path:
        return self.path / "selection" / f"epoch_{epoch}.npz"

    @property
    def holdout_file(self) -> Path:
        return self.path / "validation_holdout.npz"

    def save_holdout(self, idx: np.ndarray, *, fraction: float, seed: int) -> None:
        """The train idx held out for validation by ``data.val_fraction`` (rank 0)."""
        if dist.rank() == 0:
            atomic_savez(self.holdout_file, idx=np.asarray(idx, dtype=np.int64),
                         fraction=np.float64(fraction), seed=np.int64(seed))

    # ---- rank-0 writers ----
    def reset_history(self, history: List[Dict[str, Any]]) -> None:
        self.history = list(history)
        if dist.rank() == 0:
            self._flush()

    def log_metrics(self, line: Dict[str, Any]) -> None:
        """Append one metrics line (rank 0; rewritten atomically, so it is never half a line)."""
        if dist.rank() != 0:
            return
        line = dict(line, time=time.time())
        self.history.append(line)
        self._flush()
        self._tensorboard(line)

    def _flush(self) -> None:
        from turnctl.commands.common import _jsonable

        atomic_write_text(self.path / "metrics.jsonl",
                          "".join(json.dumps(_jsonable(h)) + "\n" for h in self.history))

    def _tensorboard(self, line: Dict[str, Any]) -> None:
        if not self.recipe.output.tensorboard:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional extra: say so once
                log.info("tensorboard is not installed; metrics go to metrics.jsonl only")
                self.recipe.output.tensorboard = False
                return
            self._tb = SummaryWriter(str(self.path / "tensorboard"))
        step = line.get("epoch", 0)
        for k, v in line.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "time"):
                self._tb.add_scalar(f"{line.get('phase', 'run')}/{k}", v, step)
        self._tb.flush()

    def write_summary(self, summary: Dict[str, Any]) -> None:
        if dist.rank() == 0:
            atomic_write_json(self.path / "summary.json", summary)
