"""`--dry_run`: what a run would cost, checked in seconds on a laptop before renting GPUs.

It does everything a run does up to loading the weights: the flags and their checks, the
processor, the task's data read and validated exactly as for training (recipe.runner.Runner.setup_data),
the first training batches built by the real dataset and collator. Then it prints, and exits 0 (on
any machine: what only the GPU machine has, a launcher, a GPU, flash-attn, is not asked for):

- examples kept (of those read), tokens per example (min/mean/max), image tokens per image at
  this --num_crops, the first batches' shapes, optimizer steps (as the Trainer counts them);
- a rough memory estimate per GPU for the chosen mode, precision and ZeRO stage, for the
  largest micro-batch the data can make (its longest examples, its examples with the most
  image crops, wherever they are in the file) and the model's size read from its config.json
  (the model is built on the `meta` device: shapes only, no weights): weights, gradients,
  optimizer states, activations.

The memory figures are estimates (no fragmentation, no CUDA context, no DeepSpeed buffers;
activations by the usual ~34 bytes per token and hidden unit per layer in half precision):
enough to tell whether a mode fits a GPU, not a measurement.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

from .flag_parser import Flags
from .launcher import world_size

__all__ = ["dry_run", "optimizer_steps", "MemoryEstimate", "estimate_memory", "worst_tokens", "worst_crops"]

GB = 1024**3
FIRST_BATCHES = 2
# CLIP ViT-L/14 at 336 px: 24 x 24 patches + the class token per crop.
CLIP_TOKENS_PER_CROP = 577


def optimizer_steps(examples: int, training) -> tuple[int, int]:
    """(steps in total, steps per epoch) as transformers' Trainer counts them: each rank's
    dataloader holds ceil(examples / ranks) examples in micro-batches of --batch_size_per_gpu,
    and an optimizer step takes `accumulation` of them (a last partial one counts)."""
    world = world_size()
    accumulation = training.batch_size // (world * training.batch_size_per_gpu)
    batches = math.ceil(math.ceil(examples / world) / training.batch_size_per_gpu)
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    if training.max_steps > 0:
        return training.max_steps, per_epoch
    return math.ceil(training.num_train_epochs * per_epoch), per_epoch


@dataclass
class MemoryEstimate:
    """Bytes per GPU, rough (see the module docstring)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def _zero_stage(deepspeed: str | None) -> int | None:
    if not deepspeed:
        return None
    stage = json.loads(Path(deepspeed).read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage", 0)
    return int(stage) if str(stage).isdigit() else 0


def _sizes(model_args, config):
    """(total, trainable, quantised) parameter counts of the model this run would train, from a
    model built on the meta device (no memory, no weights read)."""
    import torch
    from torch import nn

    from phi3v.modeling_phi3v import Phi3VForCausalLM

    from .model import lora_target_modules

    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    vision = model.model.vision_embed_tokens
    unused = {id(p) for m in (vision.unused_modules() if vision is not None else []) for p in m.parameters()}
    vision_params = {id(p) for p in vision.parameters()} if vision is not None else set()
    quantised = sum(m.weight.numel() for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and ".vision_embed_tokens." not in f".{name}." and name != "lm_head")
    if model_args.use_lora:
        targets = set(lora_target_modules(model, include_vision=not model_args.freeze_vision_model))
        trainable = sum(model_args.lora_rank * (m.in_features + m.out_features)
                        for name, m in model.named_modules() if name in targets)
    else:
        frozen = vision_params if model_args.freeze_vision_model else unused
        trainable = sum(p.numel() for p in model.parameters() if id(p) not in frozen)
    return total, trainable, quantised


def estimate_memory(model_args, training, config, sizes, tokens: int, crops: int) -> MemoryEstimate:
    """Per GPU, for `tokens` tokens and `crops` image crops in one micro-batch."""
    total, trainable, quantised = sizes
    half = 2 if (training.bf16 or training.fp16) else 4
    world = world_size()
    stage = _zero_stage(training.deepspeed)
    adam = 8 * trainable  # AdamW's two fp32 moments
    if model_args.use_lora:
        base = quantised * 4.5 / 8 + (total - quantised) * half if model_args.use_qlora else total * half
        weights, gradients, optimizer = base + 4 * trainable, 4 * trainable, adam  # fp32 adapters
        if stage is not None:  # ZeRO partitions them as for full finetuning (below), the frozen base too
            weights /= world if stage >= 3 else 1
            gradients /= world if stage >= 2 else 1
            optimizer /= world if stage >= 1 else 1
    elif stage is not None:
        # DeepSpeed holds half-precision weights and gradients and, with --bf16/--fp16, fp32
        # master weights next to the moments; ZeRO-1/2/3 partition optimizer / +gradients / +weights.
        weights = total * half / (world if stage >= 3 else 1)
        gradients = trainable * half / (world if stage >= 2 else 1)
        optimizer = (adam + (4 * trainable if half == 2 else 0)) / (world if stage >= 1 else 1)
    else:  # AMP: fp32 weights, gradients and moments; autocast computes in half precision
        weights, gradients, optimizer = 4 * total, 4 * trainable, adam
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    per_layer = 17 * half * tokens * hidden  # ~34 bytes per token and hidden unit in half precision
    checkpointing = bool(training.activation_checkpointing)
    language = layers * tokens * hidden * half + per_layer if checkpointing else layers * per_layer
    logits = 2 * 4 * tokens * vocab  # fp32 logits and their gradient
    vision = 0.0
    if not model_args.freeze_vision_model and crops and config.vision_config is not None:
        vision_config = config.vision_config
        get = vision_config.get if isinstance(vision_config, dict) else vision_config.__getattribute__
        width, depth = get("hidden_size"), get("num_hidden_layers")
        vision_tokens = crops * CLIP_TOKENS_PER_CROP
        per_vision_layer = 17 * half * vision_tokens * width
        vision = depth * vision_tokens * width * half + per_vision_layer if checkpointing else depth * per_vision_layer
    return MemoryEstimate(weights, gradients, optimizer, language + logits + vision)


def worst_tokens(lengths: Sequence[int], per_device: int, max_tokens_per_row: int | None) -> int:
    """Token positions of the largest micro-batch the data can make, from the lengths validation
    measured (any example may come last in the file and first in a batch): --batch_size_per_gpu
    rows padded to the longest example, or with --padding_free (`max_tokens_per_row`) the longest
    examples packed into rows as the collator packs them (recipe.packing), padded to the widest row."""
    longest = sorted(lengths, reverse=True)[:per_device]
    if not longest:
        return 0
    if max_tokens_per_row is None:
        return per_device * longest[0]
    from .packing import pack_rows

    rows = pack_rows(longest, max_tokens_per_row)
    return len(rows) * max(sum(longest[i] for i in row) for row in rows)


def worst_crops(conversations: Sequence, num_crops: int, per_device: int) -> int:
    """Image crops CLIP encodes in the largest micro-batch the data can make: the --batch_size_per_gpu
    examples with the most (each image: its global view and its HD crops at --num_crops, from the
    image sizes validation read; padding crops never reach CLIP)."""
    from phi3v.image_processing_phi3v import CROP_SIZE, hd_image_size

    def crops(conversation) -> int:
        sizes = (hd_image_size(w, h, num_crops) for w, h in conversation.tokens.image_sizes)
        return sum(1 + (height // CROP_SIZE) * (width // CROP_SIZE) for height, width in sizes)

    return sum(sorted((crops(c) for c in conversations), reverse=True)[:per_device])


def _spread(values: Sequence[int]) -> str:
    return f"min {min(values)} / mean {sum(values) / len(values):.1f} / max {max(values)}" if values else "none"


def _mode(model_args, training) -> str:
    if model_args.use_qlora:
        mode = f"QLoRA (4-bit base, rank {model_args.lora_rank})"
    elif model_args.use_lora:
        mode = f"LoRA (rank {model_args.lora_rank})"
    else:
        mode = "full finetuning"
    if model_args.freeze_vision_model:
        mode += ", vision frozen"
    stage = _zero_stage(training.deepspeed)
    mode += f", DeepSpeed ZeRO-{stage}" if stage is not None else ", no DeepSpeed"
    mode += ", bf16" if training.bf16 else (", fp16" if training.fp16 else ", fp32")
    return mode


def dry_run(task, flags: Flags) -> dict:
    """Checks the flags (done), the processor and the data of `task` (the script's
    recipe.task.Task), builds the first batches, prints what the run would cost, and returns the
    figures; loads no weights and writes nothing."""
    from phi3v.configuration_phi3v import Phi3VConfig
    from phi3v.processing_phi3v import Phi3VProcessor

    from .flag_parser import parse_transformers_flags
    from .runner import Runner

    parse_transformers_flags(flags)  # (the flags a run would refuse, as build_training_args parses them)
    task = task.resolve(flags.data)  # (the task the flags name, as Runner.from_flags resolves it)
    model_args, data_args, training = flags.model, flags.data, flags.training
    processor = Phi3VProcessor.from_pretrained(model_args.model_name_or_path, num_crops=model_args.num_crops)
    config = Phi3VConfig.from_pretrained(model_args.model_name_or_path)  # config.json only
    read = task.load_data(data_args, model_args)
    counts_read = [None if part is None else len(part) for part in read]
    runner = Runner(task, model_args, data_args,
                    SimpleNamespace(disable_tqdm=training.no_tqdm, seed=training.seed))
    runner.processor = processor
    runner.setup_data(read)
    train, eval_ = runner.train_data, runner.eval_data
    training_set = train if train is not None else eval_
    tokens = [c.tokens.total for c in training_set]
    image_tokens = [n for c in training_set for n in c.tokens.images]
    # (the objective's own training dataset and collator, as the run's Trainer gets them)
    dataset = runner.objective.dataset(runner, training_set, training=True)
    collator = runner.objective.collator(runner)
    per_device = training.batch_size_per_gpu
    batches = [collator([dataset[i] for i in range(start, min(start + per_device, len(dataset)))])
               for start in range(0, min(len(dataset), FIRST_BATCHES * per_device), per_device)]
    steps, per_epoch = optimizer_steps(len(train), training) if train is not None else (0, 0)
    sizes = _sizes(model_args, config)
    crops = worst_crops(training_set, model_args.num_crops, per_device)
    micro_tokens = max(b["input_ids"].numel() for b in batches)
    longest = worst_tokens(tokens, per_device, data_args.max_tokens_per_row if data_args.padding_free else None)
    memory = estimate_memory(model_args, training, config, sizes, max(longest, micro_tokens), crops)

    world = world_size()
    accumulation = training.batch_size // (world * per_device)
    lines = [f"dry run of {task.name}: flags and data checked, processor loaded, no weights loaded",
             f"  model: {model_args.model_name_or_path} ({sizes[0]:,} parameters by its config.json); "
             f"{_mode(model_args, training)}; {sizes[1]:,} trainable"]
    if train is not None:
        lines.append(f"  training examples: {len(train)} kept of {counts_read[0]}")
    lines += [f"  evaluation examples: {len(eval_)} kept of {counts_read[1]}",
              f"  tokens per {'training' if train is not None else 'evaluation'} example: {_spread(tokens)}",
              f"  image tokens per image at --num_crops {model_args.num_crops}: {_spread(image_tokens)} "
              f"({len(image_tokens)} images)"]
    for number, batch in enumerate(batches, 1):
        shapes = ", ".join(f"{key} {'x'.join(map(str, value.shape))}" for key, value in batch.items()
                           if hasattr(value, "shape") and key in ("input_ids", "pixel_values"))
        lines.append(f"  batch {number}: {shapes}")
    if train is not None:
        lines.append(f"  optimizer steps: {steps} ({per_epoch} per epoch; global batch {training.batch_size} = "
                     f"{world} process(es) x {per_device} per device x {accumulation} accumulation)")
    lines.append(f"  memory per GPU, rough, {world} process(es): weights {memory.weights / GB:.2f} GB, gradients "
                 f"{memory.gradients / GB:.2f} GB, optimizer states {memory.optimizer / GB:.2f} GB, activations "
                 f"{memory.activations / GB:.2f} GB ({max(longest, micro_tokens)} tokens per micro-batch, activation "
                 f"checkpointing {'on' if training.activation_checkpointing else 'off'}) = {memory.total / GB:.2f} GB")
    if os.environ.get("RANK", "0") == "0":  # (under torchrun every process plans the same)
        print("\n".join(lines), flush=True)
    return {"dry_run": True, "train_examples": None if train is None else len(train), "eval_examples": len(eval_),
            "tokens": tokens, "image_tokens": image_tokens, "optimizer_steps": steps, "parameters": sizes[0],
            "trainable_parameters": sizes[1], "memory": memory}
