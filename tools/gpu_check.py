"""Proves a CUDA machine: every training mode, FlashAttention-2 and generation, with no download.

    make gpu-check                       # the repository's .venv
    GPU_PY=python3 make gpu-check        # another interpreter (its own CUDA PyTorch); installs nothing
    python tools/gpu_check.py --device cpu --tiny --steps 2    # the same plan on CPU (the CI test)

Weights are random, at the released widths (tests/fixtures/release/phi-3.5-vision-instruct:
its config with 2 decoder layers, its tokenizer and image processor), in bf16 (fp16 on a GPU
without bf16) on one GPU. Each training check is one run of the recipe's own runner
(`recipe.runner.Runner`: flags, model setup, data loader, Trainer, save, evaluation by
generation) on synthetic document-like images at --num_crops 16, --steps optimizer steps of 4
examples:

    full_zero2      full finetuning under DeepSpeed ZeRO-2 (SKIPPED when deepspeed does not import)
    frozen_vision   --freeze_vision_model, without DeepSpeed (fp32 weights, bf16 autocast)
    lora            --use_lora
    qlora           --use_qlora (SKIPPED when bitsandbytes does not load)
    flash_train     --use_lora --use_flash_attention --padding_free, as the README's GPU commands
                    train (SKIPPED as flash is)
    flash           FlashAttention-2 logits against SDPA's on the same padded batch (SKIPPED
                    when flash-attn does not import)
    generate        phi3v.generate.load (bf16 by default on CUDA, fp16 without bf16) and a greedy answer

Then, on CUDA, the same at full depth (32 layers) for each mode whose memory estimate fits the
GPU, while --time_budget lasts (the whole check stays under 8 minutes on an H100).

One line per check: PASS / FAIL / SKIPPED with the reason, and for training images/s, real
(non-padding) tokens/s, peak memory (torch.cuda.max_memory_allocated) and MFU (the runner's
run_complete.json figures: recipe/report.py says what is counted). All of it also goes to
--json (default gpu_check.json), also when the run stops early ("completed": false). A
checkpoint that cannot be written (out of memory, a full disk) is a FAIL line of its own
("checkpoint") and the checks at its depth SKIPPED. The libraries' own logs go to
gpu_check.log next to it.
Exit status 1 when a check FAILed, else 0; without CUDA (and without --device cpu) one line
saying so, exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RELEASE = ROOT / "tests" / "fixtures" / "release" / "phi-3.5-vision-instruct"
ZERO2 = ROOT / "ds_configs" / "zero2.json"
TRAINING = ("full_zero2", "frozen_vision", "lora", "qlora", "flash_train")
CHECKS = (*TRAINING, "flash", "generate")
MODE_FLAGS = {
    "full_zero2": ["--deepspeed", str(ZERO2)],
    "frozen_vision": ["--freeze_vision_model", "--deepspeed", "none"],
    "lora": ["--use_lora"],
    "qlora": ["--use_qlora"],
    # As the README's GPU commands train (--bf16 --use_flash_attention), and packed rows.
    "flash_train": ["--use_lora", "--use_flash_attention", "--padding_free"],
}
GB = 2**30
WORDS = "total amount date invoice name address page table form report number year value the of".split()


class Skip(Exception):
    """A check that cannot run here; the message says why."""


# -- what is checked on ----------------------------------------------------------------------


def write_checkpoint(directory: Path, layers: int | None, tiny: bool, device: str) -> None:
    """Random weights (bf16, as released) and the release's processor."""
    from phi3v.configuration_phi3v import Phi3VConfig
    from phi3v.modeling_phi3v import Phi3VForCausalLM
    from phi3v.processing_phi3v import Phi3VProcessor
    from phi3v.tiny import save_tiny_checkpoint

    if tiny:
        save_tiny_checkpoint(directory, num_crops=2)
        return
    config = Phi3VConfig.from_pretrained(RELEASE)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 4.2B parameters would take minutes on CPU
        model = Phi3VForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    Phi3VProcessor.from_pretrained(RELEASE).save_pretrained(directory)
    del model
    _free()


def parameter_count(layers: int | None) -> int:
    """Parameters of the released model at `layers` decoder layers (meta device: nothing allocated)."""
    from phi3v.configuration_phi3v import Phi3VConfig
    from phi3v.modeling_phi3v import Phi3VForCausalLM

    config = Phi3VConfig.from_pretrained(RELEASE)
    if layers is not None:
        config.num_hidden_layers = layers
    with torch.device("meta"):
        return sum(p.numel() for p in Phi3VForCausalLM(config).parameters())


def synthetic_image(width: int, height: int, rng: random.Random):
    """A page-like image (light background, dark strokes): JPEG decoding costs what a scan does."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    for top in range(20, height - 20, 28):
        left = 20
        while left < width - 60:
            step = rng.randint(40, 120)
            ink = tuple(rng.randint(0, 90) for _ in "rgb")
            draw.rectangle((left, top, left + rng.randint(10, 50), top + 12), fill=ink)
            left += step
    return image


def make_conversations(directory: Path, n: int, sizes: list[tuple[int, int]], seed: int):
    from recipe.records import Conversation, Turn

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = directory / f"page_{i}.jpg"
        synthetic_image(*sizes[i % len(sizes)], rng).save(path, quality=90)
        question = "what is the " + " ".join(rng.choices(WORDS, k=rng.randint(4, 10))) + "?"
        out.append(Conversation(id=str(i), turns=[Turn(question, " ".join(rng.choices(WORDS, k=3)), [path])],
                                where=f"gpu-check example {i}"))
    return out


def make_task(train, evaluation):
    from recipe.task import Task

    def score(predictions, references):
        return sum(p.strip() in refs for p, refs in zip(predictions, references)) / max(1, len(predictions))

    return Task(name="gpu_check", metric="accuracy", load_data=lambda data_args, model_args: (train, evaluation),
                score=score)


# -- the checks --------------------------------------------------------------------------------


# What the recipe's runner imports in every training mode (GPU_PY may be an interpreter without them).
RECIPE_NEEDS = ("accelerate", "peft", "datasets", "matplotlib")


def requirement(check: str, device: str) -> None:
    """Raises Skip when an optional library (or the device) a check needs is missing, and a
    one-line error (a FAIL, before any time is spent) when a library the recipe itself needs is."""
    if check in TRAINING:
        for package in RECIPE_NEEDS:
            try:
                __import__(package)
            except ImportError as err:
                raise RuntimeError(f"the recipe needs {package}, which does not import in {sys.executable} ({err}); "
                                   "install it there, or run `make gpu-check` without GPU_PY (the .venv)") from None
    if check == "full_zero2":
        _importable("deepspeed", "deepspeed does not import")
    elif check == "qlora":
        _importable("bitsandbytes", "bitsandbytes does not load")
    elif check in ("flash", "flash_train"):
        if device != "cuda":
            raise Skip("FlashAttention-2 runs on CUDA GPUs only")
        if torch.cuda.get_device_capability(0)[0] < 8:
            raise Skip("FlashAttention-2 needs an Ampere or newer GPU")
        _importable("flash_attn", "flash-attn does not import")


def _importable(module: str, what: str) -> None:
    try:
        __import__(module)
    except Exception as err:  # ImportError, or a library that fails while loading its kernels
        raise Skip(f"{what} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def train_check(mode: str, checkpoint: Path, task, work: Path, args) -> dict:
    """One run of the recipe's runner in `mode`; its throughput figures."""
    from recipe.task import run

    out = work / f"run_{mode}"
    flags = ["--model_name_or_path", str(checkpoint), "--output_dir", str(out), "--overwrite_output_dir",
             f"--{args.precision}", "--max_steps", args.steps, "--batch_size", 4, "--batch_size_per_gpu", 2,
             "--num_crops", args.num_crops, "--learning_rate", "1e-5", "--warmup_steps", 0, "--save_strategy", "no",
             "--logging_steps", args.steps, "--skip_eval_before", "--max_eval_samples", 2, "--eval_batch_size", 2,
             "--max_new_tokens", 4, "--no-tqdm", "--report_to", "none", *MODE_FLAGS[mode]]
    if args.tiny:
        flags += ["--dataloader_num_workers", 0]
    results = run(task, [str(f) for f in flags])
    if results["global_step"] != args.steps or not math.isfinite(results["train_loss"]):
        raise RuntimeError(f"trained {results['global_step']} of {args.steps} steps, loss {results['train_loss']}")
    speed = results["throughput"]
    shutil.rmtree(out, ignore_errors=True)  # (a saved model per mode would fill the disk at full depth)
    return {
        "images_per_s": speed["images_per_s"],
        "real_tokens_per_s": speed["real_tokens_per_s"],
        "peak_memory_gb": speed["peak_memory_gb"],
        "peak_memory_kind": speed["peak_memory_kind"],
        "mfu": speed.get("mfu"),
        "model_flops": speed.get("model_flops"),
        "train_loss": results["train_loss"],
        "steps": results["global_step"],
    }


def padded_batch(processor, conversations):
    """A right-padded batch of an image conversation and a shorter text-only one."""
    from recipe.data import Collator, ConversationDataset
    from recipe.records import Conversation, Turn

    text_only = Conversation(id="text", turns=[Turn("Name a colour.", "Red.", [])], where="gpu-check text-only")
    dataset = ConversationDataset([conversations[0], text_only], processor)
    return Collator(pad_token_id=processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])


def compare_attention(model, batch, reference: str, other: str) -> dict:
    """Logits of the same weights and padded batch under two attention backends, on the real
    (non-padding) positions: the largest difference, relative to the largest logit."""
    from transformers.utils import logging as hf_logging

    logits = {}
    for mode in (reference, other):
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "set the sub-config without finding the sub-model" notice
        try:
            model.set_attn_implementation(mode)
        finally:
            hf_logging.set_verbosity(verbosity)
        # Both the decoder and CLIP must have switched, or the comparison compares less than it says
        # (bench/attention.py's set_mode checks the same).
        switched = (model.config._attn_implementation, model.config.vision_config._attn_implementation)
        if switched != (mode, mode):
            raise RuntimeError(f"set_attn_implementation({mode!r}) left the decoder at {switched[0]!r} and the "
                               f"vision model at {switched[1]!r}")
        with torch.no_grad():
            out = model(**batch).logits.float()
        logits[mode] = out[batch["attention_mask"].bool()]
    diff = (logits[other] - logits[reference]).abs()
    scale = logits[reference].abs().max().item()
    return {"logits_max_abs_diff": diff.max().item(), "logits_mean_abs_diff": diff.mean().item(),
            "logits_max_abs": scale, "relative_max_diff": diff.max().item() / scale}


def flash_check(checkpoint: Path, conversations, device: str) -> dict:
    from phi3v.modeling_phi3v import Phi3VForCausalLM
    from phi3v.processing_phi3v import Phi3VProcessor

    model = Phi3VForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to(device).eval()
    processor = Phi3VProcessor.from_pretrained(checkpoint, num_crops=4)
    batch = {k: v.to(device) for k, v in padded_batch(processor, conversations).items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    result = compare_attention(model, batch, "sdpa", "flash_attention_2")
    # bf16 kernels that sum in different orders: a few percent of the largest logit at most.
    if not result["relative_max_diff"] <= 0.05:
        raise RuntimeError(f"FlashAttention-2 and SDPA logits differ by {result['logits_max_abs_diff']:.3g} "
                           f"(largest logit {result['logits_max_abs']:.3g})")
    return result


def generate_check(checkpoint: Path, conversations, device: str, max_new_tokens: int = 32) -> dict:
    """The generate CLI's code path (default dtype: bf16 on CUDA, fp16 on a GPU without bf16,
    fp32 on CPU), then a timed generation of exactly `max_new_tokens` tokens."""
    from PIL import Image

    from phi3v.generate import answer, default_dtype, load

    model, processor = load(str(checkpoint), device=device)
    if model.dtype != default_dtype(device):
        raise RuntimeError(f"phi3v.generate.load gave {model.dtype}, expected {default_dtype(device)}")
    image = Image.open(conversations[0].turns[0].images[0]).convert("RGB")
    messages = [{"role": "user", "content": "<|image_1|>\nWhat is written here?"}]
    text = answer(model, processor, messages, [image], max_new_tokens=8)
    if not isinstance(text, str):
        raise RuntimeError(f"answer() returned {type(text).__name__}")
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(prompt, [image], return_tensors="pt")
    inputs = {k: v.to(device, model.dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    _synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    _synchronize(device)
    seconds = time.perf_counter() - start
    new = out.shape[1] - inputs["input_ids"].shape[1]
    return {"dtype": str(model.dtype), "prompt_tokens": int(inputs["input_ids"].shape[1]), "new_tokens": int(new),
            "new_tokens_per_s": new / seconds, "peak_memory_gb": _peak_gb(device)}


# -- running them -----------------------------------------------------------------------------


def memory_estimate_gb(check: str, params: int) -> float:
    """Rough GPU memory a check needs at `params` parameters: weights, gradients and AdamW
    states as the mode holds them (ZeRO-2 on one GPU: bf16 weights and gradients + fp32
    masters and two moments = 16 bytes/parameter, and buffers), plus 10 GB of activations and
    workspace. At full depth (4.15B) full finetuning then needs a 141 GB H200, not an 80 GB H100."""
    per_parameter = {"full_zero2": 18, "frozen_vision": 18, "lora": 2.2, "qlora": 0.9, "flash_train": 2.2, "flash": 2,
                     "generate": 2}
    return params * per_parameter[check] / GB + 10


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GB if device == "cuda" else None


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _reset_libraries() -> None:
    """What one runner call leaves behind for the next: DeepSpeed's global config, accelerate's
    process-wide state, and the ACCELERATE_USE_DEEPSPEED=true its Accelerator sets (from which the
    next run's TrainingArguments would make a default DeepSpeed plugin without --deepspeed)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    with contextlib.suppress(ImportError):  # (GPU_PY's interpreter may lack accelerate; requirement() says so)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()


def _single_rank_environment() -> None:
    """DeepSpeed wants a launcher's environment; one GPU = a job of one rank (as torchrun sets it)."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def describe(entry: dict) -> str:
    """The check's one line."""
    head = f"{entry['status']:7s} {entry['check']:13s} {entry['depth']:>9s}"
    if entry["status"] != "PASS":
        return f"{head}: {entry['reason']}"
    if entry["check"] in TRAINING:
        mfu = f"MFU {entry['mfu']:.1%}" if entry.get("mfu") is not None else "MFU n/a"
        peak = f"{entry['peak_memory_gb']:.1f} GB" + ("" if entry["peak_memory_kind"].startswith("cuda") else " RSS")
        text = (f"{entry['images_per_s']:.2f} images/s, {entry['real_tokens_per_s']:.0f} real tokens/s, peak {peak}, "
                f"{mfu}, loss {entry['train_loss']:.3f} ({entry['steps']} steps)")
    elif entry["check"] == "flash":
        text = (f"logits max |diff| {entry['logits_max_abs_diff']:.3g} of max |logit| {entry['logits_max_abs']:.3g} "
                f"(mean {entry['logits_mean_abs_diff']:.3g})")
    else:
        text = f"{entry['dtype']}, {entry['new_tokens_per_s']:.1f} new tokens/s ({entry['new_tokens']} tokens)"
    return f"{head}: {text} [{entry['seconds']:.0f} s]"


@contextlib.contextmanager
def quiet(log):
    """Everything the libraries print, from Python or from C (compilers DeepSpeed starts, CUDA
    libraries), goes to the log file instead of between the check lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def run_check(check: str, depth: str, log, function, *args, show_pass: bool = True) -> dict:
    """`function(*args)` (a dict of figures, or None) as a check: its entry, and its line (a PASS
    only when `show_pass`)."""
    entry = {"check": check, "depth": depth}
    start = time.perf_counter()
    _free()
    try:
        with quiet(log):
            entry.update(function(*args) or {})
        entry["status"] = "PASS"
    except Skip as why:
        entry.update(status="SKIPPED", reason=str(why))
    except BaseException as err:  # noqa: BLE001  (every failure becomes a FAIL line; the next check runs)
        if isinstance(err, KeyboardInterrupt):
            raise
        traceback.print_exc(file=log)
        first = (str(err).strip().splitlines() or [""])[0]
        entry.update(status="FAIL", reason=f"{type(err).__name__}: {first[:300]} (traceback in {log.name})")
    finally:
        _reset_libraries()
        _free()
    entry["seconds"] = time.perf_counter() - start
    if show_pass or entry["status"] != "PASS":
        print(describe(entry), flush=True)
    return entry


def skipped(check: str, depth: str, reason: str) -> dict:
    """A check that does not start; its line."""
    entry = {"check": check, "depth": depth, "status": "SKIPPED", "seconds": 0.0, "reason": reason}
    print(describe(entry), flush=True)
    return entry


def one_check(check: str, checkpoint: Path, task, conversations, work: Path, args):
    """The function and arguments of a check (after its requirements are met)."""
    requirement(check, args.device)
    if check in TRAINING:
        return train_check(check, checkpoint, task, work, args)
    if check == "flash":
        return flash_check(checkpoint, conversations, args.device)
    return generate_check(checkpoint, conversations, args.device)


def plan(checkpoint: Path, depth: str, checks, task, conversations, work: Path, args, log, deadline: float | None,
         params: int | None) -> Iterator[dict]:
    """Each check's entry as it ends (a caller keeps those before an interruption)."""
    for check in checks:
        if params is not None and args.device == "cuda":
            need = memory_estimate_gb(check, params)
            have = torch.cuda.get_device_properties(0).total_memory / GB
            if need > 0.95 * have:
                yield skipped(check, depth, f"needs ~{need:.0f} GB, the GPU has {have:.0f} GB")
                continue
        if deadline is not None and time.perf_counter() > deadline:
            yield skipped(check, depth, f"--time_budget {args.time_budget:.0f} s spent")
            continue
        yield run_check(check, depth, log, one_check, check, checkpoint, task, conversations, work, args)


def at_depth(layers: int | None, depth: str, checks, task, conversations, work: Path, args, log,
             deadline: float | None, params: int | None) -> Iterator[dict]:
    """A checkpoint with `layers` decoder layers (None: the released 32), then the checks on it.
    Writing it can fail (out of memory, a full disk): then a FAIL line, and its checks SKIPPED."""
    directory = work / f"model_{depth.replace(' ', '_')}"
    written = run_check("checkpoint", depth, log, write_checkpoint, directory, layers, args.tiny, args.device,
                        show_pass=False)
    try:
        if written["status"] != "PASS":
            yield written
            for check in checks:
                yield skipped(check, depth, "no checkpoint (its FAIL line above)")
            return
        yield from plan(directory, depth, checks, task, conversations, work, args, log, deadline, params)
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # (a full-depth one is 8 GB)


def environment(device: str) -> dict:
    import importlib.metadata

    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "python": sys.version.split()[0]}
    if device == "cuda":
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / GB, 1)
        info["cuda"] = torch.version.cuda
    for name in ("torch", "transformers", "accelerate", "peft", "deepspeed", "bitsandbytes", "flash-attn"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[name] = importlib.metadata.version(name)
    return info


def training_precision(device: str) -> str:
    """bf16 as released; a GPU without it (V100, T4: compute capability < 8) trains in fp16, as
    the README's commands do there. torch's is_bf16_supported() counts emulated bf16 as
    supported unless told otherwise, which would pass --bf16 on those GPUs."""
    if device == "cpu" or torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp16"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA when there is a GPU, else say so and stop; cpu runs the plan on CPU (tests)")
    p.add_argument("--tiny", action="store_true", help="the tiny model and small images instead of released widths")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per training check (default 20)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--full_depth", choices=["auto", "no"], default="auto",
                   help="auto: on CUDA also run each check at 32 layers where its memory estimate fits")
    p.add_argument("--time_budget", type=float, default=400,
                   help="seconds after which no further full-depth check starts (default 400)")
    p.add_argument("--json", default="gpu_check.json", help="where the results go (default gpu_check.json)")
    p.add_argument("--work_dir", help="checkpoints, data and logs (default: a temporary directory, removed)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        if not torch.cuda.is_available():
            print(f"gpu-check: no CUDA device here (torch {torch.__version__}, CUDA available: no); nothing to check")
            return 0
        args.device = "cuda"
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        print(f"gpu-check: error: --checks {','.join(unknown)}: unknown; choose from {','.join(CHECKS)}",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    args.num_crops = 2 if args.tiny else 16
    args.precision = training_precision(args.device)
    info = {**environment(args.device), "training precision": args.precision}
    print("gpu-check: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    json_path = Path(args.json).resolve()
    entries = []
    completed = False
    try:
        with contextlib.ExitStack() as stack:
            work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="gpu_check_")))
            work.mkdir(parents=True, exist_ok=True)
            log = stack.enter_context(open(json_path.with_suffix(".log"), "w", encoding="utf-8", buffering=1))
            # The runner logs through the root logger (and the libraries print): into the log file.
            logging.basicConfig(stream=log, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
            _single_rank_environment()
            sizes = [(500, 400), (300, 200)] if args.tiny else [(1344, 1008), (672, 672), (1008, 1344)]
            conversations = make_conversations(work / "images", 10, sizes, seed=0)
            task = make_task(conversations[2:], conversations[:2])
            depth = "tiny" if args.tiny else "2 layers"
            for entry in at_depth(2, depth, checks, task, conversations, work, args, log, None, None):
                entries.append(entry)
            if args.device == "cuda" and not args.tiny and args.full_depth == "auto":
                deadline = start + args.time_budget
                params = parameter_count(None)
                have = torch.cuda.get_device_properties(0).total_memory / GB
                fitting = [c for c in checks if memory_estimate_gb(c, params) <= 0.95 * have]
                if fitting and time.perf_counter() < deadline:
                    for entry in at_depth(None, "32 layers", checks, task, conversations, work, args, log, deadline,
                                          params):
                        entries.append(entry)
        completed = True
    finally:  # the results so far reach the JSON file also when something above raises (or Ctrl-C)
        summary = write_summary(json_path, info, args, entries, completed, time.perf_counter() - start)
    return 1 if summary["failed"] else 0


def write_summary(json_path: Path, info: dict, args, entries: list[dict], completed: bool, seconds: float) -> dict:
    summary = {"environment": info, "precision": args.precision, "steps": args.steps, "num_crops": args.num_crops,
               "checks": entries, "completed": completed,
               "passed": sum(e["status"] == "PASS" for e in entries),
               "failed": sum(e["status"] == "FAIL" for e in entries),
               "skipped": sum(e["status"] == "SKIPPED" for e in entries),
               "seconds": round(seconds, 1)}
    json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    stopped = "" if completed else " (stopped early)"
    print(f"gpu-check: {summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped in "
          f"{summary['seconds']:.0f} s{stopped}; results in {json_path} (logs in {json_path.with_suffix('.log')})",
          flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(main())
