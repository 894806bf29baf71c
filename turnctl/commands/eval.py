"""``turnctl eval``: top-1 and top-5 accuracy of a checkpoint on prepared shards."""

from __future__ import annotations

from typing import Optional

import click
from rich.markup import escape
from rich.table import Table

from turnctl.commands.common import emit_json
from turnctl.distributed import is_main
from turnctl.logger import result_console


@click.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A run directory (best, chosen on validation, and last), an export (final/, best/) or a "
                   "DeepSpeed checkpoint dir.")
@click.option("--shards", type=click.Path(file_okay=False), default=None,
              help="Prepared dataset; default: the one the model was trained on. Any other must have the "
                   "model's classes: the same number and, where both name them, the same names in order.")
@click.option("--split", default="test", show_default=True)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(0))
@click.option("--json", "as_json", is_flag=True,
              help="End with one JSON line holding `accuracy` and `top5_accuracy` (null with 5 classes or fewer).")
def command(checkpoint: str, shards: Optional[str], split: str, batch_size: int, workers: int, as_json: bool) -> None:
    """Top-1, top-5, per-class accuracy and the most confused pairs of a trained model.

    Top-5 is shown with more than 5 classes (with 5 or fewer every label is among the top 5).

    \b
    Examples:
      turnctl eval --checkpoint runs/clip_l14-20261122-101500            # best and last
      turnctl eval --checkpoint runs/clip_l14-20261122-101500/final --split val
      turnctl eval --checkpoint runs/webvision-x/final --shards shards/imagenet-val --split val
      deepspeed --module turnctl eval --checkpoint runs/x/checkpoints --json
    """
    from turnctl.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(checkpoint, shards=shards, split=split, batch_size=batch_size,
                                 num_workers=workers)
    if not is_main() or result is None:
        return
    console = result_console()
    for label, rep in result["results"].items():
        how = ""
        if label == "best":
            epoch = rep.get("selected_epoch")
            how = f" (chosen on validation accuracy{f', epoch {epoch}' if epoch is not None else ''})"
        table = Table(title=f"{label}{how}: {escape(rep['checkpoint'])} on {escape(str(rep['shards']))} "
                            f"{escape('[' + rep['split'] + ']')}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("top-1 accuracy", f"{100 * rep['accuracy']:.2f}%")
        if rep.get("top5_accuracy") is not None:
            table.add_row("top-5 accuracy", f"{100 * rep['top5_accuracy']:.2f}%")
        table.add_row("samples", str(rep["num_samples"]))
        if rep["undecodable"]:
            table.add_row("undecodable (excluded)", str(rep["undecodable"]))
        worst = sorted((a, i) for i, a in enumerate(rep["per_class_accuracy"]) if a is not None)[:3]
        for a, i in worst:
            table.add_row(f"worst class {i}", f"{100 * a:.2f}%")
        for pair in rep["most_confused"][:3]:
            table.add_row(f"confused {pair['true']} -> {pair['predicted']}", str(pair["count"]))
        console.print(table)
    if as_json:
        emit_json(result)
