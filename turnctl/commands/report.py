"""``turnctl report``: the label issues a TURN run found, per sample and per class."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import click
from rich.table import Table

from turnctl.commands.common import emit_json
from turnctl.errors import TurnctlError
from turnctl.logger import result_console, shown


_text = shown  # names and paths printed verbatim (not-UTF-8 bytes and rich markup escaped)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: Optional[float], fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def _overview(s: Dict[str, Any]) -> Table:
    if str(s.get("method", "turn")).startswith("turn"):
        what = (f"TURN selection of fine-tuning epoch {s['epoch']} "
                f"(epochs with a selection: {', '.join(map(str, s['epochs']))})")
    else:  # an LP baseline: the GMM on its final head's losses, as TURN's first selection draws it
        what = f"{_text(s['method'])}: the selection its final linear head gives (per-class GMM on its losses)"
    t = Table(title=f"{_text(s['run_dir'])}: {what}")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("samples", str(s["num_samples"]))
    if s["undecodable"]:
        t.add_row("undecodable (never flagged)", str(s["undecodable"]))
    if s.get("held_out"):
        t.add_row("held out for validation (never flagged)", str(s["held_out"]))
    t.add_row(f"kept by the GMM (p(clean) > {s['tau']:g})", str(s["kept"]))
    t.add_row("flagged as label issues", str(s["flagged"]))
    t.add_row("selected (balanced subset)", str(s["selected"]))
    t.add_row("estimated noise rate (mean noisy posterior)", _pct(s["estimated_noise_rate"]))
    t.add_row("label health score (1 - estimated noise rate)", _num(s["overall_label_health_score"], ".3f"))
    q = s["quality"]
    if q:
        t.add_row("true noise rate (known labels)", _pct(q["true_noise_rate"]))
        tp = q["true_positives"]
        t.add_row("flagged precision (real issues / flagged)", f"{_pct(q['precision'])}  ({tp}/{q['flagged']})")
        t.add_row("flagged recall (flagged / real issues)", f"{_pct(q['recall'])}  ({tp}/{q['real_issues']})")
    else:
        t.add_row("precision / recall", "- (true labels unknown)")
    return t


def _per_class(rows: List[Dict[str, Any]], limit: int) -> Table:
    shown = rows
    title = ("per class (noise: estimated, the mean posterior of the noisy component; means / variances of the "
             "clean/noisy components on the normalised losses)")
    if len(rows) > limit:
        shown = sorted(rows, key=lambda r: -(r["noise_rate_est"] or 0.0))[:limit]
        title += f": the {limit} noisiest of {len(rows)}, all in per_class.csv"
    t = Table(title=title)
    has_true = any(r["true_noise_rate"] is not None for r in rows)
    cols = ["class", "size", "kept", "flagged", "noise"] + (["true"] if has_true else []) + ["means", "variances"]
    for c in cols:
        t.add_column(c, justify="left" if c == "class" else "right", overflow="fold")
    for r in shown:
        t.add_row(_text(r["name"]), str(r["size"]), str(r["kept"]), str(r["flagged"]), _pct(r["noise_rate_est"]),
                  *([_pct(r["true_noise_rate"])] if has_true else []),
                  f"{_num(r['mean_clean'], '.2f')}/{_num(r['mean_noisy'], '.2f')}",
                  f"{_num(r['var_clean'], '.1g')}/{_num(r['var_noisy'], '.1g')}")
    return t


def _suspects(s: Dict[str, Any], names: List[str]) -> Table:
    t = Table(title=f"top {len(s['top'])} suspects (most likely mislabelled first)")
    has_true = bool(s["top"]) and "true_label" in s["top"][0]
    for c in ["#", "idx", "key", "given", "predicted", "score", "loss"] + (["true"] if has_true else []):
        t.add_column(c, justify="left" if c in ("key", "given", "predicted", "true") else "right")

    def name(c) -> str:
        if c is None:  # a true label nobody knows
            return "-"
        return _text(names[c]) if 0 <= c < len(names) else str(c)

    for i, r in enumerate(s["top"], 1):
        t.add_row(str(i), str(r["idx"]), _text(r["key"]) if r["key"] else "-", name(r["given_label"]),
                  name(r["predicted_label"]),
                  f"{r['label_score']:.3g}", f"{r['loss']:.3f}", *([name(r["true_label"])] if has_true else []))
    return t


@click.command("report")
@click.argument("run_dir", metavar="RUN_DIR")
@click.option("--epoch", type=click.IntRange(0), default=None,
              help="Fine-tuning epoch whose selection to report; default: the last one.")
@click.option("--top", type=click.IntRange(0), default=None,
              help="How many suspects to print (default 10) and, with --html, to show in the page's gallery "
                   "(default 100).")
@click.option("--plot", is_flag=True,
              help="Also write report/loss_histograms.png and report/selection_by_epoch.png (needs matplotlib).")
@click.option("--shards", type=click.Path(file_okay=False), default=None,
              help="The run's prepared dataset if it moved (for the key column); default: the recipe's data.shards.")
@click.option("--pred-probs", "pred_probs", is_flag=True,
              help="Also write cleanlab's inputs to report/: pred_probs.npy (out-of-sample, a K-fold linear probe on "
                   "the run's cached features), labels.npy, idx.npy (which samples the rows are), folds.npy.")
@click.option("--folds", type=click.IntRange(2), default=None, metavar="K",
              help="Folds of --pred-probs (default 5).")
@click.option("--export-features", is_flag=True,
              help="With --pred-probs: also report/features.safetensors (the cached features of those rows, and idx).")
@click.option("--html", "html", is_flag=True,
              help="Also write report/index.html: one self-contained page (no network) with per-class loss "
                   "histograms, a gallery of the top suspects' thumbnails and the most confused class pairs.")
@click.option("--json", "as_json", is_flag=True,
              help="End with one JSON line: files written, counts, precision/recall, health score, per-class table.")
def command(run_dir: str, epoch: Optional[int], top: Optional[int], plot: bool, shards: Optional[str], as_json: bool,
            pred_probs: bool = False, folds: Optional[int] = None, export_features: bool = False, html: bool = False) -> None:
    """Label issues found by a TURN run: which given labels the per-class GMM calls wrong.

    Writes RUN_DIR/report/label_issues.csv (one row per training sample, most likely mislabelled
    first; cleanlab's columns given_label, predicted_label, label_score = p(clean),
    is_label_issue = not kept by the GMM) and RUN_DIR/report/per_class.csv (size, kept, flagged,
    estimated noise rate, mixture parameters), and prints a summary. Definitions: turnctl/report/__init__.py.

    \b
    Examples:
      turnctl report runs/clip_l14-20261122-101500
      turnctl report runs/clip_l14-20261122-101500 --epoch 0 --top 20 --plot
      turnctl report runs/clip_l14-20261122-101500 --html --top 200   # report/index.html
      turnctl report runs/x --json | tail -n 1 | jq .overall_label_health_score
    """
    from turnctl.report import MAX_PLOT_CLASSES, write_report

    gallery_top = 100 if top is None else top  # turnctl.report.html.DEFAULT_TOP
    top = 10 if top is None else top

    oos = None
    if (folds is not None or export_features) and not pred_probs:
        raise TurnctlError("--folds and --export-features go with --pred-probs")
    if pred_probs:  # before any file is written: a run without cached features is one line, no half report
        from turnctl.report.pred_probs import DEFAULT_FOLDS, run_pred_probs

        oos = run_pred_probs(run_dir, folds=folds or DEFAULT_FOLDS, shards=shards)
    from turnctl.report.plots import check_matplotlib
    from turnctl.report.tables import report_tables

    if plot:
        check_matplotlib()  # before reading or writing anything: no half report
    tables = report_tables(run_dir, epoch, shards)  # read once for the CSVs and the page
    s = write_report(tables, top=top, plot=plot)
    if oos is not None:
        from turnctl.report.pred_probs import summary_of, write_pred_probs

        written = write_pred_probs(run_dir, oos, export_features=export_features)
        s["pred_probs"] = summary_of(oos, written)
        s["files"].update({f"pred_probs_{k}" if k != "pred_probs" else k: v for k, v in written.items()})
    if html:
        from turnctl.report.html import write_html_report

        s["files"]["html"] = write_html_report(tables, top=gallery_top)
    names = [r["name"] for r in s["per_class"]]
    console = result_console()
    console.print(_overview(s))
    console.print(_per_class(s["per_class"], MAX_PLOT_CLASSES))
    if top:
        if s["top"]:
            console.print(_suspects(s, names))
        else:
            console.print("no sample is flagged")
    if not s["keys"]:
        console.print("[yellow]keys unavailable: the run's shards could not be read (see the warning)[/]")
    for path in s["files"].values():
        console.print(f"wrote {_text(path)}")
    if oos is not None:
        pp = s["pred_probs"]
        console.print(f"pred_probs: {pp['rows']} x {pp['classes']}, out-of-sample from a {pp['folds']}-fold probe; rows "
                      f"are idx.npy's samples ({pp['excluded_undecodable']} undecodable and {pp['excluded_held_out']} "
                      "held-out samples left out)")
    if as_json:
        emit_json(s)
