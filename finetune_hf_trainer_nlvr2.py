"""Finetune Phi-3.5-vision on NLVR2 (is a statement about two images true?), scored by accuracy.

Data: the_cauldron's `nlvr2` subset (one "train" split; a fixed, seeded holdout of
--eval_size examples is the evaluation set and is never trained on), or a local copy in the
same schema (columns images (two per row), texts[{user, assistant}]; see recipe/hub.py). Both
images go in front of the statement as <|image_1|> and <|image_2|>:

    torchrun --nproc_per_node=8 finetune_hf_trainer_nlvr2.py --output_dir out/nlvr2 \\
        --bf16 --use_flash_attention                        # A100/H100: full finetuning, ZeRO-2
    python finetune_hf_trainer_nlvr2.py --use_lora --bf16 --batch_size 16 --batch_size_per_gpu 2   # one GPU

Accuracy before and after finetuning is printed and written to OUTPUT_DIR/eval_{before,after}.json.
"""

from dataclasses import dataclass, field

from recipe.cauldron import CauldronArguments, load_cauldron
from recipe.metrics import accuracy
from recipe.task import Task


# 1. Where the data comes from: the_cauldron's nlvr2 subset, where a row is an image pair and a
#    statement about it; the answer says whether the statement is true.
@dataclass
class Nlvr2Arguments(CauldronArguments):
    dataset_config: str = field(default="nlvr2", metadata={"help": "Subset of the_cauldron."})


# 2. How predictions are scored: exact match after case/space/punctuation normalisation.
def score(predictions, references):
    return accuracy(predictions, references)


# 3. This task's defaults (two images per example: 4 crops each keeps sequences short).
TASK = Task(
    name="nlvr2",
    metric="accuracy",
    load_data=load_cauldron,
    score=score,
    data_args_class=Nlvr2Arguments,
    defaults=dict(num_crops=4, batch_size=64, batch_size_per_gpu=1, learning_rate=4e-5, num_train_epochs=1,
                  max_new_tokens=8),
)

if __name__ == "__main__":
    TASK.main()
