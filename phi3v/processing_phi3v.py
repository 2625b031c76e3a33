"""Processor for Phi-3.5-vision-instruct: prompt expansion (format: docs/checkpoint_format.md §4).

A prompt refers to its images with the tags `<|image_1|>`, `<|image_2|>`, ... The processor
runs the image processor on the images and replaces tag k by as many copies of the id -k as
image k has feature vectors; the model later overwrites those positions with the image
features. Same call as the official processor (text first):

    >>> inputs = processor("<|user|>\\n<|image_1|>\\nWhat is this?<|end|>\\n<|assistant|>\\n",
    ...                    [image], return_tensors="pt")
    >>> sorted(inputs.keys())
    ['attention_mask', 'image_sizes', 'input_ids', 'pixel_values']

Ids are those of the official code, quirks included: the text between tags is tokenized
chunk by chunk with the normal tokenizer call, so every chunk starts with BOS (`<s>` = 1) and
its own "▁" -- a BOS follows every image block, and a prompt ending with a tag ends with BOS.

Deliberate difference: the official code accepts any tag numbers that cover 1..M and expands
a repeated tag twice, while the model consumes image features in order of appearance, so
repeated or out-of-order tags crash the model or silently give positions the features of
another image. Here the tags must be exactly `<|image_1|>` .. `<|image_M|>`, each once, in
increasing order, with M == len(images); anything else raises a ValueError saying what was
found and what is expected (`check_image_tags`, usable to validate data before training).

The released tokenizer's facts that the processor's users need live here too: its additional
special tokens (`ADDITIONAL_SPECIAL_TOKENS`, written back into saved tokenizer configs) and the
tokens generation ends at (`end_token_ids`).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_tokenizers import TokenizersBackend
from transformers.utils import IMAGE_PROCESSOR_NAME, TensorType, logging

from .image_processing_phi3v import Phi3VImageProcessor, released_auto_map

__all__ = [
    "ADDITIONAL_SPECIAL_TOKENS",
    "END_TOKENS",
    "end_token_ids",
    "IMAGE_TAG_PATTERN",
    "IMAGE_TAG_RE",
    "Phi3VProcessor",
    "check_image_tags",
    "image_positions",
    "image_tag_chunks",
    "image_tag",
    "write_released_special_tokens",
]

logger = logging.get_logger(__name__)

# The official split pattern. Any number is matched so that wrong numbers are reported, not
# left in the text as literal characters.
IMAGE_TAG_PATTERN = r"<\|image_\d+\|>"
# Same, capturing the number.
IMAGE_TAG_RE = re.compile(r"<\|image_(\d+)\|>")

# The released tokenizer_config.json and special_tokens_map.json declare these (the repeated
# "<|end|>" included) as additional special tokens: transformers 4.x reports them as special and
# skips them when decoding with skip_special_tokens, and vLLM relies on that.
ADDITIONAL_SPECIAL_TOKENS = ("<|system|>", "<|end|>", "<|user|>", "<|end|>")

# Generation ends at <|end|> (the end of an answer) or <|endoftext|>.
END_TOKENS = ("<|end|>", "<|endoftext|>")


def end_token_ids(tokenizer) -> list[int]:
    """The ids generation stops at (END_TOKENS that the tokenizer has, in order, once each)."""
    ids = [tokenizer.convert_tokens_to_ids(token) for token in END_TOKENS]
    return [i for i in dict.fromkeys(ids) if i is not None and i != tokenizer.unk_token_id]


def _write_official_tokenizer_config(save_directory: str | os.PathLike, tokenizer: Any) -> None:
    """Makes tokenizer_config.json readable by the tools that read the released checkpoint.

    transformers 5 records its own class name ("TokenizersBackend"), which transformers 4.x
    (the hub code, vLLM builds pinned to 4.x) cannot resolve, and moves the chat template to
    chat_template.jinja, which older versions do not read. The released file names
    LlamaTokenizer (4.x loads tokenizer.json as is through LlamaTokenizerFast; transformers 5
    maps model_type "phi3_v" to the tokenizer.json-backed class) and carries the template and
    the BOS/EOS flags itself. Save the model first (its config.json decides the class name).
    """
    path = os.path.join(save_directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    # transformers 5 honours "LlamaTokenizer" correctly only next to a config.json saying
    # model_type "phi3_v"; without one (a LoRA adapter directory) it would rebuild a different
    # pipeline, so those directories name the tokenizer.json-backed class instead.
    model_config = os.path.join(save_directory, "config.json")
    official = False
    if os.path.isfile(model_config):
        with open(model_config, encoding="utf-8") as f:
            official = json.load(f).get("model_type") == "phi3_v"
    config.update(
        tokenizer_class="LlamaTokenizer" if official else "TokenizersBackend",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
    )
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    write_released_special_tokens(save_directory)


def write_released_special_tokens(save_directory: str | os.PathLike) -> None:
    """Declares the special tokens as the release does, in tokenizer_config.json and
    special_tokens_map.json.

    transformers 5 saves the additional special tokens as a list under "extra_special_tokens"
    and writes no special_tokens_map.json; transformers 4.57 expects a dict under that key
    ("'list' object has no attribute 'keys'") and 4.45 ignores it, so neither sees `<|end|>` as
    special and vLLM's detokenisation diverges. The released key "additional_special_tokens"
    is read by every version (transformers 5 maps it to extra_special_tokens). A tokenizer that
    declares none gets the released list. Works on the files alone (idempotent).
    """
    path = os.path.join(save_directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, dict):  # named model-specific tokens: not part of the released layout
        extra = None
    additional = [str(t) for t in (extra or config.get("additional_special_tokens") or ADDITIONAL_SPECIAL_TOKENS)]
    config["additional_special_tokens"] = additional
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    # The named tokens as the release writes them: their AddedToken flags from tokenizer.json.
    flags = {}
    tokenizer_file = os.path.join(save_directory, "tokenizer.json")
    if os.path.isfile(tokenizer_file):
        with open(tokenizer_file, encoding="utf-8") as f:
            flags = {token["content"]: token for token in json.load(f).get("added_tokens", [])}
    special_map: dict[str, Any] = {"additional_special_tokens": additional}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        content = config.get(name)
        if isinstance(content, dict):
            content = content.get("content")
        if content is None:
            continue
        token = flags.get(content, {})
        special_map[name] = {
            "content": content,
            **{key: bool(token.get(key, False)) for key in ("lstrip", "normalized", "rstrip", "single_word")},
        }
    with open(os.path.join(save_directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")


def image_tag(k: int) -> str:
    """The tag for image k (1-based): `<|image_k|>`."""
    return f"<|image_{k}|>"


def _tags(numbers: list[int]) -> str:
    return ", ".join(image_tag(k) for k in numbers) if numbers else "none"


def check_image_tags(text: str, num_images: int, where: str = "the prompt") -> None:
    """Raise a ValueError unless `text` has exactly the tags <|image_1|> .. <|image_N|> in order.

    N = `num_images`; each tag must appear once and tag k must come before tag k+1, because the
    model fills image positions with the images' features in order of appearance. `where` names
    the text in the message (e.g. "text[3]" or a data file and line).
    """
    found = [int(number) for number in IMAGE_TAG_RE.findall(text)]
    expected = list(range(1, num_images + 1))
    if found == expected:
        return
    shown = f"{text[:200]!r}{'...' if len(text) > 200 else ''}"
    if num_images == 0:
        raise ValueError(
            f"Phi3VProcessor: {where} has the image tags [{_tags(found)}] but no images were "
            f"given; pass the images (in tag order) or remove the tags. Text: {shown}"
        )
    counts = Counter(found)
    problems = []
    repeated = sorted(k for k, n in counts.items() if n > 1)
    if repeated:
        problems.append("repeated: " + ", ".join(f"{image_tag(k)} x{counts[k]}" for k in repeated))
    extra = sorted(k for k in counts if not 1 <= k <= num_images)
    if extra:
        problems.append(f"no image for {_tags(extra)} ({num_images} image(s) given)")
    missing = [k for k in expected if k not in counts]
    if missing:
        problems.append(f"missing {_tags(missing)}")
    if not problems:
        problems.append(
            "out of order (tag k must be the k-th tag: images are used in order of appearance)"
        )
    raise ValueError(
        f"Phi3VProcessor: {where} has the image tags [{_tags(found)}] for {num_images} "
        f"image(s), expected [{_tags(expected)}], each exactly once and in this order: "
        f"{'; '.join(problems)}. Text: {shown}"
    )


def image_tag_chunks(text: str, num_images: int, where: str = "the prompt") -> list[tuple[int, int]]:
    """How a prompt with images becomes ids, as in the official processor: the (start, end)
    character spans of the text chunks around the `<|image_k|>` tags (checked: 1..num_images, in
    order). Each chunk is tokenized on its own (so each starts with BOS, empty chunks included),
    and chunk k (0-based) is followed by image k+1's positions (`image_positions`). The one
    expansion routine of the processor and of the recipes' training tokenisation."""
    check_image_tags(text, num_images, where)
    spans, start = [], 0
    for tag in IMAGE_TAG_RE.finditer(text):
        spans.append((start, tag.start()))
        start = tag.end()
    return spans + [(start, len(text))]


def image_positions(k: int, num_tokens: int) -> list[int]:
    """The ids of image k's (1-based) positions: -k, once per image token (the model puts the
    image's features there)."""
    return [-k] * num_tokens

class _ImageTags(Sequence):
    """`<|image_1|>`, `<|image_2|>`, ... as a read-only sequence, without building a long list."""

    _LIMIT = 1_000_000

    def __len__(self) -> int:
        return self._LIMIT

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [image_tag(k + 1) for k in range(*index.indices(self._LIMIT))]
        if not -self._LIMIT <= index < self._LIMIT:
            raise IndexError(index)
        return image_tag(index % self._LIMIT + 1)


class Phi3VProcessor(ProcessorMixin):
    r"""Phi-3.5-vision processor: `Phi3VImageProcessor` + the Phi-3.5 tokenizer.

    Args:
        image_processor (`Phi3VImageProcessor`): turns images into crops and token counts.
        tokenizer (`TokenizersBackend`): the Phi-3.5 tokenizer (`phi3v.tiny_tokenizer.build_tokenizer`
            builds a tiny one).
        chat_template (`str`, *optional*): overrides the tokenizer's chat template in
            `apply_chat_template`.

    Saving writes the released layout: `preprocessor_config.json` (the image processor's settings
    with `"processor_class": "Phi3VProcessor"` and the auto_map), `tokenizer.json`,
    `tokenizer_config.json` and `special_tokens_map.json` (special tokens as released), plus
    transformers 5's `chat_template.jinja`; no `processor_config.json`, which would hide the
    processor from `AutoProcessor` in any process that has not imported this package.
    """

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | TensorType | None = TensorType.PYTORCH,
    ) -> BatchFeature:
        """Tokenize a prompt, expanding `<|image_k|>` tags into image positions.

        Without images: the plain tokenizer call on `text` (a string or a list of strings;
        padding, truncation and max_length apply). The text must then contain no image tag.

        With images (one image or a list, in tag order): `text` must be one prompt string with
        the tags `<|image_1|>` .. `<|image_M|>`. Returns `input_ids` and `attention_mask` as
        int64 tensors of shape (1, L) and the image processor's `pixel_values` and
        `image_sizes`. As in the official code, padding, truncation and max_length do not apply
        to such a prompt (truncating could cut an image block); batching is the collator's job.
        """
        if text is None:
            raise ValueError(
                "Phi3VProcessor: `text` is required (the prompt, with <|image_k|> tags for images)"
            )
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            # A text-only row: `images=[]` is accepted like None so callers need no special case.
            if isinstance(text, str):
                check_image_tags(text, 0)
            else:
                for i, prompt in enumerate(text):
                    if isinstance(prompt, str):
                        check_image_tags(prompt, 0, where=f"text[{i}]")
            encoded = self.tokenizer(
                text,
                padding=padding,
                truncation=truncation,
                max_length=max_length,
                return_tensors=return_tensors,
            )
            return BatchFeature(data=dict(encoded))

        if not isinstance(text, str):
            raise ValueError(
                "Phi3VProcessor: with images, `text` must be a single prompt string (got "
                f"{type(text).__name__}); call the processor once per prompt and let the "
                "collator pad the batch"
            )
        if return_tensors not in (None, "pt", TensorType.PYTORCH):
            raise ValueError(
                'Phi3VProcessor: with images only return_tensors="pt" is supported, got '
                f"{return_tensors!r}"
            )
        if truncation or max_length is not None:
            logger.warning_once(
                "Phi3VProcessor: truncation and max_length are ignored for a prompt with images "
                "(as in the official processor): truncating could cut an image block; shorten "
                "the text instead."
            )
        # Validated before the (slow) image processing: fail fast on bad data.
        spans = image_tag_chunks(text, len(images))
        image_inputs = self.image_processor(list(images), return_tensors="pt")
        counts = [int(n) for n in image_inputs["num_img_tokens"]]

        # Quirk kept from the official code: each chunk, empty ones included, is a separate normal
        # tokenizer call, so it starts with BOS and gets its own leading "▁".
        chunk_ids = self.tokenizer([text[a:b] for a, b in spans], padding=False, truncation=False)["input_ids"]
        ids: list[int] = []
        for k, chunk in enumerate(chunk_ids):
            ids += chunk + (image_positions(k + 1, counts[k]) if k < len(counts) else [])
        input_ids = torch.tensor([ids], dtype=torch.long)
        return BatchFeature(
            data={
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "pixel_values": image_inputs["pixel_values"],
                "image_sizes": image_inputs["image_sizes"],
            }
        )

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str:
        """The prompt for a conversation: `<|role|>\\n` + content + `<|end|>\\n` per message.

        Messages carry their `<|image_k|>` tags in the content. Only the string is produced; pass
        it with the images to `processor(prompt, images)`, which expands the tags (tokenizing
        here would leave the tags as text).
        """
        if tokenize:
            raise ValueError(
                "Phi3VProcessor.apply_chat_template returns the prompt string only; tokenize it "
                "with processor(prompt, images), which expands the <|image_k|> tags"
            )
        if chat_template is None:
            chat_template = self.chat_template
        if isinstance(chat_template, dict):
            chat_template = chat_template.get("default")
        return self.tokenizer.apply_chat_template(
            conversation,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )

    @property
    def img_tokens(self) -> "_ImageTags":
        """The image tags by position: `img_tokens[k]` is `<|image_{k+1}|>` (the official
        processor's attribute, which vLLM's Phi-3-V support reads)."""
        return _ImageTags()

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        """Feature positions of an image of this size (official API, used by vLLM)."""
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height)

    @property
    def model_input_names(self) -> list[str]:
        # ["input_ids", "attention_mask", "pixel_values", "image_sizes"]
        names = [*self.tokenizer.model_input_names, *self.image_processor.model_input_names]
        return list(dict.fromkeys(names))

    def save_pretrained(
        self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any
    ) -> list[str]:
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        # transformers 5 keeps the image processor only inside processor_config.json; the released
        # checkpoint (and the tools reading it) has it in preprocessor_config.json, together with
        # the processor class that AutoProcessor looks up.
        legacy = self.image_processor.to_dict()
        legacy["processor_class"] = type(self).__name__
        legacy["auto_map"] = released_auto_map(legacy.get("auto_map"))  # 3.5 or 128k layout
        path = os.path.join(save_directory, IMAGE_PROCESSOR_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(legacy, indent=2, sort_keys=True) + "\n")
        _write_official_tokenizer_config(save_directory, self.tokenizer)
        # No processor_config.json, as in the release: transformers' AutoProcessor reads that file
        # first, and a bare {"processor_class": "Phi3VProcessor"} without our package imported
        # resolves to nothing, so it never reaches the auto_map in preprocessor_config.json and
        # returns a plain tokenizer (vLLM then refuses the directory). Everything the processor
        # needs is in preprocessor_config.json and the tokenizer files; one source of truth also
        # means an edit of the released file is obeyed here as by other tools.
        processor_config = os.path.join(save_directory, "processor_config.json")
        if os.path.isfile(processor_config):
            os.remove(processor_config)
        files = [f for f in files if os.path.basename(str(f)) != "processor_config.json"]
        return [*files, path]

    @classmethod
    def _get_arguments_from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        processor_dict: dict | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        # The base class resolves the sub-processors through AutoImageProcessor/AutoTokenizer,
        # which only know these classes after registration and which, for a directory whose
        # tokenizer_config.json says "LlamaTokenizer" (the released one), rebuild the tokenizer
        # pipeline and change the ids (see phi3v/tiny_tokenizer.py). The classes are fixed for this
        # model, so load them directly: the image processor from processor_config.json (or the
        # released preprocessor_config.json), the tokenizer from tokenizer.json as is.
        # Overrides such as `from_pretrained(path, num_crops=16)` go to the image processor only
        # (the tokenizer would store them in its init kwargs and save them); hub arguments and
        # the rest go to both, as in the base class (the image processor ignores unknown keys).
        image_keys = set(getattr(Phi3VImageProcessor.valid_kwargs, "__annotations__", {}))
        tokenizer_kwargs = {key: value for key, value in kwargs.items() if key not in image_keys}
        path = pretrained_model_name_or_path
        image_processor = Phi3VImageProcessor.from_pretrained(path, **kwargs)
        tokenizer = TokenizersBackend.from_pretrained(path, **tokenizer_kwargs)
        return [image_processor, tokenizer]
