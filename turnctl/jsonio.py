"""Python values as JSON can hold them: the one conversion behind every JSON turnctl writes or prints
(run files through turnctl.rundir, the CLI's result line through turnctl/commands/common.py)."""

from __future__ import annotations

import math
from typing import Any


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy / torch scalars as Python numbers, tuples as lists, keys as strings, and
    NaN / infinity as None (JSON has no such numbers; ``json.dumps`` would write invalid JSON).

    >>> import numpy as np
    >>> jsonable({1: (np.float32(0.5), float("nan")), "n": np.int64(3)})
    {'1': [0.5, None], 'n': 3}
    """
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return jsonable(obj.item())
    return obj
