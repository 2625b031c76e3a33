"""Runs finetune_hf_trainer_ucf101.py (or the script module RECIPE_TEST_SCRIPT names) under torchrun and records, per rank, what each forward saw;
test_distributed.py launches it.

    torchrun --nproc_per_node=2 tests/recipe/distributed_launcher.py FLAGS...

RECIPE_TEST_BATCH_LOG=DIR  DIR/rank<RANK>.txt gets one line per training micro-batch
                           ("train <step> images=<0|1>": whether that rank's batch held an image)
                           and one per forward that decided on the dummy image
                           ("dummy <train|lockstep> images=<0|1> needed=<0|1>"), so a test can
                           check that ranks really had image and image-less batches in the same
                           step and that the image-less rank ran the dummy crop; and one line
                           "loaded <dtype>": the dtype of the weights recipe.model.load_model loaded.
RECIPE_TEST_RANKS_AS_NODES=1
                           every rank pretends to be on a node of its own (recipe.shared_fs sees
                           "node <LOCAL_RANK>"), so the multi-node shared --output_dir check runs.
RECIPE_TEST_PRIVATE_OUTPUT_DIR=1
                           with it, rank 1's --output_dir is another directory (<dir>-node1): a
                           node whose disk is not the others'.
RECIPE_TEST_LOAD_FP32=1    load the weights in fp32 whatever the flags (the way full finetuning
                           under DeepSpeed loaded them before it loaded bf16/fp16), to compare.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def stepped_dtypes(optimizer) -> set[str]:
    """Dtypes of the tensors the innermost torch optimizer updates, below accelerate's and
    DeepSpeed's wrappers. ZeRO-3 hands its fp32 partitions to it only during the step."""
    while hasattr(optimizer, "optimizer"):
        if hasattr(optimizer, "fp32_partitioned_groups_flat"):
            return {str(t.dtype) for t in optimizer.fp32_partitioned_groups_flat}
        optimizer = optimizer.optimizer
    return {str(p.dtype) for group in optimizer.param_groups for p in group["params"]}


def log_dummy_decisions(log_dir: str):
    """This rank's batch log (opened for appending), with every dummy-image decision the model
    makes written to it; returns the log for the caller's own lines."""
    from phi3v.modeling_phi3v import Phi3VModel

    log = open(Path(log_dir) / f"rank{os.environ.get('RANK', '0')}.txt", "a", buffering=1)
    decide = Phi3VModel._dummy_image_needed

    def logged_decision(self, has_images, device):
        needed = decide(self, has_images, device)
        mode = "lockstep" if self.vision_lockstep else "train"
        log.write(f"dummy {mode} images={int(has_images)} needed={int(needed)}\n")
        return needed

    Phi3VModel._dummy_image_needed = logged_decision
    return log


def record_batches(log_dir: str) -> None:
    import recipe.runner
    import recipe.supervised
    import recipe.trainer

    log = log_dummy_decisions(log_dir)

    class Trainer(recipe.trainer.RecipeTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            if self.state.global_step == 0 and not getattr(self, "_dtypes_logged", False):
                self._dtypes_logged = True
                log.write(f"optimizer {','.join(sorted(stepped_dtypes(self.optimizer)))}\n")
                trainable = {str(p.dtype) for p in model.parameters() if p.requires_grad}
                log.write(f"trainable {','.join(sorted(trainable))}\n")
            log.write(f"train {self.state.global_step + 1} images={int(inputs.get('pixel_values') is not None)}\n")
            return super().training_step(model, inputs, *args, **kwargs)

    load_model = recipe.runner.load_model

    def logged_load(model_args, training_args):
        model = load_model(model_args, training_args)
        log.write(f"loaded {next(model.parameters()).dtype}\n")
        return model

    recipe.supervised.Supervised.trainer_class = Trainer
    recipe.runner.load_model = logged_load


def ranks_as_nodes(argv: list[str]) -> list[str]:
    import recipe.shared_fs

    rank = os.environ["LOCAL_RANK"]
    recipe.shared_fs._this_node = lambda: f"node {rank} (pretended)"
    if os.environ.get("RECIPE_TEST_PRIVATE_OUTPUT_DIR") and rank == "1":
        at = argv.index("--output_dir") + 1
        argv = [*argv[:at], argv[at] + "-node1", *argv[at + 1:]]
    return argv


def load_fp32() -> None:
    import torch

    import recipe.model

    recipe.model.weights_dtype = lambda model_args, training_args: torch.float32


if __name__ == "__main__":
    argv = sys.argv[1:]
    if os.environ.get("RECIPE_TEST_RANKS_AS_NODES"):
        argv = ranks_as_nodes(argv)
    if os.environ.get("RECIPE_TEST_LOAD_FP32"):
        load_fp32()
    if os.environ.get("RECIPE_TEST_BATCH_LOG"):
        record_batches(os.environ["RECIPE_TEST_BATCH_LOG"])
    import importlib

    script = importlib.import_module(os.environ.get("RECIPE_TEST_SCRIPT", "finetune_hf_trainer_ucf101"))
    script.TASK.main(argv)  # as the scripts' own __main__
