"""Conversations -> tokens -> labels -> batches."""

import pytest
import torch

from data_samples import image, make_processor
from recipe.data import Collator, ConversationDataset
from recipe.tokenization import IGNORE_INDEX, build_messages, tokenize_conversation
from recipe.records import Conversation, Turn


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def official_ids(processor, conversation, for_generation=False):
    """What the official processor gives for the whole rendered conversation."""
    messages = build_messages(conversation, for_generation)
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=for_generation)
    images = conversation.images
    out = processor(text, images or None, return_tensors="pt")
    return out["input_ids"][0].tolist(), out


def encode(processor, conversation, for_generation=False):
    counts = processor.image_processor.calc_num_image_tokens(conversation.images) if conversation.images else []
    return tokenize_conversation(conversation, processor.tokenizer, counts, for_generation)


def labelled_text(processor, encoded):
    ids = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert all(i == label for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX)
    return processor.tokenizer.decode(ids)


def label_runs(encoded):
    runs, current = [], []
    for i, label in zip(encoded.input_ids, encoded.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
                current = []
        else:
            current.append(i)
    return runs + ([current] if current else [])


def test_single_turn_ids_equal_the_official_processor_and_labels_cover_answer_and_end(processor):
    conv = Conversation("a", [Turn("What is the total?", "42 dollars", [image(500, 300)])])
    encoded = encode(processor, conv)
    ids, _ = official_ids(processor, conv)
    assert encoded.input_ids == ids
    end_id = processor.tokenizer.convert_tokens_to_ids("<|end|>")
    runs = label_runs(encoded)
    assert len(runs) == 1 and runs[0][-1] == end_id
    answer_ids = processor.tokenizer("42 dollars", add_special_tokens=False)["input_ids"]
    assert runs[0] == answer_ids + [end_id]
    # Everything else, images included, is ignored.
    n_image = processor.image_processor.calc_num_image_tokens([image(500, 300)])[0]
    assert encoded.input_ids.count(-1) == n_image
    assert sum(label != IGNORE_INDEX for label in encoded.labels) == len(answer_ids) + 1


def test_multi_turn_multi_image_and_text_only_turns(processor):
    conv = Conversation(
        "b",
        [
            Turn("Compare these.", "The left one is red.", [image(336, 336), image(700, 300, (0, 0, 255))]),
            Turn("And now?", "Still red.", []),
            Turn("<|image_3|>\nThis one?", "Green.", [image(300, 700, (0, 255, 0))]),
        ],
    )
    encoded = encode(processor, conv)
    ids, _ = official_ids(processor, conv)
    assert encoded.input_ids == ids
    assert sorted(set(i for i in ids if i < 0)) == [-3, -2, -1]
    end_id = processor.tokenizer.convert_tokens_to_ids("<|end|>")
    runs = label_runs(encoded)
    assert len(runs) == 3
    for run, answer in zip(runs, ["The left one is red.", "Still red.", "Green."]):
        assert run[-1] == end_id
        assert processor.tokenizer.decode(run[:-1]) == answer
    # BOS (official quirk) after each image block, never labelled.
    for k in (1, 2, 3):
        last = max(i for i, t in enumerate(ids) if t == -k)
        assert ids[last + 1] == processor.tokenizer.bos_token_id


def test_no_image_conversation(processor):
    conv = Conversation("c", [Turn("Say hi.", "Hi!", [])])
    encoded = encode(processor, conv)
    ids, _ = official_ids(processor, conv)
    assert encoded.input_ids == ids and min(ids) >= 0
    assert labelled_text(processor, encoded).replace(" ", "") == "Hi!<|end|>"


def test_generation_prompt_ends_with_assistant_tag(processor):
    conv = Conversation("d", [Turn("What is it?", "A cat.", [image(400, 400)])])
    encoded = encode(processor, conv, for_generation=True)
    ids, _ = official_ids(processor, conv, for_generation=True)
    assert encoded.input_ids == ids
    assert ids[-1] == processor.tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert all(label == IGNORE_INDEX for label in encoded.labels)


def test_wrong_tags_in_user_text_are_rejected(processor):
    conv = Conversation("e", [Turn("<|image_2|> what?", "x", [image(336, 336)])])
    with pytest.raises(ValueError, match="expected <\\|image_1\\|>"):
        encode(processor, conv)


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


@pytest.mark.parametrize("release", [None, "phi-3.5-vision-instruct", "phi-3-vision-128k-instruct"])
def test_backend_encoding_equals_the_tokenizer_call(release):
    """recipe.tokenization._encode skips transformers' wrapping for speed: it must give exactly the ids
    of `tokenizer(text)`, with and without BOS, for special tokens typed inside user text too,
    for the tiny tokenizer and both released ones; and fall back to the call when the tokenizer
    is set to split special tokens."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from recipe.tokenization import _encode

    if release is None:
        tokenizer = make_processor().tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(Path(__file__).parents[1] / "fixtures" / "release" / release)
    texts = ["", " ", "\n", "hello", " hello world", "<|user|>\nhi<|end|>\n<|assistant|>", "a<|endoftext|>b",
             "<s>x</s>", "<|image_1|>\n", "  two  spaces\n\n", "ünïcödé 日本語 🙂", "12345.678", "<|end|>\n",
             "<|system|>sys<|end|>", "tab\tsep", "x" * 300]
    for text in texts:
        for add in (True, False):
            assert _encode(tokenizer, text, add) == tokenizer(text, add_special_tokens=add)["input_ids"], (text, add)
    tokenizer.split_special_tokens = True
    try:
        assert _encode(tokenizer, "a<|end|>", False) == tokenizer("a<|end|>", add_special_tokens=False)["input_ids"]
    finally:
        tokenizer.split_special_tokens = False
