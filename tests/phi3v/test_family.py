"""Phi-3-vision-128k-instruct rules in the same classes (docs/checkpoint_format.md §5), chosen per checkpoint.

The two releases differ in the LongRoPE switch (3.5: key length, padding included; 128k:
max(position_ids) + 1) and in generation across the switch (3.5 drops the KV cache once;
128k keeps it). The threshold is the config's original_max_position_embeddings, so most tests
use a small one on the tiny model; one runs the issue's 4,064-token case at the real 4096.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

import phi3v  # noqa: F401  (registers the Auto classes)
from phi3v.configuration_phi3v import PHI3_5V, PHI3V_128K, Phi3VConfig, detect_model_family
from phi3v.image_processing_phi3v import released_auto_map
from phi3v.modeling_phi3v import Phi3VForCausalLM
from phi3v.tiny import TINY_VISION, build_tiny_model, tiny_config
from phi3v.tiny import main as tiny_main

RELEASE = Path(__file__).resolve().parents[1] / "fixtures" / "release"
R128K = RELEASE / "phi-3-vision-128k-instruct"
R35 = RELEASE / "phi-3.5-vision-instruct"


def small_threshold_model(family, original=16, seed=0):
    config = tiny_config(vocab_size=128, pad_token_id=100, original_max_position_embeddings=original,
                         max_position_embeddings=32 * original, model_family=family)
    return build_tiny_model(config, seed=seed)


def left_padded(ids, total, pad_id):
    """ids left-padded to `total`, with the mask and the position ids generate() would use."""
    pad = total - ids.shape[1]
    padded = torch.cat([torch.full((1, pad), pad_id), ids], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], 1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return padded, mask, positions


def padding_effect(model, real, total):
    """Largest change that left padding to `total` makes to the real tokens' hidden states."""
    ids = torch.randint(3, 99, (1, real), generator=torch.Generator().manual_seed(0))
    padded, mask, positions = left_padded(ids, total, model.config.pad_token_id)
    with torch.no_grad():
        alone = model.model(input_ids=ids).last_hidden_state
        in_batch = model.model(input_ids=padded, attention_mask=mask, position_ids=positions).last_hidden_state
    return (alone - in_batch[:, total - real:]).abs().max().item()


# -- the switch rule -----------------------------------------------------------------------------


def test_128k_switches_on_positions_so_left_padding_past_the_threshold_changes_nothing():
    # 14 real tokens padded to 20: the key length passes 16, the positions (0..13) do not.
    assert padding_effect(small_threshold_model(PHI3V_128K), real=14, total=20) < 1e-5
    # Same model under the 3.5 rule: the padded row gets the long factors (the test can fail).
    assert padding_effect(small_threshold_model(PHI3_5V), real=14, total=20) > 1e-3


def test_128k_uses_long_factors_once_the_positions_pass_the_threshold():
    model = small_threshold_model(PHI3V_128K)
    rope = model.model.rotary_emb
    x = torch.zeros(1)
    short, _ = rope(x, torch.arange(16)[None], key_length=40)  # key length ignored under 128k
    long, _ = rope(x, torch.arange(17)[None], key_length=17)
    assert torch.equal(short, rope(x, torch.arange(16)[None], key_length=16)[0])
    assert not torch.allclose(short, long[:, :16])
    # The largest position over the whole batch decides, as in the official code.
    batch = torch.stack([torch.arange(17) - 1, torch.arange(17)]).clamp(min=0)
    assert torch.equal(rope(x, batch, key_length=17)[0][1], long[0])


# -- generation across the threshold ------------------------------------------------------------


def _mixed_rotary(rope, prompt_len):
    """cos/sin where token p has the factors it had when 128k decoding computed it: long iff
    max(prompt_len, p + 1) > original_max (the prompt in one forward, then one token each)."""

    def forward(x, position_ids, key_length):
        pos = position_ids[0].float()
        length = torch.maximum(torch.full_like(pos, prompt_len), pos + 1)
        inv = torch.where((length > rope.original_max_position_embeddings)[:, None],
                          rope.long_inv_freq[None], rope.short_inv_freq[None])
        angles = pos[:, None] * inv
        emb = torch.cat([angles, angles], -1)[None]
        return emb.cos() * rope.attention_scaling, emb.sin() * rope.attention_scaling

    return forward


def _greedy(model, ids, use_cache, n=4):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
            use_cache=use_cache, eos_token_id=None, pad_token_id=100, output_logits=True,
            return_dict_in_generate=True,
        )


def _record_input_lengths(model):
    """Tokens each forward of the decoder receives (a dropped cache shows as a full-length one)."""
    lengths = []
    original = model.model.forward
    model.model.forward = lambda *a, **k: lengths.append(k["input_ids"].shape[1]) or original(*a, **k)
    return lengths


PROMPT = torch.randint(3, 99, (1, 16), generator=torch.Generator().manual_seed(2))  # = the threshold


def test_128k_cached_generation_across_the_threshold_keeps_the_cache():
    """Cached 128k generation equals an uncached forward in which every token keeps the factors
    it was computed with (what keeping the short-factor cache means)."""
    model = small_threshold_model(PHI3V_128K, seed=3)
    lengths = _record_input_lengths(model)
    cached = _greedy(model, PROMPT, use_cache=True)
    assert lengths == [16, 1, 1, 1]  # no recompute when the sequence passes 16 (3.5: 16, 17, 1, 1)
    del model.model.forward

    rope = model.model.rotary_emb
    rope.forward = _mixed_rotary(rope, prompt_len=PROMPT.shape[1])
    for step, logits in enumerate(cached.logits):
        with torch.no_grad():
            reference = model(input_ids=cached.sequences[:, : PROMPT.shape[1] + step]).logits[:, -1]
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    del rope.forward  # back to the class method

    # Plain uncached decoding recomputes the prompt with long factors after the switch, so it
    # differs from the cached run from the second generated token on (the official 128k quirk).
    uncached = _greedy(model, PROMPT, use_cache=False)
    torch.testing.assert_close(cached.logits[0], uncached.logits[0])
    assert not torch.allclose(cached.logits[2], uncached.logits[2], atol=1e-4)


def test_35_generation_still_drops_the_cache_at_the_threshold():
    model = small_threshold_model(PHI3_5V, seed=3)
    lengths = _record_input_lengths(model)
    cached = _greedy(model, PROMPT, use_cache=True)
    assert lengths == [16, 17, 1, 1]  # prefill, the recompute of all 17 with long factors, steps
    uncached = _greedy(model, PROMPT, use_cache=False)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- which rules a checkpoint gets --------------------------------------------------------------


def test_release_configs_are_told_apart():
    assert AutoConfig.from_pretrained(R128K).model_family == PHI3V_128K
    assert AutoConfig.from_pretrained(R35).model_family == PHI3_5V
    assert Phi3VConfig().model_family == PHI3_5V
    # The rule, key by key (documented in detect_model_family).
    assert detect_model_family({"sliding_window": 131072}) == PHI3V_128K
    assert detect_model_family({"_name_or_path": "microsoft/Phi-3-vision-128k-instruct"}) == PHI3V_128K
    assert detect_model_family({"sliding_window": 262144, "_name_or_path": "Phi-3.5-vision-instruct"}) == PHI3_5V
    assert detect_model_family({"sliding_window": 131072, "model_family": PHI3_5V}) == PHI3_5V
    with pytest.raises(ValueError, match="model_family"):
        tiny_config(model_family="phi4")


@pytest.mark.parametrize("release, family", [(R128K, PHI3V_128K), (R35, PHI3_5V)])
def test_save_load_keeps_the_family_and_the_release_key_set(release, family, tmp_path):
    AutoConfig.from_pretrained(release).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    official = json.loads((release / "config.json").read_text())
    ignored = {"_name_or_path", "_attn_implementation", "transformers_version"}
    extra = {"model_family"} if family == PHI3V_128K else set()
    assert set(written) - ignored == (set(official) - ignored) | extra
    assert written.get("model_family", PHI3_5V) == family
    assert AutoConfig.from_pretrained(tmp_path).model_family == family


def test_override_survives_save_and_load(tmp_path):
    config = AutoConfig.from_pretrained(R128K, model_family=PHI3_5V)
    assert config.model_family == PHI3_5V
    config.save_pretrained(tmp_path)
    # sliding_window still says 128k, so the override must be written down to survive.
    assert json.loads((tmp_path / "config.json").read_text())["model_family"] == PHI3_5V
    assert AutoConfig.from_pretrained(tmp_path).model_family == PHI3_5V


def cut_release_dir(release: Path, out: Path, **changes) -> Path:
    """A directory laid out like `release` (its config.json keys and values, its preprocessor and
    tokenizer files) with tiny widths and random weights."""
    config = json.loads((release / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vision_config=dict(TINY_VISION), **changes)
    config["img_processor"] = {**config["img_processor"], "image_dim_out": TINY_VISION["hidden_size"]}
    n = 64 // 4 // 2
    config["rope_scaling"] = {**config["rope_scaling"], "short_factor": config["rope_scaling"]["short_factor"][:n],
                              "long_factor": config["rope_scaling"]["long_factor"][:n]}
    config.pop("_attn_implementation", None)
    torch.manual_seed(0)
    Phi3VForCausalLM(Phi3VConfig(**config)).save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2))  # the release's own file, cut
    for path in release.iterdir():
        if path.name != "config.json":
            shutil.copy(path, out / path.name)
    return out


@pytest.fixture(scope="module")
def release_128k_dir(tmp_path_factory):
    return cut_release_dir(R128K, tmp_path_factory.mktemp("r128k"))


def test_a_128k_release_directory_loads_with_the_128k_rules(release_128k_dir):
    assert "model_family" not in json.loads((release_128k_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(release_128k_dir, dtype=torch.float32).eval()
    assert model.config.model_family == PHI3V_128K
    assert model.config.original_max_position_embeddings == 4096
    # The case at the real threshold: 4,064 real tokens left-padded to 4,104.
    assert padding_effect(model, real=4064, total=4104) < 1e-4
    processor = AutoProcessor.from_pretrained(release_128k_dir)
    assert processor.image_processor.num_crops == 16  # from its preprocessor_config.json


# -- processor ----------------------------------------------------------------------------------


@pytest.mark.parametrize("release, num_crops", [(R128K, 16), (R35, 4)])
def test_processor_defaults_come_from_the_release_preprocessor_and_are_written_back(release, num_crops, tmp_path):
    processor = AutoProcessor.from_pretrained(release)
    assert processor.image_processor.num_crops == num_crops
    processor.save_pretrained(tmp_path)
    official = json.loads((release / "preprocessor_config.json").read_text())
    written = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert written["auto_map"] == official["auto_map"]  # 128k: image_processing_phi3_v.Phi3VImageProcessor
    # Same keys; the 128k file leaves do_convert_rgb out (its default, True, is what we write).
    assert set(written) - {"do_convert_rgb"} == set(official) - {"do_convert_rgb"} and written["do_convert_rgb"]
    assert {k: written[k] for k in official} == official
    reloaded = AutoProcessor.from_pretrained(tmp_path).image_processor
    assert reloaded.num_crops == num_crops and released_auto_map(reloaded.auto_map) == official["auto_map"]


# -- the tiny factory ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_128k(tmp_path_factory):
    out = tmp_path_factory.mktemp("t128k")
    assert tiny_main(["--output_dir", str(out), "--family", PHI3V_128K]) is None
    return out


def test_tiny_128k_checkpoint_is_laid_out_like_the_release(tiny_128k):
    names = {p.name for p in tiny_128k.iterdir()}
    assert "generation_config.json" not in names  # the 128k release has none
    config = json.loads((tiny_128k / "config.json").read_text())
    official = json.loads((R128K / "config.json").read_text())
    # Its keys, plus the tiny widths and the tiny vocabulary's pad id (the release's is the default).
    assert set(config) == set(official) - {"_name_or_path", "_attn_implementation"} | {"vision_config", "pad_token_id"}
    assert config["sliding_window"] == 131072 and config["auto_map"] == official["auto_map"]
    pre = json.loads((tiny_128k / "preprocessor_config.json").read_text())
    official_pre = json.loads((R128K / "preprocessor_config.json").read_text())
    assert set(pre) - {"do_convert_rgb"} == set(official_pre)
    assert pre["auto_map"] == official_pre["auto_map"] and pre["num_crops"] == 16


def test_tiny_128k_checkpoint_loads_with_the_128k_rules_and_keeps_them_when_saved(tiny_128k, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_128k)
    processor = AutoProcessor.from_pretrained(tiny_128k)
    assert model.config.model_family == PHI3V_128K and processor.image_processor.num_crops == 16
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_family"] == PHI3V_128K
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.model_family == PHI3V_128K
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert pre["auto_map"]["AutoImageProcessor"] == "image_processing_phi3_v.Phi3VImageProcessor"


def test_tiny_default_family_is_unchanged(tmp_path):
    tiny_main(["--output_dir", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    assert "model_family" not in config and config["sliding_window"] == 262144
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["num_crops"] == 4
    assert AutoConfig.from_pretrained(tmp_path).model_family == PHI3_5V


@pytest.mark.parametrize("flag, family", [("auto", PHI3V_128K), ("phi3.5v", PHI3_5V)])
def test_model_family_flag_of_the_scripts(flag, family, tiny_128k, tmp_path):
    from recipe.flag_parser import parse_args
    from recipe.model import load_model

    model_args, _, training_args = parse_args(argv=[
        "--model_name_or_path", str(tiny_128k), "--output_dir", str(tmp_path), "--deepspeed", "none",
        "--model_family", flag])
    assert load_model(model_args, training_args).config.model_family == family
    from recipe.errors import FlagError

    with pytest.raises(FlagError, match=r"--model_family.*invalid choice: 'phi4'"):  # one `error:` line
        parse_args(argv=["--output_dir", str(tmp_path), "--model_family", "phi4"])
