"""Argument checks and the loss normalisation shared by the selection step (turnctl.cleanse).

Users' data errors (a label outside the classes, a non-finite loss of a valid sample) are one-line
:class:`~turnctl.errors.TurnctlError` s naming the sample; malformed arguments are programming
errors (``ValueError``).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch

from turnctl.errors import DataError, TurnctlError
from turnctl.metrics import minmax_range

ArrayLike = Union[np.ndarray, torch.Tensor, "list[float]"]


def as_1d(name: str, a: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if dtype == torch.int64 and (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} must be integers, got {t.dtype}")  # 1.7 must not become class 1
    return t.to(device=device, dtype=dtype)


def check_samples(losses: torch.Tensor, labels: torch.Tensor, valid: Optional[torch.Tensor],
                  num_classes: int) -> Optional[torch.Tensor]:
    """Validate shapes, labels and finiteness of the valid samples.

    Returns the valid mask, or None when every sample is valid (``valid`` None or all True), so
    that callers can skip the masking passes.
    """
    n = losses.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries, losses has {n}")
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if valid is not None:
        if valid.shape[0] != n:
            raise ValueError(f"valid has {valid.shape[0]} entries, losses has {n}")
        if bool(valid.all()):
            valid = None
    if valid is None and n > 0:
        # Fast path, one pass each: min/max propagate NaN, so finite extremes mean finite losses.
        lmin, lmax = (int(v) for v in torch.aminmax(labels))
        fmin, fmax = (float(v) for v in torch.aminmax(losses))
        if 0 <= lmin and lmax < num_classes and math.isfinite(fmin) and math.isfinite(fmax):
            return None
    lab_ok = (labels >= 0) & (labels < num_classes)
    loss_ok = torch.isfinite(losses)
    if valid is not None:
        lab_ok |= ~valid
        loss_ok |= ~valid
    if not bool(lab_ok.all()):
        i = int(torch.nonzero(~lab_ok)[0, 0])
        raise DataError(f"label {int(labels[i])} of sample {i} is outside [0, {num_classes}) "
                        f"(num_classes={num_classes}); check the shards' manifest or data.num_classes")
    if not bool(loss_ok.all()):
        i = int(torch.nonzero(~loss_ok)[0, 0])
        raise TurnctlError(f"per-sample loss of sample {i} is {float(losses[i])}: losses must be finite "
                           f"(did training diverge? try a lower learning rate)")
    return valid


def check_options(tau: float, max_iter: int, tol: float, reg_covar: float, normalize: str) -> None:
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if not reg_covar > 0:  # the zero-variance classes rely on it
        raise ValueError(f"reg_covar must be > 0, got {reg_covar}")
    if normalize not in ("minmax", "none"):
        raise ValueError(f"normalize must be 'minmax' or 'none', got {normalize!r}")


def normalise_losses(losses: torch.Tensor, normalize: str) -> Tuple[torch.Tensor, float, float]:
    """Global min-max to [0, 1]: ``(x, lo, hi)`` with ``x = (losses - lo) / (hi - lo)``.

    One min and max over all the (valid) losses given, not per class (turnctl.cleanse's docstring
    says why); ``normalize="none"``: the losses as they are, lo 0, hi 1.

    >>> x, lo, hi = normalise_losses(torch.tensor([1.0, 2.0, 5.0]), "minmax")
    >>> x.tolist(), lo, hi
    ([0.0, 0.25, 1.0], 1.0, 5.0)
    """
    if normalize == "none":
        return losses, 0.0, 1.0
    return minmax_range(losses)


def resolve_device(losses: Any, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    return losses.device if isinstance(losses, torch.Tensor) else torch.device("cpu")


def samples(losses: ArrayLike, labels: ArrayLike, valid: Optional[ArrayLike], num_classes: int,
            device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(losses, labels, valid)`` as float64 / int64 / bool tensors on ``device``, checked by
    :func:`check_samples` (``valid`` None when every sample is valid)."""
    L = as_1d("losses", losses, torch.float64, device)
    Y = as_1d("labels", labels, torch.int64, device)
    V = None if valid is None else as_1d("valid", valid, torch.bool, device)
    return L, Y, check_samples(L, Y, V, num_classes)
