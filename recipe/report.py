"""What a finished run leaves behind besides the model: throughput figures, run_complete.json,
the training curves and a model card.

Throughput is counted the way the original recipe's speed table reads: images (and real,
non-padding tokens) trained on per second, per device and in total, and the peak memory of a
device. On CUDA an MFU estimate is added (see `Throughput.summary`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import resource
import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object

from phi3v.export import write_json_atomic

from .args import RUN_COMPLETE_FILE, world_size

__all__ = ["Throughput", "write_report", "model_card"]

logger = logging.getLogger("recipe")

CROP = 336  # pixels per side of one CLIP crop
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "bitsandbytes", "tokenizers")
# bf16 dense peak FLOP/s of common training GPUs (vendor data sheets), for the MFU estimate.
PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "A800": 312e12, "L40S": 362e12,
                   "A10": 125e12, "V100": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


class Throughput:
    """Counts what this process trained on; `summary` turns the counts into rates over the run."""

    def __init__(self, pad_token_id: int | None = None):
        self.pad_token_id = pad_token_id
        self.images = 0
        # Sums stay tensors on the batch's device: reading them each step would wait for the GPU.
        self._crops = self._tokens = 0

    def count(self, inputs: dict) -> None:
        if "attention_mask" in inputs:
            self._tokens = self._tokens + inputs["attention_mask"].sum()
        elif self.pad_token_id is not None:  # packed rows (--padding_free) carry no mask, only end padding
            self._tokens = self._tokens + (inputs["input_ids"] != self.pad_token_id).sum()
        sizes = inputs.get("image_sizes")
        if sizes is not None:
            self.images += len(sizes)
            # Each image runs its h x w sub-crops plus one global crop through CLIP.
            self._crops = self._crops + ((sizes[:, 0] // CROP) * (sizes[:, 1] // CROP) + 1).sum()

    def _totals(self) -> list[int]:
        """Summed over the ranks (every rank calls `summary` once, at the end of training)."""
        per_rank = gather_object([(self.images, int(self._crops), int(self._tokens))])
        return [sum(column) for column in zip(*per_rank)]

    def summary(self, runtime: float | None, device: torch.device, model=None) -> dict:
        """Rates over the training time of this run (a resumed run: its own part).

        mfu (CUDA only): achieved / peak bf16 FLOP/s, with achieved = (6 x decoder parameters x
        real tokens + 6 x vision-tower parameters x 577 patches x crops) / time / devices, i.e.
        forward + backward as if every weight were trained (an upper bound on the work of
        frozen-vision and LoRA runs, whose weight gradients are skipped).
        """
        images, crops, tokens = self._totals()
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
        if device.type == "cuda" and model is not None:
            out["mfu"] = _mfu(model, tokens, crops, runtime, world, device)
        return out

    @staticmethod
    def describe(summary: dict) -> str:
        return (f"{summary['images_per_s']:.2f} images/s, {summary['real_tokens_per_s']:.0f} real tokens/s in total "
                f"over {summary['world_size']} device(s); peak memory {summary['peak_memory_gb']:.2f} GB "
                f"({summary['peak_memory_kind']})")


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _mfu(model, tokens: int, crops: int, runtime: float, world: int, device) -> float | None:
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    if peak is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = sum(getattr(p, "ds_numel", p.numel()) for p in base.model.vision_embed_tokens.parameters())
    decoder = sum(getattr(p, "ds_numel", p.numel()) for p in base.parameters()) - vision
    flops = 6 * decoder * tokens + 6 * vision * 577 * crops
    return flops / runtime / world / peak


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


def model_card(task, results: dict, model_args, data_args, training_args) -> str:
    """The hub's model-card format (YAML header + markdown), from this run's own numbers."""
    from huggingface_hub import ModelCard, ModelCardData

    metric = task.metric
    data = (getattr(data_args, "dataset_name_or_path", None) or getattr(data_args, "data_dir", None)
            or getattr(data_args, "train_file", None) or "local data")
    card_data = ModelCardData(
        base_model=model_args.model_name_or_path if not Path(model_args.model_name_or_path).exists() else None,
        library_name="transformers" if not model_args.use_lora else "peft",
        pipeline_tag="image-text-to-text",
        tags=["phi3_v", "vision-language", task.name, "finetuned"],
    )
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    t = training_args
    load = (
        f"import phi3v\nfrom transformers import AutoModelForCausalLM, AutoProcessor\n"
        f"model = AutoModelForCausalLM.from_pretrained(PATH)\nprocessor = AutoProcessor.from_pretrained(PATH)"
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
| method | {method(model_args)} |
| task metric | {metric} |
| {metric} before finetuning | {fmt(results.get('eval_before'))} |
| {metric} after finetuning | {fmt(results.get('eval_after'))} |
| {metric} of merged/ | {fmt(results.get('eval_merged'))} |
| evaluation examples | {results.get('num_eval_examples', '-')} |
| steps | {results.get('global_step', '-')} (global batch {t.batch_size}, {t.batch_size_per_gpu} per device, {world_size()} device(s)) |
| learning rate | {t.learning_rate} ({getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)}, {t.warmup_steps} warmup steps), weight decay {t.weight_decay} |
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


def write_report(task, results: dict, trainer, model_args, data_args, training_args) -> None:
    """run_complete.json, training_curves.png and README.md (the model card) in --output_dir."""
    from dataclasses import asdict

    from .plotting import plot_training_curves

    output_dir = Path(training_args.output_dir)
    plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png", title=task.name)
    card = model_card(task, results, model_args, data_args, training_args)
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
