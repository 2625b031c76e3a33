"""From data rows to model batches: one path shared by every recipe.

1. Rows become `Conversation`s: the documented jsonl layout (`read_jsonl`) or hub rows
   (`from_cauldron`, `from_docvqa`). A conversation is a list of turns, each with its own
   images, user text and assistant answer.
2. `validate` checks everything that could fail later (types, image files, tags, length)
   before the first step, and either raises one `DataError` naming file:line for each
   problem or, with skip_bad=True, drops the bad examples and reports why.
3. `tokenize_conversation` applies the chat template once to the whole conversation, numbers
   `<|image_k|>` tags across it, and labels only the assistant answers and their `<|end|>`.
   The ids are exactly the official processor's (BOS after each image block included).
4. `ConversationDataset` loads images lazily; its `lengths` come from image headers without
   decoding pixels, for length-grouped batching. `Collator` pads (right for training, left
   for generation) and concatenates the images of the batch.

Documented jsonl layout (one example per line; image paths relative to the image directory):

    {"id": "v_ApplyEyeMakeup_g01_c01", "source": "ucf101",
     "conversations": [{"images": ["train/ApplyEyeMakeup/v_..._0.jpg", ...],
                        "user": "Classify the video into one of the following classes: ...",
                        "assistant": "ApplyEyeMakeup"}]}

Tags: a turn whose user text has no `<|image_k|>` tags gets one `<|image_k|>\\n` per image
put in front of its text (numbered across the conversation); a turn that places its own tags
must use exactly the numbers of its images, in order.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from phi3v.image_processing_phi3v import hd_image_size, num_image_tokens
from phi3v.processing_phi3v import IMAGE_TAG_RE, image_tag

from .packing import pack_examples

__all__ = [
    "Turn",
    "Conversation",
    "Problem",
    "DataError",
    "read_jsonl",
    "load_jsonl",
    "Conversations",
    "from_cauldron",
    "from_docvqa",
    "validate",
    "resolve_image_path",
    "load_image",
    "DatasetImage",
    "lazy_images",
    "image_size",
    "build_messages",
    "tokenize_conversation",
    "TokenizedConversation",
    "ConversationDataset",
    "Collator",
]

IGNORE_INDEX = -100
END_TOKEN = "<|end|>"
MAX_PROBLEMS_SHOWN = 20


# -- records ---------------------------------------------------------------------------------


@dataclass
class Turn:
    user: str
    assistant: str
    images: list[Any] = field(default_factory=list)  # PIL images or paths


@dataclass
class Conversation:
    id: str
    turns: list[Turn]
    source: str = ""
    where: str = ""  # "file.jsonl:12" or "train row 5": where problems are reported
    references: list[str] | None = None  # every accepted answer of the last turn (evaluation)

    @property
    def images(self) -> list[Any]:
        return [image for turn in self.turns for image in turn.images]

    @property
    def answer(self) -> str:
        return self.turns[-1].assistant


@dataclass
class Problem:
    where: str
    message: str
    reason: str  # short category for the skip summary

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class DataError(ValueError):
    """Raised with every problem found, so a dataset is fixed in one pass, not one per run."""

    def __init__(self, problems: Sequence[Problem], what: str = "the data"):
        self.problems = list(problems)
        shown = "\n  ".join(str(p) for p in self.problems[:MAX_PROBLEMS_SHOWN])
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{len(self.problems)} problem(s) in {what}:\n  {shown}{tail}\n"
            "Fix them, or pass --skip_bad_examples to train without these examples."
        )


# -- reading -------------------------------------------------------------------------------


_TURN_KEYS = {"images", "user", "assistant"}


def _parse_record(obj: Any, where: str, image_dir: Path) -> tuple[Conversation | None, list[Problem]]:
    def bad(message: str, reason: str) -> tuple[None, list[Problem]]:
        return None, [Problem(where, message, reason)]

    if not isinstance(obj, dict):
        return bad(f"expected a JSON object, got {type(obj).__name__}", "not an object")
    turns_raw = obj.get("conversations")
    if turns_raw is None:
        return bad("missing key 'conversations'", "missing key")
    if not isinstance(turns_raw, list) or not turns_raw:
        return bad("'conversations' must be a non-empty list of turns", "wrong type")
    record_id = obj.get("id", where)
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
        return bad(f"'id' must be a string or integer, got {type(record_id).__name__}", "wrong type")
    source = obj.get("source", "")
    if not isinstance(source, str):
        return bad(f"'source' must be a string, got {type(source).__name__}", "wrong type")
    turns, problems = [], []
    for t, turn in enumerate(turns_raw):
        at = f"conversations[{t}]"
        if not isinstance(turn, dict):
            problems.append(Problem(where, f"{at} must be an object", "wrong type"))
            continue
        unknown = set(turn) - _TURN_KEYS
        if unknown:
            problems.append(
                Problem(where, f"{at} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_TURN_KEYS)}",
                        "unknown key")
            )
        for key in ("user", "assistant"):
            if key not in turn:
                problems.append(Problem(where, f"{at} is missing key '{key}'", "missing key"))
            elif not isinstance(turn[key], str):
                problems.append(
                    Problem(where, f"{at}.{key} must be a string, got {type(turn[key]).__name__}", "wrong type")
                )
        images = turn.get("images", [])
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            problems.append(Problem(where, f"{at}.images must be a list of path strings", "wrong type"))
            images = []
        paths = []
        for p in images:
            try:
                paths.append(resolve_image_path(p, image_dir))
            except ValueError as err:
                problems.append(Problem(where, f"{at}.images: {err}", "unsafe path"))
        if not problems:
            turns.append(Turn(user=turn["user"], assistant=turn["assistant"], images=paths))
    if problems:
        return None, problems
    return Conversation(id=str(record_id), turns=turns, source=source, where=where), []


def resolve_image_path(relative: str, image_dir: str | Path) -> Path:
    """`image_dir / relative`, refusing absolute paths and paths that leave `image_dir`.

    The check is on the written path (not on symlink targets), so an image directory that is
    itself a symlink, or holds symlinked sub-trees, keeps working.
    """
    if not relative:
        raise ValueError("empty image path")
    if os.path.isabs(relative) or Path(relative).drive:
        raise ValueError(f"absolute image path {relative!r} is not allowed; give it relative to the image directory")
    normalized = os.path.normpath(relative)
    if normalized == ".." or normalized.startswith(".." + os.sep):
        raise ValueError(f"image path {relative!r} escapes the image directory")
    return Path(image_dir) / normalized


def read_jsonl(path: str | Path, image_dir: str | Path) -> tuple[list[Conversation], list[Problem]]:
    """Reads the documented jsonl layout. Returns conversations and the problems of bad lines.

    Bad lines (invalid JSON, missing keys, wrong types, unsafe paths) are reported with
    file:line and never stop the reading, so every problem is listed at once.
    """
    path, image_dir = Path(path), Path(image_dir)
    conversations: list[Conversation] = []
    problems: list[Problem] = []
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(Problem(where, f"invalid JSON ({err.msg} at column {err.colno})", "invalid JSON"))
                continue
            conversation, found = _parse_record(obj, where, image_dir)
            problems += found
            if conversation is not None:
                conversations.append(conversation)
    return conversations, problems


class Conversations(list):
    """Conversations read from a file, with the `problems` of the lines that could not be read.

    `validate` reports these together with its own findings, so every problem of a dataset
    shows in one error.
    """

    def __init__(self, items=(), problems: Sequence[Problem] = ()):
        super().__init__(items)
        self.problems = list(problems)


def load_jsonl(
    path: str | Path, image_dir: str | Path, skip_bad: bool = False, log=print, defer_errors: bool = False
) -> Conversations:
    """`read_jsonl` that stops on bad lines (one DataError listing them all) or, with
    `skip_bad`, drops them and logs how many and why. With `defer_errors` the problems travel
    on the returned list instead, for `validate` to report along with everything else."""
    conversations, problems = read_jsonl(path, image_dir)
    if problems and defer_errors and not skip_bad:
        return Conversations(conversations, problems)
    if problems and not skip_bad:
        raise DataError(problems, str(path))
    if problems:
        bad_lines = len({p.where for p in problems})
        reasons = Counter(p.reason for p in problems)
        summary = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        log(f"skipped {bad_lines} malformed line(s) in {path} ({summary}); first: {problems[0]}")
    return Conversations(conversations)


def from_cauldron(
    row: dict, index: int, split: str = "train", source: str = "the_cauldron", images: list | None = None
) -> Conversation:
    """A the_cauldron row (`images` + `texts[{user, assistant}]`): the images go with the first turn.

    `images` overrides row["images"] (e.g. lazy `DatasetImage` references).
    """
    texts = row["texts"]
    turns = [Turn(user=t["user"], assistant=t["assistant"]) for t in texts]
    if turns:
        turns[0].images = list(images if images is not None else row.get("images") or [])
    return Conversation(id=f"{split}-{index}", turns=turns, source=source, where=f"{split} row {index}")


def from_docvqa(
    row: dict, index: int, split: str = "train", answer_index: int = 0, image: Any = None
) -> Conversation:
    """A docvqa_1200_examples row (`image`, `query.en`, `answers`); all answers kept as references.

    `image` overrides row["image"] (e.g. a lazy `DatasetImage`).
    """
    query = row["query"]
    question = query["en"] if isinstance(query, dict) else query
    answers = list(row["answers"])
    record_id = row.get("id", f"{split}-{index}")
    return Conversation(
        id=str(record_id),
        turns=[Turn(user=question, assistant=answers[answer_index] if answers else "",
                    images=[image if image is not None else row["image"]])],
        source="docvqa",
        where=f"{split} row {index}",
        references=answers,
    )


# -- images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetImage:
    """An image inside a `datasets.Dataset` (memory-mapped Arrow), decoded only when used.

    Building conversations from hub rows this way keeps a 39k-document DocVQA in the Arrow
    file instead of in RAM. `dataset` must have the column cast to `Image(decode=False)`
    (see `lazy_images`).
    """

    dataset: Any
    row: int
    column: str
    position: int | None = None  # index within a list-of-images column

    def open(self) -> Image.Image:
        value = self.dataset[self.row][self.column]
        if self.position is not None:
            value = value[self.position]
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        return Image.open(value["path"])

    def __str__(self) -> str:
        where = f"{self.column}[{self.position}]" if self.position is not None else self.column
        return f"{where} of row {self.row}"


def lazy_images(dataset, column: str) -> list[list[DatasetImage]]:
    """Per row, references to the images of `column` (one image or a list), decoding nothing."""
    import datasets
    import pyarrow.compute as pc

    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        undecoded = dataset.cast_column(column, datasets.Image(decode=False))
        return [[DatasetImage(undecoded, i, column)] for i in range(len(dataset))]
    undecoded = dataset.cast_column(column, datasets.List(datasets.Image(decode=False)))
    arrow = undecoded.with_format("arrow")
    counts: list[int] = []
    for start in range(0, len(undecoded), 10_000):  # list lengths from Arrow offsets, no image bytes read
        counts += pc.list_value_length(arrow[start : start + 10_000][column]).fill_null(0).to_pylist()
    return [[DatasetImage(undecoded, i, column, k) for k in range(n)] for i, n in enumerate(counts)]



def _open(image: Any) -> Image.Image:
    """A lazily opened PIL image (header read only) from a path or a DatasetImage."""
    return image.open() if isinstance(image, DatasetImage) else Image.open(image)


def load_image(image: Any) -> Image.Image:
    """A decoded PIL image from a PIL image, a path or a DatasetImage (errors name the file)."""
    if isinstance(image, Image.Image):
        return image
    try:
        with _open(image) as opened:
            opened.load()
            return opened.copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {image} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"image {image} cannot be decoded: {err}") from None


def image_size(image: Any) -> tuple[int, int]:
    """(width, height) from the header only: no pixel decoding."""
    if isinstance(image, Image.Image):
        return image.size
    with _open(image) as opened:
        return opened.size


def _check_image(image: Any, decode: bool) -> str | None:
    """None if the image is usable, else the reason (reported with the example's file:line)."""
    if isinstance(image, Image.Image):
        return None
    if not isinstance(image, DatasetImage) and not Path(image).is_file():
        return f"image {image} does not exist"
    try:
        if decode:
            load_image(image)
        else:
            with _open(image) as opened:
                opened.verify()  # structure check without a full decode
    except Exception as err:  # noqa: BLE001 - any decoder error means the image is unusable
        return f"image {image} is unreadable: {err}"
    return None


# -- conversation -> tokens ----------------------------------------------------------------


def build_messages(conversation: Conversation, for_generation: bool = False) -> list[dict[str, str]]:
    """Chat messages with `<|image_k|>` tags numbered across the whole conversation.

    With `for_generation`, the last assistant answer is left out (it is what the model must
    produce). Raises ValueError when a turn's own tags do not match its images.
    """
    messages, first = [], 1
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

    # Cut points: image tags (replaced by image ids) and answer boundaries.
    tags = [(m.start(), m.end(), int(m.group(1))) for m in IMAGE_TAG_RE.finditer(text)]
    if [k for _, _, k in tags] != list(range(1, len(image_token_counts) + 1)):
        raise ValueError(
            f"{len(tags)} image tag(s) in the conversation but {len(image_token_counts)} image(s)"
        )
    input_ids: list[int] = []
    labels: list[int] = []
    chunk_start = 0
    for chunk_end, next_start, k in [*tags, (len(text), len(text), None)]:
        # Within one chunk (text between tags): BOS once at its start, answer pieces labelled.
        cuts = sorted({chunk_start, chunk_end, *[p for s, e in spans for p in (s, e)
                                                 if chunk_start < p < chunk_end]})
        for i, (a, b) in enumerate(zip(cuts, cuts[1:] or [chunk_end])):
            piece = text[a:b]
            ids = tokenizer(piece, add_special_tokens=(i == 0))["input_ids"] if (piece or i == 0) else []
            is_answer = any(s <= a and b <= e for s, e in spans) and a < b
            input_ids += ids
            labels += ids if is_answer else [IGNORE_INDEX] * len(ids)
        if k is not None:
            input_ids += [-k] * image_token_counts[k - 1]
            labels += [IGNORE_INDEX] * image_token_counts[k - 1]
        chunk_start = next_start
    return TokenizedConversation(input_ids, labels, list(image_token_counts))


# -- validation ------------------------------------------------------------------------------


def validate(
    conversations: Sequence[Conversation],
    tokenizer,
    num_crops: int,
    max_length: int | None = None,
    decode_images: bool = False,
    skip_bad: bool = False,
    what: str = "the data",
    log=print,
) -> list[Conversation]:
    """Checks every conversation before training; returns the usable ones.

    Problems: image tags that do not match the images, missing or unreadable images, empty
    answers, duplicate ids, and sequences longer than `max_length` (never cut: an example
    that does not fit is skipped, or reported). With `skip_bad=False` any problem raises
    `DataError` listing them all with file:line; with `skip_bad=True` bad examples are
    dropped and a summary by reason is logged.
    """
    problems: list[Problem] = list(getattr(conversations, "problems", []))  # lines that could not be read
    unreadable = len({p.where for p in problems})
    good: list[Conversation] = []
    seen_ids: dict[str, str] = {}
    for conversation in conversations:
        where = conversation.where or conversation.id
        found: list[Problem] = []
        if conversation.id in seen_ids:
            found.append(Problem(where, f"duplicate id {conversation.id!r} (first at {seen_ids[conversation.id]})",
                                 "duplicate id"))
        else:
            seen_ids[conversation.id] = where
        if not conversation.turns:
            found.append(Problem(where, "no turns", "empty"))
        for t, turn in enumerate(conversation.turns):
            if not turn.assistant.strip():
                found.append(Problem(where, f"turn {t} has an empty assistant answer", "empty answer"))
        try:
            build_messages(conversation)
        except ValueError as err:
            found.append(Problem(where, str(err), "tag mismatch"))
        for image in conversation.images:
            error = _check_image(image, decode=decode_images)
            if error:
                found.append(Problem(where, error, "bad image"))
        if not found and max_length is not None:
            length = conversation_length(conversation, tokenizer, num_crops)
            if length > max_length:
                found.append(Problem(where, f"{length} tokens > --max_length {max_length}", "too long"))
        if found:
            problems += found
        else:
            good.append(conversation)
    if problems and not skip_bad:
        raise DataError(problems, what)
    if problems:
        reasons = Counter(p.reason for p in problems)
        total = len(conversations) + unreadable
        summary = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        log(f"skipped {total - len(good)} of {total} examples in {what} ({summary}); first: {problems[0]}")
    return good


def image_token_counts(images: Iterable[Any], num_crops: int) -> list[int]:
    """Token count of each image from its size alone (header read, no pixel decoding)."""
    counts = []
    for image in images:
        width, height = image_size(image)
        h, w = hd_image_size(width, height, num_crops)
        counts.append(num_image_tokens(h, w))
    return counts


def conversation_length(conversation: Conversation, tokenizer, num_crops: int, for_generation: bool = False) -> int:
    counts = image_token_counts(conversation.images, num_crops)
    return len(tokenize_conversation(conversation, tokenizer, counts, for_generation).input_ids)


# -- dataset and collator ------------------------------------------------------------------


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
        if self._lengths is None:
            tokenizer = self.processor.tokenizer
            self._lengths = [
                conversation_length(c, tokenizer, self.num_crops, self.for_generation) for c in self.conversations
            ]
        return self._lengths

    def __getitem__(self, index: int) -> dict[str, Any]:
        conversation = self.conversations[index]
        try:
            images = [load_image(image) for image in conversation.images]
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"{conversation.where or conversation.id}: {err}") from None
        item: dict[str, Any] = {"id": conversation.id}
        counts: list[int] = []
        if images:
            pixels = self.processor.image_processor(images, return_tensors="pt")
            item["pixel_values"] = pixels["pixel_values"]
            item["image_sizes"] = pixels["image_sizes"]
            counts = list(pixels["num_img_tokens"])
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
