"""The Trainer as every objective's run uses it (`RecipeTrainer`): reproducible length grouping,
per-part learning rates, atomic checkpoints, the task's metric as its evaluation, counts of what
it trained on; and the callbacks that keep a run's log complete.

An objective's trainer subclasses RecipeTrainer for its loss (recipe.preference.PreferenceTrainer).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import get_length_grouped_indices
from transformers.trainer_utils import rotate_checkpoints

from .args import ModelArguments
from .checkpoints import TMP_DIR, publish, save_error
from .launcher import barrier
from .model import SEPARATORS, parameter_groups
from .report import Throughput

__all__ = ["RecipeTrainer", "GroupedByLengthSampler", "LogAtSaveAndEnd"]

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


class RecipeTrainer(Trainer):
    """Trainer with header-only length grouping, optional per-part learning rates, the task's
    generation metric as its evaluation, and counts of what it trained on (images, crops, tokens)."""

    def __init__(self, *args, model_args: ModelArguments | None = None, task_eval=None,
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
        barrier()
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
        barrier()
        if self.args.should_save:
            publish(tmp, final)
            rotate_checkpoints(str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        barrier()

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
        """The task's metric (--eval_strategy steps|epoch), not a loss. The evaluator logs it (and,
        for a preference run, every metric it computes) through this trainer."""
        value = self.task_eval(self.model, f"eval_step{self.state.global_step}", self)
        metrics = {f"{metric_key_prefix}_{self.task_eval.metric}": value}
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def _is_write_failure(err: Exception) -> bool:
    """An error of writing a file (disk full, quota, file size limit, permissions): OSError, or
    torch.save's RuntimeError ("PytorchStreamWriter failed", "unexpected pos") and safetensors'
    error, which do not keep the OSError."""
    text = str(err)
    return isinstance(err, OSError) or "os error" in text or "PytorchStreamWriter" in text or "unexpected pos" in text


class LogAtSaveAndEnd(TrainerCallback):
    """Logs the loss at every checkpoint and at the last step, so the logged intervals cover every
    step and a resumed run's mean loss over the whole run can be computed from the log history."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        return control

