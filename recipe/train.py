"""The shared runner every task script calls, in named phases:

    parse_and_check -> setup_data -> setup_output_dir -> setup_model -> (evaluate before) ->
    train -> save -> evaluate after -> merge -> report

A task script describes only what is task-specific (where data comes from, how a row becomes a
conversation, how predictions are scored) in a `Task` and calls `run(task)`.

Outputs in --output_dir (rank 0 writes them):
    eval_before.json, eval_after.json   metric + per-example predictions (--eval_only: eval_after.json)
    eval_step<N>.json                    --eval_strategy steps: the task metric during training
    checkpoint-N/                        every --save_steps and on SIGTERM/SIGUSR1/Ctrl-C (recipe.faults),
                                         written atomically (recipe.checkpoints); resume with
                                         --resume_from_checkpoint auto
    the final model (full) or adapter (LoRA/QLoRA) + processor, in the official format
    merged/                              --merge_lora: the merged full model + processor
    README.md                            model card: what was trained, how, with what result
    .run.lock                            while a run uses the directory (recipe.lock)
    training_curves.png                  loss, learning rate, task metric
    run_complete.json                    flags, results, throughput and versions of the finished run
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Sequence

import datasets
import torch
import transformers
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import get_length_grouped_indices
from transformers.trainer_utils import rotate_checkpoints

from phi3v.export import SAVE_DTYPES, finalize_output, load_merged, merge_lora
from phi3v.processing_phi3v import Phi3VProcessor, end_token_ids

from .args import RUN_COMPLETE_FILE, Flags, ModelArguments, RecipeTrainingArguments, build_training_args
from .checkpoints import TMP_DIR, publish, save_error
from .data import Collator, ConversationDataset
from .errors import DataError
from .faults import StopOnSignal, Stopped, dataloader_error
from .lock import lock_output_dir
from .evaluate import evaluate
from .model import SEPARATORS, count_parameters, load_model, parameter_groups
from .records import Conversation, subset
from .report import Throughput, precision_of, write_report
from .shared_fs import check_shared_output_dir
from .task import Task, task_flags
from .validation import validate
from .validation_cache import CACHE_DIR

__all__ = ["Task", "Objective", "run", "RecipeTrainer", "GroupedByLengthSampler"]

logger = logging.getLogger("recipe")


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


class TaskEvaluator:
    """The task's generation metric on the evaluation set, for any model and moment of the run.

    Each call writes `<name>.json` (predictions and metric), logs one line and, given a trainer,
    logs `eval_<metric>` through it, so every --report_to integration (tensorboard, ...) and the
    training curves get the metric like the loss.
    """

    def __init__(self, task: Task, processor, conversations, data_args, training_args):
        self.task, self.processor, self.conversations = task, processor, conversations
        self.output_dir = Path(training_args.output_dir)
        self.skip_before = data_args.skip_eval_before
        self.device = training_args.device
        self.seconds = 0.0  # spent evaluating (the throughput figures leave it out of training time)
        self.kwargs = dict(
            batch_size=data_args.eval_batch_size,
            max_new_tokens=data_args.max_new_tokens,
            eval_turns=data_args.eval_turns,
            autocast_dtype=torch.bfloat16 if training_args.bf16 else (torch.float16 if training_args.fp16 else None),
            disable_tqdm=training_args.disable_tqdm,
        )

    @property
    def metric(self) -> str:
        return self.task.metric

    def __call__(self, model, name: str, trainer: Trainer | None = None) -> float:
        start = time.perf_counter()
        if not getattr(model, "is_loaded_in_4bit", False) and next(model.parameters()).device != self.device:
            model.to(self.device)
        out = evaluate(model, self.processor, self.conversations, self.task.score, self.metric,
                       self.output_dir / f"{name}.json", device=self.device, synced_gpus=is_deepspeed_zero3_enabled(),
                       **self.kwargs)
        value = out[self.metric]
        self.seconds += time.perf_counter() - start
        logger.info("%s %s = %.4f on %d examples", name, self.metric, value, out["num_examples"])
        if trainer is not None:
            trainer.log({f"eval_{self.metric}": value})
        return value


class RecipeTrainer(Trainer):
    """Trainer with header-only length grouping, optional per-part learning rates, the task's
    generation metric as its evaluation, and counts of what it trained on (images, crops, tokens)."""

    def __init__(self, *args, model_args: ModelArguments | None = None, task_eval: TaskEvaluator | None = None,
                 **kwargs):
        self.model_args, self.task_eval = model_args, task_eval
        # Written into each checkpoint before it is published (the processor: a checkpoint is a
        # complete official-format directory).
        self.checkpoint_extras: list[Callable[[Path], None]] = []
        self._saving_into: Path | None = None
        super().__init__(*args, **kwargs)
        self.throughput = Throughput(getattr(self.data_collator, "pad_token_id", None))

    def get_train_dataloader(self):
        """With --dataloader_timeout: a worker that dies or delivers nothing is an error, not a hang."""
        loader = super().get_train_dataloader()
        if self.args.dataloader_num_workers > 0 and self.args.dataloader_timeout:
            # (accelerate's loader wraps torch's: the setting belongs to the wrapped one, which
            # iterates; a resumed run's skipping loader copies it from there)
            getattr(loader, "base_dataloader", loader).timeout = self.args.dataloader_timeout
        return loader

    def _run_epoch(self, *args, **kwargs):
        """Nothing left to train (resumed from the checkpoint of the last step, e.g. after a kill
        during the final save or evaluation): the Trainer would otherwise train one step more."""
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial) -> str:
        return str(self._saving_into) if self._saving_into is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written under OUTPUT_DIR/.checkpoint-tmp by every rank and
        renamed into place by the main process once all are done (recipe.checkpoints)."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        tmp_root = run_dir / TMP_DIR
        tmp, final = tmp_root / name, run_dir / name
        if self.args.should_save and tmp_root.exists():
            # Left by a save that was killed, at this step or another (one run per directory,
            # recipe.lock: no other save is in progress); up to a whole checkpoint of disk.
            shutil.rmtree(tmp_root)
        _barrier()
        self._saving_into = tmp_root
        try:
            super()._save_checkpoint(model, trial)
            best = self.state.best_model_checkpoint
            if best is not None and Path(best).parent == tmp_root:
                # Where it is published, on every rank: each loads the best model from it at the end.
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                if self.args.should_save:
                    self.state.save_to_json(str(tmp / TRAINER_STATE_NAME))
            if self.args.should_save:
                for extra in self.checkpoint_extras:
                    extra(tmp)
        except Exception as err:  # noqa: BLE001 - torch and safetensors do not keep the OSError
            if not _is_write_failure(err):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise save_error(err, final) from None
        finally:
            self._saving_into = None
        _barrier()
        if self.args.should_save:
            publish(tmp, final)
            rotate_checkpoints(str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        _barrier()

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            if self.args.train_batch_size == 1:  # nothing to pad: grouping would only order each step's examples
                return torch.utils.data.RandomSampler(dataset)
            group = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return GroupedByLengthSampler(dataset.lengths, group, self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        margs = self.model_args
        if self.optimizer is None and margs and (
            margs.vision_learning_rate is not None or margs.projector_learning_rate is not None
        ):
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = parameter_groups(self.model, margs, self.args.learning_rate, self.args.weight_decay,
                                      set(self.get_decay_parameter_names(self.model)))
            self.optimizer = optimizer_cls(groups, **kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer reads the checkpoint's config.json with the generic PreTrainedConfig, only to
        compare transformers versions; that class warns about the release's RoPE keys (rope_scaling,
        type "su"), which our config class reads fine. The throw-away object's warnings are muted."""
        names = ("transformers.configuration_utils", "transformers.modeling_rope_utils")
        levels = [logging.getLogger(name).level for name in names]
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        finally:
            for name, level in zip(names, levels):
                logging.getLogger(name).setLevel(level)

    def get_decay_parameter_names(self, model) -> list[str]:
        """transformers' rule (no decay for biases and norms), and none for other vectors (CLIP's
        class embedding) or the image separators, which are embeddings; the same rule with or
        without per-part learning rates."""
        vectors = {name for name, param in model.named_parameters() if len(getattr(param, "ds_shape", param.shape)) < 2}
        return [n for n in super().get_decay_parameter_names(model) if not n.endswith(SEPARATORS) and n not in vectors]

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.throughput.count(inputs)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The task's generation metric (--eval_strategy steps|epoch), not a loss."""
        value = self.task_eval(self.model, f"eval_step{self.state.global_step}")
        metrics = {f"{metric_key_prefix}_{self.task_eval.metric}": value}
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def _is_write_failure(err: Exception) -> bool:
    """An error of writing a file (disk full, quota, file size limit, permissions): OSError, or
    torch.save's RuntimeError ("PytorchStreamWriter failed", "unexpected pos") and safetensors'
    error, which do not keep the OSError."""
    text = str(err)
    return isinstance(err, OSError) or "os error" in text or "PytorchStreamWriter" in text or "unexpected pos" in text


class _LogAtSaveAndEnd(TrainerCallback):
    """Logs the loss at every checkpoint and at the last step, so the logged intervals cover every
    step and a resumed run's mean loss over the whole run can be computed from the log history."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        return control


class _EvalAtTrainBegin(TrainerCallback):
    """The evaluation before training, once the Trainer exists: logged through it (tensorboard),
    and under ZeRO-3, where only the DeepSpeed engine can run the partitioned weights, possible
    only from here."""

    def __init__(self, evaluator: TaskEvaluator):
        self.evaluator, self.trainer, self.result = evaluator, None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.result is None:
            self.result = self.evaluator(model, "eval_before", self.trainer)


def _is_main() -> bool:
    return PartialState().is_main_process


def _barrier() -> None:
    PartialState().wait_for_everyone()


# -- phases ------------------------------------------------------------------------------------


def parse_and_check(task: Task, argv: list[str] | None, flags: Flags | None = None):
    """Flags (every check runs here, before anything loads; `flags`: already parsed and checked
    by recipe.task.run) and process log levels."""
    flags = flags or task_flags(task, argv)
    model_args, data_args, training_args = flags.model, flags.data, build_training_args(flags)
    _setup_logging(training_args)
    set_seed(training_args.seed)
    if training_args.resume_from_checkpoint:
        logger.info("resuming from %s", training_args.resume_from_checkpoint)
    return model_args, data_args, training_args


def _setup_logging(training_args: RecipeTrainingArguments) -> None:
    """As transformers' examples: --log_level (main process) and --log_level_replica (others) set
    the level of the recipe's, transformers' and datasets' logs; by default the recipe logs INFO
    on the main process and WARNING elsewhere, the libraries WARNING."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    explicit = (training_args.log_level if training_args.should_log else training_args.log_level_replica) != "passive"
    level = training_args.get_process_log_level()
    if explicit:
        transformers.utils.logging.set_verbosity(level)
        datasets.utils.logging.set_verbosity(level)
    logger.setLevel(level if explicit else (logging.INFO if training_args.should_log else logging.WARNING))


def setup_data(task: Task, model_args, data_args, training_args, processor):
    """The task's conversations, validated (and measured) once."""
    train, eval_ = task.load_data(data_args, model_args)
    common = dict(tokenizer=processor.tokenizer, num_crops=model_args.num_crops, decode_images=data_args.decode_images,
                  skip_bad=data_args.skip_bad_examples, progress=not training_args.disable_tqdm,
                  # (a resume or rerun starts in seconds; --eval_only may point into a model directory and
                  # a dry run writes nothing: both left clean)
                  cache_dir=None if data_args.eval_only or getattr(training_args, "output_dir", None) is None
                  else Path(training_args.output_dir) / CACHE_DIR)
    seed = training_args.seed
    if train is not None and not data_args.eval_only:
        train = subset(train, data_args.max_train_samples, seed)
        train = validate(train, max_length=data_args.max_length, what=f"{task.name} training data", training=True,
                         **common)
        if not train:
            raise DataError(f"no usable {task.name} training examples", everywhere=True)
    eval_ = subset(eval_, data_args.max_eval_samples, seed)
    eval_ = validate(eval_, max_length=None, what=f"{task.name} evaluation data", **common)
    if not eval_:
        raise DataError(f"no usable {task.name} evaluation examples", everywhere=True)
    logger.info("%s: %s training / %d evaluation examples", task.name,
                len(train) if train is not None else 0, len(eval_))
    return train, eval_


# What a run writes into --output_dir; --overwrite_output_dir removes exactly these (other files stay).
RUN_OUTPUTS = (
    "checkpoint-*", TMP_DIR, "eval_*.json", RUN_COMPLETE_FILE, "training_curves.png", "README.md", "merged", "runs",
    "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "config.json", "generation_config.json",
    "adapter_config.json", "tokenizer*.json", "special_tokens_map.json", "preprocessor_config.json",
    "processor_config.json", "chat_template.*", "training_args.bin", "*.py", "ref_log_probs_*.pt",
)
# Files that say a directory holds a run's outputs; without one, README.md and *.py are not ours.
RUN_MARKERS = (RUN_COMPLETE_FILE, "config.json", "adapter_config.json", "trainer_state.json")


def setup_output_dir(data_args, training_args) -> None:
    """Creates --output_dir. --overwrite_output_dir without resuming (only now, once the data is
    known to be good) removes the earlier run's outputs, so they can neither be resumed by mistake
    nor mixed with (or rotated instead of) the new ones. A multi-node run then checks that every
    node sees the same directory (recipe.shared_fs)."""
    output_dir = Path(training_args.output_dir)
    # (--eval_only: the directory may hold the very model being evaluated; its eval_after.json is
    # simply replaced.)
    starting_over = training_args.overwrite_output_dir and not training_args.resume_from_checkpoint
    if _is_main():
        if starting_over and not data_args.eval_only and output_dir.is_dir():
            ours = any((output_dir / marker).exists() for marker in RUN_MARKERS) or any(output_dir.glob("checkpoint-*"))
            patterns = RUN_OUTPUTS if ours else [p for p in RUN_OUTPUTS if p not in ("README.md", "*.py")]
            old = sorted({p for pattern in patterns for p in output_dir.glob(pattern)})
            for path in old:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            if old:
                logger.info("--overwrite_output_dir: removed the earlier run's %s", ", ".join(p.name for p in old))
        output_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    check_shared_output_dir(output_dir)


def setup_model(model_args, training_args, processor, **load_kwargs):
    model = load_model(model_args, training_args, **load_kwargs)
    trainable, total = count_parameters(model)
    logger.info("parameters: %s trainable of %s", f"{trainable:,}", f"{total:,}")
    generation_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    generation_model.generation_config.eos_token_id = end_token_ids(processor.tokenizer)
    generation_model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model


def setup_trainer(model, train, eval_conversations, processor, evaluator, model_args, data_args, training_args):
    # StopOnSignal before _LogAtSaveAndEnd: the step a signal stops at is logged like a save.
    callbacks = [StopOnSignal(), _LogAtSaveAndEnd()]
    eval_before = None
    if not training_args.resume_from_checkpoint and not evaluator.skip_before:
        eval_before = _EvalAtTrainBegin(evaluator)
        callbacks.append(eval_before)
    trainer = RecipeTrainer(
        model=model,
        args=training_args,
        train_dataset=ConversationDataset(train, processor),
        # Mid-training evaluation generates (TaskEvaluator); the Trainer only needs to know there is a set.
        eval_dataset=ConversationDataset(eval_conversations, processor, for_generation=True),
        data_collator=Collator(pad_token_id=processor.tokenizer.pad_token_id,
                               max_tokens_per_row=data_args.max_tokens_per_row if data_args.padding_free else None),
        # No processing_class: the Trainer would align the model's eos_token_id with the tokenizer's
        # (32000) instead of the release's 2; the processor is saved with each checkpoint below.
        processing_class=None,
        model_args=model_args,
        task_eval=evaluator,
        callbacks=callbacks,
    )
    trainer.checkpoint_extras.append(processor.save_pretrained)
    _name_tensorboard_run(trainer, evaluator.task.name)
    if eval_before is not None:
        eval_before.trainer = trainer
    return trainer, eval_before


def _name_tensorboard_run(trainer: RecipeTrainer, task_name: str) -> None:
    """Tensorboard runs under OUTPUT_DIR/runs/ named by the task, unless TENSORBOARD_LOGGING_DIR says
    where; and the task as the run name of the other trackers unless --run_name gives one."""
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            stamp = Path(default_logdir()).name
            callback.logging_dir = str(Path(trainer.args.output_dir) / "runs" / f"{task_name}_{stamp}")
    if trainer.args.run_name is None:
        trainer.args.run_name = task_name


def train(trainer: RecipeTrainer, eval_before: _EvalAtTrainBegin | None, results: dict) -> None:
    resume = trainer.args.resume_from_checkpoint
    before_file = Path(trainer.args.output_dir) / "eval_before.json"
    if resume and before_file.exists():
        results["eval_before"] = json.loads(before_file.read_text(encoding="utf-8"))[trainer.task_eval.metric]
        logger.info("resuming: keeping %s", before_file)
    elif resume:
        logger.info("resuming without %s: the model before training is gone, no evaluation before", before_file)
    try:
        output = trainer.train(resume_from_checkpoint=resume)
    except RuntimeError as err:
        user_error = dataloader_error(err, trainer.args.dataloader_num_workers, trainer.args.dataloader_timeout)
        if user_error is None:
            raise
        raise user_error from None
    stop = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StopOnSignal))
    late = stop.stopped_at is None
    if stop.stop_after_training(trainer.args.device, trainer.state.global_step):
        saved = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        if late and not saved.is_dir():  # (the signal came during the last step's evaluation or save)
            trainer._save_checkpoint(trainer.model_wrapped, trial=None)
        message = stop.message(trainer.args.output_dir)
        if trainer.is_world_process_zero():
            logger.warning(message)
        raise Stopped(stop.signum, message)
    if eval_before is not None:
        results["eval_before"] = eval_before.result
    results["global_step"] = output.global_step
    results["train_loss"] = whole_run_loss(trainer.state.log_history, output.global_step, output.training_loss)
    # train_runtime includes the evaluations that ran inside training (before, mid-training).
    runtime = output.metrics["train_runtime"] - trainer.task_eval.seconds
    results["throughput"] = trainer.throughput.summary(runtime, trainer.args.device, trainer.model,
                                                        precision_of(trainer.args))
    logger.info("trained %d steps: mean loss %.4f over the whole run; %s", output.global_step,
                results["train_loss"], trainer.throughput.describe(results["throughput"]))


def whole_run_loss(log_history: Sequence[dict], global_step: int, fallback: float) -> float:
    """Mean training loss over every step of the run, resumed runs included: each logged "loss"
    is the mean since the previous log (_LogAtSaveAndEnd makes the intervals cover every step)."""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry and entry["step"] > last:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last == global_step and last > 0 else fallback


def save(trainer: RecipeTrainer, processor, model_args, training_args) -> None:
    """The final model (full) or adapter (LoRA/QLoRA) and the processor, in the release's layout
    and dtype (phi3v.export.finalize_output: special tokens, eos, auto_map, --save_dtype)."""
    output_dir = Path(training_args.output_dir)
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    model.config.use_cache = True  # off for training only; saved as released
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)
        finalize_output(output_dir, model_args.model_name_or_path, SAVE_DTYPES[model_args.save_dtype])
    _barrier()


def merge(trainer: RecipeTrainer, processor, evaluator: TaskEvaluator, model_args, training_args, results) -> None:
    """--merge_lora: base + adapter -> merged/ (a full model in the release's layout). A QLoRA
    adapter is merged into the unquantised base, which eval_after (4-bit + adapter) does not
    describe: merged/ is evaluated as saved (eval_merged.json)."""
    output_dir = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        logger.info("--merge_lora: merging the adapter into %s", output_dir / "merged")
        # Rank 0 alone loads the base: outside ZeRO-3, whose zero.Init would partition it and wait
        # for the other ranks (they are at the barrier below).
        ds_config = getattr(training_args, "hf_deepspeed_config", None)
        unset_hf_deepspeed_config()
        try:
            merge_lora(output_dir, output_dir / "merged", model_args.model_name_or_path, processor,
                       SAVE_DTYPES[model_args.save_dtype], progress=not training_args.disable_tqdm)
        finally:
            if ds_config is not None:
                set_hf_deepspeed_config(ds_config)
    if model_args.use_qlora:
        generation_config = trainer.model.get_base_model().generation_config
        # The 4-bit model, its adapters and the optimizer state go before the full model loads.
        trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
        trainer.accelerator.free_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results["eval_merged"] = evaluator(load_merged(output_dir / "merged", generation_config), "eval_merged")
    _barrier()


@dataclass
class Objective:
    """What a training objective supplies to the runner, with the phases' signatures: its data
    (read and validated), its model (setup_model's, given the data flags too), its evaluator (an
    object like TaskEvaluator: called with a model and a name, writes <name>.json, returns
    `metric`'s value) and its trainer (a RecipeTrainer subclass with the objective's loss). The defaults are supervised finetuning; preference tuning
    (recipe/preference.py) supplies its own. Everything else (flags, output directory, modes,
    checkpoints, saving, merging, the report) is the runner's."""

    setup_data: Callable = setup_data
    setup_model: Callable = lambda model_args, data_args, training_args, processor: (  # noqa: E731
        setup_model(model_args, training_args, processor))
    make_evaluator: Callable = lambda task, processor, eval_data, model_args, data_args, training_args: (  # noqa: E731
        TaskEvaluator(task, processor, eval_data, data_args, training_args))
    setup_trainer: Callable = setup_trainer


SUPERVISED = Objective()


def run(task: Task, argv: list[str] | None = None, flags: Flags | None = None) -> dict:
    """Parses flags, validates everything, evaluates, trains, evaluates again; returns the results."""
    model_args, data_args, training_args = parse_and_check(task, argv, flags)
    task = task.resolve(data_args)
    lock = lock_output_dir(training_args.output_dir)  # a second run into the directory stops here
    try:
        return _run(task, model_args, data_args, training_args)
    finally:
        lock.release()


def _run(task: Task, model_args, data_args, training_args) -> dict:
    objective = task.objective or SUPERVISED
    processor = Phi3VProcessor.from_pretrained(model_args.model_name_or_path, num_crops=model_args.num_crops)
    train_data, eval_data = objective.setup_data(task, model_args, data_args, training_args, processor)
    setup_output_dir(data_args, training_args)
    model = objective.setup_model(model_args, data_args, training_args, processor)
    evaluator = objective.make_evaluator(task, processor, eval_data, model_args, data_args, training_args)
    results: dict = {}
    if data_args.eval_only:
        # The one evaluation of an unchanged model is eval_after.json.
        results["eval_after"] = evaluator(model, "eval_after")
        _barrier()
        return results

    trainer, eval_before = objective.setup_trainer(model, train_data, eval_data, processor, evaluator, model_args,
                                                   data_args, training_args)
    train(trainer, eval_before, results)
    save(trainer, processor, model_args, training_args)
    results["eval_after"] = evaluator(trainer.model, "eval_after", trainer)
    results["num_eval_examples"] = len(eval_data)
    if model_args.merge_lora:
        merge(trainer, processor, evaluator, model_args, training_args, results)
    if _is_main():
        write_report(task, results, trainer, model_args, data_args, training_args)
    _barrier()
    return results
