"""The numbers turnctl reports about predictions and selections, computed in one place.

* :func:`accuracy`, :func:`per_class_accuracy` and :func:`accuracy_report`: top-1 of predictions
  against labels (the probe's and the two-head methods' eval sets, NMTune's epochs, the fine-tuning
  evaluations, ``turnctl evaluate``);
* :func:`topk_hits` and :func:`prediction_outputs`: top-5 as one boolean per sample, computed from
  the logits in the same pass as the top-1 prediction (no N x K logits are kept);
  :func:`accuracy_report` turns them into ``top5_accuracy`` (None with 5 classes or fewer, where
  top-5 would be 100% whatever the model);
* :func:`selection_quality`: purity (precision) and recall of a selected set against the true labels
  where they are known (TURN's kept set and balanced subset, the two-head methods' labeled sets,
  the label-issue report);
* :func:`minmax_range` / :func:`minmax`: per-sample losses mapped to [0, 1] by one global min and max
  (the GMM's input in turnctl/cleanse, DivideMix's co-division, the report's loss axis).

Inputs are torch tensors or numpy arrays, whichever the caller holds; results are Python numbers
(or an array of the input's kind for the normaliser). A ratio over nothing is "unknown" (``None`` or
NaN, as the caller asks), never 0.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

# Top-k accuracy is reported for this k only (the ImageNet/WebVision convention), and only with more
# than TOP_K classes: with TOP_K or fewer every label is among the top k and the figure says nothing
# (a top-min(k, classes) would be 100% whatever the model, so it is None rather than renamed).
TOP_K = 5


def accuracy(pred: Any, labels: Any, *, empty: Optional[float] = float("nan")) -> Optional[float]:
    """Top-1 accuracy (a fraction) of predicted classes against labels; ``empty`` when there are none.

    Counted, then divided in float64, so the figure is exact whatever the device or dtype.

    >>> accuracy(np.array([0, 1, 1]), np.array([0, 1, 0]))
    0.6666666666666666
    >>> accuracy(np.array([]), np.array([]), empty=None) is None
    True
    """
    n = len(labels)
    if n == 0:
        return empty
    return int((pred == labels).sum()) / n


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy within each true class ``[num_classes]``, NaN for a class with no sample.

    >>> per_class_accuracy(np.array([0, 1, 1]), np.array([0, 1, 0]), 3).tolist()
    [0.5, 1.0, nan]
    """
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    counts = np.bincount(y, minlength=num_classes)
    correct = np.bincount(y[y == p], minlength=num_classes)
    return np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)


def topk_hits(logits: Any, labels: Any, k: int = TOP_K) -> Any:
    """Per row: is ``labels`` among the ``k`` highest ``logits``? A bool tensor ``[N]``.

    Ties are ranked as a stable descending sort ranks them: a class comes before every class with a
    lower logit, and before a class with an equal logit when its index is lower. That is argmax's
    rule for top-1 (the first maximum), so a top-1 hit is always a top-k hit. ``torch.topk`` makes
    no promise among equal logits (on CPU it returns [8, 6, 7, 5, 9] for ten zeros, whose argmax is
    0), so it is not used. Computed by counting, not sorting: O(N x K), the logits stay where they
    are. A row whose label is unknown (``-1``) gets an arbitrary value; reports leave such rows out.

    >>> import torch
    >>> logits = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3, 0.0],   # ranking 3, 1, 4, 2, 0, 5
    ...                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # all tied: ranking 0, 1, 2, 3, 4, 5
    >>> topk_hits(logits, torch.tensor([0, 5])).tolist(), topk_hits(logits, torch.tensor([5, 4])).tolist()
    ([True, False], [False, True])
    """
    import torch

    y = torch.as_tensor(labels, device=logits.device).long().clamp(min=0).unsqueeze(1)
    own = logits.gather(1, y)
    above = (logits > own).sum(1)
    classes = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    tied_before = ((logits == own) & (classes < y)).sum(1)
    return (above + tied_before) < k


def prediction_outputs(logits: Any, batch: Mapping[str, Any]) -> Dict[str, Any]:
    """What an evaluation pass keeps per sample (a ``collect`` for ``lockstep.per_sample_pass``):
    the top-1 prediction ``pred`` and ``top5``, whether the given label ``cls`` is among the 5
    highest logits (:func:`topk_hits`). Two numbers a sample, whatever the number of classes."""
    logits = logits.float()
    return {"pred": logits.argmax(1), "top5": topk_hits(logits, batch["cls"], TOP_K)}


def hit_rate(hits: Any, *, empty: Optional[float] = float("nan")) -> Optional[float]:
    """Share of true values in ``hits`` (a fraction); ``empty`` when there are none.

    >>> hit_rate(np.array([True, False, True, True]))
    0.75
    """
    n = len(hits)
    return empty if n == 0 else int(hits.sum()) / n


def accuracy_report(pred: np.ndarray, labels: np.ndarray, ok: np.ndarray, *, num_classes: int,
                    class_names: Sequence[str] = (), top_confusions: int = 5,
                    top5: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Top-1, per-class accuracy and the most confused (true, predicted) pairs, over the decodable
    samples (``ok``) whose label is known (``>= 0``); with ``top5`` (per-sample hits from
    :func:`prediction_outputs`) also ``top5_accuracy`` over the same samples, None when there are
    :data:`TOP_K` classes or fewer or no hits were given.

    >>> rep = accuracy_report(np.array([0, 1, 1]), np.array([0, 1, 0]), np.ones(3, bool), num_classes=2)
    >>> rep["accuracy"], rep["per_class_accuracy"], rep["most_confused"], rep["top5_accuracy"]
    (0.6666666666666666, [0.5, 1.0], [{'true': '0', 'predicted': '1', 'count': 1}], None)
    >>> accuracy_report(np.array([0, 1, 1]), np.array([0, 1, 0]), np.ones(3, bool), num_classes=6,
    ...                 top5=np.array([True, True, False]))["top5_accuracy"]
    0.6666666666666666
    """
    mask = ok.astype(bool) & (labels >= 0)
    y, p = labels[mask].astype(np.int64), pred[mask].astype(np.int64)
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(conf, (y, p), 1)
    np.fill_diagonal(conf, 0)
    flat = np.argsort(conf, axis=None)[::-1][:top_confusions]
    name = (lambda c: class_names[c] if c < len(class_names) else str(c))
    pairs = [{"true": name(int(i // num_classes)), "predicted": name(int(i % num_classes)),
              "count": int(conf.flat[i])} for i in flat if conf.flat[i] > 0]
    top5_accuracy = None
    if top5 is not None and num_classes > TOP_K:
        top5_accuracy = hit_rate(np.asarray(top5).astype(bool)[mask])
    return {"accuracy": accuracy(p, y), "top5_accuracy": top5_accuracy, "num_samples": int(y.size),
            "undecodable": int((~ok.astype(bool)).sum()),
            "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class_accuracy(p, y, num_classes)],
            "most_confused": pairs}


def selection_quality(mask: np.ndarray, given: np.ndarray, clean: np.ndarray, ok: np.ndarray) -> Dict[str, Any]:
    """Purity (precision) and recall of a selected set against the true labels, when they are known.

    Only samples that are decodable (``ok``) with a known true label (``clean >= 0``) count; a sample
    is truly clean when its given label is its true one. ``clean_share`` is the share of the counted
    samples that are (what a selection's purity must beat), ``noise_rate`` the share that are not.
    Empty dict when no true label is known.

    >>> q = selection_quality(np.array([True, True, False]), np.array([0, 1, 1]), np.array([0, 0, 1]),
    ...                       np.ones(3, bool))
    >>> q["purity"], q["recall"], round(q["clean_share"], 4), round(q["noise_rate"], 4)
    (0.5, 0.5, 0.6667, 0.3333)
    """
    known = (clean >= 0) & ok
    if not known.any():
        return {}
    truly_clean = (given == clean) & known
    kept = mask & known
    tp = int((kept & truly_clean).sum())
    # A ratio with nothing known to count is unknown (None), not 0.
    return {"purity": tp / int(kept.sum()) if kept.any() else None,
            "recall": tp / int(truly_clean.sum()) if truly_clean.any() else None,
            "clean_share": int(truly_clean.sum()) / int(known.sum()),
            "noise_rate": 1.0 - float(truly_clean.sum()) / int(known.sum())}


def minmax_range(x: Any) -> Tuple[Any, float, float]:
    """``((x - lo) / (hi - lo), lo, hi)`` with one global ``lo = min(x)``, ``hi = max(x)``.

    All values equal: zeros (nothing to tell apart). No value: ``x`` itself with ``(0.0, 1.0)``.
    ``x`` is a torch tensor or a numpy array, computed in its own dtype and on its own device.

    >>> y, lo, hi = minmax_range(np.array([1.0, 2.0, 3.0]))
    >>> y.tolist(), lo, hi
    ([0.0, 0.5, 1.0], 1.0, 3.0)
    >>> minmax_range(np.array([2.0, 2.0]))[0].tolist()
    [0.0, 0.0]
    """
    if isinstance(x, np.ndarray):
        if x.size == 0:
            return x, 0.0, 1.0
        lo, hi = float(x.min()), float(x.max())
        return ((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)), lo, hi
    if x.numel() == 0:
        return x, 0.0, 1.0
    lo, hi = (float(v) for v in x.aminmax())
    return ((x - lo) / (hi - lo) if hi > lo else x.new_zeros(x.shape)), lo, hi


def minmax(x: Any) -> Any:
    """:func:`minmax_range` without the range.

    >>> import torch
    >>> minmax(torch.tensor([1.0, 2.0, 3.0])).tolist()
    [0.0, 0.5, 1.0]
    """
    return minmax_range(x)[0]
