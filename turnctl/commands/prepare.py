"""``turnctl prepare``: raw dataset -> WebDataset shards with recorded label noise."""

from __future__ import annotations

from typing import Any, Dict, Optional

import click
from rich.table import Table

from turnctl.commands.common import emit_json
from turnctl.logger import result_console, shown
from turnctl.prepare import DATASETS, DEFAULT_SHARD_SIZE, prepare_dataset
from turnctl.prepare.noise import SYMMETRIC_DEFAULT


def _summary(result: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON result: everything but the per-sample lists and the transition matrix."""
    m = result["manifest"]
    noise = {k: v for k, v in m["noise"].items() if k not in ("transition_matrix", "targets")}
    splits = {name: {"count": s["count"], "shards": len(s["shards"]), "noised": s["noised"],
                     "realised_noise_rate": s["realised_noise_rate"], "skipped": s["skipped"]["count"]}
              for name, s in m["splits"].items()}
    return {"out": result["out"], "dataset": m["dataset"], "num_classes": m["num_classes"], "splits": splits,
            "noise": noise, "seconds": round(result["seconds"], 3),
            "images_per_s": round(result["images_per_s"], 1)}


def _rate(r: Optional[float]) -> str:
    return "-" if r is None else f"{100 * r:.2f}%"


@click.command("prepare")
@click.argument("dataset", type=click.Choice(DATASETS))
@click.option("--root", type=click.Path(), default=None,
              help="Raw dataset folder. Default: $TURNCTL_DATA/<dataset>, else ./data/<dataset>.")
@click.option("--out", type=click.Path(), default=None,
              help="Output folder. Default: shards/<dataset>[-<noise slug>][-val<F>].")
@click.option("--noise", "noise", metavar="SPEC", default=None,
              help="none | symmetric:R[:include|exclude] (default convention: "
                   f"{SYMMETRIC_DEFAULT}, i.e. the new label may equal the true one) | "
                   "asymmetric:R[:superclass] | instance:R | human:NAME (with --labels) | file:CSV.")
@click.option("--noise-seed", type=int, default=0, show_default=True,
              help="Seed (0 or more) of the noise generator and of the --val-fraction hold-out.")
@click.option("--labels", "labels", type=click.Path(), default=None,
              help="CIFAR-N label file (CIFAR-10_human.pt / CIFAR-100_human.pt) for --noise human:NAME.")
@click.option("--shard-size", type=click.IntRange(min=1), default=DEFAULT_SHARD_SIZE, show_default=True,
              help="Samples per shard (the last shard of a split may be short).")
@click.option("--max-side", type=click.IntRange(min=1), default=None,
              help="Shrink images whose longer side exceeds this (re-encoded); default: keep the bytes.")
# --workers and --noise-seed are range-checked by prepare_dataset: a one-line error, not click's usage text
@click.option("--workers", type=int, default=None,
              help="Encoding processes, at most the CPUs this process may use. Default: min(4, CPUs).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --out written by turnctl prepare (only once the new one is complete); "
                   "a folder turnctl did not write is never replaced.")
@click.option("--classes", type=click.IntRange(min=1), default=None,
              help="webvision only: keep the first N classes, Google part (mini-WebVision: 50).")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0, show_default=True,
              help="Hold out this fraction of train as the val split, stratified on the given (noised) labels "
                   "and seeded by --noise-seed; its labels are the given ones. Replaces the val split turnctl "
                   "draws for digits/cifar/fashion-mnist; refused where the dataset has its own (clothing1m, "
                   "an imagefolder with val/). 0: no hold-out.")
@click.option("--labels-verified", is_flag=True,
              help="imagefolder only: the folder labels are verified true labels, so they are written as "
                   "clean.cls (purity, recall and true_label are measured against them). Without it an "
                   "imagefolder has no true labels.")
@click.option("--strict", is_flag=True,
              help="imagefolder only: a class without training samples (e.g. present only in test/) is an "
                   "error instead of a warning.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of results.")
def command(dataset: str, root: Optional[str], out: Optional[str], noise: Optional[str], noise_seed: int,
            labels: Optional[str], shard_size: int, max_side: Optional[int], workers: Optional[int],
            overwrite: bool, classes: Optional[int], val_fraction: float, labels_verified: bool,
            strict: bool, as_json: bool) -> None:
    """Write DATASET as WebDataset shards with reproducible label noise.

    \b
    The test split is never noised; val gets the same noise as train.
    True labels (clean.cls, used for purity/recall/true_label) only where known:
      digits        official labels, every split
      cifar10/100   official labels, every split (CIFAR-N agrees)
      fashion-mnist official labels, every split
      clothing1m    clean_label_kv.txt: listed train samples, all val/test
      webvision     test only (annotated val set), none for train
      imagefolder   none, unless --labels-verified
    Examples:
      turnctl prepare digits --noise symmetric:0.6      -> shards/digits-symmetric-0.6
      turnctl prepare cifar100 --noise asymmetric:0.4
      turnctl prepare cifar10 --noise human:worse --labels CIFAR-10_human.pt
      turnctl prepare webvision --classes 50 --max-side 256
      turnctl prepare imagefolder --root my_data --val-fraction 0.05
    """
    result = prepare_dataset(dataset, root=root, out=out, noise=noise, noise_seed=noise_seed, labels=labels,
                             shard_size=shard_size, max_side=max_side, workers=workers, overwrite=overwrite,
                             classes=classes, val_fraction=val_fraction, labels_verified=labels_verified,
                             strict=strict)
    summary = _summary(result)
    if as_json:
        emit_json(summary)
        return
    n = summary["noise"]
    title = shown(f"{summary['out']}  ({summary['dataset']}, {summary['num_classes']} classes)")
    table = Table(title=title)
    for col in ("split", "samples", "shards", "noised", "noise rate", "skipped"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, s in summary["splits"].items():
        table.add_row(name, f"{s['count']:,}", str(s["shards"]), "yes" if s["noised"] else "no",
                      _rate(s["realised_noise_rate"]), str(s["skipped"]))
    console = result_console()
    console.print(table)
    if n["kind"] != "none":
        conv = f", {n['convention']}" if n.get("convention") else ""
        console.print(shown(f"noise {n['spec']}{conv}, seed {n['seed']}: realised {_rate(n['realised_noise_rate'])}"
                             f" (expected {_rate(n.get('expected_noise_rate'))}) on {', '.join(n['applies_to'])}"))
    console.print(f"{sum(s['count'] for s in summary['splits'].values()):,} images in "
                  f"{summary['seconds']:.1f} s ({summary['images_per_s']:.0f} images/s)")
