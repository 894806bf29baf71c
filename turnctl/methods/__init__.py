"""The step-1 trainers: the linear probe and the baselines on cached features beyond it.

On cached (frozen) features, run by the runner on rank 0:

* :func:`run_probe` (``turn``, ``lp-ce/gce/elr``): :func:`turnctl.probe.train_linear_probe`;
* :func:`run_dividemix` (``lp-dividemix``): two linear heads, co-divided by a global GMM on their
  losses, MixMatch (turnctl/methods/dividemix.py);
* :func:`run_unicon` (``lp-unicon``): two linear heads, uniform selection by JSD, MixMatch and a
  contrastive loss (turnctl/methods/unicon.py);
* :func:`run_nmtune` (``nmtune``, and step 1 of ``turn-nmtune``): a residual feature MLP and a head
  trained jointly with NMTune's three regularisers (turnctl/methods/nmtune.py).

Each takes the recipe and returns a plain dict (:func:`train_on_features` lists the keys). Which
method uses which trainer is :data:`turnctl.methods.registry.METHODS`. How augmented views are made
from frozen features is documented in :mod:`turnctl.methods.common`.

For full fine-tuning (``fft-gce``, ``fft-elr``): loss hooks for ``FineTuner.train_epoch``'s
``loss_fn`` in :mod:`turnctl.methods.fft_losses`, including the ELR target table kept consistent
across ranks.

:func:`train_on_features` runs a method's trainer by name:

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

from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple

# torch only for the annotations: the registry imports this package, and turnctl.recipe the
# registry, so loading a recipe must not load torch.
if TYPE_CHECKING:  # pragma: no cover
    import torch

    EvalSets = Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]]


def run_probe(recipe, features: "torch.Tensor", labels: "torch.Tensor", *, num_classes: int,
              eval_sets: "EvalSets" = None, clean=None, idx=None, as_turn_step1: bool = False,
              device=None, log_every_epoch: bool = True) -> Dict[str, Any]:
    """The linear probe with the recipe's ``probe`` section (its loss: the method's)."""
    from turnctl.probe import train_linear_probe

    res = train_linear_probe(features, labels, num_classes=num_classes, probe=recipe.probe, losses=recipe.losses,
                             seed=recipe.seed, device=device, idx=idx, eval_sets=eval_sets,
                             log_every_epoch=log_every_epoch)
    return {"head_state": res.head_state, "history": res.history, "kept_epoch": len(res.history),
            "state": None, "summary": {}}


def _two_heads(train: Callable, config, recipe, features, labels, *, num_classes: int, eval_sets, clean,
               device, log_every_epoch: bool) -> Dict[str, Any]:
    """DivideMix and UNICON alike: two heads with the probe's optimizer settings, the last epoch kept."""
    res = train(features, labels, num_classes=num_classes, probe=recipe.probe, config=config, seed=recipe.seed,
                device=device, eval_sets=eval_sets, clean=clean, log_every_epoch=log_every_epoch)
    return {"head_state": res.head_state, "history": res.history, "kept_epoch": len(res.history),
            "state": {"heads": res.heads}, "summary": {}}


def run_dividemix(recipe, features: "torch.Tensor", labels: "torch.Tensor", *, num_classes: int,
                  eval_sets: "EvalSets" = None, clean=None, idx=None, as_turn_step1: bool = False,
                  device=None, log_every_epoch: bool = True) -> Dict[str, Any]:
    """DivideMix with the recipe's ``dividemix`` section (``idx`` unused: no per-sample state)."""
    from turnctl.methods.dividemix import train_dividemix

    return _two_heads(train_dividemix, recipe.dividemix, recipe, features, labels, num_classes=num_classes,
                      eval_sets=eval_sets, clean=clean, device=device, log_every_epoch=log_every_epoch)


def run_unicon(recipe, features: "torch.Tensor", labels: "torch.Tensor", *, num_classes: int,
               eval_sets: "EvalSets" = None, clean=None, idx=None, as_turn_step1: bool = False,
               device=None, log_every_epoch: bool = True) -> Dict[str, Any]:
    """UNICON with the recipe's ``unicon`` section (``idx`` unused: no per-sample state)."""
    from turnctl.methods.unicon import train_unicon

    return _two_heads(train_unicon, recipe.unicon, recipe, features, labels, num_classes=num_classes,
                      eval_sets=eval_sets, clean=clean, device=device, log_every_epoch=log_every_epoch)


def run_nmtune(recipe, features: "torch.Tensor", labels: "torch.Tensor", *, num_classes: int,
               eval_sets: "EvalSets" = None, clean=None, idx=None, as_turn_step1: bool = False,
               device=None, log_every_epoch: bool = True) -> Dict[str, Any]:
    """NMTune with the recipe's ``nmtune`` section; as TURN's step 1 with its step-1 loss and epoch."""
    from turnctl.methods.nmtune import train_nmtune

    # NMTune (paper and code) trains with CE and keeps the last epoch; as TURN's step 1 it must
    # resist the noise the way TURN's GCE probe does, or it fits the flipped labels the GMM must find.
    loss = recipe.nmtune.step1_loss if as_turn_step1 else "ce"
    select = recipe.nmtune.step1_select if as_turn_step1 else "last"
    res = train_nmtune(features, labels, num_classes=num_classes, config=recipe.nmtune, seed=recipe.seed,
                       device=device, eval_sets=eval_sets, log_every_epoch=log_every_epoch, loss=loss,
                       gce_q=recipe.losses.gce_q, gce_form=recipe.losses.gce_form, select=select)
    return {"head_state": res.head_state, "history": res.history, "kept_epoch": res.epoch,
            "state": {"nmtune": res.model_state},
            "summary": {"nmtune_loss": loss, "nmtune_select": select, **res.fold_summary()}}


def train_on_features(method: str, features: "torch.Tensor", labels: "torch.Tensor", *, num_classes: int, recipe,
                      eval_sets: "EvalSets" = None, clean: "Optional[torch.Tensor]" = None, device=None,
                      log_every_epoch: bool = True, as_turn_step1: bool = False) -> Dict[str, Any]:
    """Run the step-1 trainer of ``method`` (a name in the registry) with the recipe's settings.

    ``as_turn_step1``: the method is TURN's step 1 (``turn-nmtune``), not a baseline of its own;
    NMTune then trains with ``nmtune.step1_loss`` (default GCE, TURN's robust step-1 loss) instead
    of NMTune's CE and keeps the epoch ``nmtune.step1_select`` says (default: best val accuracy)
    instead of the last (turnctl/methods/nmtune.py says why). Only a trainer that some TURN variant
    uses can be a step 1.

    Keys: ``head_state`` (for the Backbone's head), ``history`` (per epoch, ``<name>_acc``),
    ``kept_epoch`` (1-based: the epoch of ``history`` whose model ``head_state`` is; the last one
    except for NMTune as TURN's step 1, which keeps its best-val epoch; 0 when no epoch ran),
    ``state`` (what to save next to the run: both heads, or NMTune's full model; None for the
    probe) and ``summary`` (small JSON-able facts for the run summary, e.g. NMTune's fold agreement).
    """
    from turnctl.methods.registry import METHODS

    spec = METHODS.get(method)
    if spec is None or spec.trainer is None:
        trained = [m for m, s in METHODS.items() if s.trainer is not None]
        raise ValueError(f"not a method trained on features: {method!r} (expected one of {', '.join(trained)})")
    if as_turn_step1:
        step1s = {s.trainer for s in METHODS.values() if s.family == "turn"}
        if spec.trainer not in step1s:
            names = [m for m, s in METHODS.items() if s.family != "turn" and s.trainer in step1s]
            raise ValueError(f"{method!r} is not a TURN step 1 (these are: {', '.join(names)})")
    return spec.trainer(recipe, features, labels, num_classes=num_classes, eval_sets=eval_sets, clean=clean,
                        as_turn_step1=as_turn_step1, device=device, log_every_epoch=log_every_epoch)
