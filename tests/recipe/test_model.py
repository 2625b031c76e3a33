"""recipe/model.py: what the optimiser steps in each mode (fp32, also with --bf16 and
--use_flash_attention) and the parameter counts it logs (LoRA, 4-bit packed QLoRA, ZeRO-3).

DeepSpeed's own fp32 copies under ZeRO-2/3 with --bf16 are checked in test_distributed.py.
"""

import pytest
import torch

import finetune_hf_trainer_ucf101 as ucf
from phi3v.modeling_phi3v import Phi3VForCausalLM
from phi3v.processing_phi3v import Phi3VProcessor
from recipe.data import Collator, ConversationDataset
from recipe.flag_checks import check_flags
from recipe.flag_parser import parse_args
from recipe.model import count_parameters, load_model
from recipe.trainer import RecipeTrainer


@pytest.fixture
def loaded_dtypes(monkeypatch):
    """--use_flash_attention needs a CUDA GPU and flash-attn: from_pretrained is run with SDPA
    instead, and the dtype load_model asked for is recorded."""
    asked = []
    load = Phi3VForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        asked.append(kwargs["dtype"])
        return load(cls, *args, **{**kwargs, "attn_implementation": "sdpa"})

    monkeypatch.setattr(Phi3VForCausalLM, "from_pretrained", classmethod(from_pretrained))
    return asked


def parsed(tiny, data, out, *extra):
    argv = ["--model_name_or_path", str(tiny), "--data_dir", str(data), "--output_dir", str(out), "--num_crops", "1",
            "--deepspeed", "none", "--no-tqdm", *map(str, extra)]
    model_args, data_args, training_args = parse_args(ucf.Ucf101Arguments, argv, ucf.TASK.defaults)
    check_flags(model_args, data_args, training_args)
    return model_args, data_args, training_args


def stepped_tensors(optimizer) -> list[torch.Tensor]:
    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper
        optimizer = optimizer.optimizer
    return [p for group in optimizer.param_groups for p in group["params"]]


MODES = {
    "full": [],
    "frozen_vision": ["--freeze_vision_model"],
    "full_flash": ["flash"],
    "frozen_vision_flash": ["--freeze_vision_model", "flash"],
    "lora": ["--use_lora"],
    "lora_flash": ["--use_lora", "flash"],
    "qlora": ["--use_qlora"],
}


@pytest.mark.parametrize("mode", MODES)
def test_bf16_without_deepspeed_steps_fp32_weights(mode, tiny_checkpoint, ucf101_data, tmp_path, loaded_dtypes):
    """--bf16 --deepspeed none: the optimiser holds exactly the trainable weights, all fp32, and
    one step at a learning rate far below bf16's resolution near 0.02 (~1e-4) still moves them
    (Adam's first step moves each weight by ~lr). Full and frozen vision load fp32 (autocast
    computes in bf16); LoRA/QLoRA hold the frozen base in bf16/4-bit."""
    flash = "flash" in MODES[mode]
    model_args, _, training_args = parsed(tiny_checkpoint, ucf101_data, tmp_path, "--bf16", "--max_steps", 1,
                                          "--batch_size", 1, "--learning_rate", "1e-5",
                                          "--lr_scheduler_type", "constant", "--save_strategy", "no",
                                          *[f for f in MODES[mode] if f != "flash"])
    model_args.use_flash_attention = flash  # (check_flags refuses it without a GPU)
    model = load_model(model_args, training_args)
    assert loaded_dtypes == [torch.bfloat16 if model_args.use_lora else torch.float32]

    processor = Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=1)
    train, _ = ucf.load_data(ucf.Ucf101Arguments(data_dir=str(ucf101_data)), None)
    trainer = RecipeTrainer(model=model, args=training_args, train_dataset=ConversationDataset(train[:1], processor),
                            data_collator=Collator(pad_token_id=processor.tokenizer.pad_token_id),
                            processing_class=processor, model_args=model_args)
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    before = {i: p.detach().clone() for i, p in trainable.items()}
    trainer.train()
    stepped = stepped_tensors(trainer.optimizer)
    assert {id(p) for p in stepped} == set(trainable)
    assert {p.dtype for p in stepped} == {torch.float32}
    moved = sum(int((p.detach() != before[id(p)]).sum()) for p in stepped)
    assert moved > 0.5 * sum(p.numel() for p in stepped)
    if model_args.use_lora:
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        assert torch.bfloat16 in frozen and frozen <= {torch.bfloat16, torch.uint8}  # (uint8: 4-bit packed)


def test_parameter_counts_of_plain_lora_and_qlora_models(tiny_checkpoint, ucf101_data, tmp_path):
    """QLoRA counts each 4-bit weight once (not its packed bytes): the same numbers as LoRA."""
    plain = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    every = sum(p.numel() for p in plain.parameters())
    unused = sum(p.numel() for m in plain.model.vision_embed_tokens.unused_modules() for p in m.parameters())
    assert count_parameters(plain) == (every - unused, every)

    counts = {}
    for mode in ("--use_lora", "--use_qlora"):
        model_args, _, training_args = parsed(tiny_checkpoint, ucf101_data, tmp_path, mode)
        counts[mode] = count_parameters(load_model(model_args, training_args))
    adapters, total = counts["--use_lora"]
    assert 0 < adapters < every and total == every + adapters
    assert counts["--use_qlora"] == counts["--use_lora"]
