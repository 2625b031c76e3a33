"""Hub datasets, or local copies of them in the same schema.

`--dataset_name_or_path` takes a hub id (as the original recipe, which needs network) or a
local path holding the same columns: a directory written by `Dataset(Dict).save_to_disk`, or
data files / a directory that `datasets.load_dataset` reads (parquet, jsonl, arrow). A GPU node
without network uses the second form after `load_dataset(...).save_to_disk(DIR)` elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError

__all__ = ["load_source", "train_split", "split_for_eval", "cauldron_conversations", "docvqa_conversations"]


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
        raise DataError(f"--eval_size {eval_size} leaves no training examples out of {len(dataset)}")
    parts = dataset.train_test_split(test_size=eval_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def cauldron_conversations(dataset, split: str, source: str):
    """Conversations of a the_cauldron subset (`images`, `texts`); images stay in the Arrow file."""
    from .data import from_cauldron, lazy_images

    images = lazy_images(dataset, "images")
    rows = dataset.remove_columns(["images"])
    return [from_cauldron(row, i, split, source=source, images=images[i]) for i, row in enumerate(rows)]


def docvqa_conversations(dataset, split: str):
    """Conversations of docvqa_1200_examples rows (`image`, `query`, `answers`), every answer kept."""
    from .data import from_docvqa, lazy_images

    images = lazy_images(dataset, "image")
    rows = dataset.select_columns([c for c in ("id", "query", "answers") if c in dataset.column_names])
    return [from_docvqa(row, i, split, image=images[i][0]) for i, row in enumerate(rows)]
