"""Finetune Phi-3.5-vision on your own image/text data, named by --task_name, scored by --metric.

Data: files (--train_file/--eval_file, JSON lines or a JSON list) in any of the layouts users
already have (ours, LLaVA's JSON, the messages layout of OpenAI/TRL/LLaMA-Factory, the_cauldron's),
or a Hugging Face dataset (--dataset_name_or_path: a hub id or a `save_to_disk` folder) with
messages/images or the_cauldron's texts/images columns. The layout is detected from the first
record and logged; --data_format forces one. See recipe/layouts.py and the README's "Your own data".

    torchrun --nproc_per_node=8 finetune_hf_trainer_custom.py --task_name shapes \\
        --train_file shapes/train.json --eval_file shapes/dev.json --metric accuracy \\
        --output_dir out/shapes --bf16 --use_flash_attention          # images beside the files
    python finetune_hf_trainer_custom.py --task_name charts --dataset_name_or_path data/charts_hf \\
        --train_split train --eval_split test --metric anls --use_lora --bf16 --output_dir out/charts
    python finetune_hf_trainer_custom.py --task_name receipts --train_file r.jsonl --eval_file r_dev.jsonl \\
        --metric my_metrics:total_matches --use_qlora --bf16             # your own score function

The task name goes into the error messages, the model card, the training curves and the
tensorboard run; the metric's name into eval_*.json and every tracker.
"""

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from recipe.args import FileDataArguments
from recipe.dataset_layouts import dataset_conversations
from recipe.errors import DataError, FlagError
from recipe.hub import load_source
from recipe.layouts import load_file
from recipe.metrics import exact_match, score_function
from recipe.task import Task

logger = logging.getLogger("recipe")


@dataclass
class CustomArguments(FileDataArguments):
    task_name: str = field(
        default="custom", metadata={"help": "Your task's name: used in errors, the model card, curves and "
                                            "tensorboard runs (letters, digits, '-', '_', '.')."}
    )
    metric: str = field(
        default="exact_match",
        metadata={"help": "Score of the generated answers: exact_match (the answer as given, outer whitespace "
                          "aside), accuracy (class labels: case, spaces and edge punctuation ignored), anls "
                          "(partial credit for near misses, DocVQA's), or module:function, your function "
                          "score(predictions, references) -> float in [0, 1] (references: a list of accepted "
                          "answers per example)."},
    )
    image_dir: str | None = field(
        default=None, metadata={"help": "Directory the image paths of --train_file/--eval_file are relative to "
                                        "(default: the directory of each file)."}
    )
    dataset_name_or_path: str | None = field(
        default=None, metadata={"help": "A Hugging Face dataset instead of files: hub id or save_to_disk folder, "
                                        "with messages (+ images) or texts + images columns."}
    )
    train_split: str = field(default="train", metadata={"help": "Split of --dataset_name_or_path to train on."})
    eval_split: str = field(default="test", metadata={"help": "Split of --dataset_name_or_path to evaluate on."})
    eval_size: int = field(default=100, metadata={"help": "Held-out examples when the dataset has no --eval_split."})

    def check(self) -> None:
        super().check()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.task_name):
            raise FlagError(f"--task_name {self.task_name!r}: use letters, digits, '-', '_' or '.' (it names files "
                            "and runs)")
        score_function(self.metric)  # an unknown metric or unimportable function stops here
        files = self.train_file or self.eval_file
        if files and self.dataset_name_or_path:
            raise FlagError("--dataset_name_or_path and --train_file/--eval_file are exclusive: give a dataset or "
                            "files")
        if not files and not self.dataset_name_or_path:
            raise FlagError("no data: pass --train_file and --eval_file, or --dataset_name_or_path")
        if self.image_dir and not files:
            raise FlagError("--image_dir goes with --train_file/--eval_file (a dataset holds its images)")
        if files and not self.eval_file:
            raise FlagError("--train_file needs --eval_file: the examples scored before and after training")
        if files and not self.train_file and not self.eval_only:
            raise FlagError("--eval_file needs --train_file to train (or --eval_only to only evaluate)")


# 1. Where the data comes from: files in any layout (image paths relative to --image_dir, by default
#    beside each file), or a dataset's splits (a seeded holdout when it has no --eval_split).
def load_data(data_args: CustomArguments, model_args):
    if data_args.dataset_name_or_path:
        return _dataset_splits(data_args)

    def read(path):
        image_dir = data_args.image_dir or Path(path).parent
        return load_file(path, image_dir, data_args.data_format, data_args.allow_absolute_image_paths)

    train = None if data_args.eval_only else read(data_args.train_file)
    return train, read(data_args.eval_file)


def _dataset_splits(data_args: CustomArguments):
    import datasets

    source = load_source(data_args.dataset_name_or_path)
    splits = source if isinstance(source, datasets.DatasetDict) else {data_args.train_split: source}
    fmt = data_args.data_format
    if data_args.eval_only and data_args.eval_split in splits:  # no training split needed
        return None, dataset_conversations(splits[data_args.eval_split], data_args.eval_split, fmt)
    if data_args.train_split not in splits:
        raise DataError(f"--dataset_name_or_path has splits {list(splits)}, not --train_split "
                        f"{data_args.train_split!r}")
    train_rows = splits[data_args.train_split]
    if data_args.eval_split in splits:
        eval_rows = splits[data_args.eval_split]
    else:
        if data_args.eval_size >= len(train_rows):
            raise DataError(f"no --eval_split {data_args.eval_split!r} in the dataset, and --eval_size "
                            f"{data_args.eval_size} leaves nothing of {len(train_rows)} rows to train on")
        parts = train_rows.train_test_split(test_size=data_args.eval_size, seed=0, shuffle=True)
        train_rows, eval_rows = parts["train"], parts["test"]
        logger.info("no split %r in the dataset: evaluating on a seeded holdout of %d %s rows (--eval_size), "
                    "never trained on", data_args.eval_split, data_args.eval_size, data_args.train_split)
    train = None if data_args.eval_only else dataset_conversations(train_rows, data_args.train_split, fmt)
    return train, dataset_conversations(eval_rows, data_args.eval_split, fmt)


# 2. How predictions are scored: --metric.
def named_task(data_args: CustomArguments) -> Task:
    metric = data_args.metric.partition(":")[2] or data_args.metric
    return replace(TASK, name=data_args.task_name, metric=metric, score=score_function(data_args.metric),
                   from_flags=None)


# 3. This task's defaults (single images: 16 crops keep small print legible).
TASK = Task(
    name="custom",
    metric="exact_match",
    load_data=load_data,
    score=exact_match,
    data_args_class=CustomArguments,
    defaults=dict(num_crops=16, batch_size=64, batch_size_per_gpu=1, learning_rate=4e-5, num_train_epochs=1,
                  max_new_tokens=64),
    from_flags=named_task,
    script="finetune_hf_trainer_custom.py",
)


if __name__ == "__main__":
    TASK.main()
