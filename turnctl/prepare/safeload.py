"""Restricted unpickling: rebuild numpy arrays, refuse everything else.

The official CIFAR python batches and the CIFAR-N ``*.pt`` label files are pickles. A pickle can
call any importable function while loading (``os.system`` included), so ``pickle.load`` on a file
downloaded from the internet is arbitrary code execution. This reader resolves only the handful of
globals numpy needs to rebuild arrays, dtypes and scalars, under both their numpy 1 names
(``numpy.core.multiarray._reconstruct``) and their numpy 2 names (``numpy._core...``)::

    >>> import io, pickle, numpy as np
    >>> restricted_loads(pickle.dumps({"a": np.arange(3)}), source="demo")["a"].tolist()
    [0, 1, 2]
    >>> restricted_loads(pickle.dumps(print), source="evil.pkl")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    turnctl.errors.DataError: evil.pkl: refusing to unpickle 'builtins.print' ...
"""

from __future__ import annotations

import codecs
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import numpy as np

from turnctl.errors import DataError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as codecs.encode(text, "latin1"); any
    # other codec name is not something numpy writes, so it is refused rather than looked up.
    if encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"codecs.encode with encoding {encoding!r}")
    return codecs.encode(obj, "latin1", errors)


def _allowed() -> Dict[Tuple[str, str], Callable[..., Any]]:
    table: Dict[Tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("codecs", "encode"): _latin1_encode,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = _multiarray._reconstruct
        table[(mod, "scalar")] = _multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(mod, "_frombuffer")] = _numeric._frombuffer
    # numpy 2 may name dtype classes (numpy.dtypes.Int64DType) in pickles of dtypes.
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            table[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    return table


_ALLOWED = _allowed()


class _PersistentId(Exception):
    """The pickle holds torch tensors (torch globals, storage references): not a plain numpy pickle."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, fh, *, source: str, encoding: str, torch_fallback: bool = False):
        super().__init__(fh, encoding=encoding)
        self._source = source
        self._torch_fallback = torch_fallback

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            if self._torch_fallback and (module == "torch" or module.startswith("torch.")):
                # tensors: leave them to torch.load(weights_only=True), itself a restricted loader
                raise _PersistentId(f"{module}.{name}") from None
            raise DataError(
                f"{self._source}: refusing to unpickle '{module}.{name}' (only numpy arrays are "
                "allowed; the file is corrupt or malicious)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise _PersistentId(pid)


def restricted_loads(data: bytes, *, source: str, encoding: str = "bytes", torch_fallback: bool = False) -> Any:
    """Unpickle ``data`` allowing only numpy arrays, dtypes, scalars and builtin containers.

    ``encoding="bytes"`` keeps Python 2 strings (the official CIFAR batches) as ``bytes``.
    Raises :class:`DataError` naming ``source`` for any other global or a malformed pickle.

        >>> import pickle, numpy as np
        >>> restricted_loads(pickle.dumps([np.int64(7)], protocol=2), source="x")[0].item()
        7
    """
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), source=source, encoding=encoding,
                                   torch_fallback=torch_fallback).load()
    except (DataError, _PersistentId):
        raise
    except Exception as exc:  # truncated or garbled: one line naming the file
        raise DataError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def load_pickle_file(path: Path) -> Any:
    """A pickled file (CIFAR python batch) read with :func:`restricted_loads`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return restricted_loads(data, source=str(path))
    except _PersistentId:
        raise DataError(f"{path}: unexpected persistent reference in a plain pickle") from None


def load_torch_file(path: Path) -> Any:
    """A ``torch.save`` file holding numpy arrays (CIFAR-N ``*_human.pt``), without arbitrary pickle.

    The zip's ``data.pkl`` is read with :func:`restricted_loads`. Files that hold torch tensors
    (torch globals, storage references) or use the legacy non-zip format fall back to
    ``torch.load(weights_only=True)`` with exactly the numpy globals allowed; anything else (an
    ``os.system`` call, any other class) is refused by both.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1:
                raise DataError(f"{path}: not a torch.save archive (no single data.pkl inside)")
            data = zf.read(names[0])
        try:
            return restricted_loads(data, source=str(path), encoding="utf-8", torch_fallback=True)
        except _PersistentId:
            pass
    return _torch_load_numpy(path)


def _torch_load_numpy(path: Path) -> Any:
    import torch  # only for label files that really hold tensors

    allowed = [(fn, f"{mod}.{name}") for (mod, name), fn in _ALLOWED.items() if not mod.endswith("codecs")]
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"{path}: refused or unreadable by torch.load(weights_only=True): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if isinstance(obj, dict):
        return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in obj.items()}
    return obj
