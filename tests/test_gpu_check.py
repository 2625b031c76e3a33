"""tools/gpu_check.py (`make gpu-check`): the whole plan on CPU with the tiny model (the same code
a GPU machine runs, the device chosen at run time), its one line per check and its JSON file;
no CUDA -> one line, exit 0; the FlashAttention-2 comparison's code on two CPU backends."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load_module()


def test_plan_runs_on_cpu_with_the_tiny_model(tmp_path):
    """A subprocess: the check sets a one-rank launcher environment and logging for its process."""
    json_path = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--steps", "2",
                           "--json", str(json_path), "--work_dir", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(json_path.read_text())
    entries = {e["check"]: e for e in result["checks"]}
    assert list(entries) == ["full_zero2", "frozen_vision", "lora", "qlora", "flash_train", "flash", "generate"]
    # One line per check, in order, then the summary; nothing the libraries printed in between.
    assert lines[0].startswith("gpu-check: device cpu")
    assert [line.split()[:2] for line in lines[1:-1]] == [[e["status"], e["check"]] for e in result["checks"]]
    assert lines[-1].startswith(f"gpu-check: {result['passed']} passed, 0 failed")
    for name in ("full_zero2", "frozen_vision", "lora", "qlora"):  # deepspeed and bitsandbytes load here
        e = entries[name]
        assert e["status"] == "PASS" and e["steps"] == 2 and math.isfinite(e["train_loss"]), e
        assert e["images_per_s"] > 0 and e["real_tokens_per_s"] > e["images_per_s"] and e["peak_memory_gb"] > 0
        assert e["model_flops"] > 0 and e["mfu"] is None  # (MFU: CUDA only)
    # Fewer FLOPs per token where less trains: a frozen image side runs forward only.
    assert entries["frozen_vision"]["model_flops"] < entries["full_zero2"]["model_flops"]
    for name in ("flash_train", "flash"):  # (FlashAttention-2 needs CUDA)
        assert entries[name]["status"] == "SKIPPED" and "CUDA" in entries[name]["reason"], entries[name]
    generate = entries["generate"]
    assert generate["status"] == "PASS" and generate["dtype"] == "torch.float32" and generate["new_tokens"] == 32
    assert (tmp_path / "gpu_check.log").stat().st_size > 0


def test_without_cuda_one_line_and_exit_0(gpu_check, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert gpu_check.main(["--json", str(tmp_path / "x.json")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu-check: no CUDA device here")
    assert not (tmp_path / "x.json").exists()


def test_unknown_check_is_refused(gpu_check, capsys):
    assert gpu_check.main(["--device", "cpu", "--checks", "lora,nope"]) == 2
    assert "--checks nope: unknown" in capsys.readouterr().err


def test_attention_comparison_on_a_padded_batch(gpu_check, tmp_path):
    """The flash check's comparison (there: SDPA vs FlashAttention-2 in bf16 on CUDA), here SDPA
    vs eager in fp32: the same logits on the real positions of an image row and a padded
    text-only row."""
    from phi3v.modeling_phi3v import Phi3VForCausalLM
    from phi3v.processing_phi3v import Phi3VProcessor
    from phi3v.tiny import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", num_crops=2)
    conversations = gpu_check.make_conversations(tmp_path / "images", 1, [(500, 400)], seed=0)
    processor = Phi3VProcessor.from_pretrained(checkpoint)
    batch = gpu_check.padded_batch(processor, conversations)
    assert not batch["attention_mask"].all()  # the text-only row is padded
    model = Phi3VForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
    result = gpu_check.compare_attention(model, batch, "sdpa", "eager")
    assert model.config._attn_implementation == model.config.vision_config._attn_implementation == "eager"
    assert result["logits_max_abs"] > 0 and result["relative_max_diff"] < 1e-4
    # A backend that did not reach the vision model is a failure, not a comparison of the decoder alone.
    switch = model.set_attn_implementation

    def decoder_only(mode):
        vision = model.config.vision_config._attn_implementation
        switch(mode)
        model.config.vision_config._attn_implementation = vision

    model.set_attn_implementation = decoder_only
    with pytest.raises(RuntimeError, match="left the decoder at 'sdpa' and the vision model at 'eager'"):
        gpu_check.compare_attention(model, batch, "sdpa", "eager")


def test_memory_estimate_leaves_full_depth_full_finetuning_to_big_gpus(gpu_check):
    params = gpu_check.parameter_count(None)
    assert 4.1e9 < params < 4.2e9 and 0.7e9 < gpu_check.parameter_count(2) < 0.8e9
    h100, h200 = 79.2, 139.8
    assert gpu_check.memory_estimate_gb("full_zero2", params) > 0.95 * h100
    assert gpu_check.memory_estimate_gb("full_zero2", params) < 0.95 * h200
    assert gpu_check.memory_estimate_gb("lora", params) < 0.95 * h100


def test_a_library_the_recipe_needs_is_a_fail_naming_it(gpu_check, monkeypatch):
    """GPU_PY's interpreter may lack what the recipe imports: one clear reason, before training."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # (import raises ImportError)
    with pytest.raises(RuntimeError, match="the recipe needs matplotlib"):
        gpu_check.requirement("lora", "cpu")
    gpu_check.requirement("generate", "cpu")  # (generation does not need it)


def test_flash_training_runs_as_the_readme_trains_where_flash_attn_runs(gpu_check, monkeypatch):
    """The README's GPU commands train with --bf16 --use_flash_attention: one check does, with
    --padding_free, where the flash comparison would run (SKIPPED with its reason otherwise)."""
    import types
    from types import SimpleNamespace

    assert {"--use_flash_attention", "--padding_free"} <= set(gpu_check.MODE_FLAGS["flash_train"])
    with pytest.raises(gpu_check.Skip, match="CUDA"):
        gpu_check.requirement("flash_train", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.raises(gpu_check.Skip, match="Ampere"):
        gpu_check.requirement("flash_train", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with pytest.raises(gpu_check.Skip, match="flash-attn does not import"):
        gpu_check.requirement("flash_train", "cuda")
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    gpu_check.requirement("flash_train", "cuda")  # (runs: the recipe's own flag checks come next)
    seen = {}

    def run(task, flags):
        seen["flags"] = flags
        raise SystemExit("stop")

    monkeypatch.setattr("recipe.task.run", run)
    with pytest.raises(SystemExit):
        gpu_check.train_check("flash_train", Path("ckpt"), None, Path("work"),
                              SimpleNamespace(precision="bf16", steps=2, num_crops=4, tiny=False))
    assert "--bf16" in seen["flags"] and "--use_flash_attention" in seen["flags"]


def test_a_deepspeed_check_does_not_turn_the_next_ones_into_deepspeed_runs(gpu_check, monkeypatch):
    """accelerate's Accelerator leaves ACCELERATE_USE_DEEPSPEED=true in the environment, from which
    the next TrainingArguments without --deepspeed would build a default DeepSpeed plugin: the
    frozen_vision and lora checks would run under ZeRO instead of as the recipe runs them."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    gpu_check._reset_libraries()
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ


@pytest.mark.parametrize("major, precision", [(7, "fp16"), (8, "bf16"), (9, "bf16")])
def test_a_gpu_without_bf16_trains_in_fp16(gpu_check, monkeypatch, major, precision):
    """torch.cuda.is_bf16_supported() says yes on a V100 or T4 (compute capability 7: bf16 is
    emulated there) unless emulation is left out; the README trains those in fp16."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    assert torch.cuda.is_bf16_supported()  # (the library's default counts the emulation)
    assert gpu_check.training_precision("cuda") == precision
    assert gpu_check.training_precision("cpu") == "bf16"


@pytest.fixture
def in_process(gpu_check, monkeypatch):
    """main() in this process: its root-logger file handler and launcher environment undone after."""
    import logging

    monkeypatch.setattr(gpu_check, "_single_rank_environment", lambda: None)
    handlers = logging.getLogger().handlers[:]
    yield gpu_check
    for handler in logging.getLogger().handlers[:]:
        if handler not in handlers:
            logging.getLogger().removeHandler(handler)
    logging.getLogger().handlers[:] = handlers


def test_a_checkpoint_that_cannot_be_written_is_a_fail_line(in_process, monkeypatch, capsys, tmp_path):
    """Out of memory or a full disk while writing the random weights: a FAIL line, the checks on
    it SKIPPED, and the JSON file written."""
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(in_process, "write_checkpoint", full_disk)
    json_path = tmp_path / "gpu_check.json"
    argv = ["--device", "cpu", "--tiny", "--checks", "lora,generate", "--json", str(json_path),
            "--work_dir", str(tmp_path / "work")]
    assert in_process.main(argv) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines[1:-1]] == [["FAIL", "checkpoint"], ["SKIPPED", "lora"],
                                                           ["SKIPPED", "generate"]]
    assert "No space left on device" in lines[1] and lines[-1].startswith("gpu-check: 0 passed, 1 failed, 2 skipped")
    result = json.loads(json_path.read_text())
    assert result["completed"] and [e["status"] for e in result["checks"]] == ["FAIL", "SKIPPED", "SKIPPED"]


def test_the_json_file_is_written_when_the_run_stops_early(in_process, monkeypatch, capsys, tmp_path):
    """Ctrl-C (which run_check lets through) during the second check: the first one's result is kept."""
    def one_check(check, *args):
        if check == "lora":
            raise KeyboardInterrupt
        return {"dtype": "torch.float32", "new_tokens_per_s": 1.0, "new_tokens": 32}

    monkeypatch.setattr(in_process, "write_checkpoint", lambda *args: None)
    monkeypatch.setattr(in_process, "one_check", one_check)
    json_path = tmp_path / "gpu_check.json"
    with pytest.raises(KeyboardInterrupt):
        in_process.main(["--device", "cpu", "--tiny", "--checks", "generate,lora", "--json", str(json_path),
                         "--work_dir", str(tmp_path / "work")])
    result = json.loads(json_path.read_text())
    assert result["completed"] is False and [(e["check"], e["status"]) for e in result["checks"]] == [
        ("generate", "PASS")]
    assert "(stopped early)" in capsys.readouterr().out.strip().splitlines()[-1]
