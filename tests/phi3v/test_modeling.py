"""Behaviour of the native Phi-3.5-vision model on the tiny random configuration."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

import phi3v  # noqa: F401  (registers the Auto classes)
from phi3v.configuration_phi3v import Phi3VConfig
from phi3v.modeling_phi3v import Phi3VForCausalLM, Phi3VRotaryEmbedding
from phi3v.tiny import build_tiny_model, tiny_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CROP = 336


def tokens_per_image(h, w, g=12):
    rows, cols = h // CROP, w // CROP
    return rows * g * (cols * g + 1) + 1 + g * (g + 1)


def random_pixels(image_sizes, num_crops, seed=0, pad_value=0.0):
    """pixel_values as the processor lays them out: real crops first, then padding crops."""
    gen = torch.Generator().manual_seed(seed)
    pv = torch.full((len(image_sizes), num_crops + 1, 3, CROP, CROP), pad_value)
    for i, (h, w) in enumerate(image_sizes):
        real = 1 + (h // CROP) * (w // CROP)
        pv[i, :real] = torch.randn(real, 3, CROP, CROP, generator=gen)
    return pv


def prompt_ids(n_image_tokens, image_number=1, before=(1, 5, 6), after=(1, 7, 8, 9)):
    return list(before) + [-image_number] * n_image_tokens + list(after)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(tiny_config(vocab_size=128, pad_token_id=100), seed=0)


# -- checkpoint format -------------------------------------------------------------------------


def test_full_size_model_has_exactly_the_official_parameter_names_and_shapes():
    config = Phi3VConfig.from_pretrained(FIXTURES / "official_config.json")
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = json.loads((FIXTURES / "phi3v_official_keys.json").read_text())
    assert ours == official
    assert sum(math.prod(s) for s in ours.values()) == 4_146_621_440


def _scaled_official_keys(n_text, n_vision):
    official = json.loads((FIXTURES / "phi3v_official_keys.json").read_text())
    keep = set()
    for key in official:
        parts = key.split(".")
        if "layers" in parts:
            index = int(parts[parts.index("layers") + 1])
            limit = n_vision if "vision_model" in parts else n_text
            if index >= limit:
                continue
        keep.add(key)
    return keep


def test_saved_tiny_checkpoint_uses_official_names(model, tmp_path):
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    cfg = model.config
    assert saved == _scaled_official_keys(cfg.num_hidden_layers, cfg.vision_config.num_hidden_layers)
    assert not any(k.endswith(".wte.weight") for k in saved)


def test_save_then_load_is_exact_and_needs_no_remote_code(model, tmp_path):
    model.save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["model_type"] == "phi3_v"
    assert config_json["auto_map"]["AutoModelForCausalLM"] == "modeling_phi3_v.Phi3VForCausalLM"
    assert config_json["rope_scaling"]["type"] == "su" and "rope_parameters" not in config_json
    assert config_json["architectures"] == ["Phi3VForCausalLM"]

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code
    assert type(loaded) is Phi3VForCausalLM
    ref, new = model.state_dict(), loaded.state_dict()
    assert ref.keys() == new.keys()
    assert all(torch.equal(ref[k], new[k]) for k in ref)
    ids = torch.tensor([prompt_ids(tokens_per_image(336, 672))])
    inputs = dict(input_ids=ids, pixel_values=random_pixels([(336, 672)], 4), image_sizes=torch.tensor([[336, 672]]))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded.eval()(**inputs).logits)


def test_official_config_json_loads_through_auto_config():
    config = AutoConfig.from_pretrained(FIXTURES / "official_config.json")
    assert isinstance(config, Phi3VConfig)
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.vision_config.hidden_size == 1024 and config.vision_config.num_hidden_layers == 24
    assert config.vision_feature_layer == 23  # layer_idx -2 of 24
    # The release asks for flash-attention-2; it must not be forced on machines without it.
    assert config._attn_implementation in (None, "sdpa", "eager")


def test_config_round_trip_writes_the_official_keys(tmp_path):
    official = json.loads((FIXTURES / "official_config.json").read_text())
    Phi3VConfig.from_pretrained(FIXTURES / "official_config.json").save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    ignored = {"_name_or_path", "_attn_implementation", "transformers_version"}
    assert set(official) - ignored == set(written) - ignored
    for key in set(official) - ignored:
        assert written[key] == official[key], key


@pytest.mark.parametrize(
    "change, message",
    [
        ({"embd_layer": {"hd_transform_order": "glb_sub"}}, "hd_transform_order"),
        ({"rope_scaling": {"type": "yarn", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}}, "yarn"),
        ({"img_processor": {"name": "siglip"}}, "clip_vision_model"),
        ({"img_processor": {"name": "clip_vision_model", "model_name": "x", "image_dim_out": 32,
                            "num_img_tokens": 100}}, "num_img_tokens"),
    ],
)
def test_config_rejects_unsupported_variants(change, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**change)


# -- vision path -----------------------------------------------------------------------------


def test_vision_features_are_clip_layer_minus_2_of_the_library_clip(model):
    vision = model.model.vision_embed_tokens.img_processor.vision_model
    clip = CLIPVisionModel(CLIPVisionConfig(**model.config.vision_config.to_dict())).eval()
    missing, unexpected = clip.load_state_dict(vision.state_dict(), strict=False)
    assert not missing and not unexpected
    pixels = torch.randn(2, 3, CROP, CROP)
    with torch.no_grad():
        reference = clip(pixels, output_hidden_states=True).hidden_states[-2]
        ours = vision(pixels, model.model.vision_embed_tokens.num_layers)
    torch.testing.assert_close(ours, reference)


def reference_image_features(model, pixel_values, image_sizes):
    """The feature assembly (docs/checkpoint_format.md §3) written out with loops.

    Runs CLIP on *every* crop, padding crops included, as the official code does.
    """
    emb = model.model.vision_embed_tokens
    n, c = pixel_values.shape[:2]
    with torch.no_grad():
        vision = emb.img_processor.vision_model
        patches = vision(pixel_values.flatten(0, 1), emb.num_layers)[:, 1:].reshape(n, c, 24, 24, -1)
        sequences = []
        for i, (h, w) in enumerate(image_sizes.tolist()):
            def merged(crop, r, q):
                p = patches[i, crop]
                return torch.cat([p[2 * r, 2 * q], p[2 * r, 2 * q + 1], p[2 * r + 1, 2 * q], p[2 * r + 1, 2 * q + 1]])

            rows, cols = h // CROP, w // CROP
            tokens = []
            for gr in range(12 * rows):
                for gc in range(12 * cols):
                    crop = 1 + (gr // 12) * cols + gc // 12
                    tokens.append(merged(crop, gr % 12, gc % 12))
                tokens.append(emb.sub_GN.reshape(-1))
            tokens.append(emb.glb_GN.reshape(-1))
            for r in range(12):
                tokens.extend(merged(0, r, q) for q in range(12))
                tokens.append(emb.sub_GN.reshape(-1))
            sequences.append(torch.stack(tokens))
        return emb.img_projection(torch.cat(sequences))


def test_hd_assembly_matches_a_loop_reference_that_encodes_every_crop(model):
    sizes = torch.tensor([[672, 336], [336, 1008], [336, 336]])
    pv = random_pixels(sizes.tolist(), num_crops=4, seed=1)
    with torch.no_grad():
        features = model.get_image_features(pv, sizes)
    assert features.shape[0] == sum(tokens_per_image(h, w) for h, w in sizes.tolist())
    torch.testing.assert_close(features, reference_image_features(model, pv, sizes), rtol=1e-4, atol=1e-5)


def test_padding_crops_cost_nothing_and_change_nothing(model, monkeypatch):
    sizes = torch.tensor([[672, 672]])
    ids = torch.tensor([prompt_ids(tokens_per_image(672, 672))])
    zeros = random_pixels(sizes.tolist(), num_crops=16, pad_value=0.0)
    noise = zeros.clone()
    noise[:, 5:] = torch.randn_like(noise[:, 5:])  # padding crops full of garbage

    seen = []
    emb = model.model.vision_embed_tokens
    original = emb.encode_crops
    monkeypatch.setattr(emb, "encode_crops", lambda crops: seen.append(crops.shape[0]) or original(crops))
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=zeros, image_sizes=sizes).logits
        b = model(input_ids=ids, pixel_values=noise, image_sizes=sizes).logits
    assert seen == [5, 5]  # 1 global + 2x2 local crops of 17
    assert torch.equal(a, b)


def test_image_tokens_must_match_features(model):
    sizes = torch.tensor([[336, 336]])
    pv = random_pixels(sizes.tolist(), 1)
    with pytest.raises(ValueError, match="313 features"):
        model(input_ids=torch.tensor([prompt_ids(300)]), pixel_values=pv, image_sizes=sizes)
    with pytest.raises(ValueError, match="pixel_values"):
        model(input_ids=torch.tensor([prompt_ids(313)]))
    with pytest.raises(ValueError, match="5-D"):
        model(input_ids=torch.tensor([prompt_ids(313)]), pixel_values=pv[0], image_sizes=sizes)
    with pytest.raises(ValueError, match="crops"):
        model(input_ids=torch.tensor([prompt_ids(757)]), pixel_values=pv, image_sizes=torch.tensor([[672, 672]]))


def test_image_features_are_returned_and_taken_back(model):
    """`image_hidden_states` out of one forward, into another: same logits, no vision tower run."""
    sizes = torch.tensor([[336, 336]])
    ids = torch.tensor([prompt_ids(313)])
    calls = []
    hook = model.model.vision_embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        first = model(input_ids=ids, pixel_values=random_pixels([(336, 336)], 1), image_sizes=sizes)
        again = model(input_ids=ids, image_hidden_states=first.image_hidden_states)
        with pytest.raises(ValueError, match="image_hidden_states hold 313 features"):
            model(input_ids=torch.tensor([prompt_ids(300)]), image_hidden_states=first.image_hidden_states)
    hook.remove()
    assert calls == [1] and first.image_hidden_states.shape == (313, model.config.hidden_size)
    torch.testing.assert_close(again.logits, first.logits, rtol=0, atol=0)
    assert model(input_ids=torch.tensor([[1, 5, 6]])).image_hidden_states is None


def test_sequence_lengths_choose_rotary_factors_per_token():
    """Two sequences in one row (a 4-D mask keeps them apart): each token gets its own sequence's
    LongRoPE factors, as if it ran alone, whatever the row's width or largest position."""
    config = tiny_config(vocab_size=128, pad_token_id=100, original_max_position_embeddings=16)
    m = build_tiny_model(config).eval()
    short, long = torch.randint(3, 99, (1, 10)), torch.randint(3, 99, (1, 20))
    row = torch.cat([short, long], 1)
    position_ids = torch.cat([torch.arange(10), torch.arange(20)])[None]
    block = torch.zeros(30, 30, dtype=torch.bool)
    block[:10, :10] = block[10:, 10:] = True
    mask = (block & torch.ones(30, 30, dtype=torch.bool).tril())[None, None]
    lengths = torch.tensor([10] * 10 + [20] * 20)[None]
    with torch.no_grad():
        together = m(input_ids=row, attention_mask=mask, position_ids=position_ids, sequence_lengths=lengths).logits
        alone = torch.cat([m(input_ids=short).logits, m(input_ids=long).logits], 1)
        without = m(input_ids=row, attention_mask=mask, position_ids=position_ids).logits  # one choice for the row
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(without[:, :10], alone[:, :10], atol=1e-4)


def test_caller_input_ids_are_not_modified(model):
    ids = torch.tensor([prompt_ids(313)])
    before = ids.clone()
    with torch.no_grad():
        model(input_ids=ids, pixel_values=random_pixels([(336, 336)], 1), image_sizes=torch.tensor([[336, 336]]))
    assert torch.equal(ids, before)


# -- batching ----------------------------------------------------------------------------------


def _row(model, ids, sizes):
    sizes_t = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
    pv = random_pixels(sizes, 4, seed=len(ids)) if sizes else None
    return torch.tensor([ids]), pv, (sizes_t if sizes else None)


def test_mixed_batch_equals_rows_run_alone(model):
    rows = [
        (prompt_ids(tokens_per_image(336, 672)), [(336, 672)]),
        ([1, 11, 12, 13, 14, 15], []),
        (prompt_ids(tokens_per_image(336, 336)) + prompt_ids(tokens_per_image(672, 336), 2, before=(20,)),
         [(336, 336), (672, 336)]),
    ]
    pad = model.config.pad_token_id
    length = max(len(ids) for ids, _ in rows)
    batch_ids, mask, pvs, sizes, alone = [], [], [], [], []
    for ids, image_sizes in rows:
        ids_t, pv, sizes_t = _row(model, ids, image_sizes)
        with torch.no_grad():
            alone.append(model(input_ids=ids_t, pixel_values=pv, image_sizes=sizes_t).logits[0])
        batch_ids.append(ids + [pad] * (length - len(ids)))
        mask.append([1] * len(ids) + [0] * (length - len(ids)))
        if pv is not None:
            pvs.append(pv)
            sizes.append(sizes_t)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(batch_ids),
            attention_mask=torch.tensor(mask),
            pixel_values=torch.cat(pvs),
            image_sizes=torch.cat(sizes),
        ).logits
    for i, (ids, _) in enumerate(rows):
        torch.testing.assert_close(out[i, : len(ids)], alone[i], rtol=1e-4, atol=1e-4)


def test_text_only_batch(model):
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 100]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert out.logits.shape == (2, 4, 128) and torch.isfinite(out.loss)


# -- training ----------------------------------------------------------------------------------


def _training_batch():
    sizes = torch.tensor([[336, 672], [336, 336]])
    ids = prompt_ids(tokens_per_image(336, 672)) + prompt_ids(tokens_per_image(336, 336), 2, before=(30,))
    ids = torch.tensor([ids])
    labels = ids.clone()
    labels[:, :-3] = -100
    return dict(input_ids=ids, labels=labels, pixel_values=random_pixels(sizes.tolist(), 4), image_sizes=sizes)


def test_forward_backward_reaches_vision_projector_and_text(model):
    m = build_tiny_model(model.config, seed=0).train()
    out = m(**_training_batch())
    out.loss.backward()
    emb = m.model.vision_embed_tokens
    vision = emb.img_processor.vision_model
    for name, param in [
        ("patch", vision.embeddings.patch_embedding.weight),
        ("layer0", vision.encoder.layers[0].mlp.fc1.weight),
        ("proj", emb.img_projection[0].weight),
        ("sub_GN", emb.sub_GN),
        ("glb_GN", emb.glb_GN),
        ("qkv", m.model.layers[0].self_attn.qkv_proj.weight),
        ("lm_head", m.lm_head.weight),
    ]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # Unused by design: the last CLIP layer and the post-layernorm never get gradients.
    assert vision.encoder.layers[-1].mlp.fc1.weight.grad is None
    assert vision.post_layernorm.weight.grad is None


def test_loss_ignores_image_positions_in_labels(model):
    batch = _training_batch()
    batch["labels"] = batch["input_ids"].clone()  # negative ids included
    with torch.no_grad():
        loss = model(**batch).loss
        masked = model(**{**batch, "labels": batch["labels"].masked_fill(batch["labels"] < 0, -100)}).loss
    assert torch.isfinite(loss) and torch.equal(loss, masked)


def test_gradient_checkpointing_gives_the_same_gradients(model):
    grads = []
    for checkpointing in (False, True):
        m = build_tiny_model(model.config, seed=0).train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in m.model.layers)
            assert all(
                layer.gradient_checkpointing
                for layer in m.model.vision_embed_tokens.img_processor.vision_model.encoder.layers
            )
        m(**_training_batch()).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


# -- attention backends ------------------------------------------------------------------------


def test_sdpa_is_default_and_eager_agrees(model, tmp_path):
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    eager = Phi3VForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config.vision_config._attn_implementation == "eager"
    batch = _training_batch()
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, eager(**batch).logits, rtol=1e-4, atol=1e-4)


def test_flash_attention_requested_without_the_package_is_a_clear_error(model, tmp_path):
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pass
    else:  # a GPU node with flash-attn installed: nothing to check here
        return
    model.save_pretrained(tmp_path)
    with pytest.raises((ImportError, ValueError), match="(?i)flash"):
        Phi3VForCausalLM.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


# -- LongRoPE ----------------------------------------------------------------------------------


def test_longrope_factor_choice_by_key_length_and_constant_scale():
    config = tiny_config(vocab_size=128, pad_token_id=100)
    rope = Phi3VRotaryEmbedding(config)
    assert rope.attention_scaling == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    x = torch.zeros(1, dtype=torch.float32)
    pos = torch.arange(10)[None]
    short = config.rope_parameters["short_factor"]
    long = config.rope_parameters["long_factor"]
    head_dim = config.hidden_size // config.num_attention_heads
    for key_length, factors in [(4096, short), (4097, long)]:
        cos, _ = rope(x, pos, key_length=key_length)
        inv = 1.0 / (torch.tensor(factors) * 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = pos[0, :, None].float() * inv
        expected = torch.cat([angles, angles], -1).cos() * rope.attention_scaling
        torch.testing.assert_close(cos[0], expected)


def test_padded_batch_switches_on_key_length_not_position():
    """Official: a left-padded row whose positions stay below the limit still uses long factors
    once the padded key length passes original_max_position_embeddings."""
    config = tiny_config(vocab_size=128, pad_token_id=100, original_max_position_embeddings=16,
                         max_position_embeddings=512)
    m = build_tiny_model(config).eval()
    calls = []
    original = m.model.rotary_emb.forward
    m.model.rotary_emb.forward = lambda x, p, key_length: calls.append(key_length) or original(x, p, key_length)
    ids = torch.randint(3, 99, (1, 17))
    with torch.no_grad():
        m(input_ids=ids, position_ids=torch.arange(17)[None].clamp(max=10))
    assert calls == [17]
    cos_long, _ = original(torch.zeros(1), torch.arange(3)[None], 17)
    cos_short, _ = original(torch.zeros(1), torch.arange(3)[None], 16)
    assert not torch.allclose(cos_long, cos_short)


# -- generation --------------------------------------------------------------------------------


def _generate(model, ids, mask, pv, sizes, use_cache, n=6):
    return model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes,
        max_new_tokens=n, do_sample=False, use_cache=use_cache, eos_token_id=None, pad_token_id=100,
    )


def test_cached_greedy_equals_uncached(model):
    sizes = torch.tensor([[336, 672]])
    ids = torch.tensor([prompt_ids(tokens_per_image(336, 672))])
    pv = random_pixels(sizes.tolist(), 4)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        cached = _generate(model, ids, mask, pv, sizes, True)
        uncached = _generate(model, ids, mask, pv, sizes, False)
    assert cached.shape[1] == ids.shape[1] + 6
    assert torch.equal(cached, uncached)


def test_batched_left_padded_generation_equals_single(model):
    rows = [prompt_ids(tokens_per_image(336, 336)), [1, 40, 41, 42, 43], prompt_ids(tokens_per_image(336, 672))]
    sizes = torch.tensor([[336, 336], [336, 672]])
    pv = random_pixels(sizes.tolist(), 4)
    length = max(map(len, rows))
    ids = torch.tensor([[100] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batched = _generate(model, ids, mask, pv, sizes, True)[:, length:]
        singles = [
            _generate(model, torch.tensor([rows[0]]), None, pv[:1], sizes[:1], True)[:, len(rows[0]):],
            _generate(model, torch.tensor([rows[1]]), None, None, None, True)[:, len(rows[1]):],
            _generate(model, torch.tensor([rows[2]]), None, pv[1:], sizes[1:], True)[:, len(rows[2]):],
        ]
    assert torch.equal(batched, torch.cat(singles))


def test_generation_across_the_longrope_switch_resets_the_cache():
    """Official quirk: crossing original_max_position_embeddings drops the short-factor cache
    and recomputes everything (images included) with long factors; cached then equals uncached."""
    config = tiny_config(vocab_size=128, pad_token_id=100, original_max_position_embeddings=320,
                         max_position_embeddings=4096)
    m = build_tiny_model(config, seed=3).eval()
    sizes = torch.tensor([[336, 336]])
    ids = torch.tensor([prompt_ids(313)])  # 320 tokens: the switch happens while generating
    pv = random_pixels(sizes.tolist(), 1)
    runs = []
    for use_cache in (True, False):
        with torch.no_grad():
            out = m.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_sizes=sizes,
                max_new_tokens=4, do_sample=False, use_cache=use_cache, eos_token_id=None, pad_token_id=100,
                output_logits=True, return_dict_in_generate=True,
            )
        runs.append(out)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    # Logits, not just argmax: a stale short-factor cache would shift them after the switch.
    for cached, uncached in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)


# -- quantisation ------------------------------------------------------------------------------


def test_bitsandbytes_4bit_load_and_lora_train_step_on_cpu(model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    model.save_pretrained(tmp_path)
    # As the recipe: the image side stays unquantised. (The tiny CLIP's 32-wide layers are also
    # narrower than bitsandbytes' 64-value quantisation block, which its CPU kernels reject.)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["lm_head", "model.vision_embed_tokens"])
    q = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    import bitsandbytes as bnb

    assert isinstance(q.model.layers[0].self_attn.qkv_proj, bnb.nn.Linear4bit)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                                                         "img_projection.0", "img_projection.2"])
    peft_model = get_peft_model(q, lora)
    out = peft_model(**_training_batch())
    out.loss.backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(g.abs().sum() > 0 for g in lora_grads)


def test_generation_runs_the_vision_tower_only_on_the_first_step(model, monkeypatch):
    emb = model.model.vision_embed_tokens
    calls = []
    original = emb.encode_crops
    monkeypatch.setattr(emb, "encode_crops", lambda crops: calls.append(crops.shape[0]) or original(crops))
    sizes = torch.tensor([[336, 672]])
    ids = torch.tensor([prompt_ids(tokens_per_image(336, 672))])
    with torch.no_grad():
        out = _generate(model, ids, torch.ones_like(ids), random_pixels(sizes.tolist(), 4), sizes, True, n=5)
    assert out.shape[1] == ids.shape[1] + 5
    assert calls == [3]  # one prefill, 1 global + 2 local crops; decoding steps reuse the cache


def test_never_run_clip_layers_stay_frozen_after_loading(model, tmp_path):
    model.save_pretrained(tmp_path)
    for loaded in (Phi3VForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        frozen = {n for n, p in loaded.named_parameters() if not p.requires_grad}
        assert frozen and all(".encoder.layers.2." in n or "post_layernorm" in n for n in frozen)
        assert not any(p.requires_grad for p in loaded.model.vision_embed_tokens.img_processor.vision_model
                       .encoder.layers[-1].parameters())


def test_rotary_frequencies_stay_fp32_after_a_dtype_cast():
    config = tiny_config(vocab_size=128, pad_token_id=100)
    rope = Phi3VRotaryEmbedding(config)
    x = torch.zeros(1)
    pos = torch.arange(4000)[None]
    reference, _ = rope(x, pos, key_length=4000)
    rope.to(torch.bfloat16)
    cast, _ = rope(x, pos, key_length=4000)
    torch.testing.assert_close(cast, reference)


def test_generation_stops_at_end_and_endoftext_by_default():
    m = build_tiny_model(tiny_config(vocab_size=1152, pad_token_id=1024))
    assert m.generation_config.eos_token_id == [1031, 1024]  # <|end|>, <|endoftext|>
    assert m.generation_config.pad_token_id == 1024
