"""Runs finetune_hf_trainer_ucf101.py with test instrumentation; test_training.py launches it.

    python tests/recipe/ucf101_launcher.py FLAGS...            (or under torchrun)

RECIPE_TEST_KILL_AFTER_SAVE=N  the process SIGKILLs itself right after the checkpoint of step N
                               is written (no cleanup, like a node lost mid-run)
RECIPE_TEST_SIGNAL=STEP:NAME:RANK  process RANK sends itself signal NAME (e.g. SIGTERM) while training
                               step STEP (as a scheduler would, to one node of a job)
RECIPE_TEST_WRITE_LOG=DIR      every path this process opens for writing, renames, creates or
                               removes goes to DIR/rank<RANK>.txt (Python's audit hooks; files
                               written by native code, such as safetensors, are not seen)
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

WRITE_EVENTS = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree", "shutil.move"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def record_writes(log_dir: str) -> None:
    log = open(Path(log_dir) / f"rank{os.environ.get('RANK', '0')}.txt", "a", buffering=1)

    def hook(event, args):
        if event == "open":
            path, _, flags = args
            if not flags & WRITE_FLAGS:
                return
        elif event in WRITE_EVENTS:
            path = args[0]
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)):
            log.write(f"{event} {os.path.abspath(os.fsdecode(path))}\n")

    sys.addaudithook(hook)


def kill_after_save(step: int) -> None:
    from transformers import TrainerCallback

    import recipe.supervised
    import recipe.trainer

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)

    class Trainer(recipe.trainer.RecipeTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(KillAfterSave())

    recipe.supervised.Supervised.trainer_class = Trainer


def signal_during_step(spec: str) -> None:
    from transformers import TrainerCallback

    import recipe.supervised
    import recipe.trainer

    step, name, rank = spec.split(":")

    class SignalDuringStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == int(step) and os.environ.get("RANK", "0") == rank:
                os.kill(os.getpid(), getattr(signal, name))

    class Trainer(recipe.trainer.RecipeTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(SignalDuringStep())

    recipe.supervised.Supervised.trainer_class = Trainer


if __name__ == "__main__":
    if os.environ.get("RECIPE_TEST_SIGNAL"):
        signal_during_step(os.environ["RECIPE_TEST_SIGNAL"])
    if os.environ.get("RECIPE_TEST_WRITE_LOG"):
        record_writes(os.environ["RECIPE_TEST_WRITE_LOG"])
    if os.environ.get("RECIPE_TEST_KILL_AFTER_SAVE"):
        kill_after_save(int(os.environ["RECIPE_TEST_KILL_AFTER_SAVE"]))
    import finetune_hf_trainer_ucf101

    finetune_hf_trainer_ucf101.TASK.main(sys.argv[1:])
