"""The run directory: the one home of a run's file names, its atomic writes and its selection files.

    <run>/recipe.yaml              the resolved recipe (what --resume checks against)
    <run>/metrics.jsonl            one line per LP epoch and per FFT epoch, and one every
                                   output.log_every_steps optimizer steps of fine-tuning (finetune_step)
    <run>/selection/epoch_E.npz    one fine-tuning epoch's selection (:func:`load_selection_file`)
    <run>/validation_holdout.npz   the train idx held out for validation (data.val_fraction > 0)
    <run>/method_state.pt          what a step-1 method keeps besides its head (both heads, NMTune's model)
    <run>/checkpoints/epoch_EEEE/  DeepSpeed checkpoints (every rank's shard), the last K kept
                                   (epoch_EEEE_step_SSSSSS: one taken mid-epoch, on a signal)
    <run>/checkpoints/latest       the tag --resume continues from
    <run>/final/  <run>/best/      Hugging Face exports (config + safetensors, classifier included)
    <run>/report/                  what ``turnctl report`` writes (CSVs, PNGs)
    <run>/features-cache/          the feature cache, when the shards' own .features is not writable
    <run>/tensorboard/             output.report_to: tensorboard (or the legacy output.tensorboard)
    <run>/mlruns/  <run>/wandb/    output.report_to: mlflow (its default file store), wandb
    <run>/trackers.json            the MLflow / W&B run ids, so that a resumed run logs into the same runs
    <run>/summary.json             the run's result, written last (wall_time_s, phase_time_s: where it went)

:class:`RunLayout` gives these paths for any directory (readers of an existing run: eval, report);
:class:`RunDir` adds the recipe and rank 0's writers for the run being trained. Every single file is
written through :func:`atomic_path` (a temporary name, fsync, rename), so an interrupted run never
leaves a half-written file that looks complete; metrics.jsonl, which grows for days, is appended to
a whole line at a time instead (:meth:`RunDir.log_metrics`). Only rank 0 writes (DeepSpeed
checkpoints excepted).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from turnctl import distributed as dist
from turnctl.errors import TurnctlError
from turnctl.jsonio import jsonable
from turnctl.logger import log
from turnctl.recipe import CleanseSection, Recipe, load_recipe, load_yaml_file
from turnctl.trackers import STEP_PHASE, RunTrackers, metric_values, missing as missing_trackers

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
HOLDOUT_FILE = "validation_holdout.npz"
METHOD_STATE_FILE = "method_state.pt"
SELECTION_DIR = "selection"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"  # DeepSpeed's name for the file naming the current tag (zero_to_fp32 reads it too)
BEST_DIR, FINAL_DIR = "best", "final"
REPORT_DIR = "report"
FEATURES_CACHE_DIR = "features-cache"
TENSORBOARD_DIR = "tensorboard"

SELECTION_NAME = re.compile(r"epoch_(\d+)\.npz")
# Checkpoint tags: epoch_E, and epoch_E_step_S for a checkpoint taken mid-epoch (on a signal).
CHECKPOINT_TAG = re.compile(r"epoch_\d+(_step_\d+)?")


def checkpoint_tag(epoch: int, step: Optional[int] = None) -> str:
    """The tag of the checkpoint after fine-tuning ``epoch`` (or inside it, at micro-step ``step``).

    >>> checkpoint_tag(3), checkpoint_tag(3, step=12)
    ('epoch_0003', 'epoch_0003_step_000012')
    """
    return f"epoch_{epoch:04d}" if step is None else f"epoch_{epoch:04d}_step_{step:06d}"


# ---- atomic writes ----------------------------------------------------------------------------------

def temp_name(path: Path) -> Path:
    """The temporary a write of ``path`` goes through: hidden, beside it (same filesystem, so the
    rename is atomic), and per process, so two writers never share one."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; on leaving the block it is fsynced and
    renamed to ``path``, on any failure (a full disk, a signal, a bug) removed and the error re-raised.

    For writers that take a file name (safetensors, torch.save, savefig)::

        with atomic_path(run / "method_state.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # the data on disk before the name says the file is complete
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(payload), indent=2) + "\n")


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)


# ---- selection files ----------------------------------------------------------------------------

# idx order (as the per-sample loss pass returns them); component 0 of the mixture arrays [C, 2] is
# the low-mean (clean) one. heldout: data.val_fraction's hold-out, absent in files of turnctl before it.
PER_SAMPLE_ARRAYS = ("idx", "loss", "clean_prob", "selected", "keep", "given", "clean", "pred", "ok", "heldout")
MIXTURE_ARRAYS = ("means", "variances", "weights")
_DTYPES = {"idx": np.int64, "loss": np.float32, "clean_prob": np.float32, "selected": bool, "keep": bool,
           "given": np.int64, "clean": np.int64, "pred": np.int64, "ok": bool, "heldout": bool,
           "means": np.float64, "variances": np.float64, "weights": np.float64}
# Read back wider (float32 losses as float64): what readers compute with, and lossless.
_READ_DTYPES = {k: np.float64 if v is np.float32 else v for k, v in _DTYPES.items()}
_OPTIONAL = ("heldout",)


@dataclass(frozen=True)
class SelectionSettings:
    """The ``cleanse`` settings a selection was made with, stored in its file as 0-d arrays."""

    tau: float
    normalize: str
    gmm_max_iter: int
    gmm_tol: float
    gmm_reg_covar: float
    min_per_class: int
    fallback_k: int

    @classmethod
    def of(cls, cleanse: Any) -> "SelectionSettings":
        """From a recipe's (validated) ``cleanse`` section."""
        return cls(**{f.name: getattr(cleanse, f.name) for f in fields(cls)})

    @classmethod
    def from_raw(cls, raw: Any, where: Path) -> "SelectionSettings":
        """From the raw ``cleanse`` mapping of a saved recipe.yaml, the defaults where it is silent
        (files of turnctl before the settings were stored in them); one line naming ``where`` when a
        value is not of its type."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise TurnctlError(f"{where}: cleanse is not a mapping")
        default, values = CleanseSection(), {}
        for f in fields(cls):
            want = getattr(default, f.name)
            v = raw.get(f.name, want)
            try:
                values[f.name] = type(want)(v)
            except (TypeError, ValueError):
                raise TurnctlError(f"{where}: cleanse.{f.name}={v!r} is not a {type(want).__name__}") from None
        return cls(**values)


@dataclass(frozen=True, eq=False)
class SelectionFile:
    """One ``selection/epoch_E.npz``, read by :func:`load_selection_file`: the arrays asked for
    (None for the others: int64, float64 or bool) and the settings it was made with."""

    path: Path
    settings: Optional[SelectionSettings]  # None: an older file, and no fallback given
    idx: Optional[np.ndarray] = None
    loss: Optional[np.ndarray] = None
    clean_prob: Optional[np.ndarray] = None
    selected: Optional[np.ndarray] = None
    keep: Optional[np.ndarray] = None
    given: Optional[np.ndarray] = None
    clean: Optional[np.ndarray] = None
    pred: Optional[np.ndarray] = None
    ok: Optional[np.ndarray] = None
    heldout: Optional[np.ndarray] = None  # all False in a file that predates data.val_fraction
    means: Optional[np.ndarray] = None
    variances: Optional[np.ndarray] = None
    weights: Optional[np.ndarray] = None


def selection_arrays(arrays: Mapping[str, Any], settings: SelectionSettings) -> Dict[str, np.ndarray]:
    """What a selection file holds: ``arrays`` (every name of :data:`PER_SAMPLE_ARRAYS` and
    :data:`MIXTURE_ARRAYS`; ``heldout`` may be left out: nothing held out) in their dtypes, and the
    settings as 0-d arrays (never object arrays: the file loads with ``allow_pickle=False``)."""
    names = PER_SAMPLE_ARRAYS + MIXTURE_ARRAYS
    missing = [k for k in names if k not in arrays and k not in _OPTIONAL]
    unknown = sorted(set(arrays) - set(names))
    if missing or unknown:
        raise ValueError(f"selection arrays: missing {missing}, unknown {unknown}")
    out = {k: np.asarray(v, dtype=_DTYPES[k]) for k, v in arrays.items()}
    if "heldout" not in out:
        out["heldout"] = np.zeros(out["idx"].shape, dtype=bool)
    for f in fields(SelectionSettings):
        out[f.name] = np.array(getattr(settings, f.name))
    return out


def load_selection_file(path: Union[str, os.PathLike], *, arrays: Optional[Sequence[str]] = None,
                        fallback: Optional[Callable[[], SelectionSettings]] = None) -> SelectionFile:
    """Read a selection file: the arrays named (default all) and its settings, ``fallback()`` for a
    file written before turnctl stored them. Shapes are checked; only what is asked is read (an npz
    is lazy, and a million-sample split has many). A missing, unreadable or incomplete file is a
    one-line :class:`TurnctlError` naming it; nothing is unpickled (``allow_pickle=False``)."""
    path = Path(path)
    names = tuple(arrays) if arrays is not None else PER_SAMPLE_ARRAYS + MIXTURE_ARRAYS
    keys = [f.name for f in fields(SelectionSettings)]
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in names if k not in z.files and k not in _OPTIONAL]
            stored = [k for k in keys if k in z.files]
            if stored and len(stored) < len(keys):
                missing += [k for k in keys if k not in z.files]
            if missing:
                raise TurnctlError(f"{path}: missing array(s) {', '.join(missing)}; it was written by an older "
                                   "turnctl or damaged: re-run that epoch")
            got = {k: z[k].astype(_READ_DTYPES[k], copy=False) for k in names if k in z.files}
            settings = SelectionSettings(**{k: z[k].item() for k in keys}) if stored else None
            n = z["idx"].shape[0] if "idx" in z.files else None  # the split's size
    except TurnctlError:
        raise
    except FileNotFoundError:
        raise TurnctlError(f"{path}: no such selection file") from None
    except Exception as exn:  # noqa: BLE001 -- zip, pickle and OS errors all mean "unreadable"
        raise TurnctlError(f"{path}: unreadable selection file ({type(exn).__name__}: {exn})") from None
    if settings is None and fallback is not None:
        settings = fallback()
    if n is None:  # idx not asked for: the other per-sample arrays agree with each other
        n = next((a.shape[0] for k, a in got.items() if k in PER_SAMPLE_ARRAYS), 0)
    if "heldout" in names and "heldout" not in got:
        got["heldout"] = np.zeros(n, dtype=bool)
    C = next((got[k].shape[0] for k in MIXTURE_ARRAYS if k in got), 0)
    for k, a in got.items():
        want = (n,) if k in PER_SAMPLE_ARRAYS else (C, 2)
        if a.shape != want:
            raise TurnctlError(f"{path}: array {k} has shape {a.shape}, expected {want}")
    return SelectionFile(path=path, settings=settings, **got)


# ---- the layout -------------------------------------------------------------------------------------

def _entries(*names: str) -> Iterator[property]:
    """Read-only attributes ``<run>/<name>`` of a :class:`RunLayout`."""
    return (property(lambda self, name=name: self.path / name, doc=f"``<run>/{name}``") for name in names)


def unwritable(directory: Path) -> Optional[str]:
    """Why files cannot be created in ``directory`` (created if missing), or None if they can.

    A real probe (create the directory, then a file in it) rather than ``os.access``: it answers
    for read-only mounts, permissions, ACLs and root alike, and a directory turnctl is about to
    fill may as well exist.
    """
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".turnctl-probe-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


class RunLayout:
    """The paths of a run directory, for any directory: what readers of a finished (or older) run use."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)

    # what the run is and what it gave
    recipe_file, metrics_file, summary_file = _entries(RECIPE_FILE, METRICS_FILE, SUMMARY_FILE)
    # what its steps leave for later ones (and for --resume)
    holdout_file, method_state_file, selection_dir = _entries(HOLDOUT_FILE, METHOD_STATE_FILE, SELECTION_DIR)
    # the models
    checkpoints, best, final = _entries(CHECKPOINTS_DIR, BEST_DIR, FINAL_DIR)
    # what other tools write there
    report_dir, features_cache, tensorboard_dir = _entries(REPORT_DIR, FEATURES_CACHE_DIR, TENSORBOARD_DIR)

    def selection_file(self, epoch: int) -> Path:
        return self.selection_dir / f"epoch_{epoch}.npz"

    def is_run(self) -> bool:
        """Whether the directory holds a run (its recipe.yaml)."""
        return self.recipe_file.is_file()

    def selection_epochs(self) -> List[int]:
        """The fine-tuning epochs that have a selection file, ascending."""
        d = self.selection_dir
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := SELECTION_NAME.fullmatch(p.name)))

    def raw_recipe(self) -> Dict[str, Any]:
        """The saved recipe.yaml as a plain mapping, not validated: a run directory outlives recipe
        schema changes, and an unrelated renamed key must not make an old run unreadable to a reader
        that needs a few settings (the report). Read the one safe way (turnctl.recipe.load_yaml_file)."""
        path = self.recipe_file
        if not path.is_file():
            raise TurnctlError(f"{self.path}: not a run directory (no {RECIPE_FILE})")
        raw = load_yaml_file(path, what="") or {}
        if not isinstance(raw, dict):
            raise TurnctlError(f"{path}: expected a mapping")
        return raw

    def settings_from_recipe(self) -> SelectionSettings:
        """The selection settings as recipe.yaml says (for selection files that do not store them)."""
        return SelectionSettings.from_raw(self.raw_recipe().get("cleanse"), self.recipe_file)

    def load_selection(self, epoch: int, *, arrays: Optional[Sequence[str]] = None) -> SelectionFile:
        """:func:`load_selection_file` of ``epoch``; settings from recipe.yaml for an older file."""
        return load_selection_file(self.selection_file(epoch), arrays=arrays, fallback=self.settings_from_recipe)


# ---- the run being trained --------------------------------------------------------------------------

def _fresh_default_dir(name: str) -> Path:
    """runs/<name>-<time>, created here: a -2, -3 ... suffix when two runs start in the same second (a
    job array), so that two runs never share a directory."""
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "too many runs of this name started this second", str(base))


def _comparable(recipe: Recipe) -> Dict[str, Any]:
    """What ``--resume`` holds equal to the saved recipe: all but where the run is, how often it
    prints progress and how many checkpoints it keeps (a job low on disk may keep fewer)."""
    d = recipe.model_dump(mode="json")
    for key in ("dir", "progress_every_s", "keep_checkpoints"):
        d["output"].pop(key, None)
    return d


class RunDir(RunLayout):
    """The run being trained: its layout, its recipe and rank 0's writers; created collectively so
    every rank agrees on it."""

    def __init__(self, path: Path, recipe: Recipe):
        super().__init__(path)
        self.recipe = recipe
        # The metrics lines of the run's epochs (LP, FFT): what protocol_figures reads and what every
        # checkpoint carries for --resume. The per-step lines (STEP_PHASE) go to metrics.jsonl only.
        self.history: List[Dict[str, Any]] = []
        self.trackers = RunTrackers(self.path, recipe)  # started on rank 0 only
        self._synced = False  # metrics.jsonl rewritten from what this process knows (reset_history)
        # (phase -> last step) the trackers already got before a resume went back: not sent twice.
        self._tracked_until: Dict[str, int] = {}
        self.resuming = False  # set by open(): this invocation continues an existing run

    @classmethod
    def open(cls, recipe: Recipe, *, resume: Union[bool, str]) -> "RunDir":
        """Create (or, with resume, reopen) the run directory. Collective.

        Rank 0 decides, creates the directory and writes ``recipe.yaml`` (which proves the location
        writable) before any long work; a problem is broadcast so that every rank stops with the same
        line. Files turnctl did not write are never touched: a directory that exists must be empty,
        or with ``--resume`` hold a run whose ``recipe.yaml`` equals this recipe. ``resume="auto"``
        (``--resume auto``, for a requeued job's unchanged command line) resumes when the directory
        holds a run, starts one when it does not exist or is empty, and refuses anything else;
        :attr:`resuming` says which it did.
        """
        auto = resume == "auto"
        if dist.rank() == 0:
            if auto:
                resume = recipe.output.dir is not None and RunLayout(Path(recipe.output.dir)).recipe_file.is_file()
            path, problem = cls._decide(recipe, resume, auto=auto)
            decision = {"path": str(path) if path else None, "problem": problem, "resuming": bool(resume)}
        else:
            decision = None
        decision = dist.broadcast_object(decision)
        if decision["problem"]:
            raise TurnctlError(decision["problem"])
        run = cls(Path(decision["path"]), recipe)
        run.resuming = decision["resuming"]
        if run.resuming and auto and dist.rank() == 0:
            log.info("--resume auto: %s holds this run; continuing it", run.path)
        # Collective: a tracker that cannot start (a server unreachable) stops every rank now.
        dist.run_on_main(run.trackers.start, what="starting the experiment trackers (output.report_to)")
        dist.barrier()
        return run

    @staticmethod
    def _decide(recipe: Recipe, resume: bool, *, auto: bool = False):
        """(path, None) with the run directory created and recipe.yaml written, or (path, problem)."""
        problem = missing_trackers(recipe.output)  # before anything is created, as HF Trainer does
        if problem:
            return None, problem
        if recipe.output.dir:
            path = Path(recipe.output.dir)
        elif resume or auto:
            return None, f"--resume{' auto' if auto else ''} needs the run to continue: pass --out RUN_DIR"
        else:
            try:
                path = _fresh_default_dir(recipe.name)
            except OSError as exc:
                return Path("runs"), (f"runs/: cannot create the run directory there ({exc.filename or 'runs'}: "
                                      f"{exc.strerror or exc}); set output.dir or --out")
        saved = RunLayout(path).recipe_file
        try:
            if path.exists() and not path.is_dir():
                return path, (f"output.dir {path} is a file, not a directory; choose another --out "
                              "or output.dir")
            if resume:
                if not saved.is_file():
                    return path, f"--resume: {path} holds no run (no {RECIPE_FILE})"
                if _comparable(load_recipe(str(saved))) != _comparable(recipe):
                    return path, (f"--resume: the recipe differs from the one saved in {saved}; "
                                  "resume with the same recipe and --set overrides")
            elif path.exists() and any(path.iterdir()):
                if auto:
                    return path, (f"--resume auto: {path} is not empty and holds no run (no {RECIPE_FILE}); "
                                  "it is not turnctl's to use: choose another --out")
                return path, (f"run directory {path} is not empty; pass --resume to continue it or choose "
                              "another --out")
            path.mkdir(parents=True, exist_ok=True)
            resolved = recipe.model_copy(deep=True)
            resolved.output.dir = str(path)
            atomic_write_text(saved, resolved.to_yaml())
        except TurnctlError as exc:  # the saved recipe.yaml is unreadable: every rank stops, not rank 0 alone
            return path, str(exc)
        except OSError as exc:
            where = exc.filename or path
            return path, (f"run directory {path}: cannot write there ({where}: {exc.strerror or exc}); "
                          "choose another --out or output.dir")
        return path, None

    # ---- rank-0 writers ----
    def save_holdout(self, idx: np.ndarray, *, fraction: float, seed: int) -> None:
        """The train idx held out for validation by ``data.val_fraction`` (rank 0)."""
        if dist.rank() == 0:
            atomic_savez(self.holdout_file, idx=np.asarray(idx, dtype=np.int64),
                         fraction=np.float64(fraction), seed=np.int64(seed))

    def save_selection(self, epoch: int, arrays: Mapping[str, Any]) -> Path:
        """Write ``epoch``'s selection file (rank 0) with the recipe's cleanse settings inside
        (:func:`selection_arrays` says what ``arrays`` must hold); returns its path."""
        path = self.selection_file(epoch)
        if dist.rank() == 0:
            atomic_savez(path, **selection_arrays(arrays, SelectionSettings.of(self.recipe.cleanse)))
        return path

    def save_method_state(self, state: Mapping[str, Any]) -> None:
        """``method_state.pt``: what a step-1 method keeps besides its head (rank 0)."""
        if dist.rank() == 0:
            import torch

            with atomic_path(self.method_state_file) as tmp:
                torch.save(dict(state), tmp)

    def reset_history(self, history: List[Dict[str, Any]], *, global_step: int = 0) -> None:
        """Go back to a checkpoint (resume) or to the start (a fresh step 1): ``history`` are the epoch
        lines the checkpoint carries, ``global_step`` its optimizer step. metrics.jsonl is rewritten
        (atomically, once) to those lines plus its per-step lines up to ``global_step``, in the order
        they were logged, so that the resumed run appends no line twice. What the trackers got after
        the checkpoint is not sent to them again (the resumed run computes the same figures)."""
        self.history = [h for h in history if h.get("phase") != STEP_PHASE]
        if dist.rank() != 0:
            return
        kept_steps: List[Dict[str, Any]] = []
        known = {h.get("time") for h in self.history}  # a line's time identifies it (JSON keeps floats exact)
        for line in self._read_lines():
            is_step = line.get("phase") == STEP_PHASE
            if is_step and int(line.get("global_step") or 0) <= global_step:
                kept_steps.append(line)
            elif is_step or line.get("time") not in known:  # logged after the checkpoint: sent already
                phase, _, step, _ = metric_values(line)
                self._tracked_until[phase] = max(step, self._tracked_until.get(phase, step))
        lines = sorted(self.history + kept_steps, key=lambda h: h.get("time", 0.0))  # stable: ties keep order
        atomic_write_text(self.metrics_file, "".join(json.dumps(jsonable(h)) + "\n" for h in lines))
        self._synced = True

    def _read_lines(self) -> List[Dict[str, Any]]:
        """metrics.jsonl's lines (a torn or unreadable line skipped); [] when there is none."""
        try:
            text = self.metrics_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return []
        out = []
        for raw in text.split("\n")[:-1]:  # what follows the last newline is a torn line
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict):
                    out.append(line)
        return out

    def log_metrics(self, line: Dict[str, Any]) -> None:
        """Append one metrics line to metrics.jsonl and send it to the trackers (rank 0).

        Appended, not rewritten: a run logging every few steps for days must not rewrite a growing
        file per line. The file still only changes by whole lines: each line is one write, then
        fsynced, and a write that fails (a full disk) is cut back off. A process's first line is
        preceded by :meth:`reset_history` (unless the run already called it), which rewrites the
        file to what this process knows, dropping a line torn by a crash of the machine and the
        lines of an attempt that never reached a checkpoint. Epoch lines are kept in
        :attr:`history` too, per-step lines are not."""
        if dist.rank() != 0:
            return
        if not self._synced:
            self.reset_history(self.history)
        line = dict(line, time=time.time())
        if line.get("phase") != STEP_PHASE:
            self.history.append(line)
        self._append(json.dumps(jsonable(line)) + "\n")
        phase, _, step, _ = metric_values(line)
        if step > self._tracked_until.get(phase, -1):
            self.trackers.log_line(line)

    def _append(self, text: str) -> None:
        data = text.encode("utf-8")
        fd = os.open(self.metrics_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)  # no half line left behind
                raise
        finally:
            os.close(fd)

    def write_summary(self, summary: Dict[str, Any]) -> None:
        """summary.json, written last; then the trackers get it (and the label-issue CSV, when
        ``turnctl report`` wrote one into this directory) as artifacts and are closed (rank 0)."""
        if dist.rank() == 0:
            atomic_write_json(self.summary_file, summary)
            self.trackers.finish(completed=True, artifacts=[self.summary_file, self.label_issues_file])

    @property
    def label_issues_file(self) -> Path:
        """Where ``turnctl report`` writes the label issues (turnctl/report/writers.py)."""
        return self.report_dir / "label_issues.csv"
