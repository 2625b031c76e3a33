"""The transformers `TrainingArguments` object of a run, built once the flags passed their checks.

Importing transformers' TrainingArguments brings in torch, accelerate, peft and bitsandbytes
(several seconds), so the flags are parsed (recipe.flag_parser) and checked (recipe.flag_checks)
from light dataclasses (recipe.args) first, and this is built only for a run that goes ahead
(`--help` and flag errors never import it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Before transformers (and through it accelerate and DeepSpeed): importing the model package sets
# DS_ACCELERATOR=cpu on a machine without CUDA, so DeepSpeed does not warn that it "set the
# accelerator to CPU".
import phi3v  # noqa: F401
from transformers import TrainingArguments

from .args import TrainingFlags
from .launcher import world_size

__all__ = ["RecipeTrainingArguments"]


@dataclass
class RecipeTrainingArguments(TrainingFlags, TrainingArguments):
    """transformers' TrainingArguments with the original recipe's flags and defaults
    (recipe.args.TrainingFlags: its fields replace transformers' fields of the same name)."""

    def __post_init__(self):
        # Derived values only; every check is in recipe.flag_checks, which ran before this.
        if self.activation_checkpointing_kwargs is None:
            # Non-reentrant checkpointing works with frozen parts and LoRA without extra hooks.
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        self.per_device_train_batch_size = self.batch_size_per_gpu
        self.weight_decay = self.wd
        self.disable_tqdm = self.no_tqdm or bool(self.disable_tqdm)
        self.gradient_accumulation_steps = self.batch_size // (world_size() * self.batch_size_per_gpu)
        if self.dataloader_num_workers == 0:
            self.dataloader_prefetch_factor = None  # transformers refuses it without workers
        if not torch.accelerator.is_available():
            # On a machine without GPUs accelerate only sets up a distributed CPU (gloo) job when
            # told so: otherwise every torchrun rank trains alone on all the data and reports a
            # world size of 1, and TrainingArguments refuses --bf16.
            self.use_cpu = True
        TrainingArguments.__post_init__(self)
        if self.deepspeed and self.use_cpu and world_size() > 1:
            # On GPUs accelerate initialises DeepSpeed's communication layer together with
            # torch.distributed; on CPU (use_cpu) it only sets up torch.distributed (gloo). ZeRO-3
            # builds the model inside deepspeed.zero.Init before the engine exists, and there
            # DeepSpeed would see a world of one. Its backend wraps the existing process group.
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
