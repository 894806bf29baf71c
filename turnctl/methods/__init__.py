"""The baselines of the TURN paper's tables beyond CE/GCE/ELR probes, and NMTune.

On cached (frozen) features, run by the runner on rank 0 like the linear probe:

* :func:`~turnctl.methods.dividemix.train_dividemix` (``lp-dividemix``): two linear heads,
  co-divided by a global GMM on their losses, MixMatch;
* :func:`~turnctl.methods.unicon.train_unicon` (``lp-unicon``): two linear heads, uniform
  selection by JSD, MixMatch and a contrastive loss;
* :func:`~turnctl.methods.nmtune.train_nmtune` (``nmtune``, and step 1 of ``turn-nmtune``): a
  residual feature MLP and a head trained jointly with NMTune's three regularisers.

Each returns a ``head_state`` (an ``nn.Linear(D, C)`` state for the Backbone's head) and a per-epoch
``history`` with ``<eval set>_acc``, like :class:`turnctl.probe.ProbeResult`. How augmented views
are made from frozen features is documented in :mod:`turnctl.methods.common`.

For full fine-tuning (``fft-gce``, ``fft-elr``): loss hooks for ``FineTuner.train_epoch``'s
``loss_fn`` in :mod:`turnctl.methods.fft_losses`, including the ELR target table kept consistent
across ranks.

:func:`train_on_features` dispatches by method name with a recipe:

>>> import torch
>>> from turnctl.recipe import load_recipe
>>> r = load_recipe("tiny", ["probe.epochs=2", "dividemix.warmup_epochs=1"])
>>> y = torch.arange(64) % 4
>>> x = torch.randn(64, 8) + 3 * torch.nn.functional.one_hot(y, 8).float()
>>> out = train_on_features("lp-dividemix", x, y, num_classes=4, recipe=r, log_every_epoch=False)
>>> sorted(out["head_state"]), len(out["history"])
(['bias', 'weight'], 2)
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

FEATURE_METHODS = ("lp-dividemix", "lp-unicon", "nmtune")


def train_on_features(method: str, features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, recipe,
                      eval_sets: Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
                      clean: Optional[torch.Tensor] = None, device=None,
                      log_every_epoch: bool = True) -> Dict[str, Any]:
    """Run one of :data:`FEATURE_METHODS` with the recipe's settings; a plain dict back.

    Keys: ``head_state`` (for the Backbone's head), ``history`` (per epoch, ``<name>_acc``),
    ``state`` (what to save next to the run: both heads, or NMTune's full model) and ``summary``
    (small JSON-able facts for the run summary, e.g. NMTune's fold agreement).
    """
    seed = recipe.seed
    if method == "lp-dividemix":
        from turnctl.methods.dividemix import train_dividemix

        res = train_dividemix(features, labels, num_classes=num_classes, probe=recipe.probe, config=recipe.dividemix,
                              seed=seed, device=device, eval_sets=eval_sets, clean=clean,
                              log_every_epoch=log_every_epoch)
        return {"head_state": res.head_state, "history": res.history, "state": {"heads": res.heads}, "summary": {}}
    if method == "lp-unicon":
        from turnctl.methods.unicon import train_unicon

        res = train_unicon(features, labels, num_classes=num_classes, probe=recipe.probe, config=recipe.unicon,
                           seed=seed, device=device, eval_sets=eval_sets, clean=clean,
                           log_every_epoch=log_every_epoch)
        return {"head_state": res.head_state, "history": res.history, "state": {"heads": res.heads}, "summary": {}}
    if method == "nmtune":
        from turnctl.methods.nmtune import train_nmtune

        res = train_nmtune(features, labels, num_classes=num_classes, config=recipe.nmtune, seed=seed,
                           device=device, eval_sets=eval_sets, log_every_epoch=log_every_epoch)
        return {"head_state": res.head_state, "history": res.history, "state": {"nmtune": res.model_state},
                "summary": {"nmtune_fold_agreement": res.fold_agreement, "nmtune_fold_ridge": res.fold_ridge}}
    raise ValueError(f"not a feature-space method: {method!r} (expected one of {', '.join(FEATURE_METHODS)})")
