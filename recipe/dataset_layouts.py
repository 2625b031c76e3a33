"""The layouts' records as rows of a Hugging Face `datasets.Dataset` (--dataset_name_or_path of the
own-data script): the layout is told by the columns, each row is read by the layout's reader
(`recipe.layouts.read_record`), and the images stay in the Arrow file (`recipe.hub.DatasetImage`)
until used. Problems are reported as "split row N"."""

from __future__ import annotations

import logging
from typing import Any, Callable

from .errors import DataError
from .layouts import LAYOUT_KEYS, read_record
from .records import Conversations

__all__ = ["dataset_layout", "dataset_conversations"]

logger = logging.getLogger("recipe")


def dataset_layout(dataset, data_format: str = "auto") -> str:
    columns = set(dataset.column_names)
    if data_format != "auto":
        layout = data_format
    elif "messages" in columns:
        layout = "messages"
    elif {"texts", "images"} <= columns:
        layout = "cauldron"
    elif "conversations" in columns:
        layout = "llava"
    else:
        raise DataError(f"the dataset has columns {sorted(columns)}, which match no layout; it needs 'messages' "
                        "(and 'images') or the_cauldron's 'texts' and 'images' (see --data_format)")
    if layout == "ours":
        raise DataError("our layout names image files per turn: give it as --train_file/--eval_file, not as a dataset")
    missing = [k for k in LAYOUT_KEYS[layout] if k not in columns]
    if missing:
        raise DataError(f"the dataset has columns {sorted(columns)} but not {missing[0]!r} of the {layout} layout")
    return layout


def dataset_conversations(dataset, split: str, data_format: str = "auto") -> Conversations:
    """Conversations of a `datasets.Dataset` whose rows are records of a layout; the images stay
    in the Arrow file (`recipe.hub.DatasetImage`) and are decoded only when used."""
    import datasets

    from .hub import lazy_images

    layout = dataset_layout(dataset, data_format)
    logger.info("%s split: %s layout (%d rows)", split, layout, len(dataset))
    image_column = next((c for c in ("images", "image") if c in dataset.column_names), None)
    if image_column and _holds_paths(dataset.features[image_column]):
        # datasets would open them relative to the working directory, absolute or `..` alike.
        raise DataError(f"{split} split: the {image_column!r} column holds file paths, not images; give the records "
                        "as --train_file/--eval_file (paths relative to --image_dir), or store the images in the "
                        "dataset (datasets.Image)")
    images = lazy_images(dataset, image_column) if image_column else [[] for _ in range(len(dataset))]
    if image_column and isinstance(dataset.features[image_column], datasets.Image):
        # One image per row: a text-only row holds null there, and no image.
        images = [refs if present else [] for refs, present in zip(images, _present(dataset, image_column))]
    rows = dataset.remove_columns([image_column]) if image_column else dataset
    # Under the key the layout's reader takes (LLaVA reads "image" too; the others "images" only).
    key = image_column if layout == "llava" and image_column else "images"
    conversations, problems = [], []
    for i, row in enumerate(rows):
        row = {**row, key: [None] * len(images[i])}
        conversation, found = read_record(layout, _drop_nulls(row), f"{split} row {i}", _column_images(images[i]))
        problems += found
        if conversation is not None:
            conversations.append(conversation)
    return Conversations(conversations, problems)


def _present(dataset, column: str) -> list[bool]:
    """Per row, whether `column` is not null (read from Arrow, no image decoded)."""
    import pyarrow.compute as pc

    arrow = dataset.select_columns([column]).with_format("arrow")
    present: list[bool] = []
    for start in range(0, len(dataset), 10_000):
        present += pc.is_valid(arrow[start : start + 10_000][column]).to_pylist()
    return present


def _column_images(refs: list) -> Callable[[Any], Any]:
    """The reader's `resolve` for a dataset row: the row's image references, in order. An image
    the row names itself (a typed part's file) has none: a dataset's images are in its column."""
    remaining = iter(refs)

    def resolve(value: Any) -> Any:
        ref = next(remaining, None)
        if ref is None:
            raise ValueError(f"image {value!r} is named by the row; a dataset's images go in its image column "
                             "(datasets.Image), or give the records as --train_file/--eval_file")
        return ref

    return resolve


def _holds_paths(feature) -> bool:
    """Whether an image column (one per row, or a list) is strings rather than `datasets.Image`."""
    import datasets

    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", feature)
    return isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")


def _drop_nulls(value: Any) -> Any:
    """Arrow gives every struct every field (an image part gets "text": None): drop the Nones."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None or k in ("images", "image")}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value
