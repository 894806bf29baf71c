"""``turnctl index``: shards written by plain ``webdataset.TarWriter`` (no idx member) become a
dataset turnctl trains on, in place: sizes.json / manifest.json written beside them, the tar files
untouched, idx assigned in tar order and supplied by the reader, the label read from the configured
field; and every refusal is one line with exit 2.
"""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from turnctl.cli import run as cli_run
from turnctl.data import ToTensorResize, exact_loader, open_split, train_loader
from turnctl.data.format import FORMAT, INDEX_FORMAT
from turnctl.errors import DataError

# sklearn's digits, as conftest's digits shards use them: 8x8 grey images, 10 classes.
N_TRAIN, N_VAL, N_TEST = 240, 60, 60


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * 16).clip(0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, images, labels, *, key_prefix: str, label: str = "cls", ext: str = "png",
           skip_label_at=None):
    """One shard as plain webdataset.TarWriter writes it: ``__key__``, an image, the label (a ``cls``
    member or a ``json`` member's ``label`` field) and a ``txt`` member turnctl ignores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for i, (a, y) in enumerate(zip(images, labels)):
            sample = {"__key__": f"{key_prefix}{i:05d}", ext: _png(a), "txt": f"digit {y}"}
            if i != skip_label_at:
                if label == "cls":
                    sample["cls"] = int(y)
                else:
                    sample["json"] = {"label": int(y), "source": "digits"}
            w.write(sample)


def _user_shards(root: Path, *, label: str = "cls"):
    """A user's dataset: train in 4 shards of uneven size, val and test in one each (names unlike
    prepare's), images and labels per split in tar order."""
    images, labels = _digits()
    parts = {"train": (0, N_TRAIN, [70, 50, 60, 60]), "val": (N_TRAIN, N_VAL, [N_VAL]),
             "test": (N_TRAIN + N_VAL, N_TEST, [N_TEST])}
    truth = {}
    for split, (start, n, sizes) in parts.items():
        lo = start
        for s, size in enumerate(sizes):
            _write(root / f"{split}-part{s:02d}.tar", images[lo:lo + size], labels[lo:lo + size],
                   key_prefix=f"{split}{s}_", label=label)
            lo += size
        truth[split] = labels[start:start + n]
    return truth


def _digests(root: Path):
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in root.glob("*.tar")}


def _index(root: Path, split: str, *extra: str) -> int:
    return cli_run(["index", str(root / f"{split}-part{{00..03}}.tar") if split == "train"
                    else str(root / f"{split}-part00.tar"), "--split", split, *extra])


def _one_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("turnctl: error: "), err[-3000:]
    return lines[0]


def _read_all(info, **kw):
    """(idx, cls, ok) of every sample of a split via exact_loader."""
    rows = []
    for b in exact_loader(info, transform=ToTensorResize(16), batch_size=32, rank=0, world_size=1, **kw):
        rows += zip(b["idx"].tolist(), b["cls"].tolist(), b["ok"].tolist())
    return rows


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """The user's shards, indexed split by split (train from a brace pattern); with the tars' digests
    from before the index."""
    root = tmp_path_factory.mktemp("user") / "shards"
    truth = _user_shards(root)
    before = _digests(root)
    for split in ("train", "val", "test"):
        assert _index(root, split) == 0
    return root, truth, before


def test_index_writes_what_the_reader_checks_and_leaves_the_tars_alone(indexed):
    root, truth, before = indexed
    assert _digests(root) == before  # not a byte nor an mtime changed
    sizes = json.loads((root / "sizes.json").read_text())
    assert sizes == {"train-part00.tar": 70, "train-part01.tar": 50, "train-part02.tar": 60,
                     "train-part03.tar": 60, "val-part00.tar": N_VAL, "test-part00.tar": N_TEST}
    m = json.loads((root / "manifest.json").read_text())
    assert m["format"] == INDEX_FORMAT and m["num_classes"] == 10
    assert m["class_names"] == [str(c) for c in range(10)] and m["options"]["classes_from"] == "labels"
    assert list(m["splits"]) == ["train", "val", "test"]
    for split, y in truth.items():
        s = m["splits"][split]
        assert s["idx"] == "tar_order" and s["label_field"] == "cls" and s["count"] == len(y)
        assert s["per_class_given"] == np.bincount(y, minlength=10).tolist()
        assert s["has_clean"] is False and s["noised"] is False
    firsts = [m["shards"][f"train-part{k:02d}.tar"]["first_idx"] for k in range(4)]
    assert firsts == [0, 70, 120, 180]
    for name, meta in m["shards"].items():
        data = (root / name).read_bytes()
        assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["bytes"] == len(data)
    info = open_split(root, "train", verify=True)
    assert info.num_samples == N_TRAIN and info.num_classes == 10 and not info.has_clean


def test_the_reader_supplies_idx_in_tar_order_and_the_label(indexed):
    root, truth, _ = indexed
    from turnctl.holdout import read_given_labels

    # data.val_fraction holds out by these labels: the same as the reader's, none unknown
    assert read_given_labels(open_split(root, "train")).tolist() == list(truth["train"])
    for split in ("train", "test"):
        rows = _read_all(open_split(root, split), num_workers=2 if split == "train" else 0)
        assert sorted(i for i, _, _ in rows) == list(range(len(truth[split])))  # every idx exactly once
        assert all(ok for *_, ok in rows)
        assert all(c == truth[split][i] for i, c, _ in rows)  # idx i is the i-th sample in tar order


def test_train_loader_keeps_idx_and_label_together_also_in_shared_shard_parts(indexed):
    root, truth, _ = indexed
    info = open_split(root, "train")
    keep = np.arange(0, N_TRAIN, 3)
    # 3 ranks x 2 workers = 6 readers for 4 shards: every shard is read in interleaved parts.
    for rank in (0, 1, 2):
        ld = train_loader(info, transform=ToTensorResize(16), batch_size=8, epoch=1, seed=0, rank=rank,
                          world_size=3, num_workers=2, shuffle_buffer=16, keep_idx=keep)
        assert ld.parts > 1
        got = [(i, c) for b in ld for i, c in zip(b["idx"].tolist(), b["cls"].tolist())]
        assert len(got) == ld.steps * 8
        assert all(i % 3 == 0 and c == truth["train"][i] for i, c in got)
        assert ld.stats()["corrupt"] == 0


def test_turn_trains_on_indexed_shards(indexed, tmp_path):
    from launch import check, last_json, run, turnctl_cmd

    root, _, _ = indexed
    # Its own process, as a user runs it (an in-process DeepSpeed engine after another module's
    # process group was torn down trips over DeepSpeed's cached groups)
    result = last_json(check(run(turnctl_cmd([
        "train", "--recipe", "tiny", "--shards", str(root), "--out", str(tmp_path / "run"), "--json",
        "--set", "data.num_workers=0", "--set", "probe.epochs=2", "--set", "finetune.epochs=1",
        "--set", "features.batch_size=64"]), timeout=300)).stdout)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == result["method"] == "turn"
    assert summary["train_undecodable"] == summary["val_undecodable"] == summary["test_undecodable"] == 0
    assert summary["best_selected_on"] == "val"  # the indexed val split is the validation data
    assert 0.0 <= summary["test_accuracy"]["last"] <= 1.0 and summary["selection"]["selected"] > 0
    sel = sorted((tmp_path / "run").rglob("epoch_*.npz"))
    assert sel, "no selection file"
    z = np.load(sel[-1])
    assert sorted(z["idx"].tolist()) == list(range(N_TRAIN))  # the selection is keyed by the tar-order idx


def test_a_json_label_field(tmp_path):
    root = tmp_path / "j"
    truth = _user_shards(root, label="json")
    assert cli_run(["index", str(root / "train-part{00..03}.tar"), "--label-field", "json:label",
                    "--class-names", str(_names(tmp_path))]) == 0
    m = json.loads((root / "manifest.json").read_text())
    assert m["splits"]["train"]["label_field"] == "json:label" and m["class_names"][3] == "digit-3"
    assert m["options"]["classes_from"] == "--class-names"
    rows = _read_all(open_split(root, "train"))
    assert len(rows) == N_TRAIN and all(c == truth["train"][i] for i, c, _ in rows)
    # The val_fraction hold-out reads the same labels (the reader's numbering and parser).
    from turnctl.holdout import read_given_labels

    assert read_given_labels(open_split(root, "train")).tolist() == list(truth["train"])
    # A json split indexed without the field is refused naming the member.
    with pytest.raises(DataError, match="no cls member"):
        from turnctl.prepare.index import index_shards

        index_shards(str(root / "val-part00.tar"), split="val")


def test_a_label_in_another_member(tmp_path):
    images, labels = _digits()
    root = tmp_path / "m"
    root.mkdir()
    with wds.TarWriter(str(root / "s.tar")) as w:
        for i in range(30):  # "cls" holds something else: the label is in "target"
            w.write({"__key__": f"k{i}", "jpg": _png(images[i]), "target": str(labels[i]), "cls": "99"})
    assert cli_run(["index", str(root), "--label-field", "target", "--num-classes", "10"]) == 0
    rows = _read_all(open_split(root, "train"))
    assert len(rows) == 30 and all(c == labels[i] for i, c, _ in rows)


def _names(tmp_path: Path) -> Path:
    p = tmp_path / "classes.txt"
    p.write_text("".join(f"digit-{c}\n" for c in range(10)))
    return p


def test_a_missing_label_names_the_shard_and_the_key(tmp_path, capsys):
    images, labels = _digits()
    _write(tmp_path / "a" / "s-000.tar", images[:20], labels[:20], key_prefix="k", skip_label_at=13)
    line = _one_error(capsys, cli_run(["index", str(tmp_path / "a")]))
    assert "s-000.tar" in line and "'k00013'" in line and "no cls member" in line
    assert not (tmp_path / "a" / "manifest.json").exists() and not (tmp_path / "a" / "sizes.json").exists()


@pytest.mark.parametrize("bad", ["not-a-number", "-1", "10"])
def test_a_bad_label_names_the_shard_and_the_key(tmp_path, capsys, bad):
    images, labels = _digits()
    root = tmp_path / "b"
    root.mkdir()
    with wds.TarWriter(str(root / "s.tar")) as w:
        for i in range(5):
            w.write({"__key__": f"x{i}", "png": _png(images[i]), "cls": bad if i == 4 else "1"})
    line = _one_error(capsys, cli_run(["index", str(root), "--num-classes", "10"]))
    assert "s.tar" in line and "'x4'" in line


def test_a_sample_without_an_image_is_refused(tmp_path, capsys):
    root = tmp_path / "c"
    root.mkdir()
    with wds.TarWriter(str(root / "s.tar")) as w:
        w.write({"__key__": "only_text", "txt": "no picture", "cls": 1})
    line = _one_error(capsys, cli_run(["index", str(root)]))
    assert "'only_text'" in line and "no image member" in line


def test_a_brace_pattern_across_two_directories_is_refused(tmp_path, capsys):
    images, labels = _digits()
    for d in ("x", "y"):
        _write(tmp_path / d / "s-0.tar", images[:4], labels[:4], key_prefix=d)
    line = _one_error(capsys, cli_run(["index", str(tmp_path / "{x,y}" / "s-0.tar")]))
    assert "2 directories" in line
    assert not any(tmp_path.rglob("*.json"))


def test_a_missing_shard_of_a_pattern_is_named(tmp_path, capsys):
    images, labels = _digits()
    _write(tmp_path / "s-0.tar", images[:4], labels[:4], key_prefix="a")
    line = _one_error(capsys, cli_run(["index", str(tmp_path / "s-{0..2}.tar")]))
    assert "s-1.tar: no such shard (and 1 more of the 3)" in line


@pytest.mark.parametrize("foreign", ["prepared", "other", "not_json", "sizes"])
def test_files_index_did_not_write_are_never_replaced(tmp_path, capsys, foreign):
    images, labels = _digits()
    root = tmp_path / "d"
    _write(root / "s-0.tar", images[:8], labels[:8], key_prefix="a")
    target = root / ("sizes.json" if foreign == "sizes" else "manifest.json")
    content = {"prepared": json.dumps({"format": FORMAT, "num_classes": 3, "splits": {}, "shards": {}}),
               "other": json.dumps({"my": "notes"}), "not_json": "hello",
               "sizes": json.dumps({"s-0.tar": 8, "elsewhere.tar": 3})}[foreign]
    target.write_text(content)
    before = _digests(root)
    line = _one_error(capsys, cli_run(["index", str(root)]))
    assert str(target) in line
    assert target.read_text() == content and _digests(root) == before
    assert sorted(p.name for p in root.iterdir()) == sorted(["s-0.tar", target.name])


def test_an_interrupted_index_is_finished_and_a_split_added_or_reindexed(tmp_path, capsys):
    images, labels = _digits()
    root = tmp_path / "e"
    _write(root / "train-0.tar", images[:30], labels[:30], key_prefix="t")
    _write(root / "val-0.tar", images[30:40], labels[30:40], key_prefix="v")
    # Killed between its two writes: the sizes.json it wrote is accepted, being exactly what it writes.
    (root / "sizes.json").write_text(json.dumps({"train-0.tar": 30}))
    assert cli_run(["index", str(root / "train-0.tar")]) == 0
    assert cli_run(["index", str(root / "val-0.tar"), "--split", "val"]) == 0
    m = json.loads((root / "manifest.json").read_text())
    assert set(m["splits"]) == {"train", "val"} and m["shards"]["val-0.tar"]["first_idx"] == 0
    assert open_split(root, "val").num_samples == 10 and open_split(root, "train").num_samples == 30
    # A shard is of one split only.
    line = _one_error(capsys, cli_run(["index", str(root / "val-0.tar"), "--split", "test"]))
    assert "already indexed as split 'val'" in line
    # Re-indexing a split replaces it (train now has a second shard, after the first in name order).
    _write(root / "train-1.tar", images[40:45], labels[40:45], key_prefix="u")
    assert cli_run(["index", str(root / "train-{0..1}.tar")]) == 0
    info = open_split(root, "train")
    assert info.num_samples == 35 and [s[1] for s in info.layout.shards] == [0, 30]
    assert json.loads((root / "sizes.json").read_text()) == {"train-0.tar": 30, "train-1.tar": 5, "val-0.tar": 10}
    # Classes fixed by one call bind the others.
    assert cli_run(["index", str(root / "val-0.tar"), "--split", "val", "--num-classes", "12"]) == 0
    assert json.loads((root / "manifest.json").read_text())["splits"]["train"]["per_class_given"][-2:] == [0, 0]
    line = _one_error(capsys, cli_run(["index", str(root / "val-0.tar"), "--split", "val", "--num-classes", "11"]))
    assert "fixed by an earlier" in line


def test_prepare_overwrite_never_replaces_an_indexed_directory(indexed):
    from turnctl.prepare.writer import check_out

    root, _, _ = indexed
    with pytest.raises(DataError, match="was not written by turnctl prepare"):
        check_out(root, overwrite=True)


def test_help_lists_index_right_after_prepare(capsys):
    assert cli_run(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.index("  prepare ") < out.index("  index ") < out.index("  train ")


def test_the_report_reads_keys_of_indexed_shards_in_idx_order(indexed):
    import tarfile

    from turnctl.report.keys import sample_keys

    root, truth, _ = indexed
    info = open_split(root, "train")
    expected = []
    for path in info.shard_paths:  # tar order, shards in name order: how index numbers them
        with tarfile.open(path) as t:
            for m in t.getmembers():
                key = m.name.split(".", 1)[0]
                if not expected or expected[-1] != key:
                    expected.append(key)
    keys = sample_keys(root, split="train")
    assert keys.tolist() == expected and len(set(expected)) == len(truth["train"])
