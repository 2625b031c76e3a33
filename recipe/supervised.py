"""Supervised finetuning (SFT), the objective of the task scripts but RLAIF-V: the loss is the
answers' cross-entropy (labels on the answer tokens only, recipe.data), the metric the task's
own, computed on generated answers (`TaskEvaluator`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from transformers import Trainer
from transformers.integrations import is_deepspeed_zero3_enabled

from .data import Collator, ConversationDataset
from .evaluate import evaluate, generation_kwargs, to_device
from .objective import Objective
from .validation import validate

__all__ = ["Supervised", "TaskEvaluator"]

logger = logging.getLogger("recipe")


class TaskEvaluator:
    """The task's generation metric on the evaluation set, for any model and moment of the run.

    Each call writes `<name>.json` (predictions and metric), logs one line and, given a trainer,
    logs `eval_<metric>` through it, so every --report_to integration (tensorboard, ...) and the
    training curves get the metric like the loss.
    """

    def __init__(self, task, processor, conversations, data_args, training_args):
        self.task, self.processor, self.conversations = task, processor, conversations
        self.output_dir = Path(training_args.output_dir)
        self.device = training_args.device
        self.seconds = 0.0  # spent evaluating (the throughput figures leave it out of training time)
        self.kwargs = dict(generation_kwargs(data_args, training_args), eval_turns=data_args.eval_turns)

    @property
    def metric(self) -> str:
        return self.task.metric

    def __call__(self, model, name: str, trainer: Trainer | None = None) -> float:
        start = time.perf_counter()
        to_device(model, self.device)
        out = evaluate(model, self.processor, self.conversations, self.task.score, self.metric,
                       self.output_dir / f"{name}.json", device=self.device, synced_gpus=is_deepspeed_zero3_enabled(),
                       **self.kwargs)
        value = out[self.metric]
        self.seconds += time.perf_counter() - start
        logger.info("%s %s = %.4f on %d examples", name, self.metric, value, out["num_examples"])
        if trainer is not None:
            trainer.log({f"eval_{self.metric}": value})
        return value


class Supervised(Objective):
    """Conversations in, the answers' cross-entropy as the loss (RecipeTrainer's), the task's
    metric on generated answers."""

    name = "supervised"

    def validate(self, runner, records, **kwargs):
        return validate(records, **kwargs)

    def dataset(self, runner, records, training: bool):
        # Mid-training evaluation generates (TaskEvaluator); the Trainer only needs to know there is a set.
        return ConversationDataset(records, runner.processor, for_generation=not training)

    def collator(self, runner) -> Collator:
        data_args = runner.data_args
        return Collator(pad_token_id=runner.processor.tokenizer.pad_token_id,
                        max_tokens_per_row=data_args.max_tokens_per_row if data_args.padding_free else None)

    def evaluator(self, runner) -> TaskEvaluator:
        return TaskEvaluator(runner.task, runner.processor, runner.eval_data, runner.data_args, runner.training_args)
