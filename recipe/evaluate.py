"""Batched generation on every rank, gathered and scored once.

Each rank takes every world_size-th example, sorts its share by length (batches of similar
length, little left padding), generates greedily until `<|end|>`/`<|endoftext|>`, and all
predictions are gathered to every rank in the original order. Rank 0 writes
`{"metric": ..., "<metric name>": value, "num_examples": n, "predictions": [{"id",
"prediction", "references"}]}` to the output file. Ranks run the same number of generate
calls, so DeepSpeed ZeRO-3 (which needs every rank in each forward) works too.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from phi3v.jsonfile import write_json_atomic
from phi3v.modeling_phi3v import Phi3VModel
from phi3v.processing_phi3v import end_token_ids

from .data import Collator, ConversationDataset
from .records import Conversation, scored_turns

__all__ = ["generate_predictions", "evaluate", "autocast_dtype", "to_device", "generation_kwargs"]


def autocast_dtype(training_args) -> torch.dtype | None:
    """The dtype the run computes in under --bf16/--fp16 (None: fp32), for forwards outside the
    Trainer (evaluation, reference passes)."""
    return torch.bfloat16 if training_args.bf16 else (torch.float16 if training_args.fp16 else None)


def to_device(model, device) -> None:
    """Puts `model` on the evaluation device (a model evaluated before the Trainer placed it), unless
    it is 4-bit: bitsandbytes placed it when loading and refuses `.to`."""
    if not getattr(model, "is_loaded_in_4bit", False) and next(model.parameters()).device != device:
        model.to(device)


def generation_kwargs(data_args, training_args) -> dict:
    """generate_predictions' settings from the run's flags (the evaluators' answers)."""
    return dict(batch_size=data_args.eval_batch_size, max_new_tokens=data_args.max_new_tokens,
                autocast_dtype=autocast_dtype(training_args), disable_tqdm=training_args.disable_tqdm)


def generate_predictions(
    model,
    processor,
    conversations: Sequence[Conversation],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    synced_gpus: bool = False,
    disable_tqdm: bool = True,
) -> list[str]:
    """Greedy answers for all conversations (last answer left out), on every rank, in order."""
    state = PartialState()
    rank, world = state.process_index, state.num_processes
    mine = list(range(rank, len(conversations), world))
    dataset = ConversationDataset([conversations[i] for i in mine], processor, for_generation=True)
    order = sorted(range(len(dataset)), key=lambda i: dataset.lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # Equal number of generate calls on every rank (ZeRO-3 runs forwards in lockstep).
    n_batches = len(batches)
    n_batches = max(gather_object([n_batches]))
    tokenizer = processor.tokenizer
    collate = Collator(pad_token_id=tokenizer.pad_token_id, padding_side="left")
    device = device or next(model.parameters()).device
    end_ids = end_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    # Under ZeRO-3 ranks generate in lockstep; their forwards must agree on running the image side.
    lockstep = [m for m in model.modules() if isinstance(m, Phi3VModel)] if synced_gpus else []
    for module in lockstep:
        module.vision_lockstep = True
    local: dict[int, str] = {}
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
        if autocast_dtype is not None else nullcontext()
    )
    progress = tqdm(total=len(conversations), desc="generating", unit="example", disable=disable_tqdm or rank != 0)
    with torch.no_grad(), autocast:
        for b in range(n_batches):
            indices = batches[b] if b < len(batches) else (batches[-1] if batches else None)
            if indices is None:  # this rank has no examples at all: run a dummy to stay in step
                indices, dummy_set = [0], ConversationDataset(conversations[:1], processor, for_generation=True)
                items = [dummy_set[0]]
            else:
                items = [dataset[i] for i in indices]
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(items).items()}
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=end_ids,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                synced_gpus=synced_gpus,
            )
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            if b < len(batches):
                for i, text in zip(indices, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    local[mine[i]] = text.strip()
                progress.update(min(len(indices) * world, progress.total - progress.n))  # rank 0: its share x ranks
    progress.close()
    for module in lockstep:
        module.vision_lockstep = False
    if was_training:
        model.train()
    for part in gather_object([local]):
        local.update(part)
    return [local[i] for i in range(len(conversations))]


def evaluate(
    model,
    processor,
    conversations: Sequence[Conversation],
    score: Callable[[list[str], list[list[str]]], float],
    metric_name: str,
    output_file: str | Path | None,
    eval_turns: str = "last",
    **generation_kwargs,
) -> dict:
    """Generates, scores and (rank 0) writes per-example predictions and the metric.

    `eval_turns` (see `recipe.records.scored_turns`): "last" scores each example's last answer,
    "all" every assistant turn (each prediction then also names its `turn`).
    """
    conversations = scored_turns(conversations, eval_turns)
    predictions = generate_predictions(model, processor, conversations, **generation_kwargs)
    references = [list(c.references) if c.references else [c.answer] for c in conversations]
    value = score(predictions, references) if conversations else None  # (no NaN: not valid JSON)
    turn = (lambda c: {"turn": len(c.turns) - 1}) if eval_turns == "all" else (lambda c: {})
    result = {
        "metric": metric_name,
        metric_name: value,
        "num_examples": len(conversations),
        "predictions": [
            {"id": c.id, **turn(c), "prediction": p, "references": r}
            for c, p, r in zip(conversations, predictions, references)
        ],
    }
    if output_file is not None and PartialState().is_main_process:
        write_json_atomic(output_file, result)
    return result
