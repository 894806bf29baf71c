"""`turnctl prepare`: miniature trees in every official layout -> shards, checked sample by sample.

Each tree is a few tiny images written in the layout the real dataset ships in (CIFAR python and
binary, Clothing1M annotations, WebVision info lists, ImageFolder, Fashion-MNIST IDX gz, CIFAR-N
.pt), so the readers, the noise, the shard format (docs/ARCHITECTURE.md) and the error messages
are all exercised without any download.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from turnctl.cli import run
from turnctl.errors import DataError
from turnctl.prepare import default_root, prepare_dataset
from turnctl.prepare import writer as writer_mod

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# -- helpers --------------------------------------------------------------------------------------

def prepare(*args: str) -> int:
    return run(["prepare", *args])


def error_line(capsys) -> str:
    """The CLI's error: must be the last thing on stderr, and exactly one line."""
    err = capsys.readouterr().err
    assert "turnctl: error: " in err, err
    tail = err[err.index("turnctl: error: "):].strip()
    assert "\n" not in tail, f"error is not one line: {tail!r}"
    return tail


def read_split(out: Path, split: str) -> List[Dict[str, bytes]]:
    """Samples of a split in shard order, grouped by key, straight from the tar files."""
    sizes = json.loads((out / "sizes.json").read_text())
    samples: List[Dict[str, bytes]] = []
    for name in sorted(n for n in sizes if n.startswith(f"{split}-")):
        with tarfile.open(out / name) as tf:
            members = tf.getmembers()
            for m in members:
                assert m.mtime == 0 and m.uid == 0 and m.uname == ""  # deterministic headers
                key, ext = m.name.split(".", 1)
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key, "__shard__": name})
                samples[-1][ext] = tf.extractfile(m).read()
        assert sum(1 for s in samples if s["__shard__"] == name) == sizes[name]
    return samples


def ints(samples, field: str) -> np.ndarray:
    return np.array([int(s[field]) if field in s else -1 for s in samples])


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def shard_hashes(out: Path) -> Dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def jpeg(rng: np.random.Generator, w: int = 12, h: int = 10) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# -- CIFAR trees ----------------------------------------------------------------------------------

def numpy1_pickle(obj) -> bytes:
    # The official files are numpy-1 era pickles: their GLOBALs name numpy.core.multiarray.
    return pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def cifar_arrays(num_classes: int, n_train: int, n_test: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n_train + n_test, 32, 32, 3), dtype=np.uint8)
    y = np.concatenate([rng.permutation(np.arange(n_train) % num_classes),
                        rng.permutation(np.arange(n_test) % num_classes)]).astype(np.int64)
    coarse_of = np.random.default_rng(99).permutation(100) // 5  # not the index blocks
    return {"train_x": x[:n_train], "train_y": y[:n_train], "test_x": x[n_train:], "test_y": y[n_train:],
            "coarse_of": coarse_of}


def flat(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 3, 1, 2).reshape(len(x), 3072)


def write_cifar10(root: Path, layout: str, a) -> Path:
    chunks = np.array_split(np.arange(len(a["train_y"])), 5)
    if layout == "python":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for i, idx in enumerate(chunks, 1):
            batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": a["train_y"][idx].tolist(),
                     b"data": flat(a["train_x"][idx]), b"filenames": [b"f.png"] * len(idx)}
            (d / f"data_batch_{i}").write_bytes(numpy1_pickle(batch))
        (d / "test_batch").write_bytes(numpy1_pickle({b"labels": a["test_y"].tolist(), b"data": flat(a["test_x"])}))
        (d / "batches.meta").write_bytes(numpy1_pickle({b"label_names": [n.encode() for n in CIFAR10_NAMES]}))
    else:
        d = root / "cifar-10-batches-bin"
        d.mkdir(parents=True)
        rec = lambda x, y: np.concatenate([y[:, None].astype(np.uint8), flat(x)], axis=1).tobytes()  # noqa: E731
        for i, idx in enumerate(chunks, 1):
            (d / f"data_batch_{i}.bin").write_bytes(rec(a["train_x"][idx], a["train_y"][idx]))
        (d / "test_batch.bin").write_bytes(rec(a["test_x"], a["test_y"]))
        (d / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    return root


def write_cifar100(root: Path, layout: str, a) -> Path:
    cof = a["coarse_of"]
    fine_names = [f"fine{i}" for i in range(100)]
    coarse_names = [f"super{i}" for i in range(20)]
    if layout == "python":
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        for split in ("train", "test"):
            y = a[f"{split}_y"]
            (d / split).write_bytes(numpy1_pickle({b"fine_labels": y.tolist(), b"coarse_labels": cof[y].tolist(),
                                                   b"data": flat(a[f"{split}_x"])}))
        (d / "meta").write_bytes(numpy1_pickle({b"fine_label_names": [n.encode() for n in fine_names],
                                                b"coarse_label_names": [n.encode() for n in coarse_names]}))
    else:
        d = root / "cifar-100-binary"
        d.mkdir(parents=True)
        for split in ("train", "test"):
            y = a[f"{split}_y"]
            rec = np.concatenate([cof[y][:, None], y[:, None], flat(a[f"{split}_x"])], axis=1).astype(np.uint8)
            (d / f"{split}.bin").write_bytes(rec.tobytes())
        (d / "fine_label_names.txt").write_text("\n".join(fine_names) + "\n")
        (d / "coarse_label_names.txt").write_text("\n".join(coarse_names) + "\n")
    return root


@pytest.fixture(scope="module")
def c10(tmp_path_factory):
    a = cifar_arrays(10, 100, 20)
    base = tmp_path_factory.mktemp("c10")
    return {"a": a, "py": write_cifar10(base / "py", "python", a), "bin": write_cifar10(base / "bin", "binary", a)}


@pytest.fixture(scope="module")
def c100(tmp_path_factory):
    a = cifar_arrays(100, 400, 100, seed=1)
    base = tmp_path_factory.mktemp("c100")
    return {"a": a, "py": write_cifar100(base / "py", "python", a), "bin": write_cifar100(base / "bin", "binary", a)}


def position(key: str) -> int:
    return int(key.split("_")[1])


# -- CIFAR ----------------------------------------------------------------------------------------

def test_cifar10_python_layout_splits_keys_labels_images(c10, tmp_path):
    a, out = c10["a"], tmp_path / "out"
    r = prepare_dataset("cifar10", root=c10["py"], out=out, shard_size=40, workers=1)
    m = manifest(out)
    assert r["out"] == str(out) and m["format"] == "turnctl-shards/1" and m["class_names"] == CIFAR10_NAMES
    # the paper's 95% / 5% split of the official training set, stratified; 5 val of 100 here
    counts = {s: m["splits"][s]["count"] for s in ("train", "val", "test")}
    assert counts == {"train": 95, "val": 5, "test": 20}
    assert m["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert json.loads((out / "sizes.json").read_text())["train-000002.tar"] == 15  # last shard short
    seen_positions = []
    for split, x, y in (("train", a["train_x"], a["train_y"]), ("val", a["train_x"], a["train_y"]),
                        ("test", a["test_x"], a["test_y"])):
        samples = read_split(out, split)
        assert ints(samples, "idx").tolist() == list(range(counts[split]))  # idx 0..N-1 in order
        pos = [position(s["__key__"]) for s in samples]
        assert all(s["__key__"].startswith("test_" if split == "test" else "train_") for s in samples)
        assert np.array_equal(ints(samples, "cls"), y[pos]) and np.array_equal(ints(samples, "clean.cls"), y[pos])
        for s, p in zip(samples[:7], pos[:7]):
            assert np.array_equal(decode(s["png"]), x[p])  # PNG round-trips the exact pixels
        if split != "test":
            seen_positions += pos
    assert sorted(seen_positions) == list(range(100))  # train + val = the official training set
    val_pos = m["sources"]["val_from_train"]["positions"]
    assert sorted(val_pos) == sorted(position(s["__key__"]) for s in read_split(out, "val"))
    assert len(set(a["train_y"][val_pos])) == 5  # stratified: five different classes
    assert m["noise"]["kind"] == "none" and m["noise"]["realised_noise_rate"] == 0.0
    for name, info in m["shards"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"]
    assert not list(tmp_path.glob("*.partial-*")) and not list(out.glob(".*"))


def test_cifar10_binary_layout_gives_byte_identical_shards(c10, tmp_path):
    prepare_dataset("cifar10", root=c10["py"], out=tmp_path / "py", noise="symmetric:0.5", workers=1)
    prepare_dataset("cifar10", root=c10["bin"], out=tmp_path / "bin", noise="symmetric:0.5", workers=1)
    assert shard_hashes(tmp_path / "py") == shard_hashes(tmp_path / "bin")
    assert manifest(tmp_path / "bin")["sources"]["layout"] == "binary"


def test_cifar10_asymmetric_flips_only_to_the_named_class(c10, tmp_path):
    assert prepare("cifar10", "--root", str(c10["py"]), "--out", str(tmp_path / "o"), "--noise", "asymmetric:0.6",
                   "--workers", "1") == 0
    target = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    flips = 0
    for split in ("train", "val"):
        s = read_split(tmp_path / "o", split)
        given, true = ints(s, "cls"), ints(s, "clean.cls")
        for g, t in zip(given, true):
            if g != t:
                assert target[t] == g
                flips += 1
    assert flips > 0
    test = read_split(tmp_path / "o", "test")
    assert np.array_equal(ints(test, "cls"), ints(test, "clean.cls"))  # test is never noised
    noise = manifest(tmp_path / "o")["noise"]
    assert noise["targets"] == [0, 1, 0, 5, 7, 3, 6, 7, 8, 1] and noise["applies_to"] == ["train", "val"]


def test_cifar100_python_binary_blocks_and_superclasses(c100, tmp_path):
    a = c100["a"]
    prepare_dataset("cifar100", root=c100["py"], out=tmp_path / "py", noise="asymmetric:0.5:superclass", workers=1)
    prepare_dataset("cifar100", root=c100["bin"], out=tmp_path / "bin", noise="asymmetric:0.5:superclass", workers=1)
    assert shard_hashes(tmp_path / "py") == shard_hashes(tmp_path / "bin")  # coarse byte first in .bin
    m = manifest(tmp_path / "py")
    assert m["num_classes"] == 100 and m["sources"]["coarse_class_names"][0] == "super0"
    assert {s: m["splits"][s]["count"] for s in ("train", "val", "test")} == {"train": 380, "val": 20, "test": 100}
    cof = a["coarse_of"]
    train = read_split(tmp_path / "py", "train")
    given, true = ints(train, "cls"), ints(train, "clean.cls")
    moved = given != true
    assert moved.sum() > 0 and np.all(cof[given[moved]] == cof[true[moved]])  # same real superclass
    assert not np.all(given[moved] // 5 == true[moved] // 5)  # ... which are not the index blocks
    prepare_dataset("cifar100", root=c100["py"], out=tmp_path / "blocks", noise="asymmetric:0.5", workers=1)
    train = read_split(tmp_path / "blocks", "train") + read_split(tmp_path / "blocks", "val")
    given, true = ints(train, "cls"), ints(train, "clean.cls")
    moved = given != true
    assert np.all(given[moved] == (true[moved] // 5) * 5 + (true[moved] % 5 + 1) % 5)
    assert abs(manifest(tmp_path / "blocks")["noise"]["realised_noise_rate"] - 0.5) < 0.03


def test_cifar_n_human_labels_apply_by_original_position(c10, tmp_path, capsys):
    import torch

    a = c10["a"]
    rng = np.random.default_rng(5)
    worse = a["train_y"].copy()
    flip = rng.random(100) < 0.4
    worse[flip] = (worse[flip] + 1 + rng.integers(0, 9, flip.sum())) % 10
    pt = tmp_path / "CIFAR-10_human.pt"
    torch.save({"clean_label": a["train_y"].astype(np.int64), "worse_label": worse.astype(np.int64),
                "aggre_label": a["train_y"].astype(np.int64)}, pt)
    out = tmp_path / "o"
    assert prepare("cifar10", "--root", str(c10["py"]), "--out", str(out), "--noise", "human:worse",
                   "--labels", str(pt), "--workers", "1", "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["noise"]["label_set"] == "worse_label"
    for split in ("train", "val"):
        s = read_split(out, split)
        pos = [position(x["__key__"]) for x in s]
        assert np.array_equal(ints(s, "cls"), worse[pos]) and np.array_equal(ints(s, "clean.cls"), a["train_y"][pos])
    assert manifest(out)["noise"]["realised_noise_rate"] == pytest.approx(flip.mean(), abs=1e-6)
    test = read_split(out, "test")
    assert np.array_equal(ints(test, "cls"), a["test_y"][[position(x["__key__"]) for x in test]])


def test_cifar_n_label_file_errors_are_one_line(c10, tmp_path, capsys):
    import torch

    y = c10["a"]["train_y"].astype(np.int64)
    short = tmp_path / "short.pt"
    torch.save({"worse_label": y[:99], "clean_label": y[:99]}, short)
    wrong = tmp_path / "wrong.pt"
    shifted = np.roll(y, 1)
    torch.save({"worse_label": y, "clean_label": shifted}, wrong)
    bad = tmp_path / "bad.pt"
    torch.save({"worse_label": np.where(np.arange(100) == 7, 12, y)}, bad)
    common = ["cifar10", "--root", str(c10["py"]), "--workers", "1", "--out", str(tmp_path / "o")]
    cases = [(["--noise", "human:worse", "--labels", str(short)], ["short.pt", "worse_label", "99"]),
             (["--noise", "human:worse", "--labels", str(wrong)], ["wrong.pt", "clean_label["]),
             (["--noise", "human:worse", "--labels", str(bad)], ["bad.pt", "12", "position 7"]),
             (["--noise", "human:nope", "--labels", str(short)], ["nope", "worse_label"]),
             (["--noise", "human:worse"], ["--labels"]),
             (["--noise", "symmetric:0.2", "--labels", str(short)], ["--labels"])]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"worse_label": Evil()}, evil)
    cases.append((["--noise", "human:worse", "--labels", str(evil)], ["evil.pt", "refusing to unpickle", "system"]))
    for extra, fragments in cases:
        assert prepare(*common, *extra) == 2
        line = error_line(capsys)
        assert all(f in line for f in fragments), line
    assert not (tmp_path / "o").exists() and not marker.exists()
    # a label file holding torch tensors instead of numpy arrays is read through torch.load(weights_only)
    tensors = tmp_path / "tensors.pt"
    torch.save({"worse_label": torch.from_numpy(np.roll(y, 3)), "clean_label": torch.from_numpy(y)}, tensors)
    assert prepare(*common, "--noise", "human:worse", "--labels", str(tensors)) == 0
    train = read_split(tmp_path / "o", "train")
    assert np.array_equal(ints(train, "cls"), np.roll(y, 3)[[position(s["__key__"]) for s in train]])


def test_csv_labels_by_key_and_default_out(c10, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    a = c10["a"]
    labels = (a["train_y"] * 3 + 1) % 10
    csv = tmp_path / "x" / "labels.csv"
    csv.parent.mkdir()
    rows = ["key,label"] + [f"train_{i:05d},{labels[i]}" for i in range(100)] + ["test_00003,4"]
    csv.write_text("\n".join(rows) + "\n")
    assert prepare("cifar10", "--root", str(c10["py"]), "--noise", f"file:{csv}", "--workers", "1") == 0
    out = tmp_path / "shards" / "cifar10-file-labels"
    train = read_split(out, "train")
    assert np.array_equal(ints(train, "cls"), labels[[position(s["__key__"]) for s in train]])
    test = read_split(out, "test")
    assert np.array_equal(ints(test, "cls"), ints(test, "clean.cls"))  # test label in the CSV ignored
    for content, fragments in (
            (rows[:-1] + ["train_99999,1"], ["labels.csv", "train_99999"]),             # unknown key
            (rows[:50], ["labels.csv", "no label for key"]),                            # missing keys
            (rows[:3] + ["train_00003,10"] + rows[4:], ["labels.csv:4", "10", "train_00003"])):  # range
        csv.write_text("\n".join(content) + "\n")
        assert prepare("cifar10", "--root", str(c10["py"]), "--noise", f"file:{csv}", "--out", "o2") == 2
        line = error_line(capsys)
        assert all(f in line for f in fragments), line


def test_malicious_pickle_is_refused(c10, tmp_path, capsys):
    import shutil

    root = tmp_path / "evil"
    shutil.copytree(c10["py"], root)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    assert prepare("cifar10", "--root", str(root), "--out", str(tmp_path / "o")) == 2
    line = error_line(capsys)
    assert "data_batch_1" in line and "refusing to unpickle" in line and "system" in line
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_bad_cifar_label_and_missing_dataset_name_the_file(c10, tmp_path, monkeypatch, capsys):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(c10["bin"], root)
    raw = bytearray((root / "cifar-10-batches-bin" / "data_batch_3.bin").read_bytes())
    raw[3073 * 2] = 12  # label byte of record 2
    (root / "cifar-10-batches-bin" / "data_batch_3.bin").write_bytes(bytes(raw))
    assert prepare("cifar10", "--root", str(root)) == 2
    line = error_line(capsys)
    assert "data_batch_3.bin" in line and "label 12" in line and "position 2" in line

    monkeypatch.setenv("TURNCTL_DATA", str(tmp_path / "nowhere"))
    assert prepare("cifar100") == 2
    assert str(tmp_path / "nowhere" / "cifar100" / "cifar-100-python" / "train") in error_line(capsys)
    assert prepare("fashion-mnist") == 2
    assert str(tmp_path / "nowhere" / "fashion-mnist" / "train-images-idx3-ubyte.gz") in error_line(capsys)
    assert prepare("clothing1m") == 2
    assert "noisy_label_kv.txt" in error_line(capsys)
    assert prepare("webvision") == 2
    assert str(Path("info") / "synsets.txt") in error_line(capsys)
    assert prepare("digits", "--classes", "5") == 2 and "--classes" in error_line(capsys)
    assert prepare("digits", "--noise", "symmetric:1.5") == 2 and "symmetric:1.5" in error_line(capsys)


def test_existing_out_overwrite_and_interruptions(c10, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    args = ["cifar10", "--root", str(c10["py"]), "--out", str(out), "--workers", "1"]
    assert prepare(*args) == 0
    before = shard_hashes(out)
    assert prepare(*args) == 2
    line = error_line(capsys)
    assert str(out) in line and "--overwrite" in line

    real_add = writer_mod.SplitWriter.add

    def add_then_interrupt(self, *a, **k):
        if self.count == 30:
            raise KeyboardInterrupt
        return real_add(self, *a, **k)

    monkeypatch.setattr(writer_mod.SplitWriter, "add", add_then_interrupt)
    # an interrupted --overwrite leaves the old dataset untouched and no partial directory
    assert prepare(*args, "--overwrite", "--noise", "symmetric:0.9") == 130
    assert shard_hashes(out) == before and (out / "manifest.json").is_file()
    assert not list(tmp_path.glob("o.partial-*")) and not list(tmp_path.glob("o.old-*"))
    # an interrupted fresh prepare leaves nothing that looks like a dataset
    assert prepare("cifar10", "--root", str(c10["py"]), "--out", str(tmp_path / "fresh"), "--workers", "1") == 130
    assert not (tmp_path / "fresh").exists() and not list(tmp_path.glob("fresh.partial-*"))
    monkeypatch.setattr(writer_mod.SplitWriter, "add", real_add)
    # a partial directory left by a dead process is cleaned up by the next run
    stale = tmp_path / "o.partial-999999999"
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"junk")
    assert prepare(*args, "--overwrite", "--noise", "symmetric:0.9") == 0
    assert not stale.exists() and shard_hashes(out) != before and manifest(out)["noise"]["rate"] == 0.9


# -- digits (the embedded default) ----------------------------------------------------------------

def test_digits_default_out_noise_determinism_and_workers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TURNCTL_DATA", raising=False)
    assert prepare("digits", "--noise", "symmetric:0.6", "--workers", "1") == 0
    out = tmp_path / "shards" / "digits-symmetric-0.6"
    m = manifest(out)
    assert {s: m["splits"][s]["count"] for s in ("train", "val", "test")} == {"train": 1258, "val": 180, "test": 359}
    assert "include" in capsys.readouterr().out  # the rich summary names the convention
    noise = m["noise"]
    assert noise["convention"] == "include" and noise["seed"] == 0 and noise["expected_noise_rate"] == 0.54
    assert abs(noise["realised_noise_rate"] - 0.54) < 0.04
    T = np.array(noise["transition_matrix"])
    assert T.shape == (10, 10) and np.allclose(T.sum(axis=1), 1.0) and abs(np.diag(T).mean() - 0.46) < 0.05
    assert m["splits"]["test"]["noised"] is False and m["splits"]["test"]["realised_noise_rate"] == 0.0
    train = read_split(out, "train")
    assert ints(train, "idx").tolist() == list(range(1258))
    imgs = np.stack([decode(s["png"]) for s in train[:50]])
    assert imgs.shape == (50, 8, 8) and imgs.max() == 255  # 0..16 rescaled to 0..255
    # same seed => same bytes, also through a process pool; another seed => other labels
    assert prepare("digits", "--noise", "symmetric:0.6", "--out", "again", "--workers", "2") == 0
    assert shard_hashes(tmp_path / "again") == shard_hashes(out)
    assert prepare("digits", "--noise", "symmetric:0.6", "--noise-seed", "1", "--out", "seed1",
                   "--workers", "1", "--json") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["noise"]["seed"] == 1
    other = shard_hashes(tmp_path / "seed1")
    assert other["train-000000.tar"] != shard_hashes(out)["train-000000.tar"]
    assert other["test-000000.tar"] == shard_hashes(out)["test-000000.tar"]  # test never noised


def test_digits_instance_noise_near_its_rate(tmp_path):
    r = prepare_dataset("digits", out=tmp_path / "o", noise="instance:0.4", noise_seed=3, workers=1)
    noise = r["manifest"]["noise"]
    assert noise["kind"] == "instance" and "flattened image" in noise["features"]
    assert abs(noise["realised_noise_rate"] - 0.4) < 0.04


def test_shards_read_back_with_webdataset(tmp_path):
    import webdataset as wds

    prepare_dataset("digits", out=tmp_path / "o", noise="symmetric:0.2:exclude", shard_size=500, workers=1)
    m = manifest(tmp_path / "o")
    urls = [str(tmp_path / "o" / n) for n in m["splits"]["train"]["shards"]]
    assert len(urls) == 3
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    seen = []
    for s in ds:
        assert set(s) >= {"__key__", "png", "cls", "clean.cls", "idx"} and "." not in s["__key__"]
        seen.append(int(s["idx"]))
    assert seen == list(range(1258))


# -- Fashion-MNIST --------------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    root = tmp_path / "data" / "fashion-mnist"
    root.mkdir(parents=True)
    x, y = rng.integers(0, 256, (80, 28, 28), dtype=np.uint8), np.arange(80) % 10
    write_idx(root / "train-images-idx3-ubyte.gz", x[:60])
    write_idx(root / "train-labels-idx1-ubyte.gz", y[:60])
    write_idx(root / "t10k-images-idx3-ubyte.gz", x[60:])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", y[60:])
    monkeypatch.setenv("TURNCTL_DATA", str(tmp_path / "data"))  # default root: $TURNCTL_DATA/<dataset>
    monkeypatch.chdir(tmp_path)
    r = prepare_dataset("fashion-mnist", noise="symmetric:0.5:exclude", workers=1)
    assert r["out"] == str(Path("shards") / "fashion-mnist-symmetric-0.5-exclude")
    m = r["manifest"]
    assert {s: m["splits"][s]["count"] for s in ("train", "val", "test")} == {"train": 57, "val": 3, "test": 20}
    assert m["class_names"][0] == "T-shirt/top"
    train = read_split(tmp_path / r["out"], "train")
    pos = [position(s["__key__"]) for s in train]
    assert np.array_equal(decode(train[4]["png"]), x[pos[4]]) and np.array_equal(ints(train, "clean.cls"), y[pos])
    assert m["noise"]["realised_noise_rate"] == 0.5  # exactly round(0.5 * 60) of train+val
    monkeypatch.delenv("TURNCTL_DATA")  # no $TURNCTL_DATA and no ./data/fashion-mnist: Debian's path
    monkeypatch.chdir(root)
    assert str(default_root("fashion-mnist")) == "/usr/share/datasets/fashion-mnist"
    monkeypatch.chdir(tmp_path)
    assert default_root("fashion-mnist") == Path("data") / "fashion-mnist"
    write_idx(root / "t10k-labels-idx1-ubyte.gz", y[60:79])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        prepare_dataset("fashion-mnist", out=tmp_path / "o2", workers=1)


# -- Clothing1M -----------------------------------------------------------------------------------

@pytest.fixture
def clothing(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "clothing1m"
    ann = root / "annotations"
    ann.mkdir(parents=True)
    keys = {s: [f"images/{i % 3}/{s[:2]}{i:02d}/{i:04d}.jpg" for i in range(n)]
            for s, n in (("train", 12), ("val", 4), ("test", 5))}
    for s, ks in keys.items():
        for k in ks:
            (root / k).parent.mkdir(parents=True, exist_ok=True)
            (root / k).write_bytes(jpeg(rng))
    (root / keys["train"][3]).write_bytes(b"\xff\xd8\xff garbage, not a jpeg")  # unreadable
    (root / keys["train"][7]).unlink()                                          # missing
    noisy = {k: i % 14 for i, k in enumerate(keys["train"])}
    clean = {k: (i + (i % 2)) % 14 for i, k in enumerate(keys["train"][:8])}  # 8 with a clean label
    clean.update({k: (i * 5) % 14 for i, k in enumerate(keys["val"] + keys["test"])})
    kv = lambda d: "".join(f"{k} {v}\n" for k, v in d.items())  # noqa: E731
    (ann / "noisy_label_kv.txt").write_text(kv(noisy))
    (ann / "clean_label_kv.txt").write_text(kv(clean))
    (ann / "noisy_train_key_list.txt").write_text("\n".join(keys["train"]) + "\n")
    (ann / "clean_train_key_list.txt").write_text("\n".join(keys["train"][:8]) + "\n")
    (ann / "clean_val_key_list.txt").write_text("\n".join(keys["val"]) + "\n")
    (ann / "clean_test_key_list.txt").write_text("\n".join(keys["test"]) + "\n")
    (ann / "category_names_eng.txt").write_text("\n".join(f"cat{i}" for i in range(14)) + "\n")
    return {"root": root, "keys": keys, "noisy": noisy, "clean": clean}


def key_of(path: str) -> str:
    return path.replace("/", "_").replace(".", "_")


def test_clothing1m_official_lists(clothing, tmp_path):
    root = clothing["root"]
    r = prepare_dataset("clothing1m", root=root, out=tmp_path / "o", workers=1, shard_size=4)
    m = r["manifest"]
    assert {s: m["splits"][s]["count"] for s in ("train", "val", "test")} == {"train": 10, "val": 4, "test": 5}
    skipped = m["splits"]["train"]["skipped"]
    assert skipped["count"] == 2
    assert {x["key"] for x in skipped["items"]} == {key_of(clothing["keys"]["train"][i]) for i in (3, 7)}
    by_key = {key_of(k): k for ks in clothing["keys"].values() for k in ks}
    train = read_split(tmp_path / "o", "train")
    assert ints(train, "idx").tolist() == list(range(10))
    known = 0
    for s in train:
        path = by_key[s["__key__"]]
        assert int(s["cls"]) == clothing["noisy"][path]
        assert s["jpg"] == (root / path).read_bytes()  # JPEG bytes pass through untouched
        if path in clothing["clean"]:
            assert int(s["clean.cls"]) == clothing["clean"][path]
            known += 1
        else:
            assert "clean.cls" not in s
    assert m["splits"]["train"]["clean_known"] == known == 6
    for split in ("val", "test"):
        for s in read_split(tmp_path / "o", split):
            assert int(s["cls"]) == int(s["clean.cls"]) == clothing["clean"][by_key[s["__key__"]]]
    assert m["class_names"][13] == "cat13" and m["splits"]["train"]["realised_noise_rate"] is not None
    # a training key without a noisy label is a one-line error naming key and file
    kv = root / "annotations" / "noisy_label_kv.txt"
    kv.write_text("".join(ln + "\n" for ln in kv.read_text().splitlines()[1:]))
    with pytest.raises(DataError, match=r"noisy_train_key_list.txt: key 'images/0/tr00/0000.jpg' has no label"):
        prepare_dataset("clothing1m", root=root, out=tmp_path / "o2", workers=1)


# -- WebVision ------------------------------------------------------------------------------------

@pytest.fixture
def webvision(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "webvision"
    info = root / "info"
    info.mkdir(parents=True)
    (info / "synsets.txt").write_text("".join(f"n0000000{c} thing{c}, other{c}\n" for c in range(4)))
    google = [(f"google/q000{c}/{j:05d}.jpg", c) for c in range(4) for j in range(3)]
    flickr = [(f"flickr/q000{c}/{j:05d}.jpg", c) for c in range(4) for j in range(2)]
    val = [(f"ILSVRC2012_val_{k:08d}.JPEG", k % 4) for k in range(1, 9)]
    for p, _ in google + flickr:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(jpeg(rng))
    (root / "val_images_256").mkdir()
    for p, _ in val:
        (root / "val_images_256" / p).write_bytes(jpeg(rng))
    for name, rows in (("train_filelist_google.txt", google), ("train_filelist_flickr.txt", flickr),
                       ("val_filelist.txt", val)):
        (info / name).write_text("".join(f"{p} {c}\n" for p, c in rows))
    return root


def test_webvision_full_and_mini(webvision, tmp_path, monkeypatch):
    m = prepare_dataset("webvision", root=webvision, out=tmp_path / "full", workers=1)["manifest"]
    assert sorted(m["splits"]) == ["test", "train"] and m["class_names"] == [f"n0000000{c}" for c in range(4)]
    assert m["splits"]["train"]["count"] == 20 and m["splits"]["test"]["count"] == 8
    assert m["splits"]["train"]["has_clean"] is False and m["noise"]["realised_noise_rate"] is None
    train = read_split(tmp_path / "full", "train")
    assert all("clean.cls" not in s for s in train)
    assert {s["__key__"].split("_")[0] for s in train} == {"google", "flickr"}
    test = read_split(tmp_path / "full", "test")
    assert all(s["__key__"].startswith("val_images_256_ILSVRC2012_val_") for s in test)
    assert np.array_equal(ints(test, "cls"), ints(test, "clean.cls"))
    # mini-WebVision: first N classes, Google part only; default out names the class count
    monkeypatch.chdir(tmp_path)
    assert prepare("webvision", "--root", str(webvision), "--classes", "2", "--workers", "1",
                   "--noise", "symmetric:0.5") == 0
    out = tmp_path / "shards" / "webvision2-symmetric-0.5"
    m = manifest(out)
    assert m["num_classes"] == 2 and m["sources"]["google_only"] is True
    train = read_split(out, "train")
    assert len(train) == 6 and all(s["__key__"].startswith("google_q000") for s in train)
    assert {int(s["__key__"][11]) for s in train} == {0, 1} and set(ints(train, "cls")) <= {0, 1}
    assert m["splits"]["test"]["count"] == 4 and m["noise"]["changed_fraction"] is not None


# -- ImageFolder ----------------------------------------------------------------------------------

@pytest.fixture
def imagefolder(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "folder"
    files = {"train/cat/a.jpg": jpeg(rng, 40, 30), "train/cat/b.jpg": jpeg(rng, 40, 30),
             "train/cat/c.jpeg": jpeg(rng, 20, 50), "train/dog/d.jpg": jpeg(rng, 40, 30),
             "val/cat/e.jpg": jpeg(rng, 40, 30), "val/dog/f.jpg": jpeg(rng, 40, 30),
             "train/dog/broken.jpg": b"not an image at all", "train/dog/README.txt": b"ignored"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for rel, fmt in (("train/cat/g.png", "PNG"), ("train/dog/h.bmp", "BMP")):
        Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)).save(root / rel, format=fmt)
    return root


def test_imagefolder_formats_skips_and_max_side(imagefolder, tmp_path):
    m = prepare_dataset("imagefolder", root=imagefolder, out=tmp_path / "o", workers=1)["manifest"]
    assert m["class_names"] == ["cat", "dog"] and sorted(m["splits"]) == ["train", "val"]
    assert m["splits"]["train"]["count"] == 6 and m["splits"]["val"]["count"] == 2
    assert m["splits"]["train"]["skipped"]["items"][0]["key"] == "train_dog_broken_jpg"
    assert m["splits"]["train"]["per_class_given"] == [4, 2]
    train = {s["__key__"]: s for s in read_split(tmp_path / "o", "train")}
    assert train["train_cat_a_jpg"]["jpg"] == (imagefolder / "train/cat/a.jpg").read_bytes()
    assert decode(train["train_cat_g_png"]["png"]).shape == (24, 36, 3)
    bmp = train["train_dog_h_bmp"]
    assert "png" in bmp and np.array_equal(decode(bmp["png"]), np.asarray(Image.open(imagefolder / "train/dog/h.bmp")))
    m = prepare_dataset("imagefolder", root=imagefolder, out=tmp_path / "small", max_side=16, workers=1,
                        noise="instance:0.5")["manifest"]
    assert "thumbnail" in m["noise"]["features"] and m["options"]["max_side"] == 16
    for s in read_split(tmp_path / "small", "train"):
        ext = next(e for e in ("jpg", "png") if e in s)
        img = Image.open(io.BytesIO(s[ext]))
        assert max(img.size) <= 16 and img.format == {"jpg": "JPEG", "png": "PNG"}[ext]


def test_shard_bytes_equal_what_tarfile_writes(tmp_path):
    # the fast header path must produce a standard archive: the same bytes as tarfile's PAX writer
    w = writer_mod.SplitWriter(tmp_path, "train", shard_size=10)
    long_key = "k" * 120
    samples = [("a_1", "jpg", b"\xff\xd8" * 300, 0, 3, 3), (long_key, "png", b"x" * 513, 1, 2, -1)]
    for key, ext, data, idx, label, clean in samples:
        w.add(key, ext, data, idx=idx, label=label, clean=clean)
    (info,) = w.close()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for key, ext, data, idx, label, clean in samples:
            members = [(ext, data), ("cls", str(label).encode())] + ([("clean.cls", b"3")] if clean >= 0 else [])
            for suffix, payload in members + [("idx", str(idx).encode())]:
                ti = tarfile.TarInfo(f"{key}.{suffix}")
                ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(payload), 0, 0o644, 0, 0, "", ""
                tf.addfile(ti, io.BytesIO(payload))
    assert (tmp_path / "train-000000.tar").read_bytes() == buf.getvalue()
    assert info["sha256"] == hashlib.sha256(buf.getvalue()).hexdigest() and info["count"] == 2


def test_tiny_cifar_without_a_val_share_leaves_val_out(tmp_path):
    a = cifar_arrays(10, 9, 5, seed=3)  # 5% of 9 rounds to 0 val samples
    write_cifar10(tmp_path / "c", "binary", a)
    m = prepare_dataset("cifar10", root=tmp_path / "c", out=tmp_path / "o", noise="symmetric:0.5", workers=1)["manifest"]
    assert sorted(m["splits"]) == ["test", "train"] and m["splits"]["train"]["count"] == 9
    assert m["noise"]["applies_to"] == ["train"] and not list((tmp_path / "o").glob("val-*"))
