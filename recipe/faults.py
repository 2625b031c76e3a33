"""Preemption and data-loader faults: a run that is told to stop saves and says how to go on,
and a data worker that cannot deliver becomes an error instead of a hang.

Signals. SIGTERM (SLURM, Kubernetes, spot preemption, torchrun forwarding its own), SIGUSR1
(SLURM's `--signal=USR1@120` warning before the time limit) and Ctrl-C (SIGINT) only set a flag.
At the end of the optimizer step in progress every rank learns whether any rank got one (one
all_reduce of the flag, max), so all ranks stop after the same step; the Trainer saves
checkpoint-N, the run logs

    stopped by SIGTERM at step N; checkpoint-N saved; resume with --resume_from_checkpoint auto

and exits with status 128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1, 130 for
Ctrl-C): the status a shell reports for a process ended by that signal, so a scheduler's
requeue-on-preemption rules treat the run as preempted (not as a bug, 1, or a user error, 2).
A second Ctrl-C stops at once without saving (the last checkpoint is kept); a SIGINT within
2 s of the first counts as the same one (torchrun forwards the terminal's Ctrl-C, which every
rank got already).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .errors import UserError

__all__ = ["StopOnSignal", "Stopped", "STOP_SIGNALS", "exit_status", "dataloader_error"]

logger = logging.getLogger("recipe")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# A SIGINT this soon after the first is the same Ctrl-C: under torchrun a rank gets the terminal's
# (sent to the whole foreground process group) and torchrun's forward of its own a moment later.
SAME_CTRL_C_S = 2.0


def exit_status(signum: int) -> int:
    """128 + the signal's number: what a shell reports for a process ended by it."""
    return 128 + int(signum)


class Stopped(SystemExit):
    """Training stopped on a signal after saving a checkpoint; ends the process with `exit_status`."""

    def __init__(self, signum: int, message: str):
        super().__init__(exit_status(signum))
        self.signum, self.message = signum, message


class StopOnSignal(TrainerCallback):
    """Turns SIGTERM / SIGUSR1 / SIGINT into a checkpoint at the end of the current optimizer step.

    The handlers are installed at train begin and restored at train end, so evaluation and
    saving outside training keep Python's defaults. The flag is agreed over ranks once per
    optimizer step (a one-element all_reduce): a signal that reached one rank only (a node of a
    job) still stops every rank after the same step, and no rank waits in a collective that the
    others have left.
    """

    def __init__(self):
        self.signum: int | None = None  # the first signal received
        self.stopped_at: int | None = None  # the step training stopped after
        self._previous: dict[int, object] = {}
        self._first_sigint: float | None = None  # when the first SIGINT came (time.monotonic)
        self._pid: int | None = None  # the training process, which installed the handlers

    # -- handlers --------------------------------------------------------------------------

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a data loader worker forked with these handlers: the training process acts
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint < SAME_CTRL_C_S:
                return  # (torchrun forwarding the Ctrl-C this rank already got)
            if self._first_sigint is None:
                self._first_sigint = now
        if self.signum is not None and signum == signal.SIGINT:
            # A second Ctrl-C: the user does not want to wait for the step and the save.
            print("second Ctrl-C: stopping now without a checkpoint (the last saved one is kept)", file=sys.stderr,
                  flush=True)
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            print(f"{signal.Signals(signum).name} received: saving a checkpoint after the current step "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def install(self) -> None:
        self._pid = os.getpid()
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook's worker thread): leave signals alone
                return

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    # -- callback --------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._agreed(args.device)
        if signum:
            self.signum = signum
            self.stopped_at = state.global_step
            control.should_save = True  # also with --save_strategy no: the run is to be resumed
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.uninstall()

    def stop_after_training(self, device, global_step: int) -> bool:
        """After training ends: whether a signal came after the last step's agreement (during its
        evaluation or save); then the run is to save checkpoint-N and stop, not go on into the
        final phases. Every rank calls it (one all_reduce)."""
        if self.stopped_at is not None:
            return True
        signum = self._agreed(device)
        if signum:
            self.signum, self.stopped_at = signum, global_step
        return bool(signum)

    def _agreed(self, device) -> int:
        """The signal any rank received (0: none); every rank gets the same answer."""
        local = self.signum or 0
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        flag = torch.tensor([local], dtype=torch.int64, device=device if dist.get_backend() != "gloo" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def message(self, output_dir) -> str:
        name = signal.Signals(self.signum).name
        return (f"stopped by {name} at step {self.stopped_at}; checkpoint-{self.stopped_at} saved in {output_dir}; "
                "resume with --resume_from_checkpoint auto")


# -- data loader faults ---------------------------------------------------------------------------

_WORKER_FAULT = re.compile(r"DataLoader (timed out|worker .*(exited unexpectedly|is killed by signal))", re.S)


def dataloader_error(err: RuntimeError, num_workers: int, timeout: float) -> UserError | None:
    """A UserError naming the cause when `err` is PyTorch's report of a data worker that died or
    delivered nothing in time; None for any other error."""
    text = " ".join(str(err).split())
    match = _WORKER_FAULT.search(text)
    if not match:
        return None
    if match.group(1) == "timed out":
        cause = f"a data loader worker delivered no batch for {timeout:g} s (--dataloader_timeout)"
    else:
        cause = f"a data loader worker died ({text[:200]})"
    return UserError(
        f"{cause}. The usual causes: the shared memory workers hand batches over in is full (see `df -h /dev/shm`; "
        "in Docker raise it with --shm-size, e.g. 16g) or a file size limit (`ulimit -f`), a worker killed for "
        f"memory, or a slow/stuck data source. Lower --dataloader_num_workers (now {num_workers}; 0 loads in the "
        "training process and shows the underlying error) or raise --dataloader_timeout for slow data; the last "
        "checkpoint is kept (resume with --resume_from_checkpoint auto)"
    )
