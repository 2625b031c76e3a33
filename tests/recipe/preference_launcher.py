"""Runs finetune_hf_trainer_rlaif_v.py under torchrun and records, per rank, what each forward saw;
test_preference_distributed.py launches it.

    torchrun --nproc_per_node=2 tests/recipe/preference_launcher.py FLAGS...

RECIPE_TEST_BATCH_LOG=DIR  DIR/rank<RANK>.txt gets the lines of distributed_launcher.py: one per
                           training micro-batch ("train <step> images=<0|1>"), one per forward that
                           decided on the dummy image ("dummy <train|lockstep> images=<0|1>
                           needed=<0|1>"), and the dtypes the optimizer steps ("optimizer ...").
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def record_batches(log_dir: str) -> None:
    import recipe.preference
    from distributed_launcher import log_dummy_decisions, stepped_dtypes

    log = log_dummy_decisions(log_dir)

    training_step = recipe.preference.PreferenceTrainer.training_step

    def logged_step(self, model, inputs, *args, **kwargs):
        if self.state.global_step == 0 and not getattr(self, "_dtypes_logged", False):
            self._dtypes_logged = True
            log.write(f"optimizer {','.join(sorted(stepped_dtypes(self.optimizer)))}\n")
        log.write(f"train {self.state.global_step + 1} images={int(inputs.get('pixel_values') is not None)}\n")
        return training_step(self, model, inputs, *args, **kwargs)

    recipe.preference.PreferenceTrainer.training_step = logged_step


if __name__ == "__main__":
    if os.environ.get("RECIPE_TEST_BATCH_LOG"):
        record_batches(os.environ["RECIPE_TEST_BATCH_LOG"])
    import finetune_hf_trainer_rlaif_v

    finetune_hf_trainer_rlaif_v.TASK.main(sys.argv[1:])
