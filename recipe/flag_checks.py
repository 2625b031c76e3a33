"""The checks across flags, one function per feature, run before any model is loaded, data is read
or a device is set up: a wrong combination costs nothing and ends in one `error:` line that says
what to do (recipe.errors.FlagError).

Each check takes the parsed flags: `training_args` is the TrainingFlags (recipe.args) or, when
checked again, the TrainingArguments. Only the GPU check imports torch, and only when a flag asks
for a GPU; everything else reads the flags, the environment and a few files.

`--dry_run` plans a GPU run on any machine: what only the GPU machine has (a launcher, a GPU, the
flash-attn package) is not asked for then (`_planning`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from .args import DataArguments, ModelArguments
from .checkpoints import RUN_COMPLETE_FILE, last_complete_checkpoint, verify
from .errors import FlagError
from .launcher import launched, world_size
from .packing import MAX_TOKENS_PER_ROW

__all__ = ["check_flags", "check_batch_size", "check_precision", "check_deepspeed", "check_num_crops",
           "check_flash_attention", "check_gpu", "check_qlora", "check_frozen_vision", "check_merge_lora",
           "check_output_dir", "check_data_loading", "check_evaluation", "check_padding_free", "check_best_model",
           "check_data", "check_resume"]

logger = logging.getLogger("recipe")


def check_flags(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Every flag conflict, feature by feature, in this order (where two checks could both fail,
    the earlier one is reported): the batch sizes, precision, DeepSpeed, --num_crops,
    FlashAttention-2, the GPU that --fp16 / --use_flash_attention need, QLoRA, the frozen vision
    side, --merge_lora, --output_dir, data loading, evaluation, --padding_free, the best checkpoint
    (--load_best_model_at_end), the data flags (the shared ones and the task's own), the
    resumption (--resume_from_checkpoint auto resolved to a checkpoint), and last the task's data
    flags that depend on the model flags (DPO's --adapter, --ref_model)."""
    check_batch_size(training_args)
    check_precision(training_args)
    check_deepspeed(model_args, training_args)
    check_num_crops(model_args)
    check_flash_attention(model_args, training_args)
    check_gpu(model_args, training_args)
    check_qlora(model_args)
    check_frozen_vision(model_args)
    check_merge_lora(model_args)
    check_output_dir(model_args, data_args, training_args)
    check_data_loading(training_args)
    check_evaluation(data_args)
    check_padding_free(data_args)
    check_best_model(training_args)
    check_data(data_args)
    check_resume(data_args, training_args)
    data_args.check_model_flags(model_args)


def _planning(training_args) -> bool:
    """--dry_run: the flags are checked for a run on another machine (see the module docstring)."""
    return getattr(training_args, "dry_run", False)


def check_batch_size(training_args) -> None:
    """--batch_size is global: the processes times --batch_size_per_gpu must divide it (gradient
    accumulation makes up the rest)."""
    t, world = training_args, world_size()
    if t.batch_size < 1 or t.batch_size_per_gpu < 1:
        raise FlagError("--batch_size and --batch_size_per_gpu must be >= 1")
    if t.batch_size % (world * t.batch_size_per_gpu):
        raise FlagError(
            f"--batch_size {t.batch_size} (global) is not divisible by {world} process(es) x "
            f"--batch_size_per_gpu {t.batch_size_per_gpu}; pick a multiple of {world * t.batch_size_per_gpu}"
        )


def check_precision(training_args) -> None:
    """One mixed precision at most (what each needs of the hardware: check_gpu)."""
    if training_args.fp16 and training_args.bf16:
        raise FlagError("--fp16 and --bf16 are exclusive; pick one")


def check_deepspeed(model_args: ModelArguments, training_args) -> None:
    """--deepspeed names a JSON object of DeepSpeed settings and runs under a launcher; QLoRA does
    not run under it."""
    config_file = training_args.deepspeed
    if model_args.use_qlora and config_file:
        raise FlagError("--use_qlora does not run under DeepSpeed here; drop --deepspeed (QLoRA fits one GPU)")
    if not config_file:
        return
    if not Path(config_file).is_file():
        raise FlagError(f"--deepspeed {config_file}: no such file (or 'none' to train without DeepSpeed)")
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
        problem = None if isinstance(config, dict) else f"a JSON {type(config).__name__}"
    except (ValueError, OSError) as err:
        problem = " ".join(str(err).split())
    if problem:  # (DeepSpeed, and --dry_run's ZeRO stage, read it as an object)
        raise FlagError(f"--deepspeed {config_file}: not a JSON object of DeepSpeed settings ({problem})")
    if not launched() and not _planning(training_args):
        raise FlagError(
            "DeepSpeed needs a launcher: run with `torchrun --nproc_per_node=N script.py ...` "
            "(also for one GPU), or pass --deepspeed none"
        )


def check_num_crops(model_args: ModelArguments) -> None:
    """The image processor cuts an image into 1..16 HD crops."""
    if not 1 <= model_args.num_crops <= 16:
        raise FlagError(f"--num_crops {model_args.num_crops} is outside 1..16 (4 suits multi-frame, 16 single images)")


def check_flash_attention(model_args: ModelArguments, training_args) -> None:
    """FlashAttention-2 runs in bfloat16 and needs its package (and a GPU: check_gpu)."""
    if not model_args.use_flash_attention:
        return
    if training_args.fp16:
        raise FlagError(
            "--use_flash_attention cannot be combined with --fp16: FlashAttention-2 runs on Ampere or newer "
            "GPUs, use --bf16 there; on V100 use --fp16 without --use_flash_attention"
        )
    if not training_args.bf16:
        raise FlagError("--use_flash_attention needs --bf16 (FlashAttention-2 runs in half precision)")
    if importlib.util.find_spec("flash_attn") is None and not _planning(training_args):
        raise FlagError(
            "--use_flash_attention needs the flash-attn package, which is not installed: "
            "`pip install -r requirements-gpu.txt` on a CUDA machine, or drop the flag to use SDPA"
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_gpu(model_args: ModelArguments, training_args) -> None:
    """FlashAttention-2 and --fp16 need a CUDA GPU (the one check that imports torch, only when
    one of them is asked for)."""
    if _planning(training_args):
        return
    if model_args.use_flash_attention and not _cuda_available():
        raise FlagError("--use_flash_attention needs a CUDA GPU; none is visible. Drop the flag to use SDPA")
    if training_args.fp16 and not _cuda_available():
        raise FlagError("--fp16 needs a CUDA GPU; on CPU use --bf16 or neither")


def check_qlora(model_args: ModelArguments) -> None:
    """QLoRA's 4-bit base weights need bitsandbytes (and no DeepSpeed: check_deepspeed)."""
    if model_args.use_qlora and importlib.util.find_spec("bitsandbytes") is None:
        raise FlagError("--use_qlora needs bitsandbytes: `pip install -r requirements.txt`")


def check_frozen_vision(model_args: ModelArguments) -> None:
    """A frozen vision side has no learning rate of its own."""
    if model_args.freeze_vision_model and (
        model_args.vision_learning_rate is not None or model_args.projector_learning_rate is not None
    ):
        raise FlagError("--vision_learning_rate/--projector_learning_rate make no sense with --freeze_vision_model")


def check_merge_lora(model_args: ModelArguments) -> None:
    """--merge_lora merges adapters: LoRA or QLoRA trains them."""
    if model_args.merge_lora and not model_args.use_lora:
        raise FlagError("--merge_lora needs --use_lora or --use_qlora")


def check_output_dir(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """--output_dir replaces a finished run's results or the model being finetuned only when
    told to (--overwrite_output_dir), and never the model being finetuned."""
    t = training_args
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


def check_data_loading(training_args) -> None:
    """--dataloader_timeout is a limit in seconds (recipe.faults)."""
    if getattr(training_args, "dataloader_timeout", 0) < 0:
        raise FlagError("--dataloader_timeout must be >= 0 (0: no limit)")


def check_evaluation(data_args: DataArguments) -> None:
    """Generation batches of evaluation hold an example at least."""
    if data_args.eval_batch_size < 1:
        raise FlagError("--eval_batch_size must be >= 1")


def check_padding_free(data_args: DataArguments) -> None:
    """--padding_free rows stay within the original context (recipe.packing)."""
    if not 1 <= data_args.max_tokens_per_row <= MAX_TOKENS_PER_ROW:
        raise FlagError(
            f"--max_tokens_per_row {data_args.max_tokens_per_row} is outside 1..{MAX_TOKENS_PER_ROW}: a longer row "
            "would switch LongRoPE to the long factors for examples that use the short ones alone"
        )


def _strategy(training_args, name: str) -> str:
    """A strategy flag as its name ('no', 'steps', ...), from TrainingFlags' string or
    TrainingArguments' enum."""
    value = getattr(training_args, name, "no")
    return str(getattr(value, "value", value))


def check_best_model(training_args) -> None:
    """Keeping the best checkpoint (--load_best_model_at_end) needs evaluations during training,
    and, unless --save_strategy best, checkpoints where the evaluations are: the save and eval
    strategies alike and, by steps, --save_steps a multiple of --eval_steps (transformers'
    TrainingArguments refuses the rest, but only once it is built: here before anything loads)."""
    t = training_args
    if not getattr(t, "load_best_model_at_end", False):
        return
    evaluation, saving = _strategy(t, "eval_strategy"), _strategy(t, "save_strategy")
    if evaluation == "no":
        raise FlagError("--load_best_model_at_end needs --eval_strategy steps (or epoch) and a matching "
                        "--save_strategy")
    if saving == "best":
        return
    if saving != evaluation:
        raise FlagError(f"--load_best_model_at_end needs --save_strategy to match --eval_strategy (or be 'best'): "
                        f"got --eval_strategy {evaluation}, --save_strategy {saving}; pass --save_strategy "
                        f"{evaluation}")
    if evaluation != "steps":
        return
    # (--eval_steps defaults to --logging_steps; a value below 1 is a ratio of all steps)
    save, every = t.save_steps, t.eval_steps or t.logging_steps
    if (save < 1) != (every < 1):
        raise FlagError(f"--load_best_model_at_end needs --save_steps a multiple of --eval_steps, which a ratio and "
                        f"a number of steps cannot guarantee (--save_steps {save:g}, --eval_steps {every:g}); give "
                        "both as steps or both as ratios")
    if round(save * 1_000_000) % round(every * 1_000_000):
        raise FlagError(f"--load_best_model_at_end needs --save_steps a multiple of --eval_steps, so that a "
                        f"checkpoint is saved where the best evaluation is: got --save_steps {save:g}, --eval_steps "
                        f"{every:g}; pass e.g. --save_steps {every * max(round(save / every), 1):g}")


def check_data(data_args: DataArguments) -> None:
    """The data flags' own rules and the task's (its DataArguments subclass: `check()`; the rules
    that depend on the model flags too, `check_model_flags`, run last, after check_resume)."""
    data_args.check()


def check_resume(data_args: DataArguments, training_args) -> None:
    """Resolves --resume_from_checkpoint (auto -> the newest complete checkpoint, or None): a named
    checkpoint must exist and load; an --output_dir holding an unfinished run's checkpoints is
    continued or replaced only when told which. --eval_only resumes nothing."""
    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if data_args.eval_only:
        training_args.resume_from_checkpoint = None
        return
    if resume == "auto":
        # (a newer checkpoint whose files do not all load is named in a warning and skipped)
        resume = last_complete_checkpoint(output_dir)
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
