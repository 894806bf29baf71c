"""Small helpers shared by the command modules."""

from __future__ import annotations

import json
from typing import Any

from turnctl.jsonio import jsonable
from turnctl.logger import result_console


def emit_json(payload: Any) -> None:
    """Print one JSON line on stdout (machine-readable result; the last line of the output)."""
    result_console().file.write(json.dumps(jsonable(payload), sort_keys=False) + "\n")
    result_console().file.flush()
