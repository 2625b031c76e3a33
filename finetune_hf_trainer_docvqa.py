"""Finetune Phi-3.5-vision on DocVQA (document question answering), scored with ANLS.

Data: the 1,000/200-example mini split nielsr/docvqa_1200_examples (default), or with
--full_train the_cauldron's DocVQA (39k training questions) while still evaluating on the mini
test split. Without network, pass local copies in the same schema (see recipe/hub.py):

    torchrun --nproc_per_node=8 finetune_hf_trainer_docvqa.py --output_dir out/docvqa \\
        --bf16 --use_flash_attention                        # A100/H100: full finetuning, ZeRO-2
    torchrun --nproc_per_node=8 finetune_hf_trainer_docvqa.py --full_train --output_dir out/docvqa_full \\
        --bf16 --use_flash_attention
    python finetune_hf_trainer_docvqa.py --use_lora --bf16 --batch_size 16   # one GPU
    torchrun --nproc_per_node=8 finetune_hf_trainer_docvqa.py --fp16 --use_lora   # V100: fp16, no flash

ANLS before and after finetuning is printed and written to OUTPUT_DIR/eval_{before,after}.json.
"""

from dataclasses import dataclass, field

from recipe.args import DataArguments
from recipe.hub import cauldron_conversations, docvqa_conversations, load_source, split_for_eval, train_split
from recipe.metrics import anls
from recipe.task import Task


@dataclass
class DocVQAArguments(DataArguments):
    dataset_name_or_path: str = field(
        default="nielsr/docvqa_1200_examples",
        metadata={"help": "Hub id or local copy with columns image, query{en}, answers (train and test splits)."},
    )
    full_train: bool = field(
        default=False, metadata={"help": "Train on the_cauldron's DocVQA instead of the 1,000 mini examples."}
    )
    full_train_dataset: str = field(
        default="HuggingFaceM4/the_cauldron",
        metadata={"help": "Hub id (config 'docvqa') or local copy with columns images, texts, for --full_train."},
    )
    eval_split: str = field(default="test", metadata={"help": "Split of --dataset_name_or_path to evaluate on."})
    eval_size: int = field(default=200, metadata={"help": "Held-out examples when the source has no eval split."})


# 1. Where the data comes from: a row is one page image, a question and its accepted answers.
#    Training uses the first answer; ANLS takes the best match over all of them.
def load_data(data_args: DocVQAArguments, model_args):
    source = load_source(data_args.dataset_name_or_path)
    train_rows, eval_rows = split_for_eval(source, data_args.eval_split, data_args.eval_size, seed=0)
    eval_conversations = docvqa_conversations(eval_rows, "test")
    if data_args.eval_only:
        return None, eval_conversations
    if data_args.full_train:
        cauldron = train_split(load_source(data_args.full_train_dataset, "docvqa"))
        return cauldron_conversations(cauldron, "train", "docvqa"), eval_conversations
    return docvqa_conversations(train_rows, "train"), eval_conversations


# 2. How predictions are scored: ANLS (case-insensitive, whitespace-normalised, threshold 0.5).
def score(predictions, references):
    return anls(predictions, references)


# 3. This task's defaults (single images: 16 crops keep small print legible).
TASK = Task(
    name="docvqa",
    metric="anls",
    load_data=load_data,
    score=score,
    data_args_class=DocVQAArguments,
    defaults=dict(num_crops=16, batch_size=64, batch_size_per_gpu=1, learning_rate=4e-5, num_train_epochs=2,
                  max_new_tokens=64),
)


if __name__ == "__main__":
    TASK.main()
