"""Phi3VProcessor: prompt expansion as in the official code, plus clear errors for bad tags."""

import json

import pytest
import torch
from PIL import Image

from phi3v.image_processing_phi3v import Phi3VImageProcessor
from phi3v.processing_phi3v import IMAGE_TAG_PATTERN, Phi3VProcessor, check_image_tags, image_tag
from phi3v.tiny_tokenizer import build_tokenizer

PROMPT = "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n"
# Token counts from docs/checkpoint_format.md §3: a 336x336 HD image gives 313 positions; at num_crops=4 a
# square image becomes 672x672 (757) and a 700x300 one 336x672 (457).
TOKENS_336 = 313


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def processor(tok):
    return Phi3VProcessor(Phi3VImageProcessor(num_crops=1), tok)


@pytest.fixture(scope="module")
def processor4(tok):
    return Phi3VProcessor(Phi3VImageProcessor(num_crops=4), tok)


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (336, 336), (200, 30, 60))


def ids_of(inputs):
    return inputs["input_ids"][0].tolist()


def test_single_image_layout_is_exact(processor, tok, image):
    inputs = processor(PROMPT, [image], return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    ids = ids_of(inputs)
    before = tok("<|user|>\n").input_ids
    after = tok("\nWhat is this?<|end|>\n<|assistant|>\n").input_ids
    assert ids == before + [-1] * TOKENS_336 + after
    user, space = tok.convert_tokens_to_ids(["<|user|>", "▁"])
    # BOS, <|user|>, "▁", "\n", then the image block, then BOS again (official quirk).
    assert ids[:4] == [1, user, space, 13]
    assert ids[4 : 4 + TOKENS_336] == [-1] * TOKENS_336
    assert ids[4 + TOKENS_336 : 4 + TOKENS_336 + 3] == [1, space, 13]
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert inputs["input_ids"].dtype == inputs["attention_mask"].dtype == torch.int64
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (1, len(ids))
    assert bool((inputs["attention_mask"] == 1).all())
    assert inputs["pixel_values"].shape == (1, 2, 3, 336, 336)
    assert inputs["image_sizes"].tolist() == [[336, 336]]


def test_positional_call_like_the_model_card(processor, image):
    # processor(prompt, images, return_tensors="pt"): text first, images second.
    assert ids_of(processor(PROMPT, [image])) == ids_of(processor(text=PROMPT, images=image))


def test_prompt_starting_with_tag_begins_with_bos_then_image(processor, image):
    ids = ids_of(processor("<|image_1|>\nDescribe it.", [image]))
    assert ids[: 1 + TOKENS_336 + 1] == [1] + [-1] * TOKENS_336 + [1]


def test_prompt_ending_with_tag_ends_with_image_then_bos(processor, image):
    ids = ids_of(processor("Look at this: <|image_1|>", [image]))
    assert ids[0] == 1
    assert ids[-(TOKENS_336 + 2) :] == [ids[-(TOKENS_336 + 2)]] + [-1] * TOKENS_336 + [1]
    assert ids[-(TOKENS_336 + 2)] >= 0


def test_two_images_get_their_own_ids_and_counts(processor4, tok):
    square, wide = Image.new("RGB", (336, 336), "white"), Image.new("RGB", (700, 300), "black")
    inputs = processor4("<|image_1|>\n<|image_2|>\nSame?", [square, wide])
    ids = inputs["input_ids"][0]
    assert int((ids == -1).sum()) == 757 and int((ids == -2).sum()) == 457
    first, second = (ids == -1).nonzero().flatten(), (ids == -2).nonzero().flatten()
    # Contiguous blocks, image 1 first, separated by the "\n" chunk with its own BOS.
    assert first.tolist() == list(range(1, 1 + 757))
    assert ids[1 + 757 : 1 + 757 + 3].tolist() == [1, tok.convert_tokens_to_ids("▁"), 13]
    assert second.tolist() == list(range(1 + 757 + 3, 1 + 757 + 3 + 457))
    assert inputs["pixel_values"].shape == (2, 5, 3, 336, 336)
    assert inputs["image_sizes"].tolist() == [[672, 672], [336, 672]]


def test_single_image_may_be_passed_without_a_list(processor, image):
    assert ids_of(processor(PROMPT, image)) == ids_of(processor(PROMPT, [image]))


def test_text_only_string_is_the_plain_tokenizer_call(processor, tok):
    inputs = processor("<|user|>\nHello<|end|>\n<|assistant|>\n")
    assert ids_of(inputs) == tok("<|user|>\nHello<|end|>\n<|assistant|>\n").input_ids
    assert isinstance(inputs["input_ids"], torch.Tensor)
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert ids_of(processor("Hello", images=[])) == tok("Hello").input_ids


def test_text_only_list_with_padding(processor, tok):
    texts = ["a cat", "is this meme hateful? answer yes or no"]
    inputs = processor(texts, padding=True)
    long_ids, short_ids = tok(texts[1]).input_ids, tok(texts[0]).input_ids
    assert inputs["input_ids"].shape == (2, len(long_ids))
    pad = len(long_ids) - len(short_ids)
    assert inputs["input_ids"][0].tolist() == short_ids + [tok.pad_token_id] * pad  # right padding
    assert inputs["attention_mask"][0].tolist() == [1] * len(short_ids) + [0] * pad
    assert inputs["input_ids"][1].tolist() == long_ids


@pytest.mark.parametrize(
    ("text", "num_images", "message"),
    [
        ("<|image_1|> and again <|image_1|>", 1, r"repeated: <\|image_1\|> x2"),
        ("<|image_2|> then <|image_1|>", 2, "out of order"),
        ("no tag at all", 1, r"missing <\|image_1\|>"),
        ("<|image_1|> only", 2, r"missing <\|image_2\|>"),
        ("<|image_1|> <|image_2|>", 1, r"no image for <\|image_2\|> \(1 image\(s\) given\)"),
        ("<|image_0|>", 1, r"no image for <\|image_0\|>"),
    ],
)
def test_tag_mismatch_raises_clear_error(processor, image, text, num_images, message):
    with pytest.raises(ValueError, match=message) as error:
        processor(text, [image] * num_images)
    assert "expected [<|image_1|>" in str(error.value)


def test_tags_without_images_raise(processor):
    with pytest.raises(ValueError, match=r"image tags \[<\|image_1\|>\] but no images were given"):
        processor("<|user|>\n<|image_1|>\nWhat?")
    with pytest.raises(ValueError, match=r"text\[1\] has the image tags"):
        processor(["fine", "<|image_1|> not fine"], padding=True)


def test_batched_text_with_images_raises(processor, image):
    with pytest.raises(ValueError, match="single prompt string"):
        processor([PROMPT, PROMPT], [image, image])


def test_check_image_tags_accepts_exact_sequence():
    check_image_tags("<|image_1|> a <|image_2|> b <|image_3|>", 3)
    check_image_tags("no images", 0)
    assert image_tag(2) == "<|image_2|>" and IMAGE_TAG_PATTERN == r"<\|image_\d+\|>"


def test_decode_delegates_and_model_input_names(processor, tok):
    ids = tok(["a cat", "yes"]).input_ids
    assert processor.batch_decode(ids, skip_special_tokens=True) == tok.batch_decode(ids, skip_special_tokens=True)
    assert processor.decode(ids[0]) == tok.decode(ids[0])
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


def test_apply_chat_template_returns_the_prompt(processor):
    messages = [{"role": "user", "content": "<|image_1|>\nWhat is this?"}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == PROMPT
    with pytest.raises(ValueError, match="prompt string only"):
        processor.apply_chat_template(messages, tokenize=True)


def test_save_and_load_round_trip(processor4, tmp_path):
    image = Image.new("RGB", (500, 400), (1, 2, 3))
    processor4.save_pretrained(tmp_path)
    legacy = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert legacy["processor_class"] == "Phi3VProcessor"
    assert legacy["image_processor_type"] == "Phi3VImageProcessor" and legacy["num_crops"] == 4
    loaded = Phi3VProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.num_crops == 4
    before, after = processor4(PROMPT, [image]), loaded(PROMPT, [image])
    assert torch.equal(before["input_ids"], after["input_ids"])
    assert torch.equal(before["pixel_values"], after["pixel_values"])
    assert torch.equal(before["image_sizes"], after["image_sizes"])
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>\nhi<|end|>\n"
    # An override reaches the image processor and stays out of the tokenizer's saved config.
    overridden = Phi3VProcessor.from_pretrained(tmp_path, num_crops=16)
    assert overridden.image_processor.num_crops == 16
    assert "num_crops" not in overridden.tokenizer.init_kwargs


def test_loads_released_layout(tok, image, tmp_path):
    # The released files: image processor settings only in preprocessor_config.json and a
    # tokenizer_config.json naming LlamaTokenizer (which in transformers 5 would rebuild the
    # pipeline and drop the "▁" after special tokens). The ids must not change.
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False, legacy=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
                "do_convert_rgb": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_processor_type": "Phi3VImageProcessor",
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "num_crops": 1,
                "num_img_tokens": 144,
                "processor_class": "Phi3VProcessor",
            }
        )
    )
    loaded = Phi3VProcessor.from_pretrained(tmp_path)
    reference = Phi3VProcessor(Phi3VImageProcessor(num_crops=1), tok)
    assert ids_of(loaded(PROMPT, [image])) == ids_of(reference(PROMPT, [image]))
