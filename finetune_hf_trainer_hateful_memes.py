"""Finetune Phi-3.5-vision on Hateful Memes (is this meme hateful? yes/no), scored by accuracy.

Data: the_cauldron's `hateful_memes` subset (one "train" split; a fixed, seeded holdout of
--eval_size examples is the evaluation set and is never trained on), or a local copy in the
same schema (columns images, texts[{user, assistant}]; see recipe/hub.py):

    torchrun --nproc_per_node=8 finetune_hf_trainer_hateful_memes.py --output_dir out/memes \\
        --bf16 --use_flash_attention                        # A100/H100: full finetuning, ZeRO-2
    python finetune_hf_trainer_hateful_memes.py --use_qlora --bf16 --batch_size 16   # one consumer GPU

Accuracy before and after finetuning is printed and written to OUTPUT_DIR/eval_{before,after}.json.
"""

import sys
from dataclasses import dataclass, field

from recipe.args import DataArguments
from recipe.errors import cli
from recipe.hub import cauldron_conversations, load_source, split_for_eval
from recipe.metrics import accuracy
from recipe.task import Task, run


@dataclass
class HatefulMemesArguments(DataArguments):
    dataset_name_or_path: str = field(
        default="HuggingFaceM4/the_cauldron", metadata={"help": "Hub id or local copy (columns images, texts)."}
    )
    dataset_config: str = field(default="hateful_memes", metadata={"help": "Subset of the_cauldron."})
    eval_split: str = field(default="test", metadata={"help": "Split to evaluate on, if the source has it."})
    eval_size: int = field(default=500, metadata={"help": "Held-out examples when the source has only 'train'."})


# 1. Where the data comes from: each row is one meme image and a question whose answer is
#    yes or no, already phrased as a conversation by the_cauldron.
def load_data(data_args: HatefulMemesArguments, model_args):
    source = load_source(data_args.dataset_name_or_path, data_args.dataset_config)
    train_rows, eval_rows = split_for_eval(source, data_args.eval_split, data_args.eval_size, seed=0)
    eval_conversations = cauldron_conversations(eval_rows, "eval", "hateful_memes")
    train = None if data_args.eval_only else cauldron_conversations(train_rows, "train", "hateful_memes")
    return train, eval_conversations


# 2. How predictions are scored: exact match after case/space/punctuation normalisation.
def score(predictions, references):
    return accuracy(predictions, references)


# 3. This task's defaults.
TASK = Task(
    name="hateful_memes",
    metric="accuracy",
    load_data=load_data,
    score=score,
    data_args_class=HatefulMemesArguments,
    defaults=dict(num_crops=16, batch_size=64, batch_size_per_gpu=1, learning_rate=4e-5, num_train_epochs=1,
                  max_new_tokens=8),
)


def main(argv=None):
    return run(TASK, argv)


if __name__ == "__main__":
    sys.exit(cli(main))
