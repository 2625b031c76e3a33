"""Tokenized conversations -> dataset items -> batches (recipe.data)."""

import pytest
import torch

from data_samples import image, make_processor
from recipe.data import Collator, ConversationDataset
from recipe.records import Conversation, Turn
from recipe.tokenization import IGNORE_INDEX


@pytest.fixture(scope="module")
def processor():
    return make_processor()


# -- dataset and collator -----------------------------------------------------------------


def make_dataset(processor, tmp_path, counts):
    convs = []
    for i, n in enumerate(counts):
        paths = []
        for j in range(n):
            p = tmp_path / f"{i}_{j}.png"
            image(300 + 100 * j, 336 + 50 * i).save(p)
            paths.append(p)
        convs.append(Conversation(f"r{i}", [Turn(f"question {i}", "answer " * (i + 1), paths)]))
    return ConversationDataset(convs, processor)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_collator_shapes_for_mixed_image_counts(processor, tmp_path, batch_size):
    dataset = make_dataset(processor, tmp_path, [1, 0, 2, 1][:batch_size])
    items = [dataset[i] for i in range(batch_size)]
    assert [len(item["input_ids"]) for item in items] == dataset.lengths  # header-based lengths are exact
    pad = processor.tokenizer.pad_token_id
    batch = Collator(pad_token_id=pad)(items)
    length = max(len(item["input_ids"]) for item in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (batch_size, length)
    n_images = sum(item.get("pixel_values", torch.empty(0)).shape[0] if "pixel_values" in item else 0 for item in items)
    if n_images:
        assert batch["pixel_values"].shape == (n_images, 5, 3, 336, 336)
        assert batch["image_sizes"].shape == (n_images, 2)
    else:
        assert "pixel_values" not in batch
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == pad).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == n
    # Images concatenated in row order: the model consumes them in that order.
    expected_sizes = [s for item in items if "image_sizes" in item for s in item["image_sizes"].tolist()]
    if expected_sizes:
        assert batch["image_sizes"].tolist() == expected_sizes


def test_left_padding_for_generation_and_crop_padding(processor, tmp_path):
    dataset = make_dataset(processor, tmp_path, [1, 0])
    gen = ConversationDataset(dataset.conversations, processor, for_generation=True)
    items = [gen[0], gen[1]]
    assert "labels" not in items[0]
    items[0]["pixel_values"] = items[0]["pixel_values"][:, :3]  # fewer crops than another row would have
    other = dataset[0]
    batch = Collator(pad_token_id=0, padding_side="left")(items + [other])
    n1 = len(items[1]["input_ids"])
    assert torch.equal(batch["input_ids"][1, -n1:], items[1]["input_ids"])
    assert batch["attention_mask"][1, : batch["input_ids"].shape[1] - n1].sum() == 0
    assert batch["pixel_values"].shape[1] == 5 and batch["pixel_values"][0, 3:].abs().sum() == 0


def test_length_grouping_only_with_more_than_one_example_per_device():
    from types import SimpleNamespace

    from recipe.trainer import GroupedByLengthSampler, RecipeTrainer

    dataset = type("D", (), {"lengths": [5, 1, 9, 3], "__len__": lambda self: 4})()

    def sampler(per_device):
        args = SimpleNamespace(train_sampling_strategy="group_by_length", train_batch_size=per_device,
                               gradient_accumulation_steps=2, seed=0)
        return RecipeTrainer._get_train_sampler(SimpleNamespace(args=args, train_dataset=dataset))

    assert isinstance(sampler(2), GroupedByLengthSampler)
    assert isinstance(sampler(1), torch.utils.data.RandomSampler)
