"""The runner every task script's run goes through (`Runner`): one object holds a run's state,
its methods are the phases, in this order:

    setup_processor -> setup_data -> setup_output_dir -> setup_model -> setup_evaluator ->
    (--eval_only: evaluate_only) setup_trainer -> train (evaluation before, in the Trainer) ->
    save -> evaluate_after -> merge -> report

What is optimised and measured comes from the task's objective (recipe.objective.Objective,
registered by name in OBJECTIVES): supervised finetuning (recipe.supervised) or preference
tuning (recipe.preference). Flags are parsed and checked before this module loads
(recipe.task.run).

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
from pathlib import Path
from typing import Sequence

import datasets
import torch
import transformers
from transformers import TrainerCallback, set_seed
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

from phi3v.export import SAVE_DTYPES, finalize_output, load_merged, merge_lora
from phi3v.processing_phi3v import Phi3VProcessor, end_token_ids

from .checkpoints import RUN_COMPLETE_FILE, TMP_DIR
from .errors import DataError
from .faults import StopOnSignal, Stopped, dataloader_error
from .flag_parser import Flags, build_training_args
from .launcher import barrier, is_main
from .lock import lock_output_dir
from .model import count_parameters, load_model
from .objective import Objective
from .preference import Preference
from .records import subset
from .report import precision_of, write_report
from .shared_fs import check_shared_output_dir
from .supervised import Supervised
from .trainer import LogAtSaveAndEnd
from .validation_cache import CACHE_DIR

__all__ = ["OBJECTIVES", "Runner", "objective_of"]

logger = logging.getLogger("recipe")

# The objectives a Task may name (recipe.task.Task.objective).
OBJECTIVES: dict[str, Objective] = {"supervised": Supervised(), "preference": Preference()}

# What a run writes into --output_dir; --overwrite_output_dir removes exactly these (other files stay).
RUN_OUTPUTS = (
    "checkpoint-*", TMP_DIR, "eval_*.json", RUN_COMPLETE_FILE, "training_curves.png", "README.md", "merged", "runs",
    "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "config.json", "generation_config.json",
    "adapter_config.json", "tokenizer*.json", "special_tokens_map.json", "preprocessor_config.json",
    "processor_config.json", "chat_template.*", "training_args.bin", "*.py", "ref_log_probs_*.pt",
)
# Files that say a directory holds a run's outputs; without one, README.md and *.py are not ours.
RUN_MARKERS = (RUN_COMPLETE_FILE, "config.json", "adapter_config.json", "trainer_state.json")


def objective_of(task) -> Objective:
    objective = task.objective
    if isinstance(objective, Objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"task {task.name!r}: unknown objective {objective!r} (recipe.runner.OBJECTIVES has "
                         f"{', '.join(OBJECTIVES)})")
    return OBJECTIVES[objective]


class Runner:
    """One run: the task, its flags, and what the phases make (processor, data, model, evaluator,
    trainer, results). Each phase is a method that reads and sets these attributes; the objective
    supplies what is its own (recipe.objective.Objective)."""

    def __init__(self, task, model_args, data_args, training_args):
        self.task = task
        self.objective = objective_of(task)
        self.objective.check(task, data_args)
        self.model_args, self.data_args, self.training_args = model_args, data_args, training_args
        self.processor = None
        self.train_data: Sequence | None = None
        self.eval_data: Sequence | None = None
        self.model = None
        self.evaluator = None
        self.trainer = None
        self.results: dict = {}

    @classmethod
    def from_flags(cls, task, flags: Flags) -> Runner:
        """The runner of `task` with its flags (parsed and checked by recipe.task); sets the log
        levels and the seed."""
        task = task.resolve(flags.data)
        training_args = build_training_args(flags)
        _setup_logging(training_args)
        set_seed(training_args.seed)
        if training_args.resume_from_checkpoint:
            logger.info("resuming from %s", training_args.resume_from_checkpoint)
        return cls(task, flags.model, flags.data, training_args)

    def run(self) -> dict:
        """Every phase in order, with --output_dir locked (a second run into it stops here)."""
        lock = lock_output_dir(self.training_args.output_dir)
        try:
            self.setup_processor()
            self.setup_data()
            self.setup_output_dir()
            self.setup_model()
            self.setup_evaluator()
            if self.data_args.eval_only:
                self.evaluate_only()
                return self.results
            self.setup_trainer()
            self.train()
            self.save()
            self.evaluate_after()
            if self.model_args.merge_lora:
                self.merge()
            self.report()
            return self.results
        finally:
            lock.release()

    # -- phases --------------------------------------------------------------------------------

    def setup_processor(self) -> None:
        self.processor = Phi3VProcessor.from_pretrained(self.model_args.model_name_or_path,
                                                        num_crops=self.model_args.num_crops)

    def setup_data(self, read: tuple[Sequence | None, Sequence] | None = None) -> None:
        """The task's records (`read`: already read), validated and measured once by the objective.
        --eval_only: the evaluation set only."""
        task, objective = self.task, self.objective
        model_args, data_args, training_args = self.model_args, self.data_args, self.training_args
        train, eval_ = read if read is not None else task.load_data(data_args, model_args)
        common = dict(tokenizer=self.processor.tokenizer, num_crops=model_args.num_crops,
                      decode_images=data_args.decode_images, skip_bad=data_args.skip_bad_examples,
                      progress=not training_args.disable_tqdm,
                      # (a resume or rerun starts in seconds; --eval_only may point into a model directory
                      # and a dry run writes nothing: both left clean)
                      cache_dir=None if data_args.eval_only or getattr(training_args, "output_dir", None) is None
                      else Path(training_args.output_dir) / CACHE_DIR)
        seed = training_args.seed
        if data_args.eval_only:
            train = None
        elif train is not None:
            train = subset(train, data_args.max_train_samples, seed)
            train = objective.validate(self, train, max_length=data_args.max_length, training=True,
                                       what=f"{task.name} training {objective.data_noun}", **common)
            if not train:
                raise DataError(f"no usable {task.name} training {objective.unit}", everywhere=True)
        eval_ = subset(eval_, data_args.max_eval_samples, seed)
        eval_ = objective.validate(self, eval_, max_length=None, what=f"{task.name} evaluation {objective.data_noun}",
                                   **common)
        if not eval_:
            raise DataError(f"no usable {task.name} evaluation {objective.unit}", everywhere=True)
        logger.info("%s: %d training / %d evaluation %s", task.name, len(train or ()), len(eval_), objective.unit)
        self.train_data, self.eval_data = train, eval_

    def setup_output_dir(self) -> None:
        """Creates --output_dir. --overwrite_output_dir without resuming (only now, once the data is
        known to be good) removes the earlier run's outputs, so they can neither be resumed by
        mistake nor mixed with (or rotated instead of) the new ones. A multi-node run then checks
        that every node sees the same directory (recipe.shared_fs)."""
        training_args = self.training_args
        output_dir = Path(training_args.output_dir)
        # (--eval_only: the directory may hold the very model being evaluated; its eval_after.json is
        # simply replaced.)
        starting_over = training_args.overwrite_output_dir and not training_args.resume_from_checkpoint
        if is_main():
            if starting_over and not self.data_args.eval_only and output_dir.is_dir():
                ours = (any((output_dir / marker).exists() for marker in RUN_MARKERS)
                        or any(output_dir.glob("checkpoint-*")))
                patterns = RUN_OUTPUTS if ours else [p for p in RUN_OUTPUTS if p not in ("README.md", "*.py")]
                old = sorted({p for pattern in patterns for p in output_dir.glob(pattern)})
                for path in old:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                if old:
                    logger.info("--overwrite_output_dir: removed the earlier run's %s", ", ".join(p.name for p in old))
            output_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        check_shared_output_dir(output_dir)

    def setup_model(self) -> None:
        """The model in the flags' mode (recipe.model.load_model, with the objective's extras), set
        to end its answers where the release does."""
        model = load_model(self.model_args, self.training_args, **self.objective.load_kwargs(self))
        trainable, total = count_parameters(model)
        logger.info("parameters: %s trainable of %s", f"{trainable:,}", f"{total:,}")
        tokenizer = self.processor.tokenizer
        generation_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        generation_model.generation_config.eos_token_id = end_token_ids(tokenizer)
        generation_model.generation_config.pad_token_id = tokenizer.pad_token_id
        self.model = model

    def setup_evaluator(self) -> None:
        self.evaluator = self.objective.evaluator(self)

    def evaluate_only(self) -> None:
        """--eval_only: the one evaluation of an unchanged model is eval_after.json."""
        self.results["eval_after"] = self.evaluator(self.model, "eval_after")
        barrier()

    def setup_trainer(self) -> None:
        """The objective's Trainer on the objective's datasets and collator, with the callbacks every
        run has: StopOnSignal (before LogAtSaveAndEnd: the step a signal stops at is logged like a
        save), the objective's own, then the evaluation before training."""
        objective, training_args = self.objective, self.training_args
        callbacks = [StopOnSignal(), LogAtSaveAndEnd(), *objective.callbacks(self)]
        if not training_args.resume_from_checkpoint and not self.data_args.skip_eval_before:
            callbacks.append(EvalAtTrainBegin(self))
        self.trainer = objective.trainer_class(
            model=self.model,
            args=training_args,
            train_dataset=objective.dataset(self, self.train_data, training=True),
            eval_dataset=objective.dataset(self, self.eval_data, training=False),
            data_collator=objective.collator(self),
            # No processing_class: the Trainer would align the model's eos_token_id with the tokenizer's
            # (32000) instead of the release's 2; the processor is saved with each checkpoint below.
            processing_class=None,
            model_args=self.model_args,
            task_eval=self.evaluator,
            callbacks=callbacks,
            **objective.trainer_kwargs(self),
        )
        self.trainer.checkpoint_extras.append(self.processor.save_pretrained)
        _name_tensorboard_run(self.trainer, self.task.name)

    def train(self) -> None:
        """Trains (resuming where asked); a signal ends it with a checkpoint and recipe.faults.Stopped."""
        trainer, results = self.trainer, self.results
        resume = trainer.args.resume_from_checkpoint
        before_file = Path(trainer.args.output_dir) / "eval_before.json"
        if resume and before_file.exists():
            results["eval_before"] = json.loads(before_file.read_text(encoding="utf-8"))[self.evaluator.metric]
            logger.info("resuming: keeping %s", before_file)
        elif resume:
            logger.info("resuming without %s: the model before training is gone, no evaluation before", before_file)
        stop = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StopOnSignal))
        try:
            output = trainer.train(resume_from_checkpoint=resume)
        except RuntimeError as err:
            user_error = dataloader_error(err, trainer.args.dataloader_num_workers, trainer.args.dataloader_timeout)
            if user_error is None:
                raise
            raise user_error from None
        finally:
            stop.uninstall()  # (on_train_end does it when training ends; not when it raises)
        late = stop.stopped_at is None
        if stop.stop_after_training(trainer.args.device, trainer.state.global_step):
            saved = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
            if late and not saved.is_dir():  # (the signal came during the last step's evaluation or save)
                trainer._save_checkpoint(trainer.model_wrapped, trial=None)
            message = stop.message(trainer.args.output_dir)
            if trainer.is_world_process_zero():
                logger.warning(message)
            raise Stopped(stop.signum, message)
        results["global_step"] = output.global_step
        results["train_loss"] = whole_run_loss(trainer.state.log_history, output.global_step, output.training_loss)
        # train_runtime includes the evaluations that ran inside training (before, mid-training).
        runtime = output.metrics["train_runtime"] - self.evaluator.seconds
        results["throughput"] = trainer.throughput.summary(runtime, trainer.args.device, trainer.model,
                                                            precision_of(trainer.args))
        logger.info("trained %d steps: mean loss %.4f over the whole run; %s", output.global_step,
                    results["train_loss"], trainer.throughput.describe(results["throughput"]))

    def save(self) -> None:
        """The final model (full) or adapter (LoRA/QLoRA) and the processor, in the release's layout
        and dtype (phi3v.export.finalize_output: special tokens, eos, auto_map, --save_dtype)."""
        trainer = self.trainer
        output_dir = Path(self.training_args.output_dir)
        model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        model.config.use_cache = True  # off for training only; saved as released
        trainer.save_model(str(output_dir))
        if trainer.is_world_process_zero():
            self.processor.save_pretrained(output_dir)
            finalize_output(output_dir, self.model_args.model_name_or_path, SAVE_DTYPES[self.model_args.save_dtype])
        barrier()

    def evaluate_after(self) -> None:
        self.results["eval_after"] = self.evaluator(self.trainer.model, "eval_after", self.trainer)
        self.results["num_eval_examples"] = len(self.eval_data)

    def merge(self) -> None:
        """--merge_lora: base + adapter -> merged/ (a full model in the release's layout). A QLoRA
        adapter is merged into the unquantised base, which eval_after (4-bit + adapter) does not
        describe: merged/ is evaluated as saved (eval_merged.json)."""
        trainer, model_args, training_args = self.trainer, self.model_args, self.training_args
        output_dir = Path(training_args.output_dir)
        if trainer.is_world_process_zero():
            logger.info("--merge_lora: merging the adapter into %s", output_dir / "merged")
            # Rank 0 alone loads the base: outside ZeRO-3, whose zero.Init would partition it and wait
            # for the other ranks (they are at the barrier below).
            ds_config = getattr(training_args, "hf_deepspeed_config", None)
            unset_hf_deepspeed_config()
            try:
                merge_lora(output_dir, output_dir / "merged", model_args.model_name_or_path, self.processor,
                           SAVE_DTYPES[model_args.save_dtype], progress=not training_args.disable_tqdm)
            finally:
                if ds_config is not None:
                    set_hf_deepspeed_config(ds_config)
        if model_args.use_qlora:
            generation_config = trainer.model.get_base_model().generation_config
            # The 4-bit model, its adapters and the optimizer state go before the full model loads.
            trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
            self.model = None
            trainer.accelerator.free_memory()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.results["eval_merged"] = self.evaluator(load_merged(output_dir / "merged", generation_config),
                                                         "eval_merged")
        barrier()

    def report(self) -> None:
        """Model card, training curves and run_complete.json (recipe.report)."""
        if is_main():
            write_report(self)
        barrier()


class EvalAtTrainBegin(TrainerCallback):
    """The evaluation before training, once the Trainer exists: logged through it (tensorboard),
    and under ZeRO-3, where only the DeepSpeed engine can run the partitioned weights, possible
    only from here."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if "eval_before" not in self.runner.results:
            self.runner.results["eval_before"] = self.runner.evaluator(model, "eval_before", self.runner.trainer)


def whole_run_loss(log_history: Sequence[dict], global_step: int, fallback: float) -> float:
    """Mean training loss over every step of the run, resumed runs included: each logged "loss"
    is the mean since the previous log (LogAtSaveAndEnd makes the intervals cover every step)."""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry and entry["step"] > last:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last == global_step and last > 0 else fallback


def _setup_logging(training_args) -> None:
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


def _name_tensorboard_run(trainer, task_name: str) -> None:
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
