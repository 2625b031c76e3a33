"""Command-line flags shared by every recipe, and the checks run before any model is loaded.

All of the original recipe's flags keep their meaning (`--batch_size` is the global batch,
`--batch_size_per_gpu` the per-device one, `--wd`, `--no-tqdm`, `--lora_*`, ...), and any
`transformers.TrainingArguments` flag can be passed as well (`--save_steps`, `--max_steps`,
`--report_to`, `--seed`, `--gradient_checkpointing`, `--deepspeed`, ...).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from .packing import MAX_TOKENS_PER_ROW

__all__ = [
    "ModelArguments",
    "DataArguments",
    "RecipeTrainingArguments",
    "FlagError",
    "parse_args",
    "check_args",
    "world_size",
    "RUN_COMPLETE_FILE",
    "DEFAULT_DEEPSPEED_CONFIG",
]

RUN_COMPLETE_FILE = "run_complete.json"
DEFAULT_DEEPSPEED_CONFIG = str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json")


class FlagError(ValueError):
    """A flag or combination of flags that cannot work; the message says what to do."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="microsoft/Phi-3.5-vision-instruct",
        metadata={"help": "Official-format checkpoint: hub id or local directory (e.g. one written by "
                          "`python -m phi3v.tiny`). Loaded natively, without trust_remote_code."},
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
                                         "OUTPUT_DIR/merged (official format)."}
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
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N examples."})
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


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    output_dir: str | None = field(default="./output", metadata={"help": "Where checkpoints and results go."})
    batch_size: int = field(
        default=64, metadata={"help": "Global batch size (all GPUs, all nodes); gradient accumulation fills the gap."}
    )
    batch_size_per_gpu: int = field(default=1, metadata={"help": "Per-device micro-batch size."})
    wd: float = field(default=0.01, metadata={"help": "Weight decay (same as --weight_decay)."})
    no_tqdm: bool = field(default=False, metadata={"aliases": ["--no-tqdm"], "help": "No progress bars."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow an output_dir that already holds a finished run."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint directory, or 'auto' for the latest one in output_dir."}
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "'group_by_length' (default: batches of similar length, little padding), 'random', "
                          "'sequential'.",
                  "choices": ["random", "sequential", "group_by_length", "batch_rebalance"]},
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep only the newest N checkpoints."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all dataset columns (required)."})

    def __post_init__(self):
        if self.activation_checkpointing_kwargs is None and self.gradient_checkpointing_kwargs is None:
            # Non-reentrant checkpointing works with frozen parts and LoRA without extra hooks.
            # (`gradient_checkpointing_kwargs` is transformers' deprecated name for it.)
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        # The original's names win: they are what users of the recipe type. transformers' own
        # names for the same things would be overwritten silently, so they are refused instead.
        for theirs, ours, default in (
            ("per_device_train_batch_size", "--batch_size_per_gpu", 8),
            ("weight_decay", "--wd", 0.0),
            ("gradient_accumulation_steps", "--batch_size (global; accumulation follows from it)", 1),
        ):
            if getattr(self, theirs) != default:
                raise FlagError(f"--{theirs} is not used by these recipes; use {ours}")
        self.per_device_train_batch_size = self.batch_size_per_gpu
        self.weight_decay = self.wd
        self.disable_tqdm = self.no_tqdm or self.disable_tqdm
        world = world_size()
        if self.batch_size % (world * self.batch_size_per_gpu):
            raise FlagError(
                f"--batch_size {self.batch_size} (global) is not divisible by {world} process(es) x "
                f"--batch_size_per_gpu {self.batch_size_per_gpu}; pick a multiple of "
                f"{world * self.batch_size_per_gpu}"
            )
        self.gradient_accumulation_steps = self.batch_size // (world * self.batch_size_per_gpu)
        # Checked here, before TrainingArguments sets up devices and DeepSpeed.
        if self.fp16 and self.bf16:
            raise FlagError("--fp16 and --bf16 are exclusive; pick one")
        if not torch.accelerator.is_available():
            # On a machine without GPUs accelerate only sets up a distributed CPU (gloo) job when
            # told so: otherwise every torchrun rank trains alone on all the data and reports a
            # world size of 1, and TrainingArguments refuses --bf16.
            self.use_cpu = True
        if self.deepspeed in ("none", ""):
            self.deepspeed = None
        elif self.deepspeed:
            if not Path(self.deepspeed).is_file():
                raise FlagError(f"--deepspeed {self.deepspeed}: no such file (or 'none' to train without DeepSpeed)")
            if "LOCAL_RANK" not in os.environ:
                raise FlagError(
                    "DeepSpeed needs a launcher: run with `torchrun --nproc_per_node=N script.py ...` "
                    "(also for one GPU), or pass --deepspeed none"
                )
        super().__post_init__()
        if self.deepspeed and self.use_cpu and world > 1:
            # On GPUs accelerate initialises DeepSpeed's communication layer together with
            # torch.distributed; on CPU (use_cpu) it only sets up torch.distributed (gloo). ZeRO-3
            # builds the model inside deepspeed.zero.Init before the engine exists, and there
            # DeepSpeed would see a world of one. Its backend wraps the existing process group.
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")


def world_size() -> int:
    """Processes in the job, from torchrun's environment (1 when run with plain python)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def parse_args(data_args_class=DataArguments, argv: list[str] | None = None, defaults: dict | None = None):
    """(model_args, data_args, training_args) from argv; `defaults` are the task's own defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = dict(defaults or {})
    # Full finetuning runs under DeepSpeed ZeRO-2 unless --deepspeed says otherwise. That default
    # depends on --use_lora/--use_qlora/--eval_only and must be known before TrainingArguments is
    # built. (No --help here: it must list every flag, not only these.)
    early, _ = HfArgumentParser((ModelArguments, data_args_class), add_help=False).parse_known_args(argv)
    if not (early.use_lora or early.use_qlora or early.eval_only):
        defaults.setdefault("deepspeed", DEFAULT_DEEPSPEED_CONFIG)
    # No experiment tracker unless asked for (--report_to tensorboard, wandb, ...).
    defaults.setdefault("report_to", "none")
    parser = HfArgumentParser((ModelArguments, data_args_class, RecipeTrainingArguments))
    if defaults:
        known = {action.dest for action in parser._actions}
        unknown = set(defaults) - known
        if unknown:
            raise FlagError(f"task defaults name unknown flags: {sorted(unknown)}")
        parser.set_defaults(**defaults)
    model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if rest:
        raise FlagError(f"unknown arguments: {' '.join(rest)} (see --help)")
    return model_args, data_args, training_args


def check_args(model_args: ModelArguments, data_args: DataArguments, training_args: RecipeTrainingArguments) -> None:
    """Every flag conflict, before any model is loaded or data is read. Fills a few derived values."""
    if model_args.use_qlora:
        model_args.use_lora = True
    if not 1 <= model_args.num_crops <= 16:
        raise FlagError(f"--num_crops {model_args.num_crops} is outside 1..16 (4 suits multi-frame, 16 single images)")
    if model_args.use_flash_attention:
        if training_args.fp16:
            raise FlagError(
                "--use_flash_attention cannot be combined with --fp16: FlashAttention-2 runs on Ampere or newer "
                "GPUs, use --bf16 there; on V100 use --fp16 without --use_flash_attention"
            )
        if not training_args.bf16:
            raise FlagError("--use_flash_attention needs --bf16 (FlashAttention-2 runs in half precision)")
        if importlib.util.find_spec("flash_attn") is None:
            raise FlagError(
                "--use_flash_attention needs the flash-attn package, which is not installed: "
                "`pip install -r requirements-gpu.txt` on a CUDA machine, or drop the flag to use SDPA"
            )
        if not torch.cuda.is_available():
            raise FlagError("--use_flash_attention needs a CUDA GPU; none is visible. Drop the flag to use SDPA")
    if training_args.fp16 and not torch.cuda.is_available():
        raise FlagError("--fp16 needs a CUDA GPU; on CPU use --bf16 or neither")
    if model_args.use_qlora and importlib.util.find_spec("bitsandbytes") is None:
        raise FlagError("--use_qlora needs bitsandbytes: `pip install -r requirements.txt`")
    if model_args.use_qlora and training_args.deepspeed:
        raise FlagError("--use_qlora does not run under DeepSpeed here; drop --deepspeed (QLoRA fits one GPU)")
    if model_args.freeze_vision_model and (
        model_args.vision_learning_rate is not None or model_args.projector_learning_rate is not None
    ):
        raise FlagError("--vision_learning_rate/--projector_learning_rate make no sense with --freeze_vision_model")
    if model_args.merge_lora and not model_args.use_lora:
        raise FlagError("--merge_lora needs --use_lora or --use_qlora")
    output_dir = Path(training_args.output_dir)
    if (output_dir / RUN_COMPLETE_FILE).exists() and not training_args.overwrite_output_dir and not data_args.eval_only:
        raise FlagError(
            f"--output_dir {output_dir} holds a finished run ({RUN_COMPLETE_FILE}); choose another --output_dir "
            "or pass --overwrite_output_dir"
        )
    if data_args.eval_only and (output_dir / "eval_after.json").exists() and not training_args.overwrite_output_dir:
        raise FlagError(
            f"--output_dir {output_dir} already holds eval_after.json; choose another --output_dir for "
            "--eval_only or pass --overwrite_output_dir"
        )
    resume = training_args.resume_from_checkpoint
    if resume and resume != "auto" and not Path(resume).is_dir():
        raise FlagError(f"--resume_from_checkpoint {resume}: no such checkpoint directory (or use 'auto')")
    if data_args.eval_batch_size < 1:
        raise FlagError("--eval_batch_size must be >= 1")
    if not 1 <= data_args.max_tokens_per_row <= MAX_TOKENS_PER_ROW:
        raise FlagError(
            f"--max_tokens_per_row {data_args.max_tokens_per_row} is outside 1..{MAX_TOKENS_PER_ROW}: a longer row "
            "would switch LongRoPE to the long factors for examples that use the short ones alone"
        )

