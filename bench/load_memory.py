"""Host memory of one rank while full finetuning under DeepSpeed --bf16 loads the model: the
weights loaded in bf16 (recipe.model.load_model now) against fp32 (how it loaded before).

    .venv/bin/python bench/load_memory.py            # ~300M-parameter random model, ~1 min
    .venv/bin/python bench/load_memory.py --quick    # tiny sizes (tests/test_bench.py)

A random model at the chosen sizes is saved once in bf16 (the release's dtype). Each load then
runs in a fresh process, as a torchrun rank of a 1-rank job would (LOCAL_RANK/RANK/WORLD_SIZE
set), with the recipe's own flags (`--deepspeed ds_configs/zero2.json --bf16`) through
`recipe.model.load_model`; the fp32 column patches `recipe.model.weights_dtype` to fp32. Each
process reports its peak RSS (VmHWM) before the load, after it, and after reading every weight
(as DeepSpeed does to move them to the GPU: a bf16 checkpoint loaded in bf16 can stay
memory-mapped from its file until then); the loads alternate
(bf16, fp32, fp32, bf16, ...) over --repeats. Printed per column: the median peak RSS of the
process (weights read) and its growth from before the load; the last line is the ratio bf16 / fp32 of the peak
host memory per rank. Per rank, because every rank of a node loads its own copy before
DeepSpeed takes it: 8 ranks of the 4.2B model hold ~134 GB at fp32, half of that in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COLUMNS = ("bf16", "fp32")
MB = 2**20


def _rss_mb() -> float:
    """Peak RSS of this process so far: VmHWM, the high-water mark of its own memory map
    (ru_maxrss would carry over the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (not Linux) KiB


def child(column: str, checkpoint: str) -> None:
    """One rank's load; prints {"before_mb", "after_mb", "dtype"} as its last line."""
    import torch

    import finetune_hf_trainer_ucf101 as ucf
    import recipe.model
    from recipe.flag_parser import parse_args

    with tempfile.TemporaryDirectory() as tmp:
        model_args, _, training_args = parse_args(ucf.Ucf101Arguments, [
            "--model_name_or_path", checkpoint, "--data_dir", tmp, "--output_dir", tmp, "--bf16",
            "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--num_crops", "1",
        ], ucf.TASK.defaults)
        if column == "fp32":
            recipe.model.weights_dtype = lambda model_args, training_args: torch.float32
        before = _rss_mb()
        model = recipe.model.load_model(model_args, training_args)
        loaded = _rss_mb()
        # A bf16 checkpoint loaded as bf16 may stay memory-mapped from its file until something
        # reads it; DeepSpeed reads every weight (to move it to the GPU). Read them here too.
        with torch.no_grad():
            for param in model.parameters():
                param.sum()
        after = _rss_mb()
    dtype = str(next(model.parameters()).dtype)
    print(json.dumps({"before_mb": before, "loaded_mb": loaded, "after_mb": after, "dtype": dtype}))


def save_checkpoint(directory: Path, args) -> int:
    """A random model at the chosen sizes, saved in bf16 with the tiny processor; its size."""
    import torch

    from phi3v.image_processing_phi3v import Phi3VImageProcessor
    from phi3v.modeling_phi3v import Phi3VForCausalLM
    from phi3v.processing_phi3v import Phi3VProcessor
    from phi3v.tiny import tiny_config
    from phi3v.tiny_tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = tiny_config(vocab_size=args.vocab, pad_token_id=tokenizer.pad_token_id, hidden_size=args.hidden,
                         intermediate_size=round(args.hidden * 8192 / 3072), num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden // 96))
    torch.manual_seed(0)
    model = Phi3VForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    Phi3VProcessor(image_processor=Phi3VImageProcessor(num_crops=1), tokenizer=tokenizer).save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def load_once(column: str, checkpoint: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", column, str(checkpoint)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {column} load failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (smoke test)")
    p.add_argument("--hidden", type=int, default=1536, help="decoder width")
    p.add_argument("--layers", type=int, default=8, help="decoder layers")
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--repeats", type=int, default=2, help="loads per column, alternating")
    p.add_argument("--child", nargs=2, metavar=("COLUMN", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return {}
    if args.quick:
        args.hidden, args.layers, args.vocab, args.repeats = 384, 2, 4096, 1
    with tempfile.TemporaryDirectory(prefix="bench_load_memory_") as tmp:
        checkpoint = Path(tmp) / "model"
        params = save_checkpoint(checkpoint, args)
        print("Host memory of one rank loading for DeepSpeed ZeRO-2 --bf16: bf16 weights vs fp32")
        print(f"model: {params / 1e6:.0f}M parameters (decoder {args.hidden} x {args.layers}), saved in bf16; "
              f"fp32 would be {params * 4 / MB:.0f} MB, bf16 {params * 2 / MB:.0f} MB")
        runs = {column: [] for column in COLUMNS}
        for r in range(args.repeats):
            for column in COLUMNS if r % 2 == 0 else COLUMNS[::-1]:
                run = load_once(column, checkpoint)
                runs[column].append(run)
                print(f"  repeat {r + 1}/{args.repeats} {column}: loaded {run['dtype']}, peak RSS "
                      f"{run['before_mb']:.0f} -> {run['loaded_mb']:.0f} MB after from_pretrained -> "
                      f"{run['after_mb']:.0f} MB with every weight read", flush=True)
    result = {"parameters": params}
    for column in COLUMNS:
        peak = statistics.median(r["after_mb"] for r in runs[column])
        growth = statistics.median(r["after_mb"] - r["before_mb"] for r in runs[column])
        result[column] = {"peak_mb": peak, "load_growth_mb": growth, "runs": runs[column]}
        print(f"{column} load: peak host memory {peak:.0f} MB per rank, {growth:.0f} MB of it during the load")
    result["load_growth_ratio"] = result["bf16"]["load_growth_mb"] / result["fp32"]["load_growth_mb"]
    result["peak_ratio"] = result["bf16"]["peak_mb"] / result["fp32"]["peak_mb"]
    print(f"growth during the load, bf16 / fp32: {result['load_growth_ratio']:.2f}x")
    print(f"peak host memory per rank, bf16 load / fp32 load: {result['peak_ratio']:.2f}x")
    return result


if __name__ == "__main__":
    main()
