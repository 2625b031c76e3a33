"""The tiny in-process tokenizer behaves like the released Phi-3.5-vision tokenizer."""

import json

import pytest
from transformers import AutoTokenizer

from phi3v.tiny_tokenizer import (
    ADDED_TOKENS,
    CHAT_TEMPLATE,
    DEFAULT_VOCAB_SIZE,
    OFFICIAL_BASE_VOCAB_SIZE,
    RSTRIP_TOKENS,
    SPECIAL_TOKENS,
    build_tokenizer,
)

# Released ids (32000-based) of the named added tokens.
OFFICIAL_IDS = {
    "<|endoftext|>": 32000,
    "<|assistant|>": 32001,
    "<|system|>": 32006,
    "<|end|>": 32007,
    "<|user|>": 32010,
    "<|image|>": 32044,
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tokens(tok, text, **kwargs):
    return tok.convert_ids_to_tokens(tok(text, **kwargs).input_ids)


def test_base_vocab_has_llama_layout(tok):
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>"]) == [0, 1, 2, 3, 13, 258]
    assert (tok.unk_token_id, tok.bos_token_id) == (0, 1)
    assert tok.vocab_size == DEFAULT_VOCAB_SIZE


def test_added_tokens_keep_official_order_and_offsets(tok):
    assert len(ADDED_TOKENS) == 45 and len(set(ADDED_TOKENS)) == 45
    assert len(tok) == DEFAULT_VOCAB_SIZE + 45
    for offset, token in enumerate(ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(token) == DEFAULT_VOCAB_SIZE + offset, token
    for token, official_id in OFFICIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == official_id - OFFICIAL_BASE_VOCAB_SIZE + DEFAULT_VOCAB_SIZE
    assert ADDED_TOKENS[11:44] == [f"<|placeholder{i}|>" for i in range(7, 40)]


def test_eos_and_pad_are_endoftext(tok):
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == DEFAULT_VOCAB_SIZE


def test_added_token_flags_are_official(tok):
    decoder = {token.content: token for token in tok.added_tokens_decoder.values()}
    assert set(decoder) == set(SPECIAL_TOKENS)
    for name in ("</s>", "<|assistant|>", "<|image|>", "<|placeholder1|>", "<|placeholder39|>"):
        assert decoder[name].rstrip, name
    for name in ("<unk>", "<s>", "<|user|>", "<|system|>", "<|end|>", "<|endoftext|>"):
        assert not decoder[name].rstrip, name
    assert all(t.special and not t.normalized and not t.lstrip for t in decoder.values())
    assert {t.content for t in decoder.values() if t.rstrip} == RSTRIP_TOKENS


def test_bos_added_once_and_no_eos(tok):
    ids = tok("a<|end|>b").input_ids
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids[-1] != tok.eos_token_id
    assert 1 not in tok("a", add_special_tokens=False).input_ids


def test_every_segment_between_special_tokens_gets_leading_metaspace(tok):
    # The released tokenizer's well-known extra "▁" (29871) after <|user|>.
    assert tokens(tok, "<|user|>\nHi", add_special_tokens=False)[:3] == ["<|user|>", "▁", "<0x0A>"]
    toks = tokens(tok, "yes<|end|>no<|end|>", add_special_tokens=False)
    end = toks.index("<|end|>")
    assert toks[0].startswith("▁") and toks[end + 1].startswith("▁")
    assert "".join(tokens(tok, "the video", add_special_tokens=False)) == "▁the▁video"


def test_rstrip_swallows_newline_after_assistant_but_not_after_end(tok):
    toks = tokens(tok, "<|assistant|>\nyes", add_special_tokens=False)
    assert toks[0] == "<|assistant|>" and "<0x0A>" not in toks
    assert "".join(toks[1:]) == "▁yes"
    assert tokens(tok, "<|end|>\n<|user|>", add_special_tokens=False) == ["<|end|>", "▁", "<0x0A>", "<|user|>"]


def test_numbers_are_split_into_digits(tok):
    assert tokens(tok, "2024", add_special_tokens=False) == ["▁", "2", "0", "2", "4"]


def test_byte_fallback_round_trip_for_non_ascii(tok):
    text = "Café – naïve 😀 日本語\ttab"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert tok.convert_tokens_to_ids("<0xF0>") in ids  # first byte of the emoji
    assert tok.decode(ids) == text


def test_decode_skips_special_tokens(tok):
    ids = tok("<|user|>\nIs it a cat?<|end|>\n<|assistant|>\nyes<|end|>").input_ids
    assert tok.decode(ids, skip_special_tokens=True).split() == ["Is", "it", "a", "cat?", "yes"]


def test_chat_template_output_is_exact(tok):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "<|image_1|>\nWhat is this?"},
        {"role": "assistant", "content": "A cat."},
    ]
    expected = (
        "<|system|>\nYou are helpful.<|end|>\n<|user|>\n<|image_1|>\nWhat is this?<|end|>\n"
        "<|assistant|>\nA cat.<|end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    # The generation prompt follows a user turn only.
    assert tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == (
        "<|system|>\nYou are helpful.<|end|>\n<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert tok.chat_template == CHAT_TEMPLATE


def test_save_and_autotokenizer_load_give_identical_ids(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    # Recorded so that transformers 5 loads tokenizer.json as is (LlamaTokenizer would rebuild it).
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is the total amount on the invoice?<|end|>\n"
        "<|assistant|>\n$1,234.56<|end|>",
        "  two  spaces, Ünïcödé 😀 and\nnewlines",
        "",
    ]
    for text in texts:
        assert loaded(text).input_ids == tok(text).input_ids, text
    assert len(loaded) == len(tok)
    named = (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token)
    assert named == ("<s>", "<|endoftext|>", "<|endoftext|>", "<unk>")
    assert loaded.chat_template == tok.chat_template
    assert loaded.model_max_length == tok.model_max_length == 131072
    assert {t.content for t in loaded.added_tokens_decoder.values() if t.rstrip} == RSTRIP_TOKENS


def test_build_is_deterministic():
    first, second = build_tokenizer(), build_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    text = "Classify the video: ApplyEyeMakeup, Archery or Basketball?"
    assert first(text).input_ids == second(text).input_ids


def test_custom_corpus_and_vocab_size():
    corpus = ["the cat sat on the mat " * 3, "a dog and a bird", "is this hateful? yes or no"]
    tok = build_tokenizer(corpus, vocab_size=380)
    assert tok.vocab_size == 380
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 380 and tok.convert_tokens_to_ids("<|image|>") == 424


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="fewer than vocab_size"):
        build_tokenizer(["tiny corpus"], vocab_size=1024)
    with pytest.raises(ValueError, match="vocab_size must be an int"):
        build_tokenizer(vocab_size=300)
    with pytest.raises(TypeError, match="list of strings"):
        build_tokenizer("a single string")
