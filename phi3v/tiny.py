"""A tiny random Phi-3.5-vision, for tests and the CPU demo: `python -m phi3v.tiny --output_dir DIR`.

Same architecture as the release (336 px crops, 24 x 24 CLIP patches, 2 x 2 merge, HD
separators, LongRoPE with the released max/original length ratio) with small widths and few
layers, plus a tokenizer trained in-process that carries the official special tokens and chat
template. The directory it writes has the official file layout (config.json with model_type
"phi3_v" and the official auto_map, model.safetensors, tokenizer and preprocessor files) and
loads with the Auto classes after `import phi3v`.

`--family phi3v-128k` writes it laid out like Phi-3-vision-128k-instruct instead (docs/checkpoint_format.md
§5): its config.json keys (sliding_window 131072, no embd_pdrop / resid_pdrop, no
model_family key: like the release, it is recognised by `detect_model_family`), num_crops 16
and the 128k `auto_map` in preprocessor_config.json, and no generation_config.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from .configuration_phi3v import MODEL_FAMILIES, PHI3_5V, PHI3V_128K, Phi3VConfig

__all__ = ["tiny_config", "build_tiny_model", "save_tiny_checkpoint", "main"]

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
# What each release's config.json and preprocessor_config.json say where they differ.
RELEASE_SLIDING_WINDOW = {PHI3_5V: 262144, PHI3V_128K: 131072}
RELEASE_NUM_CROPS = {PHI3_5V: 4, PHI3V_128K: 16}


def _longrope_factors(n: int) -> tuple[list[float], list[float]]:
    # Shaped like the released ones: ~1 for short, growing towards low frequencies for long.
    short = [round(1.0 + 0.05 * i / max(n - 1, 1), 4) for i in range(n)]
    long = [round(1.0 + 20.0 * (i / max(n - 1, 1)) ** 2, 4) for i in range(n)]
    return short, long


def tiny_config(vocab_size: int = 1152, pad_token_id: int = 1024, family: str = PHI3_5V, **overrides) -> Phi3VConfig:
    """Config of the tiny model. `pad_token_id` is the tokenizer's `<|endoftext|>` id; `family`
    picks the release whose config it imitates (and whose rules it gets)."""
    text = {**TINY_TEXT, **{k: overrides.pop(k) for k in list(overrides) if k in TINY_TEXT}}
    vision = {**TINY_VISION, **overrides.pop("vision_config", {})}
    short, long = _longrope_factors(text["hidden_size"] // text["num_attention_heads"] // 2)
    kwargs = dict(
        vocab_size=vocab_size,
        **text,
        num_key_value_heads=text["num_attention_heads"],
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling={"type": "su", "short_factor": short, "long_factor": long},
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,  # as released (generation stops on <|end|>/<|endoftext|> via generation_config)
        pad_token_id=pad_token_id,
        sliding_window=RELEASE_SLIDING_WINDOW[family],
        embd_layer={},  # -> the released image-embedding layout
        img_processor={
            "image_dim_out": vision["hidden_size"],
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
        },
        vision_config=vision,
    )
    kwargs.update(overrides)
    return Phi3VConfig(**kwargs)


def build_tiny_model(config: Phi3VConfig | None = None, seed: int = 0):
    """A randomly initialised tiny Phi3VForCausalLM (deterministic for a given seed)."""
    from .modeling_phi3v import Phi3VForCausalLM

    torch.manual_seed(seed)
    return Phi3VForCausalLM(config or tiny_config()).eval()


def save_tiny_checkpoint(
    output_dir: str | Path, num_crops: int | None = None, seed: int = 0, family: str = PHI3_5V
) -> Path:
    """Writes model, tokenizer and processor of the tiny model to `output_dir`; returns it.

    `num_crops` defaults to the release's (3.5: 4, 128k: 16)."""
    from .image_processing_phi3v import RELEASED_AUTO_MAPS, Phi3VImageProcessor
    from .processing_phi3v import Phi3VProcessor, end_token_ids
    from .tiny_tokenizer import build_tokenizer

    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    # Like the release (32064 rows for 32045 tokens): a vocabulary padded to a multiple of 64.
    vocab_size = int(math.ceil(len(tokenizer) / 64) * 64)
    config = tiny_config(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id, family=family)
    model = build_tiny_model(config, seed=seed)
    model.generation_config.eos_token_id = end_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = Phi3VImageProcessor(
        num_crops=RELEASE_NUM_CROPS[family] if num_crops is None else num_crops,
        auto_map=RELEASED_AUTO_MAPS[family],
    )
    processor = Phi3VProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    if family == PHI3V_128K:
        _as_128k_release(output_dir)
    return output_dir


def _as_128k_release(output_dir: Path) -> None:
    """The 128k release ships no generation_config.json and no model_family key (it is told
    apart by its sliding_window), so the tiny copy exercises the same detection as the real one."""
    (output_dir / "generation_config.json").unlink()
    path = output_dir / "config.json"
    config = json.loads(path.read_text())
    del config["model_family"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="directory to write the tiny checkpoint to")
    parser.add_argument("--num_crops", type=int, default=None,
                        help="image processor num_crops (1..16; default: the release's, 3.5: 4, 128k: 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--family", choices=MODEL_FAMILIES, default=PHI3_5V,
                        help="release to imitate: Phi-3.5-vision-instruct (default) or Phi-3-vision-128k-instruct "
                             "(its config keys, preprocessor and rules)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = save_tiny_checkpoint(args.output_dir, num_crops=args.num_crops, seed=args.seed, family=args.family)
    name = "Phi-3-vision-128k" if args.family == PHI3V_128K else "Phi-3.5-vision"
    print(f"tiny {name} written to {out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
