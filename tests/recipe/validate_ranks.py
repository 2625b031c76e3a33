"""Run under torchrun by test_validation.py: each rank validates the same conversations and writes
what it checked itself and what it got back, to show that ranks share the work."""

import json
import sys

from PIL import Image

import recipe.validation as validation
from phi3v.tiny_tokenizer import build_tokenizer
from recipe.records import Conversation, Turn


def main(out_prefix: str) -> None:
    from accelerate import PartialState

    state = PartialState(cpu=True)  # on a GPU-less machine accelerate runs gloo only when told (as use_cpu)
    checked = []
    check_one = validation._check_one

    def recording(conversation, *args):
        checked.append(conversation.id)
        return check_one(conversation, *args)

    validation._check_one = recording
    conversations = [Conversation(f"c{i}", [Turn("q " * (i + 1), "a" if i != 3 else " ",
                                                           [Image.new("RGB", (300 + 40 * i, 200))])])
                     for i in range(5)]
    kept = validation.validate(conversations, build_tokenizer(), num_crops=4, skip_bad=True)
    with open(f"{out_prefix}{state.process_index}.json", "w") as f:
        json.dump({"checked": checked, "kept": [c.id for c in kept],
                   "lengths": [c.tokens.total for c in kept]}, f)
    state.destroy_process_group()  # as recipe.errors.cli does: left to exit, gloo's teardown can abort


if __name__ == "__main__":
    main(sys.argv[1])
