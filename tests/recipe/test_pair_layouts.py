"""Preference pairs from our jsonl, RLAIF-V rows and TRL's layout; their checks before training."""

import json

import datasets
import pytest

from recipe.errors import DataError
from recipe.pair_layouts import load_pairs_jsonl, rlaif_v_pairs, trl_pairs
from recipe.records import subset
from recipe.tokenization import pair_length
from recipe.validation import validate_pairs

from data_samples import image, make_processor, write_jsonl


@pytest.fixture(scope="module")
def processor():
    return make_processor(num_crops=1)


def pair_line(i, images=("a.png",), chosen="Red.", rejected="Blue.", **extra):
    return {"id": f"p{i}", "conversations": [{"images": list(images), "user": "What colour is the square?"}],
            "chosen": chosen, "rejected": rejected, **extra}


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    image(40, 30).save(d / "a.png")
    return d


def test_jsonl_pairs_multi_turn_and_text_only(tmp_path, image_dir, processor):
    multi = {"id": "m", "conversations": [{"images": ["a.png"], "user": "Describe it.", "assistant": "A square."},
                                          {"user": "Which colour?"}], "chosen": "Red.", "rejected": "Green."}
    path = write_jsonl(tmp_path / "p.jsonl", [pair_line(0), multi, pair_line(2, images=())])
    pairs = load_pairs_jsonl(path, image_dir)
    assert not pairs.problems and len(pairs) == 3
    first = pairs[0]
    assert first.conversation.turns[-1].assistant == "Red." and first.rejected == "Blue."
    assert first.conversation.images == [image_dir / "a.png"] and first.conversation.where == f"{path}:1"
    assert [t.assistant for t in pairs[1].conversation.turns] == ["A square.", "Red."]
    good = validate_pairs(pairs, processor.tokenizer, num_crops=1)
    assert good == list(pairs)
    # the measured length is the shared-prefix row: prompt + chosen + rejected
    counts = [t for t in good[0].conversation.tokens.images]
    assert good[0].conversation.tokens.total == pair_length(good[0], processor.tokenizer, counts)


def test_a_pairs_file_with_a_byte_order_mark_or_as_one_json_list(tmp_path, image_dir):
    """Read as the SFT files are (recipe.layouts.read_records): the same pairs, each with its line."""
    lines = [pair_line(0), pair_line(1, images=())]
    plain = load_pairs_jsonl(write_jsonl(tmp_path / "p.jsonl", lines), image_dir)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "p.jsonl").read_bytes())
    listed = tmp_path / "p.json"
    listed.write_text("[\n" + ",\n".join(json.dumps(line) for line in lines) + "\n]\n")
    for path in (bom, listed):
        pairs = load_pairs_jsonl(path, image_dir)
        assert not pairs.problems and [p.conversation.id for p in pairs] == [p.conversation.id for p in plain]
        assert [p.rejected for p in pairs] == [p.rejected for p in plain]
    assert [p.conversation.where for p in load_pairs_jsonl(listed, image_dir)] == [f"{listed}:2", f"{listed}:3"]


def test_bad_pairs_are_reported_with_file_and_line(tmp_path, image_dir, processor):
    lines = [
        pair_line(0),
        {"id": "p1", "conversations": [{"images": ["a.png"], "user": "Q?"}], "chosen": "Red."},  # no rejected
        pair_line(2, rejected="Red."),  # chosen == rejected
        pair_line(3, images=("missing.png",)),
        pair_line(4, chosen=""),
        {"id": "p5", "conversations": [{"user": "Q?", "assistant": "A"}], "chosen": "x", "rejected": "y"},
        "not json",
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    pairs = load_pairs_jsonl(path, image_dir)
    with pytest.raises(DataError) as err:
        validate_pairs(pairs, processor.tokenizer, num_crops=1, what="the training pairs")
    details = "\n".join(err.value.details)
    assert str(err.value).startswith("6 problem(s) in the training pairs")
    assert f"{path}:2: missing 'rejected'" in details
    assert f"{path}:3: chosen == rejected" in details
    assert f"{path}:4: image {image_dir / 'missing.png'} does not exist" in details
    assert f"{path}:5: 'chosen' is empty" in details
    assert f"{path}:6: conversations[0] (the last turn) has an 'assistant'" in details
    assert f"{path}:7: invalid JSON" in details


def test_too_long_pair_is_reported_with_its_image_tokens_or_skipped(tmp_path, image_dir, processor, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", [pair_line(0), pair_line(1, rejected="Blue. " * 40), pair_line(2)])
    pairs = load_pairs_jsonl(path, image_dir)
    lengths = [p.conversation.tokens for p in validate_pairs(pairs, processor.tokenizer, num_crops=1)]
    limit = lengths[0].total
    with pytest.raises(DataError) as err:
        validate_pairs(pairs, processor.tokenizer, num_crops=1, max_length=limit)
    over = lengths[1].total - limit
    image_tokens = lengths[1].images[0]
    assert (f"{path}:2: {lengths[1].total} tokens > --max_length {limit} by {over} "
            f"({lengths[1].text} text tokens + image tokens {image_tokens} per image at --num_crops 1)"
            ) in str(err.value)
    kept = validate_pairs(pairs, processor.tokenizer, num_crops=1, max_length=limit, skip_bad=True, training=True)
    assert [p.conversation.id for p in kept] == ["p0", "p2"]
    assert "skipped 1 of 3 examples" in caplog.text


def test_subset_keeps_pairs(tmp_path, image_dir):
    pairs = load_pairs_jsonl(write_jsonl(tmp_path / "p.jsonl", [pair_line(i) for i in range(5)]), image_dir)
    picked = subset(pairs, 2, seed=0)
    assert len(picked) == 2 and all(hasattr(p, "rejected") for p in picked)


def rlaif_rows():
    return datasets.Dataset.from_dict({
        "image": [image(40, 30), image(30, 40, (0, 0, 200))],
        "question": ["What colour?", "Which shape?"],
        "chosen": ["Red.", "A square."],
        "rejected": ["Blue.", "A square."],  # row 1: chosen == rejected
        "ds_name": ["x", "y"],
    })


def test_rlaif_v_rows(processor):
    pairs = rlaif_v_pairs(rlaif_rows(), "train")
    assert len(pairs) == 1 and [str(p) for p in pairs.problems] == [
        "train row 1: chosen == rejected: the pair prefers nothing; drop it or fix one answer"]
    conversation = pairs[0].conversation
    assert conversation.turns[0].user == "What colour?" and pairs[0].rejected == "Blue."
    assert len(conversation.images) == 1 and conversation.images[0].open().size == (40, 30)
    kept = validate_pairs(pairs, processor.tokenizer, num_crops=1, skip_bad=True)
    assert len(kept) == 1


def test_trl_preference_layout(processor):
    def user(*parts):
        return {"role": "user", "content": list(parts)}

    rows = datasets.Dataset.from_list([
        {"images": [image(40, 30)],
         "prompt": [user({"type": "image", "text": None}, {"type": "text", "text": "What colour?"})],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Red.", }]}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]},
        {"images": [image(40, 30), image(30, 40)],
         "prompt": [user({"type": "text", "text": "Compare "}, {"type": "image", "text": None},
                         {"type": "text", "text": " and "}, {"type": "image", "text": None})],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Same."}]}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Different."}]}]},
        {"images": [],
         "prompt": [user({"type": "image", "text": None}, {"type": "text", "text": "No image given"})],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "a"}]}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "b"}]}]},
    ])
    pairs = trl_pairs(rows, "train")
    assert len(pairs) == 2
    assert [str(p) for p in pairs.problems] == [
        "train row 2: not TRL's preference layout: the prompt has 1 image part(s) but the row has 0 image(s)"]
    assert pairs[0].conversation.turns[0].user == "<|image_1|>\nWhat colour?" and pairs[0].rejected == "Blue."
    assert pairs[1].conversation.turns[0].user == "Compare <|image_1|>\n and <|image_2|>\n"
    assert len(pairs[1].conversation.images) == 2
    kept = validate_pairs(pairs, processor.tokenizer, num_crops=1, skip_bad=True)
    assert len(kept) == 2
    # plain-string prompts and answers (TRL's "standard" layout, text only)
    text = trl_pairs(datasets.Dataset.from_list([{"prompt": "Say hi.", "chosen": "hi", "rejected": "bye"}]), "train")
    assert text[0].conversation.turns[0].user == "Say hi." and text[0].rejected == "bye"
