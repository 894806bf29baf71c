"""One epoch's TURN selection of a run, loaded with what it takes to interpret it.

A run directory holds ``selection/epoch_E.npz`` for every fine-tuning epoch (written by ``_cleanse``
in turnctl/runner.py before the epoch trains, read by turnctl.rundir, which owns its format) and
``recipe.yaml`` (where the shards are). :func:`load_selection` reads one epoch's file into a
:class:`Selection`; the rest of turnctl.report derives its tables and plots from that.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from turnctl.cleanse import normalise_losses
from turnctl.data import open_split
from turnctl.errors import TurnctlError
from turnctl.logger import printable_name
from turnctl.models.exportdir import META_FILE
from turnctl.rundir import RunLayout, SelectionSettings

Run = Union[str, os.PathLike, "Selection"]


@dataclass(frozen=True, eq=False)
class Selection:
    """One epoch's selection of a run, with what is needed to interpret it.

    Per-sample arrays are in the npz's order (idx order as the runner writes them); ``means``,
    ``variances``, ``weights`` are [C, 2], component 0 the low-mean (clean) one. ``heldout`` marks
    the train samples ``data.val_fraction`` held out for validation: like undecodable ones, the GMM
    never saw them, so they are never flagged (:attr:`usable` is what it saw).
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
    heldout: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    weights: np.ndarray
    settings: SelectionSettings  # from the file, or recipe.yaml for a file of an older turnctl
    method: str
    shards: Optional[str]
    train_split: str
    class_names: Tuple[str, ...]
    split_info: Any = field(default=None, repr=False)  # turnctl.data.SplitInfo, None if unreadable
    shards_problem: Optional[str] = None               # why split_info is None

    @property
    def tau(self) -> float:
        return self.settings.tau

    @property
    def normalize(self) -> str:
        return self.settings.normalize

    @property
    def num_samples(self) -> int:
        return int(self.idx.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def usable(self) -> np.ndarray:
        """The samples the GMM saw: decodable and not held out for validation."""
        return self.ok & ~self.heldout

    @property
    def known(self) -> np.ndarray:
        """Samples the GMM saw whose true label is known."""
        return self.usable & (self.clean >= 0)

    @property
    def has_clean(self) -> bool:
        return bool(self.known.any())

    @property
    def flagged(self) -> np.ndarray:
        return ~self.keep & self.usable

    def normalised_loss(self) -> Tuple[np.ndarray, float, float]:
        """The losses as the GMM saw them, ``(x, lo, hi)`` with ``x = (loss - lo) / (hi - lo)``.

        turnctl.cleanse.normalise_losses over the samples the GMM saw (:attr:`usable`), as the
        selection did (``normalize: none``: lo 0, hi 1). The others get NaN.
        """
        x = np.full(self.loss.shape, np.nan)
        xv, lo, hi = normalise_losses(torch.from_numpy(self.loss[self.usable].astype(np.float64)), self.normalize)
        x[self.usable] = xv.numpy()
        return x, lo, hi


def selection_epochs(run_dir: Union[str, os.PathLike]) -> List[int]:
    """The fine-tuning epochs that have ``selection/epoch_E.npz`` in ``run_dir``, ascending.

    >>> selection_epochs("runs/tiny-20260101-000000")   # doctest: +SKIP
    [0, 1]
    """
    return RunLayout(run_dir).selection_epochs()


def _recipe_fields(layout: RunLayout) -> Dict[str, Any]:
    """The few recipe settings the report needs beyond the selection file, defaults where the file
    is silent (turnctl.rundir.RunLayout.raw_recipe says why the raw YAML)."""
    from turnctl.recipe import DataSection

    raw = layout.raw_recipe()
    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise TurnctlError(f"{layout.recipe_file}: data is not a mapping")
    return {
        "method": str(raw.get("method", "turn")),
        "shards": data.get("shards", DataSection().shards),
        "train_split": str(data.get("train_split", DataSection().train_split)),
    }


def _class_names(layout: RunLayout, info: Any, num_classes: int) -> Tuple[str, ...]:
    if info is not None and len(info.class_names) == num_classes:
        return tuple(info.class_names)
    # Shards gone: the exported model remembers the names (turnctl.json of final/ or best/).
    for export in (layout.final, layout.best):
        try:
            names = json.loads((export / META_FILE).read_text()).get("class_names")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(names, list) and len(names) == num_classes:
            return tuple(str(n) for n in names)
    return tuple(str(c) for c in range(num_classes))


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
    layout = RunLayout(run)
    rec = _recipe_fields(layout)
    epochs = layout.selection_epochs()
    if not epochs:
        if rec["method"].startswith("fft"):
            raise TurnctlError(f"{run}: a {rec['method']} run keeps no per-sample losses to report on; run "
                               "`turnctl train --method turn` (a selection every epoch) or an LP baseline such as "
                               "--method lp-gce (a selection from its head) on the same data")
        if not rec["method"].startswith("turn"):
            raise TurnctlError(f"{run}: the {rec['method']} run has no selection (LP baselines write "
                               "selection/epoch_0.npz from their final head; one written by an older turnctl has none: rerun it)")
        raise TurnctlError(f"{run}: the run has no TURN selection yet (selection/epoch_*.npz is written "
                           "at the start of each fine-tuning epoch)")
    if epoch is None:
        epoch = epochs[-1]
    elif epoch not in epochs:
        raise TurnctlError(f"{run}: no selection for epoch {epoch} "
                           f"(available: {', '.join(str(e) for e in epochs)})")
    f = layout.load_selection(epoch)
    shards_dir = str(shards) if shards is not None else rec["shards"]
    info, problem = None, None
    if shards_dir:
        try:
            info = open_split(shards_dir, rec["train_split"])
        except TurnctlError as exn:
            problem = str(exn)
    else:
        problem = "the recipe names no data.shards"
    return Selection(
        run_dir=run, epoch=int(epoch), epochs=tuple(epochs), path=f.path, idx=f.idx, loss=f.loss,
        clean_prob=f.clean_prob, keep=f.keep, selected=f.selected, given=f.given, clean=f.clean, pred=f.pred,
        ok=f.ok, heldout=f.heldout, means=f.means, variances=f.variances, weights=f.weights, settings=f.settings,
        method=rec["method"], shards=shards_dir, train_split=rec["train_split"],
        class_names=tuple(printable_name(n) for n in _class_names(layout, info, f.means.shape[0])),
        split_info=info, shards_problem=problem,
    )


def as_selection(run: Run, epoch: Optional[int], shards: Optional[Union[str, os.PathLike]] = None) -> Selection:
    """``run`` itself if it is the Selection asked for, else loaded (a Selection keeps its shards)."""
    if isinstance(run, Selection):
        if (epoch is None or epoch == run.epoch) and (shards is None or str(shards) == run.shards):
            return run
        return load_selection(run.run_dir, epoch=epoch if epoch is not None else run.epoch,
                              shards=shards if shards is not None else run.shards)
    return load_selection(run, epoch=epoch, shards=shards)

