"""``turnctl eval``: accuracy of a checkpoint on prepared shards."""

from __future__ import annotations

import click

from turnctl.errors import TurnctlError


@click.command("eval")
@click.option("--checkpoint", required=True, type=click.Path())
def command(checkpoint: str) -> None:
    """Evaluate a checkpoint."""
    raise TurnctlError(f"eval {checkpoint}: not available in this build yet")
