"""A tiny random Phi-3.5-vision, for tests and the CPU demo: `python -m phi3v.tiny --output_dir DIR`.

Same architecture as the release (336 px crops, 24 x 24 CLIP patches, 2 x 2 merge, HD
separators, LongRoPE with the released max/original length ratio) with small widths and few
layers, plus a tokenizer trained in-process that carries the official special tokens and chat
template. The directory it writes has the official file layout (config.json with model_type
"phi3_v" and the official auto_map, model.safetensors, tokenizer and preprocessor files) and
loads with the Auto classes after `import phi3v`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from .configuration_phi3v import Phi3VConfig

__all__ = ["tiny_config", "build_tiny_model", "save_tiny_checkpoint", "main"]

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)


def _longrope_factors(n: int) -> tuple[list[float], list[float]]:
    # Shaped like the released ones: ~1 for short, growing towards low frequencies for long.
    short = [round(1.0 + 0.05 * i / max(n - 1, 1), 4) for i in range(n)]
    long = [round(1.0 + 20.0 * (i / max(n - 1, 1)) ** 2, 4) for i in range(n)]
    return short, long


def tiny_config(vocab_size: int = 1152, pad_token_id: int = 1024, **overrides) -> Phi3VConfig:
    """Config of the tiny model. `pad_token_id` is the tokenizer's `<|endoftext|>` id."""
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
        sliding_window=262144,
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


def save_tiny_checkpoint(output_dir: str | Path, num_crops: int = 4, seed: int = 0) -> Path:
    """Writes model, tokenizer and processor of the tiny model to `output_dir`; returns it."""
    from .image_processing_phi3v import Phi3VImageProcessor
    from .processing_phi3v import Phi3VProcessor
    from .tokenization import build_tokenizer

    output_dir = Path(output_dir)
    tokenizer = build_tokenizer()
    # Like the release (32064 rows for 32045 tokens): a vocabulary padded to a multiple of 64.
    vocab_size = int(math.ceil(len(tokenizer) / 64) * 64)
    config = tiny_config(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id)
    model = build_tiny_model(config, seed=seed)
    end_ids = [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.pad_token_id]
    model.generation_config.eos_token_id = end_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = Phi3VProcessor(image_processor=Phi3VImageProcessor(num_crops=num_crops), tokenizer=tokenizer)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="directory to write the tiny checkpoint to")
    parser.add_argument("--num_crops", type=int, default=4, help="image processor num_crops (1..16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = save_tiny_checkpoint(args.output_dir, num_crops=args.num_crops, seed=args.seed)
    print(f"tiny Phi-3.5-vision written to {out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
