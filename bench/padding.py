"""Share of padding tokens per batch, random batches vs length-grouped batches.

    .venv/bin/python bench/padding.py [--batch_size 8] [--num_crops 16] [--examples 2000]

Lengths follow a DocVQA-like distribution: scanned pages of many sizes and aspect ratios
(letter/A4 portrait at 100-200 dpi, tall receipts, landscape forms and slides), whose token
counts come from the real HD transform at --num_crops, plus 15-70 tokens of question and
answer. Batches are drawn as the Trainer draws them: a random permutation (plain), or
transformers' LengthGroupedSampler (what `--group_by_length` uses, fed with our header-only
`ConversationDataset.lengths`). Both samplers run here on the same lengths; the script prints
the two padding shares and their ratio. Target: < 10% with grouping.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi3v.image_processing_phi3v import hd_image_size, num_image_tokens  # noqa: E402


def docvqa_like_lengths(n: int, num_crops: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    lengths = []
    for _ in range(n):
        kind = rng.random()
        dpi = rng.uniform(100, 200)
        if kind < 0.65:  # letter / A4 portrait pages
            w, h = 8.5 * dpi, 11 * dpi * rng.uniform(0.95, 1.05)
        elif kind < 0.8:  # receipts and long strips
            w, h = 3.5 * dpi, rng.uniform(8, 20) * dpi
        elif kind < 0.95:  # landscape forms, tables
            w, h = 11 * dpi, 8.5 * dpi
        else:  # slides and screenshots
            w, h = rng.choice([(1280, 720), (1024, 768), (1920, 1080)])
        hd_h, hd_w = hd_image_size(int(w), int(h), num_crops)
        lengths.append(num_image_tokens(hd_h, hd_w) + rng.randint(15, 70))
    return lengths


def padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / padded


def batches_from(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def main(argv: list[str] | None = None) -> dict:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8, help="per-device batch size")
    parser.add_argument("--num_crops", type=int, default=16, help="image processor num_crops")
    parser.add_argument("--examples", type=int, default=2000, help="number of synthetic examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    lengths = docvqa_like_lengths(args.examples, args.num_crops, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    plain = batches_from(torch.randperm(len(lengths), generator=generator).tolist(), args.batch_size)
    sampler = LengthGroupedSampler(args.batch_size, lengths=lengths, generator=generator)
    grouped = batches_from(list(sampler), args.batch_size)
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))  # every example once

    result = {
        "plain": padding_share(lengths, plain),
        "grouped": padding_share(lengths, grouped),
        "min_length": min(lengths),
        "max_length": max(lengths),
    }
    print(f"{args.examples} DocVQA-like examples, {result['min_length']}..{result['max_length']} tokens, "
          f"batch size {args.batch_size}, num_crops {args.num_crops}")
    print(f"padding share, random batches:        {result['plain']:6.1%}")
    print(f"padding share, length-grouped batches: {result['grouped']:6.1%}   (target < 10%)")
    print(f"ratio random / grouped: {result['plain'] / max(result['grouped'], 1e-9):.1f}x")
    return result


if __name__ == "__main__":
    main()
