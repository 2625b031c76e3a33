"""Examples as records, and where they come from: the documented jsonl layout.

A `Conversation` is a list of turns, each with its own images, user text and assistant
answer. An image is a PIL image, a path, or a reference whose `open()` gives the PIL image
(e.g. `recipe.hub.DatasetImage`, an image inside a memory-mapped Arrow file); it is decoded only
when used. Hub rows become conversations in `recipe.hub`.

Documented jsonl layout (one example per line; image paths relative to the image directory):

    {"id": "v_ApplyEyeMakeup_g01_c01", "source": "ucf101",
     "conversations": [{"images": ["train/ApplyEyeMakeup/v_..._0.jpg", ...],
                        "user": "Classify the video into one of the following classes: ...",
                        "assistant": "ApplyEyeMakeup"}]}

An optional top-level "system" string is a system message, rendered first as the release's chat
template does. The other layouts users have (LLaVA, messages, the_cauldron) are read into the
same records by `recipe.layouts`.

Tags: a turn whose user text has no `<|image_k|>` tags gets one `<|image_k|>\\n` per image
put in front of its text (numbered across the conversation); a turn that places its own tags
must use exactly the numbers of its images, in order (see `recipe.data.build_messages`).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from PIL import Image, UnidentifiedImageError

from .errors import DataError

if TYPE_CHECKING:
    from .validation import TokenCount

__all__ = [
    "Turn",
    "Conversation",
    "Problem",
    "problems_error",
    "parse_record",
    "read_jsonl",
    "load_jsonl",
    "Conversations",
    "resolve_image_path",
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
    tokens: TokenCount | None = None  # measured by `validate` (length grouping and evaluation order reuse it)
    system: str = ""  # a system message, rendered first by the release's chat template ("" = none)

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


# -- reading -------------------------------------------------------------------------------


_TURN_KEYS = {"images", "user", "assistant"}


def _parse_record(obj: Any, where: str, image_dir: Path) -> tuple[Conversation | None, list[Problem]]:
    return parse_record(obj, where, lambda p: resolve_image_path(p, image_dir))


def parse_record(
    obj: Any, where: str, resolve: Callable[[Any], Any]
) -> tuple[Conversation | None, list[Problem]]:
    """One record of our layout; `resolve` turns an image entry into a path or image reference
    (a ValueError says why it cannot)."""

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
    system = obj.get("system", "")
    if not isinstance(system, str):
        return bad(f"'system' must be a string, got {type(system).__name__}", "wrong type")
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
                paths.append(resolve(p))
            except ValueError as err:
                problems.append(Problem(where, f"{at}.images: {err}", "unsafe path"))
        if not problems:
            turns.append(Turn(user=turn["user"], assistant=turn["assistant"], images=paths))
    if problems:
        return None, problems
    return Conversation(id=str(record_id), turns=turns, source=source, where=where, system=system), []


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
        raise DataError(f"data file {path} does not exist; check the path")
    lines = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            lines += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(Problem(where, f"invalid JSON ({err.msg} at column {err.colno})", "invalid JSON"))
                continue
            conversation, found = _parse_record(obj, where, image_dir)
            problems += found
            if conversation is not None:
                conversations.append(conversation)
    if not lines:
        raise DataError(
            f"{path} has no examples (the file is empty or holds only blank lines); it needs one JSON "
            "example per line (see the README's 'Your own data')"
        )
    return conversations, problems


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


def load_jsonl(path: str | Path, image_dir: str | Path, defer_errors: bool = False) -> Conversations:
    """`read_jsonl` that stops on bad lines (one DataError listing them all), or with
    `defer_errors` lets the problems travel on the returned list, for `validate` to report (or,
    with --skip_bad_examples, to count) along with everything else."""
    conversations, problems = read_jsonl(path, image_dir)
    if problems and not defer_errors:
        raise problems_error(problems, str(path))
    return Conversations(conversations, problems)


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
