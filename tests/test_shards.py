"""turnctl.data: exact-once lockstep reading, training epochs, corrupt data, the shard format.

Ranks are simulated in-process by passing rank/world_size (the reader never talks to a process
group); the acceptance test at the end runs two real ranks x two DataLoader workers under
torch.distributed.run. With ``shuffle_buffer=0`` a training epoch is fully determined by the
documented shard assignment, so the tests compute the exact idx sequence every rank must yield.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from itertools import cycle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageFile

import launch
from shardgen import truncated_jpeg, write_toy_shards
from turnctl import data as S
from turnctl.data import stages, tar
from turnctl.distributed import check_coverage
from turnctl.errors import DataError

TF = S.ToTensorResize(8)
UNEVEN = [7, 5, 6, 3]            # 21 samples: divides by no batch x world used below
CORRUPT = [3, 8]                 # a truncated JPEG (shard 0) and garbage bytes (shard 1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("toy"), counts={"train": UNEVEN, "test": [4, 4]},
                            num_classes=3, noise_rate=0.4, corrupt={"train": CORRUPT}, seed=1)


@pytest.fixture(scope="module")
def clean_toy(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("clean"), counts={"train": [9, 3, 7, 2, 5, 4]},
                            num_classes=4, seed=2)


def check_stats(stats, want, workers):
    """corrupt is exact as of each worker's last delivered row; read and filtered may include up to
    DECODE_CHUNK samples per worker pulled ahead of decoding."""
    ahead = stages.DECODE_CHUNK * workers
    assert stats["corrupt"] == want["corrupt"]
    assert want["read"] <= stats["read"] <= want["read"] + ahead
    assert want["filtered"] <= stats["filtered"] <= want["filtered"] + ahead


def exact_pass(info, *, world, bs, workers=0):
    """Run every simulated rank; return (steps per rank, batches per rank, loaders)."""
    steps, batches, loaders = [], [], []
    for r in range(world):
        ld = S.exact_loader(info, transform=TF, batch_size=bs, rank=r, world_size=world, num_workers=workers)
        bl = list(ld)
        steps.append(len(bl))
        batches.append(bl)
        loaders.append(ld)
    return steps, batches, loaders


def simulate_train(toy, split, assignment, *, steps, bs, workers, keep=None):
    """The idx sequence one rank must yield with shuffle_buffer=0, and its workers' counters.

    Worker w streams its shard parts (assignment[w]) in order, cycling; drops corrupt and non-kept
    samples; batch i of the rank comes from worker i % W. Counters are as of each worker's last
    delivered batch: read = samples pulled up to its last row, corrupt/filtered among them (the
    reader's read/filtered may run ahead by its decode read-ahead, see check_stats).
    """
    W = len(assignment)
    need = [sum(1 for i in range(steps) if i % W == w) * bs for w in range(W)]
    bad = set(toy.corrupt.get(split, []))
    rows, stats = [], {"read": 0, "corrupt": 0, "filtered": 0}
    for w, shards in enumerate(assignment):
        out = []
        read = corrupt = filtered = 0
        stream = cycle(i for s in shards for i in toy.shard_idx[split][s.shard][s.part::s.parts])
        while len(out) < need[w]:
            i = next(stream)
            read += 1
            if keep is not None and i not in keep:
                filtered += 1
            elif i in bad:
                corrupt += 1
            else:
                out.append(i)
        rows.append(out)
        stats["read"] += read
        stats["corrupt"] += corrupt
        stats["filtered"] += filtered
    seq = [rows[b % W][(b // W) * bs:(b // W + 1) * bs] for b in range(steps)]
    return seq, stats


# ---------------------------------------------------------------------------------------------
# Split metadata and the on-disk format
# ---------------------------------------------------------------------------------------------


def test_open_split_reads_manifest_and_fingerprints(toy, tmp_path):
    info = S.open_split(toy.root, "train")
    assert info.shard_sizes == tuple(UNEVEN) and info.num_samples == 21
    assert info.shard_names == tuple(f"train-{i:06d}.tar" for i in range(4))
    assert (info.num_classes, info.class_names, info.has_clean) == (3, ("class0", "class1", "class2"), True)
    assert info.manifest["noise"]["realised_noise_rate"] == pytest.approx(0.4, abs=0.03)
    assert S.open_split(toy.root, "train").fingerprint == info.fingerprint
    assert S.open_split(toy.root, "test").fingerprint != info.fingerprint
    # Same sizes, different bytes (another seed): a feature cache must not match.
    other = write_toy_shards(tmp_path / "other", counts={"train": UNEVEN}, num_classes=3, seed=9)
    assert S.open_split(other.root, "train").fingerprint != info.fingerprint
    S.open_split(toy.root, "train", verify=True)  # sha256s written by shardgen match


def test_open_split_errors_name_the_problem(toy, tmp_path):
    with pytest.raises(DataError, match="interrupted"):
        S.open_split(tmp_path, "train")
    with pytest.raises(DataError, match="no split 'val'.*test, train"):
        S.open_split(toy.root, "val")
    d = write_toy_shards(tmp_path / "d", counts={"train": [3, 3]}, num_classes=2)
    (d.root / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="train-000001.tar.*missing"):
        S.open_split(d.root, "train")
    e = write_toy_shards(tmp_path / "e", counts={"train": [3, 3]}, num_classes=2)
    (e.root / "sizes.json").write_text(json.dumps({"train-000000.tar": 3, "train-000001.tar": 4}))
    with pytest.raises(DataError, match="train-000001.tar holds 4 samples but manifest.json says 3"):
        S.open_split(e.root, "train")
    f = write_toy_shards(tmp_path / "f", counts={"train": [3]}, num_classes=2)
    with open(f.root / "train-000000.tar", "ab") as fh:
        fh.write(b"\0" * 512)
    with pytest.raises(DataError, match=r"train-000000.tar: 20992 bytes but manifest.json says 20480"):
        S.open_split(f.root, "train")  # a stat catches a size change on every run
    with open(f.root / "train-000000.tar", "r+b") as fh:  # same size, one byte changed: only the hash sees it
        fh.truncate(20480)
        fh.seek(600)
        byte = fh.read(1)
        fh.seek(600)
        fh.write(bytes([byte[0] ^ 0xFF]))
    S.open_split(f.root, "train")  # cheap checks pass
    with pytest.raises(DataError, match="sha256"):
        S.open_split(f.root, "train", verify=True)


def test_shardgen_format_and_learnable_images(toy):
    manifest = json.loads((toy.root / "manifest.json").read_text())
    sizes = json.loads((toy.root / "sizes.json").read_text())
    assert manifest["format"] == S.FORMAT
    assert sizes == {n: m["count"] for n, m in manifest["shards"].items()}
    with tarfile.open(toy.root / "train-000002.tar") as tf:
        names = tf.getnames()
        assert names[:4] == ["train_000012.png", "train_000012.cls", "train_000012.clean.cls",
                             "train_000012.idx"]
        assert tf.extractfile("train_000012.idx").read() == b"12"
    cls, clean = toy.labels["train"]["cls"], toy.labels["train"]["clean"]
    assert (cls != clean).sum() == round(0.4 * 21)
    assert manifest["splits"]["train"]["per_class_given"] == np.bincount(cls, minlength=3).tolist()
    # Class-dependent images: nearest class-mean colour recovers the true label of the test split.
    batches = list(S.exact_loader(S.open_split(toy.root, "test"), transform=TF, batch_size=8,
                                  rank=0, world_size=1))
    x = torch.cat([b["image"] for b in batches]).mean(dim=(2, 3))
    y = torch.cat([b["clean"] for b in batches])
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    pred = torch.cdist(x, means).argmin(1)
    assert (pred == y).float().mean() == 1.0


def test_decode_image_rejects_truncated_and_garbage():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    buf = io.BytesIO()
    Image.new("L", (5, 4), 200).save(buf, "PNG")
    im = S.decode_image(buf.getvalue())
    assert (im.mode, im.size) == ("RGB", (5, 4))
    with pytest.raises(OSError, match="truncated"):
        S.decode_image(truncated_jpeg())
    with pytest.raises(OSError):
        S.decode_image(b"not an image at all")
    with pytest.raises(ValueError):
        S.decode_image(b"")


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
def test_tar_reader_matches_webdataset(tmp_path, fmt):
    """expand_tars + group_samples == webdataset's tar_file_expander + group_by_keys, on long names
    (pax / GNU longname / ustar prefix), with directories and an unwanted .pyd member."""
    prefix = "a.b/" + "deep/" * 11 + "x" * 30 + "_"  # a dotted directory: the key keeps it
    toy = write_toy_shards(tmp_path / "t", counts={"train": [3, 2]}, num_classes=2, tar_format=fmt,
                           key_prefix=prefix)
    path = toy.root / "train-000000.tar"
    with tarfile.open(path, "a", format={"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT,
                                         "ustar": tarfile.USTAR_FORMAT}[fmt]) as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        ti = tarfile.TarInfo("zz_extra.pyd")
        payload = pickle.dumps({"boom": 1})
        ti.size = len(payload)
        tf.addfile(ti, io.BytesIO(payload))
    urls = [{"url": str(p)} for p in sorted(toy.root.glob("train-*.tar"))]
    ours = list(tar.group_samples(tar.expand_tars(iter(urls), wds.reraise_exception), wds.reraise_exception))
    theirs = list(wds.tarfile_samples([dict(u) for u in urls]))
    assert [s["__key__"] for s in theirs][3] == "zz_extra" and "pyd" in theirs[3]
    theirs.pop(3)  # ours never reads the .pyd member, so there is no sample for its key
    assert len(ours) == 5 and len(ours[0]["__key__"]) > 100 and ours[0]["__key__"].startswith("a.b/")
    assert ours == [{k: v for k, v in b.items() if k != "__local_path__"} for b in theirs]


def test_group_samples_skips_eof_and_never_merges_shards():
    files = [{"fname": "k1.idx", "data": b"0", "__url__": "a"}, {},
             {"fname": "k1.cls", "data": b"1", "__url__": "b"},  # same key, next shard
             {"fname": "k2.jpg", "data": b"x", "__url__": "b"}, {}]
    out = list(tar.group_samples(iter(files), wds.reraise_exception))
    assert out == [{"__key__": "k1", "__url__": "a", "idx": b"0"},
                   {"__key__": "k1", "__url__": "b", "cls": b"1"},
                   {"__key__": "k2", "__url__": "b", "jpg": b"x"}]


def test_broken_tar_is_a_counted_stream_error(tmp_path):
    d = write_toy_shards(tmp_path / "d", counts={"train": [4, 4]}, num_classes=2)
    info = S.open_split(d.root, "train")  # opened intact: the cut below happens while a run reads
    p = d.root / "train-000001.tar"
    p.write_bytes(p.read_bytes()[:1300])  # cut inside the second sample
    c = stages._Counters()
    h = stages.CountingHandler(c)
    urls = [{"url": str(x)} for x in sorted(d.root.glob("train-*.tar"))]
    keys = [s["__key__"] for s in tar.group_samples(tar.expand_tars(iter(urls), h), h)]
    assert keys[:5] == [f"train_{i:06d}" for i in range(5)] and c.errors == 1
    # Exact mode: the loss shows up as missing idx, on every rank alike, in the same step count.
    steps, batches, loaders = exact_pass(info, world=2, bs=3)
    assert steps == [2, 2]
    assert loaders[1].stats()["seen"] < 4 and loaders[1].stats()["errors"] == 1
    idx = torch.cat([b["idx"] for bl in batches for b in bl])
    with pytest.raises(Exception, match="missing"):
        check_coverage(idx[idx >= 0].numpy(), info.num_samples)


# ---------------------------------------------------------------------------------------------
# Exact-once, lockstep reading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,bs", [(1, 4), (2, 4), (3, 2), (3, 5)])
def test_exact_once_every_idx_once_equal_steps(toy, world, bs):
    info = S.open_split(toy.root, "train")
    steps, batches, loaders = exact_pass(info, world=world, bs=bs)
    want = S.exact_steps(info.shard_sizes, batch_size=bs, world_size=world, num_workers=0)
    assert steps == [want] * world and all(ld.steps == want for ld in loaders)
    idx = torch.cat([b["idx"] for bl in batches for b in bl])
    check_coverage(idx[idx >= 0].numpy(), 21)  # union == all, no duplicates
    for bl in batches:
        for b in bl:
            assert set(b) == {"image", "idx", "cls", "clean", "ok"}
            assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, 8, 8)
            assert b["idx"].dtype == b["cls"].dtype == b["clean"].dtype == torch.int64
            assert b["ok"].dtype == torch.bool and len(b["idx"]) <= bs
            real = b["idx"] >= 0
            if not real.all():  # a padding batch: one row, copied from a real sample
                assert len(b["idx"]) == 1 and not b["ok"].any() and b["clean"].item() == -1
            i = b["idx"][real].numpy()
            assert (b["cls"][real].numpy() == toy.labels["train"]["cls"][i]).all()
            assert (b["clean"][real].numpy() == toy.labels["train"]["clean"][i]).all()
            assert (b["ok"][real].numpy() == ~np.isin(i, CORRUPT)).all()
    for r, ld in enumerate(loaders):
        st = ld.stats()
        assert st["seen"] == st["expected"] == sum(UNEVEN[i] for i in range(r, 4, world))
        assert st["real_steps"] + st["padding_steps"] == want


def test_exact_corrupt_rows_are_zero_images(toy):
    info = S.open_split(toy.root, "train")
    rows = {}
    for b in S.exact_loader(info, transform=TF, batch_size=4, rank=0, world_size=1):
        for j, i in enumerate(b["idx"].tolist()):
            rows[i] = (b["image"][j], bool(b["ok"][j]))
    assert sorted(rows) == list(range(21))
    for i in CORRUPT:
        assert rows[i][1] is False and rows[i][0].abs().sum() == 0
    assert all(ok and img.abs().sum() > 0 for i, (img, ok) in rows.items() if i not in CORRUPT)


def test_exact_more_ranks_than_shards_pads_without_hanging(toy):
    info = S.open_split(toy.root, "train")
    steps, batches, loaders = exact_pass(info, world=6, bs=4)
    assert len(set(steps)) == 1 and steps[0] == 2  # the 7-sample shard needs 2 batches
    for r in (4, 5):  # no shard: padding only, with a blank image of the transform's shape
        assert loaders[r].stats()["seen"] == 0
        assert all(b["idx"].tolist() == [-1] and b["image"].shape == (1, 3, 8, 8) for b in batches[r])
    idx = torch.cat([b["idx"] for bl in batches for b in bl])
    check_coverage(idx[idx >= 0].numpy(), 21)


def test_exact_with_worker_processes(toy):
    info = S.open_split(toy.root, "train")
    steps, batches, loaders = exact_pass(info, world=2, bs=2, workers=2)
    want = S.exact_steps(info.shard_sizes, batch_size=2, world_size=2, num_workers=2)
    # rank 0: shards 0, 2 (7 and 6 samples) -> 4 + 3 batches; rank 1: shards 1, 3 -> 3 + 2
    assert want == 7 and steps == [7, 7]
    assert [ld.workers for ld in loaders] == [2, 2]
    idx = torch.cat([b["idx"] for bl in batches for b in bl])
    check_coverage(idx[idx >= 0].numpy(), 21)
    assert loaders[1].stats()["padding_steps"] == 2 and loaders[1].stats()["corrupt"] == 1
    # Workers stack into recycled shared-memory buffers: every batch kept by the caller must still
    # hold its own images after later batches reused the buffer (same pixels as in-process).
    _, inproc, _ = exact_pass(info, world=2, bs=2)

    def by_idx(bls):
        return {int(i): b["image"][j] for bl in bls for b in bl for j, i in enumerate(b["idx"]) if i >= 0}

    a, b = by_idx(batches), by_idx(inproc)
    assert sorted(a) == sorted(b) == list(range(21))
    assert all(torch.equal(a[i], b[i]) for i in a)


# ---------------------------------------------------------------------------------------------
# Training epochs
# ---------------------------------------------------------------------------------------------


def test_shard_order_is_seeded_per_epoch(clean_toy):
    a = S.shard_order(6, seed=3, epoch=0)
    assert a == S.shard_order(6, seed=3, epoch=0) and sorted(a) == list(range(6))
    assert a != S.shard_order(6, seed=3, epoch=1) and a != S.shard_order(6, seed=4, epoch=0)
    asg = S.train_assignment(6, seed=3, epoch=0, world_size=2, num_workers=3)
    assert sorted(u.shard for rank in asg for w in rank for u in w) == list(range(6))
    assert asg[0][0] == [S.ShardPart(a[0], 0, 1)] and asg[1][2] == [S.ShardPart(a[5], 0, 1)]
    # The pipeline uses that order: rank 1's first rows come from its first assigned shard.
    info = S.open_split(clean_toy.root, "train")
    for epoch in (0, 1):
        first = S.train_assignment(6, seed=3, epoch=epoch, world_size=2, num_workers=0)[1][0][0].shard
        ld = S.train_loader(info, transform=TF, batch_size=1, epoch=epoch, seed=3, rank=1,
                            world_size=2, num_workers=0, shuffle_buffer=0, steps=1)
        assert next(iter(ld))["idx"].item() == clean_toy.shard_idx["train"][first][0]


@pytest.mark.parametrize("world,bs", [(1, 4), (2, 2), (3, 3)])
def test_train_lockstep_and_exact_stream_on_uneven_shards(toy, world, bs):
    info = S.open_split(toy.root, "train")
    steps_seen = []
    for r in range(world):
        ld = S.train_loader(info, transform=TF, batch_size=bs, epoch=2, seed=5, rank=r, world_size=world,
                            num_workers=0, shuffle_buffer=0)
        assert ld.steps == max(1, 21 // (bs * world))
        got = [b["idx"].tolist() for b in ld]
        steps_seen.append(len(got))
        asg = S.train_assignment(4, seed=5, epoch=2, world_size=world, num_workers=0)[r]
        want, st = simulate_train(toy, "train", asg, steps=ld.steps, bs=bs, workers=1)
        assert got == want  # full batches, corrupt samples skipped, cycling when a rank runs short
        stats = ld.stats()
        assert stats["seen"] == ld.steps * bs and stats["steps"] == ld.steps
        check_stats(stats, st, 1)
    assert len(set(steps_seen)) == 1


def test_train_with_workers_round_robin_and_stats(toy):
    info = S.open_split(toy.root, "train")
    ld = S.train_loader(info, transform=TF, batch_size=2, epoch=0, seed=0, rank=0, world_size=2,
                        num_workers=2, shuffle_buffer=0, steps=6)
    got = [b["idx"].tolist() for b in ld]
    want, st = simulate_train(toy, "train", ld.assignment, steps=6, bs=2, workers=2)
    assert got == want
    stats = ld.stats()
    assert stats["workers"] == 2 and stats["seen"] == 12
    check_stats(stats, st, 2)


def test_keep_idx_filters_before_decoding(toy):
    info = S.open_split(toy.root, "train")
    keep = {0, 1, 2, 4, 9, 10, 13, 20}           # excludes both corrupt samples
    seen = set()
    filtered = 0
    for r in range(2):
        ld = S.train_loader(info, transform=TF, batch_size=2, epoch=1, seed=0, rank=r, world_size=2,
                            num_workers=0, shuffle_buffer=4, keep_idx=sorted(keep))
        assert ld.steps == 2  # floor(8 / (2 * 2))
        for b in ld:
            seen.update(b["idx"].tolist())
        st = ld.stats()
        # corrupt samples were filtered out before decoding: never counted as corrupt
        assert st["corrupt"] == 0 and st["kept"] >= 4
        filtered += st["filtered"]
    assert seen <= keep and len(seen) >= 4 and filtered > 0


def test_keep_idx_in_another_ranks_shards_falls_back_without_hanging(toy):
    info = S.open_split(toy.root, "train")
    asg = S.train_assignment(4, seed=0, epoch=0, world_size=2, num_workers=0)
    only = toy.shard_idx["train"][asg[0][0][0].shard][0]  # a sample rank 1 does not own
    for r in range(2):
        ld = S.train_loader(info, transform=TF, batch_size=2, epoch=0, seed=0, rank=r, world_size=2,
                            num_workers=0, shuffle_buffer=0, keep_idx=[only])
        got = [b["idx"].tolist() for b in ld]
        assert got == [[only, only]] and ld.steps == 1
        assert ld.stats()["fallback"] == (1 if r == 1 else 0)


def test_train_corrupt_skipped_and_counted(toy):
    info = S.open_split(toy.root, "train")
    seen, corrupt = [], 0
    for r in range(2):
        ld = S.train_loader(info, transform=TF, batch_size=3, epoch=0, seed=1, rank=r, world_size=2,
                            num_workers=0, shuffle_buffer=0, steps=4)
        seen += [i for b in ld for i in b["idx"].tolist()]
        corrupt += ld.stats()["corrupt"]
    assert not set(seen) & set(CORRUPT) and len(seen) == 24
    assert corrupt >= 2  # both corrupt samples lie in shards some rank read: counted, not raised


def test_all_corrupt_is_an_error_not_a_spin(tmp_path, monkeypatch):
    d = write_toy_shards(tmp_path / "d", counts={"train": [3, 3]}, num_classes=2,
                         corrupt={"train": range(6)})
    monkeypatch.setattr(stages, "MAX_CONSECUTIVE_CORRUPT", 25)  # read by the _Decode stage
    ld = S.train_loader(S.open_split(d.root, "train"), transform=TF, batch_size=2, epoch=0, seed=0,
                        rank=0, world_size=1, num_workers=0, shuffle_buffer=0)
    with pytest.raises(DataError, match="25 undecodable samples in a row"):
        list(ld)


def test_train_errors(toy):
    info = S.open_split(toy.root, "train")
    kw = dict(transform=TF, batch_size=2, epoch=0, seed=0, shuffle_buffer=0)
    with pytest.raises(DataError, match=r"4 shard\(s\) for 2 rank\(s\) x 3 worker\(s\).*--shard-size at "
                                        r"most 3 or set data.num_workers to 2"):
        S.train_loader(info, rank=0, world_size=2, num_workers=3, share_shards=False, **kw)
    with pytest.raises(DataError, match=r"4 shard\(s\) for 5 rank\(s\).*--shard-size at most 4$"):
        S.train_loader(info, rank=0, world_size=5, num_workers=0, share_shards=False, **kw)
    with pytest.raises(DataError, match="keep_idx is empty"):
        S.train_loader(info, rank=0, world_size=1, num_workers=0, keep_idx=[], **kw)
    with pytest.raises(DataError, match="outside"):
        S.train_loader(info, rank=0, world_size=1, num_workers=0, keep_idx=[3, 21], **kw)
    one = S.train_loader(info, rank=0, world_size=2, num_workers=2, keep_idx=np.array([5]), **kw)
    assert one.steps == 1 and len(one) == 1  # at least one step when anything is kept


@pytest.mark.parametrize("counts,world,workers", [([7, 5, 6, 3], 3, 2), ([9], 2, 0), ([4, 6], 3, 0)])
def test_fewer_shards_than_readers_are_shared_in_lockstep(tmp_path, counts, world, workers):
    toy = write_toy_shards(tmp_path / "s", counts={"train": counts}, num_classes=3, seed=3,
                           corrupt={"train": [1]})
    info = S.open_split(toy.root, "train")
    m = S.shard_parts(len(counts), world_size=world, num_workers=workers)
    readers = world * max(1, workers)
    assert m > 1 and len(counts) * m >= readers
    asg = S.train_assignment(len(counts), seed=0, epoch=0, world_size=world, num_workers=workers)
    assert all(len(w) >= 1 for rank in asg for w in rank)  # nobody starves
    parts = sorted(i for rank in asg for w in rank for u in w
                   for i in toy.shard_idx["train"][u.shard][u.part::u.parts])
    assert parts == list(range(sum(counts)))  # the parts partition the split
    steps = []
    for r in range(world):
        ld = S.train_loader(info, transform=TF, batch_size=2, epoch=0, seed=0, rank=r, world_size=world,
                            num_workers=workers, shuffle_buffer=0)
        got = [b["idx"].tolist() for b in ld]
        want, st = simulate_train(toy, "train", asg[r], steps=ld.steps, bs=2, workers=max(1, workers))
        assert got == want
        check_stats(ld.stats(), st, max(1, workers))
        steps.append(len(got))
    assert steps == [max(1, sum(counts) // (2 * world))] * world


def test_shuffle_buffer_is_seeded_and_epoch_dependent(clean_toy):
    info = S.open_split(clean_toy.root, "train")

    def run(epoch, buf):
        ld = S.train_loader(info, transform=TF, batch_size=5, epoch=epoch, seed=0, rank=0, world_size=1,
                            num_workers=0, shuffle_buffer=buf, steps=6)
        return [i for b in ld for i in b["idx"].tolist()]

    plain, a = run(0, 0), run(0, 8)
    assert a == run(0, 8) and a != plain and set(a) <= set(range(30))
    assert len(set(a)) >= 20  # a buffer of 8 over one pass: mostly distinct samples, few repeats
    assert run(1, 8) != a


def test_pipelines_are_picklable(toy):
    info = S.open_split(toy.root, "train")
    ld = S.train_loader(info, transform=TF, batch_size=2, epoch=0, seed=0, rank=0, world_size=1,
                        num_workers=0, shuffle_buffer=3, steps=3)
    direct = [b["meta"].tolist() for b, _ in zip(ld.pipeline(), range(3))]
    copy = pickle.loads(pickle.dumps(ld.pipeline()))
    assert [b["meta"].tolist() for b, _ in zip(copy, range(3))] == direct
    ex = S.exact_loader(info, transform=TF, batch_size=4, rank=1, world_size=2)

    def items(p):  # batches and the stats-only trailer
        return [(b["meta"].tolist() if "meta" in b else None, b["stats"].tolist()) for b in p]

    direct = items(ex.pipeline())
    assert items(pickle.loads(pickle.dumps(ex.pipeline()))) == direct and direct[-1][0] is None


# ---------------------------------------------------------------------------------------------
# Acceptance: two real ranks x two workers, uneven shards, in lockstep
# ---------------------------------------------------------------------------------------------


@pytest.mark.multirank
def test_two_ranks_two_workers_read_an_epoch_in_lockstep(tmp_path):
    counts, bad = [9, 4, 7, 5, 6], [2, 15]  # 31 samples, 5 uneven shards >= 2 ranks x 2 workers
    toy = write_toy_shards(tmp_path / "acc", counts={"train": counts}, num_classes=3, noise_rate=0.3,
                           corrupt={"train": bad}, fmt="jpg", seed=4)
    script = Path(__file__).resolve().parent / "scripts" / "read_epoch.py"
    cmd = [launch.sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(launch.free_port()), str(script),
           "--shards", str(toy.root), "--batch-size", "3", "--workers", "2", "--seed", "7",
           "--epoch", "1", "--shuffle-buffer", "0"]
    out = launch.last_json(launch.check(launch.run(cmd, timeout=180)).stdout)
    ranks = out["ranks"]
    assert out["world"] == 2 and [r["rank"] for r in ranks] == [0, 1]
    steps = 31 // (3 * 2)
    # Lockstep: the same number of train and exact steps on both ranks (and a collective per step).
    assert [r["train_steps"] for r in ranks] == [steps, steps] and out["step_sums"][0] == 2 * steps
    ex_steps = S.exact_steps(counts, batch_size=3, world_size=2, num_workers=2)
    assert [r["exact_steps"] for r in ranks] == [ex_steps, ex_steps]
    assert all(r["loader_steps"] == [steps, ex_steps] for r in ranks)
    # Train: exactly the documented stream (epoch-1 shard order, round-robin workers, corrupt skipped).
    asg = S.train_assignment(5, seed=7, epoch=1, world_size=2, num_workers=2)
    for r in ranks:
        want, st = simulate_train(toy, "train", asg[r["rank"]], steps=steps, bs=3, workers=2)
        assert r["train_batches"] == want
        s = r["train_stats"]
        assert s["seen"] == steps * 3 and s["workers"] == 2
        check_stats(s, st, 2)
    assert sum(r["train_stats"]["corrupt"] for r in ranks) >= 1
    # Exact: every idx once (checked by gather_by_idx in the script), corrupt ones flagged not lost.
    assert out["exact_not_ok"] == bad
    assert out["exact_cls"] == toy.labels["train"]["cls"].tolist()
    assert sum(r["exact_stats"]["seen"] for r in ranks) == 31
