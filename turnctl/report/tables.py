"""What one epoch's selection says, as data: per-sample and per-class tables and overall numbers.

Plain dicts and arrays (``pandas.DataFrame(label_issues(run))`` if you want a frame); writing
them is turnctl.report.writers', drawing them turnctl.report.plots'. The definitions of every
column are in turnctl.report's docstring.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from turnctl.logger import log
from turnctl.metrics import selection_quality
from turnctl.report.keys import keys_for, source_paths
from turnctl.report.selection import Run, Selection, as_selection
from turnctl.rundir import RunLayout


# cleanlab's names (Datalab.get_issues("label")) plus idx/key/loss; true_label only when known.
LABEL_ISSUE_COLUMNS = ("idx", "key", "given_label", "predicted_label", "label_score", "is_label_issue", "loss")
PER_CLASS_COLUMNS = ("class", "name", "size", "undecodable", "held_out", "kept", "flagged", "selected", "noise_rate_est",
                     "true_noise_rate", "mean_clean", "mean_noisy", "var_clean", "var_noisy",
                     "weight_clean", "weight_noisy")


def _severity_order(sel: Selection) -> np.ndarray:
    seen = sel.usable
    score = np.where(seen, sel.clean_prob, np.inf)
    loss = np.where(sel.ok, sel.loss.astype(np.float64), 0.0)
    loss = np.where(np.isfinite(loss), loss, 0.0)
    # lexsort: the LAST key is the primary one. Samples the GMM did not see go last.
    return np.lexsort((sel.idx, -loss, score, ~seen))


def label_issues(run: Run, *, epoch: Optional[int] = None,
                 keys: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """Per-sample label-quality columns, most likely mislabelled first (turnctl.report's docstring).

    Returns an ordered ``{column: array}`` dict (``pandas.DataFrame(result)`` if you want one):
    ``idx, key, given_label, predicted_label, label_score, is_label_issue, loss``; ``source`` after
    ``key`` when the dataset was prepared from files (the path as prepared, relative to the
    manifest's ``sources.root``; turnctl.report.keys.source_paths); and, when the run knows true
    labels, ``true_label``. ``keys`` (in the selection's sample order) skips reading
    the shards; otherwise keys are read from them, or left '' with a logged warning.

    >>> issues = label_issues("runs/tiny-20260101-000000")          # doctest: +SKIP
    >>> issues["idx"][:3], issues["is_label_issue"][:3]             # doctest: +SKIP
    (array([ 6, 27, 41]), array([ True,  True,  True]))
    """
    sel = as_selection(run, epoch)
    if keys is None:
        keys, warning = keys_for(sel)
        if warning:
            log.warning(warning)
    keys = np.asarray(keys, dtype=object)
    if keys.shape != (sel.num_samples,):
        raise ValueError(f"keys has shape {keys.shape}, expected ({sel.num_samples},)")
    o = _severity_order(sel)
    ok, seen = sel.ok[o], sel.usable[o]
    cols: Dict[str, np.ndarray] = {
        "idx": sel.idx[o],
        "key": keys[o],
        "given_label": sel.given[o],
        "predicted_label": np.where(ok, sel.pred[o], -1),
        "label_score": np.where(seen, sel.clean_prob[o], np.nan),
        "is_label_issue": sel.flagged[o],
        "loss": np.where(ok, sel.loss[o].astype(np.float64), np.nan),
    }
    # The file a sample was prepared from, when prepare kept a source map (file-based datasets) and
    # the keys show these are the run's shards (empty keys: another or no dataset, so no paths either).
    sources, why = source_paths(sel) if any(keys) else (None, None)
    if why:
        log.warning(why)
    if sources is not None:
        items = list(cols.items())
        at = list(cols).index("key") + 1
        cols = dict(items[:at] + [("source", sources[o])] + items[at:])
    if sel.has_clean:
        # Known for some samples only (e.g. Clothing1M's clean subset): unknown is empty, never -1.
        cols["true_label"] = np.array([int(c) if c >= 0 else None for c in sel.clean[o]], dtype=object)
    return cols


def _f(v: float) -> Optional[float]:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def per_class_table(run: Run, *, epoch: Optional[int] = None) -> List[Dict[str, Any]]:
    """One dict per class (keys: :data:`PER_CLASS_COLUMNS`; ``true_noise_rate`` None if unknown).

    ``size`` counts every sample with that given label, undecodable and held-out ones included, so
    the sizes sum to the split size (labels outside [0, C) excepted); ``kept + flagged + undecodable
    + held_out = size`` (``held_out``: decodable samples ``data.val_fraction`` held out for
    validation, which the GMM never saw). Mixture parameters are None for a class the GMM saw no
    sample of.

    >>> rows = per_class_table("runs/tiny-20260101-000000")         # doctest: +SKIP
    >>> rows[0]["name"], rows[0]["size"], round(rows[0]["noise_rate_est"], 3)   # doctest: +SKIP
    ('class0', 32, 0.125)
    """
    sel = as_selection(run, epoch)
    C = sel.num_classes
    # Counts by bincount, not a mask per class: O(N + C) on a 1000-class, million-sample split.
    labelled = (sel.given >= 0) & (sel.given < C)
    g = np.where(labelled, sel.given, 0)

    def count(mask: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
        m = mask & labelled
        return np.bincount(g[m], weights=None if weights is None else weights[m], minlength=C)

    size, undecodable, valid = count(np.ones_like(sel.ok)), count(~sel.ok), count(sel.usable)
    held_out = count(sel.ok & sel.heldout)
    kept, flagged, selected = count(sel.keep & sel.usable), count(sel.flagged), count(sel.selected)
    noisy_mass = count(sel.usable, 1.0 - sel.clean_prob)
    known, wrong = count(sel.known), count(sel.known & (sel.given != sel.clean))
    rows = []
    for c in range(C):
        n = int(valid[c])
        rows.append({
            "class": c, "name": sel.class_names[c], "size": int(size[c]), "undecodable": int(undecodable[c]),
            "held_out": int(held_out[c]), "kept": int(kept[c]), "flagged": int(flagged[c]), "selected": int(selected[c]),
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

    Counted over the samples the GMM saw (decodable, not held out) with a known true label; a real
    issue is ``given != true``.
    ``precision`` is None when nothing is flagged, ``recall`` None when there is no real issue.

    >>> flagged_quality("runs/tiny-20260101-000000")                 # doctest: +SKIP
    {'known': 116, 'flagged': 34, 'real_issues': 47, 'true_positives': 34, 'precision': 1.0, ...}
    """
    sel = as_selection(run, epoch)
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

    ``overall_label_health_score`` = 1 - ``estimated_noise_rate`` = mean label_score over the samples
    the GMM saw (turnctl.report's docstring). ``quality`` is :func:`flagged_quality` (None without true labels).

    >>> health_summary("runs/tiny-20260101-000000")["overall_label_health_score"]   # doctest: +SKIP
    0.7
    """
    sel = as_selection(run, epoch)
    valid = sel.usable & (sel.given >= 0) & (sel.given < sel.num_classes)
    noise = float(np.mean(1.0 - sel.clean_prob[valid])) if valid.any() else None
    return {
        "method": sel.method, "epoch": sel.epoch, "epochs": list(sel.epochs), "num_samples": sel.num_samples,
        "num_classes": sel.num_classes, "undecodable": int((~sel.ok).sum()),
        "held_out": int((sel.ok & sel.heldout).sum()), "kept": int((sel.keep & sel.usable).sum()), "flagged": int(sel.flagged.sum()), "selected": int(sel.selected.sum()),
        "tau": sel.tau, "estimated_noise_rate": noise,
        "overall_label_health_score": None if noise is None else 1.0 - noise,
        "quality": flagged_quality(sel),
    }


def epoch_history(run_dir: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """Kept / selected / flagged counts and purities for every selection file of a run.

    Purity (share of truly clean labels) of the kept set and of the balanced subset, over the samples
    the GMM saw with known true labels, as ``turnctl.metrics.selection_quality`` gives them to
    metrics.jsonl (``kept_precision``, ``selected_purity``); None when true labels are unknown.
    ``clean_share`` is the share of clean labels among those samples (what a selection must beat);
    ``fitted`` their number (decodable, not held out for validation).

    >>> [h["kept"] for h in epoch_history("runs/tiny-20260101-000000")]   # doctest: +SKIP
    [27, 82]
    """
    layout = RunLayout(run_dir)
    out = []
    for e in layout.selection_epochs():
        f = layout.load_selection(e, arrays=("keep", "selected", "given", "clean", "ok", "heldout"))
        seen = f.ok & ~f.heldout
        keep = f.keep & seen
        kept_q, selected_q = (selection_quality(m, f.given, f.clean, seen) for m in (keep, f.selected))
        out.append({"epoch": e, "kept": int(keep.sum()), "selected": int(f.selected.sum()),
                    "flagged": int((seen & ~keep).sum()), "fitted": int(seen.sum()),
                    "kept_purity": kept_q.get("purity"), "selected_purity": selected_q.get("purity"),
                    "clean_share": kept_q.get("clean_share")})
    return out


@dataclass(frozen=True)
class ReportTables:
    """What every rendering of a report (the CSVs, the page) starts from: the selection, its keys
    (or '' with a warning saying why), the per-sample issues and the per-class table."""

    sel: Selection
    keys: np.ndarray
    issues: Dict[str, Any]
    per_class: Any
    warnings: Sequence[str]


def report_tables(run: Union[Run, ReportTables], epoch: Optional[int] = None, shards: Optional[Union[str, os.PathLike]] = None
                  ) -> ReportTables:
    """:class:`ReportTables` of ``run``'s selection of ``epoch`` (the last by default); ``run`` itself
    when it already is them (the CSVs and the page of one command read the shards' keys once)."""
    if isinstance(run, ReportTables):
        if epoch in (None, run.sel.epoch) and (shards is None or str(shards) == run.sel.shards):
            return run
        run = run.sel
    sel = as_selection(run, epoch, shards)
    keys, warning = keys_for(sel)
    if warning:
        log.warning(warning)
    return ReportTables(sel=sel, keys=keys, issues=label_issues(sel, keys=keys), per_class=per_class_table(sel),
                        warnings=(warning,) if warning else ())
