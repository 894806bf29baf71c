"""``turnctl train``: resolve a recipe and run a method (TURN by default) on one or many ranks."""

from __future__ import annotations

from typing import Optional, Tuple

import click
from pydantic import ValidationError
from rich.syntax import Syntax

from turnctl.commands.common import emit_json
from turnctl.distributed import (
    all_gather_object, env_world_size, host_info, init_distributed, is_main,
)
from turnctl.errors import DistributedError, RecipeError
from turnctl.logger import log, result_console
from turnctl.methods.registry import METHODS
from turnctl.preempt import Preempted
from turnctl.recipe import Recipe, load_recipe
from turnctl.slurm import requeue_on


def resolve(recipe: str, shards: Optional[str], out: Optional[str], method: Optional[str],
            overrides: Tuple[str, ...], deepspeed_file: Optional[str] = None) -> Recipe:
    """The recipe after a ``--deepspeed`` file, ``--set`` overrides and the ``--shards/--out/--method``
    shortcuts."""
    r = load_recipe(recipe, list(overrides), deepspeed_file=deepspeed_file,
                    world_size=env_world_size() if deepspeed_file else None)
    try:
        if shards is not None:
            r.data.shards = shards
        if out is not None:
            r.output.dir = out
        if method is not None:
            r.method = method
    except ValidationError as exc:  # validate_assignment errors, one line like the recipe's own
        err = exc.errors()[0]
        raise RecipeError(f"invalid command-line value for {'.'.join(map(str, err['loc']))}: {err['msg']} "
                          f"(got {err.get('input')!r})") from None
    return r


def agree_on_recipe(r: Recipe) -> list:
    """All ranks gather (rank, pid, host, recipe digest); a rank that resolved another recipe fails all."""
    me = dict(host_info(), recipe_digest=r.digest())
    everyone = all_gather_object(me)
    digests = {e["recipe_digest"] for e in everyone}
    if len(digests) > 1:
        detail = ", ".join(f"rank {e['rank']}: {e['recipe_digest']}" for e in everyone)
        raise DistributedError(f"ranks resolved different recipes ({detail}); check --set and files on every node")
    return everyone


def methods_help() -> str:
    """The methods and what each does, one line each, from the registry (kept as written by click)."""
    width = max(map(len, METHODS))
    return "\b\nMethods:\n" + "\n".join(
        f"  {name:<{width}}  {spec.help}" for name, spec in METHODS.items())


@click.command("train", epilog=methods_help())
@click.option("--recipe", "recipe_name", required=True, metavar="NAME|PATH",
              help="A recipe name (recipes/NAME.yaml) or a YAML path.")
@click.option("--shards", type=click.Path(file_okay=False), default=None,
              help="Prepared dataset directory; overrides data.shards.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory; default runs/<recipe>-<timestamp>.")
@click.option("--method", type=click.Choice(list(METHODS)), default=None,
              help="Overrides the recipe's method (listed below).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Typed override, e.g. --set finetune.lr=1e-4 (repeatable).")
@click.option("--deepspeed", "deepspeed_file", default=None, metavar="DS_CONFIG.json",
              help="Your DeepSpeed config (HF Trainer's flag): ZeRO stage, offload, bf16/fp16, batch sizes and "
                   "clipping go into the recipe; communication, activation checkpointing and the rest are "
                   "passed to DeepSpeed; optimizer/scheduler are refused (turnctl/recipe/dsfile.py).")
@click.option("--resume", "resume", is_flag=False, flag_value="yes", default=None, metavar="[auto]",
              help="Continue the run in --out from its last complete checkpoint. '--resume auto': continue "
                   "it if --out holds a run, start it if --out does not exist or is empty (one command line "
                   "for the first launch and every requeue).")
@click.option("--stop-after", type=click.IntRange(0), default=None, metavar="E",
              help="Stop cleanly after fine-tuning epoch E is checkpointed (time-limited jobs; then --resume).")
@click.option("--dry-run", is_flag=True, help="Resolve and validate the recipe, print it, train nothing.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of results.")
def command(recipe_name: str, shards: Optional[str], out: Optional[str], method: Optional[str],
            overrides: Tuple[str, ...], deepspeed_file: Optional[str], resume: Optional[str],
            stop_after: Optional[int], dry_run: bool, as_json: bool) -> None:
    """Train with TURN (or another --method) from a recipe.

    \b
    Examples:
      turnctl train --recipe tiny --shards shards/digits-symmetric-0.6
      deepspeed turnctl train --recipe clip_l14
      turnctl train --recipe vit_b16 --set finetune.lr=1e-3 --dry-run
    """
    if resume not in (None, "yes", "auto"):
        raise click.BadParameter(f"{resume!r}: give --resume alone or --resume auto", param_hint="--resume")
    r = resolve(recipe_name, shards, out, method, overrides, deepspeed_file)
    world = env_world_size()
    ds_config = r.deepspeed_config(world)  # checks the batch triad against WORLD_SIZE up front
    if dry_run:
        ranks = None
        if world > 1:
            init_distributed(r.deepspeed.timeout_minutes)
            ranks = agree_on_recipe(r)
        if not is_main():
            return
        if as_json:
            emit_json({"recipe": r.model_dump(mode="json"), "recipe_digest": r.digest(),
                       "world_size": world, "ranks": ranks, "deepspeed_config": ds_config})
        else:
            result_console().print(Syntax(r.to_yaml(), "yaml", background_color="default"))
            log.info("recipe %s is valid (digest %s, world size %d, gradient accumulation %d)",
                     r.name, r.digest(), world, ds_config["gradient_accumulation_steps"])
        return
    from turnctl.runner import train_from_recipe

    try:
        result = train_from_recipe(r, resume={None: False, "yes": True}.get(resume, resume),
                                   stop_after=stop_after)
    except Preempted as exc:  # a checkpoint is written: under Slurm, SIGUSR1 also requeues the job
        requeue_on(exc.signum)
        raise
    if is_main() and as_json:
        emit_json(result)
