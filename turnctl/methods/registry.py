"""The one list of training methods: name -> what it is, which steps it runs, what trains its step 1.

Everything that names methods reads :data:`METHODS`: the recipe's ``method`` key
(turnctl/recipe/__init__.py), ``turnctl train --method`` and ``turnctl compare --methods``
(turnctl/commands/), the comparison (turnctl/compare.py) and the runner's dispatch
(turnctl/runner.py). Adding a method is one entry here plus the module that trains it.

The entries are data; what trains step 1 is a callable (turnctl/methods/__init__.py holds the
shipped ones) with one signature for every method::

    trainer(recipe, features, labels, *, num_classes, eval_sets=None, clean=None, idx=None,
            as_turn_step1=False, device=None, log_every_epoch=True) -> dict

It gets a copy of the recipe whose learning rate (in ``lr_section``) and ``probe.loss`` the runner
has already set for this run, and returns ``head_state``, ``history``, ``kept_epoch``, ``state``
and ``summary`` (turnctl.methods.train_on_features documents them).

>>> spec = METHODS["lp-gce"]
>>> spec.family, spec.steps, spec.probe_loss
('lp', ('features', 'probe'), 'gce')
>>> [m for m, s in METHODS.items() if "cleanse" in s.steps]
['turn', 'turn-nmtune']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from turnctl.methods import run_dividemix, run_nmtune, run_probe, run_unicon

# In data-flow order; a method runs a subsequence of them.
STEPS = ("features", "probe", "cleanse", "finetune")
FAMILIES = ("turn", "lp", "fft")
LOSSES = ("ce", "gce", "elr")


@dataclass(frozen=True)
class MethodSpec:
    """One method. ``steps`` says what the runner does for it (``features`` and ``probe``: step 1
    on cached frozen features, by ``trainer``; ``cleanse``: per-class GMM selection before each
    fine-tuning epoch; ``finetune``: full fine-tuning, ``finetune.epochs`` epochs after a probe,
    else ``finetune.baseline_epochs``)."""

    name: str
    help: str  # one line, for --help
    family: str  # of FAMILIES; "turn": step 1 is TURN's, not a baseline of its own
    steps: Tuple[str, ...]
    trainer: Optional[Callable[..., Dict[str, Any]]] = None  # step 1; None without a probe step
    lr_section: str = "probe"  # the recipe section whose ``lr`` step 1 trains with (probe.lr_search scales it)
    probe_loss: Optional[str] = None  # the step-1 loss this method fixes; None: the recipe's probe.loss
    finetune_loss: Optional[str] = None  # the fine-tuning loss it fixes; None: the recipe's finetune.loss
    step1_name: Optional[str] = None  # step 1's name in logs and method_state.pt; None: the method's

    def __post_init__(self):
        # An entry that cannot run is refused when the registry is built, not hours into a run.
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {FAMILIES}")
        if list(self.steps) != [s for s in STEPS if s in self.steps] or not self.steps:
            problems.append(f"steps {self.steps} must be some of {STEPS}, in that order")
        if ("probe" in self.steps) != (self.trainer is not None) or ("probe" in self.steps) != ("features" in self.steps):
            problems.append("a probe step needs the features step and a trainer, and a trainer needs a probe step")
        if "cleanse" in self.steps and not {"probe", "finetune"} <= set(self.steps):
            problems.append("cleansing needs a probe (its starting head) and fine-tuning (what it selects for)")
        if any(loss not in (None, *LOSSES) for loss in (self.probe_loss, self.finetune_loss)):
            problems.append(f"losses are one of {LOSSES}")
        if problems:
            raise ValueError(f"method {self.name!r}: " + "; ".join(problems))

    @property
    def step1(self) -> str:
        """What step 1 is called in the logs and in ``method_state.pt``."""
        return self.step1_name or self.name


_TURN = ("features", "probe", "cleanse", "finetune")
_LP = ("features", "probe")
_FFT = ("finetune",)


def _entries(*specs: MethodSpec) -> Dict[str, MethodSpec]:
    return {s.name: s for s in specs}


# The order is the order of every list of choices (--help, error messages).
METHODS: Dict[str, MethodSpec] = _entries(
    MethodSpec("turn", "TURN: GCE probe, then per epoch GMM cleansing + a fine-tuning epoch on the clean subset",
               "turn", _TURN, run_probe, step1_name="probe"),
    MethodSpec("lp-ce", "linear probe with cross-entropy on frozen features", "lp", _LP, run_probe,
               probe_loss="ce"),
    MethodSpec("lp-gce", "linear probe with the generalised cross-entropy (losses.gce_q)", "lp", _LP, run_probe,
               probe_loss="gce"),
    MethodSpec("lp-elr", "linear probe with early-learning regularisation (losses.elr_*)", "lp", _LP, run_probe,
               probe_loss="elr"),
    MethodSpec("fft-ce", "full fine-tuning from a random head with cross-entropy", "fft", _FFT,
               finetune_loss="ce"),
    MethodSpec("fft-gce", "full fine-tuning from a random head with GCE", "fft", _FFT, finetune_loss="gce"),
    MethodSpec("fft-elr", "full fine-tuning from a random head with ELR (targets kept equal on every rank)",
               "fft", _FFT, finetune_loss="elr"),
    MethodSpec("lp-dividemix", "DivideMix with two linear heads on frozen features (dividemix.*)", "lp", _LP,
               run_dividemix),
    MethodSpec("lp-unicon", "UNICON with two linear heads on frozen features (unicon.*)", "lp", _LP, run_unicon),
    MethodSpec("nmtune", "NMTune: a residual feature MLP and a head on frozen features (nmtune.*)", "lp", _LP,
               run_nmtune, lr_section="nmtune"),
    MethodSpec("turn-nmtune", "TURN with NMTune as step 1, folded into the starting linear head", "turn", _TURN,
               run_nmtune, lr_section="nmtune", step1_name="nmtune"),
)


def method_list() -> str:
    """The method names, comma-separated, for error messages."""
    return ", ".join(METHODS)
