"""Preference pairs from the layouts users have (checked before the first step by
`recipe.validation.validate_pairs`).

Three layouts, one reader each, all giving `recipe.records.PreferencePair`s (a conversation whose
last turn holds the prompt and the chosen answer, plus the rejected answer):

- our jsonl (`--train_file/--eval_file`, image paths relative to `--image_dir`), one pair a line:

      {"id": "p1", "conversations": [{"images": ["a.jpg"], "user": "What colour is the square?"}],
       "chosen": "Red.", "rejected": "Blue."}

  Earlier turns (complete with "assistant") may come before the last one, which has no
  "assistant": its answers are "chosen" and "rejected".
- RLAIF-V hub rows (`openbmb/RLAIF-V-Dataset`): image, question, chosen, rejected.
- TRL's preference layout (e.g. `trl-lib/rlaif-v`): `prompt`, `chosen`, `rejected` as message lists
  (or plain strings) and `images`; `{"type": "image"}` entries mark where each image goes.

Problems of a pair itself (a missing or non-string answer, chosen == rejected) are found while
reading, with file:line or "train row N", and travel with the pairs (`recipe.records.Conversations`)
so that `validate_pairs` reports them together with what `recipe.validation.validate` finds
(images, tags, length) in one error, or drops them all with --skip_bad_examples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .errors import DataError
from .layouts import parse_record, read_records, resolve_image_path
from .records import Conversation, Conversations, PreferencePair, Problem, Turn

__all__ = [
    "read_pairs_jsonl",
    "load_pairs_jsonl",
    "rlaif_v_pairs",
    "trl_pairs",
    "from_rlaif_v",
    "from_trl",
]


def _answer_problems(obj: dict, where: str) -> list[Problem]:
    found = []
    for key in ("chosen", "rejected"):
        if key not in obj or obj[key] is None:
            found.append(Problem(where, f"missing '{key}' (the {key} answer to the last turn)", "missing answer"))
        elif not isinstance(obj[key], str):
            found.append(Problem(where, f"'{key}' must be a string, got {type(obj[key]).__name__}", "wrong type"))
        elif not obj[key].strip():
            found.append(Problem(where, f"'{key}' is empty", "empty answer"))
    if not found and obj["chosen"].strip() == obj["rejected"].strip():
        found.append(Problem(where, "chosen == rejected: the pair prefers nothing; drop it or fix one answer",
                             "chosen == rejected"))
    return found


# -- our jsonl -------------------------------------------------------------------------------


def _parse_pair(obj: Any, where: str, image_dir: Path) -> tuple[PreferencePair | None, list[Problem]]:
    if not isinstance(obj, dict):
        return None, [Problem(where, f"expected a JSON object, got {type(obj).__name__}", "not an object")]
    found = _answer_problems(obj, where)
    turns = obj.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[-1], dict):
        if "assistant" in turns[-1]:
            found.append(Problem(where, f"conversations[{len(turns) - 1}] (the last turn) has an 'assistant'; its "
                                        "answers are 'chosen' and 'rejected' instead", "unknown key"))
        # The last turn completed with the chosen answer is an ordinary conversation: the
        # jsonl parser of the SFT layout checks it (keys, types, image paths).
        obj = {**obj, "conversations": [*turns[:-1], {**turns[-1], "assistant": obj.get("chosen") or ""}]}
    conversation, more = parse_record(obj, where, lambda p: resolve_image_path(p, image_dir))
    found += more
    if found:
        return None, found
    return PreferencePair(conversation=conversation, rejected=obj["rejected"]), []


def read_pairs_jsonl(path: str | Path, image_dir: str | Path) -> tuple[list[PreferencePair], list[Problem]]:
    """Pairs of a JSON lines file (or one JSON list, as the SFT files may be) and the problems of
    its bad records (file:line each, all of them)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path")
    pairs, problems, count = [], [], 0
    for where, obj in read_records(path):
        count += 1
        if isinstance(obj, json.JSONDecodeError):
            problems.append(Problem(where, f"invalid JSON ({obj.msg} at column {obj.colno})", "invalid JSON"))
            continue
        pair, found = _parse_pair(obj, where, Path(image_dir))
        problems += found
        if pair is not None:
            pairs.append(pair)
    if not count:
        raise DataError(f"{path} has no pairs (the file is empty); it needs one JSON pair per line (see the README's "
                        "'Preference tuning')")
    return pairs, problems


def load_pairs_jsonl(path: str | Path, image_dir: str | Path) -> Conversations:
    """The pairs of a file, its bad lines' problems attached for `validate_pairs` to report."""
    pairs, problems = read_pairs_jsonl(path, image_dir)
    return Conversations(pairs, problems)


# -- hub rows --------------------------------------------------------------------------------


def from_rlaif_v(row: dict, index: int, split: str = "train", image: Any = None) -> PreferencePair:
    """An RLAIF-V row: one image, a question, the chosen and the rejected answer."""
    where = f"{split} row {index}"
    conversation = Conversation(
        id=str(row.get("idx", f"{split}-{index}")) if row.get("idx") is not None else f"{split}-{index}",
        turns=[Turn(user=row["question"], assistant=row["chosen"],
                    images=[image if image is not None else row["image"]])],
        source=row.get("ds_name") or "rlaif_v",
        where=where,
    )
    return PreferencePair(conversation=conversation, rejected=row["rejected"])


def _rows(dataset, columns: Sequence[str], schema: str):
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(f"the dataset has columns {dataset.column_names} but not {missing}; {schema} needs "
                        f"{list(columns)} (see --dataset_name_or_path)")


def _collect(rows, convert, split: str, answer_problems=None, errors=(ValueError,), layout: str = "") -> Conversations:
    """`convert(row, i)` of each row whose answers pass `answer_problems`; a row that `convert`
    refuses with one of `errors` is a problem named `split row i` (prefixed with `layout`)."""
    answer_problems = answer_problems or _answer_problems
    pairs, problems = [], []
    for i, row in enumerate(rows):
        where = f"{split} row {i}"
        found = answer_problems(row, where)
        if not found:
            try:
                pairs.append(convert(row, i))
            except errors as err:
                found = [Problem(where, f"{layout}{err}", "wrong layout")]
        problems += found
    return Conversations(pairs, problems)


def rlaif_v_pairs(dataset, split: str) -> Conversations:
    """Pairs of RLAIF-V rows. A `datasets.Dataset` keeps its images in the Arrow file (decoded
    when used); rows of a streamed dataset (an iterable of dicts, see `recipe.hub.undecoded_stream`)
    keep theirs as encoded bytes (`recipe.hub.EncodedImage`), decoded when used too."""
    from .hub import encoded_images, lazy_images

    if hasattr(dataset, "column_names") and hasattr(dataset, "features") and hasattr(dataset, "__len__"):
        _rows(dataset, ("image", "question", "chosen", "rejected"), "RLAIF-V")
        images = lazy_images(dataset, "image")
        rows = dataset.remove_columns(["image"])
        return _collect(rows, lambda row, i: from_rlaif_v(row, i, split, image=images[i][0]), split)
    return _collect(dataset, lambda row, i: from_rlaif_v(
        row, i, split, image=encoded_images(row.get("image"), "image", f"{split} row {i}")), split)


def _text_and_images(content: Any, first: int) -> tuple[str, int]:
    """A message's text with `<|image_k|>` tags (numbered from `first`) where its image entries are."""
    # (imported here: the phi3v package loads torch, which a task script's --help must not wait for)
    from phi3v.processing_phi3v import image_tag

    if isinstance(content, str):
        return content, 0
    text, count = "", 0
    for part in content:
        kind = part.get("type")
        if kind == "image":
            text += f"{image_tag(first + count)}\n"
            count += 1
        elif kind == "text":
            text += part.get("text") or ""
        else:
            raise ValueError(f"message part of type {kind!r}: only 'text' and 'image' parts are supported")
    return text, count


def from_trl(row: dict, index: int, split: str = "train", images: list | None = None) -> PreferencePair:
    """A TRL preference row: `prompt` (messages ending with a user turn, or a string), `chosen` and
    `rejected` (one assistant message each, or strings), `images` in the order of the image parts."""
    images = list(images if images is not None else row.get("images") or [])
    prompt = row["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    turns: list[Turn] = []
    used = 0
    for m, message in enumerate(messages):
        role = message.get("role")
        if role == "user":
            text, count = _text_and_images(message["content"], used + 1)
            turns.append(Turn(user=text, assistant="", images=images[used : used + count]))
            used += count
        elif role == "assistant" and turns and not turns[-1].assistant:
            turns[-1].assistant, _ = _text_and_images(message["content"], used + 1)
        else:
            raise ValueError(f"prompt message {m} has role {role!r}; expected alternating user/assistant messages "
                             "(system messages are not supported: put the instruction in the first user message)")
    if not turns or turns[-1].assistant:
        raise ValueError("the prompt must end with a user message")
    if used != len(images):
        raise ValueError(f"the prompt has {used} image part(s) but the row has {len(images)} image(s)")

    def answer(value) -> str:
        if isinstance(value, str):
            return value
        if len(value) != 1 or value[0].get("role") != "assistant":
            raise ValueError("chosen/rejected must be one assistant message (or a string)")
        return _text_and_images(value[0]["content"], 1)[0]

    turns[-1].assistant = answer(row["chosen"])
    conversation = Conversation(id=f"{split}-{index}", turns=turns, source="trl", where=f"{split} row {index}")
    return PreferencePair(conversation=conversation, rejected=answer(row["rejected"]))


def _trl_answer_problems(row: dict, where: str) -> list[Problem]:
    """`_answer_problems` on the answers' texts (TRL rows hold message lists)."""
    def text(value):
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
            content = value[0].get("content")
            if isinstance(content, list):
                return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
            return content
        return value

    return _answer_problems({k: text(row.get(k)) for k in ("chosen", "rejected") if k in row}, where)


def trl_pairs(dataset, split: str) -> Conversations:
    """Pairs of TRL preference rows (`prompt`, `chosen`, `rejected`, optional `images`); images as
    in `rlaif_v_pairs`."""
    from .hub import encoded_images, lazy_images

    if hasattr(dataset, "column_names") and hasattr(dataset, "__len__"):
        _rows(dataset, ("prompt", "chosen", "rejected"), "TRL's preference layout")
        if "images" in dataset.column_names:
            images = lazy_images(dataset, "images")
            dataset = dataset.remove_columns(["images"])
        else:
            images = [[] for _ in range(len(dataset))]
        convert = lambda row, i: from_trl(row, i, split, images=images[i])  # noqa: E731
    else:
        convert = lambda row, i: from_trl(  # noqa: E731
            row, i, split, images=encoded_images(row.get("images") or [], "images", f"{split} row {i}"))
    return _collect(dataset, convert, split, answer_problems=_trl_answer_problems,
                    errors=(ValueError, KeyError, TypeError, AttributeError), layout="not TRL's preference layout: ")
