"""The report as one self-contained HTML page: ``report/index.html`` (``turnctl report RUN --html``).

Data apart from rendering, as in the rest of turnctl.report: :func:`page_data` builds one JSON-able
dict from a selection (the same tables the CSVs hold: turnctl.report.tables), :func:`render_page`
turns it into the page, :func:`write_html_report` writes it atomically.

The page works from a ``file://`` URL without a network: CSS and JavaScript are inline, the
thumbnails are ``data:`` URIs, the histograms inline SVG drawn by the page's script from the
numbers in the data, and a Content-Security-Policy meta tag forbids every other source (a stray
``<img src=http...>`` would be blocked, not fetched). All text comes from file names and the
manifest (class names may hold ``<`` or ``&``): it is escaped (turnctl.logger.printable_name for
bytes that are not UTF-8, then html.escape in the HTML and ``\\u003c`` escapes in the JSON, which
the script only ever puts into ``textContent``).

Page size, bounded at any dataset size (WebVision: 2.4M samples, 1000 classes):

* the gallery: ``top`` thumbnails (default 100; JPEGs of at most THUMBNAIL_SIDE px, 1-5 KB each);
* the confused pairs: at most ``max_pairs`` x ``pair_examples`` example thumbnails, shared with
  the gallery's where the samples are the same;
* per class: its name, counts, rates, mixture parameters and a ``HISTOGRAM_BINS``-bin histogram,
  as columns (O(classes) numbers: ~170 bytes a class plus its name; 0.25 MB for 1000 classes with
  WebVision-length names, tests/test_report_html.py measures it).

Nothing per sample beyond those; the SVGs are drawn by the script, only for the classes a reader
opens (the ``open_classes`` noisiest are open from the start).
"""

from __future__ import annotations

import html
import json
import math
import os
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from turnctl import __version__
from turnctl.cleanse import tau_crossings
from turnctl.logger import log, printable_name
from turnctl.report.selection import Run, Selection
from turnctl.report.tables import health_summary, report_tables
from turnctl.report.thumbnails import THUMBNAIL_SIDE, read_thumbnails
from turnctl.rundir import RunLayout, atomic_write_text

HTML_FILE = "index.html"
DEFAULT_TOP = 100          # gallery size (--top)
HISTOGRAM_BINS = 40        # per class; fixed so the page grows with classes, not samples
MAX_PAIRS = 10             # most confused (given, predicted) pairs shown
PAIR_EXAMPLES = 4          # thumbnails per pair
OPEN_CLASSES = 12          # per-class histograms drawn at load (the noisiest); the rest on demand

# The page may load nothing but itself: inline style and script, data: images.
CONTENT_SECURITY_POLICY = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                           "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")


def _num(v: Any, digits: int = 4) -> Optional[float]:
    """A float for the JSON, rounded to ``digits`` significant digits (page size); None if not finite."""
    if v is None:
        return None
    v = float(v)
    return float(f"{v:.{digits}g}") if math.isfinite(v) else None


def _text(v: Any) -> str:
    return printable_name(str(v))


def _histograms(sel: Selection, bins: int) -> Dict[str, Any]:
    """Per-class histograms of the losses the GMM saw, on the axis it saw them (as plots.py), with a
    shared set of ``bins`` bins: counts [C, bins] and, when true labels are known, the known-wrong
    ones among them; O(N + C * bins)."""
    x, lo, hi = sel.normalised_loss()
    seen = sel.usable & (sel.given >= 0) & (sel.given < sel.num_classes)
    if sel.normalize == "minmax":
        xmin, xmax = 0.0, 1.0
    elif seen.any():
        xmin, xmax = float(np.nanmin(x[seen])), float(np.nanmax(x[seen]))
    else:
        xmin, xmax = 0.0, 1.0
    if not xmax > xmin:
        xmin, xmax = xmin - 0.5, xmin + 0.5
    C = sel.num_classes
    b = np.clip(((x[seen] - xmin) / (xmax - xmin) * bins).astype(np.int64), 0, bins - 1)
    flat = sel.given[seen] * bins + b
    counts = np.bincount(flat, minlength=C * bins).reshape(C, bins)
    out: Dict[str, Any] = {"lo": xmin, "hi": xmax, "bins": bins, "counts": counts,
                           "loss_lo": _num(lo, 6), "loss_hi": _num(hi, 6),
                           "axis": "normalised loss" if sel.normalize == "minmax" else "loss"}
    if sel.has_clean:
        wrong = ((sel.clean >= 0) & (sel.clean != sel.given))[seen]
        out["wrong"] = np.bincount(flat[wrong], minlength=C * bins).reshape(C, bins)
    return out


def confused_pairs(issues: Dict[str, np.ndarray], num_classes: int, *, max_pairs: int = MAX_PAIRS,
                   examples: int = PAIR_EXAMPLES) -> List[Dict[str, Any]]:
    """The most frequent (given, predicted) pairs among the flagged samples whose prediction is
    another class: ``[{"given", "predicted", "count", "examples": [idx, ...]}]``, most frequent first
    (ties: given, then predicted); examples are the pair's most severe samples (``issues`` is in
    severity order, turnctl.report.tables.label_issues).

    >>> cols = {"idx": np.array([4, 2, 9, 1]), "given_label": np.array([0, 0, 1, 0]),
    ...         "predicted_label": np.array([1, 1, 0, 0]), "is_label_issue": np.array([True, True, True, False])}
    >>> confused_pairs(cols, 2, examples=1)
    [{'given': 0, 'predicted': 1, 'count': 2, 'examples': [4]}, {'given': 1, 'predicted': 0, 'count': 1, 'examples': [9]}]
    """
    g, p = issues["given_label"], issues["predicted_label"]
    m = (issues["is_label_issue"] & (p >= 0) & (p < num_classes) & (g >= 0) & (g < num_classes) & (p != g))
    if not m.any():
        return []
    pair = g[m].astype(np.int64) * num_classes + p[m]
    values, counts = np.unique(pair, return_counts=True)
    order = np.lexsort((values, -counts))[:max_pairs]
    rows_idx = issues["idx"][m]
    out = []
    for k in order:
        v = int(values[k])
        out.append({"given": v // num_classes, "predicted": v % num_classes, "count": int(counts[k]),
                    "examples": [int(i) for i in rows_idx[pair == v][:examples]]})
    return out


def page_data(run: Run, *, epoch: Optional[int] = None, shards: Optional[Union[str, os.PathLike]] = None,
              top: int = DEFAULT_TOP, bins: int = HISTOGRAM_BINS, max_pairs: int = MAX_PAIRS,
              pair_examples: int = PAIR_EXAMPLES, open_classes: int = OPEN_CLASSES,
              thumbnail_side: int = THUMBNAIL_SIDE) -> Dict[str, Any]:
    """Everything the page shows, as one JSON-able dict (text already printable, floats rounded).

    Keys: ``run`` (directory, name, method, epoch(s), tau, dataset, shards, split), ``summary``
    (turnctl.report.tables.health_summary), ``classes`` (names by class id), ``per_class`` (columns,
    one value per class: counts, rates, mixture, tau crossings, histogram), ``histogram`` (the shared
    axis), ``suspects`` (the ``top`` most severe flagged samples), ``pairs`` (:func:`confused_pairs`),
    ``thumbnails`` (``{idx: data URI}`` for the suspects and the pairs' examples), ``warnings``.
    Thumbnails come from the run's shards only when turnctl.report.keys.keys_for finds them to be
    the run's (same size, same given labels); otherwise the gallery shows no images and a warning
    says why.
    """
    base = report_tables(run, epoch, shards)
    sel, issues, table, warnings = base.sel, base.issues, base.per_class, list(base.warnings)
    keys_ok = not base.warnings  # the keys (and so the shards) are the run's
    health = health_summary(sel)
    hist = _histograms(sel, bins)
    C = sel.num_classes

    flagged_rows = np.flatnonzero(issues["is_label_issue"])[:max(0, int(top))]
    has_true = "true_label" in issues
    suspects = []
    for r in flagged_rows:
        s = {"idx": int(issues["idx"][r]), "key": _text(issues["key"][r]), "given": int(issues["given_label"][r]),
             "predicted": int(issues["predicted_label"][r]), "score": _num(issues["label_score"][r]),
             "loss": _num(issues["loss"][r])}
        if has_true:
            t = issues["true_label"][r]
            s["true"] = None if t is None else int(t)
        suspects.append(s)
    pairs = confused_pairs(issues, C, max_pairs=max_pairs, examples=pair_examples)

    thumbs: Dict[str, str] = {}
    wanted = sorted({s["idx"] for s in suspects} | {i for p in pairs for i in p["examples"]})
    if wanted and keys_ok and sel.split_info is not None:
        try:
            thumbs = {str(i): t.data_uri() for i, t in
                      read_thumbnails(sel.split_info, wanted, side=thumbnail_side).items()}
        except (OSError, ValueError, tarfile.TarError) as exn:
            w = f"{sel.split_info.root}: cannot read thumbnails ({type(exn).__name__}: {exn}); the gallery has no images"
            log.warning(w)
            warnings.append(w)

    per_class = []
    lo, hi = hist["lo"], hist["hi"]
    for row in table:
        c = row["class"]
        crossings = ([] if row["mean_clean"] is None else
                     tau_crossings(sel.means[c], sel.variances[c], sel.weights[c], tau=sel.tau, lo=lo, hi=hi))
        entry = {
            "class": c, "size": row["size"], "kept": row["kept"], "flagged": row["flagged"],
            "undecodable": row["undecodable"], "held_out": row["held_out"], "selected": row["selected"],
            "noise": _num(row["noise_rate_est"]), "true_noise": _num(row["true_noise_rate"]),
            "means": [_num(row["mean_clean"], 6), _num(row["mean_noisy"], 6)],
            "variances": [_num(row["var_clean"], 6), _num(row["var_noisy"], 6)],
            "weights": [_num(row["weight_clean"], 6), _num(row["weight_noisy"], 6)],
            "tau_x": [_num(v, 6) for v in crossings],
            "hist": hist["counts"][c].tolist(),
        }
        if "wrong" in hist:
            entry["wrong"] = hist["wrong"][c].tolist()
        per_class.append(entry)
    # Columns, not one dict per class: the key names would be half of the page at 1000 classes.
    per_class_columns = {k: [e[k] for e in per_class] for k in (per_class[0] if per_class else ())}

    info = sel.split_info
    quality = health["quality"]
    return {
        "generator": f"turnctl {__version__}",
        "run": {
            "dir": _text(sel.run_dir), "name": _text(sel.run_dir.name), "method": _text(sel.method),
            "epoch": sel.epoch, "epochs": list(sel.epochs), "tau": sel.tau, "normalize": sel.normalize,
            "shards": None if sel.shards is None else _text(sel.shards), "split": _text(sel.train_split),
            "dataset": _text(info.manifest.get("dataset")) if info is not None and info.manifest.get("dataset") else None,
        },
        "summary": {
            "num_samples": health["num_samples"], "num_classes": C, "kept": health["kept"],
            "flagged": health["flagged"], "selected": health["selected"], "undecodable": health["undecodable"],
            "held_out": health["held_out"], "estimated_noise_rate": _num(health["estimated_noise_rate"]),
            "health_score": _num(health["overall_label_health_score"]),
            "true_noise_rate": _num(quality["true_noise_rate"]) if quality else None,
            "precision": _num(quality["precision"]) if quality else None,
            "recall": _num(quality["recall"]) if quality else None,
        },
        "classes": list(sel.class_names),  # printable already (load_selection)
        "histogram": {k: hist[k] for k in ("lo", "hi", "bins", "loss_lo", "loss_hi", "axis")},
        "per_class": per_class_columns,  # {column: [value per class]}
        "open_classes": int(open_classes),
        "has_true": has_true,
        "suspects": suspects,
        "top": int(top),
        "pairs": pairs,
        "thumbnails": thumbs,
        "thumbnail_side": int(thumbnail_side),
        "warnings": [_text(w) for w in warnings],
    }


def _json_for_script(data: Dict[str, Any]) -> str:
    """JSON safe inside ``<script type="application/json">``: no ``</script>``, ``<!--`` nor line
    separators can appear, whatever the names hold."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _header(data: Dict[str, Any]) -> str:
    e = html.escape
    run, s = data["run"], data["summary"]
    rows = [("run", run["dir"]), ("method", run["method"]),
            ("selection", f"fine-tuning epoch {run['epoch']} (epochs with a selection: "
                          f"{', '.join(map(str, run['epochs']))}); tau = {run['tau']:g}"),
            ("data", (f"{run['dataset']}, " if run["dataset"] else "") +
             f"split {run['split']} of {run['shards'] or 'unknown shards'}"),
            ("samples", f"{s['num_samples']} in {s['num_classes']} classes"),
            ("kept / flagged / selected", f"{s['kept']} / {s['flagged']} / {s['selected']}")]
    if s["undecodable"]:
        rows.append(("undecodable (never flagged)", str(s["undecodable"])))
    if s["held_out"]:
        rows.append(("held out for validation (never flagged)", str(s["held_out"])))
    rows.append(("estimated noise rate", _pct(s["estimated_noise_rate"])))
    if s["true_noise_rate"] is not None:
        rows.append(("true noise rate (known labels)", _pct(s["true_noise_rate"])))
        rows.append(("flagged precision / recall", f"{_pct(s['precision'])} / {_pct(s['recall'])}"))
    health = "–" if s["health_score"] is None else f"{s['health_score']:.3f}"
    rows.append(("label health score (1 − estimated noise rate)", health))
    body = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    warn = "".join(f'<p class="warning">{e(w)}</p>' for w in data["warnings"])
    return (f'<header><h1>Label issues of {e(run["name"])}</h1>'
            f'<table class="overview" id="overview">{body}</table>{warn}</header>')


def render_page(data: Dict[str, Any]) -> str:
    """The page of :func:`page_data`'s dict: static header, the data as JSON, the script that draws
    the per-class histograms, the gallery and the confused pairs from it."""
    e = html.escape
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{e(CONTENT_SECURITY_POLICY)}">
<meta name="generator" content="{e(data['generator'])}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>turnctl report: {e(data['run']['name'])}</title>
<style>{_CSS}</style>
</head>
<body>
{_header(data)}
<section id="classes-section"><h2>Per class</h2>
<p class="note">Sorted by estimated noise rate. Histogram of the losses the GMM saw ({e(data['histogram']['axis'])}),
<span class="k-bar">samples</span>{'<span class="k-wrong">label known wrong</span>' if data['has_true'] else ''},
the fitted <span class="k-clean">clean</span> and <span class="k-noisy">noisy</span> components, their
<span class="k-sum">sum</span>, and <span class="k-tau">p(clean) = tau</span>; the shaded range is flagged.
Click a class to draw it.</p>
<div id="classes"></div></section>
<section id="gallery-section"><h2>Top suspects</h2>
<div class="controls">
<label>given class <select id="filter-given"><option value="">all</option></select></label>
<label>predicted class <select id="filter-pred"><option value="">all</option></select></label>
<label>sort <select id="sort">
<option value="score">p(clean), lowest first</option>
<option value="-score">p(clean), highest first</option>
<option value="-loss">loss, highest first</option>
<option value="idx">idx</option>
</select></label>
<span id="gallery-count"></span></div>
<div id="gallery"></div></section>
<section id="pairs-section"><h2>Most confused class pairs (flagged, predicted as another class)</h2>
<table id="pairs"><thead><tr><th>given</th><th>predicted</th><th>flagged</th><th>examples</th></tr></thead>
<tbody></tbody></table></section>
<footer>{e(data['generator'])}</footer>
<script type="application/json" id="report-data">{_json_for_script(data)}</script>
<script>{_JS}</script>
</body>
</html>
"""


def write_html_report(run: Run, *, epoch: Optional[int] = None, shards: Optional[Union[str, os.PathLike]] = None,
                      top: int = DEFAULT_TOP, out_dir: Optional[Union[str, os.PathLike]] = None) -> str:
    """Write ``report/index.html`` (or into ``out_dir``) atomically; return its path.

    >>> write_html_report("runs/tiny-20260101-000000", top=50)     # doctest: +SKIP
    'runs/tiny-20260101-000000/report/index.html'
    """
    base = report_tables(run, epoch, shards)  # a ReportTables passed in is used as it is
    data = page_data(base, top=top)
    path = (Path(out_dir) if out_dir is not None else RunLayout(base.sel.run_dir).report_dir) / HTML_FILE
    atomic_write_text(path, render_page(data))
    return str(path)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table.overview th{text-align:left;font-weight:normal;color:#555;padding-right:1.5em}
.warning{color:#a60;margin:.3em 0}.note{color:#555;font-size:.9em}.note span{padding:0 .3em;border-radius:3px}
.k-bar{background:#9ecae1}.k-wrong{background:#fb9a99}.k-clean{color:#1a9641;font-weight:bold}
.k-noisy{color:#e66101;font-weight:bold}.k-sum{border-bottom:1px dashed #000}.k-tau{color:#7b3294;font-weight:bold}
details.cls{margin:.15em 0}details.cls summary{cursor:pointer}
details.cls svg{display:block;margin:.3em 0 .6em 1.2em;background:#fafafa;border:1px solid #eee}
.controls{margin:.5em 0;display:flex;gap:1.2em;flex-wrap:wrap;align-items:center}
#gallery{display:flex;flex-wrap:wrap;gap:8px}
figure.card{margin:0;width:160px;border:1px solid #ddd;border-radius:4px;padding:4px;font-size:11px;background:#fff}
figure.card[hidden]{display:none}
figure.card img,.noimg{display:block;margin:0 auto 3px;width:96px;height:96px;object-fit:contain}
.noimg{background:#eee;color:#888;text-align:center;line-height:96px}
#pairs .noimg{display:inline-block;width:48px;height:48px;line-height:48px;font-size:9px;white-space:nowrap;
overflow:hidden;vertical-align:middle;margin-right:3px}
figcaption div{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.key{font-family:monospace}.wrongtrue{color:#b00}
#pairs td,#pairs th{padding:2px 8px;text-align:left;vertical-align:middle}
#pairs img{width:48px;height:48px;object-fit:contain;margin-right:3px}
footer{margin-top:2em;color:#999;font-size:.8em}
"""

# Plain ES2017, no library. Text only ever goes into textContent (never innerHTML): names are data.
_JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("report-data").textContent);
const NAMES = D.classes;
const SVGNS = "http://www.w3.org/2000/svg";
function cname(c) { return (c !== null && c >= 0 && c < NAMES.length) ? NAMES[c] : "–"; }
function el(tag, cls, text) {
  const n = document.createElement(tag);
  if (cls) n.className = cls;
  if (text !== undefined) n.textContent = text;
  return n;
}
function sv(tag, attrs) {
  const n = document.createElementNS(SVGNS, tag);
  for (const k in attrs) n.setAttribute(k, attrs[k]);
  return n;
}
function pct(v) { return v === null ? "–" : (100 * v).toFixed(1) + "%"; }
function fmt(v, d) { return v === null ? "–" : v.toFixed(d); }

// ---- per class: the mixture as plots.py draws it (w_k N(x; mu_k, var_k), in samples per bin) ----
function logComponent(x, m, v, w) {
  return Math.log(w) - 0.5 * Math.log(2 * Math.PI * v) - 0.5 * (x - m) * (x - m) / v;
}
function drawClass(holder, pc) {
  const W = 420, H = 150, L = 34, R = 8, T = 8, B = 22;
  const H0 = D.histogram.lo, H1 = D.histogram.hi, nb = D.histogram.bins, bw = (H1 - H0) / nb;
  const n = pc.hist.reduce((a, b) => a + b, 0);
  const svg = sv("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img"});
  const X = x => L + (x - H0) / (H1 - H0) * (W - L - R);
  const ok = pc.means[0] !== null && pc.variances[0] > 0 && pc.weights[0] !== null;
  const grid = [], c0 = [], c1 = [];
  if (ok) {
    for (let i = 0; i <= 150; i++) {
      const x = H0 + (H1 - H0) * i / 150;
      grid.push(x);
      c0.push(n * bw * Math.exp(logComponent(x, pc.means[0], pc.variances[0], pc.weights[0])));
      c1.push(pc.weights[1] > 0 && pc.variances[1] > 0
        ? n * bw * Math.exp(logComponent(x, pc.means[1], pc.variances[1], pc.weights[1])) : 0);
    }
  }
  const top = Math.max(Math.max(...pc.hist) * 1.35, 1);
  const peak = Math.max(0, ...c0.map((v, i) => v + c1[i]));
  const ymax = Math.max(top, Math.min(peak * 1.05, 3 * top));
  const Y = y => H - B - Math.min(y, ymax) / ymax * (H - B - T);
  // the flagged range: where the clean posterior is <= tau, between the tau crossings
  if (ok) {
    const cuts = [H0, ...pc.tau_x, H1];
    for (let i = 0; i + 1 < cuts.length; i++) {
      const mid = 0.5 * (cuts[i] + cuts[i + 1]);
      const a = logComponent(mid, pc.means[0], pc.variances[0], pc.weights[0]);
      const b = pc.weights[1] > 0 ? logComponent(mid, pc.means[1], pc.variances[1], pc.weights[1]) : -Infinity;
      const post = 1 / (1 + Math.exp(b - a));
      if (post <= D.run.tau && cuts[i + 1] > cuts[i])
        svg.appendChild(sv("rect", {x: X(cuts[i]), y: T, width: X(cuts[i + 1]) - X(cuts[i]), height: H - B - T,
                                    fill: "#d7191c", "fill-opacity": 0.07}));
    }
  }
  pc.hist.forEach((v, i) => {
    if (!v) return;
    svg.appendChild(sv("rect", {x: X(H0 + i * bw), y: Y(v), width: Math.max(X(H0 + bw) - X(H0) - 0.5, 0.5),
                                height: Y(0) - Y(v), fill: "#9ecae1"}));
    const w = pc.wrong ? pc.wrong[i] : 0;
    if (w) svg.appendChild(sv("rect", {x: X(H0 + i * bw), y: Y(w), width: Math.max(X(H0 + bw) - X(H0) - 0.5, 0.5),
                                       height: Y(0) - Y(w), fill: "#fb9a99"}));
  });
  function path(ys, color, extra) {
    const floor = 0.005 * peak;
    let d = "", pen = false;
    ys.forEach((y, i) => {
      if (y > floor) { d += (pen ? "L" : "M") + X(grid[i]).toFixed(1) + "," + Y(y).toFixed(1); pen = true; }
      else pen = false;
    });
    if (d) svg.appendChild(sv("path", Object.assign({d: d, fill: "none", stroke: color, "stroke-width": 2}, extra || {})));
  }
  if (ok) {
    path(c0, "#1a9641");
    if (pc.weights[1] > 0) path(c1, "#e66101");
    path(c0.map((v, i) => v + c1[i]), "#000", {"stroke-width": 0.9, "stroke-dasharray": "4 3"});
    pc.tau_x.forEach(x => svg.appendChild(sv("line", {x1: X(x), x2: X(x), y1: T, y2: H - B, stroke: "#7b3294",
                                                      "stroke-width": 1.5, "stroke-dasharray": "2 2"})));
  }
  svg.appendChild(sv("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#888"}));
  const labels = [[X(H0), "start", H0.toPrecision(3)], [X(H1), "end", H1.toPrecision(3)],
                  [(L + W - R) / 2, "middle", D.histogram.axis]];
  for (const [x, anchor, t] of labels) {
    const tx = sv("text", {x: x, y: H - 6, "text-anchor": anchor, "font-size": 10, fill: "#555"});
    tx.textContent = t;
    svg.appendChild(tx);
  }
  const yl = sv("text", {x: L - 4, y: T + 9, "text-anchor": "end", "font-size": 10, fill: "#555"});
  yl.textContent = String(Math.round(ymax));
  svg.appendChild(yl);
  holder.appendChild(svg);
}
function buildClasses() {
  const box = document.getElementById("classes");
  const cols = Object.keys(D.per_class), rows = [];
  for (let i = 0; i < NAMES.length; i++) {
    const r = {};
    for (const k of cols) r[k] = D.per_class[k][i];
    rows.push(r);
  }
  const order = rows.sort((a, b) => ((b.noise || 0) - (a.noise || 0)) || (a.class - b.class));
  order.forEach((pc, rank) => {
    const det = el("details", "cls");
    det.dataset.class = pc.class;
    const parts = [`size ${pc.size}`, `kept ${pc.kept}`, `flagged ${pc.flagged}`, `est. noise ${pct(pc.noise)}`];
    if (D.has_true) parts.push(`true noise ${pct(pc.true_noise)}`);
    if (pc.undecodable) parts.push(`undecodable ${pc.undecodable}`);
    if (pc.held_out) parts.push(`held out ${pc.held_out}`);
    const sum = el("summary");
    sum.appendChild(el("b", "cname", cname(pc.class)));
    sum.appendChild(document.createTextNode(": " + parts.join(", ")));
    det.appendChild(sum);
    det.addEventListener("toggle", () => {
      if (det.open && !det.querySelector("svg")) drawClass(det, pc);
    });
    box.appendChild(det);
    if (rank < D.open_classes) det.open = true;   // drawn by its toggle event
  });
}

// ---- gallery: the top suspects; filters by given / predicted class, sort by score or loss ----
function thumb(idx, title) {
  const uri = D.thumbnails[String(idx)];
  if (!uri) { const n = el("div", "noimg", "no image"); n.title = title; return n; }
  const img = el("img");
  img.src = uri; img.alt = title; img.title = title;
  return img;
}
function buildGallery() {
  const box = document.getElementById("gallery");
  D.suspects.forEach((s, rank) => {
    const card = el("figure", "card");
    Object.assign(card.dataset, {idx: s.idx, given: s.given, predicted: s.predicted, rank: rank,
                                 score: s.score === null ? "" : s.score, loss: s.loss === null ? "" : s.loss});
    card.appendChild(thumb(s.idx, s.key || ("idx " + s.idx)));
    const cap = el("figcaption");
    const line = (cls, text) => { const d = el("div", cls, text); d.title = text; cap.appendChild(d); };
    line("key", s.key || ("idx " + s.idx));
    line("given", "given: " + cname(s.given));
    line("predicted", "predicted: " + (s.predicted >= 0 ? cname(s.predicted) : "–"));
    line("score", "p(clean) " + fmt(s.score, 3));
    line("loss", "loss " + fmt(s.loss, 3));
    if (D.has_true) line(s.true !== null && s.true !== s.given ? "true wrongtrue" : "true", "true: " + cname(s.true));
    card.appendChild(cap);
    box.appendChild(card);
  });
  for (const [id, field] of [["filter-given", "given"], ["filter-pred", "predicted"]]) {
    const sel = document.getElementById(id);
    const present = [...new Set(D.suspects.map(s => s[field]).filter(c => c >= 0))];
    present.sort((a, b) => cname(a).localeCompare(cname(b)) || a - b);
    for (const c of present) { const o = el("option", "", cname(c)); o.value = String(c); sel.appendChild(o); }
    sel.addEventListener("change", applyGallery);
  }
  document.getElementById("sort").addEventListener("change", applyGallery);
  applyGallery();
}
function applyGallery() {
  const box = document.getElementById("gallery");
  const g = document.getElementById("filter-given").value, p = document.getElementById("filter-pred").value;
  const key = document.getElementById("sort").value;
  const cards = [...box.children];
  const num = (c, f, miss) => c.dataset[f] === "" ? miss : Number(c.dataset[f]);
  const cmp = {
    "score": (a, b) => num(a, "score", Infinity) - num(b, "score", Infinity) || num(a, "rank") - num(b, "rank"),
    "-score": (a, b) => num(b, "score", -Infinity) - num(a, "score", -Infinity) || num(a, "rank") - num(b, "rank"),
    "-loss": (a, b) => num(b, "loss", -Infinity) - num(a, "loss", -Infinity) || num(a, "rank") - num(b, "rank"),
    "idx": (a, b) => num(a, "idx") - num(b, "idx"),
  }[key];
  cards.sort(cmp).forEach(c => box.appendChild(c));
  let shown = 0;
  for (const c of cards) {
    c.hidden = (g !== "" && c.dataset.given !== g) || (p !== "" && c.dataset.predicted !== p);
    if (!c.hidden) shown++;
  }
  document.getElementById("gallery-count").textContent =
    `showing ${shown} of ${cards.length} (the ${D.top} most suspicious flagged samples at most)`;
}

// ---- most confused pairs ----
function buildPairs() {
  const body = document.querySelector("#pairs tbody");
  if (!D.pairs.length) {
    const td = el("td", "", "no flagged sample is predicted as another class");
    td.colSpan = 4;
    body.appendChild(el("tr")).appendChild(td);
    return;
  }
  const keyOf = {};
  D.suspects.forEach(s => { keyOf[s.idx] = s.key; });
  for (const pr of D.pairs) {
    const tr = el("tr");
    tr.appendChild(el("td", "cname", cname(pr.given)));
    tr.appendChild(el("td", "cname", cname(pr.predicted)));
    tr.appendChild(el("td", "", String(pr.count)));
    const ex = el("td");
    pr.examples.forEach(i => ex.appendChild(thumb(i, keyOf[i] || ("idx " + i))));
    tr.appendChild(ex);
    body.appendChild(tr);
  }
}

buildClasses();
buildGallery();
buildPairs();
document.body.dataset.ready = "1";
"""
