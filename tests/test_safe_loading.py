"""Safe loading everywhere (issue #8, item 4): a malicious pickle planted at every entry point.

Every test plants :class:`Payload` (unpickled, it runs ``touch MARKER``) where turnctl reads a file,
then checks that the read is refused with one line naming the file and that MARKER does not exist,
i.e. no code from the file ran. ``test_the_payload_runs_when_unpickled`` shows the payload is live.
"""

import io
import logging
import os
import pickle
import re
import shutil
import tarfile
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import REPO, check, run, turnctl_cmd
from turnctl.cli import run as cli_run
from turnctl.errors import TurnctlError

NUM_CLASSES = 4
TINY_VIT = dict(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32)


class Payload:
    """Unpickling this object runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def evil_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"state": Payload(marker)}))
    return path


def evil_torch(path: Path, marker: Path, *, legacy: bool = False) -> Path:
    """A ``torch.save`` archive (or the legacy non-zip format) whose pickle holds the payload."""
    torch.save({"module": {"w": torch.zeros(2)}, "state": Payload(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def refused(text: str, *names: str) -> str:
    """The CLI error: the last thing on stderr, exactly one line, naming every one of ``names``."""
    assert "turnctl: error: " in text, text[-3000:]
    line = text[text.rindex("turnctl: error: "):].strip()
    assert "\n" not in line, f"error is not one line: {line!r}"
    for name in names:
        assert name in line, (name, line)
    return line


def one_line(exc: BaseException, *names: str) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


def test_the_payload_runs_when_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# ---- recipes -----------------------------------------------------------------------------------

def test_recipe_yaml_with_a_python_tag_is_refused(tmp_path):
    from turnctl.errors import RecipeError
    from turnctl.recipe import load_recipe

    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.system [\"touch '{marker}'\"]"
    path = tmp_path / "evil.yaml"
    path.write_text((REPO / "recipes" / "tiny.yaml").read_text().replace("method: turn", f"method: {tag}"))
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    one_line(err.value, "evil.yaml", "python/object/apply:os.system")
    # --set values go through yaml.safe_load too: the tag is kept as a string, then fails validation
    with pytest.raises(RecipeError):
        load_recipe("tiny", [f"seed={tag}"])
    assert not marker.exists()


# ---- raw datasets (prepare) ----------------------------------------------------------------------

def test_cifar_pickles_and_cifar_n_label_files_are_refused(tmp_path):
    from turnctl.errors import DataError
    from turnctl.safeload import load_pickle_file, load_torch_file

    marker = tmp_path / "pwned"
    cases = [(load_pickle_file, evil_pickle(tmp_path / "data_batch_1", marker)),
             (load_torch_file, evil_torch(tmp_path / "CIFAR-10_human.pt", marker)),
             (load_torch_file, evil_torch(tmp_path / "legacy_human.pt", marker, legacy=True)),
             (load_torch_file, evil_pickle(tmp_path / "plain_human.pt", marker))]
    for load, path in cases:
        with pytest.raises(DataError) as err:
            load(path)
        one_line(err.value, str(path))
        assert "system" in str(err.value) or "opcode" in str(err.value), err.value
    assert not marker.exists()


# ---- shard members -------------------------------------------------------------------------------

def test_shard_members_are_never_unpickled(tmp_path):
    from shardgen import write_toy_shards

    from turnctl import data as S

    marker = tmp_path / "pwned"
    toy = write_toy_shards(tmp_path / "toy", counts={"train": [6]}, num_classes=2, seed=1)
    tar_path = toy.root / "train-000000.tar"
    with tarfile.open(tar_path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    evil = pickle.dumps(Payload(marker))
    keys = sorted({name.split(".", 1)[0] for name, _ in members})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for key in keys:
            for name, data in members:
                if name.split(".", 1)[0] == key:
                    # the first sample's label is a pickle too: it is parsed as ASCII or rejected
                    data = evil if (key == keys[0] and name.endswith(".cls") and "clean" not in name) else data
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
            for ext in ("pyd", "pickle", "pth", "pt"):  # members webdataset's default decoders unpickle
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(evil)
                tf.addfile(ti, io.BytesIO(evil))
    info = S.open_split(toy.root, "train")  # before the swap: its byte count no longer matches the manifest
    tar_path.write_bytes(buf.getvalue())
    rows = list(S.exact_loader(info, transform=S.ToTensorResize(8), batch_size=4, rank=0, world_size=1))
    idx = torch.cat([b["idx"] for b in rows])
    ok = torch.cat([b["ok"] for b in rows])
    real = idx >= 0
    assert sorted(idx[real].tolist()) == list(range(6))
    assert ok[real].sum().item() == 5  # the sample whose label is a pickle: ok=False, not unpickled
    ld = S.train_loader(info, transform=S.ToTensorResize(8), batch_size=1, epoch=0, seed=0, rank=0,
                        world_size=1, num_workers=0, shuffle_buffer=0, steps=5)
    seen = sorted(int(i) for b in ld for i in b["idx"])
    assert 0 not in seen and ld.stats()["corrupt"] >= 1
    assert not marker.exists()


# ---- exports, weights files, feature cache ------------------------------------------------------

def _tiny_backbone(num_classes=3):
    from turnctl.models import load_backbone
    from turnctl.recipe import ModelSection

    return load_backbone(ModelSection(family="vit", config=TINY_VIT), num_classes=num_classes)


def test_exports_and_weight_files_are_refused(tmp_path, capsys):
    from turnctl.models import ModelError, load_backbone
    from turnctl.models.efficientnet import read_state_dict
    from turnctl.recipe import ModelSection

    marker = tmp_path / "pwned"
    export = _tiny_backbone().save_pretrained(tmp_path / "final")

    # turnctl eval --checkpoint DIR: a pickle named head.safetensors is not safetensors
    head = tmp_path / "bad_head"
    shutil.copytree(export, head)
    evil_pickle(head / "head.safetensors", marker)
    assert cli_run(["eval", "--checkpoint", str(head)]) == 2
    refused(capsys.readouterr().err, str(head / "head.safetensors"))

    # ... and an export whose weights are a pytorch_model.bin pickle instead of model.safetensors
    binary = tmp_path / "bin_export"
    shutil.copytree(export, binary)
    (binary / "model.safetensors").unlink()
    evil_torch(binary / "pytorch_model.bin", marker)
    assert cli_run(["eval", "--checkpoint", str(binary)]) == 2
    refused(capsys.readouterr().err, str(binary), "pytorch_model.bin", "safetensors only")

    # model.name_or_path=DIR (not an export): transformers reads the .bin with weights_only=True
    plain = tmp_path / "hf_dir"
    _tiny_backbone().model.save_pretrained(plain)
    (plain / "model.safetensors").unlink()
    evil_torch(plain / "pytorch_model.bin", marker)
    with pytest.raises(ModelError) as err:
        load_backbone(ModelSection(family="vit", name_or_path=str(plain)), num_classes=3, local_files_only=True)
    one_line(err.value, str(plain), "posix.system")

    # a .pth weights file (EfficientNet families)
    pth = evil_torch(tmp_path / "weights.pth", marker)
    with pytest.raises(ModelError) as err:
        read_state_dict(str(pth))
    one_line(err.value, str(pth), "posix.system")
    assert not marker.exists()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_feature_cache_pickle_is_refused_and_replaced(tmp_path):
    from shardgen import write_toy_shards
    from safetensors import safe_open

    from turnctl import features as F
    from turnctl.data import open_split
    from turnctl.transforms import eval_transform

    marker = tmp_path / "pwned"
    toy = write_toy_shards(tmp_path / "toy", counts={"train": [8]}, num_classes=3, seed=2)
    info = open_split(toy.root, "train")
    bb = _tiny_backbone()
    identity = {"test": "safe-loading"}
    path = tmp_path / "cache" / F.cache_key(identity, bb.preprocess, info) / "train.safetensors"
    path.parent.mkdir(parents=True)
    evil_torch(path, marker)  # a zip pickle, the format a careless cache writer would use
    records = _Records()
    F.log.addHandler(records)
    try:
        fs = F.extract_features(bb, info, model_identity=identity, transform=eval_transform(bb.preprocess),
                                batch_size=8, num_workers=0, cache_dir=tmp_path / "cache")
    finally:
        F.log.removeHandler(records)
    assert not fs.from_cache and fs.num_samples == 8  # refused, so re-extracted ...
    assert any(str(path) in line and "unreadable" in line for line in records.lines), records.lines
    with safe_open(str(path), framework="pt") as f:  # ... and the planted file replaced by safetensors
        assert set(f.keys()) == {"features", "labels", "clean", "ok"}
    assert not marker.exists()


def test_elr_targets_are_refused(tmp_path):
    from turnctl.methods.fft_losses import ELR_FILE, SyncedELR

    marker = tmp_path / "pwned"
    elr = SyncedELR(10, 3, beta=0.7, lam=3.0)
    elr.save(tmp_path / "good")
    elr.load(tmp_path / "good")  # the legitimate file still loads
    (tmp_path / "bad").mkdir()
    evil_torch(tmp_path / "bad" / ELR_FILE, marker)
    with pytest.raises(TurnctlError) as err:
        elr.load(tmp_path / "bad")
    one_line(err.value, str(tmp_path / "bad" / ELR_FILE), "posix.system")
    assert not marker.exists()


# ---- a real run: DeepSpeed checkpoints, zero_to_fp32, selections, run recipe ---------------------

TRAIN_ARGS = ["--recipe", "tiny", "--set", "data.num_workers=0", "--set", "deepspeed.zero_stage=2"]
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """One single-process ZeRO-2 TURN run stopped after its first epoch (checkpoint, selection)."""
    from shardgen import write_toy_shards

    base = tmp_path_factory.mktemp("safe")
    shards = base / "shards"
    write_toy_shards(shards, counts={"train": [40], "val": [8], "test": [8]}, num_classes=NUM_CLASSES,
                     image_size=16, seed=0, noise_rate=0.4)
    out = base / "run"
    check(run(turnctl_cmd(["train", *TRAIN_ARGS, "--shards", str(shards), "--out", str(out),
                           "--stop-after", "0"]), timeout=240))
    assert (out / "checkpoints" / "epoch_0000" / MODEL_STATES).is_file()
    assert (out / "checkpoints" / "epoch_0000" / OPTIM_STATES).is_file()
    return shards, out


def _copy_run(stopped_run, dst: Path) -> Path:
    shutil.copytree(stopped_run[1], dst)
    return dst


def _resume(stopped_run, out: Path):
    return run(turnctl_cmd(["train", *TRAIN_ARGS, "--shards", str(stopped_run[0]), "--out", str(out),
                            "--resume"]), timeout=180)


def test_turnctl_checkpoints_load_with_the_allowlist(stopped_run):
    """The legitimate files pass weights_only=True with exactly the DeepSpeed classes allowed."""
    from deepspeed.utils import zero_to_fp32

    from turnctl.safeload import load_deepspeed_file, safe_zero_to_fp32

    tag = stopped_run[1] / "checkpoints" / "epoch_0000"
    for name in (MODEL_STATES, OPTIM_STATES):
        assert isinstance(load_deepspeed_file(tag / name, "cpu"), dict)
    with safe_zero_to_fp32() as z:
        state = z.get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    assert zero_to_fp32.torch is torch  # the rebinding does not outlive the block
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.mark.parametrize("name", [MODEL_STATES, OPTIM_STATES])
def test_resume_refuses_a_planted_deepspeed_file(stopped_run, tmp_path, name):
    marker = tmp_path / "pwned"
    out = _copy_run(stopped_run, tmp_path / "run")
    planted = evil_torch(out / "checkpoints" / "epoch_0000" / name, marker)
    res = _resume(stopped_run, out)
    assert res.returncode == 2, res.stderr[-3000:]
    refused(res.stderr, str(planted), "posix.system", "weights_only=True")
    assert not marker.exists()


def test_eval_refuses_a_planted_deepspeed_file(stopped_run, tmp_path, capsys):
    """``turnctl eval --checkpoint RUN/checkpoints`` consolidates with zero_to_fp32: guarded too."""
    marker = tmp_path / "pwned"
    out = _copy_run(stopped_run, tmp_path / "run")
    planted = evil_torch(out / "checkpoints" / "epoch_0000" / OPTIM_STATES, marker)
    assert cli_run(["eval", "--checkpoint", str(out / "checkpoints")]) == 2
    refused(capsys.readouterr().err, str(planted), "posix.system")
    assert not marker.exists()


def test_report_refuses_planted_selection_and_recipe(stopped_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    out = _copy_run(stopped_run, tmp_path / "run")
    npz = out / "selection" / "epoch_0.npz"
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    # an object array inside the npz (np.save pickles it) ...
    np.savez(npz, **{**arrays, "idx": np.array([Payload(marker)] * len(arrays["idx"]), dtype=object)})
    assert cli_run(["report", str(out)]) == 2
    refused(capsys.readouterr().err, str(npz), "allow_pickle=False")
    # ... and a bare pickle under the npz name
    evil_pickle(npz, marker)
    assert cli_run(["report", str(out)]) == 2
    refused(capsys.readouterr().err, str(npz), "pickled")
    # the run's recipe.yaml is read with yaml.safe_load
    (out / "recipe.yaml").write_text(f"method: !!python/object/apply:os.system [\"touch '{marker}'\"]\n")
    assert cli_run(["report", str(out)]) == 2
    refused(capsys.readouterr().err, str(out / "recipe.yaml"), "python/object/apply:os.system")
    assert not marker.exists()


def test_legitimate_resume_still_works(stopped_run, tmp_path):
    out = _copy_run(stopped_run, tmp_path / "run")
    res = check(_resume(stopped_run, out))
    assert "resumed from" in res.stderr
    assert (out / "checkpoints" / "epoch_0001").is_dir() and (out / "final" / "model.safetensors").is_file()


# ---- the audit, kept true ------------------------------------------------------------------------

def _code_only(path: Path) -> list:
    """The source lines of ``path`` with strings and comments blanked (docstrings may name what
    they refuse)."""
    text = path.read_text()
    lines = [list(line) for line in text.splitlines(keepends=True)]
    blank = {tokenize.STRING, tokenize.COMMENT, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in blank:
            (sr, sc), (er, ec) = tok.start, tok.end
            for r in range(sr, er + 1):
                row = lines[r - 1]
                for i in range(sc if r == sr else 0, ec if r == er else len(row)):
                    if row[i] != "\n":
                        row[i] = " "
    return ["".join(row) for row in lines]


def test_no_unsafe_deserialisation_in_the_source():
    """Only turnctl/safeload.py unpickles; nothing asks for pickle or YAML tags anywhere."""
    banned = re.compile(r"weights_only\s*=\s*False|allow_pickle\s*=\s*True|"
                        r"yaml\.(?:load|full_load|unsafe_load|load_all)\s*\(|yaml\.(?:Unsafe|Full)?Loader\b")
    unpickles = re.compile(r"torch\.load\s*\(|pickle\.loads?\s*\(|Unpickler\b|np\.load\s*\(")
    problems = []
    for path in sorted((REPO / "turnctl").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for n, code in enumerate(_code_only(path), 1):
            if banned.search(code) or (unpickles.search(code) and rel != "turnctl/safeload.py"
                                       and "allow_pickle=False" not in code):
                problems.append(f"{rel}:{n}: {code.strip()}")
    assert not problems, "\n".join(problems)
