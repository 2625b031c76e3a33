"""The command-line flags every recipe shares: their definitions (dataclasses with defaults and
help texts) and the constants those need. Parsing them is recipe.flag_parser's job, checking them
recipe.flag_checks'.

All of the original recipe's flags keep their meaning (`--batch_size` is the global batch,
`--batch_size_per_gpu` the per-device one, `--wd`, `--no-tqdm`, `--lora_*`, ...), and the
transformers `TrainingArguments` flags work as well (`--save_steps`, `--max_steps`, `--report_to`,
`--seed`, `--deepspeed`, ...), with the original recipe's optimisation settings as defaults.
transformers' own names for what the original names differently (`--weight_decay`,
`--per_device_train_batch_size`, ...) are refused with the name to use (REFUSED).

Light on purpose, as --help and every flag error are: the flags the recipes document are light
dataclasses here (`TrainingFlags` holds the training ones); transformers' other flags are known
by name only, and the `TrainingArguments` object is built (recipe.training_args) only for a run
that passed every check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FlagError
from .packing import MAX_TOKENS_PER_ROW

__all__ = [
    "ModelArguments",
    "DataArguments",
    "FileDataArguments",
    "TrainingFlags",
    "FlagError",
    "DEFAULT_DEEPSPEED_CONFIG",
    "REFUSED",
    "MIRRORED",
]

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_DEEPSPEED_CONFIG = str(REPOSITORY / "ds_configs" / "zero2.json")

# Seconds a data worker may take to hand over a batch before the run stops with an error
# (--dataloader_timeout, recipe.faults): long enough for the slowest batch of large images, short
# enough that a dead or stuck worker is reported rather than waited on forever.
DATALOADER_TIMEOUT = 600

# transformers' names for what the original recipe calls differently: refused (and hidden from
# --help) rather than silently overwritten by the original's flag.
REFUSED = {
    "per_device_train_batch_size": "--batch_size_per_gpu",
    "weight_decay": "--wd",
    "gradient_accumulation_steps": "--batch_size (global; accumulation follows from it)",
    "per_device_eval_batch_size": "--eval_batch_size",
    "gradient_checkpointing": "--activation_checkpointing",
    "gradient_checkpointing_kwargs": "--activation_checkpointing_kwargs",
    # Multi-node runs need a shared --output_dir (recipe.shared_fs); a copy per node would have
    # every node's main process write and publish the same checkpoint there (recipe.checkpoints).
    "save_on_each_node": "a shared --output_dir (every node writes its part of a checkpoint there)",
}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="microsoft/Phi-3.5-vision-instruct",
        metadata={"help": "Official-format checkpoint: hub id or local directory (e.g. one written by "
                          "`python -m phi3v.tiny`). Loaded natively, without trust_remote_code."},
    )
    model_family: str = field(
        default="auto",
        metadata={"help": "Which release's rules the checkpoint follows (LongRoPE switch, KV cache at 4096): "
                          "'phi3.5v' (Phi-3.5-vision-instruct), 'phi3v-128k' (Phi-3-vision-128k-instruct), or 'auto': "
                          "the config's model_family key, else phi3v-128k if sliding_window is 131072 or its "
                          "_name_or_path names Phi-3-vision-128k, else phi3.5v.",
                  "choices": ["auto", "phi3.5v", "phi3v-128k"]},
    )
    use_flash_attention: bool = field(
        default=False, metadata={"help": "FlashAttention-2 kernels (Ampere or newer GPUs, needs --bf16 and "
                                         "`pip install -r requirements-gpu.txt`). Default: PyTorch SDPA."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    use_qlora: bool = field(
        default=False, metadata={"help": "4-bit NF4 base weights with LoRA adapters (implies --use_lora)."}
    )
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha_ratio: float = field(default=2.0, metadata={"help": "LoRA alpha = rank * this ratio."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA path."})
    freeze_vision_model: bool = field(
        default=False,
        metadata={"help": "Freeze the image encoder and projector: no gradients, no stored activations, and no "
                          "LoRA adapters there."},
    )
    num_crops: int = field(
        default=16, metadata={"help": "Max HD crops per image (1..16): more crops, more detail and tokens."}
    )
    vision_learning_rate: float | None = field(
        default=None, metadata={"help": "Separate learning rate for the CLIP tower (default: --learning_rate)."}
    )
    projector_learning_rate: float | None = field(
        default=None, metadata={"help": "Separate learning rate for the image projector and separators."}
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "After LoRA training, also write the merged full model to "
                                         "OUTPUT_DIR/merged (official format). With --use_qlora the adapter is "
                                         "merged into the unquantised base and merged/ is evaluated again "
                                         "(eval_merged.json)."}
    )
    save_dtype: str = field(
        default="bfloat16", metadata={"help": "dtype of the saved full model and merged/ (the release's bfloat16, "
                                              "or float32).", "choices": ["bfloat16", "float32"]}
    )


@dataclass
class DataArguments:
    max_length: int | None = field(
        default=None,
        metadata={"help": "Examples with more tokens are skipped (counted and reported); image tokens are never "
                          "cut. Default: no limit."},
    )
    skip_bad_examples: bool = field(
        default=False, metadata={"help": "Skip examples that fail validation (reported with counts per reason) "
                                         "instead of stopping before training."}
    )
    decode_images: bool = field(
        default=False, metadata={"help": "Validation fully decodes every image (catches truncated files; slower). "
                                         "Default: header and structure check."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a random N of the training examples (seeded by --seed, kept in "
                                        "file order)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate a random N of the evaluation examples (seeded by --seed)."}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Per-device batch size of generation in evaluation."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generation length limit in evaluation."})
    eval_only: bool = field(
        default=False, metadata={"help": "Only evaluate the model, once (eval_after.json); no training."}
    )
    skip_eval_before: bool = field(default=False, metadata={"help": "Do not evaluate before training."})
    padding_free: bool = field(
        default=False, metadata={"help": "Pack each micro-batch's examples whole into rows of at most "
                                         "--max_tokens_per_row tokens, attention kept within each example: no "
                                         "padding tokens (raise --batch_size_per_gpu to pack more per row)."}
    )
    max_tokens_per_row: int = field(
        default=MAX_TOKENS_PER_ROW,
        metadata={"help": "Row length limit of --padding_free (at most 4096, the original context, so rotary "
                          "factors stay those of each example alone)."},
    )
    eval_turns: str = field(
        default="last",
        metadata={"help": "Which answers of a multi-turn example evaluation scores: 'last' (earlier turns and "
                          "their reference answers are the prompt) or 'all' (every assistant turn, each a "
                          "prediction of its own whose prompt is the conversation up to it).",
                  "choices": ["last", "all"]},
    )

    def check(self) -> None:
        """The data flags' own checks (recipe.flag_checks runs them with the other flag checks,
        before anything loads). A task's subclass adds its own flags' rules after super().check()."""
        for name in ("max_train_samples", "max_eval_samples", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FlagError(f"--{name} {value} must be at least 1 (or left out: no limit)")

    def check_model_flags(self, model_args: ModelArguments) -> None:
        """A task's data flags that depend on the model flags (run last of the flag checks,
        recipe.flag_checks.check_flags); none here."""


def _default_workers() -> int:
    """min(4, the CPUs this process may run on / the processes on this node): more workers than
    CPUs only compete, and every rank on the node (torchrun's LOCAL_WORLD_SIZE) starts its own."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, min(4, cpus // max(local_ranks, 1)))


@dataclass
class FileDataArguments(DataArguments):
    """Data files in any layout the recipes read (recipe.layouts): the flags of the scripts that
    train on the user's own files."""

    train_file: str | None = field(
        default=None, metadata={"help": "Training examples: a JSON lines file or a JSON list, in our layout, LLaVA's, "
                                        "the messages layout or the_cauldron's (see --data_format)."}
    )
    eval_file: str | None = field(
        default=None, metadata={"help": "Evaluation examples, in any layout --train_file takes."}
    )
    image_dir: str | None = field(
        default=None, metadata={"help": "Directory the image paths of --train_file/--eval_file are relative to."}
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "Layout of the data: detected from the first record (and logged), or forced.",
                  "choices": ["auto", "ours", "llava", "messages", "cauldron"]},
    )
    allow_absolute_image_paths: bool = field(
        default=False, metadata={"help": "Accept absolute image paths in the data (default: refused, so a file "
                                         "moved to another machine cannot silently read other images)."}
    )


@dataclass
class TrainingFlags:
    """The training flags the recipes document, with the original recipe's defaults.

    The defaults of the optimisation block are the settings the original recipe hard-codes and
    published its tables with (AdamW betas (0.9, 0.95), eps 1e-7, linear schedule with 50 warmup
    steps, gradient clipping at 1.0, activation checkpointing, data workers prefetching 2
    batches each, weight decay 0.01). The flags that keep transformers' meaning and default
    (MIRRORED) are declared here too, so that --help and the checks need not import TrainingArguments;
    recipe.training_args.RecipeTrainingArguments puts these fields over TrainingArguments'.
    """

    output_dir: str | None = field(default="./output", metadata={"help": "Where checkpoints and results go."})
    batch_size: int = field(
        default=64, metadata={"help": "Global batch size (all GPUs, all nodes); gradient accumulation fills the gap."}
    )
    batch_size_per_gpu: int = field(default=1, metadata={"help": "Per-device micro-batch size."})
    wd: float = field(default=0.01, metadata={"help": "Weight decay (AdamW; biases, norms and separators get none)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-7, metadata={"help": "AdamW epsilon."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning-rate schedule after warmup."})
    warmup_steps: float = field(default=50, metadata={"help": "Linear warmup steps (a value < 1: ratio of all steps)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    activation_checkpointing: bool | None = field(
        default=True,
        metadata={"help": "Recompute activations in the backward pass (less memory, ~20%% slower)."},
    )
    dataloader_num_workers: int = field(
        default_factory=_default_workers,
        metadata={"help": "Data loader worker processes per device (images decoded off the training step). "
                          "Default: min(4, CPUs available to the process / processes on the node), at least 1."},
    )
    dataloader_prefetch_factor: int | None = field(
        default=2, metadata={"help": "Batches each worker loads ahead (ignored with --dataloader_num_workers 0)."}
    )
    dataloader_timeout: int = field(
        default=DATALOADER_TIMEOUT,
        metadata={"help": "Seconds a data loader worker may take to deliver a batch; past it (or when a worker dies) "
                          "the run stops with an error naming the cause instead of waiting forever. 0: no limit."},
    )
    no_tqdm: bool = field(default=False, metadata={"aliases": ["--no-tqdm"], "help": "No progress bars."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow an output_dir that already holds a finished run; it is replaced."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint directory, or 'auto' for the latest one in output_dir."}
    )
    deepspeed: str | None = field(
        default="auto",
        metadata={"help": "DeepSpeed config file, or 'none'. auto = ds_configs/zero2.json for full finetuning, "
                          "none for LoRA, QLoRA and --eval_only. ZeRO-3: ds_configs/zero3.json."},
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "'group_by_length' (batches of similar length, little padding; used when a device gets "
                          "more than one example per step), 'random', 'sequential'.",
                  "choices": ["random", "sequential", "group_by_length", "batch_rebalance"]},
    )
    metric_for_best_model: str | None = field(
        default=None, metadata={"help": "Metric that picks the best checkpoint with --load_best_model_at_end "
                                        "(default: the task's metric, computed by generation)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep only the newest N checkpoints."})
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Experiment trackers to log to (tensorboard, wandb, ...); the task metric "
                                          "goes there too."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all dataset columns (required)."})

    dry_run: bool = field(
        default=False,
        metadata={"help": "Check the flags and the data, load the processor, build the first batches, print what "
                          "the run would cost (examples, tokens, optimizer steps, memory per GPU) and exit, before "
                          "any weights load."},
    )
    # transformers' flags with transformers' defaults (MIRRORED), in the recipe's own words.
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (AdamW)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    max_steps: int = field(
        default=-1, metadata={"help": "Stop after N optimizer steps (overrides --num_train_epochs). Default: -1, "
                                      "off."}
    )
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision (Ampere or newer GPUs, CPUs)."})
    fp16: bool = field(default=False, metadata={"help": "float16 mixed precision (V100; CUDA only)."})
    seed: int = field(default=42, metadata={"help": "Random seed (model init of adapters, data order, subsets)."})
    save_strategy: str = field(
        default="steps", metadata={"help": "When to checkpoint.", "choices": ["no", "steps", "epoch", "best"]}
    )
    log_level: str = field(
        default="passive",
        metadata={"help": "Log level of the main process for the recipe and the libraries; 'passive' (the default): "
                          "the recipe's progress lines, the libraries' warnings that matter. Any other level also "
                          "shows the library messages the recipe otherwise hides.",
                  "choices": ["detail", "debug", "info", "warning", "error", "critical", "passive"]},
    )
    log_level_replica: str = field(
        default="warning", metadata={"help": "Log level of the other processes.",
                                     "choices": ["detail", "debug", "info", "warning", "error", "critical", "passive"]}
    )
    eval_strategy: str = field(
        default="no", metadata={"help": "Also evaluate (the task metric, by generation) during training.",
                                "choices": ["no", "steps", "epoch"]}
    )
    eval_steps: float | None = field(
        default=None, metadata={"help": "Evaluate every N steps with --eval_strategy steps. Default: "
                                        "--logging_steps."}
    )
    load_best_model_at_end: bool = field(
        default=False, metadata={"help": "Keep the checkpoint with the best --metric_for_best_model as the final "
                                         "model (needs --eval_strategy and a matching --save_strategy)."}
    )
    greater_is_better: bool | None = field(
        default=None, metadata={"help": "Whether a higher --metric_for_best_model is better. Default: yes, unless "
                                        "the metric's name ends in 'loss'."}
    )


# TrainingFlags fields that keep transformers' default (tests check they still agree).
MIRRORED = ("learning_rate", "num_train_epochs", "max_steps", "bf16", "fp16", "seed", "save_strategy", "log_level",
            "log_level_replica", "eval_strategy", "eval_steps", "load_best_model_at_end", "greater_is_better")
