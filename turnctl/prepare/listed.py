"""File-based datasets: Clothing1M, WebVision 1.0 (and mini-WebVision), ImageFolder.

These only list files and labels; images are read (and unreadable ones skipped) when shards are
written. Each split is written in a seeded shuffled order (``ORDER_SEED``) because the official
lists are sorted by class, and equal-size shards should each mix all classes. Keys are the
image path relative to the dataset root with dots and slashes replaced by '_'.

Clothing1M: train = ``noisy_train_key_list.txt`` labelled by ``noisy_label_kv.txt``
(true label from ``clean_label_kv.txt`` where the key has one); val / test = ``clean_val_key_list``
/ ``clean_test_key_list`` labelled by ``clean_label_kv.txt``. Annotation files are looked up in
``<root>/annotations/`` and then ``<root>/``; image paths are relative to ``<root>``.

WebVision 1.0: train = ``info/train_filelist_google.txt`` + ``info/train_filelist_flickr.txt``;
test = ``info/val_filelist.txt`` with images under ``val_images_256/`` (or ``val_images/``);
classes from ``info/synsets.txt`` (named by WordNet id). ``classes=50`` gives mini-WebVision:
the first 50 classes, Google part only (train and test filtered to those classes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from turnctl.errors import DataError
from turnctl.logger import log
from turnctl.prepare.images import IMAGE_EXTENSIONS
from turnctl.prepare.source import (
    ORDER_SEED, SPLITS, Source, Split, check_range, check_unique, is_int_text, require_file, sanitize_key, shuffled,
)

# Where each dataset's true labels come from (recorded in the manifest as ``clean_labels``).
CLOTHING_CLEAN = ("clean_label_kv.txt: the training samples listed there (per sample; the rest unknown) "
                  "and every val and test sample (their given labels are these clean ones)")
WEBVISION_CLEAN = ("test only (WebVision's human-annotated val set; its given labels are the true ones); "
                   "none for train (web query labels)")
IMAGEFOLDER_VERIFIED = "the folder labels, declared verified by --labels-verified"
IMAGEFOLDER_UNVERIFIED = ("none: folder labels are given labels, not known to be true "
                          "(--labels-verified declares them verified)")

CLOTHING_CLASSES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker", "Jacket",
                    "Downcoat", "Suit", "Shawl", "Dress", "Vest", "Underwear"]


def _lines(path: Path) -> List[Tuple[int, str]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")  # -sig: a BOM (Windows editors) is dropped
    except UnicodeDecodeError as exc:
        at = exc.start + (len(data) - len(exc.object))
        line = data[:at].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[at]:02x} at offset {at}); "
                        f"save it as UTF-8") from None
    return [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]


def read_path_labels(path: Path, *, num_classes: Optional[int] = None) -> List[Tuple[str, int]]:
    """``<path> <label>`` lines (Clothing1M kv files, WebVision file lists) in file order.

    A malformed line or an out-of-range label is a one-line DataError naming ``file:line``.
    """
    out = []
    for lineno, line in _lines(path):
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not is_int_text(parts[1]):
            raise DataError(f"{path}:{lineno}: expected '<path> <label>', found {line[:80]!r}")
        label = int(parts[1])
        if num_classes is not None and not 0 <= label < num_classes:
            raise DataError(f"{path}:{lineno}: label {label} of {parts[0]!r} is outside 0..{num_classes - 1}")
        out.append((parts[0], label))
    return out


def _make_split(name: str, root: Path, rel_paths: List[str], labels: List[int], clean: Optional[List[int]],
                *, where: str) -> Split:
    keys = [sanitize_key(p) for p in rel_paths]
    check_unique(keys, where=where)
    y = np.asarray(labels, dtype=np.int64)
    c = None if clean is None else np.asarray(clean, dtype=np.int64)
    split = Split(name, keys, y, c, [str(root / p) for p in rel_paths])
    return shuffled(split, seed=ORDER_SEED)


# -- Clothing1M -----------------------------------------------------------------------------------

def _annotation(root: Path, name: str) -> Path:
    for d in (root / "annotations", root):
        if (d / name).is_file():
            return d / name
    return require_file(root / "annotations" / name, dataset="clothing1m")


def load_clothing1m(root: Path) -> Source:
    """Clothing1M's official annotation files under ``root`` (14 classes)."""
    root = Path(root)
    names_file = next((d / "category_names_eng.txt" for d in (root / "annotations", root)
                       if (d / "category_names_eng.txt").is_file()), None)
    class_names = list(CLOTHING_CLASSES)
    if names_file is not None:
        class_names = [ln for _, ln in _lines(names_file)]
        if len(class_names) != 14:
            raise DataError(f"{names_file}: {len(class_names)} class names, Clothing1M has 14")
    noisy_kv_file = _annotation(root, "noisy_label_kv.txt")
    clean_kv_file = _annotation(root, "clean_label_kv.txt")
    noisy_kv = dict(read_path_labels(noisy_kv_file, num_classes=14))
    clean_kv = dict(read_path_labels(clean_kv_file, num_classes=14))
    splits: Dict[str, Split] = {}
    files = {"noisy_label_kv": str(noisy_kv_file), "clean_label_kv": str(clean_kv_file)}
    for split, list_name, kv, kv_file in (("train", "noisy_train_key_list.txt", noisy_kv, noisy_kv_file),
                                          ("val", "clean_val_key_list.txt", clean_kv, clean_kv_file),
                                          ("test", "clean_test_key_list.txt", clean_kv, clean_kv_file)):
        list_file = _annotation(root, list_name)
        files[split] = str(list_file)
        paths = [ln for _, ln in _lines(list_file)]
        labels = []
        for p in paths:
            if p not in kv:
                raise DataError(f"{list_file}: key {p!r} has no label in {kv_file}")
            labels.append(kv[p])
        clean = [clean_kv.get(p, -1) for p in paths]
        splits[split] = _make_split(split, root, paths, labels, clean, where=str(list_file))
    known = int((splits["train"].clean >= 0).sum())
    info = {"path": str(root), "files": files, "order": f"shuffled (seed {ORDER_SEED})",
            "train_with_clean_label": known,
            "keys": "image path relative to the root, '.' and '/' replaced by '_'"}
    log.info("clothing1m: %d of %d noisy training images also have a clean label", known, len(splits["train"]))
    return Source("clothing1m", class_names, splits, info, clean_labels=CLOTHING_CLEAN)


# -- WebVision ------------------------------------------------------------------------------------

def _synsets(path: Path) -> List[str]:
    return [ln.split()[0] for _, ln in _lines(path)]


def load_webvision(root: Path, *, classes: Optional[int] = None) -> Source:
    """WebVision 1.0 under ``root``; ``classes=N`` keeps the first N classes of the Google part."""
    root = Path(root)
    info_dir = root / "info"
    synsets = _synsets(require_file(info_dir / "synsets.txt", dataset="webvision"))
    total = len(synsets)
    if classes is not None:
        if not 1 <= classes <= len(synsets):
            raise DataError(f"webvision: --classes {classes} is outside 1..{len(synsets)} ({info_dir / 'synsets.txt'})")
        synsets = synsets[:classes]
    num_classes = len(synsets)
    lists = ["train_filelist_google.txt"] + ([] if classes is not None else ["train_filelist_flickr.txt"])
    rows: List[Tuple[str, int]] = []
    for name in lists:
        rows += read_path_labels(require_file(info_dir / name, dataset="webvision"), num_classes=total)
    rows = [(p, y) for p, y in rows if y < num_classes]
    val_file = require_file(info_dir / "val_filelist.txt", dataset="webvision")
    val_rows = [(p, y) for p, y in read_path_labels(val_file, num_classes=total) if y < num_classes]
    val_dir = next((d for d in ("val_images_256", "val_images") if (root / d).is_dir()), "val_images_256")

    def val_path(p: str) -> str:
        # The official list names bare files; accept lists that already include the folder.
        return p if p.split("/", 1)[0] in ("val_images_256", "val_images") else f"{val_dir}/{p}"

    splits = {
        "train": _make_split("train", root, [p for p, _ in rows], [y for _, y in rows], None,
                             where=str(info_dir / lists[0])),
        "test": _make_split("test", root, [val_path(p) for p, _ in val_rows], [y for _, y in val_rows],
                            [y for _, y in val_rows], where=str(val_file)),
    }
    # WebVision's labels are the web query labels (noisy, no clean set); its val set is the test split.
    splits["train"].clean = None
    info = {"path": str(root), "files": [str(info_dir / n) for n in lists] + [str(val_file)],
            "test_images": val_dir, "classes": num_classes, "google_only": classes is not None,
            "order": f"shuffled (seed {ORDER_SEED})", "class_names": "WordNet ids from info/synsets.txt",
            "keys": "image path relative to the root, '.' and '/' replaced by '_'"}
    return Source("webvision", synsets, splits, info, clean_labels=WEBVISION_CLEAN)


# -- ImageFolder ----------------------------------------------------------------------------------

def _refuse_link(link: Path, target: Path, root: Path, why: str) -> DataError:
    return DataError(f"imagefolder: {link} is a symlink to {target}, {why}; it would pull other files into the "
                     f"dataset under this folder's label: remove it, or copy the images into {root}")


def _follow(path: Path, root_real: Path, chain: Tuple[Path, ...], root: Path, *, is_link: Optional[bool] = None
            ) -> Optional[Path]:
    """The real path of ``path`` if it is a symlink that may be followed, None if it is no symlink;
    a one-line DataError for a link out of the dataset root or back onto a folder on its own way
    down (``train/dog -> ..`` would list train, test and every other class as dog)."""
    if not (path.is_symlink() if is_link is None else is_link):
        return None
    target = Path(os.path.realpath(path))
    if target != root_real and root_real not in target.parents:
        raise _refuse_link(path, target, root, f"outside the dataset root {root_real}")
    # ``chain``: the real folders from the root down to the link's folder (its logical ancestors)
    if target in chain or target in chain[-1].parents or target == chain[-1]:
        raise _refuse_link(path, target, root, "a folder that contains the link itself (a loop)")
    return target


def _image_files(top: Path, chain: Tuple[Path, ...], root_real: Path, root: Path) -> Iterator[Path]:
    """Every file under the folder ``top`` (paths as seen from the root), following only the
    symlinks :func:`_follow` allows. Hidden files are skipped (hidden folders are not: as before)."""
    try:
        entries = sorted(os.scandir(top), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"imagefolder: cannot list {top} ({exc.strerror or exc})") from None
    for e in entries:
        path = top / e.name
        target = _follow(path, root_real, chain, root, is_link=e.is_symlink())
        if target is None:  # no link: the type scandir already knows, no stat
            if e.is_dir(follow_symlinks=False):
                yield from _image_files(path, chain + (chain[-1] / e.name,), root_real, root)
            elif not e.name.startswith(".") and e.is_file(follow_symlinks=False):
                yield path
        elif os.path.isdir(target):
            yield from _image_files(path, chain + (target,), root_real, root)
        elif not e.name.startswith(".") and (os.path.isfile(target) or not os.path.exists(target)):
            yield path  # a file, or a dangling link inside the root (then skipped as unreadable)


def _class_counts_check(root: Path, class_names: List[str], counts: Dict[str, np.ndarray], *, strict: bool) -> None:
    """A class that has no training sample (present only in val/test, or an empty train folder)
    cannot be learnt: a warning with the per-class counts, an error with ``--strict``."""
    train = counts.get("train", np.zeros(len(class_names), dtype=np.int64))
    empty = [i for i in range(len(class_names)) if train[i] == 0]
    if not empty:
        return

    def per_split(i: int) -> str:
        return ", ".join(f"{s} {int(c[i])}" for s, c in counts.items())
    shown = "; ".join(f"{class_names[i]!r} ({per_split(i)})" for i in empty[:10]) + ("; ..." if len(empty) > 10 else "")
    train_counts = ", ".join(f"{n} {int(c)}" for n, c in zip(class_names[:20], train[:20])) + \
        (", ..." if len(class_names) > 20 else "")
    what = (f"imagefolder: {len(empty)} of {len(class_names)} classes have no training samples under "
            f"{root / 'train'}: {shown}; train samples per class: {train_counts}")
    if strict:
        raise DataError(f"{what} (add training images for them or remove their folders)")
    log.warning("%s (--strict makes this an error)", what)


def load_imagefolder(root: Path, *, labels_verified: bool = False, strict: bool = False) -> Source:
    """``<root>/<split>/<class>/<file>`` for the splits present among train / val / test.

    The folder labels are the given labels. They count as true labels (``clean``) only when the
    user says they are verified (``labels_verified``): a user's own data may be noisy itself, and
    purity or recall measured against unverified labels would mean nothing.

    Symlinks are followed only while they stay inside the root and do not point back up to a
    folder on their own way down; anything else is a one-line error naming the link. A class with
    no training samples is a warning with the per-class counts (an error with ``strict``).
    """
    root = Path(root)
    root_real = Path(os.path.realpath(root))
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        raise DataError(f"imagefolder: no split folder found: looked for {root / 'train'} (and {root / 'val'}, "
                        f"{root / 'test'}); set --root or $TURNCTL_DATA")
    real: Dict[Path, Tuple[Path, ...]] = {}  # folder -> the real folders from the root down to it
    for s in present:
        target = _follow(root / s, root_real, (root_real,), root)
        real[root / s] = (root_real, target if target is not None else root_real / s)
    class_names = sorted({d.name for s in present for d in (root / s).iterdir()
                          if d.is_dir() and not d.name.startswith(".")})
    if not class_names:
        raise DataError(f"imagefolder: no class folders under {root / present[0]}")
    index = {c: i for i, c in enumerate(class_names)}
    splits: Dict[str, Split] = {}
    counts: Dict[str, np.ndarray] = {}
    ignored = 0
    for s in present:
        paths, labels = [], []
        for c in class_names:
            d = root / s / c
            if not d.is_dir():
                continue
            chain = real[root / s]
            target = _follow(d, root_real, chain, root)
            files = sorted(_image_files(d, chain + (target if target is not None else chain[-1] / c,),
                                        root_real, root))
            for f in files:
                if f.suffix.lower() not in IMAGE_EXTENSIONS:
                    ignored += 1
                    continue
                paths.append(f.relative_to(root).as_posix())
                labels.append(index[c])
        counts[s] = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
        if not paths:
            log.warning("imagefolder: %s has no images; the split is left out", root / s)
            continue
        splits[s] = _make_split(s, root, paths, labels, labels if labels_verified else None, where=str(root / s))
    if not splits:
        raise DataError(f"imagefolder: no image files under {root} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    _class_counts_check(root, class_names, counts, strict=strict)
    if ignored:
        log.warning("imagefolder: ignored %d files without an image extension", ignored)
    info = {"path": str(root), "splits_found": list(splits), "order": f"shuffled (seed {ORDER_SEED})",
            "ignored_non_image_files": ignored,
            "keys": "image path relative to the root, '.' and '/' replaced by '_'"}
    for s in splits.values():
        check_range(s.labels, num_classes=len(class_names), where=str(root))
    return Source("imagefolder", class_names, splits, info,
                  clean_labels=IMAGEFOLDER_VERIFIED if labels_verified else IMAGEFOLDER_UNVERIFIED)
