"""Conversations to model batches: tokenisation, the dataset and the collator.

`tokenize_conversation` applies the chat template once to the whole conversation, numbers
`<|image_k|>` tags across it, and labels only the assistant answers and their `<|end|>`. The
ids are exactly the official processor's (BOS after each image block included).
`ConversationDataset` decodes images only in `__getitem__`; its `lengths` (for length-grouped
batching and evaluation order) are the ones `recipe.validation.validate` measured. `Collator`
pads (right for training, left for generation) and concatenates the images of the batch.

The data path, by module: `recipe.records` (examples and the jsonl layout), `recipe.layouts`
(the layouts users have: LLaVA, messages, the_cauldron, HF datasets), `recipe.hub` (hub rows),
`recipe.validation` (checks and lengths, before the first step), this module (batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from phi3v.image_processing_phi3v import hd_image_size, num_image_tokens
from phi3v.processing_phi3v import IMAGE_TAG_RE, image_positions, image_tag, image_tag_chunks

from .records import Conversation, image_size, load_image

from .packing import pack_examples

__all__ = [
    "IGNORE_INDEX",
    "build_messages",
    "tokenize_conversation",
    "TokenizedConversation",
    "image_token_counts",
    "image_tokens",
    "conversation_length",
    "ConversationDataset",
    "Collator",
]

IGNORE_INDEX = -100
END_TOKEN = "<|end|>"


# -- conversation -> tokens ----------------------------------------------------------------


def build_messages(conversation: Conversation, for_generation: bool = False) -> list[dict[str, str]]:
    """Chat messages with `<|image_k|>` tags numbered across the whole conversation.

    A system message (`conversation.system`) comes first. With `for_generation`, the last
    assistant answer is left out (it is what the model must
    produce). Raises ValueError when a turn's own tags do not match its images.
    """
    messages, first = [], 1
    if conversation.system:
        messages.append({"role": "system", "content": conversation.system})
    turns = conversation.turns
    for t, turn in enumerate(turns):
        numbers = list(range(first, first + len(turn.images)))
        found = [int(k) for k in IMAGE_TAG_RE.findall(turn.user)]
        if found:
            if found != numbers:
                expected = ", ".join(image_tag(k) for k in numbers) or "no tags"
                raise ValueError(
                    f"turn {t} has {len(turn.images)} image(s) and tags "
                    f"{', '.join(image_tag(k) for k in found)}; expected {expected} "
                    "(numbered across the conversation, in order)"
                )
            user = turn.user
        else:
            user = "".join(f"{image_tag(k)}\n" for k in numbers) + turn.user
        if IMAGE_TAG_RE.search(turn.assistant):
            raise ValueError(f"turn {t}: the assistant answer contains an image tag")
        first += len(turn.images)
        messages.append({"role": "user", "content": user})
        if not (for_generation and t == len(turns) - 1):
            # Leading whitespace would be swallowed by <|assistant|> (rstrip=True) in the
            # official tokenization anyway; dropping it keeps label spans exact.
            messages.append({"role": "assistant", "content": turn.assistant.lstrip()})
    return messages


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    num_image_tokens: list[int]


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """`tokenizer(text, add_special_tokens=...)["input_ids"]`, through the fast tokenizer's Rust
    backend when there is one: the same ids without transformers' per-call wrapping, which is
    most of the cost of tokenizing the short pieces of a conversation (validation tokenizes
    every example before the first step)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if (not getattr(tokenizer, "is_fast", False) or backend is None or getattr(tokenizer, "split_special_tokens", False)
            or backend.truncation is not None or backend.padding is not None or backend.encode_special_tokens):
        # (what the plain call would switch off or on first)
        return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return backend.encode(text, add_special_tokens=add_special_tokens).ids


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_conversation(
    conversation: Conversation,
    tokenizer,
    image_token_counts: Sequence[int],
    for_generation: bool = False,
) -> TokenizedConversation:
    """Ids and labels of a conversation, given the token count of each of its images.

    The chat template is applied once. The text is then cut at image tags (each piece starts
    with BOS, as in the official processor) and at answer boundaries, which always sit next
    to a special token, so the pieces tokenize exactly like the whole. Labels cover each
    answer and its `<|end|>`; everything else is IGNORE_INDEX.
    """
    messages = build_messages(conversation, for_generation=for_generation)
    text = _render(tokenizer, messages, add_generation_prompt=for_generation)
    # Character spans of the answers: the template is prefix-consistent, so the answer of
    # message m starts where the rendering of messages[:m] plus the generation prompt ends.
    spans = []
    for m, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:m], add_generation_prompt=True))
        end = start + len(message["content"])
        if text[start:end] != message["content"] or not text.startswith(END_TOKEN, end):
            raise ValueError(
                "the tokenizer's chat template does not render an answer as '<|assistant|>\\n' + "
                "answer + '<|end|>'; labels cannot be placed"
            )
        spans.append((start, end + len(END_TOKEN)))

    # The processor's expansion (phi3v.processing_phi3v.image_tag_chunks), with each chunk further
    # cut at answer boundaries to place the labels.
    chunks = image_tag_chunks(text, len(image_token_counts), where="the conversation")
    input_ids: list[int] = []
    labels: list[int] = []
    for k, (chunk_start, chunk_end) in enumerate(chunks):
        # Within one chunk: BOS once at its start (the chunk's own tokenizer call), answers labelled.
        cuts = sorted({chunk_start, chunk_end, *[p for s, e in spans for p in (s, e) if chunk_start < p < chunk_end]})
        for i, (a, b) in enumerate(zip(cuts, cuts[1:] or [chunk_end])):
            piece = text[a:b]
            ids = _encode(tokenizer, piece, add_special_tokens=(i == 0)) if (piece or i == 0) else []
            is_answer = any(s <= a and b <= e for s, e in spans) and a < b
            input_ids += ids
            labels += ids if is_answer else [IGNORE_INDEX] * len(ids)
        if k < len(image_token_counts):
            input_ids += image_positions(k + 1, image_token_counts[k])
            labels += [IGNORE_INDEX] * image_token_counts[k]
    return TokenizedConversation(input_ids, labels, list(image_token_counts))


def image_tokens(width: int, height: int, num_crops: int) -> int:
    """Image tokens of a width x height image at `num_crops` (the one size -> count rule)."""
    return num_image_tokens(*hd_image_size(width, height, num_crops))


def image_token_counts(images: Iterable[Any], num_crops: int) -> list[int]:
    """Token count of each image from its size alone (header read, no pixel decoding)."""
    return [image_tokens(*image_size(image), num_crops) for image in images]


def conversation_length(conversation: Conversation, tokenizer, num_crops: int, for_generation: bool = False) -> int:
    counts = image_token_counts(conversation.images, num_crops)
    return len(tokenize_conversation(conversation, tokenizer, counts, for_generation).input_ids)


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
