"""Experiment trackers (``output.report_to``): TensorBoard, MLflow and Weights & Biases, rank 0 only.

Each tracker is one small class behind :class:`Tracker`; :data:`TRACKERS` maps the names a recipe
may list to them (the recipe's ``output.report_to`` is validated against it). :class:`RunTrackers`
is what a run directory (turnctl/rundir.py) drives: it decides which trackers a recipe asks for,
starts them with the resolved recipe as parameters (flattened to dotted keys), sends every
metrics.jsonl line to them, and at the end logs the run's files as artifacts and closes them.

What each line becomes: the numbers of the line (one level of dicts flattened, bools, lists and
non-finite values left out) keyed ``<phase>/<name>`` (``finetune_step/loss``, ``fft/val_accuracy``,
``lp/val_acc``), at the step the phase counts in: ``global_step`` (the optimizer step) for
per-step lines, ``epoch`` for the others.

Which trackers run (the rule of turnctl/recipe/sections.py, OutputSection):

* ``report_to`` unset (null): TensorBoard when ``output.tensorboard`` is true and it is installed;
  when it is not, one notice and the run goes on (what turnctl always did).
* ``report_to`` a list: exactly those. A named tracker that is not installed stops the run before it
  starts with one line naming the extra to install, as HF Trainer raises for ``report_to`` naming an
  uninstalled integration: a run that was asked to report somewhere should not silently not.

Resuming: the MLflow run id and the W&B run id are kept in ``<run>/trackers.json``; a resumed run
directory logs into the same MLflow run and the same W&B run (one curve per run).

MLflow: the tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a file store in ``<run>/mlruns``
(``mlflow ui --backend-store-uri <run>/mlruns``). MLflow 3 refuses a file store unless
``MLFLOW_ALLOW_FILE_STORE=true``, and its SQLite store needs the full ``mlflow`` package
(SQLAlchemy), which ``turnctl[mlflow]`` (mlflow-skinny) does not pull in; so for its own default
turnctl sets ``MLFLOW_ALLOW_FILE_STORE=true`` (a user's own setting is left alone). The experiment
is ``MLFLOW_EXPERIMENT_NAME`` or the recipe's name. W&B: project ``WANDB_PROJECT`` or "turnctl",
files under ``<run>/wandb/``; ``WANDB_MODE=offline`` needs no network (``wandb sync`` uploads later).

A tracker that fails while the run is training (a tracking server gone) is reported once and
dropped: metrics.jsonl still has every line, and a days-long run does not die for its dashboard.
A tracker that fails to *start* stops the run at its start (:meth:`RunTrackers.start`).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from turnctl.errors import TurnctlError
from turnctl.logger import log

TRACKERS_FILE = "trackers.json"  # <run>/trackers.json: the MLflow / W&B run ids, for --resume
MLFLOW_DIR = "mlruns"  # <run>/mlruns: MLflow's file store when MLFLOW_TRACKING_URI is unset
STEP_PHASE = "finetune_step"  # the phase of the per-optimizer-step lines (output.log_every_steps)
# The keys that say where a line is rather than what was measured.
_POSITION_KEYS = ("phase", "epoch", "global_step", "time")


class Tracker:
    """One experiment tracker of one run (rank 0). Subclasses set :attr:`name`, :attr:`module` (what
    must be importable) and :attr:`extra` (the pip extra that installs it)."""

    name = ""
    module = ""
    extra = ""

    def __init__(self, run_path: Path, *, run_name: str, recipe_name: str):
        self.run_path = Path(run_path)
        self.run_name = run_name
        self.recipe_name = recipe_name

    @classmethod
    def installed(cls) -> bool:
        try:
            return importlib.util.find_spec(cls.module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module set to None
            return False

    @classmethod
    def install_hint(cls) -> str:
        return f"pip install 'turnctl[{cls.extra}]'"

    def start(self, params: Mapping[str, str], *, resume_id: Optional[str]) -> Optional[str]:
        """Open the tracker's run (``resume_id``: the id :meth:`start` returned for this run directory
        before); log ``params`` when the run is new; return the id to keep for a resume (or None)."""
        raise NotImplementedError

    def log(self, phase: str, values: Mapping[str, float], *, step_name: str, step: int) -> None:
        """``values`` (keys already ``<phase>/<name>``) at ``step`` of the phase's own axis."""
        raise NotImplementedError

    def log_artifact(self, path: Path) -> None:
        """Keep the file ``path`` with the run (no-op where the tracker has no such thing)."""

    def finish(self, *, completed: bool) -> None:
        """Close the run; ``completed``: it wrote its summary (else it stopped early or failed)."""


class TensorBoardTracker(Tracker):
    """``<run>/tensorboard/`` event files; no parameters, no artifacts (TensorBoard keeps neither)."""

    name, module, extra = "tensorboard", "tensorboard", "tensorboard"

    @classmethod
    def installed(cls) -> bool:
        if not super().installed():
            return False
        try:  # torch's writer is what turnctl uses; it needs the tensorboard package behind it
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            return False
        return True

    def start(self, params, *, resume_id):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.run_path / "tensorboard"))
        return None

    def log(self, phase, values, *, step_name, step):
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def finish(self, *, completed):
        self._writer.close()


class MLflowTracker(Tracker):
    """One MLflow run per run directory, through ``MlflowClient`` (no process-global active run)."""

    name, module, extra = "mlflow", "mlflow", "mlflow"
    MAX_PARAMS_PER_CALL = 100  # MLflow's limit of parameters per log_batch
    MAX_PARAM_LENGTH = 6000  # MLflow's limit of a parameter's value (longer values are cut)

    def start(self, params, *, resume_id):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (self.run_path / MLFLOW_DIR).resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # see the module docstring
        self._client = client = MlflowClient(tracking_uri=uri)
        self.run_id = None
        if resume_id:
            try:
                client.get_run(resume_id)
                self.run_id = resume_id
                client.update_run(resume_id, status="RUNNING")
            except Exception as exc:  # noqa: BLE001 -- any lookup failure: say so, start a new run
                log.warning("mlflow: run %s of this run directory not found at %s (%s); starting a new one",
                            resume_id, uri, type(exc).__name__)
        if self.run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.recipe_name
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
            self.run_id = client.create_run(experiment_id, run_name=self.run_name,
                                            tags={"turnctl.run_dir": str(self.run_path.resolve())}).info.run_id
            items = [Param(k, v[:self.MAX_PARAM_LENGTH]) for k, v in params.items()]
            for i in range(0, len(items), self.MAX_PARAMS_PER_CALL):
                client.log_batch(self.run_id, params=items[i:i + self.MAX_PARAMS_PER_CALL])
        log.info("mlflow: run %s at %s", self.run_id, uri)
        return self.run_id

    def log(self, phase, values, *, step_name, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in values.items()])

    def log_artifact(self, path):
        self._client.log_artifact(self.run_id, str(path))

    def finish(self, *, completed):
        # KILLED: the run stopped before its summary (--stop-after, a signal, an error); a resume
        # sets it RUNNING again.
        self._client.set_terminated(self.run_id, status="FINISHED" if completed else "KILLED")


class WandbTracker(Tracker):
    """One W&B run per run directory; each phase's metrics on their own x axis (``define_metric``),
    since epochs and optimizer steps are not one counter."""

    name, module, extra = "wandb", "wandb", "wandb"

    def start(self, params, *, resume_id):
        import wandb

        run_id = resume_id or secrets.token_hex(4)  # W&B's own ids are 8 characters of [a-z0-9] too
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "turnctl", name=self.run_name,
                               id=run_id, resume="allow", dir=str(self.run_path), config=dict(params))
        self._axes: set = set()
        return run_id

    def log(self, phase, values, *, step_name, step):
        axis = f"{phase}/{step_name}"
        if phase not in self._axes:
            self._run.define_metric(axis)
            self._run.define_metric(f"{phase}/*", step_metric=axis)
            self._axes.add(phase)
        self._run.log({**values, axis: step})

    def log_artifact(self, path):
        path = Path(path)
        if path.name.endswith(".json"):  # the run's summary: its figures also as the W&B run summary
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError):
                summary = {}
            self._run.summary.update(dict(_numbers(summary)))
        self._run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, *, completed):
        if getattr(self._run, "_is_finished", False):
            return
        self._run.finish(exit_code=0 if completed else 1)


# The names output.report_to accepts, in the order they are started.
TRACKERS: Dict[str, type] = {cls.name: cls for cls in (TensorBoardTracker, MLflowTracker, WandbTracker)}
TRACKER_NAMES: Tuple[str, ...] = tuple(TRACKERS)


def requested(output: Any) -> Tuple[List[str], bool]:
    """(the tracker names ``output`` (a recipe's output section) asks for, whether each must be
    installed). See the module docstring for the rule.

    >>> from types import SimpleNamespace as S
    >>> requested(S(report_to=None, tensorboard=True)), requested(S(report_to=["mlflow"], tensorboard=True))
    ((['tensorboard'], False), (['mlflow'], True))
    """
    if output.report_to is None:
        return (["tensorboard"] if output.tensorboard else []), False
    return list(output.report_to), True


def missing(output: Any) -> Optional[str]:
    """One line naming the first tracker ``output.report_to`` lists that is not installed, or None."""
    names, required = requested(output)
    for name in names if required else ():
        cls = TRACKERS[name]
        if not cls.installed():
            return f"output.report_to: {name} is not installed; {cls.install_hint()} (or drop it from report_to)"
    return None


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    """A nested mapping (the resolved recipe) as ``{"a.b": "value"}``: scalars as text, lists and
    empty mappings as JSON.

    >>> flat_params({"finetune": {"lr": 0.001, "milestones": [1, 2]}, "seed": 0, "x": None})
    {'finetune.lr': '0.001', 'finetune.milestones': '[1, 2]', 'seed': '0', 'x': 'None'}
    """
    out: Dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, prefix=f"{name}."))
        elif isinstance(value, (list, tuple, Mapping)):
            out[name] = json.dumps(value)
        else:
            out[name] = str(value)
    return out


def _numbers(line: Mapping[str, Any], prefix: str = "") -> Iterable[Tuple[str, float]]:
    """The finite numbers of a line, one level of dicts flattened (``time_split_s/data``)."""
    for key, value in line.items():
        if isinstance(value, Mapping) and not prefix:
            yield from _numbers(value, prefix=f"{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield f"{prefix}{key}", float(value)


def metric_values(line: Mapping[str, Any]) -> Tuple[str, str, int, Dict[str, float]]:
    """(phase, step name, step, ``{"<phase>/<name>": value}``) of one metrics line.

    >>> metric_values({"phase": "finetune_step", "epoch": 1, "global_step": 40, "loss": 0.5, "grad_norm": None})
    ('finetune_step', 'global_step', 40, {'finetune_step/loss': 0.5})
    >>> metric_values({"phase": "fft", "epoch": 2, "val_accuracy": 0.8, "time_split_s": {"data": 1.5}})
    ('fft', 'epoch', 2, {'fft/val_accuracy': 0.8, 'fft/time_split_s/data': 1.5})
    """
    phase = str(line.get("phase", "run"))
    step_name = "global_step" if phase == STEP_PHASE else "epoch"
    step = int(line.get(step_name) or 0)
    values = {f"{phase}/{k}": v for k, v in _numbers({k: v for k, v in line.items() if k not in _POSITION_KEYS})}
    return phase, step_name, step, values


# Every RunTrackers with trackers open in this process: closed at exit (a run stopped by --stop-after
# or a signal), and before another run in the same process starts its own (W&B has one run per process).
# A plain set: the RunDir holding a RunTrackers is gone by exit time once train_from_recipe returned.
_open: "set[RunTrackers]" = set()


def _close_all() -> None:
    for trackers in list(_open):
        trackers.finish(completed=False)


class RunTrackers:
    """The trackers of one run directory (rank 0): started on :meth:`start` or the first line."""

    def __init__(self, run_path: Path, recipe: Any):
        self.run_path = Path(run_path)
        self.recipe = recipe
        self.names, self.required = requested(recipe.output)
        self.active: List[Tracker] = []
        self.started = False

    @property
    def ids_file(self) -> Path:
        return self.run_path / TRACKERS_FILE

    def _saved_ids(self) -> Dict[str, str]:
        try:
            ids = json.loads(self.ids_file.read_text())
        except (OSError, ValueError):
            return {}
        return {k: str(v) for k, v in ids.items() if v} if isinstance(ids, dict) else {}

    def start(self) -> None:
        """Start every tracker asked for (once). A tracker not installed: an error when ``report_to``
        named it (:func:`missing` says so before the run), a notice otherwise; a start failure (a
        tracking server unreachable, W&B not logged in) raises, so that the run stops at its start."""
        if self.started:
            return
        self.started = True
        if not self.names:
            return
        for other in list(_open):  # an earlier run of this process (tests, notebooks) still open
            if other is not self:
                other.finish(completed=False)
        from turnctl.rundir import atomic_write_json  # here: rundir imports this module

        dump = self.recipe.model_dump(mode="json")
        dump.setdefault("output", {})["dir"] = str(self.run_path)
        params = flat_params(dump)
        saved, ids = self._saved_ids(), {}
        run_name = self.run_path.resolve().name
        for name in self.names:
            cls = TRACKERS[name]
            if not cls.installed():
                if self.required:
                    raise TurnctlError(missing(self.recipe.output))
                log.info("tensorboard is not installed; metrics go to metrics.jsonl only")  # the legacy default
                continue
            tracker = cls(self.run_path, run_name=run_name, recipe_name=str(self.recipe.name))
            try:
                run_id = tracker.start(params, resume_id=saved.get(name))
            except Exception as exc:  # noqa: BLE001 -- whatever the tracker raises, one line naming it
                self.finish(completed=False)
                raise TurnctlError(f"output.report_to: {name} did not start ({type(exc).__name__}: {exc})") from exc
            self.active.append(tracker)
            _open.add(self)
            if run_id:
                ids[name] = run_id
        if ids and ids != {k: v for k, v in saved.items() if k in ids}:
            atomic_write_json(self.ids_file, {**saved, **ids})
        # Closed at exit if the run stops before its summary, before the trackers' own exit hooks
        # (registered as they started; atexit runs the last registered first) shut their clients.
        atexit.unregister(_close_all)
        atexit.register(_close_all)

    def log_line(self, line: Mapping[str, Any]) -> None:
        """Send one metrics line to every tracker (starting them on the first)."""
        self.start()
        if not self.active:
            return
        phase, step_name, step, values = metric_values(line)
        if values:
            self._each(lambda t: t.log(phase, values, step_name=step_name, step=step))

    def finish(self, *, completed: bool, artifacts: Iterable[Path] = ()) -> None:
        """Log ``artifacts`` (the files that exist) and close every tracker; idempotent."""
        files = [Path(p) for p in artifacts if Path(p).is_file()]
        for path in files:
            self._each(lambda t: t.log_artifact(path))
        self._each(lambda t: t.finish(completed=completed))
        self.active = []
        _open.discard(self)

    def _each(self, call) -> None:
        """``call(tracker)`` for every tracker; one that fails is reported once and dropped."""
        for tracker in list(self.active):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 -- a tracker's failure must not end the training run
                log.warning("%s: %s: %s; not reporting to it any more (metrics.jsonl has every line)",
                            tracker.name, type(exc).__name__, exc)
                self.active.remove(tracker)
