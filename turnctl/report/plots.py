"""The report's plots (matplotlib, optional: ``pip install 'turnctl[plot]'``).

``loss_histograms.png``: per class, the losses the GMM saw and the fitted mixture, evaluated with
turnctl.cleanse's mixture maths (the same posteriors the selection computed);
``selection_by_epoch.png``: kept / selected / flagged counts and purities per fine-tuning epoch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from turnctl.cleanse import log_components, mixture_posterior, tau_crossings
from turnctl.errors import TurnctlError
from turnctl.logger import printable_name
from turnctl.report.selection import Run, Selection, as_selection
from turnctl.report.tables import epoch_history, per_class_table
from turnctl.rundir import RunLayout, atomic_path

# Classes shown in the histogram grid (and rows of the per-class table printed by the CLI).
MAX_PLOT_CLASSES = 20


def check_matplotlib() -> None:
    try:
        import matplotlib
    except ImportError:
        raise TurnctlError("--plot needs matplotlib, which is not installed: pip install 'turnctl[plot]'") from None
    del matplotlib  # only its presence matters here; plot_report imports what it uses


def _atomic_savefig(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _plot_classes(sel: Selection, table: List[Dict[str, Any]], max_classes: int) -> Tuple[List[int], str]:
    present = [r for r in table if r["size"] - r["undecodable"] - r["held_out"] > 0]
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
    check_matplotlib()
    sel = as_selection(run, epoch)
    out = Path(out_dir) if out_dir is not None else RunLayout(sel.run_dir).report_dir
    files = {"loss_histograms": out / "loss_histograms.png", "selection_by_epoch": out / "selection_by_epoch.png"}
    _atomic_savefig(_histograms_figure(sel, max_classes), files["loss_histograms"])
    _atomic_savefig(_history_figure(sel), files["selection_by_epoch"])
    return {k: str(v) for k, v in files.items()}


def _histograms_figure(sel: Selection, max_classes: int) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

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
        m = (sel.given == c) & sel.usable
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
        l0, l1 = log_components(grid, sel.means[c], sel.variances[c], sel.weights[c])
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
    axis = ("losses min-max normalised over the samples the GMM saw: "
            f"0 = loss {lo:.3g}, 1 = loss {hi:.3g}" if sel.normalize == "minmax" else "raw losses, as the GMM saw them")
    fig.suptitle(f"{printable_name(sel.run_dir.name)}: per-class loss histograms and fitted 2-component GMMs, "
                 f"fine-tuning epoch {sel.epoch}; {which}\n{axis}", fontsize=10)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
               ncol=min(len(handles), 4), fontsize=8, frameon=False)
    return fig


def _history_figure(sel: Selection) -> Any:
    from matplotlib.figure import Figure

    hist = epoch_history(sel.run_dir)
    has_purity = any(h["kept_purity"] is not None for h in hist)
    fig = Figure(figsize=(10 if has_purity else 5.5, 3.8), layout="constrained")
    axes = fig.subplots(1, 2 if has_purity else 1, squeeze=False)[0]
    ep = [h["epoch"] for h in hist]
    ax = axes[0]
    for k, color in (("kept", "tab:green"), ("selected", "tab:blue"), ("flagged", "tab:red")):
        ax.plot(ep, [h[k] for h in hist], marker="o", color=color, label={"kept": "kept (p(clean) > tau)",
                "selected": "selected (balanced subset)", "flagged": "flagged"}[k])
    ax.axhline(hist[-1]["fitted"], color="gray", ls=":", label="samples the GMM saw")
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
    return fig
