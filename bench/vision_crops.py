"""Padding crops in the vision tower: what skipping them saves in a training step (CPU).

Run from the repository root:

    .venv/bin/python bench/vision_crops.py            # default layout, ~2-4 min on 2 cores
    .venv/bin/python bench/vision_crops.py --quick    # tiny sizes, a few seconds (smoke test)
    .venv/bin/python bench/vision_crops.py --images 800x600 --num-crops 16   # processor layout

`pixel_values` always has num_crops + 1 crop slots per image; only 1 + (h/336)*(w/336) of them
carry pixels, the rest are all-zero padding. The official code runs every slot through CLIP
and throws the padding features away; `phi3v` selects the real crops first
(`Phi3VImageEmbedding.forward` -> `encode_crops(real crops)`). Both behaviours are measured on
ONE model in ONE process:

* "real": the model as it is;
* "all":  `encode_crops` is wrapped on the instance so that it encodes the full flattened
          `pixel_values` (num_images * (num_crops + 1) crops, as the official code) and returns
          the rows of the real crops. The autograd graph therefore contains the wasted crops,
          and the backward pass runs through them too, exactly as in the official model.

After a warm-up, every repeat runs model-all, model-real, vision-all, vision-real, the next
repeat the reverse order, so the slow phases of a shared, noisy machine hit all of them
alike. Medians per mode, their ratio and the median of the per-repeat ratios ("paired") are
printed, for wall-clock and for process CPU time (absolute times mean little here). Printed,
and returned by `main()` as a dict:

* sanity: the loss of both modes (asserted bitwise identical) and the number of crops CLIP
  really encoded per step in each mode (counted with a forward pre-hook);
* forward+backward of the whole model (loss on a few text tokens): time all / time real;
* forward+backward of the image embedding alone (CLIP + HD assembly + projector);
* an analytic FLOP estimate (not a measurement) for this bench configuration and for the
  real model (CLIP ViT-L/14-336 on 577 tokens per crop, 23 of its 24 layers in both modes;
  3.8B Phi-3-mini decoder on the token sequence) on the same layout.

Default layout (from the issue): 4 images, HD size 672x672 (2x2 grid: 1 global + 4 local = 5
real crops) in 17 slots (num_crops=16), 757 image tokens each between a few text tokens.
The image processor never produces this layout by itself: at num_crops=16 it resizes every
image to a long side of at least 1344 px, so a 600x600 image becomes 1344x1344 = 17 real
crops (no padding, 2509 tokens); over all aspect ratios at least 9 of 17 slots are real, and
at least 13 for aspect ratios up to 2.5. 5 real of 17 is the layout of 672x672 images (what
num_crops 4..8 gives a square) padded to 17 slots, e.g. batched with num_crops=16 images.
`--images WxH,...` derives the HD sizes from original image sizes with the processor's own
rule (`hd_image_size`) instead.

Default sizes: text hidden 256 x 2 layers (intermediate 683, Phi-3-mini's 8192/3072 ratio,
4 heads), CLIP hidden 128 x 4 layers (3 run, as layer -2 is used; intermediate 512, 4 heads),
vocabulary 1152, SDPA attention. CLIP is then ~83% of the FLOPs of an all-crops step, against
~51% in the real model on the same layout (its decoder is much larger per image token): the
bench is vision-heavy on purpose, so that the saving is visible at this size; the printed
FLOP estimate translates it to the real model's balance.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi3v.image_processing_phi3v import hd_image_size, num_image_tokens  # noqa: E402
from phi3v.modeling_phi3v import real_crop_counts  # noqa: E402
from phi3v.tiny import build_tiny_model, tiny_config  # noqa: E402

CROP = 336
MODES = ("all", "real")

# The released model, for the analytic estimate (docs/checkpoint_format.md §1; CLIP-L/14-336 hard-coded).
REAL_TEXT = dict(hidden=3072, intermediate=8192, layers=32, heads=32, kv_heads=32, vocab=32064)
REAL_VISION = dict(hidden=1024, intermediate=4096, layers_run=23, patch=14, image=CROP)


# -- the official behaviour, emulated on the instance -----------------------------------------


@contextlib.contextmanager
def encode_all_crops(embedding):
    """Within the block, `embedding` runs CLIP on every crop slot, as the official code does.

    `Phi3VImageEmbedding.forward` hands `encode_crops` only the real crops; the wrapper
    remembers the full `pixel_values` of the current call, encodes all of them (padding
    included) and returns the rows of the real crops, in the same image-major order. The
    padding features are then discarded, but they are part of the autograd graph.
    """
    cls, state = type(embedding), {}

    def forward(pixel_values, image_sizes):
        state["pixel_values"], state["image_sizes"] = pixel_values, image_sizes
        return cls.forward(embedding, pixel_values, image_sizes)

    def encode_crops(crops):
        pixel_values = state["pixel_values"]
        num_images, slots = pixel_values.shape[:2]
        features = cls.encode_crops(embedding, pixel_values.flatten(0, 1))
        counts = real_crop_counts(state["image_sizes"], embedding.crop_size)
        keep = (torch.arange(slots)[None, :] < counts[:, None]).flatten().to(features.device)
        if features.shape[0] != num_images * slots or int(keep.sum()) != crops.shape[0]:
            raise AssertionError("all-crops emulation: crop bookkeeping does not match the model's")
        return features[keep]

    embedding.forward, embedding.encode_crops = forward, encode_crops
    try:
        yield
    finally:
        del embedding.forward, embedding.encode_crops


def mode_context(embedding, mode):
    return encode_all_crops(embedding) if mode == "all" else contextlib.nullcontext()


# -- inputs -------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'672x672,336x672' -> [(672, 672), (336, 672)] (each WxH)."""
    sizes = []
    for item in text.split(","):
        w, h = item.lower().split("x")
        sizes.append((int(w), int(h)))
    return sizes


def image_layout(args) -> list[tuple[int, int]]:
    """HD sizes [h, w] of the batch's images (multiples of 336)."""
    if args.images:
        originals = parse_sizes(args.images)
        originals = (originals * args.batch)[: max(args.batch, len(originals))]
        return [hd_image_size(w, h, args.num_crops) for w, h in originals]
    hd = parse_sizes(args.hd_sizes)
    hd = (hd * args.batch)[: max(args.batch, len(hd))]
    layout = [(h, w) for w, h in hd]
    for h, w in layout:
        if h % CROP or w % CROP or (h // CROP) * (w // CROP) > args.num_crops:
            raise SystemExit(f"HD size {w}x{h} must be multiples of {CROP} with at most num_crops local crops")
    return layout


def make_batch(layout, num_crops, vocab, n_before, n_after, seed=0):
    """One image per row: [BOS, text..., image ids (-1)..., BOS, text...]; loss on the last text."""
    gen = torch.Generator().manual_seed(seed)
    rows, labels, pixels = [], [], []
    for h, w in layout:
        n_tok = num_image_tokens(h, w)
        before = torch.randint(3, vocab, (n_before,), generator=gen).tolist()
        after = torch.randint(3, vocab, (n_after,), generator=gen).tolist()
        ids = [1] + before + [-1] * n_tok + [1] + after
        rows.append(ids)
        labels.append([-100] * (len(ids) - n_after) + after)
        pv = torch.zeros(num_crops + 1, 3, CROP, CROP)  # padding crops are zeros, as the processor's
        real = 1 + (h // CROP) * (w // CROP)
        pv[:real] = torch.randn(real, 3, CROP, CROP, generator=gen)
        pixels.append(pv)
    length = max(len(r) for r in rows)
    if any(len(r) != length for r in rows):  # mixed layouts: right-pad (pad id 0, no loss)
        labels = [lab + [-100] * (length - len(r)) for r, lab in zip(rows, labels)]
        mask = [[1] * len(r) + [0] * (length - len(r)) for r in rows]
        rows = [r + [0] * (length - len(r)) for r in rows]
    else:
        mask = [[1] * length for _ in rows]
    return dict(
        input_ids=torch.tensor(rows),
        attention_mask=torch.tensor(mask),
        pixel_values=torch.stack(pixels),
        image_sizes=torch.tensor(layout),
        labels=torch.tensor(labels),
    )


# -- measurement ----------------------------------------------------------------------------------


def model_step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def vision_step(model, batch):
    model.zero_grad(set_to_none=True)
    features = model.model.vision_embed_tokens(batch["pixel_values"], batch["image_sizes"])
    features.float().square().mean().backward()
    return features.detach()


def alternate(steps, embedding, warmup, repeats):
    """Runs every `steps[part]()` in both modes, interleaved: one repeat runs each (part, mode)
    once, in the order model-all, model-real, vision-all, vision-real, and the next repeat in
    the reverse order, so slow phases of a shared machine hit every measurement alike.

    Returns {part: {"wall": {mode: [s...]}, "cpu": {mode: [s...]}}}: wall-clock time and the
    process' CPU time (all threads). A step that loses its core to another process is slower
    in wall time but not in CPU time; CPU time counts OpenMP spin-waiting, though.
    """
    order = [(part, mode) for part in steps for mode in MODES]
    for _ in range(warmup):
        for part, mode in order:
            with mode_context(embedding, mode):
                steps[part]()
    times = {part: {"wall": {m: [] for m in MODES}, "cpu": {m: [] for m in MODES}} for part in steps}
    for r in range(repeats):
        for part, mode in order if r % 2 == 0 else order[::-1]:
            with mode_context(embedding, mode):
                wall, cpu = time.perf_counter(), time.process_time()
                steps[part]()
                times[part]["cpu"][mode].append(time.process_time() - cpu)
                times[part]["wall"][mode].append(time.perf_counter() - wall)
    return times


def summarise(times):
    """Medians per mode, their ratio, and the median of the per-repeat (paired) ratios."""
    out = {}
    for clock, per_mode in times.items():
        all_s, real_s = statistics.median(per_mode["all"]), statistics.median(per_mode["real"])
        paired = statistics.median(a / b for a, b in zip(per_mode["all"], per_mode["real"]))
        out[clock] = dict(all_s=all_s, real_s=real_s, ratio=all_s / real_s, paired_ratio=paired,
                          times=per_mode)
    return out


def report(label, result, repeats):
    wall, cpu = result["wall"], result["cpu"]
    print(
        f"{label}: all crops {wall['all_s']:.3f} s, real crops {wall['real_s']:.3f} s -> ratio "
        f"{wall['ratio']:.2f}x (paired {wall['paired_ratio']:.2f}x) | CPU time {cpu['all_s']:.3f} s / "
        f"{cpu['real_s']:.3f} s -> {cpu['ratio']:.2f}x (paired {cpu['paired_ratio']:.2f}x); "
        f"medians of {repeats}"
    )


# -- analytic FLOP estimate -----------------------------------------------------------------------


def forward_flops(text, vision, layout, n_text):
    """Forward FLOPs (multiply-add = 2) of one step: (text + projector, CLIP per crop, real crops).

    Dense matmuls only (norms, activations, softmax ignored); attention scores and the
    weighted sum over the full L x L square; backward taken as 2 x forward everywhere.
    """
    h, inter, layers, vocab = text["hidden"], text["intermediate"], text["layers"], text["vocab"]
    kv = h // text["heads"] * text["kv_heads"]
    per_token_layer = h * (h + 2 * kv) + h * h + 2 * h * inter + inter * h
    d, vi = vision["hidden"], vision["intermediate"]
    patches = (vision["image"] // vision["patch"]) ** 2
    tokens = patches + 1
    clip_layer = 2 * tokens * (4 * d * d + 2 * d * vi) + 4 * tokens * tokens * d
    clip_crop = 2 * patches * 3 * vision["patch"] ** 2 * d + vision["layers_run"] * clip_layer
    text_total, real = 0, 0
    for hh, ww in layout:
        n_img = num_image_tokens(hh, ww)
        seq = n_img + n_text
        text_total += 2 * seq * (layers * per_token_layer + h * vocab) + layers * 4 * seq * seq * h
        text_total += 2 * n_img * (4 * d * h + h * h)  # projector
        real += 1 + (hh // CROP) * (ww // CROP)
    return text_total, clip_crop, real


def flop_ratios(text, vision, layout, slots, n_text):
    t, c, real = forward_flops(text, vision, layout, n_text)
    total = len(layout) * slots
    return dict(
        train=(t + total * c) / (t + real * c),  # everything trainable: 3x fwd on both sides
        frozen_clip=(3 * t + total * c) / (3 * t + real * c),  # no backward through CLIP
        vision_only=total / real,
        vision_share_all=total * c / (t + total * c),
        vision_share_real=real * c / (t + real * c),
    )


# -- main -------------------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 image in 9 slots, 2 repeats (smoke test)")
    p.add_argument("--batch", type=int, default=4, help="images (= rows) per batch")
    p.add_argument("--num-crops", type=int, default=16, help="processor num_crops: num_crops + 1 slots per image")
    p.add_argument("--hd-sizes", default="672x672", help="HD sizes WxH (cycled over the batch)")
    p.add_argument("--images", default=None, help="original sizes WxH; HD sizes from the processor rule")
    p.add_argument("--text-before", type=int, default=4, help="text tokens before the image (after BOS)")
    p.add_argument("--text-after", type=int, default=8, help="text tokens after the image (these carry the loss)")
    p.add_argument("--text-hidden", type=int, default=256)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--text-intermediate", type=int, default=None, help="default: hidden * 8192 / 3072")
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4, help="CLIP layers (all but the last run)")
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--vision-intermediate", type=int, default=None, help="default: 4 * hidden")
    p.add_argument("--vocab", type=int, default=1152)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per mode (alternating)")
    p.add_argument("--skip-vision-only", action="store_true", help="do not time the vision tower alone")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.batch, args.num_crops, args.text_hidden, args.text_layers, args.text_heads = 1, 8, 32, 1, 2
        args.vision_hidden, args.vision_layers, args.vision_heads, args.vocab = 16, 2, 2, 256
        args.warmup, args.repeats = 0, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    text_inter = args.text_intermediate or round(args.text_hidden * 8192 / 3072)
    vision_inter = args.vision_intermediate or 4 * args.vision_hidden
    config = tiny_config(
        vocab_size=args.vocab,
        pad_token_id=args.vocab - 1,
        hidden_size=args.text_hidden,
        intermediate_size=text_inter,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_heads,
        vision_config=dict(
            hidden_size=args.vision_hidden,
            intermediate_size=vision_inter,
            num_hidden_layers=args.vision_layers,
            num_attention_heads=args.vision_heads,
        ),
    )
    model = build_tiny_model(config, seed=args.seed).train()
    model.set_attn_implementation(args.attn)
    embedding = model.model.vision_embed_tokens
    layout = image_layout(args)
    slots = args.num_crops + 1
    batch = make_batch(layout, args.num_crops, args.vocab - 1, args.text_before, args.text_after, args.seed)
    real_total = int(real_crop_counts(batch["image_sizes"], CROP).sum())
    n_text = 2 + args.text_before + args.text_after
    layers_run = config.vision_feature_layer

    print("Phi-3.5-vision: skipping padding crops (CPU, forward+backward; ratios, not absolute speeds)")
    print(
        f"config: text hidden {args.text_hidden} x {args.text_layers} layers (intermediate {text_inter}), "
        f"CLIP hidden {args.vision_hidden} x {args.vision_layers} layers ({layers_run} run, intermediate "
        f"{vision_inter}), vocab {args.vocab}, {args.attn}, {torch.get_num_threads()} threads"
    )
    shapes = sorted({f"{w}x{h}" for h, w in layout})
    print(
        f"layout: {len(layout)} images, HD {', '.join(shapes)} (WxH), {slots} crop slots each -> "
        f"{real_total} real of {len(layout) * slots} crops; sequence {batch['input_ids'].shape[1]} tokens/row"
    )

    # Sanity: same loss (bitwise), and CLIP really sees all slots in the "all" mode.
    encoded = []
    hook = embedding.img_processor.vision_model.register_forward_pre_hook(
        lambda module, inputs: encoded.append(inputs[0].shape[0])
    )
    losses = {}
    for mode in MODES:
        encoded.clear()
        with mode_context(embedding, mode):
            losses[mode] = model_step(model, batch)
        losses[mode] = (float(losses[mode]), sum(encoded))
    hook.remove()
    diff = abs(losses["all"][0] - losses["real"][0])
    print(
        f"sanity: loss all-crops {losses['all'][0]:.7f}, real-only {losses['real'][0]:.7f} (|diff| {diff:.1e}); "
        f"crops through CLIP per step: all {losses['all'][1]}, real {losses['real'][1]}"
    )
    assert losses["all"][0] == losses["real"][0], "the two modes must compute the same loss"
    assert losses["all"][1] == len(layout) * slots and losses["real"][1] == real_total

    steps = {"model": lambda: model_step(model, batch)}
    if not args.skip_vision_only:
        steps["vision"] = lambda: vision_step(model, batch)
    times = alternate(steps, embedding, args.warmup, args.repeats)
    step = summarise(times["model"])
    report("model fwd+bwd ", step, args.repeats)
    vision = None
    if not args.skip_vision_only:
        vision = summarise(times["vision"])
        report("vision fwd+bwd", vision, args.repeats)

    bench_text = dict(
        hidden=args.text_hidden, intermediate=text_inter, layers=args.text_layers,
        heads=args.text_heads, kv_heads=args.text_heads, vocab=args.vocab,
    )
    bench_vision = dict(hidden=args.vision_hidden, intermediate=vision_inter, layers_run=layers_run,
                        patch=14, image=CROP)
    est_bench = flop_ratios(bench_text, bench_vision, layout, slots, n_text)
    est_real = flop_ratios(REAL_TEXT, REAL_VISION, layout, slots, n_text)
    print("analytic FLOP estimate (an ESTIMATE from matmul FLOP counts, not a measurement):")
    print(
        f"  this bench config   : fwd+bwd {est_bench['train']:.2f}x, vision alone "
        f"{est_bench['vision_only']:.2f}x (CLIP = {est_bench['vision_share_all']:.0%} of all-crops FLOPs)"
    )
    print(
        f"  real Phi-3.5-vision : fwd+bwd {est_real['train']:.2f}x all trainable, "
        f"{est_real['frozen_clip']:.2f}x with CLIP frozen, vision alone {est_real['vision_only']:.2f}x "
        f"(CLIP-L/14-336 on 577 tokens/crop = {est_real['vision_share_all']:.0%} of all-crops FLOPs; "
        "same layout)"
    )
    return dict(
        config=dict(text=bench_text, vision=bench_vision, attn=args.attn, threads=torch.get_num_threads()),
        layout=dict(hd_sizes=[list(s) for s in layout], slots=slots, real_crops=real_total,
                    total_crops=len(layout) * slots, seq_len=int(batch["input_ids"].shape[1])),
        sanity=dict(loss_all=losses["all"][0], loss_real=losses["real"][0], loss_abs_diff=diff,
                    crops_all=losses["all"][1], crops_real=losses["real"][1]),
        step=step,
        vision=vision,
        estimate=dict(bench=est_bench, real_model=est_real),
    )


if __name__ == "__main__":
    main()
