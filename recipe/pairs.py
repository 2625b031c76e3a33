"""Preference pairs to model batches, and the log-probabilities of both answers in one forward.

In VLM preference data the prompt is most of the tokens (one Phi-3.5-V image is 1,921-2,509
tokens at 16 crops, an answer 10-300), so a pair is laid out as one row, the prompt once:

    [padding] prompt  chosen  rejected
    positions 0..P-1  P..P+C-1  P..P+R-1     (rejected continues from the prompt's end)

with a 4-D attention mask: the prompt is causal, the chosen answer sees the prompt and itself,
the rejected answer sees the prompt and itself but never the chosen answer; padding sees only
padding. Logits at the last prompt position predict both first answer tokens. Rows are
left-padded, so every answer ends in the last columns and only those columns (the longest
chosen + rejected + 1; more when a pair straddles the switch, below) go through `lm_head`
(`logits_to_keep`).

Equal to two separate sequences: each token attends to exactly the keys it has in its own
sequence (prompt + that answer), at the same positions, and gets the LongRoPE factors of that
sequence run alone (`sequence_lengths`, phi3v/modeling_phi3v.py). A pair whose prompt + chosen
and prompt + rejected fall on different sides of the factor switch (original context, 4,096)
cannot share the prompt (its keys are rotated differently for the two answers); that rare pair
is laid out as prompt, chosen, prompt, rejected in its row, its images given twice.

Images: the pair's images appear once per row, so the vision tower encodes them once per
forward; `pair_log_probs` returns the projected features (`image_hidden_states`), and a
reference model whose vision side is the policy's takes them back instead of encoding again.

`PairCollator(shared_prefix=False)` builds TRL's layout instead (a chosen row and a rejected
row per pair, the images in both), for the baseline in bench/preference.py and for the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .data import encode_images
from .packing import MAX_TOKENS_PER_ROW
from .records import PreferencePair
from .tokenization import IGNORE_INDEX, image_token_counts, pair_length, tokenize_pair

__all__ = [
    "PairDataset",
    "PairCollator",
    "PairLogProbs",
    "pair_log_probs",
]

# Segment ids within a row (a pair straddling the rotary switch gets its prompt a second time).
_PAD, _PROMPT, _CHOSEN, _REJECTED, _PROMPT_AGAIN = -1, 0, 1, 2, 3
_NO_PARENT = -2


# -- dataset ---------------------------------------------------------------------------------


class PairDataset(torch.utils.data.Dataset):
    """Preference pairs encoded on access; images are decoded only in `__getitem__` (in the
    dataloader's workers). `lengths` (tokens of the shared-prefix row, image tokens from the
    image headers) drive length-grouped batching."""

    def __init__(self, pairs: Sequence[PreferencePair], processor):
        self.pairs = list(pairs)
        self.processor = processor
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def num_crops(self) -> int:
        return self.processor.image_processor.num_crops

    @property
    def lengths(self) -> list[int]:
        """Tokens of each pair's shared-prefix row: what `validate_pairs` measured where it ran,
        else measured here."""
        if self._lengths is None:
            tokenizer = self.processor.tokenizer
            self._lengths = [
                pair.conversation.tokens.total if pair.conversation.tokens is not None
                else pair_length(pair, tokenizer, image_token_counts(pair.images, self.num_crops))
                for pair in self.pairs
            ]
        return self._lengths

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        item, counts = encode_images(pair, self.processor)
        encoded = tokenize_pair(pair, self.processor.tokenizer, counts)
        item["prompt_ids"] = torch.tensor(encoded.prompt_ids, dtype=torch.long)
        item["chosen_ids"] = torch.tensor(encoded.chosen_ids, dtype=torch.long)
        item["rejected_ids"] = torch.tensor(encoded.rejected_ids, dtype=torch.long)
        return item


# -- collator --------------------------------------------------------------------------------


@dataclass
class _Segment:
    ids: torch.Tensor
    kind: int  # _PROMPT, _CHOSEN, ...
    parent: int  # the segment kind it also attends to, or _NO_PARENT
    start: int  # position id of its first token
    sequence_length: int  # length of the sequence it belongs to, alone (LongRoPE's choice)


@dataclass
class _Row:
    segments: list[_Segment]
    image_items: list[dict[str, Any]]  # whose images the row holds, in order (per prompt copy)

    def __len__(self) -> int:
        return sum(len(s.ids) for s in self.segments)


def _pair_rows(item: dict[str, Any], shared_prefix: bool, switch: int) -> list[_Row]:
    prompt, chosen, rejected = item["prompt_ids"], item["chosen_ids"], item["rejected_ids"]
    p, with_chosen, with_rejected = len(prompt), len(prompt) + len(chosen), len(prompt) + len(rejected)
    if not shared_prefix:
        return [
            _Row([_Segment(prompt, _PROMPT, _NO_PARENT, 0, with_chosen),
                  _Segment(chosen, _CHOSEN, _PROMPT, p, with_chosen)], [item]),
            _Row([_Segment(prompt, _PROMPT, _NO_PARENT, 0, with_rejected),
                  _Segment(rejected, _REJECTED, _PROMPT, p, with_rejected)], [item]),
        ]
    if (with_chosen > switch) == (with_rejected > switch):
        both = max(with_chosen, with_rejected)  # either: the factor choice is the same
        return [_Row([
            _Segment(prompt, _PROMPT, _NO_PARENT, 0, both),
            _Segment(chosen, _CHOSEN, _PROMPT, p, both),
            _Segment(rejected, _REJECTED, _PROMPT, p, both),
        ], [item])]
    # The two sequences use different rotary factors: the prompt's keys differ, so it is given twice.
    return [_Row([
        _Segment(prompt, _PROMPT, _NO_PARENT, 0, with_chosen),
        _Segment(chosen, _CHOSEN, _PROMPT, p, with_chosen),
        _Segment(prompt, _PROMPT_AGAIN, _NO_PARENT, 0, with_rejected),
        _Segment(rejected, _REJECTED, _PROMPT_AGAIN, p, with_rejected),
    ], [item, item])]


def _concat_images(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """pixel_values / image_sizes of the items in order (as recipe.data.Collator: crop slots padded
    with all-zero crops, which the model skips); empty without images."""
    with_images = [item for item in items if item.get("pixel_values") is not None]
    if not with_images:
        return {}
    crops = max(item["pixel_values"].shape[1] for item in with_images)
    pixels = []
    for item in with_images:
        p = item["pixel_values"]
        if p.shape[1] < crops:
            p = torch.cat([p, p.new_zeros(p.shape[0], crops - p.shape[1], *p.shape[2:])], dim=1)
        pixels.append(p)
    return {"pixel_values": torch.cat(pixels), "image_sizes": torch.cat([item["image_sizes"] for item in with_images])}


@dataclass
class PairCollator:
    """Pairs to one batch: the model's inputs plus where each answer's tokens are predicted.

    Model inputs: `input_ids`, `attention_mask` (4-D boolean, (rows, 1, width, width), True =
    attend; `pair_log_probs` converts it for eager attention), `position_ids`,
    `sequence_lengths` (per token, for LongRoPE), `pixel_values`, `image_sizes`.
    For the log-probabilities: `chosen_labels` / `rejected_labels` (rows, K): at column j of the
    last K columns, the token the logits there must predict for that answer (IGNORE_INDEX
    elsewhere), and `chosen_rows` / `rejected_rows` (pairs,): the row of each pair's answer.
    For throughput counters: `num_tokens` / `num_images` (0-D), the pairs' tokens and images each
    counted once (the mask is 4-D, so its sum counts no tokens; a pair straddling the rotary
    switch has its images twice in `image_sizes`).
    `shared_prefix=False`: TRL's layout, chosen rows then rejected rows, each with the prompt
    and its images. `original_max_position_embeddings`: the model's LongRoPE switch.
    """

    pad_token_id: int
    shared_prefix: bool = True
    original_max_position_embeddings: int = MAX_TOKENS_PER_ROW
    pad_to_multiple_of: int | None = None

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        per_pair = [_pair_rows(item, self.shared_prefix, self.original_max_position_embeddings) for item in items]
        if self.shared_prefix:
            rows = [row for pair_rows in per_pair for row in pair_rows]
            chosen_rows = rejected_rows = torch.arange(len(items))
        else:  # chosen rows, then rejected rows (TRL's concatenated batch)
            rows = [pair_rows[0] for pair_rows in per_pair] + [pair_rows[1] for pair_rows in per_pair]
            chosen_rows, rejected_rows = torch.arange(len(items)), torch.arange(len(items), 2 * len(items))
        batch = self._layout(rows)
        batch["chosen_rows"], batch["rejected_rows"] = chosen_rows, rejected_rows
        batch["num_tokens"] = torch.tensor(
            sum(len(item["prompt_ids"]) + len(item["chosen_ids"]) + len(item["rejected_ids"]) for item in items)
        )
        batch["num_images"] = torch.tensor(
            sum(len(item["image_sizes"]) for item in items if item.get("pixel_values") is not None)
        )
        batch.update(_concat_images([item for row in rows for item in row.image_items]))
        return batch

    def _layout(self, rows: Sequence[_Row]) -> dict[str, torch.Tensor]:
        width = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            width = int(math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        sequence_lengths = torch.ones((n, width), dtype=torch.long)
        segment = torch.full((n, width), _PAD, dtype=torch.long)
        parent = torch.full((n, width), _NO_PARENT, dtype=torch.long)
        # The column whose logits predict each answer token; answers end in the last columns.
        targets: dict[int, list[tuple[int, int, int]]] = {_CHOSEN: [], _REJECTED: []}  # (row, column, token)
        first_predicting = width
        for r, row in enumerate(rows):
            column = width - len(row)
            ends: dict[int, int] = {}  # segment kind -> column of its last token
            for seg in row.segments:
                k = len(seg.ids)
                where = slice(column, column + k)
                input_ids[r, where] = seg.ids
                position_ids[r, where] = torch.arange(seg.start, seg.start + k)
                sequence_lengths[r, where] = seg.sequence_length
                segment[r, where] = seg.kind
                parent[r, where] = seg.parent
                if seg.kind in targets:
                    # The first token is predicted by the parent's (the prompt's) last position.
                    predictors = [ends[seg.parent], *range(column, column + k - 1)]
                    targets[seg.kind] += [(r, c, int(t)) for c, t in zip(predictors, seg.ids.tolist())]
                    first_predicting = min(first_predicting, predictors[0])
                ends[seg.kind] = column + k - 1
                column += k
        keep = width - first_predicting
        labels = {}
        for kind, entries in targets.items():
            labels[kind] = torch.full((n, keep), IGNORE_INDEX, dtype=torch.long)
            r, c, token = torch.tensor(entries, dtype=torch.long).reshape(-1, 3).unbind(1)
            labels[kind][r, c - first_predicting] = token
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        visible = (segment[:, None, :] == segment[:, :, None]) | (segment[:, None, :] == parent[:, :, None])
        return {
            "input_ids": input_ids,
            "attention_mask": (causal & visible)[:, None],
            "position_ids": position_ids,
            "sequence_lengths": sequence_lengths,
            "chosen_labels": labels[_CHOSEN],
            "rejected_labels": labels[_REJECTED],
        }


# -- forward ---------------------------------------------------------------------------------


@dataclass
class PairLogProbs:
    chosen_logps: torch.Tensor  # (pairs,) summed log-probability of each chosen answer (with <|end|>)
    rejected_logps: torch.Tensor  # (pairs,)
    chosen_tokens: torch.Tensor  # (pairs,) tokens summed over
    rejected_tokens: torch.Tensor  # (pairs,)
    image_features: torch.Tensor | None  # projected image features of this forward (None without images)
    chosen_nll: torch.Tensor  # mean NLL per chosen token over the batch (TRL's rpo term)
    chosen_logits_mean: torch.Tensor  # mean logit over the chosen tokens' positions (TRL's logits/chosen), detached
    rejected_logits_mean: torch.Tensor


_MODEL_KEYS = ("input_ids", "position_ids", "sequence_lengths", "pixel_values", "image_sizes")


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """Under DDP / DeepSpeed wrappers (`.module`) the model whose config says the backend."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def model_attention_mask(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The collator's boolean 4-D mask in the form the model's attention takes: SDPA takes it as
    is; eager adds it to the scores, so there it becomes 0 / the dtype's minimum. Other backends
    (flash-attention: no arbitrary masks; FlexAttention: untested here) are refused."""
    inner = _unwrapped(model)
    backend = inner.config._attn_implementation or "eager"
    if backend == "sdpa":
        return mask
    if backend != "eager":
        raise ValueError(
            f"preference pairs share their prompt through a 4-D attention mask, which is supported here with "
            f"attention 'sdpa' (or 'eager'), not {backend!r}; load the model with attn_implementation='sdpa'"
        )
    dtype = inner.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _answer_sums(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor):
    valid = labels != IGNORE_INDEX
    token_logits = logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    logps = ((token_logits - lse) * valid).sum(-1)
    with torch.no_grad():
        logit_sum = (logits.mean(-1) * valid).sum()
    return logps, valid.sum(-1), logit_sum


def pair_log_probs(
    model: torch.nn.Module, batch: dict[str, Any], image_features: torch.Tensor | None = None
) -> PairLogProbs:
    """Summed log-probabilities of each pair's chosen and rejected answers, in one forward.

    `image_features`: the projected features of this batch's images from another forward (the
    policy's `image_features`, for a reference model whose vision side is the same); the vision
    tower then does not run. The returned `image_features` carry the autograd graph of this forward.
    """
    inputs = {key: batch[key] for key in _MODEL_KEYS if batch.get(key) is not None}
    keep = batch["chosen_labels"].shape[1]
    out = model(
        **inputs,
        attention_mask=model_attention_mask(model, batch["attention_mask"]),
        image_hidden_states=image_features,
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = out.logits.float()
    lse = logits.logsumexp(-1)
    chosen, chosen_n, chosen_logit_sum = _answer_sums(logits, lse, batch["chosen_labels"])
    rejected, rejected_n, rejected_logit_sum = _answer_sums(logits, lse, batch["rejected_labels"])
    chosen_rows, rejected_rows = batch["chosen_rows"], batch["rejected_rows"]
    chosen_logps, chosen_tokens = chosen[chosen_rows], chosen_n[chosen_rows]
    rejected_logps, rejected_tokens = rejected[rejected_rows], rejected_n[rejected_rows]
    features = out.image_hidden_states if image_features is None else image_features
    return PairLogProbs(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        image_features=features,
        chosen_nll=-chosen_logps.sum() / chosen_tokens.sum().clamp(min=1),
        chosen_logits_mean=chosen_logit_sum / chosen_n.sum().clamp(min=1),
        rejected_logits_mean=rejected_logit_sum / rejected_n.sum().clamp(min=1),
    )
