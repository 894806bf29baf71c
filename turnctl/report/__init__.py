"""Label-issue report of a TURN run: which training labels the per-class GMM calls wrong.

Everything comes from the run directory (turnctl.rundir): ``selection/epoch_E.npz`` (written by
``_cleanse`` in turnctl/runner.py at the start of every fine-tuning epoch, with the cleanse settings
it was made with: tau, normalisation; a file of an older turnctl takes them from ``recipe.yaml``),
``recipe.yaml`` (where the shards are) and, for the ``key`` column and class names, the train
split's shards. The data is kept apart from its rendering:

* ``selection.py``: :func:`load_selection` -> a :class:`Selection` (one epoch's arrays + recipe);
* ``keys.py``: the ``key`` column, read back from the shards (:func:`sample_keys`);
* ``tables.py``: what a selection says, as data (:func:`label_issues`, :func:`per_class_table`,
  :func:`health_summary`, :func:`flagged_quality`, :func:`epoch_history`);
* ``writers.py``: the CSVs and the summary (:func:`write_report`);
* ``plots.py``: the PNGs (:func:`plot_report`, matplotlib).

The mixture maths (posteriors, tau crossings, the normalised loss axis) is turnctl.cleanse's, the
same code the selection ran.

Flat functional API, cleanlab style::

    sel = load_selection("runs/tiny-x")                   # the last epoch's selection (or epoch=E)
    issues = label_issues(sel)                            # dict of columns, most suspicious first
    pandas.DataFrame(issues)                              # cleanlab's column names, if you use pandas
    per_class_table(sel)                                  # one dict per class
    health_summary(sel)                                   # overall numbers (+ precision / recall)
    write_report("runs/tiny-x", top=10, plot=True)        # report/*.csv, report/*.png; the summary

Every function taking ``run`` accepts a run directory or an already loaded :class:`Selection`.

Definitions (the CSVs, the CLI and ``--json`` all use these)
------------------------------------------------------------
* ``label_score`` = ``clean_prob``: the posterior of the low-loss (clean) mixture component of the
  sample's given class. Low = likely mislabelled.
* ``is_label_issue`` = not kept by the GMM (``clean_prob <= tau``) AND seen by it: decodable and not
  held out for validation. Undecodable samples (``ok`` False) and the train samples
  ``data.val_fraction`` held out never took part in the fit (their clean_prob is 0 by convention,
  not by evidence), so they are not called label issues, and come last; their ``label_score`` is
  NaN (empty in the CSV). An undecodable sample's ``loss`` is NaN too and its ``predicted_label``
  -1; a held-out one keeps both (the model did see its image). Per-class counts add a
  ``held_out`` column (in per_class.csv only when the run held samples out). ``true_label`` is empty where unknown (-1 in the selection npz
  convention). Note: flagged is the GMM's decision, before the class-balanced subset draw, which
  drops clean samples too (``selected`` counts that).
* Keys and class names come from file names; bytes in them that are not UTF-8 (a Latin-1
  ``caf\\xe9.jpg``) are written as ``\\xNN`` escapes (turnctl.logger.printable_name) in the CSVs, the table
  and the names of the JSON summary; its paths stay as they are (``os.fsencode`` gives the bytes back).
* Severity order: the samples the GMM saw first, then ``label_score`` ascending, then ``loss``
  descending (many noisy samples have a posterior that underflows to exactly 0; among those the
  higher loss is the more suspicious), then ``idx``.
* Estimated noise rate of a class = the mean posterior of the noisy (high-mean) component over the
  class's samples the GMM saw, i.e. the expected fraction of wrong labels under the fitted mixture.
  After EM converges this equals the mixture weight of the noisy component (M-step), and it is
  reported next to it; we use the posterior mean because it comes from the same final E-step as
  ``label_score`` and can therefore be checked from ``label_issues.csv`` alone:
  ``1 - mean(label_score)`` over a class's rows with a score. Caveat: a two-component mixture splits
  even a clean class, so on a nearly clean class this over-estimates the noise.
* Label health score = 1 - estimated overall noise rate = mean ``label_score`` over the samples
  the GMM saw (the size-weighted mean of the per-class rates). Like cleanlab's
  ``overall_label_health_score``, 1 - the estimated fraction of wrong labels.
* Flagged precision / recall, when true labels are known (samples with ``clean >= 0`` the GMM saw):
  a real issue is ``given != true``; precision = real issues among the flagged / flagged, recall =
  real issues flagged / real issues.
* Mixture means and variances are in the space the GMM saw: losses min-max normalised over the
  samples the GMM saw (``cleanse.normalize: minmax``, see turnctl.cleanse) or raw losses
  (``none``). The plots use that axis too.
"""
from __future__ import annotations


from turnctl.cleanse import mixture_posterior, tau_crossings
from turnctl.report.keys import sample_keys
from turnctl.report.plots import MAX_PLOT_CLASSES, plot_report
from turnctl.report.selection import Selection, load_selection, selection_epochs
from turnctl.report.tables import (LABEL_ISSUE_COLUMNS, PER_CLASS_COLUMNS, epoch_history, flagged_quality,
                                   health_summary, label_issues, per_class_table)
from turnctl.report.writers import write_report

__all__ = [
    "Selection", "selection_epochs", "load_selection", "sample_keys", "label_issues", "per_class_table",
    "flagged_quality", "health_summary", "epoch_history", "mixture_posterior", "tau_crossings",
    "write_report", "plot_report", "LABEL_ISSUE_COLUMNS", "PER_CLASS_COLUMNS", "MAX_PLOT_CLASSES",
]
