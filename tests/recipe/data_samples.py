"""Small examples shared by the data-path tests (records, validation, batching)."""

import json

from PIL import Image

from phi3v.image_processing_phi3v import Phi3VImageProcessor
from phi3v.processing_phi3v import Phi3VProcessor
from phi3v.tiny_tokenizer import build_tokenizer


def make_processor(num_crops=4):
    """A processor with the in-process tiny tokenizer (no files, no network)."""
    return Phi3VProcessor(image_processor=Phi3VImageProcessor(num_crops=num_crops), tokenizer=build_tokenizer())


def image(w, h, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def good_record(i, images):
    return {"id": f"ex{i}", "source": "test",
            "conversations": [{"images": images, "user": "What colour?", "assistant": "red"}]}
