"""Recipe files: where ``--recipe NAME`` is found, and the one safe way YAML is read and written.

A recipe, a ``--set`` value and a run's saved ``recipe.yaml`` are all read by :func:`load_yaml_text`:
safe tags only, no anchors or aliases, bounded nesting; files through :func:`load_yaml_file`, which
also bounds their size and names the file in every error.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path
from typing import Any, List

import yaml

from turnctl.errors import RecipeError

# A recipe is a page of settings; the bound keeps a wrong path (a log, a dataset file) from being read
# whole into memory before it is refused.
MAX_RECIPE_BYTES = 1 << 20
# Deep enough for any transformers config; a bound keeps composing (and later deepcopy, pydantic and
# json, all recursive) from a RecursionError on a file of nested brackets.
MAX_YAML_DEPTH = 64


class YamlRefused(yaml.MarkedYAMLError):
    """Valid YAML that a recipe may not use (anchors and aliases, excessive nesting)."""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases.

    Aliases let a few hundred bytes stand for billions of values ("billion laughs": nine levels of
    nine aliases each). The composer shares the node, so loading is cheap, but everything after it
    (the digest's JSON, deep copies, printing) walks the full expansion and runs out of memory. A
    recipe has no use for them, so the first anchor or alias is refused, before anything is built.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise YamlRefused(problem=("YAML anchors and aliases (&name, *name, <<: *name) are not allowed in a "
                                       "recipe; write the value out"), problem_mark=event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise YamlRefused(problem=f"nested more than {MAX_YAML_DEPTH} levels deep",
                              problem_mark=event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml_text(text: str) -> Any:
    """YAML text as Python values: safe tags only; anchors, aliases and deep nesting raise YamlRefused."""
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml_file(path: Path, what: str = "recipe") -> Any:
    """The YAML in a recipe file or a run's ``recipe.yaml``, read the one safe way: at most
    :data:`MAX_RECIPE_BYTES`, UTF-8, safe tags only, no anchors or aliases. Every problem is a
    one-line :class:`RecipeError` that names the file (and the line where YAML knows it)."""
    path = Path(path)
    where = f"{what} {path}" if what else str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)  # read-bounded: stat lies for /dev/zero and growing files
    except OSError as err:
        raise RecipeError(f"{where}: cannot read it ({err.strerror or err})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{where}: larger than {MAX_RECIPE_BYTES // (1 << 20)} MiB; a recipe is a small "
                          "YAML file (is this the right path?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          "save it as UTF-8") from None
    try:
        return load_yaml_text(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        if isinstance(err, YamlRefused):
            raise RecipeError(f"{where}{line}: {err.problem}") from None
        # PyYAML's reader errors span lines ("...\n  in <unicode string>, position N"): one line.
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise RecipeError(f"{where}{line}: not valid YAML ({problem})") from None


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    """YAML without anchors, in the key order given: what :func:`load_yaml_file` reads back."""
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False)


def recipe_dirs() -> List[Path]:
    """Where ``--recipe NAME`` is looked up: $TURNCTL_RECIPES, the checkout, the installed package."""
    dirs: List[Path] = []
    if os.environ.get("TURNCTL_RECIPES"):
        dirs.append(Path(os.environ["TURNCTL_RECIPES"]))
    dirs.append(Path(__file__).resolve().parents[2] / "recipes")  # source checkout / editable
    try:
        dirs.append(Path(str(resources.files("turnctl") / "recipes")))  # wheel install
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    return dirs


def available_recipes() -> List[str]:
    names = set()
    for d in recipe_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def resolve_recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path or p.exists():
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        return p
    for d in recipe_dirs():
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    names = available_recipes()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; available: {', '.join(names)}"
    raise RecipeError(f"unknown recipe '{name_or_path}'{hint}")
