"""Small array datasets: scikit-learn's digits (the embedded default) and Fashion-MNIST (IDX files).

digits: the 1,797 real 8x8 handwritten digits bundled with scikit-learn, pixel values 0..16
rescaled to 0..255 (``round(v * 255 / 16)``), split once with a seeded stratified draw into about
70% train / 10% val / 20% test (1,258 / 180 / 359; seed ``SPLIT_SEED``); keys ``digits_<index in
load_digits()>``.

Fashion-MNIST: ``train-images-idx3-ubyte.gz`` etc. (gzipped or not); val is a seeded stratified 5%
of the official 60,000 (the CIFAR rule: 3,000), keys ``train_<position>`` / ``test_<position>``.

    >>> src = load_digits_source()
    >>> [len(src.splits[s]) for s in ("train", "val", "test")]
    [1258, 180, 359]
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Tuple

import numpy as np

from turnctl.errors import DataError
from turnctl.prepare.source import SPLIT_SEED, TRUSTED_LABELS, Source, Split, check_range, stratified_holdout

DIGITS_FRACTIONS = {"val": 0.10, "test": 0.20}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]
FASHION_VAL_FRACTION = 0.05
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float 0..16, labels) exactly as ``sklearn.datasets.load_digits()``.

    Reads scikit-learn's bundled ``datasets/data/digits.csv.gz`` directly, because importing
    scikit-learn (and SciPy behind it) costs more than a second; falls back to ``load_digits``.
    """
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        csv_path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if csv_path.is_file():
            data = np.loadtxt(csv_path, delimiter=",", dtype=np.float64)
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


def load_digits_source() -> Source:
    """scikit-learn's digits as a :class:`Source` (no files needed)."""
    raw, y = digits_arrays()
    images = np.rint(raw * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    everything = Split("all", [f"digits_{i:04d}" for i in range(len(y))], y, y.copy(), images)
    parts = stratified_holdout(y, fractions=DIGITS_FRACTIONS, seed=SPLIT_SEED)
    splits = {"train": everything.take(parts["rest"], "train"), "val": everything.take(parts["val"], "val"),
              "test": everything.take(parts["test"], "test")}
    info = {"origin": "sklearn.datasets.load_digits", "pixels": "0..16 scaled to 0..255",
            "split": {"fractions": DIGITS_FRACTIONS, "stratified": True, "seed": SPLIT_SEED},
            "keys": "digits_<index in load_digits()>"}
    return Source("digits", [str(d) for d in range(10)], splits, info, builtin_val=True,
                  clean_labels=TRUSTED_LABELS)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes as an array of its declared shape.

    >>> import io, tempfile, os
    >>> p = Path(tempfile.mkdtemp()) / "x-idx1-ubyte"
    >>> _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9]))
    >>> read_idx(p).tolist()
    [7, 9]
    >>> import shutil; shutil.rmtree(p.parent)
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: {data.size} bytes of data for declared shape {dims}")
    return data.reshape(dims)


def _idx_path(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"fashion-mnist: missing file {root / (stem + '.gz')}; set --root or $TURNCTL_DATA "
                    "(or apt-get install dataset-fashion-mnist)")


def _fashion_split(root: Path, split: str) -> Tuple[np.ndarray, np.ndarray, str]:
    img_path, lbl_path = (_idx_path(root, stem) for stem in _FASHION_FILES[split])
    images, labels = read_idx(img_path), read_idx(lbl_path).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{lbl_path}: {len(labels)} labels for images of shape {images.shape} in {img_path}")
    check_range(labels, num_classes=10, where=str(lbl_path))
    return images, labels, f"{img_path.name}, {lbl_path.name}"


def load_fashion_mnist(root: Path) -> Source:
    """Fashion-MNIST's IDX files under ``root`` as train / val / test."""
    root = Path(root)
    tr_images, tr_y, tr_files = _fashion_split(root, "train")
    te_images, te_y, te_files = _fashion_split(root, "test")
    width = max(5, len(str(len(tr_y) - 1)))
    official = Split("train", [f"train_{i:0{width}d}" for i in range(len(tr_y))], tr_y, tr_y.copy(), tr_images,
                     positions=np.arange(len(tr_y), dtype=np.int64))
    parts = stratified_holdout(tr_y, fractions={"val": FASHION_VAL_FRACTION}, seed=SPLIT_SEED)
    test = Split("test", [f"test_{i:0{width}d}" for i in range(len(te_y))], te_y, te_y.copy(), te_images)
    info = {"path": str(root), "files": [tr_files, te_files], "official_train_count": len(tr_y),
            "val_from_train": {"fraction": FASHION_VAL_FRACTION, "stratified": True, "seed": SPLIT_SEED,
                               "positions": parts["val"].tolist()}}
    return Source("fashion-mnist", list(FASHION_CLASSES),
                  {"train": official.take(parts["rest"], "train"), "val": official.take(parts["val"], "val"),
                   "test": test}, info, builtin_val=True, clean_labels=TRUSTED_LABELS)
