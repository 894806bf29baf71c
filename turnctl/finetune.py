"""Full fine-tuning with DeepSpeed ZeRO (TURN step 2 and the FFT baselines).

:class:`FineTuner` owns the engine and offers the four things TURN does with it each epoch: the
per-sample loss pass over the whole train split (eval mode, no augmentation, lockstep), one training
epoch on a subset (the same number of optimizer steps on every rank), evaluation, and checkpoints.

The optimizer and the LR schedule are turnctl's own (SGD or AdamW, linear warmup then cosine over
*training progress*), because TURN's epochs have different lengths (the clean subset is redrawn
every epoch), so "total steps" is not known in advance; the LR is a function of (epoch, step within
epoch), which also makes a resumed run bit-compatible with an uninterrupted one.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from turnctl import distributed as dist
from turnctl.errors import TurnctlError
from turnctl.lockstep import per_sample_pass, run_device
from turnctl.logger import track
from turnctl.recipe import Recipe
from turnctl.shards import SplitInfo, train_loader

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_optimizer(params, *, name: str, lr: float, weight_decay: float, momentum: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_at(*, base_lr: float, schedule: str, warmup_steps: int, global_step: int, progress: float) -> float:
    """Linear warmup over the first ``warmup_steps`` optimizer steps, then constant or cosine in
    ``progress`` (fraction of all fine-tuning epochs done, in [0, 1])."""
    scale = 1.0
    if schedule == "cosine":
        scale = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    if warmup_steps > 0 and global_step < warmup_steps:
        scale *= (global_step + 1) / warmup_steps
    return base_lr * scale


class FineTuner:
    """A DeepSpeed engine around a :class:`turnctl.backbones.Backbone` configured by a recipe."""

    def __init__(self, backbone, recipe: Recipe):
        import deepspeed

        self.recipe = recipe
        self.backbone = backbone
        self.world = dist.world_size()
        device = run_device()
        self.precision = recipe.precision_for(device.type)
        self.ds_config = recipe.deepspeed_config(self.world, device.type)
        self.accum = self.ds_config["gradient_accumulation_steps"]
        ft = recipe.finetune
        optimizer = build_optimizer([p for p in backbone.parameters() if p.requires_grad], name=ft.optimizer,
                                    lr=ft.lr, weight_decay=ft.weight_decay, momentum=ft.momentum)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=backbone, optimizer=optimizer, config=self.ds_config)
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
            return {"loss": F.cross_entropy(logits, y, reduction="none"), "pred": logits.argmax(1)}

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
                               collect=lambda logits, b: {"pred": logits.float().argmax(1)}, dst=0,
                               what="eval")

    # ---- one fine-tuning epoch -------------------------------------------------------------
    def micro_steps_for(self, n_samples: int) -> int:
        """Micro-steps per rank for one pass over ``n_samples``: whole optimizer steps only, >= 1."""
        per_micro = self.recipe.finetune.micro_batch_size * self.world
        opt_steps = max(1, (n_samples // per_micro) // self.accum)
        return opt_steps * self.accum

    def train_epoch(self, info: SplitInfo, *, epoch: int, total_epochs: int, keep_idx: Optional[np.ndarray],
                    transform, num_workers: int, seed: int, loss_fn=None) -> Dict[str, Any]:
        """One epoch over ``keep_idx`` (all samples when None): identical step counts on every rank.

        ``total_epochs`` is the length of this method's fine-tuning (TURN: ``finetune.epochs``;
        the FFT baselines: ``finetune.baseline_epochs``): the cosine schedule spans exactly it.
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
        t0 = time.time()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        for step, batch in enumerate(track(loader, f"fine-tune epoch {epoch}", total=steps)):
            x = batch["image"].to(self.device, dtype=self.input_dtype, non_blocking=True)
            y = batch["cls"].to(self.device, non_blocking=True)
            logits = self.engine(x).float()
            per_sample = F.cross_entropy(logits, y, reduction="none") if loss_fn is None else loss_fn(logits, y, batch)
            self._stop_on_nonfinite(per_sample, batch, epoch, step)
            loss = per_sample.mean()
            self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary():
                lr = lr_at(base_lr=ft.lr, schedule=ft.schedule, warmup_steps=ft.warmup_steps,
                           global_step=self.global_step, progress=(epoch + (step + 1) / steps) / total_epochs)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.global_step += 1
            self.engine.step()
            loss_sum += loss.detach().double()
            seen += int(y.shape[0])
        wall = time.time() - t0
        stats = torch.tensor([loss_sum.item(), float(steps), float(seen)], dtype=torch.float64)
        if dist.is_initialized() and self.world > 1:
            import torch.distributed as tdist

            stats = stats.to(dist.comm_device())
            tdist.all_reduce(stats)
            stats = stats.cpu()
        loader_stats = loader.stats()
        return {"train_loss": float(stats[0] / max(stats[1], 1)), "steps": steps,
                "optimizer_steps": steps // self.accum, "samples": int(stats[2]),
                "samples_per_s": float(stats[2]) / max(wall, 1e-9), "wall_s": wall,
                "corrupt_skipped": int(loader_stats.get("corrupt", 0)),
                "lr": self.optimizer.param_groups[0]["lr"]}

    def _stop_on_nonfinite(self, per_sample: torch.Tensor, batch, epoch: int, step: int) -> None:
        """All ranks stop together on a NaN/inf loss, naming the step and the sample idx."""
        bad = ~torch.isfinite(per_sample.detach())
        flag = bad.any().to(torch.float32).reshape(1)
        if dist.is_initialized() and self.world > 1:
            import torch.distributed as tdist

            flag = flag.to(dist.comm_device())
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        if float(flag.item()) > 0:
            local = batch["idx"][bad.cpu()].tolist()
            where = f"idx {local[:5]}" if local else "on another rank"
            raise TurnctlError(f"non-finite loss at fine-tune epoch {epoch}, step {step} ({where}); "
                               "lower finetune.lr or check those samples")

    # ---- checkpoints and export -------------------------------------------------------------
    def save_checkpoint(self, root: Path, *, epoch: int, client_state: Dict[str, Any], keep: int) -> str:
        """DeepSpeed checkpoint of every rank's shard; the oldest beyond ``keep`` are removed."""
        tag = f"epoch_{epoch:04d}"
        client = dict(client_state, global_step=self.global_step)
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client)
        dist.barrier()
        if dist.rank() == 0:
            tags = sorted(p.name for p in Path(root).glob("epoch_*") if p.is_dir())
            for old in tags[:-keep]:
                shutil.rmtree(Path(root) / old, ignore_errors=True)
        dist.barrier()
        return tag

    def load_checkpoint(self, root: Path) -> Optional[Dict[str, Any]]:
        """Restore engine, optimizer and schedule state from the latest checkpoint under ``root``."""
        if not (Path(root) / "latest").is_file():
            return None
        path, client = self.engine.load_checkpoint(str(root), load_optimizer_states=True,
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
        (the backbone writes to a temporary directory and renames it)."""
        state = self.full_state_dict()
        if dist.rank() == 0:
            self.backbone.save_pretrained(Path(out_dir), state_dict=state, class_names=list(class_names) or None)
        dist.barrier()


def accuracy_report(pred: np.ndarray, labels: np.ndarray, ok: np.ndarray, *, num_classes: int,
                    class_names: Sequence[str] = (), top_confusions: int = 5) -> Dict[str, Any]:
    """Top-1, per-class accuracy and the most confused (true, predicted) pairs."""
    mask = ok.astype(bool) & (labels >= 0)
    y, p = labels[mask].astype(np.int64), pred[mask].astype(np.int64)
    acc = float((y == p).mean()) if y.size else float("nan")
    counts = np.bincount(y, minlength=num_classes)
    correct = np.bincount(y[y == p], minlength=num_classes)
    per_class = np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(conf, (y, p), 1)
    np.fill_diagonal(conf, 0)
    flat = np.argsort(conf, axis=None)[::-1][:top_confusions]
    name = (lambda c: class_names[c] if c < len(class_names) else str(c))
    pairs = [{"true": name(int(i // num_classes)), "predicted": name(int(i % num_classes)),
              "count": int(conf.flat[i])} for i in flat if conf.flat[i] > 0]
    return {"accuracy": acc, "num_samples": int(y.size), "undecodable": int((~ok.astype(bool)).sum()),
            "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
            "most_confused": pairs}
