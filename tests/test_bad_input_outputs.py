"""Issue #13, "Nothing lost": what turnctl reads must not run code or prompt, what it writes must not
be left half-written, what it deletes must be its own, and names that are not UTF-8 must not break a
report. Each test plants the bad input and checks what the user sees."""

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from launch import REPO, cpu_env
from turnctl.cli import run as cli_run

TINY_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64)


def _export(path: Path) -> Path:
    from turnctl.models import load_backbone
    from turnctl.recipe import ModelSection

    bb = load_backbone(ModelSection(family="vit", config=TINY_VIT), num_classes=3)
    return bb.save_pretrained(path)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("turnctl: error: "), lines
    return lines[0]


def _leftover_temporaries(root: Path) -> list:
    return sorted(str(p) for p in Path(root).rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


# ---- 1. remote code never runs, nothing prompts ---------------------------------------------------

def _planted_run(tmp_path: Path, marker: Path) -> Path:
    """A run directory whose final/ export asks for custom code (auto_map, an unknown model_type)
    shipped next to it, which would touch ``marker`` if it ran."""
    run_dir = tmp_path / "run"
    final = _export(run_dir / "final")
    rec = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    rec["data"]["shards"] = str(tmp_path / "no-shards")
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(rec))
    cfg = json.loads((final / "config.json").read_text())
    cfg.update(model_type="evil_vit", auto_map={"AutoConfig": "evil.EvilConfig",
                                                "AutoModelForImageClassification": "evil.EvilModel"})
    (final / "config.json").write_text(json.dumps(cfg))
    (final / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                   "from transformers import ViTConfig as EvilConfig\n")
    return run_dir


def test_eval_of_a_run_asking_for_remote_code_is_refused_without_a_prompt(tmp_path):
    marker = tmp_path / "pwned"
    run_dir = _planted_run(tmp_path, marker)
    res = subprocess.run([sys.executable, "-m", "turnctl", "eval", "--checkpoint", str(run_dir)], cwd=str(REPO),
                         env=cpu_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert res.returncode == 2, res.stderr[-3000:]
    # nothing asked (DeepSpeed's own "op built successfully" may be there)
    assert "custom code" not in res.stdout and "[y/N]" not in res.stdout, res.stdout
    line = _one_error_line(res.stderr)
    assert str(run_dir / "final" / "config.json") in line and "'auto_map'" in line, line
    assert not marker.exists()


def test_unknown_model_type_and_auto_map_are_refused_naming_the_key(tmp_path, capsys):
    from turnctl.models import ModelError, load_backbone
    from turnctl.recipe import ModelSection

    final = _export(tmp_path / "x")
    capsys.readouterr()  # the export's own log line is not what this test reads
    cfg = json.loads((final / "config.json").read_text())
    # An unknown model_type alone (no auto_map): transformers would look for custom code.
    (final / "config.json").write_text(json.dumps({**cfg, "model_type": "evil_vit"}))
    assert cli_run(["eval", "--checkpoint", str(final)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(final / "config.json") in line and "'model_type'" in line and "evil_vit" in line, line
    # auto_map on a known model_type: refused too, also when training from the directory.
    (final / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "evil.EvilModel"}}))
    for family in ("vit", "auto"):
        with pytest.raises(ModelError, match="'auto_map'") as exc:
            load_backbone(ModelSection(family=family, name_or_path=str(final)), num_classes=3)
        assert str(final / "config.json") in str(exc.value) and "\n" not in str(exc.value)


def test_every_transformers_load_passes_trust_remote_code_false():
    """The audit, kept true: every from_pretrained / from_config call in turnctl passes
    trust_remote_code=False, directly or in the **kwargs it is given."""
    import ast

    calls = 0
    for path in sorted((REPO / "turnctl").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            said = any(isinstance(k, ast.keyword) and k.arg == "trust_remote_code" and
                       isinstance(k.value, ast.Constant) and k.value.value is False for k in ast.walk(fn))
            for call in ast.walk(fn):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and \
                        call.func.attr in ("from_pretrained", "from_config"):
                    calls += 1
                    direct = any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant)
                                 and k.value.value is False for k in call.keywords)
                    spread = any(k.arg is None for k in call.keywords)
                    assert direct or (spread and said), f"{path.name}:{call.lineno}: no trust_remote_code=False"
    assert calls >= 3


# ---- 2. a full disk while writing an export or a checkpoint -------------------------------------

def _no_space(*_a, **_k):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _flush_fails(self, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")  # what a failed flush raises: no filename


@pytest.mark.parametrize("where", ["safetensors", "write_text"])
def test_export_on_a_full_disk_leaves_no_temporary_and_names_the_path(tmp_path, monkeypatch, where):
    import pathlib

    import safetensors.torch

    best = _export(tmp_path / "run" / "best")
    before = {p.name: p.read_bytes() for p in best.iterdir()}
    if where == "safetensors":  # head.safetensors, after transformers wrote config + weights
        monkeypatch.setattr(safetensors.torch, "save_file", _no_space)
    else:
        monkeypatch.setattr(pathlib.Path, "write_text", _flush_fails)
    with pytest.raises(OSError) as exc:
        _export(best)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(best), exc.value
    assert _leftover_temporaries(tmp_path) == []
    assert {p.name: p.read_bytes() for p in best.iterdir()} == before  # the previous export is intact


class _FakeEngine:
    """DeepSpeed's save as far as files go: torch.save of each rank file into root/tag."""

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.zeros(4)}, **client_state}, d / "mp_rank_00_model_states.pt")
        torch.save({"optimizer": {}}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        self.tuner.global_step += 1  # as training would have stepped before the next checkpoint


def _tuner():
    from turnctl.finetune import FineTuner

    tuner = object.__new__(FineTuner)  # the checkpoint files, without building an engine
    tuner.engine, tuner.global_step, tuner.world = _FakeEngine(), 7, 1
    tuner.engine.tuner = tuner
    tuner.ds_config = {"zero_optimization": {"stage": 2}}
    return tuner


def _torch_save_hits_full_disk(real):
    def save(obj, f, *a, **k):
        if str(f).endswith("_optim_states.pt"):
            Path(f).write_bytes(b"PK\x03\x04 half")  # torch's zip writer has written part of it
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10240 vs 10134")
        return real(obj, f, *a, **k)
    return save


def test_checkpoint_on_a_full_disk_removes_the_partial_tag_and_names_it(tmp_path, monkeypatch):
    import turnctl.models.exportdir as exportdir
    import turnctl.rundir as rundir
    from turnctl.finetune import check_resumable

    root = tmp_path / "checkpoints"
    tuner = _tuner()
    tuner.save_checkpoint(root, tag="epoch_0000", client_state={}, keep=3)
    monkeypatch.setattr(torch, "save", _torch_save_hits_full_disk(torch.save))
    monkeypatch.setattr(exportdir, "_nearly_full", lambda path: True, raising=False)  # the disk after such a write
    with pytest.raises(OSError) as exc:
        tuner.save_checkpoint(root, tag="epoch_0001", client_state={}, keep=3)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(root / "epoch_0001")
    assert "unexpected pos" in str(exc.value.__cause__)
    assert not (root / "epoch_0001").exists() and _leftover_temporaries(root) == []
    assert check_resumable(root, world_size=1) == "epoch_0000"  # the last good one is still what resumes
    monkeypatch.undo()

    # latest cannot be written: its temporary goes, the error names it, latest still names the old tag
    real = rundir.atomic_write_text

    def latest_fails(path, text):
        if Path(path).name != "latest":
            return real(path, text)
        Path(path).with_name(f".latest.tmp-{os.getpid()}").write_text("")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "atomic_write_text", latest_fails)
    with pytest.raises(OSError) as exc:
        tuner.save_checkpoint(root, tag="epoch_0002", client_state={}, keep=3)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(root / "latest")
    assert _leftover_temporaries(root) == [] and check_resumable(root, world_size=1) == "epoch_0000"


# ---- 3. turnctl deletes only what it wrote -------------------------------------------------------

def _user_data(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "sub").mkdir()
    (path / "sub" / "data.csv").write_text("1,2,3")
    return path


def _files(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_checkpoint_rotation_never_follows_a_link_nor_deletes_a_foreign_directory(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    victim = _user_data(tmp_path / "home" / "user" / "data")
    (victim / "COMPLETE").write_text(json.dumps({"global_step": 0}))  # even one that looks like a tag
    want = _files(victim)
    tuner = _tuner()
    tuner.save_checkpoint(root, tag="epoch_0000", client_state={}, keep=1)
    (root / "global_step5").symlink_to(victim, target_is_directory=True)
    (root / "epoch_0003").symlink_to(victim, target_is_directory=True)
    foreign = _user_data(root / "my_notes")
    lookalike = root / "epoch_0009"  # a tag's name, but holding what turnctl never writes there
    _user_data(lookalike)
    half = root / "epoch_0004"  # a half-written tag of a killed run: turnctl's, removed
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"half")
    tuner.save_checkpoint(root, tag="epoch_0001", client_state={}, keep=1)
    tuner.save_checkpoint(root, tag="epoch_0002", client_state={}, keep=1)

    assert _files(victim) == want
    assert (root / "global_step5").is_symlink() and (root / "epoch_0003").is_symlink()
    assert (foreign / "thesis.tex").read_text() == "years of work"
    assert (foreign / "sub" / "data.csv").read_text() == "1,2,3"
    assert (lookalike / "thesis.tex").read_text() == "years of work"
    assert not half.exists()
    assert not (root / "epoch_0000").exists() and not (root / "epoch_0001").exists()  # rotated: keep=1
    assert (root / "epoch_0002" / "COMPLETE").is_file() and (root / "latest").read_text() == "epoch_0002"


def test_an_export_replaces_only_an_export_turnctl_wrote(tmp_path, capsys):
    from turnctl.models import ModelError

    victim = _user_data(tmp_path / "home" / "data")
    want = _files(victim)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "best").symlink_to(victim, target_is_directory=True)
    with pytest.raises(ModelError, match="symbolic link") as exc:
        _export(run_dir / "best")
    assert str(run_dir / "best") in str(exc.value)
    assert _files(victim) == want and (run_dir / "best").is_symlink()

    foreign = _user_data(run_dir / "final")  # the user's own directory of that name
    with pytest.raises(ModelError, match="not a turnctl export"):
        _export(foreign)
    assert (foreign / "thesis.tex").read_text() == "years of work"

    ours = _export(run_dir / "mine")
    (ours / "notes.txt").write_text("mine")  # an export the user added a file to
    with pytest.raises(ModelError, match="'notes.txt'"):
        _export(ours)
    assert (ours / "notes.txt").read_text() == "mine"
    (ours / "notes.txt").unlink()
    _export(ours)  # an export turnctl wrote is replaced as before
    assert (ours / "turnctl.json").is_file() and _leftover_temporaries(run_dir) == []


# ---- 4. names that are not UTF-8 -----------------------------------------------------------------

def test_report_on_an_imagefolder_with_latin1_file_names(tmp_path, capsys):
    """prepare -> shards whose keys and class names carry bytes that are not UTF-8 -> report: CSVs,
    table and JSON are written, the names escaped as \\xNN; the run directory's name too."""
    from PIL import Image

    from turnctl.report.keys import _read_idx_members
    from turnctl.data import open_split

    rng = np.random.default_rng(0)
    root = os.fsencode(tmp_path / "folder")
    for cls in (b"caf\xe9", b"dog"):
        for name in (b"na\xefve.jpg", b"plain.jpg"):
            path = os.path.join(root, b"train", cls, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(os.fsdecode(path), "JPEG")
    shards = str(tmp_path / "shards")  # prepare itself prints its --out: a plain name here
    assert cli_run(["prepare", "imagefolder", "--root", os.fsdecode(root), "--out", shards]) == 0
    capsys.readouterr()
    info = open_split(shards, "train")
    assert info.class_names[0] == os.fsdecode(b"caf\xe9")
    _, given = _read_idx_members(info)

    run_dir = Path(os.fsdecode(os.fsencode(tmp_path) + b"/r\xfcn"))
    rec = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    rec.update(name="latin1", method="turn")
    rec["data"]["shards"] = shards
    (run_dir / "selection").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(rec))
    prob = np.array([0.1, 0.9, 0.2, 0.95], np.float32)
    np.savez(run_dir / "selection" / "epoch_0.npz", idx=np.arange(4), loss=np.linspace(0, 1, 4).astype(np.float32),
             clean_prob=prob, selected=prob > 0.6, keep=prob > 0.6, given=given, clean=np.full(4, -1), pred=given,
             ok=np.ones(4, bool), means=np.array([[0.1, 0.8]] * 2), variances=np.array([[0.01, 0.02]] * 2),
             weights=np.array([[0.5, 0.5]] * 2))

    assert cli_run(["report", str(run_dir), "--json", "--top", "4"]) == 0
    cap = capsys.readouterr()
    assert "internal error" not in cap.err
    issues = (run_dir / "report" / "label_issues.csv").read_text(encoding="utf-8")
    assert "train_caf\\xe9_na\\xefve_jpg" in issues and "train_dog_plain_jpg" in issues
    assert "caf\\xe9" in (run_dir / "report" / "per_class.csv").read_text(encoding="utf-8")
    assert "caf\\xe9" in cap.out and "r\\xfcn" in cap.out  # the table and the paths, escaped
    s = json.loads(cap.out.strip().splitlines()[-1])
    assert s["keys"] is True and s["per_class"][0]["name"] == "caf\\xe9"
    assert len(s["top"]) == 2 and all(t["key"] in issues for t in s["top"])
    assert s["run_dir"] == str(run_dir)  # JSON keeps the real path (os.fsencode gives its bytes back)


# ---- 5. a DeepSpeed JIT-build lock left by a killed build ---------------------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def turnctl_log():
    handler = _Records()
    logger = logging.getLogger("turnctl")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def _lock(root: Path, name: str, age_s: float) -> Path:
    lock = root / name / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    t = lock.stat().st_mtime - age_s
    os.utime(lock, (t, t))
    return lock


def test_a_stale_deepspeed_build_lock_is_removed_with_one_line(tmp_path, monkeypatch, turnctl_log):
    from turnctl.distributed import check_extension_locks, extension_build_roots

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extension_build_roots() == [str(tmp_path)]
    stale = _lock(tmp_path, "deepspeed_shm_comm", 3600)
    other = _lock(tmp_path, "someone_elses_ext", 3600)  # not DeepSpeed's: not ours to judge
    full = _lock(tmp_path, "deepspeed_ccl_comm", 3600)
    full.write_text("not the empty file torch makes")
    os.utime(full, (0, 0))
    assert check_extension_locks() == [str(stale)]
    assert not stale.exists() and other.exists() and full.exists()
    assert len(turnctl_log) == 1 and str(stale) in turnctl_log[0] and "\n" not in turnctl_log[0]
    # The threshold comes from TURNCTL_EXT_LOCK_STALE_S.
    young = _lock(tmp_path, "deepspeed_shm_comm", 60)
    monkeypatch.setenv("TURNCTL_EXT_LOCK_STALE_S", "30")
    assert check_extension_locks() == [str(young)]


def test_a_fresh_build_lock_is_left_alone_with_a_notice(tmp_path, monkeypatch, turnctl_log):
    from turnctl.distributed import check_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    fresh = _lock(tmp_path, "deepspeed_shm_comm", 5)
    assert check_extension_locks() == []
    assert fresh.exists()
    assert len(turnctl_log) == 1 and turnctl_log[0].startswith(f"waiting for {fresh} (another build in progress")


def test_init_distributed_clears_a_stale_lock_before_deepspeed_starts(tmp_path, monkeypatch):
    import deepspeed

    from turnctl import distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group of another test is alive in this process")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)  # restored afterwards: init_distributed sets them otherwise
    stale = _lock(tmp_path, "deepspeed_shm_comm", 3600)
    seen = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.append(stale.exists()))
    dist.init_distributed(1.0)
    assert seen == [False]
