"""Label-issue report of a TURN run: which training labels the per-class GMM calls wrong.

Everything comes from the run directory (turnctl.rundir): ``selection/epoch_E.npz`` (written by
``runner._cleanse`` at the start of every fine-tuning epoch), ``recipe.yaml`` (tau, normalisation,
where the shards are) and, for the ``key`` column and class names, the train split's shards.

Flat functional API, cleanlab style::

    sel = load_selection("runs/tiny-x")                   # the last epoch's selection (or epoch=E)
    issues = label_issues(sel)                            # dict of columns, most suspicious first
    pandas.DataFrame(issues)                              # cleanlab's column names, if you use pandas
    per_class_table(sel)                                  # one dict per class
    health_summary(sel)                                   # overall numbers (+ precision / recall)
    write_report("runs/tiny-x", top=10, plot=True)        # report/*.csv, report/*.png; the summary

Every function taking ``run`` accepts a run directory or an already loaded :class:`Selection`.

Definitions (the CSVs, the CLI and ``--json`` all use these)
------------------------------------------------------------
* ``label_score`` = ``clean_prob``: the posterior of the low-loss (clean) mixture component of the
  sample's given class. Low = likely mislabelled.
* ``is_label_issue`` = not kept by the GMM (``clean_prob <= tau``) AND decodable. Undecodable
  samples (``ok`` False) never took part in the fit (their clean_prob is 0 by convention, not by
  evidence), so they are not called label issues; their ``label_score`` and ``loss`` are NaN
  (empty in the CSV) and ``predicted_label`` is -1. ``true_label`` is empty where unknown (-1 in the selection npz
  convention). Note: flagged is the GMM's decision, before the class-balanced subset draw, which
  drops clean samples too (``selected`` counts that).
* Keys and class names come from file names; bytes in them that are not UTF-8 (a Latin-1
  ``caf\\xe9.jpg``) are written as ``\\xNN`` escapes (:func:`printable_name`) in the CSVs, the table
  and the names of the JSON summary; its paths stay as they are (``os.fsencode`` gives the bytes back).
* Severity order: decodable samples first, then ``label_score`` ascending, then ``loss``
  descending (many noisy samples have a posterior that underflows to exactly 0; among those the
  higher loss is the more suspicious), then ``idx``.
* Estimated noise rate of a class = the mean posterior of the noisy (high-mean) component over the
  class's decodable samples, i.e. the expected fraction of wrong labels under the fitted mixture.
  After EM converges this equals the mixture weight of the noisy component (M-step), and it is
  reported next to it; we use the posterior mean because it comes from the same final E-step as
  ``label_score`` and can therefore be checked from ``label_issues.csv`` alone:
  ``1 - mean(label_score)`` over a class's decodable rows. Caveat: a two-component mixture splits
  even a clean class, so on a nearly clean class this over-estimates the noise.
* Label health score = 1 - estimated overall noise rate = mean ``label_score`` over decodable
  samples (the size-weighted mean of the per-class rates). Like cleanlab's
  ``overall_label_health_score``, 1 - the estimated fraction of wrong labels.
* Flagged precision / recall, when true labels are known (samples with ``clean >= 0``, decodable):
  a real issue is ``given != true``; precision = real issues among the flagged / flagged, recall =
  real issues flagged / real issues.
* Mixture means and variances are in the space the GMM saw: losses min-max normalised over the
  split's decodable samples (``cleanse.normalize: minmax``, see turnctl.cleanse) or raw losses
  (``none``). The plots use that axis too.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from turnctl.errors import TurnctlError
from turnctl.logger import log, printable_name
from turnctl.rundir import atomic_write_text

__all__ = [
    "Selection", "selection_epochs", "load_selection", "sample_keys", "label_issues", "per_class_table",
    "flagged_quality", "health_summary", "epoch_history", "mixture_posterior", "tau_crossings",
    "write_report", "plot_report", "printable_name", "LABEL_ISSUE_COLUMNS", "PER_CLASS_COLUMNS",
]

# cleanlab's names (Datalab.get_issues("label")) plus idx/key/loss; true_label only when known.
LABEL_ISSUE_COLUMNS = ("idx", "key", "given_label", "predicted_label", "label_score", "is_label_issue", "loss")
PER_CLASS_COLUMNS = ("class", "name", "size", "undecodable", "kept", "flagged", "selected", "noise_rate_est",
                     "true_noise_rate", "mean_clean", "mean_noisy", "var_clean", "var_noisy",
                     "weight_clean", "weight_noisy")
_REQUIRED = ("idx", "loss", "clean_prob", "selected", "keep", "given", "clean", "pred", "ok",
             "means", "variances", "weights")
_SEL_NAME = re.compile(r"^epoch_(\d+)\.npz$")
# Classes shown in the histogram grid (and rows of the per-class table printed by the CLI).
MAX_PLOT_CLASSES = 20

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
    split_info: Any = field(default=None, repr=False)  # turnctl.shards.SplitInfo, None if unreadable
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

        Same rule as ``turnctl.cleanse._normalise``: one global min and max over the decodable
        samples (``normalize: none``: lo 0, hi 1). Undecodable samples get NaN.
        """
        loss = self.loss.astype(np.float64)
        x = np.full(loss.shape, np.nan)
        v = self.ok
        if self.normalize == "none" or not v.any():
            x[v] = loss[v]
            return x, 0.0, 1.0
        lo, hi = float(loss[v].min()), float(loss[v].max())
        x[v] = (loss[v] - lo) / (hi - lo) if hi > lo else 0.0
        return x, lo, hi


# ---- loading -----------------------------------------------------------------------------------

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


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _REQUIRED if k not in z.files]
            if missing:
                raise TurnctlError(f"{path}: missing array(s) {', '.join(missing)}; it was written by an "
                                   "older turnctl, re-run the epoch to report on it")
            arrays = {k: z[k] for k in _REQUIRED}
    except TurnctlError:
        raise
    except Exception as exn:  # noqa: BLE001 -- zip, pickle and OS errors all mean "unreadable"
        raise TurnctlError(f"{path}: unreadable selection file ({type(exn).__name__}: {exn})") from None
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
    :func:`sample_keys` possible; if that fails the reason is kept in ``shards_problem``.

    Raises :class:`TurnctlError` (one line) when the run directory is missing, holds no selection
    (LP and FFT baselines never write one) or has none for ``epoch``.

    >>> sel = load_selection("runs/tiny-20260101-000000")          # doctest: +SKIP
    >>> sel.epoch, sel.num_samples, sel.num_classes, sel.tau       # doctest: +SKIP
    (1, 117, 4, 0.6)
    """
    from turnctl.shards import open_split

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


def _as_selection(run: Run, epoch: Optional[int], shards: Optional[Union[str, os.PathLike]] = None) -> Selection:
    """``run`` itself if it is the Selection asked for, else loaded (a Selection keeps its shards)."""
    if isinstance(run, Selection):
        if (epoch is None or epoch == run.epoch) and (shards is None or str(shards) == run.shards):
            return run
        return load_selection(run.run_dir, epoch=epoch if epoch is not None else run.epoch,
                              shards=shards if shards is not None else run.shards)
    return load_selection(run, epoch=epoch, shards=shards)


# ---- keys --------------------------------------------------------------------------------------

def _read_idx_members(info: Any) -> Tuple[np.ndarray, np.ndarray]:
    """``(keys, given)`` per idx from the shards' ``idx`` and ``cls`` members only.

    Images are skipped by seeking past them (turnctl.shards.iter_tar with a suffix filter), so
    this costs a header read per member, not a decode.
    """
    from turnctl.shards import iter_tar

    n = info.num_samples
    keys = np.full(n, "", dtype=object)
    given = np.full(n, -1, dtype=np.int64)

    def flush(key, idx, cls):
        if key is not None and idx is not None and 0 <= idx < n:
            keys[idx] = key
            if cls is not None:
                given[idx] = cls

    for shard in info.shard_paths:
        # A sample's members are contiguous in a shard (webdataset's grouping rule), in any order.
        key = idx = cls = None
        with open(shard, "rb", buffering=1 << 20) as f:
            for name, data in iter_tar(f, (".idx", ".cls")):
                slash = name.rfind("/")
                dot = name.find(".", slash + 1)  # webdataset's key rule, as shards.group_samples
                if dot <= slash + 1:
                    continue
                k, ext = name[:dot], name[dot + 1:].lower()
                if k != key:
                    flush(key, idx, cls)
                    key, idx, cls = k, None, None
                try:
                    if ext == "idx":
                        idx = int(data)
                    elif ext == "cls":  # not clean.cls
                        cls = int(data)
                except ValueError:
                    pass  # a malformed member: the reader counts such samples as corrupt
        flush(key, idx, cls)
    return keys, given


def sample_keys(shards: Union[str, os.PathLike], *, split: str = "train") -> np.ndarray:
    """The ``__key__`` of every sample of ``split``, indexed by idx ('' where a shard lacks it).

    Raises :class:`~turnctl.errors.DataError` when the shards cannot be opened.

    >>> sample_keys("shards/toy", split="train")[:2].tolist()     # doctest: +SKIP
    ['train_000000', 'train_000001']
    """
    from turnctl.shards import open_split

    return _read_idx_members(open_split(shards, split))[0]


def _keys_for(sel: Selection) -> Tuple[np.ndarray, Optional[str]]:
    """Keys for ``sel``'s samples (in its order), or all '' and a warning saying why."""
    empty = np.full(sel.num_samples, "", dtype=object)
    if sel.split_info is None:
        return empty, (f"the run's shards cannot be read ({sel.shards_problem}); the key column is empty "
                       "(pass --shards DIR if they moved)")
    info = sel.split_info
    if info.num_samples != sel.num_samples or sel.idx.min(initial=0) < 0 or sel.idx.max(initial=0) >= info.num_samples:
        return empty, (f"{info.root}: split {info.split!r} holds {info.num_samples} samples, the selection "
                       f"{sel.num_samples}; not the run's dataset, the key column is empty")
    try:
        keys, given = _read_idx_members(info)
    except (OSError, ValueError, tarfile.TarError) as exn:
        return empty, f"{info.root}: cannot read the shards ({type(exn).__name__}: {exn}); the key column is empty"
    # Re-prepared data (another noise seed) would pair idx with other images: the labels tell.
    differ = int((given[sel.idx] != sel.given).sum())
    if differ:
        return empty, (f"{info.root}: {differ} given label(s) differ from the run's; the shards were "
                       "re-prepared since the run, so the key column is empty")
    # Escaped here, not in sample_keys: the CSV, the summary and the terminal need text.
    return np.array([printable_name(k) for k in keys[sel.idx]], dtype=object), None


# ---- the tables --------------------------------------------------------------------------------

def _severity_order(sel: Selection) -> np.ndarray:
    score = np.where(sel.ok, sel.clean_prob, np.inf)
    loss = np.where(sel.ok, sel.loss.astype(np.float64), 0.0)
    loss = np.where(np.isfinite(loss), loss, 0.0)
    # lexsort: the LAST key is the primary one.
    return np.lexsort((sel.idx, -loss, score, ~sel.ok))


def label_issues(run: Run, *, epoch: Optional[int] = None,
                 keys: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """Per-sample label-quality columns, most likely mislabelled first (see the module docstring).

    Returns an ordered ``{column: array}`` dict (``pandas.DataFrame(result)`` if you want one):
    ``idx, key, given_label, predicted_label, label_score, is_label_issue, loss`` and, when the
    run knows true labels, ``true_label``. ``keys`` (in the selection's sample order) skips reading
    the shards; otherwise keys are read from them, or left '' with a logged warning.

    >>> issues = label_issues("runs/tiny-20260101-000000")          # doctest: +SKIP
    >>> issues["idx"][:3], issues["is_label_issue"][:3]             # doctest: +SKIP
    (array([ 6, 27, 41]), array([ True,  True,  True]))
    """
    sel = _as_selection(run, epoch)
    if keys is None:
        keys, warning = _keys_for(sel)
        if warning:
            log.warning(warning)
    keys = np.asarray(keys, dtype=object)
    if keys.shape != (sel.num_samples,):
        raise ValueError(f"keys has shape {keys.shape}, expected ({sel.num_samples},)")
    o = _severity_order(sel)
    ok = sel.ok[o]
    cols: Dict[str, np.ndarray] = {
        "idx": sel.idx[o],
        "key": keys[o],
        "given_label": sel.given[o],
        "predicted_label": np.where(ok, sel.pred[o], -1),
        "label_score": np.where(ok, sel.clean_prob[o], np.nan),
        "is_label_issue": sel.flagged[o],
        "loss": np.where(ok, sel.loss[o].astype(np.float64), np.nan),
    }
    if sel.has_clean:
        # Known for some samples only (e.g. Clothing1M's clean subset): unknown is empty, never -1.
        cols["true_label"] = np.array([int(c) if c >= 0 else None for c in sel.clean[o]], dtype=object)
    return cols


def _f(v: float) -> Optional[float]:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def per_class_table(run: Run, *, epoch: Optional[int] = None) -> List[Dict[str, Any]]:
    """One dict per class (keys: :data:`PER_CLASS_COLUMNS`; ``true_noise_rate`` None if unknown).

    ``size`` counts every sample with that given label, undecodable ones included, so the sizes
    sum to the split size (labels outside [0, C) excepted); ``kept + flagged + undecodable = size``.
    Mixture parameters are None for a class without decodable samples.

    >>> rows = per_class_table("runs/tiny-20260101-000000")         # doctest: +SKIP
    >>> rows[0]["name"], rows[0]["size"], round(rows[0]["noise_rate_est"], 3)   # doctest: +SKIP
    ('class0', 32, 0.125)
    """
    sel = _as_selection(run, epoch)
    C = sel.num_classes
    # Counts by bincount, not a mask per class: O(N + C) on a 1000-class, million-sample split.
    labelled = (sel.given >= 0) & (sel.given < C)
    g = np.where(labelled, sel.given, 0)

    def count(mask: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
        m = mask & labelled
        return np.bincount(g[m], weights=None if weights is None else weights[m], minlength=C)

    size, undecodable, valid = count(np.ones_like(sel.ok)), count(~sel.ok), count(sel.ok)
    kept, flagged, selected = count(sel.keep & sel.ok), count(sel.flagged), count(sel.selected)
    noisy_mass = count(sel.ok, 1.0 - sel.clean_prob)
    known, wrong = count(sel.known), count(sel.known & (sel.given != sel.clean))
    rows = []
    for c in range(C):
        n = int(valid[c])
        rows.append({
            "class": c, "name": sel.class_names[c], "size": int(size[c]), "undecodable": int(undecodable[c]),
            "kept": int(kept[c]), "flagged": int(flagged[c]), "selected": int(selected[c]),
            "noise_rate_est": float(noisy_mass[c] / n) if n else None,
            "true_noise_rate": float(wrong[c] / known[c]) if known[c] else None,
            "mean_clean": _f(sel.means[c, 0]), "mean_noisy": _f(sel.means[c, 1]),
            "var_clean": _f(sel.variances[c, 0]), "var_noisy": _f(sel.variances[c, 1]),
            "weight_clean": _f(sel.weights[c, 0]) if n else None,
            "weight_noisy": _f(sel.weights[c, 1]) if n else None,
        })
    return rows


def flagged_quality(run: Run, *, epoch: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """Precision / recall of the flagged set against the true labels; None when none are known.

    Counted over decodable samples with a known true label; a real issue is ``given != true``.
    ``precision`` is None when nothing is flagged, ``recall`` None when there is no real issue.

    >>> flagged_quality("runs/tiny-20260101-000000")                 # doctest: +SKIP
    {'known': 116, 'flagged': 34, 'real_issues': 47, 'true_positives': 34, 'precision': 1.0, ...}
    """
    sel = _as_selection(run, epoch)
    known = sel.known
    if not known.any():
        return None
    real = known & (sel.given != sel.clean)
    flag = known & sel.flagged
    tp = int((flag & real).sum())
    nf, nr = int(flag.sum()), int(real.sum())
    precision = tp / nf if nf else None
    recall = tp / nr if nr else None
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall > 0 else None)
    return {"known": int(known.sum()), "flagged": nf, "real_issues": nr, "true_positives": tp,
            "false_positives": nf - tp, "false_negatives": nr - tp, "precision": precision, "recall": recall,
            "f1": f1, "true_noise_rate": nr / int(known.sum())}


def health_summary(run: Run, *, epoch: Optional[int] = None) -> Dict[str, Any]:
    """Overall numbers of one epoch's selection (named after cleanlab's ``health_summary``).

    ``overall_label_health_score`` = 1 - ``estimated_noise_rate`` = mean label_score over decodable
    samples (module docstring). ``quality`` is :func:`flagged_quality` (None without true labels).

    >>> health_summary("runs/tiny-20260101-000000")["overall_label_health_score"]   # doctest: +SKIP
    0.7
    """
    sel = _as_selection(run, epoch)
    valid = sel.ok & (sel.given >= 0) & (sel.given < sel.num_classes)
    noise = float(np.mean(1.0 - sel.clean_prob[valid])) if valid.any() else None
    return {
        "epoch": sel.epoch, "epochs": list(sel.epochs), "num_samples": sel.num_samples,
        "num_classes": sel.num_classes, "undecodable": int((~sel.ok).sum()),
        "kept": int((sel.keep & sel.ok).sum()), "flagged": int(sel.flagged.sum()), "selected": int(sel.selected.sum()),
        "tau": sel.tau, "estimated_noise_rate": noise,
        "overall_label_health_score": None if noise is None else 1.0 - noise,
        "quality": flagged_quality(sel),
    }


def epoch_history(run_dir: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """Kept / selected / flagged counts and purities for every selection file of a run.

    Purity (share of truly clean labels) of the kept set and of the balanced subset, over samples
    with known true labels, as ``runner.selection_quality`` logs them to metrics.jsonl
    (``kept_precision``, ``selected_purity``); None when true labels are unknown. ``clean_share``
    is the share of clean labels in the whole split (what a selection must beat).

    >>> [h["kept"] for h in epoch_history("runs/tiny-20260101-000000")]   # doctest: +SKIP
    [27, 82]
    """
    run = Path(run_dir)
    out = []
    for e in selection_epochs(run):
        path = run / "selection" / f"epoch_{e}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:  # only the arrays needed: the npz is lazy
                keep, selected, given, clean, ok = (z[k] for k in ("keep", "selected", "given", "clean", "ok"))
        except Exception as exn:  # noqa: BLE001
            raise TurnctlError(f"{path}: unreadable selection file ({type(exn).__name__}: {exn})") from None
        keep, selected, ok = keep.astype(bool) & ok.astype(bool), selected.astype(bool), ok.astype(bool)
        known = ok & (clean >= 0)
        truly = known & (given == clean)

        def purity(mask):
            n = int((mask & known).sum())
            return int((mask & truly).sum()) / n if n else None

        out.append({"epoch": e, "kept": int(keep.sum()), "selected": int(selected.sum()),
                    "flagged": int((ok & ~keep).sum()), "decodable": int(ok.sum()),
                    "kept_purity": purity(keep) if known.any() else None,
                    "selected_purity": purity(selected) if known.any() else None,
                    "clean_share": int(truly.sum()) / int(known.sum()) if known.any() else None})
    return out


# ---- the mixture -------------------------------------------------------------------------------

def _log_components(x: np.ndarray, means, variances, weights) -> Tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    m, v, w = (np.asarray(a, dtype=np.float64) for a in (means, variances, weights))
    with np.errstate(divide="ignore"):
        lw = np.log(w)
    l0 = lw[..., 0] - 0.5 * (np.log(2 * np.pi * v[..., 0]) + (x - m[..., 0]) ** 2 / v[..., 0])
    l1 = lw[..., 1] - 0.5 * (np.log(2 * np.pi * v[..., 1]) + (x - m[..., 1]) ** 2 / v[..., 1])
    return l0, l1


def mixture_posterior(x: Any, means: Any, variances: Any, weights: Any) -> np.ndarray:
    """Posterior of component 0 (clean) at ``x`` under 2-component 1-D Gaussian mixtures.

    ``means``/``variances``/``weights`` are [..., 2] and broadcast against ``x`` (pass one class's
    rows, or ``sel.means[sel.given]`` for per-sample parameters). A zero noisy weight gives 1.

    >>> float(mixture_posterior(0.1, [0.1, 0.8], [0.01, 0.01], [0.5, 0.5])) > 0.99
    True
    """
    l0, l1 = _log_components(x, means, variances, weights)
    with np.errstate(invalid="ignore"):
        return np.exp(l0 - np.logaddexp(l0, l1))


def tau_crossings(means: Any, variances: Any, weights: Any, *, tau: float,
                  lo: float = 0.0, hi: float = 1.0) -> List[float]:
    """The x in [lo, hi] where one class's clean posterior equals ``tau`` (0, 1 or 2 points).

    The log-odds of two Gaussians is a quadratic in x, so this is exact. Two crossings happen when
    the noisy component is the narrower one: samples beyond it on the right are called clean again.

    >>> [round(x, 3) for x in tau_crossings([0.2, 0.8], [0.01, 0.01], [0.5, 0.5], tau=0.5)]
    [0.5]
    """
    m0, m1 = float(means[0]), float(means[1])
    v0, v1 = float(variances[0]), float(variances[1])
    w0, w1 = float(weights[0]), float(weights[1])
    if not all(math.isfinite(t) for t in (m0, m1, v0, v1)) or w0 <= 0 or w1 <= 0:
        return []  # a single component: the posterior is constant
    # d(x) = log(w0 N0) - log(w1 N1) = q x^2 + b x + a; solve d(x) = logit(tau).
    q = -0.5 / v0 + 0.5 / v1
    b = m0 / v0 - m1 / v1
    a = (math.log(w0 / w1) - 0.5 * math.log(v0 / v1) - 0.5 * m0 * m0 / v0 + 0.5 * m1 * m1 / v1
         - math.log(tau / (1.0 - tau)))
    if abs(q) < 1e-12 * max(abs(b), 1.0):
        roots = [-a / b] if b != 0 else []
    else:
        disc = b * b - 4 * q * a
        if disc < 0:
            roots = []
        else:
            s = math.sqrt(disc)
            # The numerically stable pair (no cancellation between b and s).
            t = -0.5 * (b + math.copysign(s, b))
            roots = [t / q, a / t] if t != 0 else [0.0]
    return sorted(r for r in set(roots) if lo <= r <= hi)


# ---- writing -----------------------------------------------------------------------------------

def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "True" if v else "False"
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(float(v)) else f"{float(v):.8g}"
    return printable_name(str(v))


def _csv_text(columns: Sequence[str], rows: Any) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_cell(v) for v in row])
    return buf.getvalue()


def _check_matplotlib() -> None:
    try:
        import matplotlib
    except ImportError:
        raise TurnctlError("--plot needs matplotlib, which is not installed: pip install 'turnctl[plot]'") from None
    del matplotlib  # only its presence matters here; plot_report imports what it uses


def write_report(run: Run, *, epoch: Optional[int] = None, top: int = 10, plot: bool = False,
                 shards: Optional[Union[str, os.PathLike]] = None,
                 max_plot_classes: int = MAX_PLOT_CLASSES) -> Dict[str, Any]:
    """Write ``report/label_issues.csv`` and ``report/per_class.csv`` (and with ``plot`` the PNGs of
    :func:`plot_report`) into the run directory, atomically; return the summary.

    The summary is :func:`health_summary` plus ``run_dir``, ``files`` (paths written), ``keys``
    (whether the key column is filled), ``per_class`` (:func:`per_class_table`), ``top`` (the
    ``top`` most severe flagged samples, as dicts) and ``warnings``. Writing to the same names for
    every epoch is deliberate: ``report/`` holds the report last asked for, its epoch in the summary.

    >>> s = write_report("runs/tiny-20260101-000000", top=5)         # doctest: +SKIP
    >>> s["files"]["label_issues"], s["overall_label_health_score"]   # doctest: +SKIP
    ('runs/tiny-20260101-000000/report/label_issues.csv', 0.70)
    """
    if plot:
        _check_matplotlib()  # before writing anything: no half report
    sel = _as_selection(run, epoch, shards)
    warnings: List[str] = []
    keys, warning = _keys_for(sel)
    if warning:
        log.warning(warning)
        warnings.append(warning)
    issues = label_issues(sel, keys=keys)
    table = per_class_table(sel)
    summary = {"run_dir": str(sel.run_dir), **health_summary(sel)}
    out = sel.run_dir / "report"
    cols = list(issues)
    files = {"label_issues": str(out / "label_issues.csv"), "per_class": str(out / "per_class.csv")}
    atomic_write_text(out / "label_issues.csv",
                      _csv_text(cols, zip(*(issues[c].tolist() for c in cols))))
    pc_cols = [c for c in PER_CLASS_COLUMNS if c != "true_noise_rate" or sel.has_clean]
    atomic_write_text(out / "per_class.csv", _csv_text(pc_cols, ([r[c] for c in pc_cols] for r in table)))
    if plot:
        files.update(plot_report(sel, max_classes=max_plot_classes))
    flagged_rows = np.flatnonzero(issues["is_label_issue"])[:max(0, int(top))]
    summary.update({
        "files": files, "keys": warning is None, "per_class": table,
        "top": [{c: issues[c][i].item() if hasattr(issues[c][i], "item") else issues[c][i] for c in cols}
                for i in flagged_rows],
        "warnings": warnings,
    })
    return summary


# ---- plots -------------------------------------------------------------------------------------

def _atomic_savefig(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def _plot_classes(sel: Selection, table: List[Dict[str, Any]], max_classes: int) -> Tuple[List[int], str]:
    present = [r for r in table if r["size"] - r["undecodable"] > 0]
    if len(present) <= max_classes:
        return [r["class"] for r in present], f"all {len(present)} classes"
    # Too many to read: the noisiest ones are where a reader looks first.
    noisiest = sorted(present, key=lambda r: (-(r["noise_rate_est"] or 0.0), -r["size"], r["class"]))[:max_classes]
    return ([r["class"] for r in noisiest],
            f"the {max_classes} noisiest of {len(present)} classes (by estimated noise rate)")


def plot_report(run: Run, *, epoch: Optional[int] = None, max_classes: int = MAX_PLOT_CLASSES,
                out_dir: Optional[Union[str, os.PathLike]] = None) -> Dict[str, str]:
    """Write two PNGs (default into ``<run>/report/``) and return ``{name: path}``:

    * ``loss_histograms.png``: per class, the histogram of the losses the GMM saw (normalised as
      it did), stacked by true cleanliness when known, with both fitted components scaled by their
      weights (in samples per bin, so they sit on the histogram) and their sum, and a vertical line
      wherever the clean posterior crosses tau. At most ``max_classes`` classes (the noisiest by
      estimated noise rate when there are more; the title says so).
    * ``selection_by_epoch.png``: kept / selected / flagged counts and, when true labels are known,
      the purity of the kept set and of the balanced subset for every epoch with a selection.

    Needs matplotlib (``pip install 'turnctl[plot]'``).

    >>> plot_report("runs/tiny-20260101-000000")                    # doctest: +SKIP
    {'loss_histograms': 'runs/.../report/loss_histograms.png', 'selection_by_epoch': '...'}
    """
    _check_matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    sel = _as_selection(run, epoch)
    out = Path(out_dir) if out_dir is not None else sel.run_dir / "report"
    table = per_class_table(sel)
    x, lo, hi = sel.normalised_loss()
    xmin, xmax = (0.0, 1.0) if sel.normalize == "minmax" else (float(np.nanmin(x)), float(np.nanmax(x)))
    if not xmax > xmin:
        xmin, xmax = xmin - 0.5, xmin + 0.5
    classes, which = _plot_classes(sel, table, max_classes)
    ncols = min(4, max(1, len(classes)))
    nrows = max(1, math.ceil(len(classes) / ncols))
    fig = Figure(figsize=(4.0 * ncols, 3.0 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    grid = np.linspace(xmin, xmax, 600)
    handles = {}
    for ax in axes.ravel()[len(classes):]:
        ax.set_visible(False)
    for ax, c in zip(axes.ravel(), classes):
        row = table[c]
        m = (sel.given == c) & sel.ok
        xc = x[m]
        # Fine bins: a GMM component can be a few hundredths wide on the normalised axis.
        nbins = int(np.clip(3 * np.sqrt(xc.size), 30, 80))
        edges = np.linspace(xmin, xmax, nbins + 1)
        width = edges[1] - edges[0]
        # Where the GMM flags (p(clean) <= tau), shaded, so the tau lines read as region borders.
        cuts = [xmin, *tau_crossings(sel.means[c], sel.variances[c], sel.weights[c], tau=sel.tau,
                                     lo=xmin, hi=xmax), xmax]
        for a, b in zip(cuts[:-1], cuts[1:]):
            mid = mixture_posterior(0.5 * (a + b), sel.means[c], sel.variances[c], sel.weights[c])
            if b > a and mid <= sel.tau:
                handles["flagged region (p(clean) <= tau)"] = ax.axvspan(a, b, color="tab:red", alpha=0.07, lw=0)
        for xt in cuts[1:-1]:
            handles[f"p(clean) = tau = {sel.tau:g}"] = ax.axvline(xt, color="tab:purple", ls=":", lw=1.5)
        if sel.has_clean:
            truly = sel.clean[m] == c
            unknown = sel.clean[m] < 0
            parts = [(xc[truly & ~unknown], "label correct", "tab:blue"),
                     (xc[~truly & ~unknown], "label wrong", "tab:red"),
                     (xc[unknown], "true label unknown", "tab:gray")]
            parts = [p for p in parts if p[0].size]
            _, _, bars = ax.hist([p[0] for p in parts], bins=edges, stacked=True, color=[p[2] for p in parts],
                                 alpha=0.5, label=[p[1] for p in parts])
            for p, b in zip(parts, bars if len(parts) > 1 else [bars]):
                handles[p[1]] = b
        else:
            _, _, bars = ax.hist(xc, bins=edges, color="tab:blue", alpha=0.5, label="samples")
            handles["samples"] = bars
        # Components in samples per bin: n * width * w_k * N(x; mu_k, var_k); their near-zero tails
        # are not drawn, so each curve is visible where it matters instead of along the x axis.
        l0, l1 = _log_components(grid, sel.means[c], sel.variances[c], sel.weights[c])
        scale = xc.size * width
        with np.errstate(over="ignore"):
            d0, d1 = scale * np.exp(l0), scale * np.exp(l1)
        total = d0 + d1
        floor = 0.005 * float(np.nanmax(total)) if np.isfinite(total).any() else 0.0
        handles["clean component"], = ax.plot(grid, np.where(d0 > floor, d0, np.nan), color="tab:green", lw=2.2)
        if sel.weights[c, 1] > 0:
            handles["noisy component"], = ax.plot(grid, np.where(d1 > floor, d1, np.nan), color="tab:orange", lw=2.2)
        handles["mixture (sum)"], = ax.plot(grid, total, color="black", lw=0.9, ls="--")
        # The narrow component's peak can dwarf the histogram: cap the y range at what makes both readable.
        counts = np.histogram(xc, bins=edges)[0]
        top = max(float(counts.max(initial=0)) * 1.35, 1.0)
        ax.set_ylim(0, max(top, min(float(np.nanmax(total)) * 1.05, 3 * top)))
        ax.set_xlim(xmin, xmax)
        rate = row["noise_rate_est"]
        ax.set_title(f"{row['name']}: n={xc.size}, flagged {row['flagged']}, est. noise {rate:.0%}", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("normalised loss" if sel.normalize == "minmax" else "loss", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("samples per bin", fontsize=8)
    axis = ("losses min-max normalised over the split, as the GMM saw them: "
            f"0 = loss {lo:.3g}, 1 = loss {hi:.3g}" if sel.normalize == "minmax" else "raw losses, as the GMM saw them")
    fig.suptitle(f"{printable_name(sel.run_dir.name)}: per-class loss histograms and fitted 2-component GMMs, "
                 f"fine-tuning epoch {sel.epoch}; {which}\n{axis}", fontsize=10)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
               ncol=min(len(handles), 4), fontsize=8, frameon=False)
    files = {"loss_histograms": out / "loss_histograms.png"}
    _atomic_savefig(fig, files["loss_histograms"])

    hist = epoch_history(sel.run_dir)
    has_purity = any(h["kept_purity"] is not None for h in hist)
    fig = Figure(figsize=(10 if has_purity else 5.5, 3.8), layout="constrained")
    axes = fig.subplots(1, 2 if has_purity else 1, squeeze=False)[0]
    ep = [h["epoch"] for h in hist]
    ax = axes[0]
    for k, color in (("kept", "tab:green"), ("selected", "tab:blue"), ("flagged", "tab:red")):
        ax.plot(ep, [h[k] for h in hist], marker="o", color=color, label={"kept": "kept (p(clean) > tau)",
                "selected": "selected (balanced subset)", "flagged": "flagged"}[k])
    ax.axhline(hist[-1]["decodable"], color="gray", ls=":", label="decodable samples")
    ax.set_ylim(bottom=0)
    ax.set_title("samples per fine-tuning epoch", fontsize=10)
    ax.legend(fontsize=8)
    if has_purity:
        ax = axes[1]
        for k, color, label in (("kept_purity", "tab:green", "kept"), ("selected_purity", "tab:blue", "selected")):
            ax.plot(ep, [np.nan if h[k] is None else h[k] for h in hist], marker="o", color=color, label=label)
        ax.plot(ep, [h["clean_share"] for h in hist], color="gray", ls=":", label="whole split (no selection)")
        ax.set_ylim(0, 1.02)
        ax.set_title("purity: share of correct labels", fontsize=10)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("fine-tuning epoch")
        ax.set_xticks(ep)
        ax.set_xlim(ep[0] - 0.3, ep[-1] + 0.3)
        ax.axvline(sel.epoch, color="tab:purple", alpha=0.25, lw=6)
    if not has_purity:
        axes[0].text(0.5, 0.02, "true labels unknown: no purity", transform=axes[0].transAxes,
                     ha="center", fontsize=8, color="gray")
    fig.suptitle(f"{printable_name(sel.run_dir.name)}: TURN selection per epoch "
                 f"(shaded: epoch {sel.epoch}, this report)",
                 fontsize=10)
    files["selection_by_epoch"] = out / "selection_by_epoch.png"
    _atomic_savefig(fig, files["selection_by_epoch"])
    return {k: str(v) for k, v in files.items()}
