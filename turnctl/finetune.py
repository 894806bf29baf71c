"""Full fine-tuning with DeepSpeed ZeRO (TURN step 2 and the FFT baselines).

:class:`FineTuner` owns the engine and offers the four things TURN does with it each epoch: the
per-sample loss pass over the whole train split (eval mode, no augmentation, lockstep), one training
epoch on a subset (the same number of optimizer steps on every rank), evaluation, and checkpoints.

The optimizer is turnctl's own (SGD or AdamW) and so is the LR schedule (turnctl/schedule.py: optional
linear warmup, then cosine or constant), which runs on *training progress*: the fraction of all of the
method's fine-tuning epochs done, ``(epoch + micro-steps done / micro-steps of the epoch) / epochs``.
TURN's epochs have different lengths (the clean subset is redrawn every epoch), so the total number
of optimizer steps is not known when training starts; progress is. The warmup is therefore
``finetune.warmup_ratio`` of the progress (HF Trainer's name), not a step count: it is exact when
epochs are equal (the FFT baselines) and covers the same share of every epoch's data when they are
not. The LR of a step is a function of (epoch, step within epoch, steps of the epoch) alone, so a
run resumed mid-epoch replays exactly the LRs of an uninterrupted one. The paper recipes set no
warmup (the paper states none): a 100-step warmup spanned nearly all ~112 optimizer steps of a
4-epoch TURN run at 90% symmetric noise on CIFAR-100 (tests/test_lr_schedule.py). The older
``finetune.warmup_steps`` (warmup over the first N optimizer steps of the run, multiplied into the
cosine) is still honoured so that older recipes reproduce their runs.

Every ``output.log_every_steps`` optimizer steps (counted over the run, as HF Trainer's
``logging_steps``, so a resumed run logs at the same steps) the epoch loop hands a ``finetune_step``
line to ``log_metrics`` (rank 0's RunDir.log_metrics: metrics.jsonl and the trackers): the loss
averaged over every rank's micro-batches since the previous line of the epoch (one all-reduce of
three numbers per line, so the line is the whole run's, not rank 0's share), the LR, the samples/s of
all ranks together and DeepSpeed's global gradient norm (None where the engine does not compute one:
without ZeRO and without gradient clipping). The window restarts with each epoch: the epoch's own
line covers its whole loss, and a window never mixes two clean subsets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from turnctl import distributed as dist
from turnctl.errors import TurnctlError
from turnctl.lockstep import per_sample_pass
from turnctl.logger import log, track
from turnctl.metrics import TOP_K, prediction_outputs, topk_hits
from turnctl.recipe import Recipe
from turnctl.rundir import CHECKPOINT_TAG, LATEST
from turnctl.schedule import lr_at
from turnctl.data import SplitInfo, train_loader

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_optimizer(params, *, name: str, lr: float, weight_decay: float, momentum: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def epoch_lrs(ft, *, epoch: int, total_epochs: int, steps: int, accum: int, first_global_step: int) -> List[float]:
    """The LR of each optimizer step of one epoch of ``steps`` micro-steps (``accum`` per optimizer
    step), ``ft`` being the recipe's ``finetune`` section: :func:`turnctl.schedule.lr_at` at the
    progress after that step; ``first_global_step`` is the run's optimizer-step count when the epoch
    began (only the legacy ``warmup_steps`` reads it)."""
    return [lr_at(base_lr=ft.lr, schedule=ft.schedule, warmup_ratio=ft.warmup_ratio, warmup_steps=ft.warmup_steps,
                  global_step=first_global_step + k, progress=(epoch + (k + 1) * accum / steps) / total_epochs)
            for k in range(steps // accum)]


class FineTuner:
    """A DeepSpeed engine around a :class:`turnctl.models.Backbone` configured by a recipe."""

    def __init__(self, backbone, recipe: Recipe, *, log_metrics: Optional[Callable[[Dict[str, Any]], None]] = None):
        """``log_metrics``: where the per-step lines go (RunDir.log_metrics; None: nowhere)."""
        import deepspeed

        self.recipe = recipe
        self.log_metrics = log_metrics
        self.backbone = backbone
        self.world = dist.world_size()
        device = dist.compute_device()
        self.precision = recipe.precision_for(device.type)
        self.ds_config = recipe.deepspeed_config(self.world, device.type)
        self.accum = self.ds_config["gradient_accumulation_steps"]
        ft = recipe.finetune
        optimizer = build_optimizer([p for p in backbone.parameters() if p.requires_grad], name=ft.optimizer,
                                    lr=ft.lr, weight_decay=ft.weight_decay, momentum=ft.momentum)
        # Under ZeRO-Offload this torch optimizer steps the CPU partitions: Recipe.deepspeed_config
        # sets zero_force_ds_cpu_optimizer false, without which DeepSpeed accepts only its own CPU Adam.
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=backbone, optimizer=optimizer, config=self.ds_config)
        if self.engine.zero_cpu_offload():
            log.info("ZeRO-Offload: optimizer state and fp32 master weights on the CPU, stepped by %s",
                     type(optimizer).__name__)
        self.device = self.engine.device
        self.input_dtype = _DTYPES[self.precision]
        self.global_step = 0

    @property
    def module(self):
        return self.engine.module

    # ---- the linear-probe head becomes the starting classifier ---------------------------
    def set_head(self, head_state: Dict[str, torch.Tensor]) -> None:
        """Load the probe's head into the engine on every rank (collective).

        Both copies matter: DeepSpeed's fp32 master weights (what the optimizer steps from) and the
        module's own parameters (what forwards use). The master alone only reaches the module at the
        next optimizer step, so the first per-sample loss pass, and with it the first GMM selection,
        would run with the random head.
        """
        from deepspeed.utils import safe_set_full_fp32_param

        head = self.module.head
        safe_set_full_fp32_param(head.weight, head_state["weight"].float())
        safe_set_full_fp32_param(head.bias, head_state["bias"].float())
        self.module.load_head_state(head_state)

    # ---- lockstep passes -----------------------------------------------------------------
    def _forward_eval(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x)

    def per_sample_losses(self, info: SplitInfo, *, transform, batch_size: int, num_workers: int) -> Dict[str, np.ndarray]:
        """CE loss and prediction of the current model for every train sample, on every rank."""
        self.engine.eval()

        def collect(logits, batch):
            logits = logits.float()
            y = batch["cls"].to(logits.device)
            # top5 too: with a val hold-out this pass is also the validation pass (runner._evaluate)
            return {"loss": F.cross_entropy(logits, y, reduction="none"), "pred": logits.argmax(1),
                    "top5": topk_hits(logits, y, TOP_K)}

        out = per_sample_pass(self._forward_eval, info, transform=transform, batch_size=batch_size,
                              num_workers=num_workers, collect=collect, device=self.device,
                              input_dtype=self.input_dtype, dst=None, what="per-sample loss")
        assert out is not None
        return out

    def predict(self, info: SplitInfo, *, transform, batch_size: int, num_workers: int) -> Optional[Dict[str, np.ndarray]]:
        """Predictions for every sample of ``info`` on rank 0 (None elsewhere)."""
        self.engine.eval()
        return per_sample_pass(self._forward_eval, info, transform=transform, batch_size=batch_size,
                               num_workers=num_workers, device=self.device, input_dtype=self.input_dtype,
                               collect=prediction_outputs, dst=0,
                               what="eval")

    # ---- one fine-tuning epoch -------------------------------------------------------------
    def micro_steps_for(self, n_samples: int) -> int:
        """Micro-steps per rank for one pass over ``n_samples``: whole optimizer steps only, >= 1."""
        per_micro = self.recipe.finetune.micro_batch_size * self.world
        opt_steps = max(1, (n_samples // per_micro) // self.accum)
        if self.recipe.finetune.max_steps_per_epoch is not None:
            opt_steps = min(opt_steps, self.recipe.finetune.max_steps_per_epoch)
        return opt_steps * self.accum

    def train_epoch(self, info: SplitInfo, *, epoch: int, total_epochs: int, keep_idx: Optional[np.ndarray],
                    transform, num_workers: int, seed: int, loss_fn=None, stop=None, start_step: int = 0,
                    partial: Optional[Sequence[float]] = None) -> Dict[str, Any]:
        """One epoch over ``keep_idx`` (all samples when None): identical step counts on every rank.

        ``total_epochs`` is the length of this method's fine-tuning (TURN: ``finetune.epochs``;
        the FFT baselines: ``finetune.baseline_epochs``): the cosine schedule spans exactly it.

        ``stop`` (a :class:`turnctl.preempt.StopRequest`): once any rank has it set, every rank
        stops at the same optimizer-step boundary and the result says ``interrupted_at_step`` (the
        micro-steps done) and ``partial`` (the epoch's sums so far, over all ranks). A resumed epoch
        passes them back as ``start_step`` and ``partial``: the first ``start_step`` batches are read
        and skipped (the loader's order and augmentation are replayed, not re-drawn), so the epoch
        ends as an uninterrupted one would.
        """
        ft, data = self.recipe.finetune, self.recipe.data
        n = info.num_samples if keep_idx is None else int(len(keep_idx))
        if n == 0:
            raise TurnctlError(f"epoch {epoch}: the clean subset is empty; lower cleanse.tau or check the labels")
        steps = self.micro_steps_for(n)
        loader = train_loader(info, transform=transform, batch_size=ft.micro_batch_size, epoch=epoch,
                              seed=seed, rank=dist.rank(), world_size=self.world, num_workers=num_workers,
                              shuffle_buffer=data.shuffle_buffer, keep_idx=keep_idx, steps=steps)
        self.engine.train()
        if ft.freeze_norm_stats:
            for m in self.module.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        total_epochs = max(1, total_epochs)
        if not 0 <= start_step < steps or start_step % self.accum:
            raise TurnctlError(f"epoch {epoch}: cannot resume at micro-step {start_step} of {steps} "
                               f"(gradient accumulation {self.accum}); the checkpoint does not fit this run")
        # On a resumed epoch the run's step count already includes the steps done before the interruption.
        lrs = epoch_lrs(ft, epoch=epoch, total_epochs=total_epochs, steps=steps, accum=self.accum,
                        first_global_step=self.global_step - start_step // self.accum)
        t0 = time.time()
        # On resume, rank 0 carries the sums of the steps done before the interruption (already
        # summed over ranks), so the all-reduce below gives the whole epoch's figures.
        carried_loss, carried_seen = (float(partial[0]), int(partial[1])) if partial and dist.rank() == 0 else (0.0, 0)
        loss_sum = torch.tensor(carried_loss, dtype=torch.float64, device=self.device)
        seen = carried_seen
        interrupted = None
        # Distinct for every (seed, rank, step) below a million steps per epoch.
        base_seed = ((seed * 1_000_003 + dist.rank()) * 1_000_003) % (2**62)
        # Where this rank's time goes (host-side perf_counter, a few calls per step: always on).
        # On a GPU kernels run asynchronously: time queued by the forward/backward surfaces at the
        # next synchronising call (_check_step's .cpu(), in "bookkeeping"), not where it was queued.
        laps = _Laps()
        window = _StepWindow(self.device)
        log_every = self.recipe.output.log_every_steps if self.log_metrics is not None else 0
        batches = track(loader, f"fine-tune epoch {epoch}", total=steps, batch_size=ft.micro_batch_size * self.world)
        for step, batch in enumerate(batches):
            laps.lap("data")
            # Any randomness of the model (dropout, drop-path) is a function of (seed, rank, step),
            # not of how many steps this process happened to run: a resumed epoch draws the same.
            torch.manual_seed(base_seed + step)
            laps.lap("bookkeeping")
            if step < start_step:
                continue
            if step == start_step and start_step:
                window.restart_clock()  # the replayed batches read before this step are not training
            x = batch["image"].to(self.device, dtype=self.input_dtype, non_blocking=True)
            y = batch["cls"].to(self.device, non_blocking=True)
            laps.lap("data")
            logits = self.engine(x).float()
            per_sample = F.cross_entropy(logits, y, reduction="none") if loss_fn is None else loss_fn(logits, y, batch)
            laps.lap("forward")
            stop_now = self._check_step(per_sample, batch, epoch, step, stop)
            loss = per_sample.mean()
            laps.lap("bookkeeping")
            self.engine.backward(loss)
            laps.lap("backward")
            boundary = self.engine.is_gradient_accumulation_boundary()
            if boundary:
                for group in self.optimizer.param_groups:
                    group["lr"] = lrs[(step + 1) // self.accum - 1]
                self.global_step += 1
            laps.lap("bookkeeping")
            self.engine.step()
            laps.lap("step")
            loss_sum += loss.detach().double()
            seen += int(y.shape[0])
            window.add(loss, int(y.shape[0]))
            # global_step is the same on every rank, so every rank joins the window's all-reduce.
            if boundary and log_every and self.global_step % log_every == 0:
                self._log_step(window, epoch=epoch, lr=lrs[(step + 1) // self.accum - 1])
            # The flag is all-reduced, so every rank takes this branch at the same step.
            if stop_now and boundary and step + 1 < steps:
                interrupted = step + 1
                batches.close()  # stops the loader's workers and records its stats so far
                break
            laps.lap("bookkeeping")
        wall = time.time() - t0
        loader_stats = loader.stats()
        done = steps if interrupted is None else interrupted
        # Summed over ranks: the metrics line reports the epoch's corrupt samples, not rank 0's share.
        stats = torch.tensor([loss_sum.item(), float(done), float(seen),
                              float(loader_stats.get("corrupt", 0)), float(loader_stats.get("errors", 0))],
                             dtype=torch.float64)
        stats = dist.all_reduce(stats)
        out = {"train_loss": float(stats[0] / max(stats[1], 1)), "steps": steps,
               "optimizer_steps": steps // self.accum, "samples": int(stats[2]),
               "samples_per_s": float(stats[2]) / max(wall, 1e-9), "wall_s": wall,
               "corrupt_skipped": int(stats[3]), "stream_errors": int(stats[4]),
               "lr": self.optimizer.param_groups[0]["lr"],
               # Every optimizer step of the epoch so far, in order; a resumed epoch lists the steps run
               # before the interruption too (same function of the step, so the LRs they used).
               "lr_per_step": lrs[:done // self.accum],
               # This rank's seconds (rank 0's on the metrics line), summed over the epoch: waiting
               # for the loader and the copy to the device, engine forward + loss, engine.backward (under ZeRO-1/2 also the
               # gradient reduction, run in DeepSpeed's backward hooks), engine.step (the optimizer
               # on this rank's partition, then the all-gather of the updated weights), and
               # turnctl's own per-step work (reseeding, _check_step's NaN/stop all-reduce, the LR,
               # the counters).
               "time_split_s": laps.seconds()}
        if start_step:
            out["resumed_at_step"] = start_step
        if interrupted is not None:
            # (loss sum, samples) over all ranks so far: what a resumed epoch starts from.
            out.update(interrupted_at_step=interrupted, partial=[float(stats[0]), float(stats[2])])
        return out

    def _log_step(self, window: "_StepWindow", *, epoch: int, lr: float) -> None:
        """One ``finetune_step`` line for the optimizer steps since the previous one (collective)."""
        loss_sum, micro_steps, samples, seconds = window.take()
        get_norm = getattr(self.engine, "get_global_grad_norm", None)  # older DeepSpeed: absent
        norm = get_norm() if get_norm is not None else None
        norm = float(norm) if norm is not None and np.isfinite(float(norm)) else None  # (inf: an fp16 overflow)
        if dist.rank() == 0:
            self.log_metrics({"phase": "finetune_step", "epoch": epoch, "global_step": self.global_step,
                              "loss": loss_sum / max(micro_steps, 1), "lr": lr,
                              "samples_per_s": samples / max(seconds, 1e-9), "grad_norm": norm,
                              "optimizer_steps_averaged": int(micro_steps) // (self.accum * self.world)})

    def _check_step(self, per_sample: torch.Tensor, batch, epoch: int, step: int, stop) -> bool:
        """One all-reduce (MAX) per micro-step of two flags: a NaN/inf loss on any rank stops every
        rank with an error naming the step and the sample idx; a stop request (a signal) on any
        rank is returned, so that every rank stops at the same step."""
        bad = ~torch.isfinite(per_sample.detach())
        flags = torch.stack([bad.any().to(torch.float32),
                             torch.tensor(float(stop is not None and stop.requested), device=bad.device)])
        flags = dist.all_reduce(flags, op="max").cpu()
        if float(flags[0]) > 0:
            local = batch["idx"][bad.cpu()].tolist()
            where = f"idx {local[:5]}" if local else "on another rank"
            raise TurnctlError(f"non-finite loss at fine-tune epoch {epoch}, step {step} ({where}); "
                               "lower finetune.lr or check those samples")
        return float(flags[1]) > 0

    # ---- checkpoints and export -------------------------------------------------------------
    def save_checkpoint(self, root: Path, *, tag: str, client_state: Dict[str, Any], keep: int) -> str:
        """DeepSpeed checkpoint of every rank's shard under ``root/tag``; the oldest beyond ``keep``
        complete ones are removed. Collective.

        DeepSpeed writes ``latest`` from rank 0 as soon as rank 0's own files are written, without
        waiting for the other ranks' ZeRO shards, and not atomically: a rank killed mid-save would
        leave ``latest`` naming a checkpoint that cannot be loaded. So DeepSpeed's ``latest`` is off;
        after a barrier (every shard on disk) rank 0 writes ``COMPLETE`` into the tag, then
        ``latest``, each to a temporary name first. ``--resume`` only ever sees complete checkpoints.

        A write that fails (a full disk) removes what it left (the tag without ``COMPLETE``, the
        temporary ``latest``) and raises an ``OSError`` naming the tag directory (or ``latest``).
        Rotation deletes only checkpoint directories turnctl wrote (:func:`is_own_checkpoint_dir`),
        never a link's target.
        """
        from turnctl.models import write_error
        from turnctl.rundir import atomic_write_json, atomic_write_text

        root = Path(root)
        tag_dir = root / tag
        client = dict(client_state, global_step=self.global_step)
        try:
            self.engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
        except BaseException as exc:
            _discard_incomplete(tag_dir)
            _raise_as_write_error(exc, tag_dir, write_error)
            raise
        dist.barrier()

        def finish() -> None:
            target = tag_dir / COMPLETE
            try:
                atomic_write_json(target, {
                    "tag": tag, "global_step": self.global_step, "world_size": self.world,
                    "zero_stage": int(self.ds_config["zero_optimization"]["stage"]), "time": time.time()})
                target = root / LATEST
                atomic_write_text(target, tag)
            except BaseException as exc:
                _discard_incomplete(tag_dir)
                for leftover in root.glob(f".{LATEST}.tmp-*"):
                    _unlink_quietly(leftover)
                _raise_as_write_error(exc, target, write_error)
                raise
            complete = sorted((t for t in checkpoint_tags(root) if is_own_checkpoint_dir(root / t[0])),
                              key=lambda t: t[1])
            for old, _ in complete[:-keep]:
                if old != tag:
                    _remove_own_checkpoint(root / old)
            # Half-written tags of a killed run (no COMPLETE) would never be loaded: reclaim the space.
            for d in root.iterdir():
                if d.name != tag and not (d / COMPLETE).is_file():
                    _remove_own_checkpoint(d, quiet=True)

        # Rank 0 alone writes; a failure there (a full disk) stops every rank with its message
        # instead of leaving the others in the next collective until the timeout.
        dist.run_on_main(finish, what=f"checkpoint {tag_dir}")
        return tag

    def load_checkpoint(self, root: Path, tag: str) -> Dict[str, Any]:
        """Restore engine, optimizer and schedule state from ``root/tag`` (see :func:`check_resumable`)."""
        from turnctl.safeload import guard_deepspeed_engine

        # DeepSpeed reads its files with torch.load and weights_only=False: a planted pickle would run
        # code here. Guarded, every file is read with weights_only=True; a refusal is a TurnctlError.
        guard_deepspeed_engine(self.engine)
        path, client = self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if path is None:
            raise TurnctlError(f"could not load the DeepSpeed checkpoint under {root}")
        self.global_step = int(client.get("global_step", 0))
        return client

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """fp32 weights of the whole model on rank 0 (collective: all ranks call it)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out: Dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None:  # frozen parameter: not in the optimizer
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.detach().float().clone()
            if dist.rank() == 0:
                out[name] = full.detach().cpu().clone()
        for name, b in self.module.named_buffers():
            if dist.rank() == 0:
                out[name] = b.detach().cpu().clone()
        return out if dist.rank() == 0 else None

    def export(self, out_dir: Path, *, class_names: Sequence[str] = ()) -> None:
        """Hugging Face format (config + safetensors, classifier included); collective, rank 0 writes
        (the backbone writes to a temporary directory and renames it). A failure on rank 0 (a full
        disk) stops every rank with rank 0's message."""
        state = self.full_state_dict()
        dist.run_on_main(lambda: self.backbone.save_pretrained(Path(out_dir), state_dict=state,
                                                               class_names=list(class_names) or None),
                         what=f"export to {out_dir}")


class _StepWindow:
    """The sums of one per-step metrics window: loss and micro-steps on the device (no host sync per
    step), samples on the host; :meth:`take` all-reduces them (collective) and starts the next window."""

    def __init__(self, device) -> None:
        self._sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, micro-steps
        self._samples = 0
        self._start = time.perf_counter()

    def restart_clock(self) -> None:
        self._start = time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self._sums[0] += loss.detach().double()
        self._sums[1] += 1
        self._samples += samples

    def take(self):
        """(loss sum, micro-steps, samples) over all ranks, and this rank's seconds, since the last take."""
        total = dist.all_reduce(torch.cat([self._sums, self._sums.new_tensor([float(self._samples)])])).cpu()
        now = time.perf_counter()
        seconds, self._start = now - self._start, now
        self._sums.zero_()
        self._samples = 0
        return float(total[0]), float(total[1]), float(total[2]), seconds


class _Laps:
    """Seconds per phase of the training loop: ``lap(phase)`` charges the time since the previous
    lap (or since creation) to ``phase``; one perf_counter read per lap."""

    PHASES = ("data", "forward", "backward", "step", "bookkeeping")

    def __init__(self) -> None:
        self._s = dict.fromkeys(self.PHASES, 0.0)
        self._mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self._s[phase] += now - self._mark
        self._mark = now

    def seconds(self) -> Dict[str, float]:
        return {k: round(v, 6) for k, v in self._s.items()}


COMPLETE = "COMPLETE"  # written into a checkpoint tag once every rank's files are on disk
# What a tag directory holds: DeepSpeed's per-rank *_states.pt, the ELR targets (*.pt), COMPLETE, and
# the temporary names of turnctl's atomic writes.
_TAG_FILE = re.compile(r"[\w.-]+\.pt|COMPLETE|\.[\w.-]+\.tmp-\d+")
_warned_foreign: set = set()


def is_own_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` is a checkpoint tag directory turnctl wrote, and so may be deleted: a real
    directory (not a symbolic link) named as turnctl.rundir.checkpoint_tag names tags, holding only
    regular files of the names DeepSpeed and turnctl write there."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or not CHECKPOINT_TAG.fullmatch(path.name):
        return False
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    return all(e.is_file(follow_symlinks=False) and _TAG_FILE.fullmatch(e.name) for e in entries)


def _remove_own_checkpoint(path: Path, *, quiet: bool = False) -> None:
    if is_own_checkpoint_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif not quiet or path.is_dir() or path.is_symlink():
        if str(path) not in _warned_foreign:
            _warned_foreign.add(str(path))
            log.warning("%s: not a checkpoint turnctl wrote (a link, another name, or files turnctl does not "
                        "write); left alone, delete it yourself if it is not needed", path)


def _discard_incomplete(tag_dir: Path) -> None:
    """After a failed save: the tag without COMPLETE can never be loaded; remove it if it is ours."""
    try:
        if not (tag_dir / COMPLETE).is_file() and is_own_checkpoint_dir(tag_dir):
            shutil.rmtree(tag_dir, ignore_errors=True)
    except OSError:  # pragma: no cover - the original failure is what the user needs to see
        pass


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _raise_as_write_error(exc: BaseException, path: Path, write_error) -> None:
    """Re-raise ``exc`` as an OSError naming ``path`` when it is an I/O failure reported without one."""
    err = write_error(exc, path)
    if err is not None and err is not exc:
        raise err from exc


def checkpoint_tags(root: Path) -> list:
    """``(tag, global_step)`` of the complete checkpoints under ``root``."""
    out = []
    for marker in Path(root).glob(f"*/{COMPLETE}"):
        if marker.parent.is_symlink():  # someone else's directory: not a checkpoint to count or rotate
            continue
        try:
            out.append((marker.parent.name, int(json.loads(marker.read_text())["global_step"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def check_resumable(root: Path, *, world_size: int) -> Optional[str]:
    """The tag ``root/latest`` names, checked to be complete and written by ``world_size`` ranks.

    None when there is no checkpoint yet (the run stopped before its first one)."""
    latest = Path(root) / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    marker = Path(root) / tag / COMPLETE
    if not marker.is_file():
        raise TurnctlError(f"{Path(root) / tag}: checkpoint is incomplete (no {COMPLETE} marker); it was not "
                           "written by this version of turnctl or its run was killed while saving")
    info = json.loads(marker.read_text())
    if int(info.get("world_size", world_size)) != world_size:
        raise TurnctlError(f"{Path(root) / tag}: written by {info['world_size']} ranks, resumed with {world_size}; "
                           f"ZeRO shards the optimizer state by rank: resume with {info['world_size']} ranks")
    return tag
