"""Safe loading: no file turnctl reads can run code while it is being read.

A pickle can call any importable function while loading (``os.system`` included), so unpickling a
file someone else wrote (a downloaded dataset, a checkpoint copied from a shared disk, a cache in a
world-writable directory) is arbitrary code execution. Every reader in turnctl goes through one of:

==============================  ================================================================
what                            how it is read
==============================  ================================================================
recipes, ``recipe.yaml``        ``recipe.load_yaml_file``: safe tags only, no anchors/aliases, 1 MiB
CIFAR python batches            :func:`restricted_loads`: numpy arrays, dtypes, scalars only
CIFAR-N ``*.pt`` label files    :func:`load_torch_file`: the same, or ``weights_only`` + numpy
DeepSpeed checkpoints           :func:`guard_deepspeed_engine` / :func:`safe_zero_to_fp32`:
                                ``torch.load(weights_only=True)`` + :func:`deepspeed_checkpoint_globals`
ELR targets, ``.pth`` weights   :func:`torch_load` (``weights_only=True``, nothing extra allowed)
exports, heads, feature cache   safetensors (:func:`load_safetensors`; exports must hold
                                ``model.safetensors``, see ``models.load_exported``)
selections (``.npz``)           ``np.load(allow_pickle=False)`` (``report/selection.py``)
shard members                   only image bytes and ASCII integers are read (``data/``)
==============================  ================================================================

A refused file is a one-line :class:`~turnctl.errors.TurnctlError` naming it::

    >>> import io, pickle, numpy as np
    >>> restricted_loads(pickle.dumps({"a": np.arange(3)}), source="demo")["a"].tolist()
    [0, 1, 2]
    >>> restricted_loads(pickle.dumps(print), source="evil.pkl")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    turnctl.errors.DataError: evil.pkl: refusing to unpickle 'builtins.print' ...
"""

from __future__ import annotations

import codecs
import contextlib
import io
import pickle
import re
import types
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple, Type

import numpy as np

from turnctl.errors import DataError, TurnctlError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


# ---- numpy-only unpickling (CIFAR batches, CIFAR-N label files) -------------------------------

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
    allowed = [(fn, f"{mod}.{name}") for (mod, name), fn in _ALLOWED.items() if not mod.endswith("codecs")]
    obj = torch_load(path, safe_globals=allowed, error=DataError)
    if isinstance(obj, dict):
        return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in obj.items()}
    return obj


# ---- torch.load(weights_only=True) ---------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Lines of torch's weights_only message that explain the mechanism, not this file.
_BOILERPLATE = ("Weights only load failed", "(1)", "(2)", "In PyTorch 2.6", "Check the documentation",
                "Please file an issue")


def refusal_reason(exc: BaseException) -> str:
    """The one informative line of a ``torch.load(weights_only=True)`` failure.

    >>> refusal_reason(RuntimeError("Weights only load failed. ...\\n\\nTrying to load unsupported "
    ...                             "GLOBAL posix.system whose module posix is blocked.\\n"))
    "global 'posix.system' is not allowed"
    """
    text = _ANSI.sub("", str(exc))
    m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if m:
        return f"global '{m.group(1)}' is not allowed"
    m = re.search(r"Unsupported operand (\d+)", text)
    if m:  # a plain pickle (no torch.save archive) or garbage: torch's unpickler stops at once
        return f"not a torch.save file (pickle opcode {m.group(1)} refused)"
    for line in text.splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(_BOILERPLATE):
            return f"{type(exc).__name__}: {line[:200]}"
    return type(exc).__name__


def torch_load(path, *, map_location: Any = "cpu", safe_globals: Sequence[Any] = (),
               error: Type[TurnctlError] = TurnctlError, what: str = "", mmap: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` allowing exactly ``safe_globals`` besides torch's own
    tensor/container types; any refusal or read error becomes a one-line ``error`` naming ``path``."""
    import torch

    kw = {} if mmap is None else {"mmap": mmap}
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True, **kw)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 -- refused, truncated or foreign: all say which file
        raise error(f"{path}: refused by torch.load(weights_only=True): {refusal_reason(exc)}"
                    f"{'; ' + what if what else ''}") from None


# ---- safetensors ---------------------------------------------------------------------------------

def load_safetensors(path, *, error: Type[TurnctlError] = TurnctlError) -> Dict[str, Any]:
    """A safetensors file as a dict of CPU tensors (the format holds no code); anything else, a
    pickle named ``*.safetensors`` included, becomes a one-line ``error`` naming ``path``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{path}: not a safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                    ) from None


# ---- DeepSpeed checkpoints -----------------------------------------------------------------------

def deepspeed_checkpoint_globals() -> List[Any]:
    """The non-torch classes DeepSpeed 0.19 pickles into the checkpoints turnctl writes.

    Found by listing the GLOBAL opcodes of ``*_model_states.pt`` and ``*_optim_states.pt`` written
    by ``turnctl train`` on ZeRO stages 0-3, fp32 and bf16: model states hold only tensors,
    ``torch.Size`` and containers; ZeRO optimizer states add the loss scaler object, the stage as
    an enum and, on stages 1-2, ``param_slice_mappings`` of ``fragment_address`` dataclasses.
    ``DynamicLossScaler`` replaces ``LossScaler`` under fp16 (``CreateLossScaler``; CUDA only, so
    not observed on CPU). All four are plain data holders: rebuilding them runs no file-chosen code.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_DS_HINT = "the checkpoint is corrupt or was not written by turnctl"


def load_deepspeed_file(path, map_location: Any = None, *, mmap: Any = None) -> Any:
    """One DeepSpeed checkpoint file, read with ``weights_only=True`` (DeepSpeed itself uses
    ``weights_only=False``, i.e. full pickle)."""
    return torch_load(path, map_location=map_location, safe_globals=deepspeed_checkpoint_globals(),
                      what=_DS_HINT, mmap=mmap)


def guard_deepspeed_engine(engine) -> None:
    """Make ``engine.load_checkpoint`` read every file with :func:`load_deepspeed_file`.

    All of DeepSpeed's own checkpoint reads (model states through ``SDLoaderFactory``, ZeRO and
    plain optimizer states) go through ``engine.checkpoint_engine.load``, whose stock version is
    ``torch.load`` with ``weights_only=False``; the instance attribute shadows it. Universal checkpoints
    are read by the optimizers with ``torch.load`` directly, so they are refused outright.
    """
    if engine.load_universal_checkpoint():
        raise TurnctlError("deepspeed checkpoint.load_universal is not supported by turnctl: DeepSpeed "
                           "reads universal checkpoints with unrestricted pickle")
    engine.checkpoint_engine.load = load_deepspeed_file


class _TorchWithSafeLoad(types.ModuleType):
    """``torch`` as seen by one module, except that ``load`` is :func:`load_deepspeed_file`."""

    def __init__(self, torch_module):
        super().__init__("torch")
        self._torch = torch_module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    @staticmethod
    def load(f, map_location: Any = None, *args, mmap: Any = None, **_ignored) -> Any:
        # ``weights_only=False`` from the caller is dropped on purpose.
        return load_deepspeed_file(f, map_location, mmap=mmap)


@contextlib.contextmanager
def safe_zero_to_fp32() -> Iterator[types.ModuleType]:
    """``deepspeed.utils.zero_to_fp32`` with its ``torch.load`` calls (``weights_only=False``) made safe.

    The module calls ``torch.load`` on its module-level ``torch``; only that name is rebound, for
    the duration of the block, so nothing else in the process changes::

        with safe_zero_to_fp32() as z:
            state = z.get_fp32_state_dict_from_zero_checkpoint(ckpt_root, tag=tag)
    """
    from deepspeed.utils import zero_to_fp32

    real = zero_to_fp32.torch
    zero_to_fp32.torch = _TorchWithSafeLoad(real)
    try:
        yield zero_to_fp32
    finally:
        zero_to_fp32.torch = real
