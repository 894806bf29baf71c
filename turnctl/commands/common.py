"""Small helpers shared by the command modules."""

from __future__ import annotations

import json
import math
from typing import Any

from turnctl.logger import result_console


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def emit_json(payload: Any) -> None:
    """Print one JSON line on stdout (machine-readable result; the last line of the output)."""
    result_console().file.write(json.dumps(_jsonable(payload), sort_keys=False) + "\n")
    result_console().file.flush()
