"""`turnctl prepare --val-fraction` and `--labels-verified`: the held-out val split and true labels.

The hold-out is checked against an independent reconstruction: the same prepare without
--val-fraction gives the noised train labels in idx order, and turnctl.holdout.stratified_holdout
on those (the function the train-time data.val_fraction uses) must pick exactly the samples that
land in val. True labels (clean.cls) must appear only where the dataset actually knows them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from test_prepare import (
    cifar_arrays, error_line, ints, jpeg, manifest, position, prepare, read_split, shard_hashes, write_cifar10,
)
from turnctl.errors import DataError
from turnctl.holdout import stratified_holdout
from turnctl.prepare import prepare_dataset

NOISE = "symmetric:0.6"


def keys(samples) -> list:
    return [s["__key__"] for s in samples]


# -- digits: a dataset whose val split turnctl draws itself ----------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The same noisy digits prepared without and with a hold-out (seed 3, F = 0.2)."""
    d = tmp_path_factory.mktemp("digits")
    prepare_dataset("digits", out=d / "plain", noise=NOISE, noise_seed=3, workers=1)
    prepare_dataset("digits", out=d / "held", noise=NOISE, noise_seed=3, val_fraction=0.2, workers=1)
    return d


def test_digits_hold_out_is_stratified_holdout_of_the_noised_train(digits):
    plain, held = digits / "plain", digits / "held"
    # With --val-fraction the built-in val goes back behind train: that is the pool held out from.
    pool = read_split(plain, "train") + read_split(plain, "val")
    given, true = ints(pool, "cls"), ints(pool, "clean.cls")
    mask = stratified_holdout(given, 0.2, seed=3)
    val, train = read_split(held, "val"), read_split(held, "train")
    assert keys(val) == [pool[i]["__key__"] for i in np.flatnonzero(mask)]
    assert keys(train) == [pool[i]["__key__"] for i in np.flatnonzero(~mask)]
    assert ints(val, "train_idx").tolist() == np.flatnonzero(mask).tolist()
    assert all("train_idx" not in s for s in train)  # the complement, in order: no member needed
    assert ints(val, "idx").tolist() == list(range(len(val)))
    assert ints(train, "idx").tolist() == list(range(len(train)))
    # val keeps the given (noised) labels: the same noise draw as without a hold-out
    assert np.array_equal(ints(val, "cls"), given[mask]) and np.array_equal(ints(train, "cls"), given[~mask])
    assert np.array_equal(ints(val, "clean.cls"), true[mask])
    assert 0.4 < float(np.mean(ints(val, "cls") != ints(val, "clean.cls"))) < 0.7  # ~54% noisy, not clean
    assert [s["png"] for s in val[:20]] == [pool[i]["png"] for i in np.flatnonzero(mask)[:20]]
    # stratified on the given labels: per class round(0.2 * n_c), from the class's own samples
    n_c = np.bincount(given, minlength=10)
    assert np.bincount(ints(val, "cls"), minlength=10).tolist() == np.rint(0.2 * n_c).astype(int).tolist()
    assert shard_hashes(held)["test-000000.tar"] == shard_hashes(plain)["test-000000.tar"]


def test_digits_hold_out_manifest(digits):
    m, plain = manifest(digits / "held"), manifest(digits / "plain")
    s = m["splits"]
    n_pool = plain["splits"]["train"]["count"] + plain["splits"]["val"]["count"]
    assert s["train"]["count"] + s["val"]["count"] == n_pool == s["train"]["count_before_holdout"]
    assert s["train"]["held_out_to_val"] == s["val"]["count"]
    v = s["val"]
    assert (v["held_out_from"], v["val_fraction"], v["holdout_seed"], v["labels"]) == ("train", 0.2, 3, "given")
    assert v["noised"] is True and m["noise"]["applies_to"] == ["train", "val"]
    for name in ("train", "val"):  # realised rate per split, measured on what was written
        samples = read_split(digits / "held", name)
        rate = float(np.mean(ints(samples, "cls") != ints(samples, "clean.cls")))
        assert s[name]["realised_noise_rate"] == round(rate, 6) and s[name]["has_clean"] is True
    assert m["sources"]["builtin_val_folded_into_train"]["count"] == plain["splits"]["val"]["count"]
    # digits' labels are trusted: with synthetic noise every split still knows its true labels
    assert all(x["has_clean"] and x["clean_known"] == x["count"] for x in s.values())


def test_digits_hold_out_is_deterministic_and_follows_the_seed(digits, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert prepare("digits", "--noise", NOISE, "--noise-seed", "3", "--val-fraction", "0.2", "--workers", "2",
                   "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = tmp_path / "shards" / "digits-symmetric-0.6-val0.2"
    assert summary["out"] == str(out.relative_to(tmp_path)) and summary["splits"]["val"]["noised"] is True
    assert shard_hashes(out) == shard_hashes(digits / "held")  # same seed -> same bytes
    assert prepare("digits", "--noise", NOISE, "--noise-seed", "4", "--val-fraction", "0.2", "--out", "s4",
                   "--workers", "1") == 0
    assert keys(read_split(tmp_path / "s4", "val")) != keys(read_split(digits / "held", "val"))


def test_cifar_n_labels_follow_the_key_through_the_hold_out(tmp_path):
    import torch

    a = cifar_arrays(10, 100, 20, seed=4)
    root = write_cifar10(tmp_path / "c", "binary", a)
    rng = np.random.default_rng(8)
    worse = np.where(rng.random(100) < 0.4, (a["train_y"] + 1) % 10, a["train_y"]).astype(np.int64)
    pt = tmp_path / "CIFAR-10_human.pt"
    torch.save({"clean_label": a["train_y"].astype(np.int64), "worse_label": worse}, pt)
    m = prepare_dataset("cifar10", root=root, out=tmp_path / "o", noise="human:worse", labels=pt, val_fraction=0.1,
                        workers=1)["manifest"]
    val, train = read_split(tmp_path / "o", "val"), read_split(tmp_path / "o", "train")
    assert sorted(position(s["__key__"]) for s in train + val) == list(range(100))  # built-in val folded back
    for s in train + val:  # human labels index the official order: they follow the key, not the split
        p = position(s["__key__"])
        assert (int(s["cls"]), int(s["clean.cls"])) == (worse[p], a["train_y"][p])
    assert np.bincount(ints(val, "cls"), minlength=10).tolist() == np.rint(0.1 * np.bincount(worse)).astype(int).tolist()
    assert "val_from_train" not in m["sources"] and m["sources"]["val_from_train_replaced"]["fraction"] == 0.05


# -- a file dataset with an unreadable image -------------------------------------------------------

def write_folder(root, *, with_val: bool):
    rng = np.random.default_rng(11)
    for c in ("ant", "bee", "cow"):
        for j in range(6):
            p = root / "train" / c / f"{c}{j}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(jpeg(rng))
        t = root / "test" / c / f"t{c}.jpg"
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_bytes(jpeg(rng))
        if with_val:
            v = root / "val" / c / f"v{c}.jpg"
            v.parent.mkdir(parents=True, exist_ok=True)
            v.write_bytes(jpeg(rng))
    (root / "train" / "bee" / "bee2.jpg").write_bytes(b"\xff\xd8\xff truncated")  # skipped when written
    return root


def test_file_dataset_holds_out_by_the_idx_of_the_plain_prepare(tmp_path):
    root = write_folder(tmp_path / "f", with_val=False)
    prepare_dataset("imagefolder", root=root, out=tmp_path / "plain", noise="symmetric:0.5", noise_seed=1, workers=1)
    m = prepare_dataset("imagefolder", root=root, out=tmp_path / "held", noise="symmetric:0.5", noise_seed=1,
                        val_fraction=0.34, workers=1)["manifest"]
    plain = read_split(tmp_path / "plain", "train")  # 17 readable: the broken bee is not a sample
    mask = stratified_holdout(ints(plain, "cls"), 0.34, seed=1)
    val = read_split(tmp_path / "held", "val")
    # train_idx is the idx the plain prepare gave it, so data.val_fraction on plain shards matches
    assert ints(val, "train_idx").tolist() == ints(plain, "idx")[mask].tolist()
    assert keys(val) == [s["__key__"] for s, h in zip(plain, mask) if h]
    assert m["splits"]["train"]["count_before_holdout"] == len(plain) == 17
    assert m["splits"]["train"]["skipped"]["items"][0]["key"] == "train_bee_bee2_jpg"
    assert m["splits"]["val"]["skipped"]["count"] == 0
    # folder labels are not known to be true: no clean.cls anywhere, no realised rate
    assert all("clean.cls" not in s for split in ("train", "val", "test") for s in read_split(tmp_path / "held", split))
    assert m["noise"]["realised_noise_rate"] is None and m["noise"]["changed_fraction"] is not None
    assert {s["has_clean"] for s in m["splits"].values()} == {False}


def test_val_fraction_refused_where_the_dataset_has_its_own_val(tmp_path, capsys):
    root = write_folder(tmp_path / "f", with_val=True)
    assert prepare("imagefolder", "--root", str(root), "--val-fraction", "0.1", "--out", str(tmp_path / "o")) == 2
    assert "has its own val split (3 samples)" in error_line(capsys)
    assert not (tmp_path / "o").exists()
    # Clothing1M: the official clean val (the lists are read, no image is needed to refuse)
    ann = tmp_path / "c1m" / "annotations"
    ann.mkdir(parents=True)
    (ann / "noisy_label_kv.txt").write_text("a.jpg 0\nb.jpg 1\n")
    (ann / "clean_label_kv.txt").write_text("v.jpg 2\nt.jpg 3\n")
    for name, body in (("noisy_train_key_list", "a.jpg\nb.jpg\n"), ("clean_val_key_list", "v.jpg\n"),
                       ("clean_test_key_list", "t.jpg\n")):
        (ann / f"{name}.txt").write_text(body)
    with pytest.raises(DataError, match=r"^clothing1m has its own val split \(1 samples\)"):
        prepare_dataset("clothing1m", root=tmp_path / "c1m", out=tmp_path / "o", val_fraction=0.1)
    with pytest.raises(DataError, match=r"--val-fraction must be in \[0, 1\)"):
        prepare_dataset("digits", out=tmp_path / "o", val_fraction=1.0)
    assert prepare("digits", "--val-fraction", "1.5", "--out", str(tmp_path / "o")) == 2


# -- true labels only where known ------------------------------------------------------------------

def all_samples(out):
    return [s for split in ("train", "val", "test") for s in read_split(out, split)]


def test_imagefolder_true_labels_only_with_labels_verified(tmp_path, capsys):
    root = write_folder(tmp_path / "f", with_val=True)
    m = prepare_dataset("imagefolder", root=root, out=tmp_path / "plain", workers=1)["manifest"]
    assert {s["has_clean"] for s in m["splits"].values()} == {False}
    assert {s["clean_known"] for s in m["splits"].values()} == {0}
    assert all("clean.cls" not in s for s in all_samples(tmp_path / "plain"))
    assert "--labels-verified" in m["clean_labels"] and m["options"]["labels_verified"] is False
    assert prepare("imagefolder", "--root", str(root), "--labels-verified", "--noise", "symmetric:0.5:exclude",
                   "--out", str(tmp_path / "verified"), "--workers", "1") == 0
    m = manifest(tmp_path / "verified")
    assert {s["has_clean"] for s in m["splits"].values()} == {True}
    for s in all_samples(tmp_path / "verified"):
        folder = s["__key__"].split("_")[1]  # <split>_<class>_<file>
        assert m["class_names"][int(s["clean.cls"])] == folder
    assert m["noise"]["realised_noise_rate"] is not None
    # on a dataset whose true labels are fixed by the dataset, the flag is refused, not ignored
    assert prepare("webvision", "--labels-verified", "--root", str(tmp_path / "nowhere")) == 2
    assert "--labels-verified only applies to imagefolder" in error_line(capsys)


def test_bmp_in_a_held_out_split_is_re_encoded_like_in_train(tmp_path):
    # The spool carries the encoded bytes: a file re-encoded for train is the same bytes in val.
    root = write_folder(tmp_path / "f", with_val=False)
    for j in range(3):
        Image.fromarray(np.full((6, 7, 3), 40 * j, np.uint8)).save(root / "train" / "cow" / f"x{j}.bmp")
    prepare_dataset("imagefolder", root=root, out=tmp_path / "plain", workers=1)
    prepare_dataset("imagefolder", root=root, out=tmp_path / "held", val_fraction=0.5, workers=1)
    by_key = {s["__key__"]: s for s in read_split(tmp_path / "plain", "train")}
    held = read_split(tmp_path / "held", "train") + read_split(tmp_path / "held", "val")
    assert len(held) == len(by_key) and {k for s in held for k in s} >= {"png", "jpg", "cls", "idx"}
    for s in held:
        ext = "png" if "png" in s else "jpg"
        assert s[ext] == by_key[s["__key__"]][ext]
