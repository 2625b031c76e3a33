"""Conversations to model batches for supervised finetuning: the dataset and the collator.

`ConversationDataset` decodes images only in `__getitem__` and tokenizes with
`recipe.tokenization.tokenize_conversation`; its `lengths` (for length-grouped batching and
evaluation order) are the ones `recipe.validation.validate` measured. `Collator` pads (right for
training, left for generation) and concatenates the images of the batch, or packs whole examples
into rows (`recipe.packing`).

The data path, layer by layer, is described in `recipe.records`; this module is its top (for SFT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .packing import pack_examples
from .records import Conversation, load_image
from .tokenization import IGNORE_INDEX, conversation_length, tokenize_conversation

__all__ = [
    "encode_images",
    "ConversationDataset",
    "Collator",
]


# -- dataset and collator ------------------------------------------------------------------


def encode_images(example, processor) -> tuple[dict[str, Any], list[int]]:
    """A dataset item's start for an example with `id`, `where` and `images` (a conversation or a
    preference pair): its images opened and through the image processor (pixel_values,
    image_sizes), and each image's token count. An image that cannot be read names the example."""
    try:
        images = [load_image(image) for image in example.images]
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"{example.where or example.id}: {err}") from None
    item: dict[str, Any] = {"id": example.id}
    if not images:
        return item, []
    pixels = processor.image_processor(images, return_tensors="pt")
    item["pixel_values"] = pixels["pixel_values"]
    item["image_sizes"] = pixels["image_sizes"]
    return item, list(pixels["num_img_tokens"])


class ConversationDataset(torch.utils.data.Dataset):
    """Conversations encoded on access; images are decoded only in `__getitem__`.

    `for_generation=True` encodes the prompt only (up to `<|assistant|>\\n`) for evaluation.
    `lengths` (token counts from image headers) drive length-grouped batching.
    """

    def __init__(self, conversations: Sequence[Conversation], processor, for_generation: bool = False):
        self.conversations = list(conversations)
        self.processor = processor
        self.for_generation = for_generation
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.conversations)

    @property
    def num_crops(self) -> int:
        return self.processor.image_processor.num_crops

    @property
    def lengths(self) -> list[int]:
        """Token counts, for length grouping and evaluation order: the lengths `validate`
        measured (whole conversation) where it ran, else measured here."""
        if self._lengths is None:
            tokenizer = self.processor.tokenizer
            self._lengths = [
                c.tokens.total if c.tokens is not None
                else conversation_length(c, tokenizer, self.num_crops, self.for_generation)
                for c in self.conversations
            ]
        return self._lengths

    def __getitem__(self, index: int) -> dict[str, Any]:
        conversation = self.conversations[index]
        item, counts = encode_images(conversation, self.processor)
        encoded = tokenize_conversation(conversation, self.processor.tokenizer, counts, self.for_generation)
        item["input_ids"] = torch.tensor(encoded.input_ids, dtype=torch.long)
        if not self.for_generation:
            item["labels"] = torch.tensor(encoded.labels, dtype=torch.long)
        return item


@dataclass
class Collator:
    """Pads a list of dataset items into a batch.

    Right padding for training (labels padded with IGNORE_INDEX), left padding for generation.
    Images of all rows are concatenated in row order (the order the model consumes them);
    rows without images add none, and a batch without images has no pixel_values at all.
    Rows with different crop counts are padded with all-zero crops, which the model skips.
    With `max_tokens_per_row` (--padding_free), examples are packed whole into rows instead
    (recipe/packing.py).
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    max_tokens_per_row: int | None = None

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if self.max_tokens_per_row:
            batch, items = pack_examples(items, self.pad_token_id, self.max_tokens_per_row)
        else:
            batch = self._pad(items)
        pixels = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
        if pixels:
            crops = max(p.shape[1] for p in pixels)
            pixels = [
                torch.cat([p, p.new_zeros(p.shape[0], crops - p.shape[1], *p.shape[2:])], dim=1)
                if p.shape[1] < crops else p
                for p in pixels
            ]
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_sizes"] = torch.cat([item["image_sizes"] for item in items if item.get("pixel_values") is not None])
        return batch

    def _pad(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            length = int(math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        batch_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        has_labels = "labels" in items[0]
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            where = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            batch_ids[row, where] = item["input_ids"]
            mask[row, where] = 1
            if labels is not None:
                labels[row, where] = item["labels"]
        batch: dict[str, Any] = {"input_ids": batch_ids, "attention_mask": mask}
        if labels is not None:
            batch["labels"] = labels
        return batch
