"""Preference-pair training step: shared prefix, images once (ours) vs two sequences (TRL's way).

Run from the repository root:

    .venv/bin/python bench/preference.py            # ~3 min on a shared 2-core machine
    .venv/bin/python bench/preference.py --quick    # small sizes, a few seconds (smoke test)

Both sides train the same model (`Phi3VForCausalLM` from `phi3v.tiny.tiny_config`, text hidden
256 x 2 layers, CLIP hidden 128 x 4 layers, 3 run; all sizes are flags) on the same pairs with
the same step: `recipe.pairs.pair_log_probs`, DPO's sigmoid loss against fixed reference
log-probabilities (`--reference model`: against a frozen reference copy run in the step, the
policy's vision side frozen so that ours hands the reference the policy's image features),
backward, AdamW. Only the layout differs (`recipe.pairs.PairCollator`):

- ours (`shared_prefix=True`): one row per pair, prompt once, the two answers behind a block
  mask; each image encoded once;
- two-sequence (`shared_prefix=False`): a chosen row and a rejected row per pair, the images
  in both, as TRL's `concatenated_forward` does (padded rows; here also only the answer columns
  reach `lm_head`, which TRL does not do, so the baseline is, if anything, favoured).

Pairs are DocVQA-like: one page image per pair (letter/A4 portrait, receipts, landscape forms,
slides, through the processor's HD rule at `--num_crops`, 4 by default: 470-760 image tokens),
a 15-40 token question, answers of 10-40 tokens. The two layouts alternate (A B, B A,
...) over `--repeats` after a warm-up; medians of pairs/s are printed, and the last line is the
ratio ours / two-sequence. Before timing, the first step's log-probabilities of both layouts
are asserted equal (1e-4).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi3v.image_processing_phi3v import hd_image_size, num_image_tokens  # noqa: E402
from phi3v.tiny import build_tiny_model, tiny_config  # noqa: E402
from recipe.pairs import PairCollator, pair_log_probs  # noqa: E402

LAYOUTS = ("ours", "two-sequence")
VOCAB, PAD, END = 1152, 1024, 1031
CROP = 336


def page_size(rng: random.Random) -> tuple[int, int]:
    """(width, height) of a DocVQA-like page (as bench/padding.py draws them)."""
    kind, dpi = rng.random(), rng.uniform(100, 200)
    if kind < 0.65:
        return int(8.5 * dpi), int(11 * dpi * rng.uniform(0.95, 1.05))
    if kind < 0.8:
        return int(3.5 * dpi), int(rng.uniform(8, 20) * dpi)
    if kind < 0.95:
        return int(11 * dpi), int(8.5 * dpi)
    return rng.choice([(1280, 720), (1024, 768), (1920, 1080)])


def make_pair(rng: random.Random, g: torch.Generator, num_crops: int, answers: tuple[int, int]) -> dict:
    """A dataset item as `recipe.pairs.PairDataset` gives it: image positions are -1."""
    height, width = hd_image_size(*page_size(rng), num_crops)
    tokens = num_image_tokens(height, width)
    crops = 1 + (height // CROP) * (width // CROP)
    pixels = torch.zeros(1, num_crops + 1, 3, CROP, CROP)
    pixels[0, :crops] = torch.randn(crops, 3, CROP, CROP, generator=g)

    def text(n):
        return [rng.randrange(3, PAD) for _ in range(n)]

    return {
        "prompt_ids": torch.tensor([1, *text(3), *[-1] * tokens, 1, *text(rng.randint(15, 40)), *text(3)]),
        "chosen_ids": torch.tensor([*text(rng.randint(*answers) - 1), END]),
        "rejected_ids": torch.tensor([*text(rng.randint(*answers) - 1), END]),
        "pixel_values": pixels,
        "image_sizes": torch.tensor([[height, width]]),
    }


def dpo_step(model, optimizer, batch, reference, reuse_features: bool, beta: float = 0.1) -> float:
    """One step. `reference`: fixed (chosen, rejected) log-probs, or a model run in the step (with
    `reuse_features`, on the policy's image features instead of its own vision tower)."""
    out = pair_log_probs(model, batch)
    if isinstance(reference, torch.nn.Module):
        with torch.no_grad():
            features = out.image_features.detach() if reuse_features and out.image_features is not None else None
            ref = pair_log_probs(reference, batch, image_features=features)
        reference = (ref.chosen_logps, ref.rejected_logps)
    logits = beta * ((out.chosen_logps - reference[0]) - (out.rejected_logps - reference[1]))
    loss = -torch.nn.functional.logsigmoid(logits).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts (smoke test)")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (batch size)")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repeat (distinct batches)")
    parser.add_argument("--repeats", type=int, default=4, help="timed repeats per layout, alternating")
    parser.add_argument("--num_crops", type=int, default=4, help="image processor num_crops")
    parser.add_argument("--answer_tokens", default="10,40", help="answer length range, min,max")
    parser.add_argument("--text_hidden", type=int, default=256)
    parser.add_argument("--text_layers", type=int, default=2)
    parser.add_argument("--vision_hidden", type=int, default=128)
    parser.add_argument("--vision_layers", type=int, default=4, help="CLIP layers (all but the last run)")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadier on a shared machine; 0: torch's default)")
    parser.add_argument("--reference", choices=["fixed", "model"], default="fixed",
                        help="fixed: precomputed reference log-probs (the policy step alone); model: a frozen "
                             "reference copy runs in every step, and the policy's vision side is frozen, so ours "
                             "reuses the policy's image features there (1 encode per pair) where TRL's way encodes "
                             "each image 4 times")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.steps, args.repeats, args.num_crops = 2, 1, 2, 1
        args.text_hidden, args.vision_hidden, args.vision_layers = 64, 32, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    answers = tuple(int(x) for x in args.answer_tokens.split(","))

    config = tiny_config(
        vocab_size=VOCAB, pad_token_id=PAD, hidden_size=args.text_hidden, intermediate_size=2 * args.text_hidden,
        num_hidden_layers=args.text_layers,
        vision_config={"hidden_size": args.vision_hidden, "intermediate_size": 2 * args.vision_hidden,
                       "num_hidden_layers": args.vision_layers},
    )
    config._attn_implementation = args.attention
    model = build_tiny_model(config, seed=args.seed).train()
    reference_model = None
    if args.reference == "model":
        reference_model = build_tiny_model(config, seed=args.seed).requires_grad_(False)
        model.model.vision_embed_tokens.requires_grad_(False)  # the same vision side in both
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    rng, g = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    steps = [[make_pair(rng, g, args.num_crops, answers) for _ in range(args.pairs)] for _ in range(args.steps)]
    collators = {"ours": PairCollator(PAD), "two-sequence": PairCollator(PAD, shared_prefix=False)}
    batches = {name: [collate(items) for items in steps] for name, collate in collators.items()}

    # Sanity: both layouts give the same log-probabilities (these are also the fixed reference's).
    with torch.no_grad():
        logps = {name: pair_log_probs(model, batches[name][0]) for name in LAYOUTS}
    for side in ("chosen_logps", "rejected_logps"):
        ours, theirs = getattr(logps["ours"], side), getattr(logps["two-sequence"], side)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    reference = [reference_model] * args.steps
    if reference_model is None:
        with torch.no_grad():
            for i, batch in enumerate(batches["ours"]):
                out = pair_log_probs(model, batch)
                reference[i] = (out.chosen_logps - 1.0, out.rejected_logps + 1.0)

    def run(name):
        wall, cpu = time.perf_counter(), time.process_time()
        for batch, ref in zip(batches[name], reference):
            dpo_step(model, optimizer, batch, ref, reuse_features=name == "ours")
        return time.perf_counter() - wall, time.process_time() - cpu

    # Warm-up, counting the images the vision towers encode (policy and reference).
    encoded = {}
    counter = []
    hooks = [m.model.vision_embed_tokens.register_forward_hook(lambda mod, a, out: counter.append(a[0].shape[0]))
             for m in (model, reference_model) if m is not None]
    for name in LAYOUTS:
        counter.clear()
        run(name)
        encoded[name] = sum(counter)
    for hook in hooks:
        hook.remove()
    times = {name: [] for name in LAYOUTS}
    for repeat in range(args.repeats):
        for name in LAYOUTS if repeat % 2 == 0 else LAYOUTS[::-1]:
            times[name].append(run(name))

    n_pairs = args.pairs * args.steps
    tokens = {name: int(sum(b["input_ids"].numel() for b in batches[name])) for name in LAYOUTS}
    result = {"config": vars(args), "tokens_per_step": {}, "images_per_step": {}}
    prompt = statistics.mean(len(item["prompt_ids"]) for items in steps for item in items)
    answer = statistics.mean(len(item[k]) for items in steps for item in items for k in ("chosen_ids", "rejected_ids"))
    print(f"{n_pairs} DocVQA-like pairs per repeat ({args.pairs} per step), num_crops {args.num_crops}: "
          f"prompt {prompt:.0f} tokens, answers {answer:.0f} tokens on average; reference {args.reference}; "
          f"{args.attention}, "
          f"text {args.text_hidden}x{args.text_layers}, vision {args.vision_hidden}x{args.vision_layers}")
    for name in LAYOUTS:
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        result[name] = {"pairs_per_s": n_pairs / wall, "pairs_per_cpu_s": n_pairs / cpu, "times": times[name]}
        result["tokens_per_step"][name] = tokens[name] / args.steps
        result["images_per_step"][name] = encoded[name] / args.steps
        print(f"{name:>13}: {n_pairs / wall:7.2f} pairs/s ({n_pairs / cpu:.2f} per CPU s), "
              f"{tokens[name] / args.steps:.0f} token slots and {encoded[name] / args.steps:.0f} image encodes per step")
    paired = statistics.median(b[0] / a[0] for a, b in zip(times["ours"], times["two-sequence"]))
    result["ratio"] = result["ours"]["pairs_per_s"] / result["two-sequence"]["pairs_per_s"]
    result["paired_ratio"] = paired
    print(f"paired ratio (median of per-repeat ratios): {paired:.2f}x")
    print(f"ours / two-sequence: {result['ratio']:.2f}x pairs/s (target >= 1.6x)")
    return result


if __name__ == "__main__":
    main()
