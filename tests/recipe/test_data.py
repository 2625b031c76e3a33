"""Conversations -> tokens -> labels -> batches, and validation of bad data."""

import json

import pytest
import torch
from PIL import Image

from phi3v.image_processing_phi3v import Phi3VImageProcessor
from phi3v.processing_phi3v import Phi3VProcessor
from phi3v.tokenization import build_tokenizer
from recipe.data import IGNORE_INDEX, Collator, ConversationDataset, build_messages, tokenize_conversation
from recipe.errors import DataError
from recipe.hub import from_cauldron, from_docvqa
from recipe.records import Conversation, Turn, load_jsonl, read_jsonl, resolve_image_path
from recipe.validation import validate


@pytest.fixture(scope="module")
def processor():
    return Phi3VProcessor(image_processor=Phi3VImageProcessor(num_crops=4), tokenizer=build_tokenizer())


def image(w, h, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


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


def test_hub_row_adapters():
    img = image(336, 336)
    cauldron = from_cauldron({"images": [img], "texts": [{"user": "q1", "assistant": "a1", "source": "x"},
                                                         {"user": "q2", "assistant": "a2", "source": "x"}]}, 3)
    assert [t.images for t in cauldron.turns] == [[img], []] and cauldron.answer == "a2"
    docvqa = from_docvqa({"image": img, "query": {"en": "Total?"}, "answers": ["12", "twelve"]}, 0)
    assert docvqa.turns[0].user == "Total?" and docvqa.answer == "12" and docvqa.references == ["12", "twelve"]


# -- jsonl and validation -------------------------------------------------------------------


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def good_record(i, images):
    return {"id": f"ex{i}", "source": "test",
            "conversations": [{"images": images, "user": "What colour?", "assistant": "red"}]}


def test_read_jsonl_reports_each_bad_line_with_file_and_line(tmp_path):
    (tmp_path / "img").mkdir()
    image(336, 336).save(tmp_path / "img" / "a.png")
    data = write_jsonl(tmp_path / "d.jsonl", [
        good_record(0, ["a.png"]),
        "{not json",
        {"id": "x"},
        {"conversations": [{"user": 3, "assistant": "a"}]},
        {"conversations": [{"user": "u", "asistant": "a"}]},
        {"conversations": [{"images": ["/etc/passwd"], "user": "u", "assistant": "a"}]},
        {"conversations": [{"images": ["../secret.png"], "user": "u", "assistant": "a"}]},
        {"conversations": [{"images": "a.png", "user": "u", "assistant": "a"}]},
    ])
    conversations, problems = read_jsonl(data, tmp_path / "img")
    assert [c.id for c in conversations] == ["ex0"]
    by_line = {}
    for p in problems:
        line = int(p.where.rsplit(":", 1)[1])
        by_line[line] = by_line.get(line, "") + p.message + "; "
    assert set(by_line) == {2, 3, 4, 5, 6, 7, 8}
    assert "invalid JSON" in by_line[2]
    assert "conversations" in by_line[3]
    assert "user must be a string" in by_line[4]
    assert "asistant" in by_line[5]
    assert "absolute" in by_line[6]
    assert "escapes" in by_line[7]
    assert "list of path strings" in by_line[8]
    assert all(str(data) in p.where for p in problems)


def test_path_traversal_refused():
    for bad in ["../x.png", "a/../../x.png", "/abs.png", ""]:
        with pytest.raises(ValueError):
            resolve_image_path(bad, "/data/images")
    assert str(resolve_image_path("a/./b/../c.png", "/data/images")) == "/data/images/a/c.png"


def test_validate_lists_every_problem_then_skip_mode_counts_them(tmp_path, processor, caplog):
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    image(336, 336).save(img_dir / "ok.png")
    (img_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 3)
    data = write_jsonl(tmp_path / "d.jsonl", [
        good_record(0, ["ok.png"]),
        good_record(1, ["missing.png"]),
        good_record(2, ["corrupt.jpg"]),
        {"id": "ex3", "conversations": [{"images": ["ok.png"], "user": "<|image_2|>", "assistant": "a"}]},
        {"id": "ex4", "conversations": [{"images": [], "user": "long " * 400, "assistant": "a"}]},
        good_record(0, ["ok.png"]),  # duplicate id
        {"id": "ex6", "conversations": [{"images": [], "user": "q", "assistant": "  "}]},
    ])
    conversations, problems = read_jsonl(data, img_dir)
    assert not problems
    with pytest.raises(DataError) as err:
        validate(conversations, processor.tokenizer, num_crops=1, max_length=600, what=str(data))
    assert str(err.value).startswith("6 problem(s)") and "\n" not in str(err.value)
    message = "\n".join(err.value.details)
    for line, needle in [(2, "missing.png does not exist"), (3, "corrupt.jpg is unreadable"), (4, "<|image_2|>"),
                         (5, "> --max_length 600"), (6, "duplicate id 'ex0'"), (7, "empty assistant")]:
        assert f"d.jsonl:{line}: " in message and needle in message, needle
    assert "--skip_bad_examples" in str(err.value)

    caplog.clear()
    kept = validate(conversations, processor.tokenizer, num_crops=1, max_length=600, skip_bad=True)
    assert [c.id for c in kept] == ["ex0"]
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert "skipped 6 of 7" in record.message and "too long" in record.message and "bad image" in record.message


def test_truncated_image_is_caught_when_decoding(tmp_path, processor):
    path = tmp_path / "t.jpg"
    image(800, 600).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:400])
    conv = Conversation("t", [Turn("q", "a", [path])], where="t.jsonl:1")
    with pytest.raises(DataError, match="t.jsonl:1: image .*t.jpg is unreadable"):
        validate([conv], processor.tokenizer, num_crops=4, decode_images=True)


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


def test_unreadable_lines_and_bad_examples_are_reported_together(tmp_path, processor, caplog):
    (tmp_path / "img").mkdir()
    data = write_jsonl(tmp_path / "d.jsonl", [
        "{broken", good_record(0, ["missing.png"]), {"conversations": "nope"}, good_record(3, []),
    ])
    conversations = load_jsonl(data, tmp_path / "img", defer_errors=True)
    assert [c.id for c in conversations] == ["ex0", "ex3"] and len(conversations.problems) == 2
    with pytest.raises(DataError) as err:
        validate(conversations, processor.tokenizer, num_crops=1)
    assert str(err.value).startswith("3 problem(s)")
    message = "\n".join(err.value.details)
    assert all(f"d.jsonl:{line}: " in message for line in (1, 2, 3))
    kept = validate(conversations, processor.tokenizer, num_crops=1, skip_bad=True)
    assert [c.id for c in kept] == ["ex3"] and "skipped 3 of 4" in caplog.records[-1].message
    with pytest.raises(DataError, match="d.jsonl:1: invalid JSON"):
        load_jsonl(data, tmp_path / "img")  # without defer_errors: stops right away


# -- subsets --------------------------------------------------------------------------------


def test_subsets_are_seeded_random_and_keep_file_order():
    from recipe.records import Conversations, Problem, subset

    # Converted data is sorted by class: the first N would all be one class.
    convs = Conversations([Conversation(f"{cls}{i}", [Turn("q", cls)]) for cls in "abcd" for i in range(25)],
                          problems=[Problem("d.jsonl:7", "invalid JSON", "invalid JSON")])
    picked = subset(convs, 20, seed=3)
    ids = [c.id for c in picked]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert ids == sorted(ids, key=[c.id for c in convs].index)  # original order
    assert len({c.answer for c in picked}) > 1  # not one class
    assert [c.id for c in subset(convs, 20, seed=3)] == ids  # same seed, same subset (every rank)
    assert [c.id for c in subset(convs, 20, seed=4)] != ids
    assert picked.problems == convs.problems  # unreadable lines are still reported by validate
    assert [c.id for c in subset(convs, None, seed=3)] == [c.id for c in convs]
    assert len(subset(convs, 1000, seed=3)) == 100


def test_data_flag_checks():
    from recipe.args import DataArguments
    from recipe.errors import FlagError

    DataArguments(max_train_samples=5, max_eval_samples=1, max_length=512).check()
    with pytest.raises(FlagError, match="--max_eval_samples 0 must be at least 1"):
        DataArguments(max_eval_samples=0).check()


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_empty_or_blank_jsonl_is_one_error_line_naming_the_file(tmp_path, capsys, content):
    from recipe.errors import cli

    data = tmp_path / "ucf101_train.jsonl"
    data.write_text(content)
    assert cli(lambda: load_jsonl(data, tmp_path / "images")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert f"{data} has no examples" in err


def test_bad_lines_end_in_one_error_line_with_the_problems_above(tmp_path, capsys):
    from recipe.errors import cli

    data = write_jsonl(tmp_path / "d.jsonl", ["{broken", good_record(1, [])])
    assert cli(lambda: load_jsonl(data, tmp_path)) == 2
    *details, last = capsys.readouterr().err.splitlines()
    assert details == [f"  {data}:1: invalid JSON (Expecting property name enclosed in double quotes at column 2)"]
    assert last.startswith(f"error: 1 problem(s) in {data} (first: {data}:1: invalid JSON")
    assert cli(lambda: load_jsonl(tmp_path / "nope.jsonl", tmp_path)) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


# -- lengths and length checks -----------------------------------------------------------------


def test_lengths_are_measured_once_and_reused(tmp_path, processor, monkeypatch):
    import recipe.data as data
    import recipe.records as records
    import recipe.validation as validation
    from recipe.train import GroupedByLengthSampler

    convs = []
    for i in range(4):
        paths = []
        for j in range(i % 3):
            paths.append(tmp_path / f"{i}_{j}.png")
            image(200 + 150 * i, 336 + 60 * j).save(paths[-1])
        convs.append(Conversation(f"m{i}", [Turn(f"question {i} " * (i + 1), "answer " * (4 - i), paths)]))
    calls = {"tokenize": 0, "open": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    tokenize, open_image = counted("tokenize", data.tokenize_conversation), counted("open", records.open_image)
    for module in (data, validation):
        monkeypatch.setattr(module, "tokenize_conversation", tokenize)
    for module in (records, validation):
        monkeypatch.setattr(module, "open_image", open_image)
    kept = validate(convs, processor.tokenizer, num_crops=4)
    n_images = sum(len(c.images) for c in convs)
    assert calls == {"tokenize": 4, "open": n_images}  # once per example, one header read per image
    train_set = ConversationDataset(kept, processor)
    eval_set = ConversationDataset(kept, processor, for_generation=True)
    list(GroupedByLengthSampler(train_set.lengths, group_size=2, seed=0))
    assert eval_set.lengths == train_set.lengths
    assert calls == {"tokenize": 4, "open": n_images}  # length grouping and evaluation order measured nothing
    monkeypatch.undo()
    # ... and the stored lengths are the real ones, parts included.
    for i, conversation in enumerate(kept):
        item = train_set[i]
        assert len(item["input_ids"]) == train_set.lengths[i] == conversation.tokens.total
        assert list(conversation.tokens.images) == [int((item["input_ids"] == -k).sum())
                                                    for k in range(1, len(conversation.images) + 1)]


def big_image_conversation(i, n_images=1):
    return Conversation(f"big{i}", [Turn("What is shown?", "a square", [image(1344, 1344)] * n_images)],
                        where=f"d.jsonl:{i + 1}")


def test_too_long_example_reports_text_and_image_tokens(processor):
    conv = big_image_conversation(0)
    with pytest.raises(DataError) as err:
        validate([conv], processor.tokenizer, num_crops=16, max_length=1000)
    [detail] = err.value.details
    text = conv.tokens.total - 2509
    assert detail == (f"d.jsonl:1: {2509 + text} tokens > --max_length 1000 ({text} text tokens + image tokens "
                      "2509 per image at --num_crops 16)")


def test_skipping_more_than_half_of_the_training_data_stops_with_what_to_change(processor, caplog):
    convs = [big_image_conversation(0), big_image_conversation(1),
             Conversation("small", [Turn("Say hi.", "hi")], where="d.jsonl:3")]
    with pytest.raises(DataError) as err:
        validate(convs, processor.tokenizer, num_crops=16, max_length=1000, skip_bad=True, training=True,
                 what="the training data")
    message = str(err.value)
    assert "--skip_bad_examples would drop 2 of 3 examples of the training data (2 too long" in message
    # 1344x1344 costs 2509 tokens at 16 crops, 757 at 4..8 crops (2x2 grid), 1489 at 9 (3x3).
    needed = convs[0].tokens.total
    assert f"raise --max_length by {needed - 1000} to {needed}, or lower --num_crops to 8" in message
    # Half or less: the examples are dropped with a WARNING; evaluation data is never refused this way.
    caplog.clear()
    kept = validate(convs + [Conversation("small2", [Turn("Hi?", "hi")])], processor.tokenizer, num_crops=16,
                    max_length=1000, skip_bad=True, training=True)
    assert [c.id for c in kept] == ["small", "small2"]
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "skipped 2 of 4" in caplog.records[0].message
    kept = validate(convs, processor.tokenizer, num_crops=16, max_length=1000, skip_bad=True)
    assert [c.id for c in kept] == ["small"]


def test_examples_past_4096_tokens_warn_about_long_rope(processor, caplog):
    convs = [big_image_conversation(0, n_images=2), Conversation("small", [Turn("Say hi.", "hi")])]
    kept = validate(convs, processor.tokenizer, num_crops=16, what="the training data")
    assert len(kept) == 2 and convs[0].tokens.total > 4096
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert "1 example(s) in the training data are longer than 4096 tokens" in record.message
    assert "d.jsonl:1" in record.message and "LongRoPE" in record.message and "memory" in record.message
    caplog.clear()
    validate([convs[1]], processor.tokenizer, num_crops=16)
    assert not caplog.records


def test_validation_is_shared_between_ranks(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("validate_ranks.py")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script), str(tmp_path / "rank")], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["checked"] == ["c0", "c1", "c2"] and ranks[1]["checked"] == ["c3", "c4"]
    assert ranks[0]["kept"] == ranks[1]["kept"] == ["c0", "c1", "c2", "c4"]  # c3: empty answer, seen by rank 1
    assert ranks[0]["lengths"] == ranks[1]["lengths"]


def test_unreadable_lines_count_towards_the_skipped_share(tmp_path, processor):
    data = write_jsonl(tmp_path / "d.jsonl", ["{broken", "[1]", good_record(0, [])])
    conversations = load_jsonl(data, tmp_path, skip_bad=True, defer_errors=True)
    with pytest.raises(DataError, match="would drop 2 of 3 examples.*fix the data"):
        validate(conversations, processor.tokenizer, num_crops=1, skip_bad=True, training=True)


def test_length_grouping_only_with_more_than_one_example_per_device():
    from types import SimpleNamespace

    from recipe.train import GroupedByLengthSampler, RecipeTrainer

    dataset = type("D", (), {"lengths": [5, 1, 9, 3], "__len__": lambda self: 4})()

    def sampler(per_device):
        args = SimpleNamespace(train_sampling_strategy="group_by_length", train_batch_size=per_device,
                               gradient_accumulation_steps=2, seed=0)
        return RecipeTrainer._get_train_sampler(SimpleNamespace(args=args, train_dataset=dataset))

    assert isinstance(sampler(2), GroupedByLengthSampler)
    assert isinstance(sampler(1), torch.utils.data.RandomSampler)
