"""``turnctl prepare``: raw dataset -> WebDataset shards with recorded label noise."""

from __future__ import annotations

import click

from turnctl.errors import TurnctlError


@click.command("prepare")
@click.argument("dataset")
def command(dataset: str) -> None:
    """Write DATASET as WebDataset shards."""
    raise TurnctlError(f"prepare {dataset}: not available in this build yet")
