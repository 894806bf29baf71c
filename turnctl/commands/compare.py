"""``turnctl compare``: several methods on the same data, side by side (the paper's table layout)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Tuple

import click
from rich.markup import escape
from rich.table import Table

from turnctl.commands.common import emit_json
from turnctl.commands.train import methods_help, resolve
from turnctl.distributed import env_world_size, init_distributed, is_main
from turnctl.logger import result_console
from turnctl.rundir import unwritable


def _pct(ms) -> str:
    if ms["mean"] is None:
        return "-"
    return f"{100 * ms['mean']:.2f}" + (f" ± {100 * ms['std']:.2f}" if ms["std"] else "")


@click.command("compare", epilog=methods_help())
@click.option("--recipe", "recipe_name", required=True, metavar="NAME|PATH")
@click.option("--shards", type=click.Path(file_okay=False), default=None)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Directory for the runs and compare.json; default runs/compare-<recipe>-<timestamp>.")
@click.option("--methods", required=True, help="Comma-separated, e.g. turn,lp-gce,fft-ce (listed below).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
@click.option("--json", "as_json", is_flag=True)
def command(recipe_name: str, shards: Optional[str], out: Optional[str], methods: str, seeds: str,
            overrides: Tuple[str, ...], as_json: bool) -> None:
    """Run each method (reusing the feature cache) and print its test accuracy: at the epoch chosen on
    validation (best), after the last epoch, and the optimistic maximum over epochs.

    \b
    Example:
      deepspeed --module turnctl compare --recipe demo --methods turn,lp-ce,fft-ce --seeds 0,1,2
    """
    from turnctl.compare import check_methods, compare_methods
    from turnctl.errors import RecipeError

    r = resolve(recipe_name, shards, None, None, overrides)
    r.deepspeed_config(env_world_size())
    methods_asked = _listed("--methods", methods, str)
    check_methods(methods_asked)  # before --out is created
    seed_list = _listed("--seeds", seeds, int)
    if any(s < 0 for s in seed_list):
        raise RecipeError(f"--seeds '{seeds}': seeds are integers >= 0")
    init_distributed(r.deepspeed.timeout_minutes)
    from turnctl.distributed import broadcast_object

    # Rank 0 checks and creates --out before the first method runs: compare.json and summary.json go
    # there at the very end, and must neither overwrite a user's files nor fail after hours of work.
    decision = _claim_out(out or f"runs/compare-{r.name}-{time.strftime('%Y%m%d-%H%M%S')}") if is_main() else None
    decision = broadcast_object(decision)
    if decision["problem"]:
        raise RecipeError(decision["problem"])
    out_dir = decision["out"]
    result = compare_methods(r, methods=methods_asked, seeds=seed_list, out=Path(out_dir))
    if not is_main() or result is None:
        return
    table = Table(title=f"{escape(r.name)} on {escape(r.data.shards)}: test accuracy (%)",
                  caption="best: at the epoch chosen on validation; max*: the highest test accuracy of any "
                          "epoch (the papers' 'best'), optimistic because it is chosen on test")
    # top-5 beside top-1 when any method measured it (datasets of more than five classes)
    top5 = any((result["table"][m].get("top5_last") or {}).get("mean") is not None for m in methods_asked)
    for col in ("method", "best (val)", "last", "max*") + (("top-5 best (val)", "top-5 last") if top5 else ()) \
            + ("wall time (s)", "vs FFT-CE"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m in methods_asked:
        row = result["table"][m]
        rel = row["wall_time_vs_fft_ce"]
        extra = (_pct(row["top5_best"]), _pct(row["top5_last"])) if top5 else ()
        table.add_row(escape(m), _pct(row["best"]), _pct(row["last"]), _pct(row["max_over_epochs"]), *extra,
                      f"{row['wall_time_s']['mean']:.1f}",
                      f"{rel:.2f}x" if rel else "-")
    result_console().print(table)
    # markup=False: a path is data; '[/x]' in it would otherwise raise after the results are written.
    result_console().print(f"wrote {Path(out_dir) / 'compare.json'} and {Path(out_dir) / 'summary.json'}",
                           markup=False, highlight=False)
    if as_json:
        emit_json(result)


def _listed(option: str, text: str, kind: type) -> list:
    """A comma-separated option as a list: at least one item, no repeats (a repeated method or seed
    would train into the same run directory twice)."""
    from turnctl.errors import RecipeError

    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise RecipeError(f"{option} '{text}': name at least one, comma-separated (e.g. "
                          f"{'turn,lp-gce,fft-ce' if kind is str else '0,1,2'})")
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise RecipeError(f"{option} '{text}': expected comma-separated integers") from None
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise RecipeError(f"{option} '{text}': '{repeated[0]}' is listed twice")
    return values


def _claim_out(out: str) -> dict:
    """{"out", "problem"}: --out exists empty or is created here, and is writable (rank 0)."""
    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            return {"out": out, "problem": f"--out {path} is a file, not a directory; choose another --out"}
        if path.exists() and any(path.iterdir()):
            return {"out": out, "problem": (f"--out {path} is not empty; compare writes compare.json, summary.json "
                                            "and one run directory per method and seed there: choose another --out")}
    except OSError as exc:
        return {"out": out, "problem": f"--out {path}: cannot read it ({exc.strerror or exc}); choose another --out"}
    why = unwritable(path)  # creates it; a probe file proves it writable
    if why:
        return {"out": out, "problem": f"--out {path}: cannot write there ({why}); choose another --out"}
    return {"out": out, "problem": None}
