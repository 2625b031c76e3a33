"""The job as the launcher (torchrun) describes it to each process, read from the environment
without importing torch: how many processes, and whether there is a launcher at all."""

from __future__ import annotations

import os

__all__ = ["world_size", "launched"]


def world_size() -> int:
    """Processes in the job, from torchrun's environment (1 when run with plain python)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether a launcher (torchrun, deepspeed) started this process: it sets LOCAL_RANK."""
    return "LOCAL_RANK" in os.environ
