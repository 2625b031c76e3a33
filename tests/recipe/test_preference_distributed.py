"""Preference tuning on two CPU ranks (torchrun, gloo) with pairs that give one rank an image pair
and the other a text-only pair in the same step: DDP with LoRA (reference: adapters disabled; or
continuing an SFT adapter, reference: its frozen twin),
DeepSpeed ZeRO-2 and ZeRO-3 full finetuning (reference: a frozen copy, sharded under ZeRO-3) train,
evaluate on held-out pairs before and after, and save a model that reloads.

The launcher logs per rank which micro-batches held images and when the dummy image ran, so the
mix is checked, not assumed (see test_distributed.py for why the dummy is needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipe.synthetic_pairs import write_pairs
from test_distributed import ZERO2, ZERO3, assert_lockstep_generation_mixed, assert_ranks_mixed_in_every_step, batch_log

LAUNCHER = Path(__file__).with_name("preference_launcher.py")
TIMEOUT = 900  # the first DeepSpeed run on a machine JIT-compiles its CPU comm op (~70 s)


@pytest.fixture(scope="module")
def mixed_pairs(tmp_path_factory) -> Path:
    """Lines alternate image pairs and text-only pairs: with sequential sampling and one pair per
    rank and step, rank 0 gets the image pairs and rank 1 the text-only ones (evaluation shards
    the same way)."""
    data = write_pairs(tmp_path_factory.mktemp("mixed_pairs") / "data", train=2, eval_=2, text_only=2)
    for split in ("train", "eval"):
        lines = (data / f"{split}.jsonl").read_text().splitlines()
        (data / f"{split}.jsonl").write_text("\n".join([lines[0], lines[2], lines[1], lines[3]]) + "\n")
    return data


def launch(tiny, data, out, log_dir, *extra) -> str:
    args = ["--model_name_or_path", tiny, "--train_file", data / "train.jsonl", "--eval_file", data / "eval.jsonl",
            "--output_dir", out, "--num_crops", 1, "--no-tqdm", "--logging_steps", 1, "--max_steps", 2,
            "--batch_size", 2, "--batch_size_per_gpu", 1, "--learning_rate", "1e-3", "--save_strategy", "no",
            "--eval_batch_size", 1, "--dataloader_num_workers", 0, "--train_sampling_strategy", "sequential", *extra]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(LAUNCHER)]
    log_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RECIPE_TEST_BATCH_LOG": str(log_dir)}
    proc = subprocess.run(command + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def assert_evaluated(out: Path):
    for name in ("eval_before", "eval_after"):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["num_examples"] == 4 and len(result["pairs"]) == 4
    assert json.loads((out / "eval_before.json").read_text())["rewards/accuracies"] == 0.0
    after = json.loads((out / "eval_after.json").read_text())
    assert all(p["rewards/margins"] != 0 for p in after["pairs"])  # both ranks' pairs, scored after training


@pytest.fixture(scope="module")
def sft_adapter(tiny_checkpoint, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    from phi3v.modeling_phi3v import Phi3VForCausalLM

    out = tmp_path_factory.mktemp("sft") / "lora"
    torch.manual_seed(0)
    model = get_peft_model(Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["qkv_proj", "o_proj", "q_proj"], init_lora_weights=False))
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("mode", ["ddp_lora", "ddp_sft_adapter", "zero2", "zero3"])
def test_two_ranks_with_mixed_pairs(mode, tiny_checkpoint, mixed_pairs, tmp_path, request):
    out, log_dir = tmp_path / "out", tmp_path / "log"
    # (an SFT adapter with image-side LoRA too, trained and switched to its twin with mixed pairs)
    adapter = request.getfixturevalue("sft_adapter") if mode == "ddp_sft_adapter" else None
    extra = {
        "ddp_lora": ["--deepspeed", "none", "--use_lora", "--bf16"],
        "ddp_sft_adapter": ["--deepspeed", "none", "--use_lora", "--bf16", "--adapter", adapter],
        "zero2": ["--deepspeed", ZERO2, "--bf16"],
        "zero3": ["--deepspeed", ZERO3, "--bf16"],
    }[mode]
    stdout = launch(tiny_checkpoint, mixed_pairs, out, log_dir, *extra)
    reference = {"ddp_lora": "the model with its adapters disabled",
                 "ddp_sft_adapter": "the base with the starting adapter, frozen"}.get(mode, "a frozen copy of the starting model")
    assert f"reference: {reference}" in stdout
    assert_ranks_mixed_in_every_step(log_dir)
    if mode == "zero3":
        assert_lockstep_generation_mixed(log_dir)  # (here: the evaluation and reference forwards)
    for rank in (0, 1):
        assert [line[1] for line in batch_log(log_dir, rank) if line[0] == "optimizer"] == ["torch.float32"]
    assert_evaluated(out)
    run_complete = json.loads((out / "run_complete.json").read_text())
    throughput = run_complete["results"]["throughput"]
    assert throughput["world_size"] == 2 and throughput["pairs"] == 4 and throughput["images"] == 2
    if mode.startswith("ddp"):
        assert (out / "adapter_model.safetensors").is_file()
        if mode == "ddp_sft_adapter":
            start, trained = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
            assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)
        return
    saved, initial = load_file(out / "model.safetensors"), load_file(Path(tiny_checkpoint) / "model.safetensors")
    assert saved.keys() == initial.keys()
    assert any(not torch.equal(saved[k], initial[k].to(saved[k].dtype)) for k in saved if ".layers.0." in k)
