"""Preference-tune Phi-3.5-vision with DPO on RLAIF-V (less hallucination), or on your own pairs.

Data: openbmb/RLAIF-V-Dataset (83k pairs: image, question, chosen, rejected; --eval_size of them
held out), TRL's preference layout (--dataset_layout trl, e.g. trl-lib/rlaif-v), or a jsonl of
your own pairs (--train_file/--eval_file, see recipe/pair_layouts.py). Start from the release
or from an SFT output (--model_name_or_path out/sft):

    torchrun --nproc_per_node=8 finetune_hf_trainer_rlaif_v.py --output_dir out/rlaif_v \\
        --bf16 --max_train_samples 20000 --max_length 4096 --skip_bad_examples   # full, ZeRO-2
    python finetune_hf_trainer_rlaif_v.py --use_lora --bf16 --batch_size 16 --max_train_samples 2000 --streaming
    python finetune_hf_trainer_rlaif_v.py --train_file pairs/train.jsonl --eval_file pairs/dev.jsonl \\
        --use_lora --bf16 --output_dir out/my_pairs

Loss: --beta (0.1), --loss_type sigmoid|ipo|hinge|robust, --label_smoothing, --rpo_alpha, as in
TRL. Reward accuracy and margin on the held-out pairs before and after training are printed and
written to OUTPUT_DIR/eval_{before,after}.json. Pairs are not generated from: no FlashAttention-2
(pairs share their prompt through a 4-D mask, which it cannot take); SDPA is the default.
"""

from dataclasses import dataclass, field
from pathlib import Path

from recipe.errors import DataError, FlagError
from recipe.hub import load_source, split_for_eval, undecoded_stream
from recipe.pair_layouts import load_pairs_jsonl, rlaif_v_pairs, trl_pairs
from recipe.preference_args import PreferenceArguments
from recipe.task import Task


@dataclass
class RlaifVArguments(PreferenceArguments):
    dataset_name_or_path: str = field(
        default="openbmb/RLAIF-V-Dataset",
        metadata={"help": "Hub id or local copy (save_to_disk, parquet) of preference rows, in --dataset_layout."},
    )
    dataset_layout: str = field(
        default="rlaif_v", metadata={"help": "rlaif_v (image, question, chosen, rejected) or trl (prompt, chosen, "
                                             "rejected as messages, images).", "choices": ["rlaif_v", "trl"]})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the hub rows instead of downloading the dataset: the first "
                                         "--eval_size rows are held out, the next --max_train_samples trained on."})
    eval_split: str = field(default="test", metadata={"help": "Split to evaluate on, when the source has it."})
    eval_size: int = field(default=200, metadata={"help": "Held-out pairs when the source has no eval split."})
    train_file: str | None = field(default=None, metadata={"help": "Your own pairs (jsonl), instead of the hub."})
    eval_file: str | None = field(default=None, metadata={"help": "Your own held-out pairs (jsonl)."})
    image_dir: str | None = field(
        default=None, metadata={"help": "Directory the image paths of --train_file/--eval_file are relative to "
                                        "(default: images/ beside each file)."})

    def check(self) -> None:
        super().check()
        if bool(self.train_file) != bool(self.eval_file):
            raise FlagError("--train_file and --eval_file go together: the pairs trained on and the held-out ones")
        if self.image_dir and not self.train_file:
            raise FlagError("--image_dir goes with --train_file/--eval_file")
        if self.streaming and (self.train_file or self.max_train_samples is None):
            raise FlagError("--streaming reads hub rows and needs --max_train_samples (how many to stream)")


# 1. Where the pairs come from: a jsonl of our layout, or hub rows (RLAIF-V's own or TRL's).
def load_data(data_args: RlaifVArguments, model_args):
    if data_args.train_file:
        def read(path):
            return load_pairs_jsonl(path, data_args.image_dir or Path(path).parent / "images")

        return read(data_args.train_file), read(data_args.eval_file)
    to_pairs = rlaif_v_pairs if data_args.dataset_layout == "rlaif_v" else trl_pairs
    if data_args.streaming:
        stream = stream_rows(data_args.dataset_name_or_path)
        eval_rows = list(stream.take(data_args.eval_size))
        train_rows = list(stream.skip(data_args.eval_size).take(data_args.max_train_samples))
        return to_pairs(train_rows, "train"), to_pairs(eval_rows, "eval")
    source = load_source(data_args.dataset_name_or_path)
    train_rows, eval_rows = split_for_eval(source, data_args.eval_split, data_args.eval_size, seed=0)
    return to_pairs(train_rows, "train"), to_pairs(eval_rows, "eval")


def stream_rows(name_or_path: str):
    """The training split's rows as a stream (hub id, or a directory of data files), images
    undecoded: the pairs keep them as encoded bytes, decoded when a batch is built."""
    import datasets

    try:
        return undecoded_stream(datasets.load_dataset(name_or_path, split="train", streaming=True))
    except Exception as err:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise DataError(f"cannot stream {name_or_path!r} ({err}); without network, drop --streaming and pass a "
                        "local copy as --dataset_name_or_path") from err


# 2. How the result is scored: reward accuracy on held-out pairs (recipe.preference.PairEvaluator).
# 3. This task's defaults (the RLAIF-V paper's DPO: beta 0.1, lr 5e-7 for full finetuning; LoRA
#    takes a larger rate, e.g. --learning_rate 5e-6).
TASK = Task(
    name="rlaif_v",
    metric="rewards/accuracies",
    load_data=load_data,
    score=None,
    data_args_class=RlaifVArguments,
    defaults=dict(num_crops=16, batch_size=64, batch_size_per_gpu=1, learning_rate=5e-7, num_train_epochs=1,
                  warmup_steps=0.1, eval_batch_size=2),
    objective="preference",
)


if __name__ == "__main__":
    TASK.main()
