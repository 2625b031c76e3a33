"""Finetune Phi-3.5-vision on UCF-101 video classification, a video seen as its sampled frames.

Prepare the data (8 frames per video, jsonl + JPEG layout; see convert_ucf101.py):

    python convert_ucf101.py --out_dir data/ucf101                # UCF-101 subset from the hub
    python convert_ucf101.py --video_dir my_videos --out_dir data/my_videos   # your own videos

Train (full finetuning under DeepSpeed ZeRO-2 on 8 GPUs; accuracy on the test split is
printed and saved before and after):

    torchrun --nproc_per_node=8 finetune_hf_trainer_ucf101.py --data_dir data/ucf101 \\
        --output_dir out/ucf101 --bf16 --use_flash_attention
    # one consumer GPU: LoRA or QLoRA
    python finetune_hf_trainer_ucf101.py --data_dir data/ucf101 --use_qlora --bf16 --batch_size 16

Every shared flag is described by `--help`. To train on more videos in this layout, point
--data_dir at it, or name its files (any names, any layout finetune_hf_trainer_custom.py reads;
image paths relative to --image_dir, by default images/ beside each file):

    python finetune_hf_trainer_ucf101.py --train_file more/train.jsonl --eval_file more/dev.jsonl \
        --use_lora --bf16 --output_dir out/ucf101_more

Data of another task (not video classification) goes to finetune_hf_trainer_custom.py, which
names its outputs by --task_name.

To build a new task, copy this file and change the three parts below.
"""

from dataclasses import dataclass, field
from pathlib import Path

from recipe.args import FileDataArguments
from recipe.errors import DataError, FlagError
from recipe.metrics import accuracy
from recipe.layouts import load_file
from recipe.task import Task


DEFAULT_DATA_DIR = "data/ucf101"


@dataclass
class Ucf101Arguments(FileDataArguments):
    data_dir: str | None = field(
        default=None,
        metadata={"help": f"Output of convert_ucf101.py: ucf101_{{train,val,test}}.jsonl and images/ "
                          f"(default: {DEFAULT_DATA_DIR}, unless --train_file/--eval_file are given)."},
    )
    eval_split: str = field(default="test", metadata={"help": "Split of --data_dir to evaluate on.",
                                                      "choices": ["val", "test"]})
    image_dir: str | None = field(
        default=None, metadata={"help": "Directory the image paths of --train_file/--eval_file are relative to "
                                        "(default: images/ beside each file)."}
    )

    def check(self) -> None:
        super().check()
        files = self.train_file or self.eval_file
        if files and self.data_dir:
            raise FlagError("--data_dir and --train_file/--eval_file are exclusive: give the directory or the files")
        if self.image_dir and not files:
            raise FlagError("--image_dir goes with --train_file/--eval_file (--data_dir holds its own images/)")
        if files and not self.eval_file:
            raise FlagError("--train_file needs --eval_file: the examples scored before and after training")
        if files and not self.train_file and not self.eval_only:
            raise FlagError("--eval_file needs --train_file to train (or --eval_only to only evaluate)")


# 1. Where the data comes from. Each jsonl line is already a conversation: the frames, the
#    question listing the classes, and the class name as the answer. The frames get one
#    <|image_k|> tag each, in front of the question (see recipe/tokenization.py).
def load_data(data_args: Ucf101Arguments, model_args):
    if data_args.train_file or data_args.eval_file:
        train_file, eval_file = data_args.train_file, data_args.eval_file
    else:
        data_dir = Path(data_args.data_dir or DEFAULT_DATA_DIR)
        if not data_dir.is_dir():
            raise DataError(
                f"--data_dir {data_dir} does not exist; create it with "
                f"`python convert_ucf101.py --out_dir {data_dir}` (or --synthetic for a quick try), "
                "or pass --train_file/--eval_file"
            )
        train_file, eval_file = data_dir / "ucf101_train.jsonl", data_dir / f"ucf101_{data_args.eval_split}.jsonl"

    # Bad lines are reported together with the other problems validation finds (file:line each).
    # Files in the other layouts (LLaVA, messages, the_cauldron) are read into the same conversations.
    def read(path):
        image_dir = data_args.image_dir or Path(path).parent / "images"
        return load_file(path, image_dir, data_args.data_format, data_args.allow_absolute_image_paths)

    train = None if data_args.eval_only else read(train_file)
    return train, read(eval_file)


# 2. How predictions are scored: exact class name after case/space/punctuation normalisation.
def score(predictions, references):
    return accuracy(predictions, references)


# 3. This task's defaults (the model card advises 4 crops for multi-frame input).
TASK = Task(
    name="ucf101",
    metric="accuracy",
    load_data=load_data,
    score=score,
    data_args_class=Ucf101Arguments,
    defaults=dict(num_crops=4, batch_size=64, batch_size_per_gpu=1, learning_rate=4e-5, num_train_epochs=1,
                  max_new_tokens=16),
)


if __name__ == "__main__":
    TASK.main()
