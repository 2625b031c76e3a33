"""Try a model on images from the command line: `python -m phi3v.generate`.

    python -m phi3v.generate --model OUTPUT_DIR --image cat.jpg --prompt "What is in the picture?"
    python -m phi3v.generate --model OUTPUT_DIR --image f0.jpg --image f1.jpg --image f2.jpg \\
        --prompt "Classify the video."                          # a video: several frames
    python -m phi3v.generate --model microsoft/Phi-3.5-vision-instruct --adapter LORA_OUTPUT_DIR ...
    python -m phi3v.generate --model OUTPUT_DIR --jsonl data/ucf101_test.jsonl --output preds.jsonl

`--model` is a release-format model (the hub release, a full-finetune output, `merged/`) or a
LoRA/QLoRA output directory (its base comes from adapter_config.json); `--adapter` puts an
adapter on top of `--model`. Images become `<|image_1|>`, `<|image_2|>`, ... in the order given:
a prompt without tags gets one `<|image_k|>` line per image in front of it; a prompt with its
own tags must number them 1..N, in order. Greedy decoding, stopping at `<|end|>`. On a GPU when
there is one, in bf16 there (the release's dtype; fp16 on a GPU older than Ampere, which has no
bf16) and fp32 on CPU; `--dtype` overrides.

`--jsonl FILE` answers every example of a data file in the recipes' layout (one JSON object a
line: `{"id", "conversations": [{"images", "user", "assistant"}, ...]}`, image paths relative to
`--image_dir`, default FILE's directory's `images/` when it exists, else FILE's directory) and
writes one line `{"id", "prediction", "references"}` per example (`references`: a list, as in
the runner's eval_*.json, here the example's last answer) to `--output` (default stdout).

Problems the user can fix (a missing file, a directory that is no model, an image that does
not open, tags that do not match the images) end with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from .processing_phi3v import IMAGE_TAG_RE, end_token_ids

__all__ = ["GenerateError", "load", "default_dtype", "answer", "read_examples", "main"]


class GenerateError(Exception):
    """A problem the user can fix; its message (one line) says what, where and what to do."""


def _is_adapter(directory: Path) -> bool:
    return (directory / "adapter_config.json").is_file()


def _check_model_dir(model: str, flag: str) -> None:
    """A local path must be a model or adapter directory; anything else is taken as a hub id."""
    path = Path(model)
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if not looks_local:
        return
    if not path.is_dir():
        raise GenerateError(f"{flag} {model}: no such directory")
    if not ((path / "config.json").is_file() or _is_adapter(path)):
        raise GenerateError(
            f"{flag} {model}: neither a model (no config.json) nor a LoRA adapter (no adapter_config.json)"
        )


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU that computes in it (compute capability 8+: the release's dtype, half the
    memory, tensor cores), fp16 on an older GPU (V100, T4: torch emulates bf16 there, and
    `is_bf16_supported()` says yes unless told to leave emulation out), fp32 on CPU (where bf16
    matmuls are slow on most processors)."""
    if device != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def load(model: str, adapter: str | None = None, dtype: torch.dtype | None = None, num_crops: int | None = None,
         device: str | None = None):
    """(model, processor) for a model directory or hub id, with an optional LoRA adapter, on
    `device` (default: the GPU when there is one, else the CPU) in `dtype` (default:
    `default_dtype(device)`).

    An adapter directory as `model` loads its base (adapter_config.json) with the adapter. The
    processor comes from the adapter directory when it has one (the runner saves it there).
    """
    from . import Phi3VForCausalLM, Phi3VProcessor  # registers the Auto classes too

    _check_model_dir(model, "--model")
    if adapter is not None:
        _check_model_dir(adapter, "--adapter")
        if not _is_adapter(Path(adapter)):
            raise GenerateError(f"--adapter {adapter}: no adapter_config.json (not a LoRA output)")
    elif _is_adapter(Path(model)):
        adapter = model
        model = json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
        _check_model_dir(model, f"base_model_name_or_path of {adapter}/adapter_config.json:")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    try:
        base = Phi3VForCausalLM.from_pretrained(model, dtype=dtype)
    except OSError as err:  # not on the hub, hub unreachable, no weights in the directory
        raise GenerateError(f"--model {model}: cannot load it ({str(err).splitlines()[0]})") from None
    if adapter is not None:
        base = _merge_adapter(base, adapter)
    base.to(device)
    processor_dir = adapter if adapter is not None and (Path(adapter) / "preprocessor_config.json").is_file() else model
    kwargs = {} if num_crops is None else {"num_crops": num_crops}
    processor = Phi3VProcessor.from_pretrained(processor_dir, **kwargs)
    return base.eval(), processor


def _merge_adapter(base, adapter: str):
    """base + LoRA adapter, merged. Two library messages that say nothing to the user are kept
    out: importing PEFT loads bitsandbytes, whose CPU backend logs that an optional `kernels`
    download is missing (its built-in fallback is what runs), and PEFT reads transformers'
    deprecated `is_gradient_checkpointing` (a FutureWarning about PEFT's code, not ours)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        from peft import PeftModel

        return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def _open_image(path: str | Path, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise GenerateError(f"{where}: image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise GenerateError(f"{where}: image {path} cannot be read ({err})") from None


def tagged(text: str, first: int, count: int, where: str) -> str:
    """`text` with tags for images first..first+count-1: put in front when it has none."""
    numbers = list(range(first, first + count))
    found = [int(k) for k in IMAGE_TAG_RE.findall(text)]
    if not found:
        return "".join(f"<|image_{k}|>\n" for k in numbers) + text
    if found != numbers:
        expected = ", ".join(f"<|image_{k}|>" for k in numbers) or "no tags"
        raise GenerateError(
            f"{where}: tags {', '.join(f'<|image_{k}|>' for k in found)} for {count} image(s); expected "
            f"{expected}, in order (or no tags: one per image is put in front of the text)"
        )
    return text


def answer(model, processor, messages: list[dict[str, str]], images: list, max_new_tokens: int = 128) -> str:
    """The model's greedy answer to a chat (tags already in the messages, images in tag order)."""
    tokenizer = processor.tokenizer
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(prompt, images or None, return_tensors="pt")
    ends = end_token_ids(tokenizer)
    inputs = {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
              for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=ends, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def read_examples(path: Path, image_dir: Path) -> Iterator[tuple[str, list[dict[str, str]], list, str]]:
    """(id, messages, images, references) per line of a data file; the last answer is the reference."""
    if not path.is_file():
        raise GenerateError(f"--jsonl {path}: no such file")
    found = False
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
                turns = record["conversations"]
                if not isinstance(turns, list) or not turns:
                    raise TypeError("no conversation turns")
                turns = [(t["user"], t["assistant"], t.get("images", [])) for t in turns]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise GenerateError(
                    f"{where}: not a data line (expected {{\"id\", \"conversations\": [{{\"images\", \"user\", "
                    "\"assistant\"}, ...]}})"
                ) from None
            messages, images = [], []
            for t, (user, assistant, paths) in enumerate(turns):
                messages.append({"role": "user", "content": tagged(user, len(images) + 1, len(paths), where)})
                images += [_open_image(image_dir / p, where) for p in paths]
                if t < len(turns) - 1:
                    messages.append({"role": "assistant", "content": assistant})
            found = True
            yield str(record.get("id", where)), messages, images, [turns[-1][1]]
    if not found:
        raise GenerateError(f"--jsonl {path}: no examples (the file is empty or blank)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m phi3v.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="model directory or hub id, or a LoRA output directory")
    parser.add_argument("--adapter", help="LoRA/QLoRA output directory to apply on top of --model")
    parser.add_argument("--image", action="append", default=[], help="an image (repeat for several, in order)")
    parser.add_argument("--prompt", help="the question; <|image_k|> tags optional")
    parser.add_argument("--jsonl", help="answer every example of this data file instead")
    parser.add_argument("--image_dir", help="--jsonl: directory the image paths are relative to")
    parser.add_argument("--output", help="--jsonl: write predictions here (default: stdout)")
    parser.add_argument("--num_crops", type=int, help="max HD crops per image (default: the model's setting)")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    parser.add_argument("--dtype", choices=[*DTYPES, "auto"], default="auto",
                        help="weights and compute dtype (default auto: bf16 on a GPU, fp16 on one without "
                             "bf16 (V100, T4), fp32 on CPU)")
    parser.add_argument("--bf16", action="store_true", help="the same as --dtype bf16")
    return parser


def run(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.jsonl is None):
        raise GenerateError("give --prompt (with --image ...) or --jsonl FILE, one of the two")
    if args.jsonl is None and (args.image_dir or args.output):
        raise GenerateError("--image_dir and --output go with --jsonl")
    if args.jsonl is not None and args.image:
        raise GenerateError("--image goes with --prompt; a --jsonl file names its own images")
    if args.num_crops is not None and not 1 <= args.num_crops <= 16:
        raise GenerateError(f"--num_crops {args.num_crops}: must be 1..16")
    dtype = _dtype(args)
    if dtype is torch.float16 and not torch.cuda.is_available():
        raise GenerateError("--dtype fp16 needs a CUDA GPU; on CPU use fp32 (default) or bf16")
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")
    # Inputs are checked before the (slow) model load.
    if args.jsonl is None:
        images = [_open_image(p, "--image") for p in args.image]
        messages = [{"role": "user", "content": tagged(args.prompt, 1, len(images), "--prompt")}]
    else:
        jsonl = Path(args.jsonl)
        image_dir = Path(args.image_dir) if args.image_dir else (
            jsonl.parent / "images" if (jsonl.parent / "images").is_dir() else jsonl.parent)
        examples = read_examples(jsonl, image_dir)
        first = next(examples)  # fails here on a missing or empty file

    model, processor = load(args.model, args.adapter, dtype, args.num_crops)
    if args.jsonl is None:
        print(answer(model, processor, messages, images, args.max_new_tokens))
        return
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for example_id, messages, images, references in _chain(first, examples):
            prediction = answer(model, processor, messages, images, args.max_new_tokens)
            out.write(json.dumps({"id": example_id, "prediction": prediction, "references": references},
                                 ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()


def _dtype(args: argparse.Namespace) -> torch.dtype | None:
    if args.bf16 and args.dtype not in ("auto", "bf16"):
        raise GenerateError(f"--bf16 and --dtype {args.dtype} disagree; give one of them")
    return torch.bfloat16 if args.bf16 else DTYPES.get(args.dtype)


def _chain(first, rest):
    yield first
    yield from rest


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with one `error:` line for a problem the user can fix)."""
    from transformers.utils import logging as hf_logging

    args = _parser().parse_args(argv)
    hf_logging.disable_progress_bar()
    try:
        run(args)
    except GenerateError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
