"""What a finished run leaves behind besides the model: throughput figures, run_complete.json,
the training curves and a model card.

Throughput is counted the way the original recipe's speed table reads: images (and real,
non-padding tokens) trained on per second, per device and in total, and the peak memory of a
device. The model FLOPs of the run are counted (`model_flops`) and, on CUDA, divided by
the device's peak for the run's precision: the MFU (`Throughput.summary`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import resource
import sys
from pathlib import Path

import torch
from torch import nn
from accelerate.utils import gather_object

from phi3v.jsonfile import write_json_atomic

from .checkpoints import RUN_COMPLETE_FILE
from .launcher import world_size

__all__ = ["Throughput", "model_flops", "peak_flops", "mfu", "precision_of", "write_report", "model_card"]

logger = logging.getLogger("recipe")

CROP = 336  # pixels per side of one CLIP crop
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "bitsandbytes", "tokenizers")
# Dense (no sparsity) peak FLOP/s from the vendor data sheets, per device and precision: bf16 and
# fp16 tensor cores, TF32 tensor cores (fp32 matmuls with torch.backends.cuda.matmul.allow_tf32),
# plain fp32. Matched against torch.cuda.get_device_name in this order, first match wins. SXM and
# PCIe parts differ (H100 SXM 989 vs PCIe 756 TFLOP/s bf16) and are told apart by the name: the
# H100 SXM reports itself as "H100 80GB HBM3", the PCIe card as "H100 PCIe".
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = tuple(
    (pattern, {"bf16": half * 1e12, "fp16": half * 1e12, "tf32": tf32 * 1e12, "fp32": fp32 * 1e12})
    for pattern, half, tf32, fp32 in (
        (r"H200 NVL", 835, 418, 60),
        (r"H200|GH200", 989, 495, 67),
        (r"H100 NVL", 835, 418, 60),
        (r"H100 PCIe", 756, 378, 51),
        (r"H100 (SXM|\d+GB HBM3)", 989, 495, 67),
        (r"A100[- ]SXM", 312, 156, 19.5),
        (r"A100[- ](PCIE|.*PCIe)", 312, 156, 19.5),
        (r"L40S", 362, 183, 91.6),
        (r"\bL4\b", 121, 60, 30.3),
        (r"\bA10\b", 125, 62.5, 31.2),
    )
)
CLIP_TOKENS = 577  # 24 x 24 patches + the class token of one 336-pixel crop


class Throughput:
    """Counts what this process trained on; `summary` turns the counts into rates over the run."""

    def __init__(self, pad_token_id: int | None = None):
        self.pad_token_id = pad_token_id
        self.images = 0
        # Sums stay tensors on the batch's device: reading them each step would wait for the GPU.
        self._crops = self._tokens = self._squares = self._image_tokens = 0

    def count(self, inputs: dict) -> None:
        if "attention_mask" in inputs:
            per_row = inputs["attention_mask"].sum(dim=1)
            self._tokens = self._tokens + per_row.sum()
            self._squares = self._squares + per_row.pow(2).sum()
        elif self.pad_token_id is not None:  # packed rows (--padding_free) carry no mask, only end padding
            real = inputs["input_ids"] != self.pad_token_id
            self._tokens = self._tokens + real.sum()
            self._squares = self._squares + _packed_squares(real, inputs.get("position_ids"))
        sizes = inputs.get("image_sizes")
        if sizes is not None:
            self.images += len(sizes)
            rows, cols = sizes[:, 0] // CROP, sizes[:, 1] // CROP
            # Each image runs its h x w sub-crops plus one global crop through CLIP ...
            self._crops = self._crops + (rows * cols + 1).sum()
            # ... and the projector maps its image tokens (12 x 12 per crop, plus separators:
            # Phi3VImageEmbedding.num_tokens).
            self._image_tokens = self._image_tokens + (rows * 12 * (cols * 12 + 1) + 1 + 12 * 13).sum()

    def counts(self) -> dict:
        """This process' counts as plain numbers (reads the device sums once)."""
        return {"images": self.images, "crops": int(self._crops), "real_tokens": int(self._tokens),
                "token_squares": int(self._squares), "image_tokens": int(self._image_tokens)}

    def _totals(self) -> dict:
        """Summed over the ranks (every rank calls `summary` once, at the end of training)."""
        per_rank = gather_object([self.counts()])
        return {key: sum(rank[key] for rank in per_rank) for key in per_rank[0]}

    def summary(self, runtime: float | None, device: torch.device, model=None, precision: str = "fp32") -> dict:
        """Rates over the training time of this run (a resumed run: its own part).

        mfu (CUDA only): model FLOP/s achieved per device / the device's peak for `precision`
        (`model_flops` says what is counted; `peak_flops` where the peak comes from); null, with
        a log line saying why, on a device without a known peak.
        """
        totals = self._totals()
        images, crops, tokens = totals["images"], totals["crops"], totals["real_tokens"]
        world = world_size()
        runtime = runtime or float("nan")
        out = {
            "world_size": world,
            "train_runtime_s": round(runtime, 3),
            "images": images,
            "crops": crops,
            "real_tokens": tokens,
            "images_per_s": images / runtime,
            "images_per_s_per_device": images / runtime / world,
            "real_tokens_per_s": tokens / runtime,
            "real_tokens_per_s_per_device": tokens / runtime / world,
            "peak_memory_gb": _peak_memory_gb(device),
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        }
        if model is not None:
            flops = model_flops(model, tokens, totals["token_squares"], crops, totals["image_tokens"])
            out["model_flops"] = flops["total"]
            out["model_flops_parts"] = flops
            if device.type == "cuda":
                name = torch.cuda.get_device_name(device)
                out["mfu"] = mfu(flops["total"], runtime, world, name, precision)
                out["mfu_peak"] = {"device": name, "precision": precision,
                                   "flops_per_s": peak_flops(name, precision)[0]}
        return out

    @staticmethod
    def describe(summary: dict) -> str:
        mfu_text = f", MFU {summary['mfu']:.1%}" if summary.get("mfu") is not None else ""
        return (f"{summary['images_per_s']:.2f} images/s, {summary['real_tokens_per_s']:.0f} real tokens/s in total "
                f"over {summary['world_size']} device(s); peak memory {summary['peak_memory_gb']:.2f} GB "
                f"({summary['peak_memory_kind']}){mfu_text}")


def _packed_squares(real: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Sum over the packed examples of (real tokens)^2: an example starts where position_ids
    restart at 0. A scatter into a fixed-size buffer, so nothing waits for the GPU."""
    if position_ids is None:
        return real.sum(dim=1).pow(2).sum()
    segment = (position_ids.reshape(-1) == 0).cumsum(0) - 1  # example index of every token
    lengths = torch.zeros(real.numel(), dtype=torch.long, device=real.device)
    lengths.scatter_add_(0, segment, real.reshape(-1).long())
    return lengths.pow(2).sum()


def precision_of(training_args) -> str:
    """The precision of the run's matmuls, for the MFU peak: bf16, fp16, or for fp32 runs tf32
    when PyTorch may use TF32 tensor cores (--tf32 / allow_tf32), else fp32."""
    if training_args.bf16:
        return "bf16"
    if training_args.fp16:
        return "fp16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops(device_name: str, precision: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s, "") for a known device, else (None, why). A MIG instance names the
    whole GPU, but has only a slice of its compute: the whole chip's peak would understate MFU."""
    if "MIG" in device_name:
        return None, (f"device {device_name!r} is a MIG instance, which has a fraction of the GPU's compute; the "
                      "table holds whole GPUs")
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, device_name):
            return peaks[precision], ""
    if "H100" in device_name:
        return None, (f"device {device_name!r} is an H100 whose form factor (SXM 989 / PCIe 756 TFLOP/s bf16) "
                      "the name does not tell")
    return None, f"no peak FLOP/s known for device {device_name!r} (recipe/report.py PEAK_FLOPS)"


def mfu(flops: float, runtime: float, world: int, device_name: str, precision: str) -> float | None:
    """Model FLOP/s per device / the device's peak for `precision`; None (and a log line) when the
    peak is unknown."""
    peak, why = peak_flops(device_name, precision)
    if peak is None:
        logger.info("MFU not reported (null in run_complete.json): %s; add it to PEAK_FLOPS to get one", why)
        return None
    return flops / runtime / world / peak


def _matmul_size(module: nn.Module) -> int:
    """Multiply-adds of one application of a Linear (4-bit ones included: bitsandbytes keeps
    in/out_features, while the packed weight holds half the values per byte) or, per output
    position, of a Conv2d. Read from the module's shape, not its weight: under ZeRO-3 a rank
    holds an empty placeholder."""
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return module.in_channels // module.groups * module.out_channels * k
    return 0


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def model_flops(model, tokens: int, token_squares: int, crops: int, image_tokens: int) -> dict:
    """Training FLOPs of the counted batches, per part, as PaLM (appendix B) counts model FLOPs.

    Matmuls: a weight of m multiply-adds applied at n positions costs 2mn forward; backward
    another 2mn for the input gradient when its part backpropagates (the decoder always; the
    image side unless frozen) and 2mn for the weight gradient when the weight trains. So a
    fully trained weight costs 6mn, a frozen weight in a backpropagating part 4mn (LoRA/QLoRA
    bases, whose adapters' own matmuls are counted the same way), a weight that only runs
    forward 2mn (the frozen image side). 4-bit weights count at their real shape; the
    dequantisation is not matmul work. Recomputation under activation checkpointing is not
    counted (that would be hardware FLOPs).
    Positions: decoder weights (lm_head included; the embedding table is a lookup, not a
    matmul) at every real token; CLIP weights at 577 tokens per crop (the patch convolution at
    576); the projector at the image tokens.
    Attention (QK^T and AV): 4 x layers x width x T^2 forward per sequence of T real tokens
    (the full square, not halved for the causal mask), x3 when the part backpropagates;
    `token_squares` is the sum of T^2 over the sequences (packed rows: over their examples);
    CLIP: T = 577 per crop, only its layers that run.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = base.model.vision_embed_tokens
    skipped = {id(m) for u in (vision.unused_modules() if vision is not None else []) for m in u.modules()}
    vision_modules = {id(m) for m in vision.modules()} if vision is not None else set()
    projector = {id(m) for m in vision.img_projection.modules()} if vision is not None else set()
    vision_backprop = vision is not None and any(p.requires_grad for p in vision.parameters())
    parts = {"decoder": 0, "vision": 0, "attention": 0}
    for module in base.modules():
        size = _matmul_size(module)
        if not size or id(module) in skipped:
            continue
        if id(module) not in vision_modules:
            positions, backprop, part = tokens, True, "decoder"
        elif id(module) in projector:
            positions, backprop, part = image_tokens, vision_backprop, "vision"
        else:
            positions = crops * (CLIP_TOKENS - 1 if isinstance(module, nn.Conv2d) else CLIP_TOKENS)
            backprop, part = vision_backprop, "vision"
        parts[part] += 2 * size * positions * (1 + backprop + _trains(module))
    text = base.config
    parts["attention"] = 4 * text.num_hidden_layers * text.hidden_size * token_squares * 3
    if vision is not None:
        width = base.config.vision_config.hidden_size
        parts["attention"] += (4 * vision.num_layers * width * CLIP_TOKENS**2 * crops * (3 if vision_backprop else 1))
    parts["total"] = sum(parts.values())
    return parts


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def library_versions() -> dict:
    versions = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def method(model_args) -> str:
    if model_args.use_qlora:
        return f"QLoRA (4-bit NF4 base, LoRA r={model_args.lora_rank}, alpha={round(model_args.lora_rank * model_args.lora_alpha_ratio)})"
    if model_args.use_lora:
        return f"LoRA (r={model_args.lora_rank}, alpha={round(model_args.lora_rank * model_args.lora_alpha_ratio)})"
    return "full finetuning" + (" with a frozen vision tower" if model_args.freeze_vision_model else "")


def model_card(task, results: dict, model_args, data_args, training_args, max_steps: int | None = None,
               objective=None) -> str:
    """The hub's model-card format (YAML header + markdown), from this run's own numbers.
    `max_steps`: the run's planned steps (a --warmup_steps ratio is printed as the steps it made);
    `objective`: the run's recipe.objective.Objective (its method and what it fixes before training)."""
    from huggingface_hub import ModelCard, ModelCardData

    metric = task.metric
    data = (getattr(data_args, "train_file", None) or getattr(data_args, "dataset_name_or_path", None)
            or getattr(data_args, "data_dir", None) or "local data")
    card_data = ModelCardData(
        base_model=model_args.model_name_or_path if not Path(model_args.model_name_or_path).exists() else None,
        library_name="transformers" if not model_args.use_lora else "peft",
        pipeline_tag="image-text-to-text",
        tags=["phi3_v", "vision-language", task.name, "finetuned"],
    )
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    t = training_args
    warmup = t.get_warmup_steps(max_steps) if max_steps else t.warmup_steps
    objective_method = objective.card_method(data_args) if objective is not None else None
    before_note = objective.card_before(metric) if objective is not None and "eval_before" in results else None
    load = (
        "import phi3v\nfrom transformers import AutoModelForCausalLM, AutoProcessor\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH)\nprocessor = AutoProcessor.from_pretrained(PATH)"
        if not model_args.use_lora else
        "import phi3v\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH)  # base from adapter_config.json + this adapter"
    )
    text = f"""---
{card_data.to_yaml()}
---

# {task.name} finetune of {model_args.model_name_or_path}

Finetuned with this repository's `{task.script or f'finetune_hf_trainer_{task.name}.py'}` on {data}.
All numbers below are from this run.

| | |
|---|---|
| base model | `{model_args.model_name_or_path}` |
| method | {method(model_args)}{f", {objective_method}" if objective_method else ""} |
| task metric | {metric} |
| {metric} before finetuning | {fmt(results.get('eval_before'))}{f" {before_note}" if before_note else ""} |
| {metric} after finetuning | {fmt(results.get('eval_after'))} |
| {metric} of merged/ | {fmt(results.get('eval_merged'))} |
| evaluation examples | {results.get('num_eval_examples', '-')} |
| steps | {results.get('global_step', '-')} (global batch {t.batch_size}, {t.batch_size_per_gpu} per device, {world_size()} device(s)) |
| learning rate | {t.learning_rate} ({getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)}, {warmup} warmup steps), weight decay {t.weight_decay} |
| AdamW | betas ({t.adam_beta1}, {t.adam_beta2}), eps {t.adam_epsilon}, grad clip {t.max_grad_norm} |
| precision | {'bf16' if t.bf16 else 'fp16' if t.fp16 else 'fp32'}, num_crops {model_args.num_crops}, seed {t.seed} |
| mean training loss | {fmt(results.get('train_loss'))} |

## Use it

transformers (this repository's `phi3v` package installed: `pip install .`), PATH being this directory:

```python
{load}
```

From the command line: `python -m phi3v.generate --model PATH --image photo.jpg --prompt "..."`.
With vLLM: `vllm serve PATH` (see the repository README, "Serve it").
"""
    return ModelCard(text).content


def write_report(run) -> None:
    """run_complete.json, training_curves.png and README.md (the model card) in --output_dir, for
    `run`, a finished recipe.runner.Runner (its task, results, trainer and flags)."""
    from dataclasses import asdict

    from .plotting import plot_training_curves

    task, results, trainer = run.task, run.results, run.trainer
    model_args, data_args, training_args = run.model_args, run.data_args, run.training_args
    output_dir = Path(training_args.output_dir)
    plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png", title=task.name)
    card = model_card(task, results, model_args, data_args, training_args, max_steps=trainer.state.max_steps,
                      objective=run.objective)
    (output_dir / "README.md").write_text(card, encoding="utf-8")
    if (output_dir / "merged").is_dir():
        (output_dir / "merged" / "README.md").write_text(card, encoding="utf-8")
    summary = {
        "task": task.name,
        "results": results,
        "train_loss_note": "train_loss is the mean training loss over every step of the run, resumed parts included",
        "world_size": world_size(),
        "versions": library_versions(),
        "model_args": asdict(model_args),
        "data_args": asdict(data_args),
        "training_args": json.loads(training_args.to_json_string()),
    }
    write_json_atomic(output_dir / RUN_COMPLETE_FILE, summary)
