"""recipe/report.py: the model FLOPs behind the MFU in run_complete.json, per training mode,
against a sum written out from the config; the peak by device name and precision; the
per-sequence squares the attention term needs, with padding and with packed rows."""

import logging

import pytest
import torch

import finetune_hf_trainer_ucf101 as ucf
from recipe.flag_checks import check_flags
from recipe.flag_parser import parse_args
from recipe.model import load_model
from recipe.report import Throughput, mfu, model_flops, peak_flops

MODES = {
    "full": [],
    "frozen_vision": ["--freeze_vision_model"],
    "lora": ["--use_lora"],
    "lora_frozen_vision": ["--use_lora", "--freeze_vision_model"],
    "qlora": ["--use_qlora"],
}


def parsed(tiny, data, out, *extra):
    argv = ["--model_name_or_path", str(tiny), "--data_dir", str(data), "--output_dir", str(out), "--num_crops", "1",
            "--deepspeed", "none", "--no-tqdm", *map(str, extra)]
    model_args, data_args, training_args = parse_args(ucf.Ucf101Arguments, argv, ucf.TASK.defaults)
    check_flags(model_args, data_args, training_args)
    return model_args, data_args, training_args


TOKENS, SQUARES, CROPS, IMAGE_TOKENS = 1000, 300_000, 6, 500


def expected_flops(config, mode: str, rank: int) -> dict:
    """The FLOPs of model_flops' docstring, from the config alone: multiply-adds per position of
    every matmul, times 2 (forward), 4 (+ input gradient) or 6 (+ weight gradient)."""
    h, inter, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    v = config.vision_config
    dv, iv, run = v.hidden_size, v.intermediate_size, config.vision_feature_layer
    decoder_layer = {"qkv_proj": (h, 3 * h), "o_proj": (h, h), "gate_up_proj": (h, 2 * inter), "down_proj": (inter, h)}
    decoder = [shape for _ in range(layers) for shape in decoder_layer.values()] + [(h, vocab)]  # + lm_head
    clip_layer = [(dv, dv)] * 4 + [(dv, iv), (iv, dv)]  # q, k, v, out, fc1, fc2
    clip = [shape for _ in range(run) for shape in clip_layer]
    projector = [(4 * dv, h), (h, h)]
    patch = 3 * v.patch_size**2 * dv  # the patch convolution, at 576 positions per crop

    adapters = mode in ("lora", "lora_frozen_vision", "qlora")
    frozen_vision = mode in ("frozen_vision", "lora_frozen_vision")
    base = 4 if adapters else 6
    vision = 2 if frozen_vision else (4 if adapters else 6)
    lora = lambda shapes: sum(rank * (i + o) for i, o in shapes)  # noqa: E731  (A: i x r, B: r x o)
    out = {
        "decoder": TOKENS * (base * sum(i * o for i, o in decoder) + (6 * lora(decoder) if adapters else 0)),
        "vision": vision * (CROPS * (577 * sum(i * o for i, o in clip) + 576 * patch)
                            + IMAGE_TOKENS * sum(i * o for i, o in projector)),
        "attention": 12 * layers * h * SQUARES + (4 if frozen_vision else 12) * run * dv * 577**2 * CROPS,
    }
    if adapters and not frozen_vision:
        out["vision"] += 6 * (CROPS * 577 * lora(clip) + IMAGE_TOKENS * lora(projector))
    out["total"] = sum(out.values())
    return out


@pytest.mark.parametrize("mode", MODES)
def test_model_flops_of_each_mode(mode, tiny_checkpoint, ucf101_data, tmp_path):
    model_args, _, training_args = parsed(tiny_checkpoint, ucf101_data, tmp_path, "--bf16", *MODES[mode])
    model = load_model(model_args, training_args)
    if mode == "qlora":  # 4-bit weights: half as many values as parameters, packed in bytes
        packed = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
        assert packed and all(m.weight.numel() * 2 == m.in_features * m.out_features for m in packed)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert model_flops(model, TOKENS, SQUARES, CROPS, IMAGE_TOKENS) == expected_flops(
        base.config, mode, model_args.lora_rank)


def test_attention_is_about_an_eighth_of_the_released_decoder_at_docvqa_length():
    """The issue's figure: ~12% of the work at 2,443 tokens, 32 layers of 3,072 (PaLM's formula)."""
    h, layers, inter, vocab, T = 3072, 32, 8192, 32064, 2443
    weights = layers * (4 * h * h + 3 * h * inter) + h * vocab
    attention = 12 * layers * h * T * T
    assert 0.10 < attention / (attention + 6 * weights * T) < 0.13


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H100 NVL", "fp16", 835e12),
    ("NVIDIA H100 80GB HBM3", "fp32", 67e12),
    ("NVIDIA H100 80GB HBM3", "tf32", 495e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "tf32", 156e12),
    ("NVIDIA A100-PCIE-40GB", "fp32", 19.5e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA L40S", "bf16", 362e12),
    ("NVIDIA A10", "bf16", 125e12),
])
def test_peak_by_device_name_and_precision(name, precision, expected):
    assert peak_flops(name, precision) == (expected, "")


@pytest.mark.parametrize("name", ["NVIDIA A10G", "Tesla T4", "NVIDIA H100", "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
                                  "NVIDIA A100-SXM4-40GB MIG 1g.5gb"])
def test_unknown_device_gives_no_mfu_and_says_why(name, caplog):
    assert peak_flops(name, "bf16")[0] is None
    with caplog.at_level(logging.INFO, logger="recipe"):
        assert mfu(1e15, 10.0, 1, name, "bf16") is None
    assert len(caplog.records) == 1 and name in caplog.records[0].getMessage()


def test_mfu_divides_by_devices_and_the_precisions_peak():
    assert mfu(989e12 * 8 * 10, 10.0, 8, "NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(1.0)
    assert mfu(67e12 * 10, 10.0, 1, "NVIDIA H100 80GB HBM3", "fp32") == pytest.approx(1.0)


def test_throughput_counts_squares_per_sequence():
    meter = Throughput(pad_token_id=0)
    meter.count({"input_ids": torch.ones(2, 5, dtype=torch.long),
                 "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
                 "image_sizes": torch.tensor([[672, 336], [336, 336]])})
    # packed: two examples (3 and 2 tokens) then end padding (position ids restart there too)
    meter.count({"input_ids": torch.tensor([[5, 6, 7, 8, 9, 0, 0]]),
                 "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]])})
    counts = meter.counts()
    assert counts["real_tokens"] == 3 + 5 + 5
    assert counts["token_squares"] == 9 + 25 + 9 + 4
    assert counts["crops"] == 3 + 2
    # Phi3VImageEmbedding.num_tokens: 2x1 crops -> 2*12*13 + 1 + 156; 1x1 -> 12*13 + 1 + 156
    assert counts["image_tokens"] == (312 + 157) + (156 + 157)
