"""`python -m phi3v.generate` on the outputs of short demo-style runs (full finetune, LoRA), and
`--eval_only` on a LoRA output directory."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import convert_ucf101
import finetune_hf_trainer_ucf101 as ucf
from phi3v.generate import answer, load, main
from phi3v.tiny import save_tiny_checkpoint
from recipe.task import run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Tiny model, synthetic UCF-101 data (2 classes, 2 frames), and a 2-step LoRA run on it."""
    root = tmp_path_factory.mktemp("generate")
    tiny = save_tiny_checkpoint(root / "tiny", num_crops=1)
    assert convert_ucf101.main([
        "--synthetic", "--out_dir", str(root / "data"), "--no-tqdm", "--num_frames", "2", "--synthetic_frames", "2",
        "--synthetic_classes", "2", "--synthetic_videos_per_class", "2", "--synthetic_eval_videos_per_class", "1",
    ]) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(ucf.TASK, [
            "--model_name_or_path", str(tiny), "--data_dir", str(root / "data"), "--output_dir", str(root / "lora"),
            "--num_crops", "1", "--no-tqdm", "--use_lora", "--max_steps", "2", "--batch_size", "2",
            "--batch_size_per_gpu", "2", "--learning_rate", "1e-2", "--eval_batch_size", "2", "--max_new_tokens", "4",
            "--skip_eval_before", "--save_strategy", "no", "--dataloader_num_workers", "0",
        ])
    finally:
        torch.set_num_threads(threads)
    Image.new("RGB", (64, 48), (200, 20, 20)).save(root / "red.png")
    Image.new("RGB", (40, 90), (20, 20, 200)).save(root / "blue.jpg")
    return root


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phi3v.generate", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_answers_with_one_and_several_images(workdir):
    # In-process (the CLI's own code path) for speed; one subprocess run below checks the entry point.
    model, processor = load(str(workdir / "tiny"))
    one = [Image.open(workdir / "red.png")]
    several = one + [Image.open(workdir / "blue.jpg")]
    out = [answer(model, processor, [{"role": "user", "content": tags + "What is it?"}], images, 6)
           for tags, images in (("<|image_1|>\n", one), ("<|image_1|>\n<|image_2|>\n", several))]
    assert all(isinstance(a, str) and a for a in out), out
    # The same as generate() on the processor's own prompt: greedy, stopping at <|end|>.
    prompt = "<|user|>\n<|image_1|>\n<|image_2|>\nWhat is it?<|end|>\n<|assistant|>\n"
    inputs = processor(prompt, several)
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert out[1] == processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_cli_prints_the_answer_of_the_lora_output(workdir, capsys):
    # The LoRA output directory itself (base from adapter_config.json) and base + --adapter agree.
    assert main(["--model", str(workdir / "lora"), "--image", str(workdir / "red.png"),
                 "--image", str(workdir / "blue.jpg"), "--prompt", "Classify the video.", "--max_new_tokens", "4"]) == 0
    own = capsys.readouterr().out.strip()
    assert main(["--model", str(workdir / "tiny"), "--adapter", str(workdir / "lora"), "--image",
                 str(workdir / "red.png"), "--image", str(workdir / "blue.jpg"), "--prompt", "Classify the video.",
                 "--max_new_tokens", "4"]) == 0
    assert own and capsys.readouterr().out.strip() == own
    assert main(["--model", str(workdir / "tiny"), "--image", str(workdir / "red.png"), "--image",
                 str(workdir / "blue.jpg"), "--prompt", "Classify the video.", "--max_new_tokens", "4"]) == 0
    capsys.readouterr()


def test_cli_answers_a_data_file(workdir):
    jsonl = workdir / "data" / "ucf101_test.jsonl"
    proc = cli("--model", workdir / "lora", "--jsonl", jsonl, "--output", workdir / "preds.jsonl",
               "--max_new_tokens", "4", "--bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [json.loads(line) for line in jsonl.read_text().splitlines()]
    written = [json.loads(line) for line in (workdir / "preds.jsonl").read_text().splitlines()]
    assert [w["id"] for w in written] == [e["id"] for e in expected]
    # the key of the runner's eval_*.json: a list of accepted answers
    assert [w["references"] for w in written] == [[e["conversations"][-1]["assistant"]] for e in expected]
    assert all(isinstance(w["prediction"], str) for w in written)
    # quiet: no traceback, nor the library messages that say nothing to the user (loading a LoRA
    # output imports PEFT and bitsandbytes)
    assert not [line for line in proc.stderr.splitlines()
                if any(n in line for n in ("Traceback", "kernels", "FutureWarning"))], proc.stderr[-3000:]


@pytest.mark.parametrize("args, message", [
    (["--model", "{d}/nope", "--image", "{d}/red.png", "--prompt", "x"], "--model {d}/nope: no such directory"),
    (["--model", "{d}/data", "--image", "{d}/red.png", "--prompt", "x"], "neither a model"),
    (["--model", "{d}/tiny", "--image", "{d}/missing.png", "--prompt", "x"], "image {d}/missing.png does not exist"),
    (["--model", "{d}/tiny", "--image", "{d}/data/ucf101_test.jsonl", "--prompt", "x"], "cannot be read"),
    (["--model", "{d}/tiny", "--image", "{d}/red.png", "--prompt", "<|image_1|><|image_2|> x"],
     "tags <|image_1|>, <|image_2|> for 1 image(s)"),
    (["--model", "{d}/tiny", "--jsonl", "{d}/empty.jsonl"], "no examples"),
    (["--model", "{d}/tiny", "--jsonl", "{d}/data/bad.jsonl"], "bad.jsonl:2: not a data line"),
    (["--model", "{d}/tiny"], "give --prompt"),
    (["--model", "{d}/tiny", "--adapter", "{d}/tiny", "--prompt", "x"], "no adapter_config.json"),
])
def test_user_errors_are_one_line(workdir, capsys, args, message):
    (workdir / "empty.jsonl").write_text("\n  \n")
    (workdir / "data" / "bad.jsonl").write_text((workdir / "data" / "ucf101_test.jsonl").read_text().splitlines()[0]
                                        + "\n{\"id\": 1}\n")
    assert main([a.format(d=workdir) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(d=workdir) in err[0], err


def test_eval_only_on_the_lora_output_gives_the_runs_metric(workdir):
    # --model_name_or_path = the adapter output: transformers loads base (adapter_config.json) + adapter.
    results = run(ucf.TASK, [
        "--model_name_or_path", str(workdir / "lora"), "--data_dir", str(workdir / "data"),
        "--output_dir", str(workdir / "eval_only"), "--num_crops", "1", "--no-tqdm", "--eval_only",
        "--eval_batch_size", "2", "--max_new_tokens", "4",
    ])
    own = json.loads((workdir / "lora" / "eval_after.json").read_text())
    again = json.loads((workdir / "eval_only" / "eval_after.json").read_text())
    assert results["eval_after"] == own["accuracy"]
    assert [p["prediction"] for p in again["predictions"]] == [p["prediction"] for p in own["predictions"]]


def fake_gpu(monkeypatch, major: int) -> None:
    """torch.cuda answers as on a GPU of compute capability `major`.x where a bf16 tensor can be
    made (emulated below 8), so torch's own is_bf16_supported runs its real checks."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)


def test_default_dtype_is_bf16_on_cuda_and_fp32_on_cpu(workdir, monkeypatch):
    """phi3v.generate.load and the CLI: bf16 on a GPU (as released), fp32 on CPU; a flag overrides.
    The CUDA branch runs here with the device forced to the CPU, so only the placement differs."""
    from phi3v import generate

    assert generate.default_dtype("cpu") is torch.float32
    assert load(str(workdir / "tiny"), device="cpu")[0].dtype is torch.float32
    fake_gpu(monkeypatch, major=8)
    assert generate.default_dtype("cuda") is torch.bfloat16
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)  # (no GPU to move to)
    assert load(str(workdir / "tiny"))[0].dtype is torch.bfloat16
    seen = []

    def stop_after_dtype(model, adapter, dtype, *rest):
        seen.append(dtype)
        raise generate.GenerateError("stopped before loading")

    monkeypatch.setattr(generate, "load", stop_after_dtype)
    for flags, expected in (([], None), (["--dtype", "fp32"], torch.float32), (["--bf16"], torch.bfloat16),
                            (["--dtype", "fp16"], torch.float16)):
        assert main(["--model", str(workdir / "tiny"), "--prompt", "x", *flags]) == 2
        assert seen.pop() is expected  # None: load picks by device


def test_default_dtype_is_fp16_on_a_gpu_without_bf16(monkeypatch):
    """A V100 or T4 (compute capability 7) emulates bf16, and torch.cuda.is_bf16_supported() says
    yes by default; generation there runs in fp16."""
    from phi3v import generate

    fake_gpu(monkeypatch, major=7)
    assert torch.cuda.is_bf16_supported()  # (the library's default counts the emulation)
    assert generate.default_dtype("cuda") is torch.float16


def test_fp16_on_cpu_and_disagreeing_flags_are_refused(workdir, capsys):
    tiny = str(workdir / "tiny")
    if not torch.cuda.is_available():
        assert main(["--model", tiny, "--prompt", "x", "--dtype", "fp16"]) == 2
        assert "--dtype fp16 needs a CUDA GPU" in capsys.readouterr().err
    assert main(["--model", tiny, "--prompt", "x", "--dtype", "fp32", "--bf16"]) == 2
    assert "--bf16 and --dtype fp32 disagree" in capsys.readouterr().err
