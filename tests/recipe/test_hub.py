"""Local copies of hub datasets: single-split copies, parquet/jsonl directories, hub-repo clones."""

import datasets
import pytest
from PIL import Image

import finetune_hf_trainer_docvqa
from recipe.errors import DataError
from recipe.hub import cauldron_conversations, from_cauldron, from_docvqa, load_source, split_for_eval, train_split


def cauldron_rows(n, answer):
    return datasets.Dataset.from_dict({
        "images": [[Image.new("RGB", (24 + i, 20), (10 * i, 0, 0))] for i in range(n)],
        "texts": [[{"user": f"question {i}", "assistant": answer, "source": "test"}] for i in range(n)],
    })


@pytest.fixture
def no_row_iteration(monkeypatch):
    """`"train" in dataset` on a Dataset decodes every row's images (39k pages for DocVQA):
    forbid iterating a dataset that still has its image column (conversations are built from
    the other columns, the images staying in the Arrow file)."""
    iterate = datasets.Dataset.__iter__

    def refuse_with_images(self):
        if {"image", "images"} & set(self.column_names):
            raise AssertionError("a Dataset was iterated row by row, images included")
        return iterate(self)
    monkeypatch.setattr(datasets.Dataset, "__iter__", refuse_with_images)


def test_single_split_copy_is_its_own_train_split(tmp_path, no_row_iteration):
    cauldron_rows(3, "yes").save_to_disk(tmp_path / "docvqa")
    source = load_source(str(tmp_path / "docvqa"), "docvqa")
    assert isinstance(source, datasets.Dataset) and train_split(source) is source
    assert len(train_split(datasets.DatasetDict({"train": source}))) == 3
    with pytest.raises(DataError, match="expected 'train'"):
        train_split(datasets.DatasetDict({"validation": source}))


def test_docvqa_full_train_from_a_local_single_split_copy(tmp_path, no_row_iteration):
    mini = {"id": ["q0", "q1"], "image": [Image.new("RGB", (30, 30))] * 2,
            "query": [{"en": "What?"}] * 2, "answers": [["a"], ["b"]]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(mini),
                          "test": datasets.Dataset.from_dict(mini)}).save_to_disk(tmp_path / "mini")
    cauldron_rows(4, "an answer").save_to_disk(tmp_path / "cauldron_docvqa")
    args = finetune_hf_trainer_docvqa.DocVQAArguments(
        dataset_name_or_path=str(tmp_path / "mini"), full_train=True,
        full_train_dataset=str(tmp_path / "cauldron_docvqa"))
    train, eval_ = finetune_hf_trainer_docvqa.load_data(args, None)
    assert [c.answer for c in train] == ["an answer"] * 4 and len(eval_) == 2
    assert [c.turns[0].user for c in train] == [f"question {i}" for i in range(4)]


def test_parquet_directory_loads_with_a_subset_name(tmp_path):
    (tmp_path / "memes").mkdir()
    cauldron_rows(5, "no").to_parquet(tmp_path / "memes" / "train-00000-of-00001.parquet")
    source = load_source(str(tmp_path / "memes"), "hateful_memes")  # no builder-config error
    train, eval_ = split_for_eval(source, "test", eval_size=2, seed=0)
    assert (len(train), len(eval_)) == (3, 2)
    conversations = cauldron_conversations(eval_, "eval", "hateful_memes")
    assert conversations[0].answer == "no" and conversations[0].images[0].open().size[1] == 20


def test_hub_repository_clone_picks_the_subset_directory(tmp_path):
    for subset, answer in (("hateful_memes", "no"), ("nlvr2", "True")):
        (tmp_path / "the_cauldron" / subset).mkdir(parents=True)
        cauldron_rows(3, answer).to_parquet(tmp_path / "the_cauldron" / subset / "train-00000-of-00001.parquet")
    source = load_source(str(tmp_path / "the_cauldron"), "nlvr2")
    assert train_split(source)[0]["texts"][0]["assistant"] == "True"


def test_jsonl_directory_loads_with_a_subset_name(tmp_path):
    (tmp_path / "rows").mkdir()
    datasets.Dataset.from_dict({"texts": [[{"user": "q", "assistant": "a"}]] * 3}).to_json(
        tmp_path / "rows" / "train.jsonl")
    assert len(train_split(load_source(str(tmp_path / "rows"), "hateful_memes"))) == 3


def test_a_copy_in_another_schema_is_named(tmp_path):
    rows = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "question": ["q"]})
    with pytest.raises(DataError, match=r"not \['images', 'texts'\]; it needs the_cauldron's columns"):
        cauldron_conversations(rows, "train", "nlvr2")
    with pytest.raises(DataError, match="smaller --eval_size"):
        split_for_eval(rows, "test", eval_size=1, seed=0)


def test_hub_row_adapters():
    img = Image.new("RGB", (336, 336))
    cauldron = from_cauldron({"images": [img], "texts": [{"user": "q1", "assistant": "a1", "source": "x"},
                                                         {"user": "q2", "assistant": "a2", "source": "x"}]}, 3)
    assert [t.images for t in cauldron.turns] == [[img], []] and cauldron.answer == "a2"
    docvqa = from_docvqa({"image": img, "query": {"en": "Total?"}, "answers": ["12", "twelve"]}, 0)
    assert docvqa.turns[0].user == "Total?" and docvqa.answer == "12" and docvqa.references == ["12", "twelve"]
