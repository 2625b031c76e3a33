"""User errors and how a script ends on them.

A user error is something the person running the script can fix (a flag, a data file, a path,
a missing package, an unreachable hub). It ends the run with one line on stderr,
`error: <what, where, what to do>`, and exit status 2, without a traceback; anything else is a
bug and raises normally.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

__all__ = ["UserError", "FlagError", "DataError", "cli"]


class UserError(Exception):
    """A problem the user can fix; the message (one line) says what, where and what to do.

    `details` are further lines shown above it (e.g. every problem found in a data file).
    `everywhere`: every process of a distributed run finds the same problem (flags, validated
    data), so only the first prints it; otherwise (a file missing on one node, a hub failure on
    one rank) each process that hits it prints it, prefixed with its rank.
    """

    everywhere = False

    def __init__(self, message: str, details: list[str] | tuple[str, ...] = (), everywhere: bool | None = None):
        super().__init__(message)
        self.details = list(details)
        if everywhere is not None:
            self.everywhere = everywhere


class FlagError(UserError, ValueError):
    """A flag or combination of flags that cannot work; the message says what to do."""

    everywhere = True  # every rank parses the same command line


class DataError(UserError, ValueError):
    """Data that cannot be used (file:line and what to change)."""


# Exit status of a run stopped at once by a second Ctrl-C: 128 + SIGINT, as a shell reports it.
INTERRUPTED = 130


def cli(main: Callable[[], object]) -> int:
    """Runs `main()`; a user error ends with one `error:` line on stderr (its details above it)
    and exit status 2; a second Ctrl-C (recipe.faults) with one line and status 130. However it
    ends (a signal's stop, recipe.faults.Stopped, included), a distributed rank then leaves its
    process group. Use: `sys.exit(cli(main))`."""
    try:
        main()
    except KeyboardInterrupt:
        # (a training run's second Ctrl-C has said what is kept (recipe.faults); the converter's
        # output is published whole or not at all)
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return INTERRUPTED
    except UserError as err:
        rank = os.environ.get("RANK", "0")
        if rank == "0" or not err.everywhere:
            prefix = f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
            for line in err.details:
                print(f"  {line}", file=sys.stderr)
            print(f"{prefix}error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return 2
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """A rank leaves its process group before it exits, whether it finished, stopped on a user
    error, a signal or Ctrl-C. Left to the interpreter's exit, the group's teardown can abort the
    process (SIGABRT, "terminate called without an active exception": gloo's worker threads
    still hold tensors while Python shuts down; pytorch issue 190489), and torchrun then
    reports a finished run as failed, or the abort instead of the error's status. (torch is
    not imported for this.)"""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        try:
            distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 (leaving is best effort; the error line still follows)
            pass
