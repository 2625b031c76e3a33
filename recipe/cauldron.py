"""A subset of HuggingFaceM4/the_cauldron as a task's data: its flags and its `load_data`, shared
by the task scripts that train on one (hateful_memes, nlvr2). A script subclasses
`CauldronArguments` to name its subset and passes `load_cauldron` as its Task's load_data."""

from __future__ import annotations

from dataclasses import dataclass, field

from .args import DataArguments
from .hub import cauldron_conversations, load_source, split_for_eval

__all__ = ["CauldronArguments", "load_cauldron"]


@dataclass
class CauldronArguments(DataArguments):
    dataset_name_or_path: str = field(
        default="HuggingFaceM4/the_cauldron", metadata={"help": "Hub id or local copy (columns images, texts)."}
    )
    dataset_config: str = field(default="", metadata={"help": "Subset of the_cauldron."})
    eval_split: str = field(default="test", metadata={"help": "Split to evaluate on, if the source has it."})
    eval_size: int = field(default=500, metadata={"help": "Held-out examples when the source has only 'train'."})


def load_cauldron(data_args: CauldronArguments, model_args):
    """The subset's conversations (its rows are already phrased as conversations): the evaluation
    split, or with only 'train' a fixed, seeded holdout of --eval_size rows that is never trained
    on; --eval_only reads no training rows."""
    source = load_source(data_args.dataset_name_or_path, data_args.dataset_config)
    train_rows, eval_rows = split_for_eval(source, data_args.eval_split, data_args.eval_size, seed=0)
    eval_conversations = cauldron_conversations(eval_rows, "eval", data_args.dataset_config)
    train = None if data_args.eval_only else cauldron_conversations(train_rows, "train", data_args.dataset_config)
    return train, eval_conversations
