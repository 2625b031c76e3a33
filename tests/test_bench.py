"""Smoke tests of the CPU benchmarks in bench/: each `main()` runs with `--quick` (a few seconds)
and returns a well-formed result. No timing thresholds: the numbers are only checked to be
positive and finite, and the sanity checks the benchmarks assert themselves must pass."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def positive_finite(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def vision_crops():
    return load("vision_crops")


@pytest.fixture(scope="module")
def attention():
    return load("attention")


def test_vision_crops_quick(vision_crops, capsys):
    result = vision_crops.main(["--quick"])
    out = capsys.readouterr().out
    for line in ("sanity: loss", "model fwd+bwd", "vision fwd+bwd", "analytic FLOP estimate", "real Phi-3.5-vision"):
        assert line in out

    layout = result["layout"]
    assert layout["slots"] == 9 and layout["real_crops"] == 5 and layout["total_crops"] == 9
    sanity = result["sanity"]
    assert sanity["loss_all"] == sanity["loss_real"] and sanity["loss_abs_diff"] == 0.0
    assert (sanity["crops_all"], sanity["crops_real"]) == (9, 5)

    for part in ("step", "vision"):
        for clock in ("wall", "cpu"):
            r = result[part][clock]
            for key in ("all_s", "real_s", "ratio", "paired_ratio"):
                assert positive_finite(r[key]), (part, clock, key, r[key])
            assert all(len(r["times"][mode]) == 2 for mode in ("all", "real"))

    for name in ("bench", "real_model"):
        est = result["estimate"][name]
        assert est["vision_only"] == pytest.approx(9 / 5)
        assert 1.0 < est["frozen_clip"] < est["train"] < est["vision_only"]
        assert 0.0 < est["vision_share_real"] < est["vision_share_all"] < 1.0


def test_all_crops_emulation_encodes_every_slot_and_restores(vision_crops):
    import torch

    from phi3v.tiny import build_tiny_model, tiny_config

    model = build_tiny_model(tiny_config(vocab_size=128, pad_token_id=100), seed=0)
    embedding = model.model.vision_embed_tokens
    batch = vision_crops.make_batch([(672, 336), (336, 336)], 4, 100, 2, 3)
    seen = []
    hook = embedding.img_processor.vision_model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    with torch.no_grad():
        with vision_crops.encode_all_crops(embedding):
            emulated = embedding(batch["pixel_values"], batch["image_sizes"])
        native = embedding(batch["pixel_values"], batch["image_sizes"])
    hook.remove()
    assert seen == [10, 5]  # 2 images x 5 slots, then 3 + 2 real crops
    assert torch.equal(emulated, native)
    assert "forward" not in vars(embedding) and "encode_crops" not in vars(embedding)


def test_attention_quick(attention, capsys):
    result = attention.main(["--quick"])
    out = capsys.readouterr().out
    for line in ("agreement:", "backend check", "eager:", "sdpa:", "eager / sdpa:"):
        assert line in out

    assert result["config"]["seq_len"] == 512 and result["config"]["backward"]
    assert result["ops"]["eager"]["sdpa"] == 0 and result["ops"]["eager"]["softmax"] >= 1
    assert result["ops"]["sdpa"]["softmax"] == 0 and result["ops"]["sdpa"]["sdpa"] >= 1
    for mode in ("eager", "sdpa"):
        r = result[mode]
        for key in ("time_s", "cpu_s", "peak_mb"):
            assert positive_finite(r[key]), (mode, key, r[key])
        assert len(r["times"]) == 2 and all(positive_finite(t) for t in r["times"])
    for key in ("time_ratio", "paired_time_ratio", "cpu_ratio", "peak_ratio"):
        assert positive_finite(result[key]), (key, result[key])
    agreement = result["agreement"]
    assert math.isfinite(agreement["logits_max_abs_diff"]) and agreement["logits_max_abs_diff"] < 1e-3
    assert math.isfinite(agreement["grad_max_rel_diff"]) and agreement["grad_max_rel_diff"] < 1e-3


def test_peak_memory_meter(attention):
    import torch

    attention.check_peak_memory()  # raises if the meter is off on a known pattern

    def step():
        a = torch.ones(3 * attention.MB, dtype=torch.uint8)
        b = torch.ones(5 * attention.MB, dtype=torch.uint8)
        del a, b

    peak, end, _ = attention.peak_memory(step)
    assert (peak, end) == (8 * attention.MB, 0)


def test_throughput_quick(capsys):
    throughput = load("throughput")
    result = throughput.main(["--quick"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ours / original setup: ") and lines[-1].split()[5] == "images/s"
    assert any(line.startswith("ours+padding_free / original setup: ") for line in lines)

    assert [r["settings"]["attention"] for c in throughput.COLUMNS for r in result[c]["runs"]] == [
        "eager", "sdpa", "sdpa"]
    original, ours, packed = (result[c]["runs"][0]["settings"] for c in throughput.COLUMNS)
    assert original["all_crop_slots"] and not ours["all_crop_slots"]
    assert (original["batch_size_per_gpu"], original["workers"], original["sampling"]) == (1, 0, "random")
    assert packed["padding_free"] and packed["batch_size_per_gpu"] == 2 and packed["gradient_accumulation_steps"] == 1
    for column in throughput.COLUMNS:
        run = result[column]["runs"][0]
        # The timed step (the second of two) saw a whole global batch: 2 one-image examples.
        assert run["images"] == 2 and run["tokens"] > 2 * 300
        for key in ("images_per_s", "tokens_per_s", "images_per_cpu_s", "peak_mb"):
            assert positive_finite(result[column][key]), (column, key)
    ratio = float(lines[-1].split()[4].rstrip("x"))
    assert ratio == pytest.approx(result["ours"]["images_per_s_ratio"], abs=0.006)


@pytest.mark.parametrize("reference,encodes", [("fixed", 2), ("model", 4)])
def test_preference_quick(capsys, reference, encodes):
    # (The bench asserts itself that both layouts give the same log-probabilities.)
    result = load("preference").main(["--quick", "--reference", reference])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ours / two-sequence: ") and lines[-1].endswith("pairs/s (target >= 1.6x)")
    assert float(lines[-1].split()[3].rstrip("x")) == pytest.approx(result["ratio"], abs=0.006)
    # 2 one-image pairs per step: ours encodes each image once per step (the reference reuses the
    # policy's features); the two-sequence layout twice per model.
    assert result["images_per_step"] == {"ours": 2, "two-sequence": 2 * encodes}
    assert result["tokens_per_step"]["ours"] < 0.6 * result["tokens_per_step"]["two-sequence"]
    for name in ("ours", "two-sequence"):
        assert positive_finite(result[name]["pairs_per_s"]) and len(result[name]["times"]) == 2
    assert positive_finite(result["ratio"]) and positive_finite(result["paired_ratio"])


def test_throughput_real_size_needs_cuda():
    if __import__("torch").cuda.is_available():
        pytest.skip("CUDA present: --real_size is allowed here")
    with pytest.raises(SystemExit, match="--real_size needs a CUDA device"):
        load("throughput").main(["--real_size"])


@pytest.mark.slow  # two fresh processes (~1 min); the bf16 load itself has a CI test in test_distributed.py
def test_load_memory_quick(capsys):
    result = load("load_memory").main(["--quick"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("peak host memory per rank, bf16 load / fp32 load: ")
    assert [r["dtype"] for r in result["bf16"]["runs"]] == ["torch.bfloat16"]
    assert [r["dtype"] for r in result["fp32"]["runs"]] == ["torch.float32"]
    for column in ("bf16", "fp32"):
        assert positive_finite(result[column]["peak_mb"])
    # The bf16 load really holds half the bytes (at --quick's 7M parameters: 21 vs 46 MB of
    # growth); by how much the peak differs is the bench's to say (its ratio line), not a test's.
    assert result["bf16"]["load_growth_mb"] < result["fp32"]["load_growth_mb"]
    assert float(lines[-1].split()[-1].rstrip("x")) == pytest.approx(result["peak_ratio"], abs=0.006)


def test_throughput_real_size_settings_are_a_gpu_runs(monkeypatch):
    """--real_size (CUDA only) holds the weights as the recipe does with --bf16 and no DeepSpeed,
    and measures FlashAttention-2 as a fourth column when flash-attn imports."""
    import argparse
    import types

    import torch

    throughput = load("throughput")
    assert throughput.real_size_dtype("full") is torch.float32  # bf16 autocast, fp32 weights stepped
    assert throughput.real_size_dtype("frozen_vision") is torch.float32
    assert throughput.real_size_dtype("lora") is torch.bfloat16  # frozen base; fp32 adapters (PEFT)
    assert throughput.columns(argparse.Namespace(real_size=False)) == throughput.COLUMNS
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert throughput.columns(argparse.Namespace(real_size=True)) == (*throughput.COLUMNS, "ours+flash_attention_2")
    assert throughput.column_attention("ours+flash_attention_2") == "flash_attention_2"
    flags = throughput.column_flags("ours", argparse.Namespace(real_size=True, batch_size=4, num_crops=16, seed=0),
                                    Path("/tmp/x"), 3)
    assert "--bf16" in flags


@pytest.mark.slow  # four whole training processes (~2 min on a busy CPU)
def test_startup_quick(capsys):
    result = load("startup").main(["--quick"])
    out = capsys.readouterr().out
    assert "examples: cold" in out and out.strip().splitlines()[-1].startswith("cold/cached per-example cost")
    assert all(positive_finite(row["cold_s"]) and positive_finite(row["cached_s"]) for row in result["rows"].values())
