"""What a training objective supplies to the runner (recipe.runner.Runner), and nothing else.

The runner owns a run's course (flags, output directory, model loading in every mode, the
evaluation before and after, checkpoints, saving, merging, the report). An objective says what
is optimised and measured: how its records are validated, the dataset and collator that feed the
Trainer, the Trainer subclass with its loss, the evaluator with its metrics, and anything it must
prepare when training begins. Supervised finetuning is recipe.supervised.Supervised, preference
tuning (DPO) recipe.preference.Preference; a new one (KTO, GRPO, ...) is a module with its own
subclass, registered by name in recipe.runner.OBJECTIVES, and a task script naming it. Its
flags, if it has any, are a DataArguments subclass in a light module (no torch: `--help` and
flag errors answer before the libraries load), whose check() and check_model_flags() run with
every other flag check (as recipe.preference_args.PreferenceArguments).

Every method takes the runner, whose attributes are the run's state so far: task, model_args,
data_args, training_args, processor, train_data, eval_data, model, evaluator, trainer, results.
"""

from __future__ import annotations

from typing import Any, Sequence

from transformers import TrainerCallback

from .trainer import RecipeTrainer

__all__ = ["Objective"]


class Objective:
    """The base of every objective; the methods without a default are each objective's own."""

    name: str = ""
    # What the messages call the data ("hateful_memes training data") and one record of it
    # ("no usable hateful_memes training examples").
    data_noun: str = "data"
    unit: str = "examples"
    # The Trainer subclass whose compute_loss is the objective's loss.
    trainer_class: type[RecipeTrainer] = RecipeTrainer

    def check(self, task, data_args) -> None:
        """Refuses, in one line, a task (and flags) this objective cannot run, before anything loads."""

    def validate(self, runner, records: Sequence, *, what: str, max_length: int | None, training: bool = False,
                 **common) -> Sequence:
        """The records that can be used, checked (and measured: each gets its token counts) once.
        `common`: tokenizer, num_crops, decode_images, skip_bad, progress, cache_dir."""
        raise NotImplementedError

    def load_kwargs(self, runner) -> dict[str, Any]:
        """Extra arguments of recipe.model.load_model for this objective's model."""
        return {}

    def dataset(self, runner, records: Sequence, training: bool):
        """The torch Dataset of `records` (the training or the evaluation set) for the Trainer."""
        raise NotImplementedError

    def collator(self, runner):
        """The training batches' collator (runner.model is loaded)."""
        raise NotImplementedError

    def evaluator(self, runner):
        """The evaluator: called with (model, name, trainer=None), it writes OUTPUT_DIR/<name>.json,
        logs `eval_<metric>` through the trainer when given one, and returns the value of its
        `metric` (its attribute, the metric the run reports). It keeps `seconds`, the time spent
        evaluating, which the throughput leaves out."""
        raise NotImplementedError

    def trainer_kwargs(self, runner) -> dict[str, Any]:
        """Extra arguments of `trainer_class` (its loss's settings, ...)."""
        return {}

    def card_method(self, data_args) -> str | None:
        """The objective as the model card's method line names it, with its flags (None: supervised
        finetuning, which the line does not name)."""
        return None

    def card_before(self, metric: str) -> str | None:
        """What the model card says of `metric` before finetuning when its value is fixed by the
        objective rather than measured (None: nothing)."""
        return None

    def callbacks(self, runner) -> list[TrainerCallback]:
        """Callbacks that run when training begins, before the evaluation before training (the
        trainer is runner.trainer by then)."""
        return []
