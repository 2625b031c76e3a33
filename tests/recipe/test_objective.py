"""A third objective, written as a user would add one (its own module's worth of code and a Task
naming it), runs through the shared runner unchanged: its validation, dataset, collator, Trainer
(loss), evaluator (metric) and train-begin callback are the ones used, and the runner's own parts
(evaluation before and after, saving, the report) work with them."""

import json
import math
from dataclasses import replace

import pytest
import torch
from transformers import TrainerCallback

import finetune_hf_trainer_ucf101 as ucf
import recipe.runner
from recipe.data import Collator, ConversationDataset
from recipe.objective import Objective
from recipe.task import run
from recipe.trainer import RecipeTrainer
from recipe.validation import validate

SEEN: dict[str, list] = {}


class HalfLossTrainer(RecipeTrainer):
    """The objective's loss: half the answers' cross-entropy."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        SEEN.setdefault("loss", []).append(len(inputs["input_ids"]))
        return 0.5 * model(**inputs).loss


class LossEvaluator:
    """The objective's metric: minus the answers' mean cross-entropy on the evaluation set."""

    metric = "neg_loss"

    def __init__(self, runner):
        self.dataset = ConversationDataset(runner.eval_data, runner.processor)
        self.collator = Collator(pad_token_id=runner.processor.tokenizer.pad_token_id)
        self.output_dir = runner.training_args.output_dir
        self.seconds = 0.0

    def __call__(self, model, name, trainer=None):
        model.eval()
        with torch.no_grad():
            batch = self.collator([self.dataset[i] for i in range(len(self.dataset))])
            value = -float(model(**batch).loss)
        with open(f"{self.output_dir}/{name}.json", "w") as f:
            json.dump({"metric": self.metric, self.metric: value}, f)
        if trainer is not None:
            trainer.log({f"eval_{self.metric}": value})
        SEEN.setdefault("evaluated", []).append(name)
        return value


class RecordTrainerAtBegin(TrainerCallback):
    def __init__(self, runner):
        self.runner = runner

    def on_train_begin(self, args, state, control, **kwargs):
        SEEN["trainer_at_begin"] = type(self.runner.trainer)


class HalfLoss(Objective):
    name = "half_loss"

    def validate(self, runner, records, **kwargs):
        SEEN.setdefault("validated", []).append(kwargs["what"])
        return validate(records, **kwargs)

    def dataset(self, runner, records, training):
        return ConversationDataset(records, runner.processor, for_generation=not training)

    def collator(self, runner):
        return Collator(pad_token_id=runner.processor.tokenizer.pad_token_id)

    trainer_class = HalfLossTrainer

    def evaluator(self, runner):
        return LossEvaluator(runner)

    def callbacks(self, runner):
        return [RecordTrainerAtBegin(runner)]


def test_a_new_objective_needs_only_its_module_and_a_registration(tiny_checkpoint, ucf101_data, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setitem(recipe.runner.OBJECTIVES, "half_loss", HalfLoss())
    SEEN.clear()
    task = replace(ucf.TASK, name="toy", metric="neg_loss", objective="half_loss")
    out = tmp_path / "out"
    results = run(task, ["--model_name_or_path", str(tiny_checkpoint), "--data_dir", str(ucf101_data),
                         "--output_dir", str(out), "--num_crops", "1", "--no-tqdm", "--deepspeed", "none",
                         "--use_lora", "--max_steps", "2", "--batch_size", "2", "--batch_size_per_gpu", "2",
                         "--warmup_steps", "0", "--save_strategy", "no", "--dataloader_num_workers", "0",
                         "--report_to", "none", "--max_eval_samples", "2"])
    assert SEEN["validated"] == ["toy training data", "toy evaluation data"]
    assert SEEN["trainer_at_begin"] is HalfLossTrainer
    assert SEEN["loss"] == [2, 2]  # two steps of two examples through the objective's loss
    assert SEEN["evaluated"] == ["eval_before", "eval_after"]
    for name in ("eval_before", "eval_after"):
        stored = json.loads((out / f"{name}.json").read_text())
        assert stored["metric"] == "neg_loss" and stored["neg_loss"] == results[name]
        assert math.isfinite(results[name]) and results[name] < 0
    report = json.loads((out / "run_complete.json").read_text())
    assert report["task"] == "toy" and report["results"]["global_step"] == 2
    assert (out / "adapter_config.json").is_file()  # the runner saved the trained adapter


def test_an_unknown_objective_is_named():
    with pytest.raises(ValueError, match=r"unknown objective 'kto' \(recipe.runner.OBJECTIVES has supervised, "
                                         r"preference\)"):
        recipe.runner.objective_of(replace(ucf.TASK, objective="kto"))
