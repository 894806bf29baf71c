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
>>> sorted(out["head_state"]), len(out["history"]), out["kept_epoch"]
(['bias', 'weight'], 2, 2)
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

FEATURE_METHODS = ("lp-dividemix", "lp-unicon", "nmtune")


def train_on_features(method: str, features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, recipe,
                      eval_sets: Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
                      clean: Optional[torch.Tensor] = None, device=None,
                      log_every_epoch: bool = True, as_turn_step1: bool = False) -> Dict[str, Any]:
    """Run one of :data:`FEATURE_METHODS` with the recipe's settings; a plain dict back.

    ``as_turn_step1``: the method is TURN's step 1 (``turn-nmtune``), not a baseline of its own;
    NMTune then trains with ``nmtune.step1_loss`` (default GCE, TURN's robust step-1 loss) instead
    of NMTune's CE and keeps the epoch ``nmtune.step1_select`` says (default: best val accuracy)
    instead of the last (turnctl/methods/nmtune.py says why). Only ``nmtune`` can be a step 1.

    Keys: ``head_state`` (for the Backbone's head), ``history`` (per epoch, ``<name>_acc``),
    ``kept_epoch`` (1-based: the epoch of ``history`` whose model ``head_state`` is; the last one
    except for NMTune as TURN's step 1, which keeps its best-val epoch; 0 when no epoch ran),
    ``state`` (what to save next to the run: both heads, or NMTune's full model) and ``summary``
    (small JSON-able facts for the run summary, e.g. NMTune's fold agreement).
    """
    seed = recipe.seed
    if as_turn_step1 and method != "nmtune":
        raise ValueError(f"{method!r} is not a TURN step 1 (only 'nmtune' is)")
    if method == "lp-dividemix":
        from turnctl.methods.dividemix import train_dividemix

        res = train_dividemix(features, labels, num_classes=num_classes, probe=recipe.probe, config=recipe.dividemix,
                              seed=seed, device=device, eval_sets=eval_sets, clean=clean,
                              log_every_epoch=log_every_epoch)
        return {"head_state": res.head_state, "history": res.history, "kept_epoch": len(res.history),
                "state": {"heads": res.heads}, "summary": {}}
    if method == "lp-unicon":
        from turnctl.methods.unicon import train_unicon

        res = train_unicon(features, labels, num_classes=num_classes, probe=recipe.probe, config=recipe.unicon,
                           seed=seed, device=device, eval_sets=eval_sets, clean=clean,
                           log_every_epoch=log_every_epoch)
        return {"head_state": res.head_state, "history": res.history, "kept_epoch": len(res.history),
                "state": {"heads": res.heads}, "summary": {}}
    if method == "nmtune":
        from turnctl.methods.nmtune import train_nmtune

        # NMTune (paper and code) trains with CE and keeps the last epoch; as TURN's step 1 it must
        # resist the noise the way TURN's GCE probe does, or it fits the flipped labels the GMM must find.
        loss = recipe.nmtune.step1_loss if as_turn_step1 else "ce"
        select = recipe.nmtune.step1_select if as_turn_step1 else "last"
        res = train_nmtune(features, labels, num_classes=num_classes, config=recipe.nmtune, seed=seed,
                           device=device, eval_sets=eval_sets, log_every_epoch=log_every_epoch, loss=loss,
                           gce_q=recipe.losses.gce_q, gce_form=recipe.losses.gce_form, select=select)
        return {"head_state": res.head_state, "history": res.history, "kept_epoch": res.epoch,
                "state": {"nmtune": res.model_state},
                "summary": {"nmtune_loss": loss, "nmtune_select": select, **res.fold_summary()}}
    raise ValueError(f"not a feature-space method: {method!r} (expected one of {', '.join(FEATURE_METHODS)})")
