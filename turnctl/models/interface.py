"""The :class:`Backbone` interface every family implements: features, the head, and the export
(``save_pretrained``: the family's weights, ``head.safetensors``, ``preprocessor_config.json`` and
``turnctl.json``, written to a temporary directory and swapped into place).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from turnctl import distributed as dist
from turnctl.models.exportdir import (
    EXPORT_FORMAT, HEAD_FILE, META_FILE, check_replaceable, remove_tmp, replace_dir, write_error,
)
from turnctl.models.families import ModelError
from turnctl.models.preprocess import preprocess_to_hf
from turnctl.transforms import Preprocess


def _is_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


class Backbone(nn.Module):
    """A feature extractor plus a linear head; :mod:`turnctl.models` lists the families.

    Subclasses implement ``features``, the ``head`` property and ``_save_weights``. The wrapped
    network is ``self.model`` (so a DeepSpeed or consolidated state dict has ``model.*`` keys).
    """

    def __init__(self, *, family: str, model: nn.Module, preprocess: Preprocess, pooling: str,
                 requested_pooling: str, feature_dim: int, num_classes: int,
                 class_names: Optional[Sequence[str]] = None, source: Optional[str] = None,
                 interpolate_pos_encoding: bool = False):
        super().__init__()
        self.model = model
        self.family, self.pooling, self.requested_pooling = family, pooling, requested_pooling
        self.preprocess, self.feature_dim, self.num_classes = preprocess, int(feature_dim), int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        self.source = source
        self.interpolate_pos_encoding = bool(interpolate_pos_encoding)
        self.hf_deepspeed_config = None  # kept alive under ZeRO-3 (transformers holds a weakref)
        self.channels_last = False  # set from model.memory_format by load_backbone

    def _layout(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The batch in the memory format the convolutions run fastest on (``model.memory_format``)."""
        if self.channels_last and pixel_values.dim() == 4:
            return pixel_values.contiguous(memory_format=torch.channels_last)
        return pixel_values

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass instead of keeping them (``model.
        gradient_checkpointing``): transformers' own per-layer checkpointing, non-reentrant, so it
        works under ZeRO-3 and with a frozen input. A family without it is refused in one line."""
        from turnctl.errors import RecipeError

        enable = getattr(self.model, "gradient_checkpointing_enable", None)
        if enable is None or not getattr(self.model, "supports_gradient_checkpointing", False):
            raise RecipeError(f"model.gradient_checkpointing: the {self.family} backbone has no activation "
                              "checkpointing; set it to false (or drop activation_checkpointing from --deepspeed)")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- to implement ----------------------------------------------------------------------------
    @property
    def head(self) -> nn.Linear:
        raise NotImplementedError

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _save_weights(self, out: Path, state_dict: Optional[Dict[str, torch.Tensor]],
                      head: Tuple[torch.Tensor, torch.Tensor], class_names: Optional[Sequence[str]]) -> Dict[str, Any]:
        """Write config.json + model.safetensors into ``out``; return the turnctl.json fields that say
        how to load them (:func:`turnctl.models.layouts.load_fields`). ``head`` is the classifier's
        (weight, bias)."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))

    def _head_prefix(self) -> str:
        head = self.head
        for name, mod in self.named_modules():
            if mod is head:
                return name
        raise RuntimeError("head is not a submodule")  # pragma: no cover

    @torch.no_grad()
    def load_head_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy an ``nn.Linear(D, C)`` state dict (e.g. the probe's ``head_state``) into the head.

        Under ZeRO-3 the head is partitioned: every rank must call this (the gather is collective);
        rank 0's ``state`` is the one kept.
        """
        w, b = state["weight"], state["bias"]
        if tuple(w.shape) != (self.num_classes, self.feature_dim) or tuple(b.shape) != (self.num_classes,):
            raise ModelError(f"head state of shape {tuple(w.shape)} does not fit the {self.family} head "
                             f"({self.num_classes} classes x {self.feature_dim} features)")
        head = self.head
        params = [head.weight, head.bias]
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if dist.rank() == 0:
                    head.weight.copy_(w.to(head.weight))
                    head.bias.copy_(b.to(head.bias))
            return
        head.weight.copy_(w.to(head.weight))
        head.bias.copy_(b.to(head.bias))

    def metadata(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        from turnctl import __version__

        names = list(class_names) if class_names is not None else self.class_names
        return {
            "format": EXPORT_FORMAT, "turnctl_version": __version__, "family": self.family,
            "pooling": self.pooling, "requested_pooling": self.requested_pooling,
            "feature_dim": self.feature_dim, "num_classes": self.num_classes, "class_names": names,
            "preprocess": self.preprocess.to_dict(), "interpolate_pos_encoding": self.interpolate_pos_encoding,
            "source": self.source,
        }

    def save_pretrained(self, save_dir, *, state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                        class_names: Optional[Sequence[str]] = None) -> Path:
        """Export weights (config.json + model.safetensors, head included), ``head.safetensors``,
        ``preprocessor_config.json`` and ``turnctl.json``; written to a temp dir, then renamed.

        ``state_dict``: a full state dict of this module (``model.*`` keys), e.g. the consolidated
        fp32 weights of a ZeRO checkpoint; required under ZeRO-3, where the live parameters are
        partitioned. Call on one rank.
        """
        if state_dict is None and _is_partitioned(self):
            raise ModelError("save_pretrained under ZeRO-3: the parameters are partitioned; pass the consolidated "
                             "state_dict (deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint)")
        final = Path(save_dir)
        check_replaceable(final)  # before any work: the export would replace it
        tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_tmp(tmp)  # a dead process's, with this pid
            tmp.mkdir()
            self._write_export(tmp, state_dict, class_names)
            replace_dir(tmp, final)
        except BaseException as exc:
            err = write_error(exc, final)
            if err is not None and err is not exc:
                raise err from exc
            raise
        finally:  # whatever went wrong, no half export is left under a temporary name
            remove_tmp(tmp)
        return final

    def _write_export(self, tmp: Path, state_dict: Optional[Mapping[str, torch.Tensor]],
                      class_names: Optional[Sequence[str]]) -> None:
        from safetensors.torch import save_file

        sd = None
        if state_dict is not None:
            sd = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        meta = self.metadata(class_names)
        prefix = self._head_prefix()
        if state_dict is not None:
            head = {"weight": state_dict[f"{prefix}.weight"], "bias": state_dict[f"{prefix}.bias"]}
        else:
            head = {"weight": self.head.weight, "bias": self.head.bias}
        head = {k: v.detach().float().cpu().contiguous() for k, v in head.items()}
        meta.update(self._save_weights(tmp, sd, (head["weight"], head["bias"]), meta["class_names"]))
        save_file(head, str(tmp / HEAD_FILE))
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocess_to_hf(self.preprocess), indent=2))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))

    def describe(self) -> str:
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())  # ZeRO-3: full sizes
        pp = self.preprocess
        return (f"{self.family} backbone ({type(self.model).__name__}, {n / 1e6:.1f}M params) from "
                f"{self.source or 'random init'}: {self.feature_dim}-d {self.pooling} features, "
                f"{self.num_classes} classes, input {pp.image_size} px"
                f"{' (channels_last)' if self.channels_last else ''}")
