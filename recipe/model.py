"""Model setup as one function of the flags: full, frozen-vision, LoRA and QLoRA.

| mode | weights loaded as | trained |
|---|---|---|
| full (default, DeepSpeed ZeRO-2) | bf16/fp16 with those flags, else fp32 | everything used |
| full, --deepspeed none | fp32 (AMP autocast computes in bf16/fp16) | everything used |
| --freeze_vision_model | as full | language model only; the image side runs without autograd |
| --use_lora | bf16/fp16 with those flags, else fp32 | LoRA adapters (fp32) |
| --use_qlora | 4-bit NF4, compute in bf16/fp16/fp32 | LoRA adapters (fp32) |

The optimiser never steps half-precision weights: in bf16 `0.02 - 4e-5` is `0.02`, so most
updates at the usual learning rates would vanish. Without DeepSpeed the weights that train are
therefore loaded in fp32 (also with --use_flash_attention: autocast hands FlashAttention-2 its
bf16 inputs) and AMP autocast computes in half precision on them. DeepSpeed with --bf16/--fp16
(its config's "auto" follows the flags) holds the module in that dtype and steps fp32 copies it
makes from what it is handed: it would cast an fp32 load down to bf16 first, so loading in bf16
trains exactly the same weights (bf16 -> fp32 is exact) while each rank's host memory holds
half as much before DeepSpeed takes the model (~8.5 instead of ~17 GB for the 4.2B model).
LoRA adapters are created fp32 next to a half-precision frozen base (PEFT's
`autocast_adapter_dtype`).

LoRA targets the original recipe's modules: the language model's qkv_proj, o_proj,
gate_up_proj, down_proj and lm_head, plus, unless the vision side is frozen, CLIP's q/k/v/out
projections and MLP and the image projector -- only in CLIP layers that actually run (layers
after the feature layer never get gradients). Adapters start with gaussian init.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.trainer_pt_utils import get_model_param_count

import phi3v  # noqa: F401  (registers the native classes with the Auto factories)
from phi3v.modeling_phi3v import Phi3VForCausalLM

from .args import ModelArguments
from .training_args import RecipeTrainingArguments

__all__ = ["load_model", "weights_dtype", "lora_target_modules", "freeze_vision", "parameter_groups", "count_parameters", "SEPARATORS",
           "REFERENCE_ADAPTER"]

LANGUAGE_LORA_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
VISION_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PROJECTOR_LORA_MODULES = ("img_projection.0", "img_projection.2")
SEPARATORS = ("glb_GN", "sub_GN")  # learned image separator embeddings
REFERENCE_ADAPTER = "reference"  # load_model(reference_adapter=True): the frozen copy of the starting adapter


def _dtype(training_args: RecipeTrainingArguments, full_precision: bool) -> torch.dtype:
    if full_precision:
        return torch.float32
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def weights_dtype(model_args: ModelArguments, training_args: RecipeTrainingArguments) -> torch.dtype:
    """The dtype the weights are loaded in (the table in the module docstring): half precision
    where nothing steps them in it (a frozen LoRA/QLoRA base; DeepSpeed, which steps its own
    fp32 copies), fp32 where the optimiser steps the module's own weights."""
    return _dtype(training_args, full_precision=not (model_args.use_lora or training_args.deepspeed))


def load_model(model_args: ModelArguments, training_args: RecipeTrainingArguments, adapter: str | None = None,
               reference_adapter: bool = False) -> nn.Module:
    """The model ready for the Trainer (a PeftModel with LoRA/QLoRA).

    `adapter`: a LoRA output directory to continue training (its rank and targets, not the
    --lora_* flags) instead of new adapters. `reference_adapter`: load it a second time, frozen,
    as REFERENCE_ADAPTER (preference tuning's reference: base + the starting adapter, on the
    same base weights); only the trained adapter is saved.
    """
    quantization_config = None
    if model_args.use_qlora:
        from transformers import BitsAndBytesConfig

        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_dtype(training_args, full_precision=False),
            # The image side stays in full precision (small, and CLIP is sensitive to it). Patterns
            # match from the start of a module's full name (or as its suffix).
            llm_int8_skip_modules=["lm_head", "model.vision_embed_tokens"],
        )
    model = Phi3VForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=weights_dtype(model_args, training_args),
        attn_implementation="flash_attention_2" if model_args.use_flash_attention else "sdpa",
        quantization_config=quantization_config,
        device_map={"": torch.cuda.current_device()} if quantization_config and torch.cuda.is_available() else None,
        # --model_family overrides what the checkpoint's config.json says (or lets be detected).
        **({} if model_args.model_family == "auto" else {"model_family": model_args.model_family}),
    )
    model.config.use_cache = False  # training; evaluation turns it back on for generate
    if model_args.freeze_vision_model:
        freeze_vision(model)
    if model_args.use_lora and adapter:
        return _load_adapter(model, adapter, reference_adapter)
    if model_args.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=model_args.lora_rank,
            lora_alpha=round(model_args.lora_rank * model_args.lora_alpha_ratio),
            lora_dropout=model_args.lora_dropout,
            target_modules=lora_target_modules(model, include_vision=not model_args.freeze_vision_model),
            init_lora_weights="gaussian",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora, autocast_adapter_dtype=True)  # fp32 adapters (the default)
        # lm_head is a LoRA target; PEFT would then also store the (unchanged) base lm_head in
        # every adapter and checkpoint (~200 MB at full size). The base model has it already.
        model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    return model


def _load_adapter(model: nn.Module, adapter: str, reference_adapter: bool) -> nn.Module:
    from peft import PeftModel

    # fp32 adapters next to a half-precision base, as get_peft_model makes them (autocast_adapter_dtype).
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True, autocast_adapter_dtype=True)
    if reference_adapter:
        model.load_adapter(adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False, autocast_adapter_dtype=True)
        # The reference runs in the policy's train mode: the SFT run's --lora_dropout must not
        # make it random (the base's own dropout is off in every release config).
        for module in model.modules():
            dropout = getattr(module, "lora_dropout", None)
            if isinstance(dropout, nn.ModuleDict) and REFERENCE_ADAPTER in dropout:
                dropout[REFERENCE_ADAPTER] = nn.Identity()
        model.set_adapter("default")
        model.set_requires_grad(REFERENCE_ADAPTER, requires_grad=False)
    # Only the trained adapter is the output (PEFT would save every loaded adapter); no base lm_head (see above).
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False,
                                              selected_adapters=["default"])
    return model


def freeze_vision(model: nn.Module) -> None:
    """No gradients for the image encoder, separators and projector (as the original recipe)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.model.vision_embed_tokens.requires_grad_(False)


def lora_target_modules(model: nn.Module, include_vision: bool) -> list[str]:
    """Full names of the Linear modules LoRA wraps (explicit names: no accidental matches)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = base.model.vision_embed_tokens
    unused = {id(m) for u in (vision.unused_modules() if vision is not None else []) for m in u.modules()}
    names = []
    for name, module in base.named_modules():
        if not isinstance(module, nn.Linear):  # (bitsandbytes' 4/8-bit layers are nn.Linear too)
            continue
        in_vision = ".vision_embed_tokens." in f".{name}."
        if in_vision:
            if not include_vision or id(module) in unused:
                continue
            if name.rsplit(".", 1)[-1] in VISION_LORA_MODULES or name.endswith(PROJECTOR_LORA_MODULES):
                names.append(name)
        elif name.rsplit(".", 1)[-1] in LANGUAGE_LORA_MODULES:
            names.append(name)
    return names


def parameter_groups(model: nn.Module, model_args: ModelArguments, learning_rate: float, weight_decay: float,
                     decay: set[str]):
    """Optimizer groups: separate learning rates for the CLIP tower and the projector when asked.

    `decay`: the names that get weight decay (RecipeTrainer.get_decay_parameter_names, the same
    rule as without separate learning rates).
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = learning_rate
        if ".img_processor." in name and model_args.vision_learning_rate is not None:
            lr = model_args.vision_learning_rate
        elif (".img_projection." in name or name.endswith(SEPARATORS)) and (
            model_args.projector_learning_rate is not None
        ):
            lr = model_args.projector_learning_rate
        groups.setdefault((lr, weight_decay if name in decay else 0.0), []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, by the libraries' own counters: under ZeRO-3 a rank
    holds empty placeholders (the real size is `ds_numel`), and a 4-bit weight packs two values
    per byte (PEFT counts those for a LoRA/QLoRA model)."""
    if hasattr(model, "get_nb_trainable_parameters"):  # a PeftModel
        return model.get_nb_trainable_parameters()
    return get_model_param_count(model, trainable_only=True), get_model_param_count(model)
