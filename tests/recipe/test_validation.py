"""Validation before the first step: every problem at once, lengths measured once, length checks."""

import json

import pytest

from data_samples import good_record, image, make_processor, write_jsonl
from recipe.data import ConversationDataset
from recipe.errors import DataError
from recipe.layouts import load_jsonl, read_file
from recipe.records import Conversation, Turn, subset
from recipe.validation import validate


@pytest.fixture(scope="module")
def processor():
    return make_processor()


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
    conversations, problems, _ = read_file(data, img_dir, "ours")
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


def test_unreadable_lines_count_towards_the_skipped_share(tmp_path, processor):
    data = write_jsonl(tmp_path / "d.jsonl", ["{broken", "[1]", good_record(0, [])])
    conversations = load_jsonl(data, tmp_path, defer_errors=True)
    with pytest.raises(DataError, match="would drop 2 of 3 examples.*fix the data"):
        validate(conversations, processor.tokenizer, num_crops=1, skip_bad=True, training=True)


def test_a_subset_does_not_count_the_files_unreadable_lines(tmp_path, processor, caplog):
    # 3 bad lines of 8: a --max_train_samples 2 subset holds only good examples, and nothing of
    # it is dropped (the bad lines are still reported)
    data = write_jsonl(tmp_path / "d.jsonl", ["{broken", "[1]", "{}", *[good_record(i, []) for i in range(5)]])
    sampled = subset(load_jsonl(data, tmp_path, defer_errors=True), 2, seed=0)
    kept = validate(sampled, processor.tokenizer, num_crops=1, skip_bad=True, training=True)
    assert len(kept) == 2
    assert "skipped 0 of 2 examples" in caplog.text and "d.jsonl:1" in caplog.text


# -- lengths and length checks -----------------------------------------------------------------


def test_lengths_are_measured_once_and_reused(tmp_path, processor, monkeypatch):
    import recipe.data as data
    import recipe.records as records
    import recipe.tokenization as tokenization
    import recipe.validation as validation
    from recipe.trainer import GroupedByLengthSampler

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

    tokenize, open_image = counted("tokenize", tokenization.tokenize_conversation), counted("open", records.open_image)
    for module in (data, tokenization):
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
    assert detail == (f"d.jsonl:1: {2509 + text} tokens > --max_length 1000 by {1509 + text} ({text} text tokens + image tokens "
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
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "rank")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parents[2])})
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["checked"] == ["c0", "c1", "c2"] and ranks[1]["checked"] == ["c3", "c4"]
    assert ranks[0]["kept"] == ranks[1]["kept"] == ["c0", "c1", "c2", "c4"]  # c3: empty answer, seen by rank 1
    assert ranks[0]["lengths"] == ranks[1]["lengths"]


def test_cached_validation_rechecks_only_what_changed(tmp_path, processor, monkeypatch):
    """A second validation of the same data reads its results from the cache; an edited line,
    a replaced image or another --num_crops is checked again, and only that, with the bad
    examples (never cached); --max_length applies to the cached lengths; deleting a line keeps
    the results of the lines below it; a damaged cache is only a slower start."""
    import os

    import recipe.validation

    img_dir, cache = tmp_path / "img", tmp_path / "cache"
    img_dir.mkdir()
    for name in ("a.png", "b.png"):
        image(336, 336).save(img_dir / name)
    lines = [good_record(0, ["a.png"]), good_record(1, ["b.png"]), good_record(2, []), good_record(3, ["missing.png"])]
    data = write_jsonl(tmp_path / "d.jsonl", lines)
    checked = []
    check_one = recipe.validation._check_one
    monkeypatch.setattr(recipe.validation, "_check_one", lambda c, *a: checked.append(c.id) or check_one(c, *a))

    def run(num_crops=1, **kwargs):
        checked.clear()
        conversations, _, _ = read_file(data, img_dir, "ours")
        kept = validate(conversations, processor.tokenizer, num_crops=num_crops, skip_bad=True, cache_dir=cache,
                        **kwargs)
        return kept, list(checked)

    first, checked_first = run()
    assert checked_first == ["ex0", "ex1", "ex2", "ex3"] and [c.id for c in first] == ["ex0", "ex1", "ex2"]
    again, checked_again = run()
    assert checked_again == ["ex3"] and [(c.id, c.tokens) for c in again] == [(c.id, c.tokens) for c in first]

    image(672, 336).save(img_dir / "b.png")  # replaced: another size, another mtime
    os.utime(img_dir / "b.png", ns=(1, 1))
    lines[2]["conversations"][0]["assistant"] = "blue"  # an edited line
    write_jsonl(data, lines)
    changed, checked_changed = run()
    assert checked_changed == ["ex1", "ex2", "ex3"]
    assert changed[1].tokens.image_sizes == ((672, 336),) and changed[0].tokens == first[0].tokens

    assert run(num_crops=2)[1] == ["ex0", "ex1", "ex2", "ex3"]  # another setting: another cache file
    short = min(c.tokens.total for c in changed)
    kept, checked_limited = run(max_length=short)
    assert checked_limited == ["ex3"] and all(c.tokens.total <= short for c in kept) and len(kept) < len(changed)

    write_jsonl(data, lines[1:])  # the first line deleted: the others now stand one line higher
    moved, checked_moved = run()
    assert checked_moved == ["ex3"] and [(c.id, c.tokens) for c in moved] == [(c.id, c.tokens) for c in changed[1:]]
    assert moved[0].where.endswith("d.jsonl:1")

    for path in cache.iterdir():
        path.write_bytes(b"garbage")
    assert run()[1] == ["ex1", "ex2", "ex3"]


def test_cached_validation_reports_the_same_problems_and_lengths(tmp_path, processor):
    """A bad example whose result comes from the cache is reported exactly as when checked
    (file:line, message, reason); a good one gets the same lengths."""
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    image(336, 200).save(img_dir / "shared.png")
    (img_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 3)
    data = write_jsonl(tmp_path / "d.jsonl", [good_record(0, ["shared.png"]), good_record(1, ["corrupt.jpg"]),
                                              good_record(2, ["shared.png", "shared.png"]), good_record(3, [])])

    def run(**kwargs):
        with pytest.raises(DataError) as err:
            validate(read_file(data, img_dir, "ours")[0], processor.tokenizer, num_crops=1, what="d", **kwargs)
        kept = validate(read_file(data, img_dir, "ours")[0], processor.tokenizer, num_crops=1, skip_bad=True, **kwargs)
        return (str(err.value), err.value.details), [(c.id, c.tokens) for c in kept]

    fresh = run()
    run(cache_dir=tmp_path / "cache")
    assert run(cache_dir=tmp_path / "cache") == fresh
    assert "d.jsonl:2: image" in fresh[0][0] and [i for i, _ in fresh[1]] == ["ex0", "ex2", "ex3"]


def test_cached_validation_rechecks_an_edited_system_message(tmp_path, processor):
    """The system message is rendered into the example's tokens: editing it changes the length,
    so the cached result must not be reused."""
    from dataclasses import replace

    conversation = Conversation(id="s", turns=[Turn(user="hi", assistant="ok")], where="d.jsonl:1")
    first = validate([conversation], processor.tokenizer, num_crops=1, cache_dir=tmp_path)
    longer = replace(conversation, system="You are a careful assistant. " * 20)
    again = validate([longer], processor.tokenizer, num_crops=1, cache_dir=tmp_path)
    uncached = validate([replace(longer)], processor.tokenizer, num_crops=1)
    assert again[0].tokens == uncached[0].tokens != first[0].tokens


def test_validation_cache_is_keyed_by_the_checking_code(tmp_path, processor, monkeypatch):
    """A recipe update that changes how an example is tokenized or measured (recipe.tokenization,
    phi3v's image token rule, ...) must not reuse lengths measured by the old code."""
    import recipe.validation_cache

    source = tmp_path / "checking_code.py"
    source.write_text("VERSION = 1\n")
    monkeypatch.setattr(recipe.validation_cache, "CODE_FILES", (source,))
    recipe.validation_cache._code_digest.cache_clear()
    before = recipe.validation_cache.setting_key(processor.tokenizer, 1, False)
    source.write_text("VERSION = 2\n")
    recipe.validation_cache._code_digest.cache_clear()
    assert recipe.validation_cache.setting_key(processor.tokenizer, 1, False) != before
    recipe.validation_cache._code_digest.cache_clear()
