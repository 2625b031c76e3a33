"""Checkpoints that are either complete or absent, and the check that picks one to resume from.

A checkpoint is written into OUTPUT_DIR/.checkpoint-tmp/checkpoint-N by every rank (the Trainer's
own save: model or adapter, optimizer (DeepSpeed: its per-rank shards), scheduler, RNG states,
trainer_state.json, and the processor), then renamed to OUTPUT_DIR/checkpoint-N by the main
process once every rank is done: a kill at any moment leaves either the previous checkpoints
alone or the new one complete. A save that fails (disk full, quota, permissions) is one error
naming the path, the cause and the free space; the unfinished directory is removed and the
earlier checkpoints are untouched.

`verify` reads what resuming will read, cheaply: every safetensors header and that the file is
as long as the header says, every torch archive's zip directory (a truncated archive has none),
every JSON file. `--resume_from_checkpoint auto` takes the newest checkpoint that passes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

from .errors import UserError

__all__ = ["TMP_DIR", "RUN_COMPLETE_FILE", "TRAINER_STATE_NAME", "checkpoint_steps", "verify",
           "last_complete_checkpoint", "save_error", "publish"]

logger = logging.getLogger("recipe")

TMP_DIR = ".checkpoint-tmp"  # (not matched by the Trainer's `checkpoint-*` globs)
# Written last into OUTPUT_DIR by a finished run (recipe.report); without it, checkpoints there are
# an unfinished run's, to resume from.
RUN_COMPLETE_FILE = "run_complete.json"
# transformers.trainer's name, here without importing the trainer (the flag checks verify a
# checkpoint to resume from; a test checks the names agree).
TRAINER_STATE_NAME = "trainer_state.json"
TORCH_ARCHIVES = (".pt", ".pth", ".bin")


def checkpoint_steps(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N directory, oldest first."""
    return sorted(
        (int(path.name.split("-")[1]), path) for path in Path(output_dir).glob("checkpoint-*")
        if path.is_dir() and path.name.split("-")[1].isdigit()
    )


def _check_safetensors(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return "truncated (its header is cut off)"
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return "unreadable safetensors header"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end > size:
        return f"truncated ({size} bytes, its header describes {8 + length + end})"
    return None


def _check_file(path: Path) -> str | None:
    """Why `path` would not load, or None."""
    try:
        if path.suffix == ".safetensors":
            return _check_safetensors(path)
        if path.suffix in TORCH_ARCHIVES:
            with zipfile.ZipFile(path) as archive:  # torch.save's format; reading the directory is cheap
                archive.namelist()
            return None
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
            return None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        return f"unreadable ({' '.join(str(err).split())})"
    return None


def verify(checkpoint: Path) -> str | None:
    """None if every file resuming reads loads; else "<file>: <why not>" for the first that does not."""
    if not (checkpoint / TRAINER_STATE_NAME).is_file():
        return f"{checkpoint / TRAINER_STATE_NAME}: missing (killed while saving?)"
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        problem = _check_file(path)
        if problem:
            return f"{path}: {problem}"
    return None


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint-N whose files load; newer broken ones are named in a warning each."""
    for _, path in reversed(checkpoint_steps(output_dir)):
        problem = verify(path)
        if problem is None:
            return str(path)
        logger.warning("not resuming from %s: %s; trying the previous checkpoint", path, problem)
    return None


def _cause(err: Exception) -> tuple[str, int | None]:
    """The operating system's reason for a failed write, and its errno when known. torch.save
    reports a failed write as RuntimeError without the reason, safetensors as "os error N"."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror, err.errno
    match = re.search(r"os error (\d+)", str(err))
    if match:
        return os.strerror(int(match.group(1))), int(match.group(1))
    return " ".join(str(err).split())[:200], None


def save_error(err: Exception, path: Path) -> UserError:
    """One line for a checkpoint that could not be written: where, why, and the free space."""
    cause, number = _cause(err)
    try:
        free = shutil.disk_usage(path.parent).free
        space = f"; {free / 2**30:.2f} GiB free there"
    except OSError:
        space = ""
    advice = ("check the path and its permissions" if number in (errno.EACCES, errno.EPERM, errno.EROFS)
              else "free disk space (or raise the quota / file size limit) or choose an --output_dir with room for "
                   "a checkpoint")
    return UserError(f"saving checkpoint {path} failed: {cause}{space}; {advice}, then resume with "
                     "--resume_from_checkpoint auto (the earlier checkpoints are intact)")


def publish(tmp: Path, final: Path) -> None:
    """Moves a complete checkpoint into place (one rename on the same filesystem)."""
    if final.exists():  # (only if a step is saved twice, e.g. a stop right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
