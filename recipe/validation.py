"""Checks every example (or preference pair) before the first step, and measures each one once.

`validate` reports every problem that would fail later (types, image files, tags, length)
with file:line in one `DataError`, or with --skip_bad_examples drops the bad examples with a
warning. Ranks share the work. Each usable example keeps its measured length
(`Conversation.tokens`), which length grouping and evaluation order reuse.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from .errors import DataError
from .records import (MAX_PROBLEMS_SHOWN, Conversation, Conversations, PreferencePair, Problem, load_image,
                      open_image, problems_error)
from .tokenization import TokenCount, build_messages, count_tokens, image_tokens, pair_length
from .validation_cache import ValidationCache, example_key

__all__ = ["validate", "validate_pairs", "LONG_ROPE_THRESHOLD"]

logger = logging.getLogger("recipe.validation")

# Phi-3.5-vision's LongRoPE switches to its long-context factors past this many positions
# (config.original_max_position_embeddings of every released Phi-3(.5)-vision).
LONG_ROPE_THRESHOLD = 4096


def _inspect_image(image: Any, decode: bool) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), None) if the image is usable, else (None, the reason). One open per image:
    the size comes from the header read that the check needs anyway."""
    if isinstance(image, Image.Image):
        return image.size, None
    if isinstance(image, (str, os.PathLike)) and not Path(image).is_file():
        return None, f"image {image} does not exist"
    try:
        if decode:
            return load_image(image).size, None
        with open_image(image) as opened:
            size = opened.size
            opened.verify()  # structure check without a full decode
        return size, None
    except Exception as err:  # noqa: BLE001 - any decoder error means the image is unusable
        return None, f"image {image} is unreadable: {err}"


def _check_one(
    conversation: Conversation, tokenizer, num_crops: int, decode_images: bool, measure=None
) -> tuple[list[Problem], TokenCount | None]:
    """The problems of one example and, when it has none, its measured length. The examples'
    own checks only: duplicates and --max_length are decided over the whole set afterwards."""
    where = conversation.where or conversation.id
    found: list[Problem] = []
    if not conversation.turns:
        found.append(Problem(where, "no turns", "empty"))
    for t, turn in enumerate(conversation.turns):
        if not turn.assistant.strip():
            found.append(Problem(where, f"turn {t} has an empty assistant answer", "empty answer"))
    sizes = []
    for image in conversation.images:
        size, error = _inspect_image(image, decode_images)
        if error:
            found.append(Problem(where, error, "bad image"))
        sizes.append(size)
    counts = None
    if not found:
        try:
            counts = [image_tokens(w, h, num_crops) for w, h in sizes]
        except ValueError as err:  # e.g. an aspect ratio so extreme that a side rounds to 0 pixels
            found.append(Problem(where, f"image cannot be resized for the model: {err}", "bad image"))
    try:
        if counts is None:
            build_messages(conversation)  # the tag check alone: the other problems are reported too
            return found, None
        tokens = count_tokens(conversation, tokenizer, counts, sizes, measure)
    except ValueError as err:
        return found + [Problem(where, str(err), "tag mismatch")], None
    return [], tokens


def _check_all(conversations, tokenizer, num_crops: int, decode_images: bool, what: str, progress: bool,
               cache: ValidationCache | None = None, measure=None):
    """`_check_one` of every example, each rank checking its share; every rank gets all results.

    With a cache, only the examples it does not hold are checked (shared over the ranks as
    well), and the main process adds the results of those that passed to it."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object
    from tqdm.auto import tqdm

    state = PartialState()
    indices = list(range(len(conversations)))
    keys: list = [None] * len(conversations)
    results: list = [None] * len(conversations)
    if cache is not None:
        with state.split_between_processes(indices) as mine:  # keys stat image files: shared too
            keys = gather_object([example_key(conversations[i]) for i in mine])
        # The main process's cache decides for every rank (other nodes may not share its disk).
        found = [cache.lookup(keys) if state.is_main_process else None]
        if state.num_processes > 1:
            broadcast_object_list(found, from_process=0)
        results = found[0]
    todo = [i for i in indices if results[i] is None]
    if cache is not None:
        logger.info("%s: %d of %d examples validated before (%s), checking %d", what, len(indices) - len(todo),
                    len(indices), cache.path, len(todo))
    with state.split_between_processes(todo) as mine:
        bar = tqdm(mine, desc=f"checking {what}", unit="example", disable=not (progress and state.is_main_process))
        checked = gather_object([_check_one(conversations[i], tokenizer, num_crops, decode_images, measure)
                                 for i in bar])
    for i, result in zip(todo, checked):  # shares are contiguous and in rank order: the original order
        results[i] = result
    if cache is not None and todo and state.is_main_process:
        cache.store([(keys[i], results[i]) for i in todo if not results[i][0]])  # (the examples that passed)
    return results


def validate(
    conversations: Sequence[Conversation],
    tokenizer,
    num_crops: int,
    max_length: int | None = None,
    decode_images: bool = False,
    skip_bad: bool = False,
    what: str = "the data",
    training: bool = False,
    progress: bool = False,
    cache_dir: str | Path | None = None,
    measure: Callable[[Conversation, list[int]], int] | None = None,
) -> list[Conversation]:
    """Checks every conversation before training; returns the usable ones, each with its
    measured length in `conversation.tokens`.

    Problems: image tags that do not match the images, missing or unreadable images, empty
    answers, duplicate ids, and sequences longer than `max_length` (never cut: an example
    that does not fit is skipped, or reported with what its text and each image cost). With
    `skip_bad=False` any problem raises `DataError` listing them all with file:line; with
    `skip_bad=True` bad examples are dropped with a WARNING by reason, unless that drops more
    than half of the `training` data, which is an error saying what to change. Ranks share
    the work (progress bar on the first); every rank returns the same result. With `cache_dir`,
    each passing example's result is kept there and reused while the example, its images, the
    tokenizer, `num_crops` and `decode_images` are unchanged (recipe.validation_cache).

    `measure(conversation, image_token_counts)` gives an example's length in tokens when it is
    not the conversation's own (a preference pair: prompt + chosen + rejected; not cached).
    """
    problems: list[Problem] = list(getattr(conversations, "problems", []))  # lines that could not be read
    unreadable = len({p.where for p in problems}) if getattr(conversations, "count_problems", True) else 0
    total = len(conversations) + unreadable
    good: list[Conversation] = []
    seen_ids: dict[str, str] = {}
    too_long: list[Conversation] = []
    cache = (ValidationCache(cache_dir, tokenizer, num_crops, decode_images)
             if cache_dir is not None and measure is None else None)
    results = _check_all(conversations, tokenizer, num_crops, decode_images, what, progress, cache, measure)
    for conversation, (found, tokens) in zip(conversations, results):
        where = conversation.where or conversation.id
        if conversation.id in seen_ids:
            found = [Problem(where, f"duplicate id {conversation.id!r} (first at {seen_ids[conversation.id]})",
                             "duplicate id"), *found]
        else:
            seen_ids[conversation.id] = where
        conversation.tokens = tokens
        if not found and max_length is not None and tokens.total > max_length:
            found = [Problem(where, f"{tokens.total} tokens > --max_length {max_length} by {tokens.total - max_length} "
                                    f"({tokens.describe(num_crops)})",
                             "too long")]
            too_long.append(conversation)
        if found:
            problems += found
        else:
            good.append(conversation)
    if problems and not skip_bad:
        raise problems_error(problems, what)
    if problems:
        dropped = total - len(good)
        reasons = Counter(p.reason for p in problems)
        summary = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        if training and 2 * dropped > total:
            advice = _length_advice(good, too_long, total, max_length, num_crops) if too_long else "fix the data"
            raise DataError(
                f"--skip_bad_examples would drop {dropped} of {total} examples of {what} ({summary}; first: "
                f"{problems[0]}), more than half; {advice}",
                details=[str(p) for p in problems[:MAX_PROBLEMS_SHOWN]],
                everywhere=True,
            )
        _warn(f"skipped {dropped} of {total} examples in {what} ({summary}); first: {problems[0]}")
    _warn_long(good, what, num_crops)
    return good


def _length_advice(good, too_long, total: int, max_length: int, num_crops: int) -> str:
    """What keeps at least half of the examples: a larger --max_length, or fewer crops."""
    need = math.ceil(total / 2) - len(good)  # too-long examples that must fit
    lengths = sorted(c.tokens.total for c in too_long)
    if need > len(lengths):
        return "too many examples are bad for other reasons than length: fix the data"
    target = lengths[need - 1]
    advice = f"raise --max_length by {target - max_length} to {target}"
    for crops in range(num_crops - 1, 0, -1):
        if sum(c.tokens.at_num_crops(crops) <= max_length for c in too_long) >= need:
            return f"{advice}, or lower --num_crops to {crops}"
    return f"{advice} (even --num_crops 1 leaves too many examples over {max_length})"


def _warn_long(conversations: Sequence[Conversation], what: str, num_crops: int) -> None:
    long = [c for c in conversations if c.tokens is not None and c.tokens.total > LONG_ROPE_THRESHOLD]
    if not long:
        return
    longest = max(long, key=lambda c: c.tokens.total)
    _warn(
        f"{len(long)} example(s) in {what} are longer than {LONG_ROPE_THRESHOLD} tokens (longest: "
        f"{longest.where or longest.id}, {longest.tokens.total} tokens: {longest.tokens.describe(num_crops)}). Past "
        f"{LONG_ROPE_THRESHOLD} positions Phi-3.5-vision's LongRoPE switches to its long-context factors, decided "
        "by the padded batch length: every example batched with such an example is trained with the long factors, "
        f"and activation memory grows with the length. --max_length {LONG_ROPE_THRESHOLD} skips them (with "
        "--skip_bad_examples); a lower --num_crops shortens them"
    )


def _warn(message: str) -> None:
    """A warning from the first process only: every rank reaches the same findings."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        logger.warning(message)


# -- preference pairs ----------------------------------------------------------------------


def validate_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    num_crops: int,
    max_length: int | None = None,
    decode_images: bool = False,
    skip_bad: bool = False,
    what: str = "the pairs",
    training: bool = False,
    progress: bool = False,
) -> list[PreferencePair]:
    """`validate` for pairs: the reading problems, images, tags, duplicate ids,
    and pairs whose prompt + chosen + rejected (one row of the shared-prefix forward) is longer
    than `max_length` (never cut: reported with its image tokens at this --num_crops, or dropped
    with --skip_bad_examples). Returns the usable pairs, each conversation with its measured
    length (`conversation.tokens`, the pair's) for length grouping."""
    by_conversation = {id(pair.conversation): pair for pair in pairs}

    def measure(conversation: Conversation, counts: list[int]) -> int:
        return pair_length(by_conversation[id(conversation)], tokenizer, counts)

    conversations = Conversations([pair.conversation for pair in pairs], getattr(pairs, "problems", []),
                                  count_problems=getattr(pairs, "count_problems", True))
    good = validate(conversations, tokenizer, num_crops, max_length=max_length, decode_images=decode_images,
                    skip_bad=skip_bad, what=what, training=training, progress=progress, measure=measure)
    return [by_conversation[id(conversation)] for conversation in good]
