"""Seconds from launch to the first training step, by dataset size, cold and cached.

    .venv/bin/python bench/startup.py                      # 1k, 10k, 40k examples (~5 min on a busy CPU)
    .venv/bin/python bench/startup.py --sizes 1000 4000    # smaller
    .venv/bin/python bench/startup.py --against 12c77fd    # and an earlier commit, side by side

Each measurement is a fresh process (`python finetune_hf_trainer_ucf101.py`, the tiny model, LoRA,
no evaluation before) that stops at its first step. "cold" runs into an empty --output_dir:
every example is read, tokenized and its image headers read. "cached" runs again into the same
directory: validation results come from OUTPUT_DIR/.cache (recipe.validation_cache), as for a
resume or a rerun. Examples are UCF-101-style lines (2 frames, a question listing classes) over
64 distinct image files, each line with its own id and text. The per-example cost is the slope
between the smallest and the largest size; the last line is the cold/cached ratio of that cost.
With --against REV the same runs are made with REV's code too (`git archive`, into the temporary
directory), each size's runs alternating between the two trees so both see the same machine load;
the last line is then REV's cold per-example cost over this tree's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

CHILD = """
import os, sys, time
sys.path.insert(0, {repo!r})
from transformers import Trainer, TrainerCallback

class FirstStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        print("FIRST_STEP", time.time(), flush=True)
        os._exit(0)

# (on transformers' Trainer, which every revision's trainer subclasses: --against REV runs this
# same child in REV's tree)
trainer_init = Trainer.__init__

def init_with_first_step(self, *a, **k):
    trainer_init(self, *a, **k)
    self.add_callback(FirstStep())

Trainer.__init__ = init_with_first_step
import finetune_hf_trainer_ucf101 as ucf
ucf.TASK.run(sys.argv[1:]) if hasattr(ucf, "TASK") and hasattr(ucf.TASK, "run") else ucf.main(sys.argv[1:])
"""


def make_data(root: Path, n: int) -> Path:
    """n training lines over 64 image files (2 frames each), 4 evaluation lines."""
    from PIL import Image

    images = root / "images"
    if not images.is_dir():
        images.mkdir(parents=True)
        for i in range(64):
            Image.new("RGB", (320 + 4 * i, 240), (i * 4, 100, 200 - i * 3)).save(images / f"f{i}.jpg", quality=80)
    classes = ["ApplyEyeMakeup", "Archery", "BabyCrawling", "BalanceBeam", "BandMarching", "BaseballPitch"]

    def line(i: int) -> str:
        frames = [f"f{i % 64}.jpg", f"f{(i * 7 + 3) % 64}.jpg"]
        question = f"Which action is shown in clip {i}? Answer with one of: " + ", ".join(classes)
        return json.dumps({"id": f"clip-{i}", "source": "bench",
                           "conversations": [{"images": frames, "user": question, "assistant": classes[i % 6]}]})

    train = root / f"train_{n}.jsonl"
    if not train.exists():
        train.write_text("".join(line(i) + "\n" for i in range(n)))
    evaluation = root / "eval.jsonl"
    evaluation.write_text("".join(line(10**7 + i) + "\n" for i in range(4)))
    return train


def first_step_seconds(tiny: Path, train: Path, out: Path, extra: list[str], repository: Path = REPOSITORY) -> float:
    argv = ["--model_name_or_path", str(tiny), "--train_file", str(train), "--eval_file", str(train.parent / "eval.jsonl"),
            "--output_dir", str(out), "--overwrite_output_dir", "--num_crops", "1", "--no-tqdm", "--deepspeed", "none",
            "--use_lora", "--skip_eval_before", "--max_steps", "1", "--batch_size", "1", "--dataloader_num_workers",
            "0", "--save_strategy", "no", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(repository)), *argv], env=env,
                          capture_output=True, text=True, cwd=repository)
    marks = [line for line in proc.stdout.splitlines() if line.startswith("FIRST_STEP")]
    if not marks:
        raise RuntimeError(f"the run did not reach its first step:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return float(marks[0].split()[1]) - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 40000])
    parser.add_argument("--quick", action="store_true", help="sizes 50 and 200 (a smoke test)")
    parser.add_argument("--against", metavar="REV", help="also time this git revision's code, alternating runs")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for the runs")
    args = parser.parse_args(argv)
    sizes = [50, 200] if args.quick else sorted(args.sizes)

    from phi3v.tiny import save_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    try:
        tiny = save_tiny_checkpoint(work / "tiny", num_crops=1)
        trees = {"this tree": REPOSITORY}
        if args.against:
            trees[args.against] = _checkout(args.against, work / "against")
        rows: dict = {name: {} for name in trees}
        for n in sizes:
            train = make_data(work / "data", n)
            for name, tree in trees.items():
                out = work / f"out_{n}_{len(rows[name])}_{tree.name}"
                cold = first_step_seconds(tiny, train, out, args.extra, tree)
                cached = first_step_seconds(tiny, train, out, args.extra, tree)
                rows[name][n] = {"cold_s": cold, "cached_s": cached}
                print(f"{name:>10}: {n:>7} examples: cold {cold:6.1f} s, cached {cached:6.1f} s to the first step",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = sizes[0], sizes[-1]
    per_example = {name: {kind: (rows[name][large][f"{kind}_s"] - rows[name][small][f"{kind}_s"]) / (large - small)
                          * 1000 for kind in ("cold", "cached")} for name in trees}
    for name in trees:
        print(f"{name:>10}: per example ({small} -> {large}): cold {per_example[name]['cold']:.3f} ms, "
              f"cached {per_example[name]['cached']:.3f} ms")
    mine = per_example["this tree"]
    ratio = mine["cold"] / mine["cached"] if mine["cached"] > 0 else float("inf")
    result = {"rows": rows["this tree"], "per_example_ms": mine, "ratio": ratio}
    if args.against:
        result["against"] = {"rows": rows[args.against], "per_example_ms": per_example[args.against]}
        result["against_ratio"] = per_example[args.against]["cold"] / mine["cold"] if mine["cold"] > 0 else float("inf")
        print(f"cold/cached per-example cost (this tree): {ratio:.1f}x")
        print(f"cold per-example cost, {args.against} / this tree: {result['against_ratio']:.2f}x")
    else:
        print(f"cold/cached per-example cost: {ratio:.1f}x")
    return result


def _checkout(revision: str, where: Path) -> Path:
    """REV's tracked files (no .git), for timing its code against this tree's."""
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision], cwd=REPOSITORY, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


if __name__ == "__main__":
    main()
