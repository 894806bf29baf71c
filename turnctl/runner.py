"""A resolved recipe -> the steps of its method, on every rank.

    turn        features -> LP (GCE) -> for each epoch: per-sample loss -> per-class GMM -> balanced
                subset -> one FFT epoch (``finetune.loss``, CE by default)
    turn-nmtune as turn, with NMTune (turnctl.methods.nmtune) instead of the GCE probe as step 1: its
                model, folded into one linear head, is the starting classifier (our extension)
    lp-ce/gce/elr   features -> LP with that loss (the backbone stays frozen)
    lp-dividemix, lp-unicon, nmtune   features -> that method on the cached features (turnctl.methods)
    fft-ce/gce/elr  full fine-tuning on all samples (random head) with that loss,
                ``finetune.baseline_epochs`` epochs; ELR's targets are kept identical on every rank
                (turnctl.methods.fft_losses) and checkpointed with the engine

Which of these steps a method runs, and what trains its step 1, is its entry in
turnctl/methods/registry.py; :func:`train_step1` is the dispatch.

Every function here is collective (all ranks call it in the same order). Work done by rank 0 alone
(the linear probe, the GMM) is followed by a broadcast, which doubles as the barrier, under the
process-group timeout from the recipe.

The evaluation protocol (docs/PROTOCOL.md) is the same for every method: ``best/`` and every figure
called "best" come from the epoch with the highest *validation* accuracy (a val split, or
``data.val_fraction`` of train held out here); without validation data there is no best, only
``last``. The LNL papers' figure, the maximum test accuracy over epochs, is reported for every
method as ``max_over_epochs`` and is optimistic: it is chosen on test.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from turnctl import distributed as dist
from turnctl.errors import DataError, RecipeError, TurnctlError
from turnctl.holdout import read_given_labels, stratified_holdout
from turnctl.logger import log, set_progress_every
from turnctl.methods.registry import METHODS  # name -> steps, step-1 trainer, fixed losses
from turnctl.metrics import accuracy_report, selection_quality
from turnctl.preempt import Preempted, StopRequest
from turnctl.recipe import Recipe
from turnctl.rundir import RunDir, checkpoint_tag
from turnctl.data import SplitInfo, open_split


def open_splits(recipe: Recipe) -> Dict[str, SplitInfo]:
    """The train split and whichever of val/test the shards have; num_classes checked."""
    data = recipe.data
    splits = {"train": open_split(data.shards, data.train_split)}
    available = set(splits["train"].manifest.get("splits", {}))
    for role, name in (("val", data.val_split), ("test", data.test_split)):
        if name and name in available:
            splits[role] = open_split(data.shards, name)
    if data.val_fraction > 0 and "val" in splits:
        raise RecipeError(f"data.val_fraction={data.val_fraction} but {data.shards} already has a val split "
                          f"('{data.val_split}'); set data.val_fraction=0 to use it, or data.val_split=null")
    c = splits["train"].num_classes
    if data.num_classes is not None and data.num_classes != c:
        raise DataError(f"data.num_classes={data.num_classes} but the shards in {data.shards} have {c} classes "
                        "(manifest.json); fix the recipe or pass the right --shards")
    return splits


def model_identity(recipe: Recipe) -> Dict[str, Any]:
    m = recipe.model
    return {"family": m.family, "name_or_path": m.name_or_path, "revision": m.revision, "config": m.config,
            "image_size": m.image_size, "pooling": m.pooling,
            "seed": recipe.seed if m.name_or_path is None and m.config is not None else None}


def protocol_figures(rows, *, val_key: str, test_key: str) -> Dict[str, Any]:
    """The figures every method reports, from its per-epoch rows (docs/PROTOCOL.md).

    ``best``: the test accuracy of the first epoch with the highest validation accuracy (None
    without validation data); ``last``: the last epoch's; ``max_over_epochs``: the highest test
    accuracy of any epoch (the LNL papers' "best", chosen on test: optimistic).

    >>> rows = [{"v": 0.5, "t": 0.9}, {"v": 0.7, "t": 0.6}, {"v": 0.7, "t": 0.8}]
    >>> f = protocol_figures(rows, val_key="v", test_key="t")
    >>> f["test_accuracy"], f["best_epoch_index"]
    ({'best': 0.6, 'last': 0.8, 'max_over_epochs': 0.9}, 1)
    """
    rows = list(rows)
    best_i = None
    for i, row in enumerate(rows):
        v = row.get(val_key)
        if v is not None and (best_i is None or v > rows[best_i][val_key]):
            best_i = i
    tests = [r.get(test_key) for r in rows if r.get(test_key) is not None]
    last = rows[-1] if rows else {}
    return {
        "test_accuracy": {"best": rows[best_i].get(test_key) if best_i is not None else None,
                          "last": last.get(test_key), "max_over_epochs": max(tests) if tests else None},
        "val_accuracy": {"best": rows[best_i].get(val_key) if best_i is not None else None,
                         "last": last.get(val_key)},
        "best_epoch_index": best_i,
        "best_selected_on": "val" if best_i is not None else None,
    }


def _validation_holdout(recipe: Recipe, splits: Dict[str, SplitInfo], run: RunDir) -> Optional[np.ndarray]:
    """``data.val_fraction`` of train held out for validation: a bool mask over train idx (every
    rank), or None. Rank 0 reads the labels and draws; the held-out idx are saved in the run."""
    frac = recipe.data.val_fraction
    if frac <= 0:
        if "val" not in splits:
            log.info("no validation data (the shards have no val split and data.val_fraction is 0): no best/ "
                     "checkpoint and no 'best' figure; set data.val_fraction (e.g. 0.1) to select on validation")
        return None
    train = splits["train"]

    def draw():
        mask = stratified_holdout(read_given_labels(train), frac, seed=recipe.data.val_seed)
        run.save_holdout(np.flatnonzero(mask), fraction=frac, seed=recipe.data.val_seed)
        return mask

    mask = dist.run_on_main(draw, what="the validation hold-out")
    log.info("validation: %d of %d train samples held out (data.val_fraction=%g, data.val_seed=%d); "
             "they are never trained on or selected", int(mask.sum()), mask.size, frac, recipe.data.val_seed)
    return mask


class PhaseTimes:
    """Wall seconds per phase of this invocation, for summary.json's ``phase_time_s`` (where a run's
    time went: HF Trainer's ``train_runtime``, split by TURN's steps). Phases: ``extract`` (features,
    cached or not), ``probe`` (step 1 on rank 0, the learning-rate search included), ``loss_pass``
    (TURN's per-sample losses), ``select`` (GMM + balanced subset), ``finetune``, ``eval`` (val/test,
    and the pass over train a val hold-out needs, which TURN reuses as the next loss pass),
    ``checkpoint`` (engine checkpoints and exports); ``other`` is the rest of the wall time (model
    loading, DeepSpeed's engine, the process group). A resumed run counts its own invocation only.

    >>> t = PhaseTimes()
    >>> with t("eval"):
    ...     pass
    >>> sorted(t.summary(total_s=1.0)) == ["eval", "other"]
    True
    """

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def summary(self, *, total_s: float) -> Dict[str, float]:
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["other"] = round(max(0.0, total_s - sum(self.seconds.values())), 3)
        return out


def _seed_epoch(recipe: Recipe, epoch: int) -> int:
    # Every epoch reseeds from (seed, epoch): a resumed run draws exactly what an uninterrupted one would.
    return recipe.seed * 100_003 + epoch


def train_from_recipe(recipe: Recipe, *, resume: Union[bool, str] = False,
                      stop_after: Optional[int] = None) -> Dict[str, Any]:
    """Run ``recipe.method`` end to end (collective). ``stop_after=E`` stops cleanly once fine-tuning
    epoch E is checkpointed (time-limited jobs: continue later with ``resume=True``)."""
    spec = METHODS.get(recipe.method)  # validated with the recipe; re-read in case the registry changed since
    if spec is None:
        raise TurnctlError(f"method '{recipe.method}' is not available; available: {', '.join(METHODS)}")
    t_start = time.time()
    clock = PhaseTimes()
    set_progress_every(recipe.output.progress_every_s)
    dist.init_distributed(recipe.deepspeed.timeout_minutes)
    splits = open_splits(recipe)  # bad shards fail here, before a run directory is created
    run = RunDir.open(recipe, resume=resume)
    # Exports replace best/ and final/: a link or a foreign folder there is refused now, not after
    # the first epoch of training.
    from turnctl.models import check_replaceable

    dist.run_on_main(lambda: [check_replaceable(p) for p in (run.best, run.final)], what="checking best/ and final/")
    holdout = _validation_holdout(recipe, splits, run)
    has_val = "val" in splits or holdout is not None
    if recipe.probe.lr_search and not has_val:
        raise RecipeError("probe.lr_search chooses on validation accuracy: set data.val_fraction or use shards "
                          "with a val split")
    train = splits["train"]
    num_classes = train.num_classes
    method = recipe.method
    needs_lp, needs_fft = "probe" in spec.steps, "finetune" in spec.steps
    # After a probe (TURN) fine-tuning runs TURN's E_FFT epochs; from a random head, the baselines'.
    fft_epochs = recipe.finetune.epochs if needs_lp else recipe.finetune.baseline_epochs

    from turnctl.models import load_backbone
    from turnctl.transforms import eval_transform, train_transform

    ds_config = recipe.deepspeed_config(dist.world_size(), dist.compute_device().type)
    # The same seed on every rank while the model is built: a randomly initialised backbone or head
    # must be identical everywhere (the LP baselines extract features without DeepSpeed's broadcast).
    dist.set_seed(recipe.seed, per_rank=False)
    backbone = load_backbone(recipe.model, num_classes=num_classes,
                             ds_config=ds_config if needs_fft and recipe.deepspeed.zero_stage == 3 else None)
    dist.set_seed(recipe.seed)
    eval_tf = eval_transform(backbone.preprocess)
    train_tf = train_transform(backbone.preprocess, recipe.data.augment)
    log.info("run %s: method %s, %d classes, %d train samples, world size %d", run.path, method,
             num_classes, train.num_samples, dist.world_size())

    tuner = None
    loss_fn = elr = None
    if needs_fft:
        from turnctl.finetune import FineTuner
        from turnctl.methods.fft_losses import fft_loss_hook

        if recipe.model.gradient_checkpointing:
            backbone.enable_gradient_checkpointing()
        tuner = FineTuner(backbone, recipe)
        tuner.log_metrics = run.log_metrics  # the per-step lines (output.log_every_steps), rank 0 writes
        loss_fn, elr = fft_loss_hook(spec.finetune_loss or recipe.finetune.loss, losses=recipe.losses,
                                     num_samples=train.num_samples, num_classes=num_classes)
    start_epoch, best = 0, {"score": -1.0, "epoch": None, "test_accuracy": None}
    # The samples fine-tuning may train on: all of train but the validation hold-out.
    train_pool = np.flatnonzero(~holdout).astype(np.int64) if holdout is not None else None
    midway: Dict[str, Any] = {}  # a checkpoint written inside an epoch (on a signal): where to go on
    if run.resuming and tuner is not None:
        from turnctl.finetune import check_resumable

        # run_on_main: a refused checkpoint stops every rank with rank 0's message.
        tag = dist.run_on_main(lambda: check_resumable(run.checkpoints, world_size=dist.world_size()),
                               what="checking the checkpoint to resume")
        client = tuner.load_checkpoint(run.checkpoints, tag) if tag is not None else None
        if client is not None:
            start_epoch = int(client["epoch"])
            best = client.get("best", best)
            run.reset_history(client.get("history", []), global_step=tuner.global_step)
            if client.get("step"):
                midway = {"step": int(client["step"]), "partial": client["partial"],
                          "selection": client.get("selection") or {}}
            if elr is not None:  # the targets as they were when that checkpoint was written
                elr.load(run.checkpoints / tag)
            log.info("resumed from %s (%s) at epoch %d%s", run.checkpoints, tag, start_epoch,
                     f", step {midway['step']}" if midway else "")
    result: Dict[str, Any] = {"run_dir": str(run.path), "method": method, "feature_cache": {}}

    if needs_lp and start_epoch == 0:
        run.reset_history([])
        probe_out = _linear_probe(recipe, run, backbone, tuner, splits, eval_tf, holdout=holdout, clock=clock)
        result["feature_cache"] = probe_out["feature_cache"]
        result.update(probe_out["summary"])
        if tuner is None:  # an LP baseline: the probe is the result
            return _finish_lp(recipe, run, backbone, probe_out, result, t_start, clock)

    last_sel: Dict[str, Any] = {}
    train_pass = None  # the last evaluation's pass over train (a val hold-out): next epoch's losses
    with StopRequest() as stop:
        for epoch in range(start_epoch, fft_epochs):
            dist.set_seed(_seed_epoch(recipe, epoch))
            keep_idx, sel_stats = None, {}
            resume_here = midway if epoch == start_epoch else {}
            if "cleanse" in spec.steps:
                if resume_here:  # this epoch's subset was drawn before the interruption: reuse it
                    keep_idx, sel_stats = _saved_selection(run, epoch), resume_here["selection"]
                else:
                    keep_idx, sel_stats = _cleanse(recipe, run, tuner, train, eval_tf, epoch,
                                                   holdout=holdout, precomputed=train_pass, clock=clock)
                last_sel = sel_stats
            else:
                keep_idx = train_pool
            with clock("finetune"):
                stats = tuner.train_epoch(train, epoch=epoch, total_epochs=fft_epochs, keep_idx=keep_idx,
                                          transform=train_tf, num_workers=recipe.data.num_workers,
                                          seed=_seed_epoch(recipe, epoch), loss_fn=loss_fn, stop=stop,
                                          start_step=resume_here.get("step", 0), partial=resume_here.get("partial"))
            if elr is not None:
                elr.check_consistent()
            if "interrupted_at_step" in stats:
                _save_midway(recipe, run, tuner, elr, epoch, stats, sel_stats, best, signum=stop.signum)
            with clock("eval"):
                evals, train_pass = _evaluate(tuner, splits, eval_tf, recipe, num_classes, holdout)
            line = {"phase": "fft", "epoch": epoch, **stats, **sel_stats, **evals}
            run.log_metrics(line)
            # Chosen on validation only: without validation data there is no best (docs/PROTOCOL.md).
            score = evals.get("val_accuracy")
            improved = dist.broadcast_object(score is not None and score > best["score"])
            if improved:
                best = {"score": score, "epoch": epoch, "test_accuracy": evals.get("test_accuracy"),
                        "val_accuracy": evals.get("val_accuracy")}
                with clock("checkpoint"):
                    tuner.export(run.best, class_names=train.class_names)
            tag = checkpoint_tag(epoch)
            with clock("checkpoint"):
                if elr is not None:  # before the engine's checkpoint: a `latest` tag always has its targets
                    elr.save(run.checkpoints / tag)
                tuner.save_checkpoint(run.checkpoints, tag=tag, keep=recipe.output.keep_checkpoints,
                                      client_state={"epoch": epoch + 1, "best": best, "history": run.history})
            if dist.rank() == 0:
                log.info("epoch %d: loss %.4f, %s%s", epoch, stats["train_loss"],
                         " ".join(f"{k} {v:.4f}" for k, v in evals.items() if isinstance(v, float)),
                         f", kept {sel_stats.get('kept')} -> {sel_stats.get('selected')}" if sel_stats else "")
            if epoch + 1 < fft_epochs and dist.any_rank(stop.requested):  # a signal between steps
                raise Preempted(f"stopped by a signal after fine-tuning epoch {epoch}, checkpoint {tag} written; "
                                f"continue with --resume --out {run.path}", signum=stop.signum)
            if stop_after is not None and epoch >= stop_after and epoch + 1 < fft_epochs:
                log.info("stopping after epoch %d as asked (--stop-after); continue with --resume --out %s",
                         epoch, run.path)
                result.update({"stopped_after_epoch": epoch, "wall_time_s": time.time() - t_start})
                return result
    if tuner is not None and recipe.output.export_final:
        with clock("checkpoint"):
            tuner.export(run.final, class_names=train.class_names)
    fft_rows = [h for h in run.history if h.get("phase") == "fft"]
    figures = protocol_figures(fft_rows, val_key="val_accuracy", test_key="test_accuracy")
    if any(r.get("test_top5_accuracy") is not None for r in fft_rows):
        # best: the top-5 of the epoch chosen on validation top-1 (the same epoch as best/);
        # max_over_epochs: the highest top-5 of any epoch, chosen on test like its top-1 namesake.
        figures["test_top5_accuracy"] = protocol_figures(fft_rows, val_key="val_accuracy",
                                                         test_key="test_top5_accuracy")["test_accuracy"]
    best_i = figures.pop("best_epoch_index")
    result.update({
        **figures, "best_epoch": fft_rows[best_i]["epoch"] if best_i is not None else None,
        "best": str(run.best) if best_i is not None else None,
        "selection": last_sel or None, "wall_time_s": time.time() - t_start,
        "phase_time_s": clock.summary(total_s=time.time() - t_start),
        "final": str(run.final) if recipe.output.export_final else None,
    })
    run.write_summary(result)
    return result


def _save_midway(recipe: Recipe, run: RunDir, tuner, elr, epoch: int, stats, sel_stats, best, *,
                 signum: Optional[int]) -> None:
    """A signal stopped ``epoch`` at an optimizer-step boundary: checkpoint there and exit."""
    step = int(stats["interrupted_at_step"])
    tag = checkpoint_tag(epoch, step)
    if elr is not None:
        elr.save(run.checkpoints / tag)
    tuner.save_checkpoint(run.checkpoints, tag=tag, keep=recipe.output.keep_checkpoints,
                          client_state={"epoch": epoch, "step": step, "partial": stats["partial"],
                                        "selection": sel_stats, "best": best, "history": run.history})
    raise Preempted(f"stopped by a signal at fine-tuning epoch {epoch}, micro-step {step} of {stats['steps']}; "
                    f"checkpoint {tag} written; continue with --resume --out {run.path}", signum=signum)


def _saved_selection(run: RunDir, epoch: int) -> np.ndarray:
    """The clean subset drawn for ``epoch`` before an interruption (rank 0 reads, all receive)."""
    def read():
        path = run.selection_file(epoch)
        if not path.is_file():
            raise DataError(f"{path}: missing; the checkpoint was written inside epoch {epoch}, whose "
                            "selection it needs to continue")
        f = run.load_selection(epoch, arrays=("idx", "selected"))
        return f.idx[f.selected]

    return dist.run_on_main(read, what=f"reading the selection of epoch {epoch}")


def _linear_probe(recipe: Recipe, run: RunDir, backbone, tuner, splits, eval_tf, *,
                  clock: PhaseTimes, holdout: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Extract (or load) features on all ranks, train the head on rank 0, broadcast it.

    The method's registry entry picks the trainer (:func:`train_step1`); extra state a trainer
    returns (both heads, NMTune's model) is saved as ``method_state.pt``. Every trainer gets the
    same treatment (docs/PROTOCOL.md): the held-out train samples are its validation set and never
    trained on, the features are standardised (``probe.standardize``; the map is folded back into
    the head) and ``probe.lr_search`` picks its learning rate on validation accuracy."""
    from turnctl.features import CachePlan, choose_cache_dir, extract_features

    step1 = METHODS[recipe.method].step1  # its name in the logs and method_state.pt
    # Settled before the first forward: an unwritable cache must not cost a whole feature pass.
    plan = CachePlan(None)
    if recipe.features.cache:
        plan = dist.run_on_main(lambda: choose_cache_dir(recipe.features.cache_dir, recipe.data.shards, run.path),
                                what="choosing the feature cache directory")
    forward = tuner.module.features if tuner is not None else backbone.features
    feats = {}
    with clock("extract"):
        for role, info in splits.items():
            feats[role] = extract_features(
                backbone, info, model_identity=model_identity(recipe), transform=eval_tf,
                batch_size=recipe.features.batch_size, num_workers=recipe.data.num_workers,
                cache_dir=plan.write, read_dirs=plan.read, forward=forward)
    cache_state = {role: ("hit" if fs is not None and fs.from_cache else "miss") for role, fs in feats.items()}

    def train_head():  # rank 0 only
        tr = feats["train"]
        held = torch.from_numpy(holdout) if holdout is not None else torch.zeros(tr.num_samples, dtype=torch.bool)
        use = tr.ok & ~held
        eval_sets = {role: (fs.features[fs.ok], fs.labels[fs.ok]) for role, fs in feats.items() if role != "train"}
        if holdout is not None:
            eval_sets["val"] = (tr.features[tr.ok & held], tr.labels[tr.ok & held])
        x_train = tr.features[use]
        mean = std = None
        if recipe.probe.standardize:
            from turnctl.probe import standardize, standardizer

            mean, std = standardizer(x_train)
            x_train = standardize(x_train, mean, std).to(tr.features.dtype)
            eval_sets = {k: (standardize(f, mean, std).to(f.dtype), y) for k, (f, y) in eval_sets.items()}
        train_args = dict(labels=tr.labels[use], clean=tr.clean[use], idx=torch.nonzero(use).squeeze(1),
                          eval_sets=eval_sets, num_classes=splits["train"].num_classes)
        searched, out = [], None
        for mult in (recipe.probe.lr_search or [1.0]):
            cand = train_step1(recipe, x_train, lr_mult=mult, **train_args)
            score = _kept_val_accuracy(cand)
            searched.append({"lr_multiplier": mult, "lr": cand["lr"], "val_acc": score})
            if out is None or (score if score is not None else -1.0) > (_kept_val_accuracy(out) or -1.0):
                out = cand
        if recipe.probe.lr_search:
            for row in searched:
                run.log_metrics({"phase": "lr_search", "method": step1, **row})
            log.info("step 1 learning rate chosen on validation: %g (of %s)", out["lr"],
                     ", ".join(f"{r['lr']:g}: {r['val_acc']:.4f}" for r in searched if r["val_acc"] is not None))
        head_state, history, summary = out["head_state"], out["history"], dict(out["summary"])
        summary["step1_lr"] = out["lr"]
        if mean is not None:
            from turnctl.probe import fold_standardization

            head_state = fold_standardization(head_state, mean, std)
        if out.get("state") is not None:
            state = dict(out["state"])
            if mean is not None:  # the saved model takes standardised features
                state["standardize"] = {"mean": mean, "std": std}
            run.save_method_state({"method": step1, **state})
        for line in history:
            run.log_metrics({"phase": "lp", **line})
        # Undecodable images got zero features and were left out: say how many, per split.
        summary = {**summary, **{f"{role}_undecodable": int((~fs.ok).sum()) for role, fs in feats.items()}}
        if tuner is None:  # an LP baseline: its head's label issues, for `turnctl report`
            _, summary["lp_selection"] = _select(recipe, run, splits["train"], _head_losses(head_state, tr), 0,
                                                 holdout)
        return {k: v.detach().cpu().float() for k, v in head_state.items()}, summary, history

    with clock("probe"):
        head_state, summary, history = dist.run_on_main(train_head, what=f"step 1 ({step1})")
    if tuner is not None:
        tuner.set_head(head_state)
    else:
        backbone.head.load_state_dict(head_state)
    return {"head": head_state, "history": history, "feature_cache": cache_state, "summary": summary}


def _head_losses(head_state: Dict[str, torch.Tensor], tr, chunk: int = 65536) -> Dict[str, np.ndarray]:
    """Per-sample CE losses and predictions of a linear head (standardisation folded in) on the
    cached train features ``tr``, in idx order: what TURN's first selection draws from its probe,
    here for an LP baseline's final head (one matmul per chunk; never N x classes at once)."""
    W, b = head_state["weight"].float(), head_state["bias"].float()
    labels = tr.labels.long()
    loss = torch.zeros(tr.num_samples, dtype=torch.float32)
    pred = torch.zeros(tr.num_samples, dtype=torch.long)
    with torch.no_grad():
        for s in range(0, tr.num_samples, chunk):
            logits = torch.addmm(b, tr.features[s:s + chunk].float(), W.t())
            y = labels[s:s + chunk]
            known = y >= 0  # an undecodable sample's label may be -1: loss 0, never used
            loss[s:s + chunk] = torch.where(
                known, F.cross_entropy(logits, y.clamp(min=0), reduction="none"), torch.zeros(()))
            pred[s:s + chunk] = logits.argmax(1)
    return {"idx": np.arange(tr.num_samples, dtype=np.int64), "loss": loss.numpy(), "pred": pred.numpy(),
            "cls": tr.labels.numpy(), "clean": tr.clean.numpy(), "ok": tr.ok.numpy()}


def _kept_val_accuracy(step1_out: Dict[str, Any]) -> Optional[float]:
    """Validation accuracy of the model a step-1 run returns: its last epoch's, or the epoch it kept
    (NMTune as TURN's step 1 keeps its best-val epoch, ``kept_epoch``, 1-based)."""
    hist = step1_out["history"]
    if not hist:
        return None
    kept = step1_out.get("kept_epoch")
    return (hist[kept - 1] if kept else hist[-1]).get("val_acc")


def train_step1(recipe: Recipe, features: torch.Tensor, *, labels, clean, idx, eval_sets, num_classes: int,
                lr_mult: float = 1.0) -> Dict[str, Any]:
    """The dispatch: one step-1 run of ``recipe.method`` by its registry entry's trainer (rank 0).

    The trainer gets a copy of the recipe with the learning rate of the entry's ``lr_section`` times
    ``lr_mult`` and the ``probe.loss`` the entry fixes; its result comes back with that ``lr``."""
    spec = METHODS[recipe.method]
    section = getattr(recipe, spec.lr_section)
    lr = section.lr * lr_mult
    r = recipe.model_copy(deep=True)
    setattr(r, spec.lr_section, section.model_copy(update={"lr": lr}))
    if spec.probe_loss is not None:
        r.probe = r.probe.model_copy(update={"loss": spec.probe_loss})
    out = spec.trainer(r, features, labels, num_classes=num_classes, eval_sets=eval_sets, clean=clean, idx=idx,
                       as_turn_step1=spec.family == "turn")
    return {**out, "lr": lr}


def _finish_lp(recipe, run, backbone, probe_out, result, t_start, clock: PhaseTimes) -> Dict[str, Any]:
    hist = probe_out["history"]
    figures = protocol_figures(hist, val_key="val_acc", test_key="test_acc")
    best_i = figures.pop("best_epoch_index")
    if any(r.get("test_top5") is not None for r in hist):  # the probe's own top-5 (over 5 classes)
        figures["test_top5_accuracy"] = protocol_figures(hist, val_key="val_acc", test_key="test_top5")["test_accuracy"]
    if recipe.output.export_final:  # on rank 0; a failure there (a full disk) stops every rank
        train = open_split(recipe.data.shards, recipe.data.train_split)
        with clock("checkpoint"):
            dist.run_on_main(lambda: backbone.save_pretrained(run.final, class_names=list(train.class_names)),
                             what=f"export to {run.final}")
    # The LP family exports the last head only (the one a user gets); "best" is the figure of the
    # val-selected epoch (docs/PROTOCOL.md).
    result.update({**figures, "best_epoch": hist[best_i]["epoch"] if best_i is not None else None,
                   "wall_time_s": time.time() - t_start,
                   "phase_time_s": clock.summary(total_s=time.time() - t_start),
                   "final": str(run.final) if recipe.output.export_final else None})
    run.write_summary(result)
    return result


def _cleanse(recipe: Recipe, run: RunDir, tuner, train: SplitInfo, eval_tf, epoch: int, *,
             clock: PhaseTimes, holdout: Optional[np.ndarray] = None,
             precomputed: Optional[Dict[str, np.ndarray]] = None):
    """Per-sample losses (all ranks) -> GMM + balanced subset (rank 0) -> the subset (broadcast).

    ``precomputed``: the previous epoch's evaluation pass over train with the same weights (when a
    validation hold-out needed one), reused instead of a second identical pass. Held-out samples
    are neither fitted nor selected."""
    out = precomputed
    if out is None:
        with clock("loss_pass"):
            out = tuner.per_sample_losses(train, transform=eval_tf, batch_size=recipe.finetune.eval_batch_size,
                                          num_workers=recipe.data.num_workers)
    # Every rank holds the gathered losses, so every rank sees a NaN and stops with the same message.
    bad = ~np.isfinite(out["loss"]) & out["ok"].astype(bool)
    if bad.any():
        raise TurnctlError(f"epoch {epoch}: non-finite loss in the per-sample loss pass for idx "
                           f"{out['idx'][bad][:5].tolist()} ({int(bad.sum())} in all); the model diverged: "
                           "lower finetune.lr or check those samples")

    with clock("select"):
        return dist.run_on_main(lambda: _select(recipe, run, train, out, epoch, holdout),
                                what=f"the selection of epoch {epoch}")


def _select(recipe: Recipe, run: RunDir, train: SplitInfo, out: Dict[str, np.ndarray], epoch: int,
            holdout: Optional[np.ndarray]):
    """The GMM and the balanced subset on per-sample losses ``out`` (idx, loss, pred, cls, clean, ok),
    written as ``epoch``'s selection file; returns (the subset's idx, stats). Rank 0 only."""
    from turnctl.cleanse import balanced_subset, select_clean

    c = recipe.cleanse
    given, clean, ok = out["cls"].astype(np.int64), out["clean"].astype(np.int64), out["ok"].astype(bool)
    # The GMM and the subset see the decodable samples that are not held out for validation.
    usable = ok & ~holdout if holdout is not None else ok
    sel = select_clean(out["loss"], given, num_classes=train.num_classes, tau=c.tau, max_iter=c.gmm_max_iter,
                       tol=c.gmm_tol, reg_covar=c.gmm_reg_covar, normalize=c.normalize, valid=usable)
    sub_seed = c.seed if c.seed is not None else _seed_epoch(recipe, epoch)
    if not c.redraw_each_epoch and c.seed is None:
        sub_seed = recipe.seed
    sub = balanced_subset(sel.keep, given, num_classes=train.num_classes, losses=out["loss"],
                          fallback_k=c.fallback_k, min_per_class=c.min_per_class, seed=sub_seed, valid=usable)
    for cls_id in sub.fallback_classes:
        name = train.class_names[cls_id] if cls_id < len(train.class_names) else cls_id
        log.warning("epoch %d: class %s kept fewer than %d samples; using its %d lowest-loss samples",
                    epoch, name, c.min_per_class, c.fallback_k)
    arrays = dict(idx=out["idx"], loss=out["loss"], clean_prob=sel.clean_prob, selected=sub.selected,
                  keep=sel.keep, given=given, clean=clean, pred=out["pred"], ok=ok, means=sel.means,
                  variances=sel.variances, weights=sel.weights)
    run.save_selection(epoch, arrays if holdout is None else {**arrays, "heldout": holdout})
    stats = {"kept": int(sel.keep.sum()), "selected": int(sub.selected.sum()), "undecodable": int((~ok).sum()),
             "n_per_class": int(sub.n_per_class), "fallback_classes": [int(x) for x in sub.fallback_classes],
             "train_acc_given": float((out["pred"] == given)[usable].mean()) if usable.any() else None}
    q_keep = selection_quality(sel.keep, given, clean, usable)
    q_sel = selection_quality(sub.selected, given, clean, usable)
    if q_keep:
        stats.update({"kept_precision": q_keep["purity"], "kept_recall": q_keep["recall"],
                      "selected_purity": q_sel["purity"], "selected_recall": q_sel["recall"],
                      "train_noise_rate": q_keep["noise_rate"]})
    return sub.indices.astype(np.int64), stats


def _evaluate(tuner, splits, eval_tf, recipe: Recipe, num_classes: int, holdout: Optional[np.ndarray]):
    """Val/test accuracy after an epoch, and the pass over train that a val hold-out needed (None
    without one): the held-out samples are read from the train shards, so their accuracy comes
    from one eval pass over train, which TURN reuses as the next epoch's per-sample losses."""
    evals = _evaluate_splits(tuner, splits, eval_tf, recipe, num_classes)
    if holdout is None:
        return evals, None

    out = tuner.per_sample_losses(splits["train"], transform=eval_tf, batch_size=recipe.finetune.eval_batch_size,
                                  num_workers=recipe.data.num_workers)
    rep = accuracy_report(out["pred"][holdout], out["cls"][holdout], out["ok"][holdout], num_classes=num_classes,
                          top5=out["top5"][holdout] if "top5" in out else None)
    evals["val_accuracy"] = rep["accuracy"]
    if rep["top5_accuracy"] is not None:
        evals["val_top5_accuracy"] = rep["top5_accuracy"]
    evals["val_undecodable"] = rep["undecodable"]
    return {k: evals[k] for k in sorted(evals, key=lambda k: not k.startswith("val"))}, out


def _evaluate_splits(tuner, splits, eval_tf, recipe: Recipe, num_classes: int) -> Dict[str, Any]:
    evals: Dict[str, Any] = {}
    for role in ("val", "test"):
        if role not in splits:
            continue
        out = tuner.predict(splits[role], transform=eval_tf, batch_size=recipe.finetune.eval_batch_size,
                            num_workers=recipe.data.num_workers)
        if out is not None:
            # Given labels: what a user has. The test split is never noised, so there they are clean.
            rep = accuracy_report(out["pred"], out["cls"],
                                  out["ok"], num_classes=num_classes, top5=out.get("top5"))
            evals[f"{role}_accuracy"] = rep["accuracy"]
            # Top-5 where the pass kept per-sample hits (metrics.prediction_outputs) and there are
            # more than 5 classes; the key is absent otherwise, so old readers see old lines.
            if rep["top5_accuracy"] is not None:
                evals[f"{role}_top5_accuracy"] = rep["top5_accuracy"]
            evals[f"{role}_undecodable"] = rep["undecodable"]
    return evals
