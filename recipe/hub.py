"""Hub datasets, or local copies of them in the same schema.

`--dataset_name_or_path` takes a hub id (as the original recipe, which needs network) or a
local path holding the same columns: a directory written by `Dataset(Dict).save_to_disk`, or
data files / a directory that `datasets.load_dataset` reads (parquet, jsonl, arrow). A GPU node
without network uses the second form after `load_dataset(...).save_to_disk(DIR)` elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from .errors import DataError
from .records import Conversation, Turn

__all__ = [
    "load_source",
    "train_split",
    "split_for_eval",
    "cauldron_conversations",
    "docvqa_conversations",
    "from_cauldron",
    "from_docvqa",
    "DatasetImage",
    "lazy_images",
    "EncodedImage",
    "undecoded_stream",
    "encoded_images",
]


def load_source(name_or_path: str, config: str | None = None):
    """A DatasetDict (or Dataset) from a hub id or a local path; clear errors when unreachable.

    `config` names a subset of a hub dataset (the_cauldron's "docvqa"). A local directory holds
    one subset already, unless it is a clone of the hub repository, which keeps each subset in
    a directory of its name; data files have no subsets at all.
    """
    import datasets

    path = Path(name_or_path)
    if path.exists():
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            return datasets.load_from_disk(str(path))
        if path.is_dir():
            return datasets.load_dataset(str(path / config if config and (path / config).is_dir() else path))
        return datasets.load_dataset(path.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(path))
    try:
        return datasets.load_dataset(name_or_path, config)
    except Exception as err:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise DataError(
            f"cannot load dataset {name_or_path!r}{f' ({config})' if config else ''} from the hub ({err}); "
            "without network, save it elsewhere with `datasets.load_dataset(...).save_to_disk(DIR)`, copy DIR "
            "here and pass --dataset_name_or_path DIR"
        ) from err


def train_split(source):
    """The "train" split of a source that may be a DatasetDict or already one Dataset."""
    import datasets

    if not isinstance(source, datasets.DatasetDict):
        return source
    if "train" not in source:
        raise DataError(f"dataset has splits {list(source)}; expected 'train'")
    return source["train"]


def split_for_eval(dataset, eval_split: str | None, eval_size: int, seed: int):
    """(train, eval) Datasets: the named split when the source has it, else a seeded holdout.

    the_cauldron subsets ship a single "train" split, so evaluation needs a fixed holdout
    (the same examples on every run and every rank, never trained on).
    """
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if eval_split and eval_split in dataset:
            return dataset.get("train"), dataset[eval_split]
        dataset = train_split(dataset)
    if eval_size >= len(dataset):
        raise DataError(f"--eval_size {eval_size} leaves no training examples out of {len(dataset)}; "
                        f"pass a smaller --eval_size")
    parts = dataset.train_test_split(test_size=eval_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _require_columns(dataset, columns: Sequence[str], schema: str) -> None:
    """A local copy in another schema (or without a training split) fails here, by name, not later
    as a KeyError or AttributeError."""
    if dataset is None:
        raise DataError("the dataset has no 'train' split to train on (see --dataset_name_or_path; "
                        "--eval_only evaluates a copy without one)")
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"the dataset has columns {dataset.column_names} but not {missing}; it needs {schema}'s columns "
            f"{list(columns)} (see --dataset_name_or_path)"
        )


def cauldron_conversations(dataset, split: str, source: str):
    """Conversations of a the_cauldron subset (`images`, `texts`); images stay in the Arrow file."""
    _require_columns(dataset, ("images", "texts"), "the_cauldron")
    images = lazy_images(dataset, "images")
    rows = dataset.remove_columns(["images"])
    return [from_cauldron(row, i, split, source=source, images=images[i]) for i, row in enumerate(rows)]


def docvqa_conversations(dataset, split: str):
    """Conversations of docvqa_1200_examples rows (`image`, `query`, `answers`), every answer kept."""
    _require_columns(dataset, ("image", "query", "answers"), "docvqa_1200_examples")
    images = lazy_images(dataset, "image")
    rows = dataset.select_columns([c for c in ("id", "query", "answers") if c in dataset.column_names])
    return [from_docvqa(row, i, split, image=images[i][0]) for i, row in enumerate(rows)]


# -- rows -> conversations -----------------------------------------------------------------


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


# -- images in Arrow files -----------------------------------------------------------------


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
        return _open_undecoded(value)

    def __str__(self) -> str:
        where = f"{self.column}[{self.position}]" if self.position is not None else self.column
        return f"{where} of row {self.row}"


def _open_undecoded(value: dict) -> Image.Image:
    """An `Image(decode=False)` value ({"bytes", "path"}) opened lazily."""
    if value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])


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


# -- images of streamed rows -----------------------------------------------------------------


@dataclass(frozen=True)
class EncodedImage:
    """A streamed row's image kept as its encoded file bytes, decoded only when used.

    A streamed dataset has no Arrow file for a `DatasetImage` to point into, and its rows
    decoded hold every image as pixels: 20k RLAIF-V pairs are ~18 GB of RGB per rank, their
    JPEG/PNG bytes about a tenth of that. `where` names it in errors ("image of train row 3").
    """

    data: bytes = field(repr=False)
    where: str

    def open(self) -> Image.Image:
        return _open_undecoded({"bytes": self.data})

    @functools.cached_property
    def digest(self) -> str:
        """A hash of the bytes (the validation cache's key: ~1 ms per 100 kB image)."""
        return hashlib.blake2b(self.data, digest_size=16).hexdigest()

    def __str__(self) -> str:
        return self.where


def undecoded_stream(stream):
    """`stream` (a `datasets.IterableDataset`) with its image columns (one image or a list)
    cast to `Image(decode=False)`: rows carry the encoded bytes, for `encoded_images`."""
    import datasets

    for name, feature in (stream.features or {}).items():
        if isinstance(feature, datasets.Image):
            stream = stream.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):  # a list of images
            stream = stream.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return stream


def encoded_images(value: Any, column: str, row: str) -> Any:
    """A streamed row's undecoded image value(s) of `column` as `EncodedImage`s named after
    `row` ("train row 3"); a file path stays a path, anything else (a PIL image, None) as it is."""
    if isinstance(value, list):
        return [_encoded(v, f"{column}[{k}] of {row}") for k, v in enumerate(value)]
    return _encoded(value, f"{column} of {row}")


def _encoded(value: Any, where: str) -> Any:
    if isinstance(value, dict) and value.get("bytes"):
        return EncodedImage(value["bytes"], where)
    if isinstance(value, dict) and value.get("path"):
        return value["path"]
    return value
