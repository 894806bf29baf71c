"""CIFAR-10 / CIFAR-100 in the official python (pickled) or binary layouts.

Splits follow the paper: the official 50,000 training images give 47,500 train and a seeded,
stratified 2,500 val (5% of every class, seed ``SPLIT_SEED``; their positions are recorded in the
manifest); the official 10,000 test images are the test split. Keys keep the original position:
``train_01234`` is image 1234 of the official training order (whether it landed in train or val),
``test_00042`` image 42 of the test set, so CIFAR-N labels (indexed by that order) apply by key.
With the dataset downloaded to ``data/cifar10`` (not in the test run, hence skipped)::

    >>> src = load_cifar(Path("data/cifar10"), dataset="cifar10")  # doctest: +SKIP
    >>> len(src.splits["train"]), len(src.splits["val"]), len(src.splits["test"])  # doctest: +SKIP
    (47500, 2500, 10000)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from turnctl.errors import DataError
from turnctl.logger import log
from turnctl.safeload import load_pickle_file
from turnctl.prepare.source import (
    SPLIT_SEED, TRUSTED_LABELS, Source, Split, check_range, require_file, stratified_holdout,
)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VAL_FRACTION = 2500 / 50000

# dataset -> (python dir, python probe file, binary dir, binary probe file)
_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", "data_batch_1", "cifar-10-batches-bin", "data_batch_1.bin"),
    "cifar100": ("cifar-100-python", "train", "cifar-100-binary", "train.bin"),
}


def find_layout(root: Path, *, dataset: str) -> Tuple[str, Path]:
    """("python" | "binary", directory) for ``root`` or its official sub-folder; else a DataError
    naming the exact files looked for."""
    py_dir, py_probe, bin_dir, bin_probe = _LAYOUTS[dataset]
    for layout, sub, probe in (("python", py_dir, py_probe), ("binary", bin_dir, bin_probe)):
        for d in (root / sub, root):
            if (d / probe).is_file():
                return layout, d
    raise DataError(f"{dataset}: dataset not found: looked for {root / py_dir / py_probe} (python layout) "
                    f"or {root / bin_dir / bin_probe} (binary layout); set --root or $TURNCTL_DATA")


def _hwc(flat: np.ndarray) -> np.ndarray:
    # 3072 bytes per image: the 1024 red, then green, then blue values of a 32x32 row-major image.
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _field(d: Dict[Any, Any], name: str, path: Path) -> Any:
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise DataError(f"{path}: missing '{name}' in the pickled batch (not an official CIFAR file?)")


def _python_batch(path: Path, label_fields: Tuple[str, ...], limits: Tuple[int, ...]
                  ) -> Tuple[np.ndarray, List[np.ndarray]]:
    batch = load_pickle_file(require_file(path, dataset=path.parent.name))
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    data = np.asarray(_field(batch, "data", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be uint8 of shape (N, 3072), found {data.dtype} {data.shape}")
    labels = []
    for f in label_fields:
        y = np.asarray(_field(batch, f, path), dtype=np.int64).reshape(-1)
        if len(y) != len(data):
            raise DataError(f"{path}: {len(y)} '{f}' for {len(data)} images")
        labels.append(y)
    for y, limit in zip(labels, limits):
        check_range(y, num_classes=limit, where=str(path))
    return data, labels


def _binary_batch(path: Path, limits: Tuple[int, ...]) -> Tuple[np.ndarray, List[np.ndarray]]:
    n_label_bytes = len(limits)
    raw = np.fromfile(require_file(path, dataset=path.parent.name), dtype=np.uint8)
    record = n_label_bytes + 3072
    if raw.size % record:
        raise DataError(f"{path}: size {raw.size} is not a multiple of the {record}-byte CIFAR record")
    rec = raw.reshape(-1, record)
    labels = [rec[:, i].astype(np.int64) for i in range(n_label_bytes)]
    for y, limit in zip(labels, limits):
        check_range(y, num_classes=limit, where=str(path))
    return rec[:, n_label_bytes:], labels


def _names(path: Path, fallback: Optional[List[str]], count: int, *, pickled: bool, field: str = "") -> List[str]:
    if path.is_file():
        if pickled:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in _field(load_pickle_file(path), field, path)]
        else:
            names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if len(names) != count:
            raise DataError(f"{path}: {len(names)} class names, expected {count}")
        return names
    if fallback is None:
        log.warning("%s not found: classes are named by index", path)
        return [str(i) for i in range(count)]
    return fallback


def _read(dataset: str, layout: str, d: Path) -> Dict[str, Any]:
    """Official train/test arrays and names for one layout."""
    if dataset == "cifar10":
        if layout == "python":
            parts = [_python_batch(d / f"data_batch_{i}", ("labels",), (10,)) for i in range(1, 6)]
            test = _python_batch(d / "test_batch", ("labels",), (10,))
            names = _names(d / "batches.meta", CIFAR10_CLASSES, 10, pickled=True, field="label_names")
            files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        else:
            parts = [_binary_batch(d / f"data_batch_{i}.bin", (10,)) for i in range(1, 6)]
            test = _binary_batch(d / "test_batch.bin", (10,))
            names = _names(d / "batches.meta.txt", CIFAR10_CLASSES, 10, pickled=False)
            files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        train = (np.concatenate([p[0] for p in parts]), [np.concatenate([p[1][0] for p in parts])])
        fine = lambda ls: ls[0]  # noqa: E731
        coarse = lambda ls: None  # noqa: E731
        coarse_names = None
    else:
        if layout == "python":
            train = _python_batch(d / "train", ("fine_labels", "coarse_labels"), (100, 20))
            test = _python_batch(d / "test", ("fine_labels", "coarse_labels"), (100, 20))
            names = _names(d / "meta", None, 100, pickled=True, field="fine_label_names")
            coarse_names = _names(d / "meta", None, 20, pickled=True, field="coarse_label_names")
            files = ["train", "test"]
            fine = lambda ls: ls[0]  # noqa: E731
            coarse = lambda ls: ls[1]  # noqa: E731
        else:  # binary records start with the coarse label byte, then the fine one
            train = _binary_batch(d / "train.bin", (20, 100))
            test = _binary_batch(d / "test.bin", (20, 100))
            names = _names(d / "fine_label_names.txt", None, 100, pickled=False)
            coarse_names = _names(d / "coarse_label_names.txt", None, 20, pickled=False)
            files = ["train.bin", "test.bin"]
            fine = lambda ls: ls[1]  # noqa: E731
            coarse = lambda ls: ls[0]  # noqa: E731
    out = {"names": names, "coarse_names": coarse_names, "files": files}
    for split, (data, labels) in (("train", train), ("test", test)):
        out[split] = (_hwc(data), fine(labels), coarse(labels))
    return out


def load_cifar(root: Path, *, dataset: str) -> Source:
    """Parse ``dataset`` (cifar10 / cifar100) under ``root`` into train / val / test splits."""
    root = Path(root)
    layout, d = find_layout(root, dataset=dataset)
    raw = _read(dataset, layout, d)
    images, y, yc = raw["train"]
    n = len(y)
    width = max(5, len(str(max(n - 1, 0))))
    official = Split("train", [f"train_{i:0{width}d}" for i in range(n)], y, y.copy(), images,
                     positions=np.arange(n, dtype=np.int64), coarse=yc)
    parts = stratified_holdout(y, fractions={"val": VAL_FRACTION}, seed=SPLIT_SEED)
    t_images, t_y, t_yc = raw["test"]
    nt = len(t_y)
    test = Split("test", [f"test_{i:0{width}d}" for i in range(nt)], t_y, t_y.copy(), t_images,
                 positions=None, coarse=t_yc)
    info = {
        "layout": layout, "path": str(d), "files": raw["files"], "official_train_count": n,
        "official_test_count": nt,
        "val_from_train": {"fraction": VAL_FRACTION, "stratified": True, "seed": SPLIT_SEED,
                           "positions": parts["val"].tolist()},
        "keys": "train_<position in the official training order> / test_<position in the test set>",
    }
    if raw["coarse_names"] is not None:
        info["coarse_class_names"] = raw["coarse_names"]
    return Source(dataset, raw["names"], {"train": official.take(parts["rest"], "train"),
                                          "val": official.take(parts["val"], "val"), "test": test},
                  info, asymmetric_family=dataset, builtin_val=True, clean_labels=TRUSTED_LABELS)
