"""``turnctl index``: WebDataset shards a user already has -> a dataset turnctl trains on, in place."""

from __future__ import annotations

from typing import Any, Dict, Optional

import click
from rich.table import Table

from turnctl.commands.common import emit_json
from turnctl.data.format import DEFAULT_LABEL_FIELD
from turnctl.logger import result_console, shown
from turnctl.prepare.index import INDEX_SPLITS, index_shards


def _summary(result: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON result: the directory, the classes and every indexed split (not the shard table)."""
    m = result["manifest"]
    splits = {name: {"count": s["count"], "shards": len(s["shards"]), "label_field": s.get("label_field"),
                     "per_class_given": s["per_class_given"]}
              for name, s in m["splits"].items()}
    return {"directory": result["directory"], "split": result["split"], "num_classes": m["num_classes"],
            "classes_from": m["options"]["classes_from"], "splits": splits,
            "seconds": round(result["seconds"], 3)}


@click.command("index")
@click.argument("shards", metavar="SHARDS")
@click.option("--split", type=click.Choice(INDEX_SPLITS), default="train", show_default=True,
              help="Which split these shards are. One call per split; a later call adds its split to the "
                   "directory's index (or re-indexes that split).")
@click.option("--label-field", default=DEFAULT_LABEL_FIELD, show_default=True, metavar="MEMBER|json:FIELD",
              help="Where each sample's label is: a member holding an ASCII integer (cls, label, ...), or "
                   "json:FIELD, an integer under the top-level key FIELD of the sample's json member.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Number of classes (labels must be below it). Default: the largest label + 1 over the "
                   "indexed splits.")
@click.option("--class-names", "class_names", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="A text file with one class name per line, label 0 first; fixes the number of classes. "
                   "Default names: 0 .. K-1.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of results.")
def command(shards: str, split: str, label_field: str, num_classes: Optional[int], class_names: Optional[str],
            as_json: bool) -> None:
    """Index WebDataset shards you already have so that turnctl trains on them, without a copy.

    \b
    SHARDS is a directory of .tar files or a brace pattern of them, all in one directory:
      turnctl index data/train                              every data/train/*.tar
      turnctl index 'data/train-{000000..000099}.tar'       the shards of one split
      turnctl index 'data/val-{000000..000003}.tar' --split val
      turnctl index data/train --label-field json:label --class-names classes.txt
    Each sample needs an image member (jpg/jpeg/png/webp) and an integer label (default: the cls
    member). Every shard is read once (streaming) and hashed; idx runs over the split in a stable
    order: shards by name, samples in tar order. sizes.json and manifest.json are written into the
    shards' directory, the manifest last; the tar files are never modified. A manifest.json or
    sizes.json that turnctl index did not write (a `turnctl prepare` output included) is never
    replaced. Then: turnctl train --shards DIR.
    """
    result = index_shards(shards, split=split, label_field=label_field, num_classes=num_classes,
                          class_names_file=class_names)
    summary = _summary(result)
    if as_json:
        emit_json(summary)
        return
    table = Table(title=shown(f"{summary['directory']}  ({summary['num_classes']} classes, "
                              f"from {summary['classes_from']})"))
    for col in ("split", "samples", "shards", "label field"):
        table.add_column(col, justify="left" if col in ("split", "label field") else "right")
    for name, s in summary["splits"].items():
        table.add_row(name, f"{s['count']:,}", str(s["shards"]), shown(s["label_field"] or "cls"))
    console = result_console()
    console.print(table)
    console.print(shown(f"indexed {split} in {summary['seconds']:.1f} s; train with: "
                        f"turnctl train --shards {summary['directory']}"))
