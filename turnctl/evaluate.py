"""Evaluate a trained model on prepared shards: top-1, top-5, per-class accuracy, most confused pairs.

Accepts what training leaves behind: a run directory (evaluates ``best/``, the checkpoint chosen on
validation accuracy when the run had validation data, and ``final/`` = last), an
export directory (``final/``, ``best/``: Hugging Face format), or a DeepSpeed checkpoint directory
(``<run>/checkpoints`` or one ``epoch_E`` tag in it; consolidated to fp32 with DeepSpeed's
``zero_to_fp32``, the run's ``recipe.yaml`` rebuilds the model). Runs on one or more ranks: every
rank evaluates its share and rank 0 gathers by idx.

By default a model is evaluated on the dataset it was trained on; ``shards=`` names any other
prepared dataset with the same classes (a WebVision model on the ImageNet val set prepared with
``turnctl prepare imagefolder``): the same number of classes and, where both sides name them, the
same names in the same order, else one line naming both and the first difference
(:func:`check_same_classes`).

A single process (no launcher) starts no process group: every collective in turnctl.distributed is
the identity in a world of one, and DeepSpeed's ``init_distributed`` would JIT-build its shm_comm op
on CPU (slow, and it waits for ever on a lock a killed build left behind). A DeepSpeed checkpoint
still imports ``deepspeed.utils.zero_to_fp32`` to consolidate, which builds nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from turnctl import distributed as dist
from turnctl.errors import DataError, TurnctlError
from turnctl.lockstep import per_sample_pass
from turnctl.metrics import accuracy_report, prediction_outputs
from turnctl.data import open_split
from turnctl.data.format import read_manifest
from turnctl.models.exportdir import META_FILE
from turnctl.rundir import LATEST, RECIPE_FILE, RunLayout


def _is_export(path: Path) -> bool:
    return (path / META_FILE).is_file()


def _is_ds_checkpoint(path: Path) -> bool:
    return (path / LATEST).is_file() or any(path.glob("*model_states.pt"))


def resolve_targets(checkpoint: Path) -> List[Tuple[str, Path]]:
    """(label, path) pairs to evaluate for a --checkpoint argument."""
    p = Path(checkpoint)
    if not p.exists():
        raise TurnctlError(f"--checkpoint {p}: no such file or directory")
    if _is_export(p) or _is_ds_checkpoint(p):
        return [(p.name, p)]
    run = RunLayout(p)
    if run.is_run():
        # final/ is the last epoch's model; without exports, the last checkpoint is.
        targets = [(label, t) for label, t in (("best", run.best), ("last", run.final)) if _is_export(t)]
        if not targets and run.checkpoints.is_dir():
            targets = [("last", run.checkpoints)]
        if targets:
            return targets
    raise TurnctlError(f"--checkpoint {p}: not a run directory, an export (final/, best/) or a DeepSpeed "
                       "checkpoint directory")


def load_model(path: Path):
    """A Backbone (with its classifier) from an export or a DeepSpeed checkpoint, plus its metadata."""
    from turnctl.models import load_backbone, load_exported

    if _is_export(path):
        model = load_exported(path)
        meta: Dict[str, Any] = {}
        run = RunLayout(path.parent)  # <run>/final or <run>/best: the run says which data
        if run.is_run():
            from turnctl.recipe import load_recipe

            meta["shards"] = load_recipe(str(run.recipe_file)).data.shards
        return model, meta
    # DeepSpeed checkpoint: <run>/checkpoints[/epoch_E]
    ckpt_root = path if (path / LATEST).is_file() else path.parent
    tag = None if ckpt_root == path else path.name
    run = RunLayout(ckpt_root.parent)
    if not run.is_run():
        raise TurnctlError(f"--checkpoint {path}: cannot find the run's {RECIPE_FILE} at {run.path}")
    from turnctl.recipe import load_recipe
    from turnctl.safeload import safe_zero_to_fp32

    recipe = load_recipe(str(run.recipe_file))
    info = open_split(recipe.data.shards, recipe.data.train_split)
    model = load_backbone(recipe.model, num_classes=info.num_classes)
    # zero_to_fp32 reads with torch.load(weights_only=False); inside the block, weights_only=True.
    with safe_zero_to_fp32() as z:
        state = z.get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if "num_batches_tracked" not in k] or unexpected:
        raise TurnctlError(f"--checkpoint {path}: weights do not match the recipe's model "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, {"shards": recipe.data.shards, "class_names": list(info.class_names), "method": recipe.method}


def _manifest_classes(shards: Any) -> Optional[Tuple[int, List[str]]]:
    """(num_classes, class_names) of a prepared dataset's manifest.json; None when there is none."""
    path = Path(shards) / "manifest.json"
    if not path.is_file():
        return None
    manifest = read_manifest(path)
    return int(manifest["num_classes"]), list(manifest.get("class_names") or [])


def check_same_classes(model_classes: Tuple[int, List[str]], model_source: str, shards: Any) -> None:
    """Refuse ``shards`` unless its classes are the model's: the same number and, where both sides
    name them, the same names in the same order (predictions are class indices; a dataset that
    orders its classes otherwise would be scored against the wrong ones). One line naming both
    sources and the first difference.

    >>> check_same_classes((3, ["a", "b", "c"]), "run/manifest.json", "no/such/dir")  # nothing to compare
    """
    other = _manifest_classes(shards)
    if other is None:
        return  # open_split says what is wrong with the directory
    other_source = str(Path(shards) / "manifest.json")
    (n_model, names_model), (n_other, names_other) = model_classes, other
    if n_model != n_other:
        raise DataError(f"--shards: {other_source} has {n_other} classes but the model's {model_source} has "
                        f"{n_model}; evaluate on a dataset prepared with the model's classes")
    if names_model and names_other:
        for i, (a, b) in enumerate(zip(names_model, names_other)):
            if a != b:
                raise DataError(f"--shards: class {i} is '{b}' in {other_source} but '{a}' in the model's "
                                f"{model_source}; prepare it with the model's class names in the model's "
                                "order (a class map)")


def _model_classes(model, meta: Dict[str, Any], path: Path) -> Tuple[Tuple[int, List[str]], str]:
    """The classes the model predicts and where they are written: the manifest of the dataset it
    was trained on when that is still there, else the export's own metadata."""
    trained_on = meta.get("shards")
    if trained_on:
        classes = _manifest_classes(trained_on)
        if classes is not None:
            return classes, str(Path(trained_on) / "manifest.json")
    names = list(getattr(model, "class_names", None) or meta.get("class_names") or [])
    return (int(model.num_classes), names), str(path / META_FILE)


def evaluate_model(model, shards: str, split: str, *, batch_size: int = 256, num_workers: int = 1) -> Optional[Dict[str, Any]]:
    """Accuracy report of ``model`` on ``shards/split`` (rank 0; None on other ranks). Collective.

    Top-1 and top-5 come from the same forward (:func:`turnctl.metrics.prediction_outputs`): two
    numbers per sample are gathered, never the logits."""
    from turnctl.transforms import eval_transform

    info = open_split(shards, split)
    head = getattr(model, "num_classes", None)
    if head is not None and head != info.num_classes:
        raise TurnctlError(f"the model has {head} classes but {shards} has {info.num_classes}; pass the right --shards")
    device = dist.compute_device()
    model = model.to(device).eval()

    def forward(x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(x)

    out = per_sample_pass(forward, info, transform=eval_transform(model.preprocess), batch_size=batch_size,
                          num_workers=num_workers, device=device, dst=0, what="eval",
                          collect=prediction_outputs)
    if out is None:
        return None
    rep = accuracy_report(out["pred"], out["cls"], out["ok"], num_classes=info.num_classes,
                          class_names=info.class_names, top5=out["top5"])
    rep.update({"split": split, "shards": str(shards)})
    return rep


def _best_provenance(run_dir: Path) -> Dict[str, Any]:
    """How the run chose ``best/``: on validation accuracy, at which epoch (from its summary.json)."""
    import json

    try:
        summary = json.loads(RunLayout(run_dir).summary_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"selected_on": "val"}
    if not isinstance(summary, dict):
        return {"selected_on": "val"}
    return {"selected_on": summary.get("best_selected_on") or "val", "selected_epoch": summary.get("best_epoch")}


def evaluate_checkpoint(checkpoint: str, *, shards: Optional[str] = None, split: str = "test",
                        batch_size: int = 256, num_workers: int = 1) -> Optional[Dict[str, Any]]:
    """Evaluate every target of ``checkpoint``; the result (rank 0) has ``accuracy`` and
    ``top5_accuracy`` (the last model's; top-5 is None with 5 classes or fewer)."""
    if dist.env_world_size() > 1:
        # Only a launched job has peers to talk to; one process needs no process group (module docstring).
        dist.init_distributed(30.0)
    results: Dict[str, Any] = {}
    for label, path in resolve_targets(Path(checkpoint)):
        model, meta = load_model(path)
        data = shards or meta.get("shards")
        if not data:
            raise TurnctlError(f"{path}: no shards recorded in the checkpoint; pass --shards DIR")
        if shards and (not meta.get("shards") or Path(shards).resolve() != Path(meta["shards"]).resolve()):
            check_same_classes(*_model_classes(model, meta, path), shards)
        rep = evaluate_model(model, data, split, batch_size=batch_size, num_workers=num_workers)
        if rep is not None:
            rep["checkpoint"] = str(path)
            if label == "best":  # best/ exists only when validation chose it (docs/PROTOCOL.md)
                rep.update(_best_provenance(path.parent))
            results[label] = rep
    if dist.rank() != 0:
        return None
    order = [k for k in ("last", "final", "best") if k in results] or list(results)
    main = results[order[0]]
    return {"accuracy": main["accuracy"], "top5_accuracy": main.get("top5_accuracy"), "results": results}
