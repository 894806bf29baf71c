"""The ``turnctl`` command line: a click group with one module per command (turnctl/commands/).

Launchers prepend ``--local_rank=N`` before the subcommand; the root group accepts and ignores it
(the environment's RANK / LOCAL_RANK / WORLD_SIZE are the source of truth). Known errors print one
line and exit 2; anything else is a bug and prints one line too, with the full traceback when
``TURNCTL_DEBUG=1``.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import List, Optional

import click

from turnctl import __version__
from turnctl.commands import (
    compare as compare_cmd, env as env_cmd, eval as eval_cmd, index as index_cmd, prepare as prepare_cmd,
    report as report_cmd, train as train_cmd,
)
from turnctl.distributed import describe_collective_failure, destroy, env_rank, env_world_size
from turnctl.errors import TurnctlError
from turnctl.logger import setup_logging


class _Root(click.Group):
    def list_commands(self, ctx):  # keep the data-flow order instead of alphabetical
        order = ["prepare", "index", "train", "eval", "compare", "report", "env"]
        return sorted(self.commands, key=lambda c: order.index(c) if c in order else len(order))


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="turnctl")
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
              help="Set by launchers; ignored (LOCAL_RANK from the environment is used).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, including DeepSpeed's.")
def cli(local_rank: Optional[int], verbose: bool) -> None:
    """Fine-tune pre-trained backbones on noisy labels with TURN.

    \b
    Data flow:  prepare -> shards -> features -> probe -> select -> finetune -> eval
      turnctl prepare webvision                      raw dataset -> WebDataset shards
      deepspeed turnctl train --recipe clip_l14      linear probe, then (cleanse -> fine-tune) x E
      turnctl eval --checkpoint runs/clip_l14-.../final
    """
    from turnctl.slurm import adopt_launch_env

    adopt_launch_env()  # `srun turnctl ...`: ranks from Slurm's task variables (turnctl/slurm.py)
    setup_logging(verbose)


for _mod in (prepare_cmd, index_cmd, train_cmd, eval_cmd, compare_cmd, report_cmd, env_cmd):
    cli.add_command(_mod.command)


def _say_error(prefix: str, message: str) -> None:
    rank = env_rank()
    tag = f"[rank {rank}] " if rank else ""
    sys.stderr.write(f"{tag}turnctl: {prefix}{message}\n")
    sys.stderr.flush()


# OSErrors about where files go rather than about turnctl: a full or read-only disk, a quota, a path
# the user may not write, a busy mount. Anything else (EIO, EINVAL, ...) may be a bug and stays one.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC: "no space left on the device holding it; free some or write elsewhere",
                       errno.EDQUOT: "over the disk quota on the device holding it; free some or write elsewhere",
                       errno.EROFS: None, errno.EACCES: None, errno.EBUSY: None}


def _environment_error(exc: BaseException) -> Optional[str]:
    """One line for an OSError (or what a library raised from one) that the environment caused."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
            what = exc.strerror or os.strerror(exc.errno)
            note = _ENVIRONMENT_ERRNOS[exc.errno]
            name = exc.filename if exc.filename is not None else exc.filename2
            line = f"{name}: {what}" if name is not None else what
            return f"{line} ({note})" if note else line
        exc, seen = exc.__cause__, seen + 1
    return None


_LEAVE_AT_ONCE = {"value": False}  # set by run() when a peer is lost: main() must not tear down the group


def run(argv: Optional[List[str]] = None) -> int:
    """Run the CLI and return its exit status (what tests call)."""
    debug = os.environ.get("TURNCTL_DEBUG", "") not in ("", "0")
    _LEAVE_AT_ONCE["value"] = False
    try:
        cli.main(args=argv, prog_name="turnctl", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        _say_error("", "aborted")
        return 130
    except KeyboardInterrupt:
        _say_error("", "interrupted")
        return 130
    except TurnctlError as exc:
        if debug:
            traceback.print_exc()
        _say_error(exc.label, str(exc))
        return exc.exit_code
    except Exception as exc:  # a bug: one line, traceback on request
        peer = describe_collective_failure(exc)
        if peer is not None:  # not a bug here: say what happened to the other rank
            if debug:
                traceback.print_exc()
            _say_error("error: ", peer)
            _LEAVE_AT_ONCE["value"] = True
            return 1
        environment = _environment_error(exc)
        if environment is not None:  # the disk, not turnctl: the user can act on it
            if debug:
                traceback.print_exc()
            _say_error("error: ", environment)
            return 2
        if debug:
            traceback.print_exc()
            _say_error("internal error: ", f"{type(exc).__name__}: {exc}")
        else:
            _say_error("internal error: ", f"{type(exc).__name__}: {exc} (rerun with TURNCTL_DEBUG=1 for the traceback)")
        return 1
    finally:
        if not _LEAVE_AT_ONCE["value"]:
            destroy()


def main(argv: Optional[List[str]] = None) -> None:
    from turnctl.host import isolate_extension_builds, tune_allocator

    tune_allocator()  # the CLI owns its process: keep activation memory in the heap (turnctl/host.py)
    isolate_extension_builds()  # DeepSpeed's JIT ops built per environment, never shared (turnctl/host.py)
    code = run(argv)
    if _LEAVE_AT_ONCE["value"]:
        # The process group lost a peer: destroying it, or letting the interpreter tear down its
        # threads, can abort ("terminate called without an active exception", SIGABRT) and replace
        # the exit status and the one-line message with a core dump. Leave at once instead.
        from turnctl.distributed import release_node_resources

        release_node_resources()
        _leave(code)
    if env_world_size() > 1:
        # Even after a clean destroy_process_group, the interpreter's final teardown of a process
        # that ran gloo collectives (ZeRO-3 above all) now and then destroys a still-joinable C++
        # thread and aborts: a finished, fully written run then exits -6 and the launcher reports
        # a failure (seen in CI on rank 1 after summary.json was written). Run the atexit
        # handlers while everything is alive, then skip the teardown.
        import atexit
        import logging

        atexit._run_exitfuncs()
        logging.shutdown()
        _leave(code)
    sys.exit(code)


def _leave(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
