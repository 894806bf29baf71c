"""``--set key.path=value`` overrides and the one-line errors a recipe's validation ends in.

Overrides are applied to the raw mapping *before* validation, so they are typed, range-checked and
spell-checked exactly like the file:

>>> apply_overrides({"finetune": {"lr": 0.1}}, ["finetune.lr=0.001", "cleanse.redraw_each_epoch=false"])
{'finetune': {'lr': 0.001}, 'cleanse': {'redraw_each_epoch': False}}
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Dict, List, Tuple, Type

import yaml
from pydantic import BaseModel, ValidationError

from turnctl.errors import RecipeError
from turnctl.recipe.yamlio import YamlRefused, load_yaml_text


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def unknown_keys(raw: Any, model: Type[BaseModel], prefix: str = "") -> List[Tuple[str, List[str]]]:
    """Unknown keys in ``raw`` with their valid siblings, recursing into section models."""
    if not isinstance(raw, dict):
        return []
    found = []
    fields = model.model_fields
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            found.append((path, [f"{prefix}{f}" for f in fields]))
            continue
        ann = fields[key].annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is not None:
            found.extend(unknown_keys(value, sub, path + "."))
    return found


def refuse_unknown_keys(raw: Any, model: Type[BaseModel], source: str) -> None:
    """The first unknown key of ``raw`` as a one-line error with the closest valid key (pydantic would
    only say "extra inputs are not permitted")."""
    unknown = unknown_keys(raw, model)
    if unknown:
        path, valid = unknown[0]
        close = difflib.get_close_matches(path, valid, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
        raise RecipeError(f"recipe {source}: unknown key '{path}'{hint}")


def _parse_override(item: str) -> Tuple[List[str], Any]:
    if "=" not in item:
        raise RecipeError(f"--set '{item}' must look like key.path=value (e.g. finetune.lr=1e-4)")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set '{item}': empty key segment")
    try:
        parsed = load_yaml_text(value) if value.strip() else None
    except YamlRefused as err:
        raise RecipeError(f"--set '{_short(item)}': {err.problem}") from None
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """A copy of ``raw`` with each ``key.path=value`` set (values read as YAML, sections created)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise RecipeError(f"--set '{item}': '{part}' is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def format_validation_error(source: str, err: ValidationError) -> str:
    """pydantic's first error as one line naming the key, with the value given and how many more."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if "input" in first and not isinstance(first["input"], (dict, list)):
        msg += f" (got {first['input']!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"recipe {source}: {loc}: {msg}{more}"

