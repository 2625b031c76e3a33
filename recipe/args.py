"""Command-line flags shared by every recipe, and the checks run before any model is loaded.

All of the original recipe's flags keep their meaning (`--batch_size` is the global batch,
`--batch_size_per_gpu` the per-device one, `--wd`, `--no-tqdm`, `--lora_*`, ...), and the
transformers `TrainingArguments` flags work as well (`--save_steps`, `--max_steps`, `--report_to`,
`--seed`, `--deepspeed`, ...), with the original recipe's optimisation settings as defaults.
transformers' own names for what the original names differently (`--weight_decay`,
`--per_device_train_batch_size`, ...) are refused with the name to use.

Flags are matched exactly: no abbreviations (argparse would otherwise take `--learning_rat 5` as
the learning rate). Every problem ends in one `error:` line (recipe.errors).

This module is light on purpose: `--help` and every flag error come from it without importing
torch or transformers' trainer (seconds). The flags the recipes document are light dataclasses
here (`TrainingFlags` holds the training ones); transformers' other flags are known by name
(read from its source, not imported) and parsed, with the `TrainingArguments` object built
(recipe.training_args), only for a run that passed every check.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

from transformers import HfArgumentParser

from .checkpoints import last_complete_checkpoint, verify
from .errors import FlagError
from .packing import MAX_TOKENS_PER_ROW

# Seconds a data worker may take to hand over a batch before the run stops with an error
# (--dataloader_timeout, recipe.faults): long enough for the slowest batch of large images, short
# enough that a dead or stuck worker is reported rather than waited on forever.
DATALOADER_TIMEOUT = 600

__all__ = [
    "ModelArguments",
    "DataArguments",
    "FileDataArguments",
    "TrainingFlags",
    "RecipeTrainingArguments",
    "Flags",
    "FlagError",
    "parse_flags",
    "build_training_args",
    "parse_transformers_flags",
    "parse_args",
    "check_args",
    "world_size",
    "RUN_COMPLETE_FILE",
    "DEFAULT_DEEPSPEED_CONFIG",
]

logger = logging.getLogger("recipe")

RUN_COMPLETE_FILE = "run_complete.json"
REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_DEEPSPEED_CONFIG = str(REPOSITORY / "ds_configs" / "zero2.json")
TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer's name (a test checks they agree)

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
        """The data flags' own checks (called with the other flag checks, before anything loads)."""
        for name in ("max_train_samples", "max_eval_samples", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FlagError(f"--{name} {value} must be at least 1 (or left out: no limit)")


def _default_workers() -> int:
    """min(4, the CPUs this process may run on): more workers than CPUs only compete."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cpus)


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
                          "Default: min(4, CPUs available to the process)."},
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


def __getattr__(name: str):
    """`RecipeTrainingArguments` imports transformers' TrainingArguments (heavy): on first use."""
    if name == "RecipeTrainingArguments":
        from .training_args import RecipeTrainingArguments

        return RecipeTrainingArguments
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def world_size() -> int:
    """Processes in the job, from torchrun's environment (1 when run with plain python)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# -- parsing -----------------------------------------------------------------------------------

GROUPS = ("task data", "model and method", "training", "evaluation", "other transformers flags")
# Flags shown under "training" / "evaluation" besides the recipe's own dataclass fields.
TRAINING_FLAGS = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "batch_size", "batch_size_per_gpu",
    "learning_rate", "num_train_epochs", "max_steps", "wd", "adam_beta1", "adam_beta2", "adam_epsilon",
    "lr_scheduler_type", "warmup_steps", "max_grad_norm", "activation_checkpointing", "bf16", "fp16",
    "deepspeed", "seed", "save_strategy", "save_steps", "save_total_limit", "logging_steps",
    "report_to", "train_sampling_strategy", "dataloader_num_workers", "dataloader_prefetch_factor", "no_tqdm",
    "dataloader_timeout", "log_level", "log_level_replica", "padding_free", "max_tokens_per_row", "dry_run",
}
EVALUATION_FLAGS = {
    "eval_strategy", "eval_steps", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    "eval_batch_size", "max_new_tokens", "eval_turns", "eval_only", "skip_eval_before",
}
HIDDEN = {"remove_unused_columns"}  # must stay as it is; not offered


def _is_switch(action: argparse.Action) -> bool:
    """An on/off flag (HfArgumentParser's bool: `--flag` alone means on; `--flag False` works too)."""
    return action.nargs == "?" and action.const is True


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag under its name with underscores only (the dashed spelling works too); on/off
    flags without a value (`--use_lora`, `--no_activation_checkpointing`); a default shown once:
    where the help text does not already explain it, and not for switches that are off."""

    def _format_action_invocation(self, action):
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            return super()._format_action_invocation(action)
        name = action.option_strings[0]
        if _is_switch(action):
            negation = getattr(action, "negation", None)
            return f"{name}, {negation}" if negation else name
        if action.nargs == 0:
            return name
        return f"{name} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is argparse.SUPPRESS or not action.option_strings:
            return text
        if _is_switch(action):
            return f"{text} (default: on)" if default else text
        return f"{text} (default: %(default)s)"


@functools.lru_cache(maxsize=1)
def transformers_flag_names() -> frozenset[str] | None:
    """The field names of the installed transformers' TrainingArguments, read from its source
    (importing it takes seconds: torch, accelerate, peft, bitsandbytes). None if the source is
    not where or what it used to be (a class with bases: some fields would be elsewhere);
    unknown flags are then left to transformers' parser (build_training_args, after the imports)."""
    try:
        spec = importlib.util.find_spec("transformers")
        source = Path(spec.origin).with_name("training_args.py").read_text(encoding="utf-8")
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
                if node.bases or node.keywords:  # (fields it inherits are not in this source)
                    return None
                names = frozenset(item.target.id for item in node.body
                                  if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                                  and not item.target.id.startswith("_"))
                return names or None
    except (AttributeError, OSError, SyntaxError, TypeError, ValueError):
        pass
    return None


class RecipeArgumentParser(HfArgumentParser):
    """HfArgumentParser with exact flag names, one-line errors and a grouped --help."""

    def __init__(self, dataclass_types, defaults: dict | None = None):
        super().__init__(dataclass_types, allow_abbrev=False, formatter_class=_HelpFormatter,
                         usage="%(prog)s [--flag VALUE ...]   (torchrun --nproc_per_node=N %(prog)s ... on GPUs)")
        defaults = dict(defaults or {})
        unknown = set(defaults) - {action.dest for action in self._actions}
        if unknown:
            raise FlagError(f"task defaults name unknown flags: {sorted(unknown)}")
        self.set_defaults(**defaults)

    def group_help(self, data_args_class) -> None:
        """Moves every flag into one of GROUPS; refused transformers names are not shown, the
        other transformers flags are listed by name."""
        ours = {f.name for f in fields(TrainingFlags)}
        data = {f.name for f in fields(data_args_class)}
        model = {f.name for f in fields(ModelArguments)}
        others = sorted((transformers_flag_names() or frozenset()) - ours - REFUSED.keys() - HIDDEN)
        descriptions = {"other transformers flags": (
            "Any other flag of transformers' TrainingArguments works too, with transformers' meaning (see "
            "its documentation): " + ", ".join(f"--{name}" for name in others) + ".") if others else None}
        groups = {title: self.add_argument_group(title, descriptions.get(title)) for title in GROUPS}
        negations = {a.dest: a.option_strings[0] for a in self._actions
                     if a.option_strings and a.option_strings[0].startswith("--no_") and a.const is False}
        for action in list(self._optionals._group_actions):
            dest = action.dest
            if dest == "help":
                continue
            if _is_switch(action) and dest in negations:
                action.negation = negations[dest]
            if dest in REFUSED or dest in HIDDEN or (action.option_strings[0].startswith("--no_") and action.const
                                                     is False):
                action.help = argparse.SUPPRESS
                continue
            if dest in EVALUATION_FLAGS:
                title = "evaluation"
            elif dest in TRAINING_FLAGS:
                title = "training"
            elif dest in data:
                title = "task data"
            elif dest in model:
                title = "model and method"
            elif dest in ours:
                title = "training"
            else:
                title = "other transformers flags"
            self._optionals._group_actions.remove(action)
            groups[title]._group_actions.append(action)

    def error(self, message: str):
        """argparse's own errors (bad value, missing value): one line instead of usage + message."""
        raise FlagError(f"{message} (see --help)")

    def known_flags(self) -> list[str]:
        return [f"--{action.dest}" for action in self._actions
                if action.option_strings and action.help is not argparse.SUPPRESS]

    def unknown_flags(self, problems: list[str]) -> FlagError:
        return FlagError("; ".join(problems) + "; flags are matched exactly, see --help")


def _unknown(rest: list[str], passable: frozenset[str] | None, known: list[str]) -> list[str]:
    """What argparse left over that is not a transformers flag: each unknown flag with the
    closest real ones. (Values after a flag belong to it; a negative number is a value.)"""
    problems, after_flag = [], False
    for token in rest:
        if token.startswith("-") and not _is_number(token):
            flag = token.split("=", 1)[0]
            name = flag.lstrip("-").replace("-", "_")
            after_flag = True
            if passable is None or name in passable or (name.startswith("no_") and name[3:] in passable):
                continue
            close = difflib.get_close_matches(flag.replace("-", "_").replace("__", "--", 1), known, n=3, cutoff=0.6)
            problems.append(f"unknown flag {flag}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        elif not after_flag:
            problems.append(f"unexpected value {token!r}")
            after_flag = True  # (one such message is enough)
    return problems


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _given(argv: list[str]) -> set[str]:
    """The flag names (dest form) written on the command line."""
    return {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}


def _build(dtype, values: dict):
    values = {f.name: values[f.name] for f in fields(dtype) if f.init and f.name in values}
    try:
        return dtype(**values)
    except FlagError:
        raise
    except (ValueError, OSError) as err:  # transformers' own flag validation (and files its flags name)
        raise FlagError(" ".join(str(err).split())) from None


class Flags(NamedTuple):
    """The parsed, checked flags of a run; `transformers_argv` are the transformers flags that
    TrainingFlags does not declare, parsed by build_training_args."""

    model: ModelArguments
    data: DataArguments
    training: TrainingFlags
    transformers_argv: list[str]


def parse_flags(data_args_class=DataArguments, argv: list[str] | None = None, defaults: dict | None = None,
                late_defaults=None) -> Flags:
    """Parses and checks every flag (check_args) without importing torch or transformers'
    trainer: --help and every flag error end here in well under a second of imports.
    `defaults` are the task's own defaults.

    `late_defaults(data_args) -> {flag: value}`: defaults that follow from the data flags (a task
    named and scored by its flags: its metric is --metric_for_best_model's default), applied to
    the flags not given on the command line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    refused = sorted(_given(argv) & REFUSED.keys())
    if refused:
        raise FlagError(f"--{refused[0]} is not used by these recipes; use {REFUSED[refused[0]]}")
    parser = RecipeArgumentParser((ModelArguments, data_args_class, TrainingFlags), defaults)
    parser.group_help(data_args_class)
    namespace, rest = parser.parse_known_args(argv)
    ours = {action.dest for action in parser._actions}
    names = transformers_flag_names()
    passable = None if names is None else names - ours - REFUSED.keys()
    problems = _unknown(rest, passable, parser.known_flags() + sorted(f"--{n}" for n in passable or ()))
    if problems:
        raise parser.unknown_flags(problems)
    values = vars(namespace)
    model_args = _build(ModelArguments, values)
    data_args = _build(data_args_class, values)
    if late_defaults is not None:
        given = _given(argv)
        values.update({name: value for name, value in late_defaults(data_args).items() if name not in given})
    training = _build(TrainingFlags, values)
    if model_args.use_qlora:
        model_args.use_lora = True
    if training.deepspeed == "auto":
        full = not (model_args.use_lora or data_args.eval_only)
        training.deepspeed = DEFAULT_DEEPSPEED_CONFIG if full else None
    elif training.deepspeed in ("none", ""):
        training.deepspeed = None
    check_args(model_args, data_args, training)
    return Flags(model_args, data_args, training, rest)


def build_training_args(flags: Flags):
    """The run's RecipeTrainingArguments (transformers' TrainingArguments: imports torch and the
    trainer's libraries; sets up devices), from flags that passed their checks."""
    from .training_args import RecipeTrainingArguments

    values = {f.name: getattr(flags.training, f.name) for f in fields(TrainingFlags)}
    values.update({name: value for name, value in parse_transformers_flags(flags).items() if name not in values})
    return _build(RecipeTrainingArguments, values)


def parse_transformers_flags(flags: Flags) -> dict:
    """{name: value} of the transformers flags that TrainingFlags does not declare
    (flags.transformers_argv), parsed by transformers' own field types: an unknown name or a bad
    value is a FlagError. Imports TrainingArguments (not light) but builds nothing, so --dry_run
    checks them too."""
    if not flags.transformers_argv:
        return {}
    from .training_args import RecipeTrainingArguments

    parser = RecipeArgumentParser(RecipeTrainingArguments)
    namespace, rest = parser.parse_known_args(flags.transformers_argv)
    problems = _unknown(rest, frozenset(), parser.known_flags())
    if problems:
        raise parser.unknown_flags(problems)
    values = {}
    for name in _given(flags.transformers_argv):
        name = name if hasattr(namespace, name) or not name.startswith("no_") else name[3:]
        if hasattr(namespace, name):
            values[name] = getattr(namespace, name)
    return values


def parse_args(data_args_class=DataArguments, argv: list[str] | None = None, defaults: dict | None = None,
               late_defaults=None):
    """(model_args, data_args, training_args) from argv; `defaults` are the task's own defaults.

    `late_defaults(data_args) -> {flag: value}`: defaults that follow from the data flags (a task
    named and scored by its flags: its metric is --metric_for_best_model's default), applied to
    the flags not given on the command line.

    Every check (check_args) runs before TrainingArguments sets up devices, distributed or
    DeepSpeed, so a wrong flag costs nothing.
    """
    flags = parse_flags(data_args_class, argv, defaults, late_defaults)
    return flags.model, flags.data, build_training_args(flags)


# -- checks ------------------------------------------------------------------------------------


def _last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint-N whose files all load (recipe.checkpoints.verify); a newer one that
    does not (killed while saving before atomic saves, truncated, corrupted) is named in a warning
    and the previous one is taken."""
    return last_complete_checkpoint(output_dir)


def _check_resume(data_args, training_args) -> None:
    """Resolves --resume_from_checkpoint (auto -> the newest complete checkpoint or None)."""
    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if data_args.eval_only:
        training_args.resume_from_checkpoint = None
        return
    if resume == "auto":
        resume = _last_complete_checkpoint(output_dir)
        if resume is None:
            logger.info("--resume_from_checkpoint auto: no checkpoint in %s, starting from scratch", output_dir)
    elif resume is not None and not Path(resume).is_dir():
        raise FlagError(f"--resume_from_checkpoint {resume}: no such checkpoint directory (or use 'auto')")
    elif resume is not None and (problem := verify(Path(resume))):
        raise FlagError(f"--resume_from_checkpoint {resume} cannot be resumed from: {problem}; name an earlier "
                        "checkpoint or use 'auto' (the newest complete one)")
    elif resume is None and not training_args.overwrite_output_dir and any(
        p.is_dir() for p in output_dir.glob("checkpoint-*")
    ):
        raise FlagError(
            f"--output_dir {output_dir} holds checkpoints of an unfinished run: pass --resume_from_checkpoint auto "
            "to continue it, or --overwrite_output_dir to start over"
        )
    training_args.resume_from_checkpoint = resume


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_args(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Every flag conflict, before any model is loaded, data is read or a device is set up.

    `training_args` is the TrainingFlags (or, when called again, the TrainingArguments). Only a
    check that needs torch (a GPU for --fp16 / --use_flash_attention) imports it.
    """
    t = training_args
    # --dry_run plans a GPU run on any machine: what only the GPU machine has (a launcher, a GPU,
    # the flash-attn package) is not asked for.
    planning = getattr(t, "dry_run", False)
    if model_args.use_qlora:
        model_args.use_lora = True
    world = world_size()
    if t.batch_size < 1 or t.batch_size_per_gpu < 1:
        raise FlagError("--batch_size and --batch_size_per_gpu must be >= 1")
    if t.batch_size % (world * t.batch_size_per_gpu):
        raise FlagError(
            f"--batch_size {t.batch_size} (global) is not divisible by {world} process(es) x "
            f"--batch_size_per_gpu {t.batch_size_per_gpu}; pick a multiple of {world * t.batch_size_per_gpu}"
        )
    if t.fp16 and t.bf16:
        raise FlagError("--fp16 and --bf16 are exclusive; pick one")
    if model_args.use_qlora and t.deepspeed:
        raise FlagError("--use_qlora does not run under DeepSpeed here; drop --deepspeed (QLoRA fits one GPU)")
    if t.deepspeed:
        if not Path(t.deepspeed).is_file():
            raise FlagError(f"--deepspeed {t.deepspeed}: no such file (or 'none' to train without DeepSpeed)")
        try:
            config = json.loads(Path(t.deepspeed).read_text(encoding="utf-8"))
            problem = None if isinstance(config, dict) else f"a JSON {type(config).__name__}"
        except (ValueError, OSError) as err:
            problem = " ".join(str(err).split())
        if problem:  # (DeepSpeed, and --dry_run's ZeRO stage, read it as an object)
            raise FlagError(f"--deepspeed {t.deepspeed}: not a JSON object of DeepSpeed settings ({problem})")
        if "LOCAL_RANK" not in os.environ and not planning:
            raise FlagError(
                "DeepSpeed needs a launcher: run with `torchrun --nproc_per_node=N script.py ...` "
                "(also for one GPU), or pass --deepspeed none"
            )
    if not 1 <= model_args.num_crops <= 16:
        raise FlagError(f"--num_crops {model_args.num_crops} is outside 1..16 (4 suits multi-frame, 16 single images)")
    if model_args.use_flash_attention:
        if t.fp16:
            raise FlagError(
                "--use_flash_attention cannot be combined with --fp16: FlashAttention-2 runs on Ampere or newer "
                "GPUs, use --bf16 there; on V100 use --fp16 without --use_flash_attention"
            )
        if not t.bf16:
            raise FlagError("--use_flash_attention needs --bf16 (FlashAttention-2 runs in half precision)")
        if importlib.util.find_spec("flash_attn") is None and not planning:
            raise FlagError(
                "--use_flash_attention needs the flash-attn package, which is not installed: "
                "`pip install -r requirements-gpu.txt` on a CUDA machine, or drop the flag to use SDPA"
            )
        if not planning and not _cuda_available():
            raise FlagError("--use_flash_attention needs a CUDA GPU; none is visible. Drop the flag to use SDPA")
    if t.fp16 and not planning and not _cuda_available():
        raise FlagError("--fp16 needs a CUDA GPU; on CPU use --bf16 or neither")
    if model_args.use_qlora and importlib.util.find_spec("bitsandbytes") is None:
        raise FlagError("--use_qlora needs bitsandbytes: `pip install -r requirements.txt`")
    if model_args.freeze_vision_model and (
        model_args.vision_learning_rate is not None or model_args.projector_learning_rate is not None
    ):
        raise FlagError("--vision_learning_rate/--projector_learning_rate make no sense with --freeze_vision_model")
    if model_args.merge_lora and not model_args.use_lora:
        raise FlagError("--merge_lora needs --use_lora or --use_qlora")
    output_dir = Path(t.output_dir)
    if (output_dir / RUN_COMPLETE_FILE).exists() and not t.overwrite_output_dir and not data_args.eval_only:
        raise FlagError(
            f"--output_dir {output_dir} holds a finished run ({RUN_COMPLETE_FILE}); choose another --output_dir "
            "or pass --overwrite_output_dir"
        )
    if data_args.eval_only and (output_dir / "eval_after.json").exists() and not t.overwrite_output_dir:
        raise FlagError(
            f"--output_dir {output_dir} already holds eval_after.json; choose another --output_dir for "
            "--eval_only or pass --overwrite_output_dir"
        )
    if (t.overwrite_output_dir and not data_args.eval_only and not t.resume_from_checkpoint
            and output_dir.resolve() == Path(model_args.model_name_or_path).resolve()):
        raise FlagError(
            f"--overwrite_output_dir would delete the model being finetuned ({model_args.model_name_or_path} is also "
            "--output_dir); choose another --output_dir"
        )
    if getattr(t, "dataloader_timeout", 0) < 0:
        raise FlagError("--dataloader_timeout must be >= 0 (0: no limit)")
    if data_args.eval_batch_size < 1:
        raise FlagError("--eval_batch_size must be >= 1")
    if not 1 <= data_args.max_tokens_per_row <= MAX_TOKENS_PER_ROW:
        raise FlagError(
            f"--max_tokens_per_row {data_args.max_tokens_per_row} is outside 1..{MAX_TOKENS_PER_ROW}: a longer row "
            "would switch LongRoPE to the long factors for examples that use the short ones alone"
        )

    if getattr(t, "load_best_model_at_end", False) and str(getattr(t, "eval_strategy", "no")) in ("no", "IntervalStrategy.NO"):
        raise FlagError("--load_best_model_at_end needs --eval_strategy steps (or epoch) and a matching --save_strategy")
    if hasattr(data_args, "check"):
        data_args.check()  # the task's own data flags
    _check_resume(data_args, t)
