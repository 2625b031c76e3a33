"""Conversations -> tokens and labels (recipe.tokenization): the official processor's ids, the
labels on the answers, tags, and the fast encoding path."""

import pytest

from data_samples import image, make_processor
from recipe.records import Conversation, Turn
from recipe.tokenization import IGNORE_INDEX, build_messages, tokenize_conversation


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
