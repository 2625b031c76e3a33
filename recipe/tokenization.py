"""A conversation (or a preference pair) as token ids and labels, and its length in tokens.

`tokenize_conversation` applies the chat template once to the whole conversation, numbers
`<|image_k|>` tags across it, and labels only the assistant answers and their `<|end|>`. The
ids are exactly the official processor's (BOS after each image block included). An image's
token count comes from its size alone (`image_tokens`), so lengths are known from image headers
without decoding a pixel. `TokenCount` is an example's measured length (`count_tokens`), kept on
the conversation by `recipe.validation.validate` for length grouping and evaluation order.
`tokenize_pair` gives a preference pair's prompt and both answers, labelled as SFT labels them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from phi3v.image_processing_phi3v import hd_image_size, num_image_tokens
from phi3v.processing_phi3v import IMAGE_TAG_RE, image_positions, image_tag, image_tag_chunks

from .records import Conversation, PreferencePair, image_size

__all__ = [
    "IGNORE_INDEX",
    "build_messages",
    "tokenize_conversation",
    "TokenizedConversation",
    "image_token_counts",
    "image_tokens",
    "conversation_length",
    "TokenCount",
    "count_tokens",
    "TokenizedPair",
    "tokenize_pair",
    "pair_length",
]

IGNORE_INDEX = -100
END_TOKEN = "<|end|>"


# -- conversation -> tokens ----------------------------------------------------------------


def build_messages(conversation: Conversation, for_generation: bool = False) -> list[dict[str, str]]:
    """Chat messages with `<|image_k|>` tags numbered across the whole conversation.

    A system message (`conversation.system`) comes first. With `for_generation`, the last
    assistant answer is left out (it is what the model must
    produce). Raises ValueError when a turn's own tags do not match its images.
    """
    messages, first = [], 1
    if conversation.system:
        messages.append({"role": "system", "content": conversation.system})
    turns = conversation.turns
    for t, turn in enumerate(turns):
        numbers = list(range(first, first + len(turn.images)))
        found = [int(k) for k in IMAGE_TAG_RE.findall(turn.user)]
        if found:
            if found != numbers:
                expected = ", ".join(image_tag(k) for k in numbers) or "no tags"
                raise ValueError(
                    f"turn {t} has {len(turn.images)} image(s) and tags "
                    f"{', '.join(image_tag(k) for k in found)}; expected {expected} "
                    "(numbered across the conversation, in order)"
                )
            user = turn.user
        else:
            user = "".join(f"{image_tag(k)}\n" for k in numbers) + turn.user
        if IMAGE_TAG_RE.search(turn.assistant):
            raise ValueError(f"turn {t}: the assistant answer contains an image tag")
        first += len(turn.images)
        messages.append({"role": "user", "content": user})
        if not (for_generation and t == len(turns) - 1):
            # Leading whitespace would be swallowed by <|assistant|> (rstrip=True) in the
            # official tokenization anyway; dropping it keeps label spans exact.
            messages.append({"role": "assistant", "content": turn.assistant.lstrip()})
    return messages


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    num_image_tokens: list[int]


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """`tokenizer(text, add_special_tokens=...)["input_ids"]`, through the fast tokenizer's Rust
    backend when there is one: the same ids without transformers' per-call wrapping, which is
    most of the cost of tokenizing the short pieces of a conversation (validation tokenizes
    every example before the first step)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if (not getattr(tokenizer, "is_fast", False) or backend is None or getattr(tokenizer, "split_special_tokens", False)
            or backend.truncation is not None or backend.padding is not None or backend.encode_special_tokens):
        # (what the plain call would switch off or on first)
        return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return backend.encode(text, add_special_tokens=add_special_tokens).ids


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_conversation(
    conversation: Conversation,
    tokenizer,
    image_token_counts: Sequence[int],
    for_generation: bool = False,
) -> TokenizedConversation:
    """Ids and labels of a conversation, given the token count of each of its images.

    The chat template is applied once. The text is then cut at image tags (each piece starts
    with BOS, as in the official processor) and at answer boundaries, which always sit next
    to a special token, so the pieces tokenize exactly like the whole. Labels cover each
    answer and its `<|end|>`; everything else is IGNORE_INDEX.
    """
    messages = build_messages(conversation, for_generation=for_generation)
    text = _render(tokenizer, messages, add_generation_prompt=for_generation)
    # Character spans of the answers: the template is prefix-consistent, so the answer of
    # message m starts where the rendering of messages[:m] plus the generation prompt ends.
    spans = []
    for m, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:m], add_generation_prompt=True))
        end = start + len(message["content"])
        if text[start:end] != message["content"] or not text.startswith(END_TOKEN, end):
            raise ValueError(
                "the tokenizer's chat template does not render an answer as '<|assistant|>\\n' + "
                "answer + '<|end|>'; labels cannot be placed"
            )
        spans.append((start, end + len(END_TOKEN)))

    # The processor's expansion (phi3v.processing_phi3v.image_tag_chunks), with each chunk further
    # cut at answer boundaries to place the labels.
    chunks = image_tag_chunks(text, len(image_token_counts), where="the conversation")
    input_ids: list[int] = []
    labels: list[int] = []
    for k, (chunk_start, chunk_end) in enumerate(chunks):
        # Within one chunk: BOS once at its start (the chunk's own tokenizer call), answers labelled.
        cuts = sorted({chunk_start, chunk_end, *[p for s, e in spans for p in (s, e) if chunk_start < p < chunk_end]})
        for i, (a, b) in enumerate(zip(cuts, cuts[1:] or [chunk_end])):
            piece = text[a:b]
            ids = _encode(tokenizer, piece, add_special_tokens=(i == 0)) if (piece or i == 0) else []
            is_answer = any(s <= a and b <= e for s, e in spans) and a < b
            input_ids += ids
            labels += ids if is_answer else [IGNORE_INDEX] * len(ids)
        if k < len(image_token_counts):
            input_ids += image_positions(k + 1, image_token_counts[k])
            labels += [IGNORE_INDEX] * image_token_counts[k]
    return TokenizedConversation(input_ids, labels, list(image_token_counts))


def image_tokens(width: int, height: int, num_crops: int) -> int:
    """Image tokens of a width x height image at `num_crops` (the one size -> count rule)."""
    return num_image_tokens(*hd_image_size(width, height, num_crops))


def image_token_counts(images: Iterable[Any], num_crops: int) -> list[int]:
    """Token count of each image from its size alone (header read, no pixel decoding)."""
    return [image_tokens(*image_size(image), num_crops) for image in images]


def conversation_length(conversation: Conversation, tokenizer, num_crops: int, for_generation: bool = False) -> int:
    counts = image_token_counts(conversation.images, num_crops)
    return len(tokenize_conversation(conversation, tokenizer, counts, for_generation).input_ids)


# -- lengths -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCount:
    """An example's length, measured once by `validate` at its --num_crops (`count_tokens`).

    Length grouping and evaluation ordering reuse it instead of tokenising again and reading
    every image header again; the parts say what costs what when an example is too long.
    """

    text: int  # tokens of the rendered conversation without the image positions
    images: tuple[int, ...]  # tokens of each image, in order
    image_sizes: tuple[tuple[int, int], ...]  # (width, height) of each image, to price other --num_crops

    @property
    def total(self) -> int:
        return self.text + sum(self.images)

    def at_num_crops(self, num_crops: int) -> int:
        """The length this example would have at another --num_crops."""
        return self.text + sum(image_tokens(w, h, num_crops) for w, h in self.image_sizes)

    def describe(self, num_crops: int) -> str:
        if not self.images:
            return f"{self.text} text tokens, no image"
        per_image = ", ".join(str(n) for n in self.images)
        return f"{self.text} text tokens + image tokens {per_image} per image at --num_crops {num_crops}"


def count_tokens(
    conversation: Conversation,
    tokenizer,
    image_token_counts: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
    measure: Callable[[Conversation, list[int]], int] | None = None,
) -> TokenCount:
    """The `TokenCount` of an example whose images have these token counts and sizes: its
    tokenized length, or `measure(conversation, image_token_counts)` when the example's length
    is not the conversation's own (a preference pair: prompt + chosen + rejected). Raises
    ValueError when the conversation's tags do not match its images."""
    counts = list(image_token_counts)
    length = (measure(conversation, counts) if measure is not None
              else len(tokenize_conversation(conversation, tokenizer, counts).input_ids))
    return TokenCount(length - sum(counts), tuple(counts), tuple(image_sizes))


# -- preference pairs ----------------------------------------------------------------------


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the answer and its <|end|>, as SFT labels them
    rejected_ids: list[int]
    num_image_tokens: list[int]

    def __len__(self) -> int:
        """Tokens of the shared-prefix row: prompt once, both answers."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def _split_last_answer(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(everything before the last labelled span, that span): the prompt and the last answer."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return input_ids[:start], input_ids[start : end + 1]


def tokenize_pair(pair: PreferencePair, tokenizer, image_token_counts: Sequence[int]) -> TokenizedPair:
    """Prompt, chosen and rejected ids, given the token count of each image.

    Both answers come from `tokenize_conversation` exactly as SFT builds and labels them, so
    prompt + chosen is `tokenize_conversation(pair.conversation)` up to the last answer's
    `<|end|>` (what follows it, a newline and `<|endoftext|>`, is never labelled). Raises
    ValueError when the two answers do not share one prompt (cannot happen with a template
    that renders the prompt before the answer).
    """
    chosen = tokenize_conversation(pair.conversation, tokenizer, image_token_counts)
    rejected = tokenize_conversation(pair.rejected_conversation(), tokenizer, image_token_counts)
    prompt, chosen_ids = _split_last_answer(chosen.input_ids, chosen.labels)
    rejected_prompt, rejected_ids = _split_last_answer(rejected.input_ids, rejected.labels)
    if rejected_prompt != prompt:
        raise ValueError(
            f"{pair.where or pair.id}: the chosen and rejected answers do not follow the same prompt tokens"
        )
    return TokenizedPair(prompt, chosen_ids, rejected_ids, list(image_token_counts))


def pair_length(pair: PreferencePair, tokenizer, image_token_counts: Sequence[int]) -> int:
    """Tokens of a pair's shared-prefix row: prompt + chosen + rejected (images included)."""
    return len(tokenize_pair(pair, tokenizer, list(image_token_counts)))
