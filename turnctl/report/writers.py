"""Writing a report: ``report/label_issues.csv``, ``report/per_class.csv`` (and the plots) in the
run directory, and the summary the CLI prints and ``--json`` emits.

The numbers come from turnctl.report.tables; this module only formats them (names escaped by
turnctl.logger.printable_name, empty cells for unknown values) and writes them atomically.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from turnctl.logger import printable_name
from turnctl.report.plots import MAX_PLOT_CLASSES, check_matplotlib, plot_report
from turnctl.report.selection import Run
from turnctl.report.tables import PER_CLASS_COLUMNS, health_summary, report_tables
from turnctl.rundir import RunLayout, atomic_write_text


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
        check_matplotlib()  # before writing anything: no half report
    base = report_tables(run, epoch, shards)
    sel, issues, table, warnings = base.sel, base.issues, base.per_class, list(base.warnings)
    keys_ok = not base.warnings  # the keys (and so the shards) are the run's
    summary = {"run_dir": str(sel.run_dir), **health_summary(sel)}
    out = RunLayout(sel.run_dir).report_dir
    cols = list(issues)
    files = {"label_issues": str(out / "label_issues.csv"), "per_class": str(out / "per_class.csv")}
    atomic_write_text(out / "label_issues.csv",
                      _csv_text(cols, zip(*(issues[c].tolist() for c in cols))))
    # Columns that would be empty or all 0 for this run are left out, as the true_label column is.
    pc_cols = [c for c in PER_CLASS_COLUMNS if (c != "true_noise_rate" or sel.has_clean)
               and (c != "held_out" or summary["held_out"])]
    atomic_write_text(out / "per_class.csv", _csv_text(pc_cols, ([r[c] for c in pc_cols] for r in table)))
    if plot:
        files.update(plot_report(sel, max_classes=max_plot_classes))
    flagged_rows = np.flatnonzero(issues["is_label_issue"])[:max(0, int(top))]
    summary.update({
        "files": files, "keys": keys_ok, "per_class": table,
        "top": [{c: issues[c][i].item() if hasattr(issues[c][i], "item") else issues[c][i] for c in cols}
                for i in flagged_rows],
        "warnings": warnings,
    })
    return summary
