"""The layouts users already have, read into the recipes' conversations (and written back as ours).

One reader per layout; the layout is detected from the first record (or forced with
--data_format) and logged in one line. Files are JSON lines or one JSON list, either extension.

    ours      {"id", "system"?, "conversations": [{"images": [...], "user", "assistant"}]}
    llava     {"id", "image": "a.jpg" | [...], "conversations": [{"from": "human"|"gpt"|"system", "value"}]}
    messages  {"messages": [{"role": "system"|"user"|"assistant", "content": str | [parts]}], "images": [...]}
              (or OpenAI's image parts naming their file: {"type": "image_url", "image_url": {"url": "a.jpg"}})
    cauldron  {"images": [...], "texts": [{"user", "assistant"}]}

The one rule for images (every layout but ours, whose turns carry their own images and may
place `<|image_k|>` tags themselves): the record's images are taken in order by the `<image>`
placeholders of the user texts, wherever they stand (mid-turn, a later turn); placeholder k
becomes `<|image_k|>`, numbered across the conversation, and its image belongs to that turn.
Typed content (`[{"type": "image"}, {"type": "text", "text": ...}]`) is the same text with each
image part written `<image>` and the parts joined by a newline, so `[image, text]` gives exactly
`"<image>\\n" + text`. A record without any placeholder puts all its images before the first
user text, as ours does (one `<|image_k|>\\n` per image). A system message goes first, through
the release's chat template (`<|system|>\\n...<|end|>\\n`).

Ours, the documented layout (one example per line; image paths relative to the image directory):

    {"id": "v_ApplyEyeMakeup_g01_c01", "source": "ucf101",
     "conversations": [{"images": ["train/ApplyEyeMakeup/v_..._0.jpg", ...],
                        "user": "Classify the video into one of the following classes: ...",
                        "assistant": "ApplyEyeMakeup"}]}

An optional top-level "system" string is a system message, rendered first as the release's chat
template does. A turn whose user text has no `<|image_k|>` tags gets one `<|image_k|>\\n` per
image put in front of its text (numbered across the conversation); a turn that places its own
tags must use exactly the numbers of its images, in order (see
`recipe.tokenization.build_messages`).

The same records as rows of a `datasets.Dataset` are read by `recipe.dataset_layouts`.

Every problem is reported with file:line (or "split row N") before training: placeholder count
!= image count, unknown role, turns not alternating user/assistant, a missing assistant answer,
an empty text, unsafe image paths; missing or unreadable images and tag checks follow in
`recipe.validation`.

Convert to ours (to inspect or edit): `python -m recipe.layouts --to ours FILE [--out OUT.jsonl]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import DataError, cli
from .records import MAX_PROBLEMS_SHOWN, Conversation, Conversations, Problem, Turn, problems_error

__all__ = [
    "LAYOUTS",
    "PLACEHOLDER",
    "parse_record",
    "resolve_image_path",
    "load_jsonl",
    "detect_layout",
    "read_records",
    "read_file",
    "load_file",
    "to_ours",
    "main",
]

logger = logging.getLogger("recipe")

PLACEHOLDER = "<image>"
# The keys that identify each layout, in detection order (a messages record may also carry
# "images", a LLaVA record "id").
LAYOUT_KEYS = {
    "ours": ("conversations",),  # with turns of {user, assistant}
    "llava": ("conversations",),  # with turns of {from, value}
    "messages": ("messages",),
    "cauldron": ("texts", "images"),
}
LAYOUTS = tuple(LAYOUT_KEYS)
# What a layout's record may hold besides its identifying keys (for the "closest layout" message).
_LAYOUT_ALL_KEYS = {
    "ours": {"id", "source", "system", "conversations"},
    "llava": {"id", "image", "images", "conversations"},
    "messages": {"id", "messages", "images"},
    "cauldron": {"images", "texts"},
}
ROLES = {
    "llava": {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"},
    "messages": {"user": "user", "assistant": "assistant", "system": "system"},
}


# -- detection ---------------------------------------------------------------------------------


def detect_layout(record: Any, where: str) -> str:
    """The layout of one record; a DataError naming the closest layout and the key it lacks."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object per record, got {type(record).__name__}")
    turns = record.get("conversations")
    if isinstance(turns, list):
        first = turns[0] if turns and isinstance(turns[0], dict) else {}
        return "llava" if ("from" in first or "value" in first) else "ours"
    if "conversations" in record:
        raise DataError(f"{where}: 'conversations' must be a list of turns (ours: {{user, assistant}}, LLaVA: "
                        f"{{from, value}}), got {type(turns).__name__}")
    if "messages" in record:
        return "messages"
    if "texts" in record:
        return "cauldron"
    closest = max(LAYOUTS, key=lambda name: len(_LAYOUT_ALL_KEYS[name] & set(record)))
    lacks = next(k for k in LAYOUT_KEYS[closest] if k not in record)
    raise DataError(
        f"{where}: the record (keys {sorted(record)}) matches no layout; closest is {closest}, which needs the "
        f"key {lacks!r} (layouts: {', '.join(LAYOUTS)}; see the README's 'Your own data')"
    )


# -- our layout ------------------------------------------------------------------------------


_TURN_KEYS = {"images", "user", "assistant"}


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


# -- the one rule: messages -> turns ---------------------------------------------------------


def join_parts(parts: Any, at: str) -> tuple[str, list[str], list[str]]:
    """Typed content as text: image parts written `<image>`, parts joined by a newline.
    Returns (text, the paths image parts name themselves (OpenAI's image_url), problems);
    `at` names the content in problems (`messages[2].content`)."""
    if isinstance(parts, str):
        return parts, [], []
    if not isinstance(parts, list):
        return "", [], [f"{at} must be a string or a list of typed parts, got {type(parts).__name__}"]
    pieces, inline, problems = [], [], []
    for p, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in ("image", "image_url"):
            named = next((v for v in (part.get(k) for k in ("image", "path", "url", "image_url")) if v), None)
            named = named.get("url") if isinstance(named, dict) else named
            if named is not None:
                if not isinstance(named, str) or named.startswith(("http://", "https://", "data:")):
                    problems.append(f"{at}[{p}] names its image by a URL or object; give a file path "
                                    "(relative to --image_dir)")
                inline.append(named)
            pieces.append(PLACEHOLDER)
        else:
            problems.append(f"{at}[{p}] must be {{'type': 'text', 'text': str}} or {{'type': 'image'}}")
    return "\n".join(pieces), inline, problems


def build_conversation(
    record_id: str, where: str, messages: Sequence[tuple[str, str]], images: list, source: str = "",
    key: str = "messages", name: Callable[[int], str] | None = None,
) -> tuple[Conversation | None, list[Problem]]:
    """(role, text) messages and the record's images -> a Conversation (see the module docstring).
    `key` names the messages in problems (`conversations[3]`); `name(m)`, when the record does not
    hold them as a list (the_cauldron's `texts[1].user`)."""
    # (imported here: the phi3v package loads torch, which a task script's --help must not wait for)
    from phi3v.processing_phi3v import image_tag

    name = name or (lambda m: f"{key}[{m}]")
    problems: list[tuple[str, str]] = []  # (message, reason for the skip summary)
    system, offset = "", 0
    if messages and messages[0][0] == "system":
        system, messages, offset = messages[0][1], messages[1:], 1
        if not system.strip():
            problems.append((f"{name(0)} (system) has an empty text", "empty text"))
        if PLACEHOLDER in system:
            problems.append((f"{name(0)} (system) holds an <image> placeholder; put it in a user message",
                             "placeholder count"))
    if not messages:
        problems.append(("no user/assistant messages", "missing answer"))
    in_order = True
    for m, (role, text) in enumerate(messages):
        at, expected = name(m + offset), "user" if m % 2 == 0 else "assistant"
        if role == "system":
            problems.append((f"{at} is a system message; only the first message may be one", "turn order"))
            in_order = False
        elif role != expected and in_order:
            problems.append((f"{at} is a {role} message where the {expected}'s belongs: turns must alternate "
                             "user, assistant, starting with user", "turn order"))
            in_order = False
        if not text.replace(PLACEHOLDER, "").strip() and not (role == "user" and PLACEHOLDER in text):
            problems.append((f"{at} ({role}) has an empty text", "empty text"))
        if role == "assistant" and PLACEHOLDER in text:
            problems.append((f"{at} (assistant) holds an <image> placeholder; images go in user messages",
                             "placeholder count"))
    if messages and len(messages) % 2 == 1 and not problems:
        problems.append((f"the last user message ({name(len(messages) - 1 + offset)}) has no assistant answer",
                         "missing answer"))
    placeholders = sum(text.count(PLACEHOLDER) for role, text in messages if role == "user")
    if placeholders and placeholders != len(images):
        problems.append((f"{placeholders} <image> placeholder(s) but {len(images)} image(s); give one placeholder "
                         "per image (or none: all images then go before the first user text)", "placeholder count"))
    if problems:
        return None, [Problem(where, message, reason) for message, reason in problems]
    turns, used = [], 0
    for m in range(0, len(messages), 2):
        user = messages[m][1]
        if placeholders:
            count = user.count(PLACEHOLDER)
            for k in range(used + 1, used + count + 1):
                user = user.replace(PLACEHOLDER, image_tag(k), 1)
            turn_images, used = images[used:used + count], used + count
        else:
            turn_images = images if m == 0 else []
        turns.append(Turn(user=user, assistant=messages[m + 1][1], images=list(turn_images)))
    return Conversation(id=record_id, turns=turns, source=source, where=where, system=system), []


# -- readers: one record of each layout -> a Conversation ---------------------------------------


def _record_id(record: dict, where: str) -> str | None:
    value = record.get("id", where)
    return None if isinstance(value, bool) or not isinstance(value, (str, int)) else str(value)


def _images(value: Any, key: str, resolve: Callable[[Any], Any]) -> tuple[list, list[tuple[str, str]]]:
    """A record's images (one, or a list), each through `resolve` (path -> Path, or as is)."""
    if value is None:
        return [], []
    items = value if isinstance(value, (list, tuple)) else [value]
    images, problems = [], []
    for item in items:
        try:
            images.append(resolve(item))
        except ValueError as err:
            problems.append((f"{key}: {err}", "unsafe path"))
    return images, problems


def _messages(
    raw: Any, key: str, role_key: str, text_key: str, roles: dict
) -> tuple[list, list, list[tuple[str, str]]]:
    """(role, text) pairs, the image paths typed parts name themselves, and the problems."""
    if not isinstance(raw, list) or not raw:
        return [], [], [(f"{key!r} must be a non-empty list", "wrong type")]
    messages, inline, problems = [], [], []
    for m, message in enumerate(raw):
        at = f"{key}[{m}]"
        if not isinstance(message, dict) or role_key not in message or text_key not in message:
            problems.append((f"{at} must be an object with keys {role_key!r} and {text_key!r}", "wrong type"))
            continue
        role = roles.get(message[role_key])
        if role is None:
            problems.append((f"{at} has unknown role {message[role_key]!r}; expected one of {sorted(roles)}",
                             "unknown role"))
            continue
        text, named, found = join_parts(message[text_key], f"{at}.{text_key}")
        problems += [(problem, "wrong type") for problem in found]
        inline += named
        messages.append((role, text))
    return messages, inline, problems


def read_record(
    layout: str, record: Any, where: str, resolve: Callable[[Any], Any]
) -> tuple[Conversation | None, list[Problem]]:
    """One record of `layout`; `resolve` turns an image entry into a path or image reference."""
    if not isinstance(record, dict):
        return None, [Problem(where, f"expected a JSON object, got {type(record).__name__}", "not an object")]
    missing = [k for k in LAYOUT_KEYS[layout] if k not in record]
    if missing:
        return None, [Problem(where, f"missing key {missing[0]!r} of the {layout} layout (--data_format {layout})",
                              "missing key")]
    if layout == "ours":
        return parse_record(record, where, resolve)
    record_id = _record_id(record, where)
    if record_id is None:
        return None, [Problem(where, "'id' must be a string or integer", "wrong type")]
    if layout == "llava":
        if "image" in record and "images" in record:
            return None, [Problem(where, "give 'image' or 'images', not both", "bad record")]
        image_key = "image" if "image" in record else "images"
        images, problems = _images(record.get(image_key), image_key, resolve)
        key = "conversations"
        messages, _, found = _messages(record[key], key, "from", "value", ROLES["llava"])
    elif layout == "messages":
        images, problems = _images(record.get("images"), "images", resolve)
        key = "messages"
        messages, inline, found = _messages(record[key], key, "role", "content", ROLES["messages"])
        if inline and images:
            found.append(("image parts name their own images and the record has 'images' too; give one or "
                          "the other", "wrong type"))
        elif inline and not any(f[1] == "wrong type" for f in found):
            images, more = _images(inline, "content", resolve)
            problems += more
    else:  # cauldron: texts of {user, assistant} pairs
        images, problems = _images(record.get("images"), "images", resolve)
        key, messages, found = "texts", *_cauldron_messages(record["texts"])
    problems += found
    if problems:
        return None, [Problem(where, message, reason) for message, reason in problems]
    name = (lambda m: f"texts[{m // 2}].{('user', 'assistant')[m % 2]}") if layout == "cauldron" else None
    return build_conversation(record_id, where, messages, images, source=str(record.get("source", "")), key=key,
                              name=name)


def _cauldron_messages(texts: Any) -> tuple[list, list[tuple[str, str]]]:
    """the_cauldron's texts [{user, assistant}] as (role, text) messages, and the problems."""
    if not isinstance(texts, list) or not texts:
        return [], [("'texts' must be a non-empty list of {'user', 'assistant'} objects", "wrong type")]
    messages, problems = [], []
    for t, entry in enumerate(texts):
        for role in ("user", "assistant"):
            value = entry.get(role) if isinstance(entry, dict) else None
            if not isinstance(value, str):
                problems.append((f"texts[{t}].{role} must be a string", "wrong type"))
            messages.append((role, value if isinstance(value, str) else ""))
    return messages, problems


# -- files -----------------------------------------------------------------------------------


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(file:line, record) of a JSON lines file or a file holding one JSON list (the line is where
    the record starts). A line that is not JSON gives (where, JSONDecodeError)."""
    text = path.read_text(encoding="utf-8-sig")  # (a byte order mark, as Windows editors write, is dropped)
    body = text.lstrip()
    if body.startswith("{") and "\n" in body.strip():
        try:
            json.loads(body)
        except json.JSONDecodeError:
            pass  # JSON lines (or bad lines, each reported)
        else:
            raise DataError(f"{path} holds one JSON object over several lines; give one record per line (JSON "
                            "lines) or a JSON list of records")
    if not body.startswith("["):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{path}:{lineno}", err
        return
    decoder, pos = json.JSONDecoder(), len(text) - len(body) + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        where = f"{path}:{text.count(chr(10), 0, pos) + 1}"
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}); the file is one "
                            "JSON list, so it cannot be read past this point") from None
        yield where, record


def read_file(
    path: str | Path, image_dir: str | Path, data_format: str = "auto", allow_absolute: bool = False
) -> tuple[list[Conversation], list[Problem], str]:
    """Conversations of a file in any layout, the problems of its bad records, and the layout."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path")
    resolve = lambda p: _resolve_path(p, image_dir, allow_absolute)  # noqa: E731
    layout = None if data_format == "auto" else data_format
    conversations, problems, count = [], [], 0
    for where, record in read_records(path):
        count += 1
        if isinstance(record, json.JSONDecodeError):
            problems.append(Problem(where, f"invalid JSON ({record.msg} at column {record.colno})", "invalid JSON"))
            continue
        if layout is None:
            layout = detect_layout(record, where)
            logger.info("%s: %s layout (detected from its first record; --data_format forces one)", path, layout)
        conversation, found = read_record(layout, record, where, resolve)
        problems += found
        if conversation is not None:
            conversations.append(conversation)
    if not count:
        raise DataError(f"{path} has no examples (the file is empty); it needs one JSON record per line or one "
                        "JSON list of records (see the README's 'Your own data')")
    return conversations, problems, layout or data_format


def _resolve_path(value: Any, image_dir: str | Path, allow_absolute: bool) -> Path:
    if not isinstance(value, str):
        raise ValueError(f"an image must be a path string, got {type(value).__name__}")
    if allow_absolute and os.path.isabs(value):
        return Path(value)
    try:
        return resolve_image_path(value, image_dir)
    except ValueError as err:
        if "absolute" in str(err):
            raise ValueError(f"{err} (or pass --allow_absolute_image_paths)") from None
        raise


def load_file(path, image_dir, data_format: str = "auto", allow_absolute: bool = False) -> Conversations:
    """`read_file` with the problems riding on the list, for `validate` to report with its own."""
    conversations, problems, _ = read_file(path, image_dir, data_format, allow_absolute)
    return Conversations(conversations, problems)


def load_jsonl(path: str | Path, image_dir: str | Path, defer_errors: bool = False) -> Conversations:
    """A file in our layout (`read_file`), stopping on bad lines (one DataError listing them all),
    or with `defer_errors` letting the problems travel on the returned list, for `validate` to
    report (or, with --skip_bad_examples, to count) along with everything else."""
    conversations, problems, _ = read_file(path, image_dir, "ours")
    if problems and not defer_errors:
        raise problems_error(problems, str(path))
    return Conversations(conversations, problems)


# -- our layout, written -----------------------------------------------------------------------


def to_ours(conversation: Conversation, image_dir: str | Path) -> dict:
    """Our layout's record of a conversation; image paths relative to `image_dir` again. A turn
    whose tags stand where ours would put them anyway (each image's tag and a newline before the
    text) is written without tags."""
    from phi3v.processing_phi3v import IMAGE_TAG_RE, image_tag  # (see build_conversation)

    record: dict[str, Any] = {"id": conversation.id}
    if conversation.source:
        record["source"] = conversation.source
    if conversation.system:
        record["system"] = conversation.system
    turns, first = [], 1
    for turn in conversation.turns:
        numbers = range(first, first + len(turn.images))
        first += len(turn.images)
        default = "".join(f"{image_tag(k)}\n" for k in numbers)
        user = turn.user
        if turn.images and user.startswith(default) and not IMAGE_TAG_RE.search(user[len(default):]):
            user = user[len(default):]
        paths = [_relative(image, image_dir) for image in turn.images]
        turns.append({"images": paths, "user": user, "assistant": turn.assistant})
    record["conversations"] = turns
    return record


def _relative(image: Any, image_dir: str | Path) -> str:
    if not isinstance(image, (str, os.PathLike)):
        raise DataError(f"image {image} is embedded in the data, not a file; our layout names files")
    path = Path(image)
    try:
        return path.relative_to(image_dir).as_posix()
    except ValueError:
        return str(path)  # an absolute path outside the image directory (--allow_absolute_image_paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recipe.layouts",
        description="Writes our jsonl layout from a file in any layout the recipes read (to inspect or edit it).",
    )
    parser.add_argument("files", nargs="+", help="JSON lines or JSON list files (ours, llava, messages, cauldron).")
    parser.add_argument("--to", choices=["ours"], default="ours", help="Layout to write.")
    parser.add_argument("--out", help="Output file (default: stdout); several inputs go into it one after another.")
    parser.add_argument("--data_format", choices=["auto", *LAYOUTS], default="auto", help="Force the input layout.")
    parser.add_argument("--image_dir", help="Directory the image paths are relative to (default: beside each file); "
                                            "the output keeps them relative to it.")
    parser.add_argument("--allow_absolute_image_paths", action="store_true")
    args = parser.parse_args(argv)
    records = []
    for name in args.files:
        image_dir = Path(args.image_dir) if args.image_dir else Path(name).parent
        conversations, problems, layout = read_file(name, image_dir, args.data_format, args.allow_absolute_image_paths)
        if problems:
            raise DataError(f"{len(problems)} problem(s) in {name} (first: {problems[0]}); fix them to convert",
                            details=[str(p) for p in problems[:MAX_PROBLEMS_SHOWN]])
        print(f"{name}: {len(conversations)} records in the {layout} layout", file=sys.stderr)
        records += [to_ours(c, image_dir) for c in conversations]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.out:
        tmp = Path(args.out).with_name(f".{Path(args.out).name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(args.out)  # atomic: a half-written file never stands under the output name
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(cli(lambda: main()))
