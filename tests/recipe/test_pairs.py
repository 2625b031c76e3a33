"""Preference pairs (recipe/pairs.py): the shared-prefix forward equals two separate sequences.

The reference for every pair is each sequence run alone, unpadded (prompt + chosen, prompt +
rejected: its own positions, its own LongRoPE choice, no mask), summing the answer's token
log-probabilities. The tiny model's original context is lowered so pairs cross LongRoPE's
switch cheaply: below it, above it, and straddling it (prompt + chosen below, prompt + rejected
above).
"""

import math

import pytest
import torch
from PIL import Image

from phi3v.configuration_phi3v import PHI3_5V, PHI3V_128K
from phi3v.processing_phi3v import Phi3VProcessor
from phi3v.tiny import build_tiny_model, tiny_config
from recipe.pairs import PairCollator, PairDataset, pair_log_probs
from recipe.records import Conversation, PreferencePair, Turn
from recipe.tokenization import tokenize_conversation, tokenize_pair

SWITCH = 400  # original context of the test model: 313 image tokens (1 crop) + text crosses it


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=1)


def image(seed: int, size=(400, 300)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 255, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


def words(n: int, seed: int) -> str:
    vocab = ["red", "blue", "square", "circle", "the", "a", "shape", "is", "green", "small", "large", "on", "left"]
    return " ".join(vocab[(seed * 7 + i * 3) % len(vocab)] for i in range(n))


def pairs() -> list[PreferencePair]:
    """Uneven lengths: text-only (short), one image with a long rejected answer (straddles the
    switch), a multi-turn prompt with an image in an earlier turn, two images (both above)."""
    return [
        PreferencePair(Conversation("text", [Turn(words(12, 1), words(5, 2))]), words(9, 3)),
        PreferencePair(Conversation("straddle", [Turn(words(20, 4), words(4, 5), [image(0)])]), words(90, 6)),
        PreferencePair(
            Conversation("multi", [Turn(words(6, 7), words(8, 8), [image(1, (200, 500))]),
                                   Turn(words(10, 9), words(3, 1))]),
            words(7, 2),
        ),
        PreferencePair(
            Conversation("two", [Turn(words(5, 3), words(11, 4), [image(2), image(3, (300, 300))])]), words(2, 5)
        ),
        PreferencePair(Conversation("text2", [Turn(words(30, 6), words(1, 7))]), words(20, 8)),
    ]


def test_pair_tokens_are_the_sft_tokens(processor):
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    for pair in pairs():
        counts = [313] * len(pair.images)
        encoded = tokenize_pair(pair, tokenizer, counts)
        sft = tokenize_conversation(pair.conversation, tokenizer, counts)
        n = len(encoded.prompt_ids) + len(encoded.chosen_ids)
        assert encoded.prompt_ids + encoded.chosen_ids == sft.input_ids[:n]
        assert sft.labels[len(encoded.prompt_ids) : n] == encoded.chosen_ids  # exactly the last answer's labels
        assert all(label == -100 for label in sft.labels[n:])
        rejected = tokenize_conversation(pair.rejected_conversation(), tokenizer, counts).input_ids
        m = len(encoded.prompt_ids) + len(encoded.rejected_ids)
        assert encoded.prompt_ids + encoded.rejected_ids == rejected[:m]
        assert encoded.chosen_ids[-1] == end and encoded.rejected_ids[-1] == end


def test_collator_layout():
    items = [
        {"prompt_ids": torch.tensor([5, 6, 7]), "chosen_ids": torch.tensor([8, 9]), "rejected_ids": torch.tensor([10])},
        {"prompt_ids": torch.tensor([5]), "chosen_ids": torch.tensor([11]), "rejected_ids": torch.tensor([12, 13, 14])},
    ]
    batch = PairCollator(pad_token_id=0)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [0, 5, 11, 12, 13, 14]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 0, 1, 1, 2, 3]]
    mask = batch["attention_mask"][:, 0].int()
    # Row 0: rejected (column 5) sees the prompt and itself, not the chosen answer (3, 4).
    assert mask[0, 5].tolist() == [1, 1, 1, 0, 0, 1]
    assert mask[0, 4].tolist() == [1, 1, 1, 1, 1, 0]
    assert mask[1, 3].tolist() == [0, 1, 0, 1, 0, 0]  # padding never seen
    # Kept columns: the last 5 (longest chosen + rejected + 1); the last prompt token predicts both first tokens.
    assert batch["chosen_labels"].tolist() == [[-100, 8, 9, -100, -100], [11, -100, -100, -100, -100]]
    assert batch["rejected_labels"].tolist() == [[-100, 10, -100, -100, -100], [12, -100, 13, 14, -100]]
    assert batch["chosen_rows"].tolist() == batch["rejected_rows"].tolist() == [0, 1]
    assert (int(batch["num_tokens"]), int(batch["num_images"])) == (11, 0)

    separate = PairCollator(pad_token_id=0, shared_prefix=False)(items)
    assert separate["input_ids"].tolist() == [[5, 6, 7, 8, 9], [0, 0, 0, 5, 11], [0, 5, 6, 7, 10], [0, 5, 12, 13, 14]]
    assert separate["rejected_labels"][2:].tolist() == [[-100, -100, 10, -100], [12, 13, 14, -100]]
    assert separate["rejected_rows"].tolist() == [2, 3]


def alone_log_probs(model, processor, pair: PreferencePair) -> tuple[float, float]:
    """Each answer's summed log-probability from its own sequence, alone and unpadded."""
    images = [img for img in pair.images]
    pixels = processor.image_processor(images, return_tensors="pt") if images else None
    counts = list(pixels["num_img_tokens"]) if images else []
    encoded = tokenize_pair(pair, processor.tokenizer, counts)
    result = []
    for answer in (encoded.chosen_ids, encoded.rejected_ids):
        ids = torch.tensor([encoded.prompt_ids + answer])
        extra = {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]} if images else {}
        logits = model(input_ids=ids, **extra).logits.float()[0, len(encoded.prompt_ids) - 1 : -1]
        logps = logits.log_softmax(-1).gather(-1, torch.tensor(answer)[:, None]).sum()
        result.append(logps)
    return result


def tiny_model(processor, family=PHI3_5V, attention="sdpa"):
    tokenizer = processor.tokenizer
    config = tiny_config(
        vocab_size=int(math.ceil(len(tokenizer) / 64) * 64), pad_token_id=tokenizer.pad_token_id, family=family,
        original_max_position_embeddings=SWITCH,
    )
    config._attn_implementation = attention
    return build_tiny_model(config, seed=0)


@pytest.fixture(scope="module")
def items(processor):
    dataset = PairDataset(pairs(), processor)
    items = [dataset[i] for i in range(len(dataset))]
    prompt = {item["id"]: len(item["prompt_ids"]) for item in items}
    lengths = {
        item["id"]: (prompt[item["id"]] + len(item["chosen_ids"]), prompt[item["id"]] + len(item["rejected_ids"]))
        for item in items
    }
    assert lengths["straddle"][0] <= SWITCH < lengths["straddle"][1] and min(lengths["two"]) > SWITCH
    assert max(lengths["text"]) < SWITCH
    assert dataset.lengths == [chosen + rejected - prompt[key] for key, (chosen, rejected) in lengths.items()]
    return items


def collate(processor, items, shared=True):
    pad = processor.tokenizer.pad_token_id
    return PairCollator(pad, shared_prefix=shared, original_max_position_embeddings=SWITCH)(items)


def assert_equals_alone(model, processor, items):
    with torch.no_grad():
        expected = torch.tensor([alone_log_probs(model, processor, pair) for pair in pairs()])
        for shared in (True, False):
            out = pair_log_probs(model, collate(processor, items, shared))
            got = torch.stack([out.chosen_logps, out.rejected_logps], dim=1)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    return out


@pytest.mark.parametrize("family,attention", [(PHI3_5V, "sdpa"), (PHI3_5V, "eager"), (PHI3V_128K, "sdpa")])
def test_shared_prefix_equals_separate_sequences(processor, items, family, attention):
    model = tiny_model(processor, family, attention)
    out = assert_equals_alone(model, processor, items)
    lengths = [len(i["chosen_ids"]) for i in items], [len(i["rejected_ids"]) for i in items]
    assert (out.chosen_tokens.tolist(), out.rejected_tokens.tolist()) == lengths
    torch.testing.assert_close(out.chosen_nll, -out.chosen_logps.sum() / sum(lengths[0]))


@pytest.mark.slow  # ~6 CPU s each; CI covers the same rule at a lowered switch (SWITCH)
@pytest.mark.parametrize("family", [PHI3_5V, PHI3V_128K])
def test_released_switch_at_4096_positions(family):
    """The collator's default switch is the releases' original context: a text pair whose rejected
    sequence crosses 4096 positions and one entirely past it, against the sequences alone."""
    model = build_tiny_model(tiny_config(vocab_size=256, pad_token_id=100, family=family), seed=0)
    assert model.config.original_max_position_embeddings == PairCollator(100).original_max_position_embeddings
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 99, (n,), generator=g)

    items = [
        {"prompt_ids": ids(4060), "chosen_ids": ids(20), "rejected_ids": ids(50)},  # 4080 | 4110
        {"prompt_ids": ids(4100), "chosen_ids": ids(5), "rejected_ids": ids(9)},
    ]
    with torch.no_grad():
        out = pair_log_probs(model, PairCollator(100)(items))
        for i, item in enumerate(items):
            for answer, got in (("chosen_ids", out.chosen_logps[i]), ("rejected_ids", out.rejected_logps[i])):
                row = torch.cat([item["prompt_ids"], item[answer]])[None]
                logits = model(input_ids=row).logits[0, len(item["prompt_ids"]) - 1 : -1]
                expected = logits.log_softmax(-1).gather(-1, item[answer][:, None]).sum()
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_wrapped_model(processor, items):
    from peft import LoraConfig, get_peft_model

    from recipe.model import lora_target_modules

    model = tiny_model(processor)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=lora_target_modules(model, include_vision=True)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # adapters that change the output
    assert_equals_alone(model, processor, items)


def test_gradients_equal_two_sequence_layout(processor, items):
    model = tiny_model(processor).train()
    grads = []
    for shared in (True, False):
        model.zero_grad()
        out = pair_log_probs(model, collate(processor, items, shared))
        torch.nn.functional.logsigmoid(out.chosen_logps - out.rejected_logps).sum().neg().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    shared, separate = grads
    assert shared.keys() == separate.keys() and any("img_processor" in n for n in shared)
    largest = max(g.abs().max() for g in separate.values())
    for name in shared:
        scale = torch.maximum(separate[name].abs().max(), largest * 1e-3)
        assert (shared[name] - separate[name]).abs().max() / scale < 1e-4, name


def count_vision(model):
    """(calls, images encoded) of the image embedding, via a forward hook."""
    seen = []
    model.model.vision_embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    return seen


def test_vision_runs_once_per_pass_and_features_are_reused(processor, items):
    policy, reference = tiny_model(processor), tiny_model(processor)
    policy_calls, reference_calls = count_vision(policy), count_vision(reference)
    batch = collate(processor, items)
    images = sum(len(pair.images) for pair in pairs())
    straddling = len(pairs()[1].images)  # its prompt (with its image) is in its row twice
    assert len(batch["image_sizes"]) == images + straddling and int(batch["num_images"]) == images
    out = pair_log_probs(policy, batch)
    with torch.no_grad():
        pair_log_probs(reference, batch)  # a reference with its own vision side: encodes again
    assert policy_calls == [images + straddling] and reference_calls == [images + straddling]
    with torch.no_grad():
        reused = pair_log_probs(reference, batch, image_features=out.image_features.detach())
        own = pair_log_probs(reference, batch)
    assert reference_calls == [images + straddling] * 2  # the reuse did not run the tower
    torch.testing.assert_close(reused.chosen_logps, own.chosen_logps)
    assert out.image_features.requires_grad and reused.image_features is not None
    # TRL's layout encodes every image twice per forward.
    pair_log_probs(policy, collate(processor, items, shared=False))
    assert policy_calls[-1] == 2 * images


def test_lora_reference_without_vision_adapters_reuses_features(processor, items):
    """LoRA on the language side only: the reference (adapters disabled) has the policy's vision
    side, so the policy's features serve it: 1 encode per pair for policy and reference."""
    from peft import LoraConfig, get_peft_model

    from recipe.model import lora_target_modules

    base = tiny_model(processor)
    calls = count_vision(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=lora_target_modules(base, include_vision=False)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    batch = collate(processor, items[:1] + items[2:])  # no straddling pair: every image once
    policy = pair_log_probs(model, batch)
    with torch.no_grad(), model.disable_adapter():
        reused = pair_log_probs(model, batch, image_features=policy.image_features.detach())
        assert len(calls) == 1
        own = pair_log_probs(model, batch)
    assert calls == [sum(len(p.images) for p in pairs()) - 1] * 2
    torch.testing.assert_close(reused.chosen_logps, own.chosen_logps, rtol=0, atol=0)
    torch.testing.assert_close(reused.rejected_logps, own.rejected_logps, rtol=0, atol=0)
    assert not torch.allclose(own.chosen_logps, policy.chosen_logps.detach())  # the adapters matter


def test_flash_attention_is_refused(processor, items):
    model = tiny_model(processor)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4-D attention mask.*sdpa"):
        pair_log_probs(model, collate(processor, items[:1]))
