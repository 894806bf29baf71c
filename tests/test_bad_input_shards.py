"""Bad shards and a bad place for the feature cache (issue #13, "Nothing lost").

1. manifest.json / sizes.json of the wrong shape: one line naming the file and the field path.
2. Shard names that leave the shards directory: refused before anything is opened.
3. An image over the pixel limit inside a shard: undecodable (counted), never decoded.
4. Read-only shards: the feature cache falls back to the run directory, decided before extraction;
   an unwritable ``features.cache_dir`` is one line before extraction.
5. A full disk while the feature cache is written: one warning naming the file, no temporary left.

Every run is one in-process rank (``turnctl.cli.run``) of the tiny recipe with ``lp-gce`` (the
shortest method that extracts features), so that faults can be injected with monkeypatch. Tests
run as root here, where chmod does not stop a write: read-only storage is injected as the
EROFS that a read-only mount gives.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pathlib
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from shardgen import write_toy_shards
from turnctl.cli import run as cli_run

COUNTS = {"train": [20, 20], "test": [8]}


def _toy(tmp_path: Path, **kw):
    return write_toy_shards(tmp_path / "toy", counts=COUNTS, num_classes=4, image_size=16, seed=0, **kw)


def _train(shards: Path, out: Path, *extra: str) -> int:
    return cli_run(["train", "--recipe", "tiny", "--method", "lp-gce", "--shards", str(shards), "--out", str(out),
                    "--json", "--set", "data.num_workers=0", "--set", "features.batch_size=16", *extra])


def _error_lines(err: str):
    return [line for line in err.splitlines() if "turnctl: " in line and "error" in line]


def _one_error(capsys, rc: int) -> str:
    """The run failed as a user error: exit 2, exactly one error line, no traceback; that line."""
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("turnctl: error: "), err[-3000:]
    assert "internal error" not in err and "Traceback" not in err
    return lines[0]


def _result(capsys, rc: int):
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-3000:]
    assert "internal error" not in cap.err
    return json.loads(cap.out.strip().splitlines()[-1]), cap.err


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    new = edit(obj)
    path.write_text(json.dumps(obj if new is None else new))


def _rehash(root: Path, name: str) -> None:
    """Make the manifest agree with a shard rewritten on purpose (so only the planted fault shows)."""
    p = root / name

    def edit(m):
        m["shards"][name].update(sha256=hashlib.sha256(p.read_bytes()).hexdigest(), bytes=p.stat().st_size)

    _edit_json(root / "manifest.json", edit)


def _replace_image(root: Path, shard: str, idx: int, data: bytes) -> None:
    """Put ``data`` as the PNG of sample ``idx`` in ``shard`` (member order and the rest unchanged)."""
    p = root / shard
    with tarfile.open(p) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(p, "w", format=tarfile.PAX_FORMAT) as tf:
        for m, payload in members:
            if m.name == f"train_{idx:06d}.png":
                payload = data
            m.size = len(payload)
            tf.addfile(m, io.BytesIO(payload))
    _rehash(root, shard)


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels but carries (almost) no data: a
    decompression bomb's shape, without the cost of making a real one."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# 1. manifest.json / sizes.json schema
# ---------------------------------------------------------------------------------------------


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


def _drop(*keys):
    def edit(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return edit


MANIFEST_CASES = {
    "splits-a-list": (_set("splits", ["train", "test"]), "splits: expected a JSON object, got a list"),
    "shard-entry-a-string": (_set("shards", "train-000000.tar", "train"),
                             "shards.train-000000.tar: expected a JSON object, got 'train'"),
    "num-classes-abc": (_set("num_classes", "abc"), "num_classes: expected an integer, got 'abc'"),
    "num-classes-zero": (_set("num_classes", 0), "num_classes: expected an integer >= 1, got 0"),
    "split-count-abc": (_set("splits", "train", "count", "abc"), "splits.train.count: expected an integer, got 'abc'"),
    "shard-count-negative": (_set("shards", "train-000001.tar", "count", -20),
                             "shards.train-000001.tar.count: expected an integer >= 0, got -20"),
    "shard-bytes-float": (_set("shards", "train-000000.tar", "bytes", 1.5),
                          "shards.train-000000.tar.bytes: expected an integer, got 1.5"),
    "has-clean-a-string": (_set("splits", "train", "has_clean", "yes"),
                           "splits.train.has_clean: expected true or false, got 'yes'"),
    "split-shards-a-string": (_set("splits", "train", "shards", "train-000000.tar"),
                              "splits.train.shards: expected a list of shard file names or their number, "
                              "got 'train-000000.tar'"),
    "class-names-numbers": (_set("class_names", [0, 1, 2, 3]), "class_names.0: expected a string, got 0"),
    "no-shards-table": (_drop("shards"), "shards: missing"),
    "shard-without-split": (_drop("shards", "train-000000.tar", "split"), "shards.train-000000.tar.split: missing"),
    "shard-without-count": (_drop("shards", "train-000000.tar", "count"), "shards.train-000000.tar.count: missing"),
    "not-an-object": (lambda m: [m], "expected a JSON object, got a list"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_manifest_of_the_wrong_shape_is_one_line_naming_the_field(tmp_path, capsys, case):
    edit, want = MANIFEST_CASES[case]
    toy = _toy(tmp_path)
    _edit_json(toy.root / "manifest.json", edit)
    line = _one_error(capsys, _train(toy.root, tmp_path / "run"))
    assert f"{toy.root / 'manifest.json'}: {want}" in line
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


SIZES_CASES = {
    "a-string": ({"train-000000.tar": "20"}, "train-000000.tar: expected an integer, got '20'"),
    "a-float": ({"train-000000.tar": 20.5}, "train-000000.tar: expected an integer, got 20.5"),
    "negative": ({"train-000001.tar": -20}, "train-000001.tar: expected an integer >= 0, got -20"),
    "null": ({"test-000000.tar": None}, "test-000000.tar: expected an integer, got null"),
    "a-list": ([20, 20, 8], "expected a JSON object, got a list"),
}


@pytest.mark.parametrize("case", sorted(SIZES_CASES))
def test_sizes_json_of_the_wrong_shape_is_one_line_naming_the_entry(tmp_path, capsys, case):
    patch, want = SIZES_CASES[case]
    toy = _toy(tmp_path)
    _edit_json(toy.root / "sizes.json", lambda s: patch if isinstance(patch, list) else s.update(patch))
    line = _one_error(capsys, _train(toy.root, tmp_path / "run"))
    assert f"{toy.root / 'sizes.json'}: {want}" in line


@pytest.mark.parametrize("name", ["manifest.json", "sizes.json"])
def test_oversized_metadata_is_refused_before_it_is_read(tmp_path, capsys, name):
    from turnctl import data as S

    toy = _toy(tmp_path)
    limit = S.MAX_MANIFEST_BYTES if name == "manifest.json" else S.MAX_SIZES_BYTES
    p = toy.root / name
    with open(p, "r+b") as f:  # sparse: the size a stat sees, without the disk or the memory
        f.truncate(limit + 1)
    line = _one_error(capsys, _train(toy.root, tmp_path / "run"))
    assert f"{p}: {limit + 1:,} bytes, more than the {limit:,} a {name} may have" in line


# ---------------------------------------------------------------------------------------------
# 2. shard names stay inside the shards directory
# ---------------------------------------------------------------------------------------------


def _rename_shard(root: Path, old: str, new: str) -> None:
    def manifest(m):
        m["shards"][new] = m["shards"].pop(old)
        for s in m["splits"].values():
            s["shards"] = [new if n == old else n for n in s["shards"]]

    _edit_json(root / "manifest.json", manifest)
    _edit_json(root / "sizes.json", lambda s: s.__setitem__(new, s.pop(old)))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "subdirectory", "etc-hostname"])
def test_shard_names_must_be_plain_file_names_inside_the_directory(tmp_path, capsys, how):
    """A manifest that names a real, intact shard outside its directory: before, turnctl trained
    on it; now the name alone is refused, before any file it names is opened."""
    toy = _toy(tmp_path)
    src = toy.root / "train-000001.tar"
    if how == "absolute":
        dst = tmp_path / "elsewhere" / "train-000001.tar"
        name = str(dst)
    elif how == "dotdot":
        dst = tmp_path / "outside.tar"
        name = "../outside.tar"
    elif how == "subdirectory":
        dst = toy.root / "sub" / "train-000001.tar"
        name = "sub/train-000001.tar"
    else:
        dst, name = None, "/etc/hostname"
    if dst is not None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dst)
    _rename_shard(toy.root, "train-000001.tar", name)
    line = _one_error(capsys, _train(toy.root, tmp_path / "run"))
    assert f"{toy.root / 'manifest.json'}: shard name {name!r} is not a plain file name inside {toy.root}" in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# 3. the pixel limit applies to shard members too
# ---------------------------------------------------------------------------------------------


def test_decode_image_refuses_a_declared_bomb_before_decoding():
    from turnctl import pixels
    from turnctl.data import decode_image

    with pytest.raises(pixels.TooManyPixels, match=r"10000 x 10000 = 100,000,000 pixels"):
        decode_image(_png_declaring(10_000, 10_000))


def test_a_bomb_in_a_shard_is_counted_undecodable_with_its_size(tmp_path, caplog):
    from turnctl.data import ToTensorResize, exact_loader, open_split, train_loader

    toy = _toy(tmp_path)
    _replace_image(toy.root, "train-000000.tar", 3, _png_declaring(10_000, 10_000))
    info = open_split(toy.root, "train")
    with caplog.at_level("WARNING", logger="turnctl"):
        rows = {}
        ld = exact_loader(info, transform=ToTensorResize(16), batch_size=8, rank=0, world_size=1)
        for b in ld:
            rows.update(zip(b["idx"].tolist(), b["ok"].tolist()))
        assert ld.stats()["corrupt"] == 1 and rows[3] is False and sum(rows.values()) == 39
        tl = train_loader(info, transform=ToTensorResize(16), batch_size=8, epoch=0, seed=0, rank=0,
                          world_size=1, num_workers=0, shuffle_buffer=0)
        seen = [i for b in tl for i in b["idx"].tolist()]
        assert 3 not in seen and tl.stats()["corrupt"] >= 1
    assert any("train_000003" in r.getMessage() and "10000 x 10000" in r.getMessage() for r in caplog.records)


def test_train_counts_an_image_over_the_pixel_limit_as_undecodable(tmp_path, capsys, monkeypatch):
    """End to end: a 40 x 40 image among 16 x 16 ones with the limit lowered to 1,000 pixels (the
    same code path as a 100-megapixel PNG at the real limit, without the memory)."""
    from turnctl import pixels

    toy = _toy(tmp_path)
    _replace_image(toy.root, "train-000001.tar", 25, _png(40))
    monkeypatch.setattr(pixels, "MAX_PIXELS", 1000)
    result, err = _result(capsys, _train(toy.root, tmp_path / "run"))
    assert result["train_undecodable"] == 1 and result["test_undecodable"] == 0
    assert "train_000025" in err and "40 x 40 = 1,600 pixels, more than the limit of 1,000" in err


# ---------------------------------------------------------------------------------------------
# 4. read-only shards: where the feature cache goes
# ---------------------------------------------------------------------------------------------


def _erofs(exc_path) -> OSError:
    return OSError(errno.EROFS, os.strerror(errno.EROFS), str(exc_path))


def _read_only_below(monkeypatch, root: Path) -> None:
    """Directories cannot be created under ``root``: what a read-only mount does to the cache."""
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(root)):
            raise _erofs(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


def test_the_writability_probe(tmp_path, monkeypatch):
    import turnctl.rundir as R  # the one writability probe (features, compare, run directories)

    target = tmp_path / "a" / "b"
    assert R.unwritable(target) is None
    assert target.is_dir() and list(target.iterdir()) == []  # the probe file is gone
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert R.unwritable(a_file / "cache") == "Not a directory"
    assert R.unwritable(a_file) == "File exists"

    def refuse(*args, **kwargs):
        raise _erofs(kwargs.get("dir"))

    monkeypatch.setattr(R.tempfile, "mkstemp", refuse)  # the directory exists, a file cannot be made
    assert R.unwritable(target) == "Read-only file system"


def test_choose_cache_dir(tmp_path, monkeypatch, caplog):
    from turnctl import features as F
    from turnctl.errors import DataError

    shards, run = tmp_path / "shards", tmp_path / "run"
    shards.mkdir()
    assert F.choose_cache_dir(None, str(shards), run) == F.CachePlan(shards / ".features")
    assert F.choose_cache_dir(str(tmp_path / "c"), str(shards), run) == F.CachePlan(tmp_path / "c")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"features.cache_dir=.*/file/c: cannot write there \(Not a directory\)"):
        F.choose_cache_dir(str(tmp_path / "file" / "c"), str(shards), run)
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only_below(monkeypatch, ro)
    with caplog.at_level("WARNING", logger="turnctl"):
        plan = F.choose_cache_dir(None, str(ro), run)
    assert plan == F.CachePlan(run / "features-cache", (ro / ".features",))
    assert [r.getMessage() for r in caplog.records] == [
        f"features: {ro / '.features'} is not writable (Read-only file system); caching this run's features "
        f"in {run / 'features-cache'} instead (set features.cache_dir to a writable directory to share "
        "them between runs)"]


def test_read_only_shards_cache_features_in_the_run_directory(tmp_path, capsys, monkeypatch):
    """Before: the whole feature pass, then `internal error: OSError: [Errno 30] Read-only file
    system: '.../.features'`. Now: one notice, the cache in the run directory, the run completes."""
    toy = _toy(tmp_path)
    _read_only_below(monkeypatch, toy.root)
    out = tmp_path / "run"
    result, err = _result(capsys, _train(toy.root, out))
    assert result["feature_cache"] == {"train": "miss", "test": "miss"}
    notices = [line for line in err.splitlines() if "is not writable" in line]
    assert len(notices) == 1 and str(toy.root / ".features") in notices[0]
    assert "Read-only file system" in notices[0] and str(out / "features-cache") in notices[0]
    assert len(list((out / "features-cache").glob("*/*.safetensors"))) == 2
    assert not (toy.root / ".features").exists()


def test_read_only_shards_still_serve_their_own_cache(tmp_path, capsys, monkeypatch):
    toy = _toy(tmp_path)
    first, _ = _result(capsys, _train(toy.root, tmp_path / "a"))  # writable: fills <shards>/.features
    assert first["feature_cache"] == {"train": "miss", "test": "miss"}
    _read_only_below(monkeypatch, toy.root)  # then the dataset is mounted read-only
    second, _ = _result(capsys, _train(toy.root, tmp_path / "b"))
    assert second["feature_cache"] == {"train": "hit", "test": "hit"}
    assert not list((tmp_path / "b").glob("features-cache/*/*.safetensors"))  # nothing extracted again


def test_an_unwritable_cache_dir_is_one_line_before_extraction(tmp_path, capsys):
    toy = _toy(tmp_path)
    (tmp_path / "file").write_text("not a directory")
    cache = tmp_path / "file" / "cache"
    rc = _train(toy.root, tmp_path / "run", "--set", f"features.cache_dir={cache}")
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert _error_lines(err) == [f"turnctl: error: features.cache_dir={cache}: cannot write there (Not a "
                                 "directory); set it to a writable directory, or features.cache=false"]
    assert "internal error" not in err and "Traceback" not in err
    assert "features [train]" not in err  # no feature pass was spent


# ---------------------------------------------------------------------------------------------
# 5. a full disk while the cache is written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raised_as", ["safetensors", "oserror"])
def test_a_full_disk_while_caching_is_one_warning_and_no_temporary(tmp_path, capsys, monkeypatch, raised_as):
    """ENOSPC half-way through the cache file (safetensors reports it as its own error; the fsync
    or the rename raise an OSError): the run goes on with the features in memory."""
    import safetensors.torch
    from safetensors import SafetensorError

    real_save = safetensors.torch.save_file
    toy = _toy(tmp_path)
    cache = toy.root / ".features"

    def full_disk(tensors, filename, metadata=None):
        if not str(filename).startswith(str(cache)):  # the export in <run>/final is not the cache
            return real_save(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # what was written before the disk filled up
        if raised_as == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    result, err = _result(capsys, _train(toy.root, tmp_path / "run"))
    assert result["feature_cache"] == {"train": "miss", "test": "miss"}
    warnings = [line for line in err.splitlines() if "cannot write the feature cache" in line]
    assert len(warnings) == 2  # one per split, each naming its file
    train_line = next(line for line in warnings if "features [train]" in line)
    assert "/train.safetensors (No space left on device)" in train_line
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # no temporary, no partial file
