"""TURN step 2, selection: per-class two-component GMMs on per-sample losses -> a balanced clean subset.

Two flat functions, in the order the runner calls them at the start of every fine-tuning epoch
(turnctl/runner.py, ``_cleanse``)::

    sel = select_clean(losses, labels, num_classes=C)          # p(clean) per sample, keep = p > tau
    sub = balanced_subset(sel.keep, labels, num_classes=C, losses=losses, seed=epoch_seed)
    tuner.train_epoch(train, keep_idx=sub.indices, ...)        # N = min_c |kept_c| draws per class

(``tuner`` a turnctl.finetune.FineTuner), and :func:`fit_reference_sklearn`, the slow,
obviously-correct per-class scikit-learn loop that :func:`select_clean` is tested and benchmarked
against.

Where each part lives:

* ``gmm.py``: :func:`select_clean`, the vectorised EM of every class at once, and
  :class:`CleanSelection`;
* ``mixture.py``: the closed-form maths of a fitted two-component mixture (log-odds quadratic,
  :func:`mixture_posterior`, :func:`tau_crossings`), shared with turnctl.report;
* ``select.py``: :func:`balanced_subset` and :class:`BalancedSubset`;
* ``reference.py``: :func:`fit_reference_sklearn`;
* ``inputs.py``: argument checks and :func:`normalise_losses`, the global min-max below.

Conventions (recipe section ``cleanse``)
-----------------------------------------------------------
* **Normalisation is global.** ``normalize="minmax"`` maps the losses of all valid samples to [0, 1]
  with ONE min and max, as DivideMix does, before fitting the per-class mixtures. Why global and
  not per class: a GMM fit is invariant to an affine change of its data except for ``reg_covar``
  (and ``tol`` is not even affected: the mean log-likelihood only shifts by a constant). With a
  global scale, ``reg_covar=5e-4`` is a floor of ~0.022 x (global loss range) on every component's
  standard deviation, i.e. the same number of loss units in every class, so a class whose losses
  are all tightly packed is not split into two artificial modes. Per-class min-max would stretch
  such a class to [0, 1] and always split it.
* **Component 0 is the low-mean (clean) component** in every returned per-class array, and
  ``clean_prob`` is its posterior.
* **Degenerate classes** (no EM is run; ``n_iter`` 0, ``converged`` True):
  - no valid sample: parameters NaN, weights 0;
  - one sample, or all losses equal (zero spread): there is no second mode to call noisy, so the
    class is one component at that loss (means ``[v, v]``, variances ``[reg_covar] * 2``, weights
    ``[1, 0]``) and every sample gets ``clean_prob`` 1.0. (scikit-learn would instead put a
    near-empty spurious component below the data and call the whole class noisy.) Whether such a
    tiny class can fill a balanced subset is :func:`balanced_subset`'s decision (fallback).
  - two distinct samples are a regular fit (each becomes its own component, as in scikit-learn).
* **Invalid samples** (``valid=False``, e.g. undecodable images) take no part in normalisation or
  fitting, get ``clean_prob`` 0 and ``keep`` False; their loss may be NaN and their label anything.
* **The fit** (:func:`select_clean`) reproduces scikit-learn's ``GaussianMixture(2, max_iter, tol,
  reg_covar)`` per class, for all classes at once, in float64: the samples are grouped by class into
  rows of P (a sort of the labels; see gmm.py's ``_Pieces``) so that per-class sums are dense row
  sums and per-class constants broadcast; EM's responsibilities, M-step and stopping rule (|change
  of the mean log-likelihood| < tol, checked per class; a class that stops is frozen and leaves the
  working set) are scikit-learn's, and so is the initialisation from a 2-means partition (see
  ``_init_two_means``). At the lineage settings, decisions agree with a per-class scikit-learn loop
  on ~99.99% of samples, as often as two scikit-learn runs with different seeds agree with each
  other; run to convergence, the posteriors agree to float32 precision
  (``benchmarks/bench_select.py``, tests/test_cleanse.py).
* Errors: a non-finite loss of a valid sample raises :class:`~turnctl.errors.TurnctlError` naming
  the first such sample (its position in ``losses``, which is the sample ``idx`` when losses are
  indexed by idx); a label outside ``[0, num_classes)`` raises :class:`~turnctl.errors.DataError`.
  Malformed arguments (shapes, option values) are programming errors: ``ValueError``.
"""

from __future__ import annotations

from turnctl.cleanse.gmm import CleanSelection, select_clean
from turnctl.cleanse.inputs import normalise_losses
from turnctl.cleanse.mixture import log_components, mixture_posterior, tau_crossings
from turnctl.cleanse.reference import fit_reference_sklearn
from turnctl.cleanse.select import BalancedSubset, balanced_subset

__all__ = ["CleanSelection", "BalancedSubset", "select_clean", "balanced_subset", "fit_reference_sklearn",
           "normalise_losses", "log_components", "mixture_posterior", "tau_crossings"]
