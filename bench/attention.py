"""Eager vs SDPA attention on a long sequence: time and peak memory of a training step (CPU).

Run from the repository root:

    .venv/bin/python bench/attention.py                   # 2560 tokens, forward+backward, ~1-2 min
    .venv/bin/python bench/attention.py --forward-only    # inference (torch.no_grad) instead
    .venv/bin/python bench/attention.py --quick           # small sizes, a few seconds (smoke test)

One model (`Phi3VForCausalLM` from `phi3v.tiny.tiny_config`: text hidden 256, 4 heads of 64,
2 layers, vocabulary 1152) is switched between the two backends with
`model.set_attn_implementation(mode)`. transformers 5.23 picks the attention function at every
forward from `config._attn_implementation` (`ALL_ATTENTION_FUNCTIONS.get_interface(...)` in the
Phi-3 and CLIP attention modules, and the mask builder in `create_causal_mask`), so the switch
takes effect on the next call. The bench asserts both that the config says so and that the
backend really ran: the profiled step of each mode is checked for `aten::softmax` (eager) and
`aten::scaled_dot_product_attention` (SDPA) calls.

Input: one text-only row of `--seq-len` random ids with labels = ids (language-model loss on
every token). Images would add CLIP work that is identical in both modes (CLIP's own attention
is over 577 tokens per crop, so it does not reach the long-sequence regime); the decoder's
attention over the whole sequence is what this measures. Text-only keeps that signal clean.

The modes alternate (A B, B A, ...) over the repeats after a warm-up; medians and ratios are
printed. Peak memory is measured on separate, untimed steps (see `peak_memory`): the largest
net amount of CPU-allocator memory allocated during the step above what was live before it
(parameters, inputs, and anything else already allocated are not counted). Printed, and
returned by `main()` as a dict: time per mode, ratio eager/sdpa, peak MB per mode, ratio, and
the numerical agreement (max |logits diff|, loss diff, max gradient diff relative to the
largest gradient).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.utils import logging as hf_logging  # noqa: E402

from phi3v.tiny import build_tiny_model, tiny_config  # noqa: E402

MODES = ("eager", "sdpa")
MB = 2**20


# -- peak memory ------------------------------------------------------------------------------


def peak_memory(fn):
    """Runs `fn()` under torch.profiler and returns (peak bytes, net bytes at the end, op counts).

    Why this method: on CPU there is no `max_memory_allocated`, and the process' maximum RSS
    only grows, so it cannot tell two modes apart in one process. With `profile_memory=True`
    the profiler records one "[memory]" event per allocation (+bytes) and per free (-bytes) of
    the c10 CPU allocator, which every tensor goes through (activations, gradients, SDPA's
    buffers, the eager mask). Sorting the events by timestamp and keeping a running sum gives
    the net allocated memory over time; its maximum is the peak of the step. What the step
    frees of memory allocated before it would lower the sum, so callers drop gradients and
    outputs before calling. Not seen: library-internal scratch (oneDNN/MKL's own buffers)
    and allocator slack; both are small next to an L x L attention matrix.
    `check_peak_memory()` verifies the method on a known allocation pattern.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    deltas = sorted(
        (event.start_ns(), index, event.nbytes())
        for index, event in enumerate(events)
        if event.name() == "[memory]"
    )
    running = peak = 0
    for _, _, nbytes in deltas:
        running += nbytes
        peak = max(peak, running)
    counts = {}
    for event in events:
        counts[event.name()] = counts.get(event.name(), 0) + 1
    return peak, running, counts


def check_peak_memory():
    """The meter on a known pattern: 64 MB live, free it, 32 + 16 MB live -> peak 64, end 32."""

    def pattern():
        a = torch.ones(64 * MB, dtype=torch.uint8)
        del a
        b = torch.ones(32 * MB, dtype=torch.uint8)
        c = torch.ones(16 * MB, dtype=torch.uint8)
        del c
        pattern.keep = b

    peak, end, _ = peak_memory(pattern)
    del pattern.keep
    if (peak, end) != (64 * MB, 32 * MB):
        raise AssertionError(f"peak-memory meter: expected (64, 32) MB, got ({peak / MB}, {end / MB})")


# -- the step -------------------------------------------------------------------------------------


def set_mode(model, mode):
    """Switches the attention backend of the model (text decoder and CLIP config) in place."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "set the sub-config without finding the sub-model" notice
    try:
        model.set_attn_implementation(mode)
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config._attn_implementation != mode or model.config.vision_config._attn_implementation != mode:
        raise AssertionError(f"set_attn_implementation({mode!r}) did not switch the config")


def make_step(model, batch, backward):
    def step():
        if backward:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
        else:
            with torch.no_grad():
                model(**batch)

    return step


def compare_modes(model, batch):
    """Logits, loss and gradients of both modes on the same weights and input."""
    results = {}
    for mode in MODES:
        set_mode(model, mode)
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[mode] = (out.logits.detach(), out.loss.item(), grads)
    model.zero_grad(set_to_none=True)
    (le, loss_e, ge), (ls, loss_s, gs) = results["eager"], results["sdpa"]
    grad_scale = max(float(g.abs().max()) for g in ge.values())
    grad_diff = max(float((ge[name] - gs[name]).abs().max()) for name in ge)
    return dict(
        logits_max_abs_diff=float((le - ls).abs().max()),
        logits_max_abs=float(le.abs().max()),
        loss_eager=loss_e,
        loss_sdpa=loss_s,
        loss_abs_diff=abs(loss_e - loss_s),
        grad_max_rel_diff=grad_diff / grad_scale,
    )


# -- main -------------------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and 2 repeats (smoke test)")
    p.add_argument("--seq-len", type=int, default=2560, help="tokens in the row")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=None, help="default: hidden * 8192 / 3072")
    p.add_argument("--vocab", type=int, default=1152)
    p.add_argument("--forward-only", action="store_true", help="time torch.no_grad() forwards instead")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per mode (alternating)")
    p.add_argument("--memory-repeats", type=int, default=2, help="profiled (untimed) steps per mode")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seq_len, args.hidden, args.heads, args.layers, args.vocab = 512, 32, 2, 1, 256
        args.warmup, args.repeats, args.memory_repeats = 0, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    backward = not args.forward_only
    intermediate = args.intermediate or round(args.hidden * 8192 / 3072)
    config = tiny_config(
        vocab_size=args.vocab,
        pad_token_id=args.vocab - 1,
        hidden_size=args.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
    )
    model = build_tiny_model(config, seed=args.seed).train()
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(2, args.vocab - 1, (args.batch, args.seq_len), generator=gen)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
    check_peak_memory()

    print("Phi-3.5-vision decoder attention: eager vs sdpa (CPU; ratios, not absolute speeds)")
    print(
        f"config: hidden {args.hidden}, {args.heads} heads of {args.hidden // args.heads}, {args.layers} layers, "
        f"intermediate {intermediate}, vocab {args.vocab}; input {args.batch} x {args.seq_len} text tokens; "
        f"{'forward+backward' if backward else 'forward (no_grad)'}; {torch.get_num_threads()} threads"
    )
    agreement = compare_modes(model, batch)
    print(
        f"agreement: max |logits eager - sdpa| {agreement['logits_max_abs_diff']:.2e} "
        f"(max |logit| {agreement['logits_max_abs']:.2f}), |loss diff| {agreement['loss_abs_diff']:.2e}, "
        f"max grad diff / max |grad| {agreement['grad_max_rel_diff']:.2e}"
    )

    step = make_step(model, batch, backward)
    for _ in range(args.warmup):
        for mode in MODES:
            set_mode(model, mode)
            step()
    # Wall-clock and process CPU time (all threads): a step that loses its core to another
    # process on a shared machine is slower in wall time, not in CPU time (which, however,
    # counts OpenMP spin-waiting).
    times = {clock: {mode: [] for mode in MODES} for clock in ("wall", "cpu")}
    for r in range(args.repeats):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            set_mode(model, mode)
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times["cpu"][mode].append(time.process_time() - cpu)
            times["wall"][mode].append(time.perf_counter() - wall)

    peaks, retained, ops = {mode: [] for mode in MODES}, {}, {}
    for r in range(args.memory_repeats):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            set_mode(model, mode)
            model.zero_grad(set_to_none=True)
            peak, end, counts = peak_memory(step)
            peaks[mode].append(peak)
            retained[mode] = end
            ops[mode] = {
                "softmax": counts.get("aten::softmax", 0),
                "sdpa": counts.get("aten::scaled_dot_product_attention", 0),
            }
    model.zero_grad(set_to_none=True)
    # The backend really switched: eager = matmul + softmax per layer, no SDPA call; SDPA the reverse.
    if ops["eager"]["sdpa"] != 0 or ops["eager"]["softmax"] < args.layers:
        raise AssertionError(f"eager mode did not run eager attention: {ops['eager']}")
    if ops["sdpa"]["sdpa"] < args.layers or ops["sdpa"]["softmax"] != 0:
        raise AssertionError(f"sdpa mode did not run SDPA: {ops['sdpa']}")

    result = dict(
        config=dict(hidden=args.hidden, heads=args.heads, layers=args.layers, intermediate=intermediate,
                    vocab=args.vocab, seq_len=args.seq_len, batch=args.batch, backward=backward,
                    threads=torch.get_num_threads()),
        agreement=agreement,
        ops=ops,
    )
    for mode in MODES:
        result[mode] = dict(
            time_s=statistics.median(times["wall"][mode]),
            cpu_s=statistics.median(times["cpu"][mode]),
            times=times["wall"][mode],
            cpu_times=times["cpu"][mode],
            peak_mb=max(peaks[mode]) / MB,
            peaks_mb=[p / MB for p in peaks[mode]],
            retained_mb=retained[mode] / MB,
        )
    result["time_ratio"] = result["eager"]["time_s"] / result["sdpa"]["time_s"]
    result["paired_time_ratio"] = statistics.median(
        e / s for e, s in zip(times["wall"]["eager"], times["wall"]["sdpa"])
    )
    result["cpu_ratio"] = result["eager"]["cpu_s"] / result["sdpa"]["cpu_s"]
    result["peak_ratio"] = result["eager"]["peak_mb"] / result["sdpa"]["peak_mb"]
    print(f"backend check (profiled ops per step): eager {ops['eager']}, sdpa {ops['sdpa']}")
    for mode in MODES:
        r = result[mode]
        print(
            f"{mode:>5}: {r['time_s']:.3f} s wall, {r['cpu_s']:.3f} s CPU (medians of {args.repeats}); "
            f"peak {r['peak_mb']:.1f} MB above the pre-step level (runs: "
            f"{', '.join(f'{p:.1f}' for p in r['peaks_mb'])}; {r['retained_mb']:.1f} MB still held after: grads)"
        )
    print(
        f"eager / sdpa: time {result['time_ratio']:.2f}x wall (paired {result['paired_time_ratio']:.2f}x), "
        f"{result['cpu_ratio']:.2f}x CPU; peak memory {result['peak_ratio']:.2f}x"
    )
    return result


if __name__ == "__main__":
    main()
