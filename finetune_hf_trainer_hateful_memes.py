"""Finetune Phi-3.5-vision on Hateful Memes (is this meme hateful? yes/no), scored by accuracy.

Data: the_cauldron's `hateful_memes` subset (one "train" split; a fixed, seeded holdout of
--eval_size examples is the evaluation set and is never trained on), or a local copy in the
same schema (columns images, texts[{user, assistant}]; see recipe/hub.py):

    torchrun --nproc_per_node=8 finetune_hf_trainer_hateful_memes.py --output_dir out/memes \\
        --bf16 --use_flash_attention                        # A100/H100: full finetuning, ZeRO-2
    python finetune_hf_trainer_hateful_memes.py --use_qlora --bf16 --batch_size 16   # one consumer GPU

Accuracy before and after finetuning is printed and written to OUTPUT_DIR/eval_{before,after}.json.
"""

from dataclasses import dataclass, field

from recipe.cauldron import CauldronArguments, load_cauldron
from recipe.metrics import accuracy
from recipe.task import Task


# 1. Where the data comes from: the_cauldron's hateful_memes subset, where each row is one meme
#    image and a question whose answer is yes or no, already phrased as a conversation.
@dataclass
class HatefulMemesArguments(CauldronArguments):
    dataset_config: str = field(default="hateful_memes", metadata={"help": "Subset of the_cauldron."})


# 2. How predictions are scored: exact match after case/space/punctuation normalisation.
def score(predictions, references):
    return accuracy(predictions, references)


# 3. This task's defaults.
TASK = Task(
    name="hateful_memes",
    metric="accuracy",
    load_data=load_cauldron,
    score=score,
    data_args_class=HatefulMemesArguments,
    defaults=dict(num_crops=16, batch_size=64, batch_size_per_gpu=1, learning_rate=4e-5, num_train_epochs=1,
                  max_new_tokens=8),
)

if __name__ == "__main__":
    TASK.main()
