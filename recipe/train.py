"""The shared runner every task script calls: flags -> data -> model -> eval -> train -> eval.

A task script describes only what is task-specific (where data comes from, how a row becomes a
conversation, how predictions are scored) in a `Task` and calls `run(task)`.

Outputs in --output_dir (rank 0 writes them):
    eval_before.json, eval_after.json   metric + per-example predictions (--eval_only: eval_after.json)
    checkpoint-N/                        every --save_steps (resume with --resume_from_checkpoint)
    the final model (full) or adapter (LoRA/QLoRA) + processor, in the official format
    merged/                              --merge_lora: the merged full model + processor
    training_curves.png                  loss, learning rate, metric before/after
    run_complete.json                    the flags and results of the finished run
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer_pt_utils import get_length_grouped_indices
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint
from transformers.integrations import is_deepspeed_zero3_enabled

from phi3v.processing_phi3v import Phi3VProcessor

from .args import (
    RUN_COMPLETE_FILE,
    DataArguments,
    FlagError,
    ModelArguments,
    RecipeTrainingArguments,
    check_args,
    parse_args,
    world_size,
)
from .data import Collator, Conversation, ConversationDataset, Conversations, validate
from .evaluate import end_token_ids, evaluate, write_json_atomic
from .model import count_parameters, load_model, parameter_groups

__all__ = ["Task", "run", "RecipeTrainer", "GroupedByLengthSampler", "merge_adapter"]

logger = logging.getLogger("recipe")


@dataclass
class Task:
    """What a task script supplies.

    load_data(data_args, model_args) -> (train conversations or None with --eval_only, eval conversations)
    score(predictions, references) -> float, references being every accepted answer per example.
    """

    name: str
    metric: str
    load_data: Callable[[DataArguments, ModelArguments], tuple[Sequence[Conversation] | None, Sequence[Conversation]]]
    score: Callable[[list[str], list[list[str]]], float]
    data_args_class: type = DataArguments
    defaults: dict = field(default_factory=dict)


class GroupedByLengthSampler(torch.utils.data.Sampler):
    """transformers' length grouping, reproducible per epoch (seed + epoch), so a resumed run
    sees exactly the batches the interrupted one would have seen."""

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int):
        self.lengths, self.group_size, self.seed, self.epoch = list(lengths), group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))


class RecipeTrainer(Trainer):
    """Trainer with header-only length grouping and optional per-part learning rates."""

    def __init__(self, *args, model_args: ModelArguments | None = None, **kwargs):
        self.model_args = model_args
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            group = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return GroupedByLengthSampler(dataset.lengths, group, self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        margs = self.model_args
        if self.optimizer is None and margs and (
            margs.vision_learning_rate is not None or margs.projector_learning_rate is not None
        ):
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = parameter_groups(self.model, margs, self.args.learning_rate, self.args.weight_decay)
            self.optimizer = optimizer_cls(groups, **kwargs)
            return self.optimizer
        return super().create_optimizer(model)


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _setup_logging(training_args: RecipeTrainingArguments) -> None:
    level = logging.INFO if _is_main() else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    logger.setLevel(level)


def _last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint-N that was completely written: the Trainer writes trainer_state.json
    last, so a run killed while saving leaves a directory without it (older ones are kept until
    the new one is done)."""
    steps = sorted(
        (int(path.name.split("-")[1]), path) for path in output_dir.glob("checkpoint-*")
        if path.is_dir() and path.name.split("-")[1].isdigit()
    )
    for _, path in reversed(steps):
        if (path / TRAINER_STATE_NAME).is_file():
            return str(path)
        logger.warning("%s is incomplete (no %s; killed while saving?): not resuming from it", path,
                       TRAINER_STATE_NAME)
    return None


def _resolve_resume(training_args: RecipeTrainingArguments) -> str | None:
    resume = training_args.resume_from_checkpoint
    output_dir = Path(training_args.output_dir)
    if resume == "auto":
        last = _last_complete_checkpoint(output_dir)
        if last is None:
            logger.info("--resume_from_checkpoint auto: no checkpoint in %s, starting from scratch", output_dir)
        return last
    if resume is None and output_dir.is_dir() and get_last_checkpoint(str(output_dir)) and not (
        training_args.overwrite_output_dir
    ):
        raise FlagError(
            f"--output_dir {output_dir} holds checkpoints of an unfinished run: pass --resume_from_checkpoint auto "
            "to continue it, or --overwrite_output_dir to start over"
        )
    return resume


def merge_adapter(adapter_dir: str | Path, base_model: str, output_dir: str | Path, processor=None) -> Path:
    """Base model (full precision, not the 4-bit copy) + adapter -> merged model in the official format."""
    from peft import PeftModel

    from phi3v.modeling_phi3v import Phi3VForCausalLM

    base = Phi3VForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    return Path(output_dir)


def _prepare(task: Task, model_args, data_args, training_args, processor):
    train, eval_ = task.load_data(data_args, model_args)
    num_crops = model_args.num_crops
    tokenizer = processor.tokenizer
    common = dict(tokenizer=tokenizer, num_crops=num_crops, decode_images=data_args.decode_images,
                  skip_bad=data_args.skip_bad_examples, log=logger.info)
    def limit(conversations, n):
        # Keep the problems of unreadable lines (see recipe.data.Conversations) for validate.
        return Conversations(list(conversations)[:n], getattr(conversations, "problems", []))

    if train is not None and not data_args.eval_only:
        train = limit(train, data_args.max_train_samples)
        train = validate(train, max_length=data_args.max_length, what=f"{task.name} training data", **common)
        if not train:
            raise FlagError(f"no usable {task.name} training examples")
    eval_ = limit(eval_, data_args.max_eval_samples)
    eval_ = validate(eval_, max_length=None, what=f"{task.name} evaluation data", **common)
    if not eval_:
        raise FlagError(f"no usable {task.name} evaluation examples")
    return train, eval_


def _start_over(output_dir: Path) -> None:
    """--overwrite_output_dir without resuming: the earlier run's checkpoints and results go, so
    they can neither be resumed by mistake nor mixed with (or rotated instead of) the new ones."""
    if not _is_main() or not output_dir.is_dir():
        return
    old = [p for p in output_dir.glob("checkpoint-*") if p.is_dir()]
    old += [output_dir / n for n in (RUN_COMPLETE_FILE, "eval_before.json", "eval_after.json", "training_curves.png")
            if (output_dir / n).exists()]
    for path in old:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if old:
        logger.info("--overwrite_output_dir: removed the earlier run's %s", ", ".join(sorted(p.name for p in old)))


class _EvalAtTrainBegin(TrainerCallback):
    """Under ZeRO-3 the weights are partitioned from loading on, and only the DeepSpeed engine
    can run them: the evaluation before training runs once the engine exists."""

    def __init__(self, run_eval):
        self.run_eval, self.result = run_eval, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.result is None:
            self.result = self.run_eval("eval_before", model)


def run(task: Task, argv: list[str] | None = None) -> dict:
    """Parses flags, validates everything, evaluates, trains, evaluates again; returns the results."""
    model_args, data_args, training_args = parse_args(task.data_args_class, argv, task.defaults)
    _setup_logging(training_args)
    check_args(model_args, data_args, training_args)
    resume = None if data_args.eval_only else _resolve_resume(training_args)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    processor = Phi3VProcessor.from_pretrained(model_args.model_name_or_path, num_crops=model_args.num_crops)
    train, eval_conversations = _prepare(task, model_args, data_args, training_args, processor)
    # Only once the data is known to be good does an explicit overwrite discard the earlier run.
    if training_args.overwrite_output_dir and not resume and not data_args.eval_only:
        _start_over(output_dir)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    if _is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
    logger.info("%s: %s training / %d evaluation examples", task.name,
                len(train) if train is not None else 0, len(eval_conversations))

    model = load_model(model_args, training_args)
    trainable, total = count_parameters(model)
    logger.info("parameters: %s trainable of %s", f"{trainable:,}", f"{total:,}")
    generation_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    generation_model.generation_config.eos_token_id = end_token_ids(processor.tokenizer)
    generation_model.generation_config.pad_token_id = processor.tokenizer.pad_token_id

    eval_kwargs = dict(
        batch_size=data_args.eval_batch_size,
        max_new_tokens=data_args.max_new_tokens,
        autocast_dtype=torch.bfloat16 if training_args.bf16 else (torch.float16 if training_args.fp16 else None),
    )
    results: dict = {}

    def run_eval(name: str, eval_model) -> float:
        device = training_args.device
        if not getattr(eval_model, "is_loaded_in_4bit", False) and next(eval_model.parameters()).device != device:
            eval_model.to(device)
        out = evaluate(eval_model, processor, eval_conversations, task.score, task.metric,
                       output_dir / f"{name}.json", device=device, synced_gpus=is_deepspeed_zero3_enabled(),
                       **eval_kwargs)
        logger.info("%s %s = %.4f on %d examples", name, task.metric, out[task.metric], out["num_examples"])
        return out[task.metric]

    before_file = output_dir / "eval_before.json"
    eval_at_train_begin = None
    if data_args.skip_eval_before or data_args.eval_only:
        pass  # (--eval_only: the one evaluation below, of the same model, is eval_after.json)
    elif resume and before_file.exists():
        logger.info("resuming: keeping %s", before_file)
        results["eval_before"] = json.loads(before_file.read_text(encoding="utf-8"))[task.metric]
    elif resume:
        logger.info("resuming without %s: the model before training is gone, no evaluation before", before_file)
    elif is_deepspeed_zero3_enabled():
        eval_at_train_begin = _EvalAtTrainBegin(run_eval)
    else:
        results["eval_before"] = run_eval("eval_before", model)

    if not data_args.eval_only:
        if (
            world_size() > 1 and not training_args.deepspeed and not model_args.use_lora
            and not model_args.freeze_vision_model and any(not c.images for c in train)
        ):
            # A rank whose batch has no image gives the image side no gradient; DDP must know.
            training_args.ddp_find_unused_parameters = True
            logger.info("text-only examples with a trainable image side: DDP finds unused parameters")
        train_dataset = ConversationDataset(train, processor)
        trainer = RecipeTrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            data_collator=Collator(pad_token_id=processor.tokenizer.pad_token_id,
                                   max_tokens_per_row=data_args.max_tokens_per_row if data_args.padding_free else None),
            processing_class=processor,
            model_args=model_args,
            callbacks=[eval_at_train_begin] if eval_at_train_begin else None,
        )
        train_output = trainer.train(resume_from_checkpoint=resume)
        if eval_at_train_begin is not None:
            results["eval_before"] = eval_at_train_begin.result
        results["train_loss"] = train_output.training_loss
        results["global_step"] = train_output.global_step
        generation_model.config.use_cache = True  # off for training only; saved as released
        trainer.save_model(str(output_dir))
        if trainer.is_world_process_zero():
            processor.save_pretrained(output_dir)
        if model_args.merge_lora and trainer.is_world_process_zero():
            merge_adapter(output_dir, model_args.model_name_or_path, output_dir / "merged", processor)
        model = trainer.model
        log_history = trainer.state.log_history
    else:
        log_history = []

    results["eval_after"] = run_eval("eval_after", model)

    if _is_main() and not data_args.eval_only:
        from .plotting import plot_training_curves

        points = {}
        if "eval_before" in results:
            points.setdefault(f"eval_{task.metric}", []).append((0, results["eval_before"]))
        points.setdefault(f"eval_{task.metric}", []).append((results.get("global_step", 0), results["eval_after"]))
        plot_training_curves(log_history, output_dir / "training_curves.png", title=task.name, extra_metrics=points)
        summary = {"task": task.name, "results": results, "model_args": asdict(model_args),
                   "data_args": asdict(data_args)}
        write_json_atomic(output_dir / RUN_COMPLETE_FILE, summary)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return results
