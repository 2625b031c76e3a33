"""Preemption and faults: nothing lost, nothing hangs, nothing trained twice.

A signal on one rank stops both after the same step with a checkpoint and resumes to the weights
of an uninterrupted run; a run resumed from its last step trains nothing more and finishes like
the uninterrupted one; a broken newest checkpoint is skipped by name; a failed save is one error
and leaves the earlier checkpoints; a dead or stuck data worker is an error in bounded time; a
second run into a directory in use stops at once (also on 2 ranks).
"""

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune_hf_trainer_ucf101 as ucf
from recipe.checkpoints import RUN_COMPLETE_FILE, TMP_DIR, last_complete_checkpoint, verify
from recipe.data import ConversationDataset
from recipe.errors import UserError
from recipe.faults import StopOnSignal, exit_status
from recipe.lock import LOCK_FILE, STALE_SECONDS, OutputDirLock
from recipe.task import run
from test_training import SUBPROCESS_TIMEOUT, assert_same_tensors, flags, launch, read_json

ZERO2 = str(Path(ucf.__file__).parent / "ds_configs" / "zero2.json")
LORA = ["--deepspeed", "none", "--use_lora"]
# 4 examples, a global batch of 2: 2 steps per epoch.
COMMON = ["--batch_size", 2, "--batch_size_per_gpu", 1, "--learning_rate",
          "1e-3", "--max_eval_samples", 1, "--max_new_tokens", 2, "--skip_eval_before"]


def comparable(run_complete: dict) -> dict:
    """run_complete.json without what differs between an interrupted and a straight run by nature:
    timing (throughput) and the resume flag."""
    out = json.loads(json.dumps(run_complete))
    out["results"].pop("throughput")
    out["training_args"].pop("resume_from_checkpoint")
    out["training_args"].pop("output_dir")
    return out


# -- signals: 2 ranks, one of them signalled, both stop after the same step --------------------


def stop_on_two_ranks(tiny, data, out, *extra) -> None:
    """SIGTERM to rank 1 alone during step 2: both ranks stop after step 2 with checkpoint-2."""
    proc = launch(flags(tiny, data, out, *extra), torchrun_procs=2, check=False,
                  env={"RECIPE_TEST_SIGNAL": "2:SIGTERM:1"})
    assert proc.returncode != 0, proc.stdout[-3000:]
    # Each rank exits with 143; torchrun reports the failure of its workers.
    assert f"exitcode  : {exit_status(signal.SIGTERM)}" in proc.stderr, proc.stderr[-3000:]
    assert "SIGABRT" not in proc.stderr and "exitcode  : -6" not in proc.stderr  # (each rank left its group)
    line = f"stopped by SIGTERM at step 2; checkpoint-2 saved in {out}; resume with --resume_from_checkpoint auto"
    assert (proc.stdout + proc.stderr).count(line) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    # (torchrun prints its own ChildFailedError traceback for any worker status but 0; the workers print none)
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith('File "') and "recipe" in line]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert verify(out / "checkpoint-2") is None and not (out / RUN_COMPLETE_FILE).exists()
    history = read_json(out / "checkpoint-2" / "trainer_state.json")["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    assert not (out / LOCK_FILE).exists()  # released on the way out


def test_sigterm_on_one_rank_stops_both_after_the_same_step(tiny_checkpoint, ucf101_data, tmp_path):
    stop_on_two_ranks(tiny_checkpoint, ucf101_data, tmp_path / "out", *COMMON, *LORA, "--max_steps", 4,
                      "--save_steps", 100)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [pytest.param(LORA, id="ddp_lora"), pytest.param(["--deepspeed", ZERO2], id="zero2")])
def test_sigterm_on_two_ranks_resumes_exactly(mode, tiny_checkpoint, ucf101_data, tmp_path):
    common = [*COMMON, "--max_steps", 4, "--save_steps", 100, *mode]
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    stop_on_two_ranks(tiny_checkpoint, ucf101_data, stopped, *common)
    launch(flags(tiny_checkpoint, ucf101_data, stopped, *common, "--resume_from_checkpoint", "auto"), torchrun_procs=2)
    launch(flags(tiny_checkpoint, ucf101_data, straight, *common), torchrun_procs=2)
    weights = "adapter_model.safetensors" if "--use_lora" in mode else "model.safetensors"
    assert_same_tensors(load_file(stopped / weights), load_file(straight / weights))
    assert read_json(stopped / RUN_COMPLETE_FILE)["results"]["global_step"] == 4


def add_callback(monkeypatch, callback) -> None:
    """The runner's trainer gets `callback` (added once Runner.setup_trainer has built it)."""
    import recipe.runner

    original = recipe.runner.Runner.setup_trainer

    def with_callback(self):
        original(self)
        self.trainer.add_callback(callback)

    monkeypatch.setattr(recipe.runner.Runner, "setup_trainer", with_callback)


def test_sigusr1_in_process_stops_with_its_status(tiny_checkpoint, ucf101_data, tmp_path, monkeypatch, caplog):
    """One process (python script.py): the same stop on SIGUSR1 (SLURM's --signal), also with
    --save_strategy no, and status 128 + 10; resuming gives the weights of a straight run."""
    caplog.set_level(logging.INFO, logger="recipe")
    from transformers import TrainerCallback

    class SignalAtStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    add_callback(monkeypatch, SignalAtStep2())
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run(ucf.TASK, flags(tiny_checkpoint, ucf101_data, out, *COMMON, *LORA, "--max_steps", 4,
                            "--save_strategy", "no"))
    assert stop.value.code == exit_status(signal.SIGUSR1) == 138
    assert "stopped by SIGUSR1 at step 2; checkpoint-2 saved" in caplog.text
    assert verify(out / "checkpoint-2") is None
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored after training

    monkeypatch.undo()  # (the resumed and straight runs without the signal)
    common = [*COMMON, *LORA, "--max_steps", 4, "--save_strategy", "no"]
    resumed = run(ucf.TASK, flags(tiny_checkpoint, ucf101_data, out, *common, "--resume_from_checkpoint", "auto"))
    straight = run(ucf.TASK, flags(tiny_checkpoint, ucf101_data, tmp_path / "straight", *common))
    assert resumed["global_step"] == 4 and resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)
    assert_same_tensors(load_file(out / "adapter_model.safetensors"),
                        load_file(tmp_path / "straight" / "adapter_model.safetensors"))


def test_ctrl_c_forwarded_by_torchrun_is_not_a_second_ctrl_c(monkeypatch):
    """Under torchrun one Ctrl-C reaches a rank twice: from the terminal (the whole foreground
    process group) and forwarded by torchrun a moment later. That is one Ctrl-C (save, then
    stop); only a later one stops at once."""
    import recipe.faults

    clock = [100.0]
    monkeypatch.setattr(recipe.faults.time, "monotonic", lambda: clock[0])
    stop = StopOnSignal()
    stop._pid = os.getpid()  # (as install() records it)
    stop._handle(signal.SIGINT, None)
    clock[0] += 0.05
    stop._handle(signal.SIGINT, None)  # torchrun's forward: no KeyboardInterrupt
    assert stop.signum == signal.SIGINT
    clock[0] += 5
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_every_rank_records_the_best_checkpoint_where_it_is_published(tmp_path, monkeypatch):
    """The Trainer records the best checkpoint under the directory it saved into (.checkpoint-tmp)
    on every rank; every rank must see the published path, not only the main one: with
    --load_best_model_at_end every rank loads the best model from it at the end (DeepSpeed reads
    its shards on each rank; DDP ranks would otherwise keep the last weights)."""
    import types

    import recipe.trainer
    from transformers import Trainer, TrainerState

    def library_save(self, model, trial):  # what Trainer._save_checkpoint records when this step is the best
        step = self.state.global_step
        self.state.best_model_checkpoint = os.path.join(self._get_output_dir(trial), f"checkpoint-{step}")

    monkeypatch.setattr(Trainer, "_save_checkpoint", library_save)
    monkeypatch.setattr(recipe.trainer, "barrier", lambda: None)
    trainer = recipe.trainer.RecipeTrainer.__new__(recipe.trainer.RecipeTrainer)
    trainer.args = types.SimpleNamespace(should_save=False, output_dir=str(tmp_path), save_total_limit=None)
    trainer.state, trainer.checkpoint_extras, trainer._saving_into = TrainerState(global_step=4), [], None
    trainer.hp_search_backend = None
    trainer._save_checkpoint(None, None)  # a rank other than the main one
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")


def test_data_workers_ignore_the_stop_signals(monkeypatch, capsys):
    """Data loader workers are forked after the handlers are installed and inherit them; a
    Ctrl-C or a SIGTERM sent to the process group reaches them too. Only the training process
    announces and acts on a signal (each worker printed its own 'received' line)."""
    import recipe.faults

    stop = StopOnSignal()
    stop.install()
    try:
        training_pid = os.getpid()
        monkeypatch.setattr(recipe.faults.os, "getpid", lambda: training_pid + 1)  # a forked worker
        stop._handle(signal.SIGTERM, None)
        stop._handle(signal.SIGINT, None)
        assert stop.signum is None and capsys.readouterr().err == ""
    finally:
        stop.uninstall()


def test_a_save_clears_what_a_killed_save_left(tmp_path, monkeypatch):
    """A save killed at another step (a stop at step 7, then resumed from checkpoint-5) leaves its
    unfinished directory in .checkpoint-tmp: a full DeepSpeed checkpoint's worth of disk. The next
    save removes it (one run per directory: nothing else writes there)."""
    import types

    import recipe.trainer
    from transformers import Trainer, TrainerState

    def library_save(self, model, trial):
        target = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        target.mkdir(parents=True)
        self.state.save_to_json(str(target / "trainer_state.json"))

    monkeypatch.setattr(Trainer, "_save_checkpoint", library_save)
    monkeypatch.setattr(recipe.trainer, "barrier", lambda: None)
    left = tmp_path / TMP_DIR / "checkpoint-7"
    left.mkdir(parents=True)
    (left / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    trainer = recipe.trainer.RecipeTrainer.__new__(recipe.trainer.RecipeTrainer)
    trainer.args = types.SimpleNamespace(should_save=True, output_dir=str(tmp_path), save_total_limit=None)
    trainer.state, trainer.checkpoint_extras, trainer._saving_into = TrainerState(global_step=10), [], None
    trainer.hp_search_backend = None
    trainer._save_checkpoint(None, None)
    assert (tmp_path / "checkpoint-10" / "trainer_state.json").is_file() and not left.exists()


def test_a_signal_after_the_last_step_still_stops_with_a_checkpoint(tiny_checkpoint, ucf101_data, tmp_path,
                                                                     monkeypatch, caplog):
    """A signal that comes after the last step was agreed on (during that step's evaluation or
    save, before training ends) is not lost: the run saves checkpoint-N and stops with its status
    instead of going on into the final phases (evaluation, merge) that the scheduler will kill."""
    caplog.set_level(logging.INFO, logger="recipe")
    from transformers import TrainerCallback

    class SignalAfterLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # (after StopOnSignal's agreement)
            if state.global_step == state.max_steps:
                os.kill(os.getpid(), signal.SIGUSR1)

    add_callback(monkeypatch, SignalAfterLastStep())
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run(ucf.TASK, flags(tiny_checkpoint, ucf101_data, out, *COMMON, *LORA, "--max_steps", 2,
                            "--save_strategy", "no"))
    assert stop.value.code == 138 and "stopped by SIGUSR1 at step 2; checkpoint-2 saved" in caplog.text
    assert verify(out / "checkpoint-2") is None and not (out / RUN_COMPLETE_FILE).exists()


# -- resuming: from the last step, from a broken newest checkpoint --------------------------------


def test_resume_from_the_last_step_and_past_a_broken_checkpoint(tiny_checkpoint, ucf101_data, tmp_path, caplog):
    """Killed after the checkpoint of the last step (during the final save or evaluation): the
    resumed run trains nothing more and its run_complete.json is the straight run's. The same run
    with that checkpoint's optimizer state truncated resumes from the previous checkpoint."""
    caplog.set_level(logging.INFO, logger="recipe")
    common = [*COMMON, *LORA, "--max_steps", 3, "--save_steps", 1]
    killed = tmp_path / "killed"
    proc = launch(flags(tiny_checkpoint, ucf101_data, killed, *common), env={"RECIPE_TEST_KILL_AFTER_SAVE": "3"},
                  check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (killed / LOCK_FILE).exists()  # left by the killed process
    broken = tmp_path / "broken"
    shutil.copytree(killed, broken)
    optimizer = broken / "checkpoint-3" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])

    straight = run(ucf.TASK, flags(tiny_checkpoint, ucf101_data, tmp_path / "straight", *common))
    resumed = run(ucf.TASK, flags(tiny_checkpoint, ucf101_data, killed, *common, "--resume_from_checkpoint", "auto"))
    assert "taking over the lock of process" in caplog.text
    assert resumed["global_step"] == 3 and "trained 3 steps" in caplog.text
    assert not (killed / "checkpoint-4").exists()
    assert comparable(read_json(killed / RUN_COMPLETE_FILE)) == comparable(
        read_json(tmp_path / "straight" / RUN_COMPLETE_FILE))
    assert resumed["train_loss"] == straight["train_loss"]

    caplog.clear()
    run(ucf.TASK, flags(tiny_checkpoint, ucf101_data, broken, *common, "--resume_from_checkpoint", "auto"))
    assert f"not resuming from {broken / 'checkpoint-3'}: {optimizer}: unreadable" in caplog.text
    assert "resuming from " + str(broken / "checkpoint-2") in caplog.text
    for out in (killed, broken):
        assert_same_tensors(load_file(out / "adapter_model.safetensors"),
                            load_file(tmp_path / "straight" / "adapter_model.safetensors"))


def test_verify_names_the_file_that_would_not_load(tmp_path):
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    assert "trainer_state.json: missing" in verify(ckpt)
    (ckpt / "trainer_state.json").write_text("{}")
    save_file({"w": torch.zeros(100)}, ckpt / "adapter_model.safetensors")
    torch.save({"state": torch.zeros(10)}, ckpt / "optimizer.pt")
    assert verify(ckpt) is None
    weights = (ckpt / "adapter_model.safetensors").read_bytes()
    (ckpt / "adapter_model.safetensors").write_bytes(weights[:-8])
    assert verify(ckpt) == f"{ckpt / 'adapter_model.safetensors'}: truncated ({len(weights) - 8} bytes, its header " \
                           f"describes {len(weights)})"
    (ckpt / "adapter_model.safetensors").write_bytes(weights)
    (ckpt / "trainer_state.json").write_text('{"global_step": ')
    assert verify(ckpt).startswith(f"{ckpt / 'trainer_state.json'}: unreadable")
    shutil.copytree(ckpt, tmp_path / "checkpoint-0")
    (tmp_path / "checkpoint-0" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-0")


def test_failed_save_is_one_error_and_keeps_the_earlier_checkpoint(tiny_checkpoint, ucf101_data, tmp_path,
                                                                    monkeypatch):
    """The disk fills while checkpoint-2's optimizer state is written."""
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path) and str(path).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        run(ucf.TASK, flags(tiny_checkpoint, ucf101_data, out, *COMMON, *LORA, "--max_steps", 3, "--save_steps", 1))
    message = str(err.value)
    assert message.startswith(f"saving checkpoint {out / 'checkpoint-2'} failed: No space left on device; ")
    assert "GiB free there" in message and "--resume_from_checkpoint auto" in message
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"] and verify(out / "checkpoint-1") is None
    assert not any((out / TMP_DIR).iterdir()) and not (out / LOCK_FILE).exists()


# -- data workers: an error in bounded time, never a hang -----------------------------------------


@pytest.mark.parametrize("fault", ["hangs", "dies"])
def test_data_worker_fault_is_an_error_not_a_hang(fault, tiny_checkpoint, ucf101_data, tmp_path, monkeypatch):
    get = ConversationDataset.__getitem__

    def faulty(self, index):
        if torch.utils.data.get_worker_info() is not None:  # in a worker process only
            if fault == "dies":
                os._exit(1)
            time.sleep(120)
        return get(self, index)

    monkeypatch.setattr(ConversationDataset, "__getitem__", faulty)
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        run(ucf.TASK, flags(tiny_checkpoint, ucf101_data, tmp_path / "out", *COMMON, *LORA, "--max_steps", 2,
                            "--dataloader_num_workers", 1, "--dataloader_prefetch_factor", 1,
                            "--dataloader_timeout", 3))
    assert time.monotonic() - start < 60
    message = str(err.value)
    assert ("delivered no batch for 3 s" if fault == "hangs" else "a data loader worker died") in message
    assert "--shm-size" in message and "--dataloader_num_workers (now 1" in message


# -- the lock: one run per output directory ------------------------------------------------------


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    lock = OutputDirLock(tmp_path)
    host = socket.gethostname()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": host, "pid": os.getppid(), "since": "then"}))
    assert f"is in use by another run (process {os.getppid()} on {host} since then" in lock.acquire()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    assert "(process 1 on elsewhere" in lock.acquire()  # another host's processes cannot be checked
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": host, "pid": dead.pid, "since": "then"}))
    assert lock.acquire() is None and f"taking over the lock of process {dead.pid}" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_another_host_is_taken_over_once_no_longer_refreshed(tmp_path, caplog):
    # A run SIGKILLed on another host (or a lost node) stops refreshing its lock; a requeued run takes it over.
    lock, path = OutputDirLock(tmp_path), tmp_path / LOCK_FILE
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    os.utime(path, (time.time() - STALE_SECONDS + 60,) * 2)  # refreshed lately: still running there
    assert re.search(r"\(process 1 on elsewhere since then, refreshed 24\d s ago; taken over after 300 s", lock.acquire())
    os.utime(path, (time.time() - STALE_SECONDS - 60,) * 2)
    assert lock.acquire() is None
    assert re.search(r"taking over the lock of process 1 on elsewhere, not refreshed for 36\d s", caplog.text)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_the_holder_refreshes_its_lock_until_released(tmp_path):
    lock, path = OutputDirLock(tmp_path, refresh_seconds=0.01), tmp_path / LOCK_FILE
    assert lock.acquire() is None
    old = time.time() - STALE_SECONDS - 60
    os.utime(path, (old, old))
    deadline = time.monotonic() + 30
    while path.stat().st_mtime == old and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.stat().st_mtime > old + STALE_SECONDS  # touched again: another host would wait
    lock.release()
    assert not path.exists() and not [t for t in threading.enumerate() if t.name == "output-dir-lock"]


def test_second_run_into_a_directory_in_use_stops_at_once_on_two_ranks(tiny_checkpoint, ucf101_data, tmp_path):
    """Rank 0 finds the lock of a live run (this test's process); both ranks stop before loading
    anything, with one error line and status 2."""
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "now"}))
    start = time.monotonic()
    proc = launch(flags(tiny_checkpoint, ucf101_data, out, *COMMON, *LORA, "--max_steps", 2), torchrun_procs=2,
                  check=False)
    assert proc.returncode != 0
    assert time.monotonic() - start < SUBPROCESS_TIMEOUT
    errors = [line for line in proc.stderr.splitlines() if "error:" in line and "in use by another run" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith('File "') and "recipe" in line]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written, the lock left to its owner
