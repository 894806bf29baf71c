"""Method dispatch: a resolved recipe -> the steps of its method."""

from __future__ import annotations

from turnctl.errors import TurnctlError
from turnctl.recipe import Recipe


def train_from_recipe(recipe: Recipe, *, resume: bool = False) -> dict:
    raise TurnctlError(f"method '{recipe.method}' is not available in this build yet")
