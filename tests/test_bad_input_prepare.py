"""`turnctl prepare` on bad input (issue #13, "Nothing lost").

Nothing of the user's is deleted or silently mixed into a dataset, every mistake is one line on
stderr with exit status 2 naming the path or value to fix, and a write that fails (disk full)
leaves nothing behind. Each test drives the real CLI on digits or an ImageFolder of a few tiny
JPEGs; the disk-full and fork-storm cases are injected (a patched ``open``, a fake process pool) so
that the old code fails the test without filling a disk or forking 100,000 processes.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import types
import zlib
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

import turnctl.pixels
from test_prepare import clothing, error_line, jpeg, manifest, prepare, read_split, shard_hashes  # noqa: F401 (a fixture)
from turnctl.prepare import pipeline, valsplit
from turnctl.prepare import writer as writer_mod


def folder(root: Path, layout: Dict[str, Dict[str, int]], *, w: int = 12, h: int = 10, seed: int = 0) -> Path:
    """``root/<split>/<class>/<class><i>.jpg``: ``layout[split][class]`` tiny JPEGs (0 = an empty folder)."""
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / c / f"{c}{i}.jpg").write_bytes(jpeg(rng, w, h))
    return root


def files_under(root: Path) -> Dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def record_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so the test sees whether (and how often) it ran."""
    calls: list = []
    real = getattr(module, name)

    def wrapped(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return calls


# -- 1. --overwrite deletes only turnctl's own output; --out never overlaps --root ------------------

def test_overwrite_replaces_only_what_turnctl_wrote(tmp_path, capsys):
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "thesis.txt").write_text("four years")
    (thesis / "chapters" / "one.tex").write_text("\\chapter{One}")
    assert prepare("digits", "--out", str(thesis), "--overwrite", "--workers", "1") == 2
    line = error_line(capsys)
    assert f"--out {thesis} is not empty and was not written by turnctl prepare" in line and "thesis.txt" in line
    assert files_under(thesis) == {"chapters/one.tex": b"\\chapter{One}", "thesis.txt": b"four years"}
    assert prepare("digits", "--out", str(thesis), "--workers", "1") == 2  # without --overwrite: the same
    assert "not written by turnctl prepare" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no partial, no .old left

    other = tmp_path / "other"  # a manifest.json, but not turnctl's
    other.mkdir()
    (other / "manifest.json").write_text('{"format": "someone-else/2"}')
    assert prepare("digits", "--out", str(other), "--overwrite", "--workers", "1") == 2
    assert "not written by turnctl prepare" in error_line(capsys)
    assert (other / "manifest.json").read_text() == '{"format": "someone-else/2"}'

    # replaced: an empty folder, turnctl's own output, and an interrupted run's leftovers
    out = tmp_path / "out"
    out.mkdir()
    mine = tmp_path / "out.partial-999999999"  # named like a dead run's partial output, but the user's
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert prepare("digits", "--out", str(out), "--overwrite", "--workers", "1") == 0
    assert manifest(out)["format"] == "turnctl-shards/1"
    assert (mine / "notes.txt").read_text() == "mine"
    assert prepare("digits", "--out", str(out), "--overwrite", "--noise", "symmetric:0.5", "--workers", "1") == 0
    assert manifest(out)["noise"]["rate"] == 0.5
    leftover = tmp_path / "leftover"
    leftover.mkdir()
    for name in ("train-000000.tar", ".train-000001.tar.tmp", "sizes.json", ".sizes.json.tmp"):
        (leftover / name).write_bytes(b"junk")
    assert prepare("digits", "--out", str(leftover), "--overwrite", "--workers", "1") == 0
    assert manifest(leftover)["dataset"] == "digits" and not (leftover / ".train-000001.tar.tmp").exists()


def test_out_equal_inside_or_above_root_is_refused_before_reading(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw"
    root = folder(raw / "X", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    before = files_under(raw)
    link = tmp_path / "link-to-X"
    link.symlink_to(root, target_is_directory=True)
    calls = record_calls(monkeypatch, pipeline, "load_source")
    for out, where in ((root, "is"), (raw, "contains"), (root / "shards", "is inside"), (link, "is")):
        assert prepare("imagefolder", "--root", str(root), "--out", str(out), "--overwrite", "--workers", "1") == 2
        line = error_line(capsys)
        assert f"--out {out} {where} --root {root}" in line, line
    assert "both resolve to" in line  # the symlink: named, and what it resolves to
    assert calls == [] and files_under(raw) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link-to-X", "raw"]


# -- 2. --workers ----------------------------------------------------------------------------------

def test_workers_are_capped_at_the_cpus_and_checked(tmp_path, monkeypatch, capsys):
    asked = []

    class FakePool:  # what the old code would have forked, without forking it
        def __init__(self, n):
            asked.append(n)
            self._processes = n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def imap(self, fn, items, chunksize=1):
            return map(fn, items)

    context = types.SimpleNamespace(Pool=FakePool)
    monkeypatch.setattr(pipeline, "multiprocessing", types.SimpleNamespace(get_context=lambda *a: context))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert prepare("digits", "--out", str(tmp_path / "o"), "--workers", "100000") == 0
    assert max(asked, default=1) <= cpus
    err = capsys.readouterr().err
    assert f"--workers 100000 is more than the {cpus} CPU" in err and f"using {cpus}" in err
    for bad in ("0", "-3"):
        assert prepare("digits", "--out", str(tmp_path / "z"), "--workers", bad) == 2
        line = error_line(capsys)
        assert f"--workers must be a whole number of at least 1, not {bad}" in line
    assert not (tmp_path / "z").exists()


# -- 3. ImageFolder: symlinks and classes without training samples ----------------------------------

def test_imagefolder_symlink_up_or_out_of_the_root_is_refused(tmp_path, capsys):
    root = folder(tmp_path / "f", {"train": {"cat": 3}, "test": {"cat": 1, "dog": 2}})
    out = tmp_path / "o"
    up = root / "train" / "dog"
    up.symlink_to("..", target_is_directory=True)  # train/dog would list train, test, ... as dog
    assert prepare("imagefolder", "--root", str(root), "--out", str(out)) == 2
    line = error_line(capsys)
    assert f"{up} is a symlink to {root.resolve()}" in line and "loop" in line
    up.unlink()

    outside = tmp_path / "elsewhere"
    folder(outside, {"x": {"cat": 1}})
    sneaky = root / "train" / "cat" / "cat9.jpg"
    sneaky.symlink_to(outside / "x" / "cat" / "cat0.jpg")
    assert prepare("imagefolder", "--root", str(root), "--out", str(out)) == 2
    line = error_line(capsys)
    assert f"{sneaky} is a symlink to" in line and "outside the dataset root" in line
    sneaky.unlink()
    (root / "test" / "dog" / "loop").symlink_to("../../test", target_is_directory=True)  # an ancestor, deeper
    assert prepare("imagefolder", "--root", str(root), "--out", str(out)) == 2
    assert f"{root / 'test' / 'dog' / 'loop'} is a symlink" in error_line(capsys)
    (root / "test" / "dog" / "loop").unlink()
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "f"]

    # links that stay inside the root and lead to no folder on their own way down are followed
    folder(root / "store", {"pool": {"dog": 2}}, seed=1)
    (root / "train" / "dog").symlink_to("../store/pool/dog", target_is_directory=True)
    (root / "train" / "cat" / "again.jpg").symlink_to(root / "train" / "cat" / "cat0.jpg")
    assert prepare("imagefolder", "--root", str(root), "--out", str(out), "--workers", "1") == 0
    m = manifest(out)
    assert m["class_names"] == ["cat", "dog"] and m["splits"]["train"]["per_class_given"] == [4, 2]
    assert m["splits"]["test"]["per_class_given"] == [1, 2]


def test_class_without_training_samples_warns_or_fails_with_strict(tmp_path, capsys):
    root = folder(tmp_path / "f", {"train": {"cat": 3, "dog": 2, "eel": 0}, "test": {"cat": 1, "bird": 2}})
    assert prepare("imagefolder", "--root", str(root), "--out", str(tmp_path / "o"), "--workers", "1") == 0
    err = capsys.readouterr().err
    assert "2 of 4 classes have no training samples" in err
    assert "'bird' (train 0, test 2); 'eel' (train 0, test 0)" in err
    assert "train samples per class: bird 0, cat 3, dog 2, eel 0" in err and "--strict" in err
    assert prepare("imagefolder", "--root", str(root), "--out", str(tmp_path / "s"), "--strict") == 2
    line = error_line(capsys)
    assert "'bird' (train 0, test 2)" in line and str(root / "train") in line
    assert not (tmp_path / "s").exists()
    assert prepare("digits", "--strict", "--out", str(tmp_path / "d")) == 2
    assert "--strict only applies to imagefolder" in error_line(capsys)


# -- 4. label files: encodings, BOMs, digits; --noise-seed ------------------------------------------

def test_labels_csv_not_utf8_with_a_bom_or_a_unicode_digit(tmp_path, capsys):
    root = folder(tmp_path / "f", {"train": {"cat": 3, "dog": 3}})
    keys = [f"train/{c}/{c}{i}.jpg" for c in ("cat", "dog") for i in range(3)]
    flipped = {k: 1 if "/cat/" in k else 0 for k in keys}
    rows = "".join(f"{k},{y}\n" for k, y in flipped.items())
    bom = tmp_path / "excel.csv"  # Excel's "CSV UTF-8": a BOM, then no header
    bom.write_bytes(b"\xef\xbb\xbf" + rows.encode())
    out = tmp_path / "o"
    assert prepare("imagefolder", "--root", str(root), "--out", str(out), "--noise", f"file:{bom}",
                   "--workers", "1") == 0
    train = read_split(out, "train")
    assert {s["__key__"]: int(s["cls"]) for s in train} == {k.replace("/", "_").replace(".", "_"): y
                                                           for k, y in flipped.items()}

    latin = tmp_path / "latin1.csv"
    latin.write_bytes(("key,label\n" + rows + "train/cat/café.jpg,0\n").encode("latin-1"))
    assert prepare("imagefolder", "--root", str(root), "--out", str(tmp_path / "x"), "--noise", f"file:{latin}") == 2
    line = error_line(capsys)
    assert f"{latin}:8: not UTF-8 text (byte 0xe9" in line

    sup = tmp_path / "superscript.csv"
    sup.write_text("key,label\n" + rows.replace("train/cat/cat1.jpg,1", "train/cat/cat1.jpg,²"), encoding="utf-8")
    assert prepare("imagefolder", "--root", str(root), "--out", str(tmp_path / "x"), "--noise", f"file:{sup}") == 2
    line = error_line(capsys)
    assert f"{sup}:3: label '²' of key 'train/cat/cat1.jpg' is not an integer" in line
    assert not (tmp_path / "x").exists()


def test_listed_label_files_bom_non_utf8_and_unicode_digits(clothing, tmp_path, capsys):  # noqa: F811
    root, ann = clothing["root"], clothing["root"] / "annotations"
    key_list = ann / "noisy_train_key_list.txt"
    key_list.write_bytes(b"\xef\xbb\xbf" + key_list.read_bytes())  # saved by a Windows editor
    assert prepare("clothing1m", "--root", str(root), "--out", str(tmp_path / "o"), "--workers", "1") == 0
    assert manifest(tmp_path / "o")["splits"]["train"]["count"] == 10  # 12 listed, 2 unreadable

    kv = ann / "noisy_label_kv.txt"
    good = kv.read_text()
    first = good.splitlines()[0].rsplit(" ", 1)[0]
    kv.write_text(good.replace(f"{first} 0\n", f"{first} ²\n", 1), encoding="utf-8")
    assert prepare("clothing1m", "--root", str(root), "--out", str(tmp_path / "x")) == 2
    assert f"{kv}:1: expected '<path> <label>', found '{first} ²'" in error_line(capsys)
    kv.write_bytes(good.encode() + b"images/9/x.jpg \xff\n")
    assert prepare("clothing1m", "--root", str(root), "--out", str(tmp_path / "x")) == 2
    assert f"{kv}:13: not UTF-8 text (byte 0xff" in error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_negative_noise_seed_is_one_line(tmp_path, capsys):
    assert prepare("digits", "--noise", "symmetric:0.5", "--noise-seed", "-1", "--out", str(tmp_path / "o")) == 2
    assert "--noise-seed must be a whole number of 0 or more, not -1" in error_line(capsys)
    assert not (tmp_path / "o").exists()


# -- 5. unwritable --out, full disk -----------------------------------------------------------------

def test_unwritable_out_is_found_before_reading_anything(tmp_path, monkeypatch, capsys):
    calls = record_calls(monkeypatch, pipeline, "load_source")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "shards"
    assert prepare("digits", "--out", str(out)) == 2
    line = error_line(capsys)
    assert f"--out {out}: cannot create {blocker}" in line
    assert calls == [] and blocker.read_text() == "not a folder"


class _FullDisk:
    """``open`` for a disk with ``free`` bytes left: writes beyond them fail with ENOSPC."""

    def __init__(self, free: int):
        self.free = free

    def __call__(self, *args, **kwargs):
        disk, fh = self, open(*args, **kwargs)

        class File:
            def write(self, data):
                if len(data) > disk.free:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.free -= len(data)
                return fh.write(data)

            def __getattr__(self, name):
                return getattr(fh, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                fh.close()
                return False

        return File()


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    assert prepare("digits", "--out", str(out), "--workers", "1") == 0
    before = shard_hashes(out)
    monkeypatch.setattr(writer_mod, "open", _FullDisk(300_000), raising=False)
    assert prepare("digits", "--out", str(out), "--overwrite", "--noise", "symmetric:0.5", "--workers", "1") == 2
    line = error_line(capsys)
    assert f"--out {out}: cannot write {tmp_path}/o.partial-{os.getpid()}/.train-" in line
    assert "No space left on device; the dataset needs more than the " in line and "kB written so far" in line
    assert shard_hashes(out) == before  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]

    # a fresh --out: the folders made for it go too; the val hold-out's spool file as well
    monkeypatch.setattr(valsplit, "open", _FullDisk(50_000), raising=False)
    fresh = tmp_path / "new" / "deep" / "o"
    assert prepare("digits", "--out", str(fresh), "--val-fraction", "0.2", "--workers", "1") == 2
    line = error_line(capsys)
    assert f"--out {fresh}: cannot write {fresh}.partial-{os.getpid()}/{valsplit.SPOOL_NAME}" in line
    assert "No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(path, size, ro)``: a small tmpfs at ``path``, unmounted afterwards; skips where this
    process may not mount (not root, no CAP_SYS_ADMIN, no mount binary)."""
    mounted = []

    def mount(path: Path, size: str = "1m", ro: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True,
                               text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot mount a tmpfs here: {exc}")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], capture_output=True, timeout=20)


def test_a_real_small_disk_read_only_busy_and_full(tmpfs, tmp_path, monkeypatch, capsys):
    if shutil.which("mount") is None:
        pytest.skip("no mount binary")
    calls = record_calls(monkeypatch, pipeline, "load_source")
    ro = tmpfs(tmp_path / "ro", ro=True)
    assert prepare("digits", "--out", str(ro / "o")) == 2
    assert f"--out {ro / 'o'}: cannot write in {ro} (Read-only file system)" in error_line(capsys)
    busy = tmpfs(tmp_path / "busy", size="16m")  # a mount point cannot be renamed away (EBUSY)
    assert prepare("digits", "--out", str(busy)) == 2
    assert f"--out {busy} is a mount point" in error_line(capsys)
    assert calls == []

    full = tmpfs(tmp_path / "full", size="1m")  # digits' shards are about 7 MB
    assert prepare("digits", "--out", str(full / "o"), "--workers", "1") == 2
    line = error_line(capsys)
    assert f"--out {full / 'o'}: cannot write {full}/o.partial-" in line and "No space left on device" in line
    assert list(full.iterdir()) == [] and list(busy.iterdir()) == []


# -- 6. the pixel limit is turnctl.pixels' ----------------------------------------------------------

def png_header(w: int, h: int) -> bytes:
    """A PNG that declares ``w`` x ``h`` RGB pixels and holds none (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_pixel_limit_is_the_one_train_and_eval_apply(tmp_path, monkeypatch):
    root = folder(tmp_path / "f", {"train": {"cat": 3, "dog": 3}})
    (root / "train" / "dog" / "bomb.png").write_bytes(png_header(10_000, 10_000))
    assert prepare("imagefolder", "--root", str(root), "--out", str(tmp_path / "o"), "--noise", "instance:0.5",
                   "--workers", "1") == 0
    skipped = manifest(tmp_path / "o")["splits"]["train"]["skipped"]["items"]
    assert [s["key"] for s in skipped] == ["train_dog_bomb_png"]
    assert "too many pixels: 10000 x 10000 = 100,000,000 pixels, more than the limit of 89,478,485" in \
        skipped[0]["reason"]

    # the bound is turnctl.pixels.MAX_PIXELS, read where prepare decodes: lowered, 12 x 10 is too large
    folder(root, {"train": {"cat": 2, "dog": 2}}, w=8, h=8, seed=5)  # overwrites cat0/cat1/dog0/dog1 as 8x8
    monkeypatch.setattr(turnctl.pixels, "MAX_PIXELS", 100)
    assert prepare("imagefolder", "--root", str(root), "--out", str(tmp_path / "p"), "--workers", "1") == 0
    m = manifest(tmp_path / "p")["splits"]["train"]
    assert m["count"] == 4 and m["per_class_given"] == [2, 2]
    reasons = {s["key"]: s["reason"] for s in m["skipped"]["items"]}
    assert sorted(reasons) == ["train_cat_cat2_jpg", "train_dog_bomb_png", "train_dog_dog2_jpg"]
    assert "12 x 10 = 120 pixels, more than the limit of 100" in reasons["train_cat_cat2_jpg"]


# -- 7. names printed as they are ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["[/x]", "[red]y", os.fsdecode(b"caf\xe9")])
def test_an_out_path_holding_markup_or_non_utf8_bytes_is_printed_as_it_is(tmp_path, capsys, name):
    # Before: the shards were written, then the summary table raised rich's MarkupError (`[/x]`),
    # swallowed `[red]` as a style, or failed to encode the Latin-1 byte: `internal error`, exit 1.
    out = tmp_path / name / "digits"
    assert prepare("digits", "--out", str(out), "--noise", "symmetric:0.2") == 0
    assert (out / "manifest.json").is_file()
    printed = capsys.readouterr().out
    shown = name if name.isprintable() and name.encode("utf-8", "surrogateescape").isascii() else "caf\\xe9"
    assert f"{shown}/digits" in printed.replace("\n", ""), printed
