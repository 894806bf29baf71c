"""``turnctl compare``: several methods on the same data, side by side (the paper's table layout)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Tuple

import click
from rich.markup import escape
from rich.table import Table

from turnctl.commands.common import emit_json
from turnctl.commands.train import resolve
from turnctl.distributed import env_world_size, init_distributed, is_main
from turnctl.logger import result_console


def _pct(ms) -> str:
    if ms["mean"] is None:
        return "-"
    return f"{100 * ms['mean']:.2f}" + (f" ± {100 * ms['std']:.2f}" if ms["std"] else "")


@click.command("compare")
@click.option("--recipe", "recipe_name", required=True, metavar="NAME|PATH")
@click.option("--shards", type=click.Path(file_okay=False), default=None)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Directory for the runs and compare.json; default runs/compare-<recipe>-<timestamp>.")
@click.option("--methods", required=True, help="Comma-separated, e.g. turn,lp-gce,fft-ce.")
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
    from turnctl.compare import compare_methods
    from turnctl.errors import RecipeError

    r = resolve(recipe_name, shards, None, None, overrides)
    r.deepspeed_config(env_world_size())
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise RecipeError(f"--seeds '{seeds}': expected comma-separated integers") from None
    init_distributed(r.deepspeed.timeout_minutes)
    from turnctl.distributed import broadcast_object

    out_dir = broadcast_object(out or f"runs/compare-{r.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = compare_methods(r, methods=method_list, seeds=seed_list, out=Path(out_dir))
    if not is_main() or result is None:
        return
    table = Table(title=f"{r.name} on {escape(r.data.shards)}: test accuracy (%)",
                  caption="best: at the epoch chosen on validation; max*: the highest test accuracy of any "
                          "epoch (the papers' 'best'), optimistic because it is chosen on test")
    for col in ("method", "best (val)", "last", "max*", "wall time (s)", "vs FFT-CE"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m in method_list:
        row = result["table"][m]
        rel = row["wall_time_vs_fft_ce"]
        table.add_row(m, _pct(row["best"]), _pct(row["last"]), _pct(row["max_over_epochs"]),
                      f"{row['wall_time_s']['mean']:.1f}",
                      f"{rel:.2f}x" if rel else "-")
    result_console().print(table)
    result_console().print(f"wrote {Path(out_dir) / 'compare.json'} and {Path(out_dir) / 'summary.json'}")
    if as_json:
        emit_json(result)
