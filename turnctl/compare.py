"""Run several methods (and seeds) on the same recipe and data and put them side by side.

Each method runs in its own run directory ``<out>/<method>-seed<k>``; they share the feature cache
(the cache key does not depend on the method), so the frozen features are extracted once. The
result is ``compare.json`` (every run's test accuracy and wall time, mean and std over seeds, wall
time relative to FFT-CE) and ``summary.json`` (test accuracy per method, TURN's selection, wall
times), both written by rank 0.

The columns (docs/PROTOCOL.md): ``best`` is the test accuracy of the epoch chosen on validation
accuracy (None without validation data), ``last`` the last epoch's, ``max_over_epochs`` the highest
test accuracy of any epoch: the figure the LNL papers call "best", optimistic because it is chosen
on test.

Top-5 (datasets of more than 5 classes, from runs that record it) sits beside each column under the same
name with ``top5_`` in front (``test_top5_last``, ``top5_last``, ``test_top5_accuracy``): None where a
run has no top-5; the top-1 keys are unchanged.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from turnctl import distributed as dist
from turnctl.errors import RecipeError
from turnctl.methods.registry import METHODS, method_list
from turnctl.recipe import Recipe
from turnctl.rundir import atomic_write_json


# What each accuracy column means; written into compare.json and summary.json so a reader of the
# files alone cannot mistake one for another.
COLUMNS = {
    "best": "test accuracy of the epoch with the highest validation accuracy (null without validation data)",
    "last": "test accuracy after the last epoch",
    "max_over_epochs": "highest test accuracy of any epoch (the LNL papers' 'best'; optimistic: chosen on test)",
}


def _mean_std(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0}


def check_methods(methods: Sequence[str]) -> None:
    """Every name a registered method, or one line naming the first that is not."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise RecipeError(f"--methods: unknown method '{unknown[0]}' (choose from {method_list()})")


def compare_methods(recipe: Recipe, *, methods: Sequence[str], seeds: Sequence[int], out: Path) -> Optional[Dict[str, Any]]:
    """Collective. Returns the comparison on rank 0 (None elsewhere)."""
    from turnctl.runner import train_from_recipe

    check_methods(methods)
    out = Path(out)
    runs: List[Dict[str, Any]] = []
    for method in methods:
        for seed in seeds:
            r = recipe.model_copy(deep=True)
            r.method = method
            r.seed = seed
            r.output.dir = str(out / f"{method}-seed{seed}")
            res = train_from_recipe(r, resume=False)
            runs.append({"method": method, "seed": seed, "run_dir": res["run_dir"],
                         "test_best": (res.get("test_accuracy") or {}).get("best"),
                         "test_last": (res.get("test_accuracy") or {}).get("last"),
                         "test_max_over_epochs": (res.get("test_accuracy") or {}).get("max_over_epochs"),
                         **{f"test_top5_{col}": (res.get("test_top5_accuracy") or {}).get(col) for col in COLUMNS},
                         "best_selected_on": res.get("best_selected_on"),
                         "wall_time_s": res.get("wall_time_s"), "selection": res.get("selection"),
                         "feature_cache": res.get("feature_cache")})
    if dist.rank() != 0:
        return None
    table: Dict[str, Any] = {}
    for method in methods:
        rows = [x for x in runs if x["method"] == method]
        table[method] = {"best": _mean_std([x["test_best"] for x in rows]),
                         "last": _mean_std([x["test_last"] for x in rows]),
                         "max_over_epochs": _mean_std([x["test_max_over_epochs"] for x in rows]),
                         **{f"top5_{col}": _mean_std([x[f"test_top5_{col}"] for x in rows]) for col in COLUMNS},
                         "wall_time_s": _mean_std([x["wall_time_s"] for x in rows]), "seeds": list(seeds)}
    ref = table.get("fft-ce", {}).get("wall_time_s", {}).get("mean")
    for method, row in table.items():
        row["wall_time_vs_fft_ce"] = (row["wall_time_s"]["mean"] / ref) if ref and row["wall_time_s"]["mean"] else None
    comparison = {"recipe": recipe.name, "shards": recipe.data.shards, "methods": list(methods),
                  "columns": COLUMNS,
                  "seeds": list(seeds), "table": table, "runs": runs}
    atomic_write_json(out / "compare.json", comparison)
    turn_runs = [x for x in runs if "cleanse" in METHODS[x["method"]].steps and x["selection"]]
    summary = {
        "test_accuracy": {m.replace("-", "_"): table[m]["last"]["mean"] for m in methods},
        "test_accuracy_best": {m.replace("-", "_"): table[m]["best"]["mean"] for m in methods},
        "test_accuracy_max_over_epochs": {m.replace("-", "_"): table[m]["max_over_epochs"]["mean"] for m in methods},
        "test_top5_accuracy": {m.replace("-", "_"): table[m]["top5_last"]["mean"] for m in methods},
        "columns": COLUMNS,
        "selection": turn_runs[-1]["selection"] if turn_runs else None,
        "wall_time_s": {m.replace("-", "_"): table[m]["wall_time_s"]["mean"] for m in methods},
    }
    atomic_write_json(out / "summary.json", summary)
    comparison["summary"] = summary
    return comparison
