"""`turnctl prepare` keeps a key -> source path map for file datasets (sources.jsonl, recorded in the
manifest's source_map), and the report shows it as a `source` column; shards without it still work."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import yaml

from test_prepare import ints, read_split
from test_prepare_val import write_folder
from launch import REPO
from turnctl.data import open_split
from turnctl.prepare import prepare_dataset
from turnctl.report import label_issues, write_report


def _lines(out):
    return [json.loads(line) for line in (out / "sources.jsonl").read_text().splitlines()]


def test_prepare_maps_every_written_sample_to_its_file(tmp_path):
    root = write_folder(tmp_path / "f", with_val=False)
    # a dotted folder: the key (dots and slashes -> '_') cannot be turned back into this path
    (root / "train" / "cow" / "v1.2").mkdir()
    (root / "train" / "cow" / "cow0.jpg").rename(root / "train" / "cow" / "v1.2" / "cow.0.jpg")
    out = tmp_path / "held"
    m = prepare_dataset("imagefolder", root=root, out=out, noise="symmetric:0.5", noise_seed=1, val_fraction=0.34,
                        workers=1)["manifest"]
    lines = _lines(out)
    rec = m["source_map"]
    raw = (out / "sources.jsonl").read_bytes()
    assert (rec["file"], rec["count"], rec["bytes"]) == ("sources.jsonl", len(lines), len(raw))
    assert rec["sha256"] == hashlib.sha256(raw).hexdigest()
    for split in ("train", "val", "test"):
        samples = read_split(out, split)
        mine = [e for e in lines if e["split"] == split]
        assert [e["idx"] for e in mine] == ints(samples, "idx").tolist() == list(range(len(samples)))
        assert [e["key"] for e in mine] == [s["__key__"] for s in samples]
        for e, s in zip(mine, samples):  # no --max-side: the shard holds the file's own bytes
            assert (root / e["source"]).read_bytes() == s["jpg"]
    # 17 readable train images (the broken bee is skipped, and has no line), 3 test
    assert len(lines) == 17 + 3
    dotted = next(e for e in lines if e["key"] == "train_cow_v1_2_cow_0_jpg")  # in train or held out to val
    assert dotted["source"] == "train/cow/v1.2/cow.0.jpg"
    assert not any("bee2" in e["source"] for e in lines)
    open_split(out, "train", verify=True)  # the schema takes the new field

    # array datasets have no files to point to: no map, no field
    d = prepare_dataset("digits", out=tmp_path / "digits", workers=1)["manifest"]
    assert "source_map" not in d and not (tmp_path / "digits" / "sources.jsonl").exists()


def _run_on(shards, run_dir):
    """A hand-made TURN run directory whose selection is over ``shards``' train split."""
    samples = read_split(shards, "train")
    n = len(samples)
    given = ints(samples, "cls")
    rec = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    rec["data"]["shards"] = str(shards)
    (run_dir / "selection").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(rec))
    prob = np.linspace(0.0, 1.0, n).astype(np.float32)
    c = int(given.max()) + 1
    np.savez(run_dir / "selection" / "epoch_0.npz", idx=np.arange(n), loss=1.0 - prob, clean_prob=prob,
             selected=prob > 0.5, keep=prob > 0.6, given=given, clean=np.full(n, -1), pred=given,
             ok=np.ones(n, bool), means=np.tile([0.1, 0.8], (c, 1)), variances=np.full((c, 2), 0.01),
             weights=np.full((c, 2), 0.5))
    return run_dir, samples


def test_the_report_shows_the_source_column_and_old_shards_still_work(tmp_path, caplog):
    root = write_folder(tmp_path / "f", with_val=False)
    shards = tmp_path / "shards"
    prepare_dataset("imagefolder", root=root, out=shards, noise="symmetric:0.5", noise_seed=1, workers=1)
    run_dir, samples = _run_on(shards, tmp_path / "run")
    issues = label_issues(run_dir)
    assert list(issues)[:3] == ["idx", "key", "source"]
    by_key = {e["key"]: e["source"] for e in _lines(shards) if e["split"] == "train"}
    assert [by_key[k] for k in issues["key"]] == issues["source"].tolist()
    s = write_report(run_dir, top=3)
    header = (run_dir / "report" / "label_issues.csv").read_text().splitlines()[0]
    assert header.startswith("idx,key,source,given_label,")
    assert s["top"] and all(t["source"].startswith("train/") for t in s["top"])

    # A source map that no longer matches the manifest: a warning, the report without the column.
    with open(shards / "sources.jsonl", "ab") as f:
        f.write(b'{"split": "train", "idx": 0, "key": "x", "source": "elsewhere.jpg"}\n')
    caplog.clear()
    assert "source" not in label_issues(run_dir)
    assert "the source column is left out" in caplog.text

    # Shards of an older prepare (no map, no field): as before, no column and no warning.
    os.remove(shards / "sources.jsonl")
    m = json.loads((shards / "manifest.json").read_text())
    del m["source_map"]
    (shards / "manifest.json").write_text(json.dumps(m))
    caplog.clear()
    assert list(label_issues(run_dir))[:3] == ["idx", "key", "given_label"]
    assert "source" not in caplog.text


def test_the_manifest_schema_refuses_a_source_map_elsewhere(tmp_path):
    import pytest

    from turnctl.errors import DataError

    root = write_folder(tmp_path / "f", with_val=False)
    shards = tmp_path / "shards"
    prepare_dataset("imagefolder", root=root, out=shards, workers=1)
    m = json.loads((shards / "manifest.json").read_text())
    m["source_map"]["file"] = "../../etc/passwd"
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"manifest.json: source_map.file: expected 'sources.jsonl'"):
        open_split(shards, "train")
