"""Out-of-sample predicted probabilities of a run's train samples, for cleanlab (``report --pred-probs``).

cleanlab's ``find_label_issues(labels, pred_probs)`` needs, for every sample, class probabilities
from a model that did not train on it. This module makes them the cheap way TURN makes its step 1:
a linear probe on the run's cached frozen features, trained K times (K-fold cross-fitting):

* folds are stratified by given label and drawn from the run's ``seed`` (:func:`stratified_folds`);
* fold f's rows are predicted by a probe trained on the other K-1 folds with the run's probe
  settings: ``probe.*`` of its ``recipe.yaml`` through turnctl.probe.train_linear_probe, the loss the
  method fixes (``lp-ce``: ce) and, when ``probe.lr_search`` chose a learning rate, the chosen one
  (``step1_lr`` of summary.json); ``probe.standardize`` standardises with the K-1 training folds'
  statistics only, so nothing of fold f reaches its probe; the probe of fold f is seeded ``seed + f``;
* the probability is the softmax of the probe's logits (float32).

It runs in one process (the report's), on this process's device (a GPU when there is one).

Which rows: cleanlab needs a dense matrix, so the rows are the samples the run's probe could train on
(decodable and not held out for validation), in idx order, and ``idx.npy`` says which dataset idx
each row is. Undecodable samples (no features) and the ``data.val_fraction`` hold-out are left out,
as the report never flags them either; their count is in the summary. ``issues = find_label_issues(
labels, pred_probs)`` then maps back with ``idx[issues]``.

Why here and not beside the probe: it is a reader of a finished run (its recipe, summary, hold-out
and feature cache) that only calls the probe's public functions, like the rest of turnctl.report.

Files (``RUN/report/``): ``pred_probs.npy`` (float32, rows x classes), ``labels.npy`` (int64 given
labels), ``idx.npy`` (int64), ``folds.npy`` (int64, the fold that predicted each row) and, with
``export_features``, ``features.safetensors`` (``features``: the cached features of those rows as
the cache holds them, unstandardised; ``idx``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from turnctl.errors import TurnctlError
from turnctl.logger import log
from turnctl.rundir import RunLayout, atomic_path

DEFAULT_FOLDS = 5
PRED_PROBS_FILES = ("pred_probs.npy", "labels.npy", "idx.npy", "folds.npy")
FEATURES_FILE = "features.safetensors"


@dataclasses.dataclass
class PredProbs:
    """K-fold out-of-sample probabilities of a run's usable train samples (rows in idx order)."""

    pred_probs: np.ndarray  # [n, C] float32, rows sum to 1
    labels: np.ndarray  # [n] int64 given labels
    idx: np.ndarray  # [n] int64 dataset idx of each row
    fold: np.ndarray  # [n] int64 the fold each row was held out in (and predicted from)
    features: torch.Tensor  # [n, D] the cached features of those rows (as cached: fp16)
    num_samples: int  # the train split's size, excluded samples included
    undecodable: int
    held_out: int
    settings: Dict[str, Any]  # folds, seed, probe settings actually used


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of each sample: stratified by label, sizes within one of each other.

    Each class's samples are shuffled (one seeded generator), the classes concatenated, and the
    concatenation dealt round-robin to the folds, so every fold holds ~1/k of every class.

    >>> f = stratified_folds(np.array([0] * 6 + [1] * 4), 2, seed=0)
    >>> np.bincount(f).tolist(), np.bincount(f[:6]).tolist(), np.bincount(f[6:]).tolist()
    ([5, 5], [3, 3], [2, 2])
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(int(seed))
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
                           ) if labels.size else np.zeros(0, dtype=np.int64)
    fold = np.empty(labels.shape[0], dtype=np.int64)
    fold[order] = np.arange(order.size) % k
    return fold


def kfold_pred_probs(features: torch.Tensor, labels: torch.Tensor, fold: np.ndarray, *, num_classes: int,
                     probe, losses, seed: int, idx: Optional[torch.Tensor] = None,
                     device: Union[None, str, torch.device] = None) -> np.ndarray:
    """``[N, C]`` float32 softmax probabilities, row i from a probe trained without fold ``fold[i]``.

    ``probe`` / ``losses``: turnctl.recipe.ProbeSection / LossSection (``probe.standardize`` uses the
    training folds' mean and std); the probe of fold f is seeded ``seed + f``; ``idx`` keys ELR's
    per-sample targets (default: the row number).
    """
    from turnctl.probe import predict, standardize, standardizer, train_linear_probe

    n = int(features.shape[0])
    fold_t = torch.from_numpy(np.asarray(fold, dtype=np.int64))
    out = np.full((n, num_classes), np.nan, dtype=np.float32)
    for f in range(int(fold_t.max()) + 1 if n else 0):
        test = fold_t == f
        train = ~test
        x_tr, x_te = features[train], features[test]
        if probe.standardize:
            mean, std = standardizer(x_tr)
            x_tr = standardize(x_tr, mean, std).to(features.dtype)
            x_te = standardize(x_te, mean, std)
        res = train_linear_probe(x_tr, labels[train], num_classes=num_classes, probe=probe, losses=losses,
                                 seed=int(seed) + f, device=device, log_every_epoch=False,
                                 idx=idx[train] if idx is not None else torch.nonzero(train).squeeze(1))
        logits = predict(res.head_state, x_te.float(), device=res.device)
        out[test.numpy()] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        log.info("pred-probs: fold %d: %d rows predicted by a probe trained on %d", f + 1, int(test.sum()),
                 int(train.sum()))
    return out


def _preprocess_of(layout: RunLayout, recipe, num_classes: int):
    """The backbone's preprocessing, which the feature cache key covers: from the run's export
    (``turnctl.json``, no weights loaded), else by building the recipe's backbone."""
    from turnctl.models.exportdir import META_FILE
    from turnctl.transforms import Preprocess

    for export in (layout.final, layout.best):
        try:
            meta = json.loads((export / META_FILE).read_text())
            return Preprocess.from_dict(meta["preprocess"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    from turnctl.models import load_backbone

    return load_backbone(recipe.model, num_classes=num_classes).preprocess


def _cache_dirs(recipe, shards: str, layout: RunLayout) -> List[Path]:
    """Where turnctl.features.choose_cache_dir may have put the run's cache, in its order."""
    dirs = [Path(recipe.features.cache_dir)] if recipe.features.cache_dir else []
    return dirs + [Path(shards) / ".features", layout.features_cache]


def cached_run_features(run_dir: Union[str, os.PathLike], *, shards: Optional[Union[str, os.PathLike]] = None):
    """``(recipe, split info, FeatureSet)`` of the run's train split, from its feature cache only.

    Raises one-line :class:`TurnctlError` when the run or its shards cannot be read or when the
    features are not cached (naming the command that caches them); nothing is extracted here.
    """
    from turnctl.data import open_split
    from turnctl.features import _load, cache_key
    from turnctl.recipe import load_recipe
    from turnctl.runner import model_identity

    layout = RunLayout(run_dir)
    if not layout.is_run():
        raise TurnctlError(f"{run_dir}: not a run directory (no recipe.yaml)")
    recipe = load_recipe(str(layout.recipe_file))
    shards_dir = str(shards) if shards is not None else recipe.data.shards
    try:
        info = open_split(shards_dir, recipe.data.train_split)
    except TurnctlError as exn:
        raise TurnctlError(f"{exn} (the run's shards, needed for its cached features: pass --shards DIR if "
                           "they moved)") from None
    key = cache_key(model_identity(recipe), _preprocess_of(layout, recipe, info.num_classes), info)
    dirs = _cache_dirs(recipe, shards_dir, layout)
    for d in dirs:
        path = d / key / f"{info.split}.safetensors"
        if path.is_file():
            fs = _load(path, key, info)
            if fs is not None:
                return recipe, info, fs
    raise TurnctlError(
        f"{run_dir}: the run's {info.split} features are not cached (key {key}, looked in "
        f"{', '.join(str(d) for d in dirs)}); cache them with `turnctl train --recipe "
        f"{layout.recipe_file} --method lp-ce --set features.cache=true --out NEW_DIR`")


def _step1_settings(recipe, layout: RunLayout):
    """The probe section the run's step 1 used: its loss (the method may fix it) and learning rate
    (the one probe.lr_search chose, from summary.json, when the run searched)."""
    from turnctl.methods.registry import METHODS

    spec = METHODS.get(recipe.method)
    update: Dict[str, Any] = {}
    if spec is not None and spec.probe_loss is not None:
        update["loss"] = spec.probe_loss
    if recipe.probe.lr_search and spec is not None and spec.lr_section == "probe":
        try:
            lr = json.loads(layout.summary_file.read_text()).get("step1_lr")
        except (OSError, ValueError, AttributeError):
            lr = None
        if isinstance(lr, (int, float)) and lr > 0:
            update["lr"] = float(lr)
        else:
            log.warning("pred-probs: the run searched probe.lr but its summary.json gives no step1_lr; "
                        "using probe.lr=%g", recipe.probe.lr)
    return recipe.probe.model_copy(update=update)


def _held_out(layout: RunLayout, n: int) -> np.ndarray:
    """The run's validation hold-out as a mask over train idx (all False without one)."""
    mask = np.zeros(n, dtype=bool)
    path = layout.holdout_file
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                held = np.asarray(z["idx"], dtype=np.int64)
        except (OSError, ValueError, KeyError) as exn:
            raise TurnctlError(f"{path}: unreadable ({type(exn).__name__}: {exn})") from None
        if held.size and (held.min() < 0 or held.max() >= n):
            raise TurnctlError(f"{path}: idx outside [0, {n}); not this dataset's hold-out")
        mask[held] = True
    return mask


def run_pred_probs(run_dir: Union[str, os.PathLike], *, folds: int = DEFAULT_FOLDS,
                   shards: Optional[Union[str, os.PathLike]] = None,
                   device: Union[None, str, torch.device] = None) -> PredProbs:
    """K-fold out-of-sample probabilities of ``run_dir``'s train samples (module docstring).

    >>> pp = run_pred_probs("runs/tiny-20260101-000000", folds=5)          # doctest: +SKIP
    >>> from cleanlab.filter import find_label_issues                      # doctest: +SKIP
    >>> pp.idx[find_label_issues(pp.labels, pp.pred_probs)]                # doctest: +SKIP
    """
    layout = RunLayout(run_dir)
    recipe, info, fs = cached_run_features(run_dir, shards=shards)
    n = fs.num_samples
    ok = fs.ok.numpy().astype(bool)
    held = _held_out(layout, n)
    use = ok & ~held
    rows = np.flatnonzero(use)
    if folds < 2:
        raise TurnctlError(f"--folds {folds}: need at least 2 folds")
    if folds > rows.size:
        raise TurnctlError(f"--folds {folds}: only {rows.size} usable train samples")
    labels = fs.labels.numpy().astype(np.int64)[rows]
    probe = _step1_settings(recipe, layout)
    fold = stratified_folds(labels, folds, recipe.seed)
    feats = fs.features[torch.from_numpy(rows)]
    log.info("pred-probs: %d-fold probe (%s, %s, lr %g, %d epochs) on %d cached features of %s",
             folds, probe.loss, probe.optimizer, probe.lr, probe.epochs, rows.size, layout.path)
    probs = kfold_pred_probs(feats, torch.from_numpy(labels), fold, num_classes=info.num_classes, probe=probe,
                             losses=recipe.losses, seed=recipe.seed, idx=torch.from_numpy(rows), device=device)
    settings = {"folds": folds, "seed": recipe.seed,
                "fold_seeds": f"seed + fold ({recipe.seed}..{recipe.seed + folds - 1})",
                "probe": probe.model_dump(mode="json"), "losses": recipe.losses.model_dump(mode="json"),
                "features_cache": str(fs.path)}
    return PredProbs(pred_probs=probs, labels=labels, idx=rows.astype(np.int64), fold=fold, features=feats,
                     num_samples=n, undecodable=int((~ok).sum()), held_out=int((ok & held).sum()),
                     settings=settings)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def write_pred_probs(run_dir: Union[str, os.PathLike], result: PredProbs, *,
                     export_features: bool = False) -> Dict[str, str]:
    """Write the files of the module docstring into ``run_dir/report/``; returns ``{name: path}``."""
    out = RunLayout(run_dir).report_dir
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"pred_probs": result.pred_probs.astype(np.float32), "labels": result.labels.astype(np.int64),
              "idx": result.idx.astype(np.int64), "folds": result.fold.astype(np.int64)}
    files: Dict[str, str] = {}
    for name, array in arrays.items():
        _save_npy(out / f"{name}.npy", array)
        files[name] = str(out / f"{name}.npy")
    if export_features:
        from safetensors.torch import save_file

        path = out / FEATURES_FILE
        with atomic_path(path) as tmp:
            save_file({"features": result.features.contiguous(), "idx": torch.from_numpy(result.idx)}, str(tmp),
                      metadata={"rows": "idx order; decodable train samples not held out for validation",
                                "from": str(result.settings.get("features_cache"))})
        files["features"] = str(path)
    return files


def summary_of(result: PredProbs, files: Dict[str, str]) -> Dict[str, Any]:
    """What ``report --pred-probs --json`` adds: rows, exclusions, settings, files."""
    return {"rows": int(result.idx.size), "classes": int(result.pred_probs.shape[1]),
            "num_samples": result.num_samples, "excluded_undecodable": result.undecodable,
            "excluded_held_out": result.held_out, **result.settings, "files": files}


__all__: Tuple[str, ...] = ("PredProbs", "stratified_folds", "kfold_pred_probs", "cached_run_features",
                            "run_pred_probs", "write_pred_probs", "summary_of", "DEFAULT_FOLDS")
