"""The examples as records: the bottom of the data path, importing nothing above it.

A `Conversation` is a list of turns, each with its own images, user text and assistant
answer; a `PreferencePair` is a conversation plus the rejected answer to its last turn. An
image is a PIL image, a path, or a reference whose `open()` gives the PIL image (e.g.
`recipe.hub.DatasetImage`, an image inside a memory-mapped Arrow file); it is decoded only when
used (`load_image`). A `Problem` is what is wrong with one example, with where it was read.

The data path, each layer importing only the ones below it:
- records (this module): the types, image opening, subsets;
- layouts: files and datasets into records (`recipe.layouts`: ours, LLaVA, messages, the_cauldron,
  HF datasets; `recipe.hub`: hub rows; `recipe.pair_layouts`: preference pairs), and the
  tokenization of a conversation (`recipe.tokenization`);
- validation: every example checked and measured before the first step (`recipe.validation`);
- datasets and collators, per objective: `recipe.data` (SFT, with `recipe.packing`), `recipe.pairs`
  (preference).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from PIL import Image, UnidentifiedImageError

from .errors import DataError

__all__ = [
    "Turn",
    "Conversation",
    "PreferencePair",
    "Problem",
    "problems_error",
    "MAX_PROBLEMS_SHOWN",
    "Conversations",
    "subset",
    "scored_turns",
    "open_image",
    "load_image",
    "image_size",
]


MAX_PROBLEMS_SHOWN = 20


# -- records ---------------------------------------------------------------------------------


@dataclass
class Turn:
    user: str
    assistant: str
    images: list[Any] = field(default_factory=list)  # PIL images, paths or image references


@dataclass
class Conversation:
    id: str
    turns: list[Turn]
    source: str = ""
    where: str = ""  # "file.jsonl:12" or "train row 5": where problems are reported
    references: list[str] | None = None  # every accepted answer of the last turn (evaluation)
    # A recipe.tokenization.TokenCount, measured by `validate` (length grouping and evaluation
    # order reuse it); typed loosely so that the records import nothing from above them.
    tokens: Any = None
    system: str = ""  # a system message, rendered first by the release's chat template ("" = none)

    @property
    def images(self) -> list[Any]:
        return [image for turn in self.turns for image in turn.images]

    @property
    def answer(self) -> str:
        return self.turns[-1].assistant


@dataclass
class PreferencePair:
    """A conversation whose last turn holds the prompt (user text and images) and the chosen
    answer; `rejected` is the rejected answer to that last turn. Earlier turns are complete."""

    conversation: Conversation
    rejected: str

    @property
    def id(self) -> str:
        return self.conversation.id

    @property
    def where(self) -> str:
        return self.conversation.where

    @property
    def source(self) -> str:
        return self.conversation.source

    @property
    def images(self) -> list[Any]:
        return self.conversation.images

    @property
    def chosen(self) -> str:
        return self.conversation.answer

    def rejected_conversation(self) -> Conversation:
        """The same conversation with the rejected answer in the last turn."""
        turns = self.conversation.turns
        return replace(self.conversation, turns=[*turns[:-1], replace(turns[-1], assistant=self.rejected)])


@dataclass
class Problem:
    where: str
    message: str
    reason: str  # short category for the skip summary

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def problems_error(problems: Sequence[Problem], what: str) -> DataError:
    """One DataError for every problem found, so a dataset is fixed in one pass, not one per run.

    The message names the count and the first problem; `details` list them (file:line each).
    """
    shown = [str(p) for p in problems[:MAX_PROBLEMS_SHOWN]]
    if len(problems) > MAX_PROBLEMS_SHOWN:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
    return DataError(
        f"{len(problems)} problem(s) in {what} (first: {problems[0]}); fix them, or pass --skip_bad_examples "
        "to train without these examples",
        details=shown,
        everywhere=True,  # (every rank reads and validates the same data)
    )


class Conversations(list):
    """Conversations read from a file, with the `problems` of the lines that could not be read.

    `validate` reports these together with its own findings, so every problem of a dataset
    shows in one error.
    """

    def __init__(self, items=(), problems: Sequence[Problem] = (), count_problems: bool = True):
        super().__init__(items)
        self.problems = list(problems)
        # False for a subset: its unreadable lines are reported, but they are not among the
        # sampled examples and do not count as dropped ones.
        self.count_problems = count_problems


# -- subsets ---------------------------------------------------------------------------------


def subset(conversations: Sequence[Conversation], n: int | None, seed: int) -> Conversations:
    """A seeded random `n` of the conversations, kept in their original order (all when `n` is None).

    Not the first `n`: converted data is sorted by class, so its first lines would be one class.
    The same seed gives the same subset on every rank and every run. The problems of unreadable
    lines (see `Conversations`) stay attached, for `validate` to report, but do not count among
    the subset's examples.
    """
    problems = getattr(conversations, "problems", [])
    if n is None or n >= len(conversations):
        return Conversations(conversations, problems)
    chosen = sorted(random.Random(seed).sample(range(len(conversations)), n))
    return Conversations([conversations[i] for i in chosen], problems, count_problems=False)


def scored_turns(conversations: Sequence[Conversation], which: str = "last") -> list[Conversation]:
    """The predictions evaluation makes: "last" scores each example's last answer (the earlier
    turns, with their reference answers, are the prompt); "all" scores every assistant turn as
    its own example whose prompt is the conversation up to that turn.

    A cut conversation keeps the whole one's measured length: it only orders the generation
    batches, so no example is tokenised again for it.
    """
    if which not in ("last", "all"):
        raise ValueError(f"which turns to score: 'last' or 'all', not {which!r}")
    if which == "last":
        return list(conversations)
    return [
        conversation if t == len(conversation.turns) - 1
        else replace(conversation, turns=conversation.turns[: t + 1], references=None)
        for conversation in conversations
        for t in range(len(conversation.turns))
    ]


# -- images --------------------------------------------------------------------------------


def open_image(image: Any) -> Image.Image:
    """A lazily opened PIL image (header read only) from a path or an image reference."""
    return Image.open(image) if isinstance(image, (str, os.PathLike)) else image.open()


def load_image(image: Any) -> Image.Image:
    """A decoded PIL image from a PIL image, a path or an image reference (errors name the file)."""
    if isinstance(image, Image.Image):
        return image
    try:
        with open_image(image) as opened:
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
    with open_image(image) as opened:
        return opened.size
