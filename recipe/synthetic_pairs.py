"""Synthetic preference pairs for the demo and the tests: a shape of one colour, the chosen
answer names that colour, the rejected one another colour. Every colour is chosen and rejected
equally often, so only the image tells which answer is right.

    python -m recipe.synthetic_pairs --out_dir demo_out/pairs [--train 48 --eval 16 --text_only 0]

Writes train.jsonl, eval.jsonl (recipe/pair_layouts.py's layout) and images/.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["COLOURS", "write_pairs"]

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("square", "circle")


def _image(colour: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    a, b = rng.randint(4, 16), rng.randint(size - 16, size - 4)
    (draw.rectangle if shape == "square" else draw.ellipse)((a, a, b, b), fill=COLOURS[colour])
    return image


def _pairs(split: str, n: int, text_only: int, rng: random.Random, image_dir: Path) -> list[dict]:
    names = list(COLOURS)
    rows = []
    for i in range(n):
        colour = names[i % len(names)]
        other = names[(i + 1 + (i // len(names)) % (len(names) - 1)) % len(names)]
        shape = SHAPES[(i // len(names)) % len(SHAPES)]
        path = f"{split}/{i:04d}.png"
        (image_dir / split).mkdir(parents=True, exist_ok=True)
        _image(colour, shape, rng).save(image_dir / path)
        question = f"What colour is the {shape}?"
        rows.append({"id": f"{split}-{i}", "conversations": [{"images": [path], "user": question}],
                     "chosen": f"The {shape} is {colour}.", "rejected": f"The {shape} is {other}."})
    for i in range(text_only):
        colour, other = names[i % len(names)], names[(i + 2) % len(names)]
        rows.append({"id": f"{split}-text-{i}", "conversations": [{"user": f"Repeat the word {colour}."}],
                     "chosen": colour, "rejected": other})
    return rows


def write_pairs(out_dir: str | Path, train: int = 48, eval_: int = 16, text_only: int = 0, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    for split, n in (("train", train), ("eval", eval_)):
        rows = _pairs(split, n, text_only, rng, out_dir / "images")
        (out_dir / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--text_only", type=int, default=0, help="text-only pairs per split, besides the image ones")
    args = parser.parse_args(argv)
    print(write_pairs(args.out_dir, args.train, args.eval, args.text_only))


if __name__ == "__main__":
    main()
