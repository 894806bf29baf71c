"""One epoch's TURN selection of a run, loaded with what it takes to interpret it.

A run directory (turnctl.rundir) holds ``selection/epoch_E.npz`` for every fine-tuning epoch
(written by ``_cleanse`` in turnctl/runner.py before the epoch trains) and ``recipe.yaml`` (tau,
normalisation, where the shards are). :func:`load_selection` reads one epoch's file into a
:class:`Selection`; the rest of turnctl.report derives its tables and plots from that.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from turnctl.cleanse import normalise_losses
from turnctl.data import open_split
from turnctl.errors import TurnctlError
from turnctl.logger import printable_name

_REQUIRED = ("idx", "loss", "clean_prob", "selected", "keep", "given", "clean", "pred", "ok",
             "means", "variances", "weights")
_SEL_NAME = re.compile(r"^epoch_(\d+)\.npz$")

Run = Union[str, os.PathLike, "Selection"]


@dataclass(frozen=True, eq=False)
class Selection:
    """One epoch's selection of a run, with what is needed to interpret it.

    Per-sample arrays are in the npz's order (idx order as the runner writes them); ``means``,
    ``variances``, ``weights`` are [C, 2], component 0 the low-mean (clean) one.
    """

    run_dir: Path
    epoch: int
    epochs: Tuple[int, ...]  # every epoch that has a selection file, ascending
    path: Path
    idx: np.ndarray
    loss: np.ndarray
    clean_prob: np.ndarray
    keep: np.ndarray
    selected: np.ndarray
    given: np.ndarray
    clean: np.ndarray
    pred: np.ndarray
    ok: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    weights: np.ndarray
    tau: float
    normalize: str
    method: str
    shards: Optional[str]
    train_split: str
    class_names: Tuple[str, ...]
    split_info: Any = field(default=None, repr=False)  # turnctl.data.SplitInfo, None if unreadable
    shards_problem: Optional[str] = None               # why split_info is None

    @property
    def num_samples(self) -> int:
        return int(self.idx.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def known(self) -> np.ndarray:
        """Decodable samples whose true label is known."""
        return self.ok & (self.clean >= 0)

    @property
    def has_clean(self) -> bool:
        return bool(self.known.any())

    @property
    def flagged(self) -> np.ndarray:
        return ~self.keep & self.ok

    def normalised_loss(self) -> Tuple[np.ndarray, float, float]:
        """The losses as the GMM saw them, ``(x, lo, hi)`` with ``x = (loss - lo) / (hi - lo)``.

        turnctl.cleanse.normalise_losses over the decodable samples, as the selection did
        (``normalize: none``: lo 0, hi 1). Undecodable samples get NaN.
        """
        x = np.full(self.loss.shape, np.nan)
        xv, lo, hi = normalise_losses(torch.from_numpy(self.loss[self.ok].astype(np.float64)), self.normalize)
        x[self.ok] = xv.numpy()
        return x, lo, hi


def selection_epochs(run_dir: Union[str, os.PathLike]) -> List[int]:
    """The fine-tuning epochs that have ``selection/epoch_E.npz`` in ``run_dir``, ascending.

    >>> selection_epochs("runs/tiny-20260101-000000")   # doctest: +SKIP
    [0, 1]
    """
    d = Path(run_dir) / "selection"
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _SEL_NAME.match(p.name)))


def _recipe_fields(run: Path) -> Dict[str, Any]:
    """The few recipe settings the report needs, defaults where the file is silent.

    Read from the raw YAML rather than through ``load_recipe``: a run directory outlives recipe
    schema changes, and an unrelated renamed key must not make an old run unreportable.
    """
    from turnctl.recipe import CleanseSection, DataSection, load_yaml_file

    path = run / "recipe.yaml"
    if not path.is_file():
        raise TurnctlError(f"{run}: not a run directory (no recipe.yaml)")
    raw = load_yaml_file(path, what="") or {}  # safe tags only, no aliases, <= 1 MiB, UTF-8
    if not isinstance(raw, dict):
        raise TurnctlError(f"{path}: expected a mapping")
    data, cleanse = raw.get("data") or {}, raw.get("cleanse") or {}
    return {
        "method": str(raw.get("method", "turn")),
        "shards": data.get("shards", DataSection().shards),
        "train_split": str(data.get("train_split", DataSection().train_split)),
        "tau": float(cleanse.get("tau", CleanseSection().tau)),
        "normalize": str(cleanse.get("normalize", CleanseSection().normalize)),
    }


def _class_names(run: Path, info: Any, num_classes: int) -> Tuple[str, ...]:
    if info is not None and len(info.class_names) == num_classes:
        return tuple(info.class_names)
    # Shards gone: the exported model remembers the names (turnctl.json of final/ or best/).
    for sub in ("final", "best"):
        p = run / sub / "turnctl.json"
        try:
            names = json.loads(p.read_text()).get("class_names")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(names, list) and len(names) == num_classes:
            return tuple(str(n) for n in names)
    return tuple(str(c) for c in range(num_classes))


def read_arrays(path: Path, names: Sequence[str]) -> Dict[str, np.ndarray]:
    """The arrays ``names`` of a selection file; one-line :class:`TurnctlError` when it is unreadable
    or lacks one. Only those arrays are read: the npz is lazy."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in names if k not in z.files]
            if missing:
                raise TurnctlError(f"{path}: missing array(s) {', '.join(missing)}; it was written by an "
                                   "older turnctl, re-run the epoch to report on it")
            return {k: z[k] for k in names}
    except TurnctlError:
        raise
    except Exception as exn:  # noqa: BLE001 -- zip, pickle and OS errors all mean "unreadable"
        raise TurnctlError(f"{path}: unreadable selection file ({type(exn).__name__}: {exn})") from None


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    arrays = read_arrays(path, _REQUIRED)
    n = arrays["idx"].shape[0]
    for k in _REQUIRED[:9]:
        if arrays[k].shape != (n,):
            raise TurnctlError(f"{path}: array {k} has shape {arrays[k].shape}, expected ({n},)")
    return arrays


def load_selection(run_dir: Union[str, os.PathLike], *, epoch: Optional[int] = None,
                   shards: Optional[Union[str, os.PathLike]] = None) -> Selection:
    """Load the selection of fine-tuning ``epoch`` (default: the last one) of a TURN run.

    ``shards`` overrides the recipe's ``data.shards`` (the prepared dataset moved); the shards are
    only opened (manifest and sizes, no sample is read) to get the class names and to make
    turnctl.report.keys.sample_keys possible; if that fails the reason is kept in ``shards_problem``.

    Raises :class:`TurnctlError` (one line) when the run directory is missing, holds no selection
    (LP and FFT baselines never write one) or has none for ``epoch``.

    >>> sel = load_selection("runs/tiny-20260101-000000")          # doctest: +SKIP
    >>> sel.epoch, sel.num_samples, sel.num_classes, sel.tau       # doctest: +SKIP
    (1, 117, 4, 0.6)
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise TurnctlError(f"{run}: no such run directory")
    rec = _recipe_fields(run)
    epochs = selection_epochs(run)
    if not epochs:
        if not rec["method"].startswith("turn"):
            raise TurnctlError(f"{run}: a {rec['method']} run has no TURN selection (only TURN writes "
                               "selection/epoch_*.npz; LP and FFT baselines have none)")
        raise TurnctlError(f"{run}: the run has no TURN selection yet (selection/epoch_*.npz is written "
                           "at the start of each fine-tuning epoch; LP and FFT baselines have none)")
    if epoch is None:
        epoch = epochs[-1]
    elif epoch not in epochs:
        raise TurnctlError(f"{run}: no selection for epoch {epoch} "
                           f"(available: {', '.join(str(e) for e in epochs)})")
    path = run / "selection" / f"epoch_{epoch}.npz"
    a = _load_npz(path)
    shards_dir = str(shards) if shards is not None else rec["shards"]
    info, problem = None, None
    if shards_dir:
        try:
            info = open_split(shards_dir, rec["train_split"])
        except TurnctlError as exn:
            problem = str(exn)
    else:
        problem = "the recipe names no data.shards"
    C = int(a["means"].shape[0])
    return Selection(
        run_dir=run, epoch=int(epoch), epochs=tuple(epochs), path=path,
        idx=a["idx"].astype(np.int64), loss=a["loss"], clean_prob=a["clean_prob"].astype(np.float64),
        keep=a["keep"].astype(bool), selected=a["selected"].astype(bool), given=a["given"].astype(np.int64),
        clean=a["clean"].astype(np.int64), pred=a["pred"].astype(np.int64), ok=a["ok"].astype(bool),
        means=a["means"].astype(np.float64), variances=a["variances"].astype(np.float64),
        weights=a["weights"].astype(np.float64), tau=rec["tau"], normalize=rec["normalize"],
        method=rec["method"], shards=shards_dir, train_split=rec["train_split"],
        class_names=tuple(printable_name(n) for n in _class_names(run, info, C)), split_info=info,
        shards_problem=problem,
    )


def as_selection(run: Run, epoch: Optional[int], shards: Optional[Union[str, os.PathLike]] = None) -> Selection:
    """``run`` itself if it is the Selection asked for, else loaded (a Selection keeps its shards)."""
    if isinstance(run, Selection):
        if (epoch is None or epoch == run.epoch) and (shards is None or str(shards) == run.shards):
            return run
        return load_selection(run.run_dir, epoch=epoch if epoch is not None else run.epoch,
                              shards=shards if shards is not None else run.shards)
    return load_selection(run, epoch=epoch, shards=shards)

