"""The job's processes: how many there are and whether a launcher (torchrun) started them, read
from the environment without importing torch; and, once a run has set up its processes, which is
the main one and a point where all wait for each other (accelerate's PartialState)."""

from __future__ import annotations

import os

__all__ = ["world_size", "launched", "is_main", "barrier"]


def world_size() -> int:
    """Processes in the job, from torchrun's environment (1 when run with plain python)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether a launcher (torchrun, deepspeed) started this process: it sets LOCAL_RANK."""
    return "LOCAL_RANK" in os.environ


def is_main() -> bool:
    """Whether this is the main process (rank 0), which writes the run's shared files."""
    from accelerate import PartialState

    return PartialState().is_main_process


def barrier() -> None:
    """Waits until every process gets here."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()
