"""Training throughput: the original recipe's setup against ours, whole steps, one process.

Run from the repository root:

    .venv/bin/python bench/throughput.py            # CPU, small model, DocVQA-like data, ~10-25 min
    .venv/bin/python bench/throughput.py --quick    # tiny sizes, well under a minute (smoke test)
    .venv/bin/python bench/throughput.py --real_size --mode lora   # CUDA only: released dimensions

Three columns train the SAME model (weights reset before every run), on the same examples,
for the same number of optimizer steps of the same global batch, each through the recipe's
own `RecipeTrainer`, data loader, `ConversationDataset` (JPEG files decoded and HD-cropped on
access) and `Collator`, i.e. whole training steps including the data side:

* original: the original recipe's setup -- eager attention (decoder and CLIP), every crop
  slot through CLIP (`bench/vision_crops.py`'s `encode_all_crops` emulation of the official
  vision path: padding crops are encoded and thrown away), one example per device (gradient
  accumulation fills the global batch), random order (no length grouping), images decoded in
  the main process (`--dataloader_num_workers 0`);
* ours: the recipe's defaults, as `parse_args` gives them (SDPA, real crops only, its
  per-device batch, sampling strategy and data workers);
* ours+padding_free: the defaults plus `--padding_free`, the whole global batch in one
  micro-batch (`--batch_size_per_gpu` = `--batch_size`), packed into rows of <= 4096 tokens.

Each column first runs once untimed (2 steps: the process' first steps of each shape set pay
for allocator growth and kernel selection, which must not count against whichever column
runs first; a first measurement without it gave the original setup 0.12 then 0.26 images/s).
Then the columns alternate (A B C, C B A, ...) over `--repeats`. In every run the first
optimizer step (data workers starting) is not timed either: images/s and
real (non-padding) tokens/s are counted over the later steps from what the model really
received (a forward pre-hook), divided by their wall time. Also printed: images per second of
this process' CPU time (all its threads), which another job taking the cores changes much
less than wall time -- but which does not see data workers' time, so it is only comparable
between columns with the same number of workers. Printed per column: median
images/s and tokens/s, and peak memory; then the ratios to the original setup (median of
the per-repeat ratios, "paired", in brackets). The last line is the images/s ratio ours /
original setup. `main()` returns everything printed as a dict.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` over the whole run. On CPU the
process' max RSS only grows, so it cannot tell columns apart in one process: there it is the
peak net CPU-allocator memory of one micro-batch forward+backward of that column (weights and
optimizer state not included), from torch's profiler (`bench/attention.py`'s `peak_memory`),
measured once, after the column's warm-up run.

Data (default): DocVQA-like, the original's speed-table workload at --num_crops 16: scanned
pages (1700x2200 -> 17 real crops, 2,509 image tokens) and, one in three, meme-like pictures
(600x400 -> 13 real of 17 crop slots, 1,921 tokens), each with a short question and answer.

`--real_size` (CUDA only; refused elsewhere): the released dimensions (Phi-3-mini 3072 x 32
layers, CLIP ViT-L/14-336, vocabulary 32064) with random weights, `--mode full`,
`frozen_vision` or `lora` (the recipe's LoRA targets), so the figures sit next to the
original's table (which is 8 GPUs: compare per-GPU images/s). It runs a GPU run's settings
(without DeepSpeed, one process): --bf16 autocast on the weights as `recipe.model` holds them
without DeepSpeed (fp32 for full and frozen vision; a bf16 base with fp32 adapters for LoRA), and
the original's AdamW settings (the recipe's defaults: betas 0.9/0.95, eps 1e-7, weight decay
0.01, gradient clipping 1.0), printed in the header. When flash-attn imports, a fourth column,
ours+flash_attention_2, is ours with FlashAttention-2 in the decoder and CLIP.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from attention import peak_memory, set_mode  # noqa: E402
from vision_crops import encode_all_crops  # noqa: E402

from phi3v.image_processing_phi3v import Phi3VImageProcessor  # noqa: E402
from phi3v.modeling_phi3v import Phi3VForCausalLM  # noqa: E402
from phi3v.processing_phi3v import Phi3VProcessor  # noqa: E402
from phi3v.tiny import build_tiny_model, tiny_config  # noqa: E402
from phi3v.tiny_tokenizer import build_tokenizer  # noqa: E402
from recipe.args import DataArguments  # noqa: E402
from recipe.flag_parser import parse_args  # noqa: E402
from recipe.data import Collator, ConversationDataset  # noqa: E402
from recipe.records import Conversation, Turn  # noqa: E402
from recipe.model import freeze_vision, lora_target_modules, weights_dtype  # noqa: E402
from recipe.trainer import RecipeTrainer  # noqa: E402

COLUMNS = ("original", "ours", "ours+padding_free")
FLASH_COLUMN = "ours+flash_attention_2"
MODE_FLAGS = {"full": [], "frozen_vision": ["--freeze_vision_model"], "lora": ["--use_lora"]}
MB = 2**20
WORDS = "total amount date invoice name address page table form report number year value the of".split()


# -- data ---------------------------------------------------------------------------------------


def synthetic_image(width: int, height: int, rng: random.Random) -> Image.Image:
    """A page-like image: light background, dark text-like strokes (so JPEG decoding costs
    what a scanned document costs, not what a flat colour does)."""
    gen = np.random.default_rng(rng.randrange(2**32))
    pixels = np.full((height, width, 3), 235, dtype=np.uint8)
    for top in range(20, height - 20, 28):
        for left in range(20, width - 60, int(gen.integers(40, 120))):
            pixels[top : top + 12, left : left + int(gen.integers(10, 50))] = gen.integers(0, 90, 3)
    pixels = (pixels.astype(np.int16) + gen.integers(-12, 12, pixels.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def make_conversations(directory: Path, n: int, sizes: list[tuple[int, int]], seed: int) -> list[Conversation]:
    """`n` one-image conversations, image sizes cycling through `sizes` (WxH), saved as JPEG."""
    rng = random.Random(seed)
    conversations = []
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        path = directory / f"image_{i}.jpg"
        synthetic_image(width, height, rng).save(path, quality=90)
        question = "what is the " + " ".join(rng.choices(WORDS, k=rng.randint(4, 10))) + "?"
        answer = " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))
        conversations.append(Conversation(id=str(i), turns=[Turn(question, answer, [path])], where=f"example {i}"))
    return conversations


# -- model --------------------------------------------------------------------------------------


def build_model(args, vocab_size: int, pad_token_id: int):
    sizes = dict(
        hidden_size=args.text_hidden,
        intermediate_size=round(args.text_hidden * 8192 / 3072),
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_heads,
        vision_config=dict(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                           num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads),
    )
    config = tiny_config(vocab_size=vocab_size, pad_token_id=pad_token_id, **sizes)
    config.use_cache = False  # training, as recipe.model.load_model
    if not args.real_size:
        return build_tiny_model(config, seed=args.seed).train()
    torch.manual_seed(args.seed)
    with torch.device("cuda"):  # 4.2B parameters: initialised on the GPU, not in host RAM
        model = Phi3VForCausalLM(config).to(real_size_dtype(args.mode)).train()
    if args.mode == "frozen_vision":
        freeze_vision(model)
    elif args.mode == "lora":  # the recipe's defaults: rank 64, alpha 128, its target modules
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=64, lora_alpha=128, target_modules=lora_target_modules(model, include_vision=True),
            init_lora_weights="gaussian", task_type="CAUSAL_LM"))
    return model


def real_size_dtype(mode: str) -> torch.dtype:
    """The dtype recipe.model loads the weights in for `mode` with --bf16 and no DeepSpeed."""
    model_args, _, training_args = parse_args(DataArguments, [
        "--output_dir", tempfile.gettempdir(), "--bf16", "--deepspeed", "none", *MODE_FLAGS[mode]])
    return weights_dtype(model_args, training_args)


def columns(args) -> tuple[str, ...]:
    """The columns this run measures: FlashAttention-2 too with --real_size when flash-attn imports."""
    if not args.real_size:
        return COLUMNS
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or kernels that do not load
        return COLUMNS
    return (*COLUMNS, FLASH_COLUMN)


def column_attention(column: str) -> str:
    return {"original": "eager", FLASH_COLUMN: "flash_attention_2"}.get(column, "sdpa")


def set_attention(model, mode: str) -> None:
    """Decoder and CLIP both switched (the CLIP blocks read vision_config at every forward)."""
    set_mode(model.get_base_model() if hasattr(model, "get_base_model") else model, mode)


# -- one column ---------------------------------------------------------------------------------


def column_flags(column: str, args, output_dir: Path, steps: int) -> list[str]:
    """The recipe flags of a column: what is common, then what the original setup changes."""
    flags = ["--output_dir", str(output_dir), "--deepspeed", "none", "--batch_size", args.batch_size,
             "--max_steps", steps, "--save_strategy", "no", "--logging_steps", 10**6, "--no-tqdm",
             "--learning_rate", "1e-5", "--num_crops", args.num_crops, "--seed", args.seed]
    if args.real_size:
        flags += ["--bf16"]
    if column == "original":
        flags += ["--batch_size_per_gpu", 1, "--train_sampling_strategy", "random", "--dataloader_num_workers", 0]
    elif column == "ours+padding_free":
        flags += ["--padding_free", "--batch_size_per_gpu", args.batch_size]
    return [str(f) for f in flags]


class Meter(TrainerCallback):
    """Per optimizer step: end time, and images / real tokens the model received so far."""

    def __init__(self, model, pad_token_id: int):
        self.images = self.tokens = 0
        self.marks: list[tuple[float, float, int, int]] = []
        self.hook = model.register_forward_pre_hook(self.count, with_kwargs=True)
        self.pad = pad_token_id

    def count(self, module, args, kwargs):
        if kwargs.get("image_sizes") is not None:
            self.images += int(kwargs["image_sizes"].shape[0])
        self.tokens += int(kwargs["input_ids"].ne(self.pad).sum())

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), time.process_time(), 0, 0))

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), time.process_time(), self.images, self.tokens))

    def rates(self) -> dict:
        """Over every step but the first (warm-up)."""
        (t0, c0, i0, k0), (t1, c1, i1, k1) = self.marks[1], self.marks[-1]
        return dict(images_per_s=(i1 - i0) / (t1 - t0), tokens_per_s=(k1 - k0) / (t1 - t0), seconds=t1 - t0,
                    images_per_cpu_s=(i1 - i0) / (c1 - c0), images=i1 - i0, tokens=k1 - k0)


def run_column(column: str, model, initial: dict, dataset, processor, args, work: Path, steps: int,
               measure_peak: bool) -> dict:
    """One training run of a column from the initial weights; its throughput (and, with
    `measure_peak` on CPU, the peak memory of one of its micro-batches)."""
    flags = column_flags(column, args, work / column, steps)
    _, data_args, training_args = parse_args(DataArguments, flags)
    model.load_state_dict(initial)
    set_attention(model, column_attention(column))
    embedding = (model.get_base_model() if hasattr(model, "get_base_model") else model).model.vision_embed_tokens
    collator = Collator(pad_token_id=processor.tokenizer.pad_token_id,
                        max_tokens_per_row=data_args.max_tokens_per_row if data_args.padding_free else None)
    meter = Meter(model, processor.tokenizer.pad_token_id)
    trainer = RecipeTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                            processing_class=processor, callbacks=[meter])
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would interleave with the table
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with encode_all_crops(embedding) if column == "original" else contextlib.nullcontext():
            trainer.train()
    finally:
        meter.hook.remove()
    result = meter.rates()
    result["settings"] = dict(
        attention=column_attention(column), all_crop_slots=column == "original",
        batch_size_per_gpu=training_args.per_device_train_batch_size,
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        sampling=training_args.train_sampling_strategy, workers=training_args.dataloader_num_workers,
        padding_free=data_args.padding_free,
    )
    if torch.cuda.is_available():
        result["peak_mb"] = torch.cuda.max_memory_allocated() / MB
    elif measure_peak:
        result["peak_mb"] = step_peak_mb(model, embedding, trainer, column)
    return result


def step_peak_mb(model, embedding, trainer, column: str) -> float:
    """CPU: peak net allocator memory of one micro-batch forward+backward of the column."""
    batch = next(iter(trainer.get_train_dataloader()))
    model.zero_grad(set_to_none=True)

    def step():
        with encode_all_crops(embedding) if column == "original" else contextlib.nullcontext():
            model(**batch).loss.backward()

    peak, _, _ = peak_memory(step)
    model.zero_grad(set_to_none=True)
    return peak / MB


# -- main ---------------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (smoke test)")
    p.add_argument("--real_size", action="store_true", help="released dimensions, bf16, random weights (CUDA only)")
    p.add_argument("--mode", default="full", choices=["full", "frozen_vision", "lora"], help="with --real_size")
    p.add_argument("--num_crops", type=int, default=16)
    p.add_argument("--images", default="1700x2200,1700x2200,600x400", help="image sizes WxH, cycled")
    p.add_argument("--examples", type=int, default=None, help="default: batch_size * steps")
    p.add_argument("--batch_size", type=int, default=4, help="global batch (examples per optimizer step)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per column, alternating (after one "
                   "untimed warm-up run each)")
    p.add_argument("--text_hidden", type=int, default=256)
    p.add_argument("--text_layers", type=int, default=2)
    p.add_argument("--text_heads", type=int, default=4)
    p.add_argument("--vision_hidden", type=int, default=64)
    p.add_argument("--vision_layers", type=int, default=3, help="CLIP layers (all but the last run)")
    p.add_argument("--vision_heads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve(args) -> None:
    if args.real_size:
        if not torch.cuda.is_available():
            raise SystemExit("error: --real_size needs a CUDA device (the released dimensions in bf16); "
                             "run without it on CPU")
        args.text_hidden, args.text_layers, args.text_heads = 3072, 32, 32
        args.vision_hidden, args.vision_layers, args.vision_heads = 1024, 24, 16
    elif args.mode != "full":
        raise SystemExit("error: --mode applies to --real_size only (CPU runs full finetuning)")
    if args.quick:
        args.num_crops, args.images, args.batch_size, args.steps, args.repeats = 2, "500x400,300x200", 2, 2, 1
        args.text_hidden, args.text_layers, args.text_heads = 32, 1, 2
        args.vision_hidden, args.vision_layers, args.vision_heads = 16, 2, 2
    args.examples = args.examples or args.batch_size * args.steps


def summarise(runs: dict) -> dict:
    out, names = {}, tuple(runs)
    for column, results in runs.items():
        out[column] = {key: statistics.median(r[key] for r in results)
                       for key in ("images_per_s", "tokens_per_s", "images_per_cpu_s", "peak_mb")}
        out[column]["runs"] = results
    for column in names[1:]:
        for key in ("images_per_s", "tokens_per_s", "images_per_cpu_s"):
            out[column][f"{key}_ratio"] = out[column][key] / out["original"][key]
            out[column][f"{key}_paired_ratio"] = statistics.median(
                a[key] / b[key] for a, b in zip(runs[column], runs["original"]))
    return out


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    resolve(args)
    tokenizer = build_tokenizer()
    processor = Phi3VProcessor(image_processor=Phi3VImageProcessor(num_crops=args.num_crops), tokenizer=tokenizer)
    vocab = 32064 if args.real_size else int(math.ceil(len(tokenizer) / 64) * 64)
    model = build_model(args, vocab, tokenizer.pad_token_id)
    # In host memory: with --real_size --mode full a second copy of the 4.2B fp32 weights on the GPU
    # (17 GB) next to the weights, gradients and AdamW states (67 GB) would not fit an 80 GB H100.
    initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.images.split(",")]
    measured = columns(args)
    weights = next(model.parameters()).dtype
    device = (f"cuda ({args.mode}, weights {weights}, bf16 autocast)" if args.real_size
              else f"cpu ({torch.get_num_threads()} threads, fp32)")
    print("Phi-3.5-vision training throughput: original setup vs ours, whole steps with the data loader")
    print(f"model: text {args.text_hidden} x {args.text_layers} layers, CLIP {args.vision_hidden} x "
          f"{args.vision_layers} layers, vocab {vocab}; {device}")
    _, _, optimiser = parse_args(DataArguments, column_flags("ours", args, Path(tempfile.gettempdir()), 1))
    print(f"optimiser: AdamW betas ({optimiser.adam_beta1}, {optimiser.adam_beta2}), eps {optimiser.adam_epsilon}, "
          f"weight decay {optimiser.weight_decay}, gradient clipping {optimiser.max_grad_norm} (the recipe's "
          f"defaults = the original's); columns: {', '.join(measured)}")

    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        work = Path(tmp)
        conversations = make_conversations(work, args.examples, sizes, args.seed)
        dataset = ConversationDataset(conversations, processor)
        lengths = dataset.lengths
        print(f"data: {args.examples} examples, images {args.images} at num_crops {args.num_crops}, "
              f"{min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}); global batch "
              f"{args.batch_size}, {args.steps} steps per run (first untimed), {args.repeats} repeats per column")
        # One untimed 2-step run per column first: the process' first steps of each shape set
        # (allocator growth, oneDNN kernel selection) must not count against whichever runs first.
        # On CPU its peak memory is the column's (measuring it in every run would only add time).
        peaks = {}
        for column in measured:
            peaks[column] = run_column(column, model, initial, dataset, processor, args, work, 2, True).get("peak_mb")
            print(f"  warm-up {column} done", flush=True)
        runs = {column: [] for column in measured}
        for r in range(args.repeats):
            for column in measured if r % 2 == 0 else measured[::-1]:
                run = run_column(column, model, initial, dataset, processor, args, work, args.steps, False)
                run.setdefault("peak_mb", peaks[column])
                runs[column].append(run)
                print(f"  repeat {r + 1}/{args.repeats} {column}: {run['images_per_s']:.3f} images/s over "
                      f"{run['seconds']:.1f} s ({run['images_per_cpu_s']:.3f} images per CPU-second)", flush=True)
    result = summarise(runs)
    for column in measured:
        c = result[column]
        s = c["runs"][0]["settings"]
        print(f"{column:18s}: {c['images_per_s']:.3f} images/s, {c['tokens_per_s']:.0f} real tokens/s, peak "
              f"{c['peak_mb']:.0f} MB  [{s['attention']}, {'all crop slots' if s['all_crop_slots'] else 'real crops'}, "
              f"{s['batch_size_per_gpu']}/device x {s['gradient_accumulation_steps']} accumulation, "
              f"{s['sampling']}, {s['workers']} workers{', padding-free' if s['padding_free'] else ''}]")
    peak_kind = "max allocated over the run" if args.real_size else "one micro-batch fwd+bwd, allocator net peak"
    print(f"peak memory: {peak_kind}")
    packed = result["ours+padding_free"]
    print(f"ours+padding_free / original setup: {packed['images_per_s_ratio']:.2f}x images/s "
          f"(paired {packed['images_per_s_paired_ratio']:.2f}x), peak memory "
          f"{packed['peak_mb'] / result['original']['peak_mb']:.2f}x")
    if FLASH_COLUMN in result:
        flash = result[FLASH_COLUMN]
        print(f"{FLASH_COLUMN} / original setup: {flash['images_per_s_ratio']:.2f}x images/s (paired "
              f"{flash['images_per_s_paired_ratio']:.2f}x); / ours: "
              f"{flash['images_per_s'] / result['ours']['images_per_s']:.2f}x")
    ours = result["ours"]
    print(f"ours / original setup, per CPU-second of this process (steadier on a shared machine; "
          f"data workers' time not included): {ours['images_per_cpu_s_ratio']:.2f}x, padding_free "
          f"{packed['images_per_cpu_s_ratio']:.2f}x")
    print(f"ours / original setup: tokens/s {ours['tokens_per_s_ratio']:.2f}x, peak memory "
          f"{ours['peak_mb'] / result['original']['peak_mb']:.2f}x")
    print(f"ours / original setup: {ours['images_per_s_ratio']:.2f}x images/s "
          f"(paired {ours['images_per_s_paired_ratio']:.2f}x)")
    result["config"] = {k: v for k, v in vars(args).items()}
    return result


if __name__ == "__main__":
    main()
