"""How a script ends (recipe.errors.cli): its exit status, and a rank leaving its process group."""

import signal

import pytest
import torch.distributed as dist

from recipe.errors import INTERRUPTED, DataError, cli
from recipe.faults import Stopped


def stop(error):
    def main():
        raise error

    return main


@pytest.mark.parametrize("main, status", [(lambda: {"accuracy": 1.0}, 0), (stop(DataError("d.jsonl:1: bad")), 2),
                                          (stop(KeyboardInterrupt()), INTERRUPTED)])
def test_a_rank_leaves_its_process_group_however_the_run_ends(main, status, capsys):
    """Left to the interpreter's exit, a gloo group's teardown can abort a finished rank
    (SIGABRT, "terminate called without an active exception"), and torchrun reports the run as
    failed: it happened to a 2-rank test in CI."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert cli(main) == status
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    err = capsys.readouterr().err
    assert err == "" if status == 0 else err.strip().splitlines()[-1].startswith(("error: d.jsonl:1", "interrupted"))


def test_a_rank_stopped_by_a_signal_leaves_its_process_group_and_exits_with_the_signals_status():
    """A preempted run's stop (recipe.faults.Stopped, a SystemExit) goes through cli as well: a
    rank that aborted in the teardown would report -6 instead of 143, which a scheduler's requeue
    rule does not recognise."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(Stopped) as stopped:
            cli(stop(Stopped(signal.SIGTERM, "stopped by SIGTERM at step 2")))
        assert stopped.value.code == 143 and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_without_a_process_group_cli_only_returns_the_status():
    assert not dist.is_initialized()
    assert cli(lambda: None) == 0 and not dist.is_initialized()
