"""Padding-free batches (`--padding_free`): whole examples packed into rows.

The micro-batch's examples are placed, whole and in order, into rows of at most
`max_tokens_per_row` tokens (first fit: each example goes into the first row with room, or
opens a new one; an example longer than the limit is a row of its own). Rows are padded only to
the longest row. Nothing marks the boundaries but `position_ids`, which restart at 0 for every
example, and for the padding at the end of a row; there is no `attention_mask`. From that:

- transformers' mask builders (`create_causal_mask` with `attention_mask=None` and
  `position_ids`) make the SDPA/eager mask block-diagonal, so attention never crosses examples;
- `Phi3VModel` passes flash-attention the varlen boundaries computed by transformers'
  `prepare_fa_kwargs_from_position_ids`, and chooses LongRoPE's factors per example, as for
  the example alone (rows never exceed 4096 tokens, the original context, so a packed row
  never switches a short example to the long factors);
- the loss: the first label of every example is ignored. Unpacked, position 0 is never a
  target (logits at t predict the label at t + 1); packed, it would be the target of the
  previous example's last token. With that, the labels the loss sees are exactly those of the
  unpacked examples, and so is the Trainer's `num_items_in_batch` (it counts `labels[..., 1:]`
  over the whole accumulated step, which the model divides the summed loss by): a packed step
  equals the unpacked step over the same examples, also across gradient accumulation and
  devices.

Images: the model fills image positions in row-major order, so the items are returned in row
order and the collator concatenates their `pixel_values`/`image_sizes` (one entry per image,
as unpacked) in that order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_TOKENS_PER_ROW", "pack_rows", "pack_examples"]

# The longest row of --padding_free: the released models' original context
# (`original_max_position_embeddings`), the longest row whose examples keep the rotary factors
# they have alone, whatever the model's threshold rule. (The flags read it: this module imports
# torch only when it packs, so that --help stays fast.)
MAX_TOKENS_PER_ROW = 4096
IGNORE_INDEX = -100  # the loss's ignore index (recipe.tokenization.IGNORE_INDEX; that module loads torch)


def pack_rows(lengths: Sequence[int], max_tokens_per_row: int) -> list[list[int]]:
    """Indices of the examples in each row: first fit in the given order.

    First fit keeps the examples of a row in their original order, fills rows better than
    opening a new row whenever the next example does not fit, and never splits an example.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        for r, free in enumerate(room):
            if length <= free:
                rows[r].append(index)
                room[r] -= length
                break
        else:
            rows.append([index])
            room.append(max_tokens_per_row - length)  # negative for an over-long example: nothing joins it
    return rows


def pack_examples(
    items: Sequence[dict[str, Any]], pad_token_id: int, max_tokens_per_row: int
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """(batch with input_ids, labels, position_ids; the items in row-major order).

    The returned items are for the image concatenation, which must follow the row-major order
    in which the model consumes image positions.
    """
    import torch

    rows = pack_rows([len(item["input_ids"]) for item in items], max_tokens_per_row)
    width = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    ordered: list[dict[str, Any]] = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            item = items[i]
            n = len(item["input_ids"])
            input_ids[r, start : start + n] = item["input_ids"]
            labels[r, start : start + n] = item["labels"]
            labels[r, start] = IGNORE_INDEX  # never a target unpacked; packed it would follow another example
            position_ids[r, start : start + n] = torch.arange(n)
            start += n
            ordered.append(item)
        # The row's padding is one more sequence of its own (positions from 0): attends only to itself.
        position_ids[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}, ordered
