"""A tiny Phi-3.5-vision tokenizer for tests and demos, trained in-process (format:
docs/checkpoint_format.md §1). Production code reads the released tokenizer; the facts it needs
of it (additional special tokens, end tokens) are in `phi3v.processing_phi3v`.

The released tokenizer is Llama's 32000-token byte-fallback BPE plus 45 added tokens
(`<|endoftext|>` = 32000 ... `<|image|>` = 32044). Tests, the demo and the tiny random model
need a tokenizer without network access, so `build_tokenizer` trains a small one from a
built-in English corpus in a few milliseconds and wires it up exactly like the released one:

    >>> tok = build_tokenizer()
    >>> len(tok), tok.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|image|>"])
    (1069, [1024, 1034, 1068])
    >>> tok("<|user|>\\nHi<|end|>").input_ids[:4]   # BOS, <|user|>, "▁", "<0x0A>"
    [1, 1034, 353, 13]

What is copied from the released files, because model inputs depend on it:
- ids 0/1/2 = `<unk>`/`<s>`/`</s>`, then the 256 byte-fallback tokens `<0x00>`..`<0xFF>`
  (so "\\n" is `<0x0A>` = 13, as in Llama), then the learned merges;
- the 45 added tokens in the official order, at base + the official offset (official base
  32000, here `vocab_size`), with the official flags (`rstrip` swallows the whitespace after
  `<|assistant|>`, `<|image|>`, the placeholders and `</s>`);
- normalizer Prepend("▁") + Replace(" ", "▁") and no pre-tokenizer: every text segment
  between two special tokens gets its own leading "▁" (the well-known extra "▁" after
  `<|user|>`), BOS added by the post-processor, no EOS;
- eos = pad = `<|endoftext|>`, the additional special tokens `<|system|>`, `<|end|>`,
  `<|user|>`, `<|end|>` (sic), and the chat template.

Digits are never merged (Llama splits numbers into single digits) and newlines, tabs and
non-ASCII characters outside the corpus go through byte fallback.
"""

from __future__ import annotations

import itertools
import json
import re
import string

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from .processing_phi3v import ADDITIONAL_SPECIAL_TOKENS

__all__ = [
    "ADDED_TOKENS",
    "BASE_SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "DEFAULT_CORPUS",
    "DEFAULT_VOCAB_SIZE",
    "MODEL_MAX_LENGTH",
    "OFFICIAL_BASE_VOCAB_SIZE",
    "RSTRIP_TOKENS",
    "SPECIAL_TOKENS",
    "build_tokenizer",
]

DEFAULT_VOCAB_SIZE = 1024
# Released tokenizer: 32000 base tokens, added tokens at 32000 + offset.
OFFICIAL_BASE_VOCAB_SIZE = 32000
# Released tokenizer_config.json; equals the model's max_position_embeddings.
MODEL_MAX_LENGTH = 131072

BASE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

# The released added tokens, in id order (32000 + index). Only the named ones are ever produced
# by the chat template; the placeholders reserve ids and are kept so that offsets match (the
# names of the 33 gap placeholders, 7..39, are written from memory of the released files: they
# never occur in prompts, only their count and flags matter).
ADDED_TOKENS = [
    "<|endoftext|>",  # 32000: eos and pad
    "<|assistant|>",  # 32001
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",  # 32006
    "<|end|>",  # 32007: end of every chat turn
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",  # 32010
    *[f"<|placeholder{i}|>" for i in range(7, 40)],  # 32011..32043
    "<|image|>",  # 32044: reserved, the processor uses negative ids instead
]

SPECIAL_TOKENS = BASE_SPECIAL_TOKENS + ADDED_TOKENS

# Official added-token flags: these swallow the whitespace that follows them, so
# "<|assistant|>\n" is one token while "<|end|>\n" is `<|end|>` + "▁" + "<0x0A>".
RSTRIP_TOKENS = frozenset(
    ["</s>", "<|assistant|>", "<|image|>"]
    + [token for token in ADDED_TOKENS if token.startswith("<|placeholder")]
)

# Same output as the released template: `<|role|>\n` + content + `<|end|>\n` per message, and
# `<|assistant|>\n` for add_generation_prompt unless the last message already is the assistant's.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- endif -%}"
)

_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
# Every printable ASCII character is a token (as in Llama), whatever the corpus holds; other
# whitespace than the space is not and falls back to bytes ("\n" -> <0x0A>).
_INITIAL_ALPHABET = [c for c in string.printable if c not in string.whitespace] + ["▁"]

# Word lists for the built-in corpus: the vocabulary of the recipes' tasks (document VQA,
# hateful memes, NLVR2, UCF-101 video classes), so that tiny-model prompts tokenize into a
# realistic mix of whole words, sub-words and bytes.
_VIDEO_CLASSES = [
    "ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam", "BandMarching",
    "BaseballPitch", "Basketball", "BenchPress", "Biking", "Billiards", "BlowDryHair",
    "Bowling", "BoxingPunchingBag", "BreastStroke", "BrushingTeeth", "CleanAndJerk", "CliffDiving",
    "CuttingInKitchen", "Diving", "Drumming", "Fencing", "FrisbeeCatch", "GolfSwing", "Haircut",
    "HandstandWalking", "HeadMassage", "HighJump", "HorseRace", "HorseRiding", "HulaHoop",
    "IceDancing", "JavelinThrow", "JugglingBalls", "JumpRope", "Kayaking", "Knitting",
    "LongJump", "Lunges", "MilitaryParade", "Mixing", "MoppingFloor", "Nunchucks",
    "ParallelBars", "PizzaTossing", "PlayingGuitar", "PlayingPiano", "PlayingViolin",
    "PoleVault", "PommelHorse", "PullUps", "Punch", "PushUps", "Rafting", "RockClimbingIndoor",
    "RopeClimbing", "Rowing", "SalsaSpin", "ShavingBeard", "Skiing", "SkyDiving", "SoccerPenalty",
    "SumoWrestling", "Surfing", "Swing", "TableTennisShot", "TaiChi", "TennisSwing",
    "TrampolineJumping", "Typing", "UnevenBars", "VolleyballSpiking", "WalkingWithDog",
    "WritingOnBoard", "YoYo",
]
_DOCUMENT_FIELDS = [
    "date", "title", "total amount", "invoice number", "name of the company", "address",
    "telephone number", "fax number", "signature", "subject", "page number", "heading",
    "percentage", "year", "price", "budget", "account number", "zip code", "email address",
    "author", "department", "chairman", "president", "director", "secretary", "meeting",
    "agenda", "location", "time", "second paragraph", "table", "figure", "chart", "column",
    "row", "caption", "footnote", "reference", "product code", "quantity", "balance",
]
_DOCUMENTS = [
    "document", "letter", "memo", "invoice", "receipt", "report", "form", "page", "table",
    "brochure", "advertisement", "newspaper", "schedule", "menu", "contract", "certificate",
]
_OBJECTS = [
    "dog", "dogs", "cat", "cats", "bird", "birds", "car", "cars", "person", "people", "man",
    "woman", "child", "children", "tree", "trees", "house", "building", "boat", "horse",
    "bottle", "bottles", "glass", "cup", "table", "chair", "window", "door", "ball", "book",
    "phone", "computer", "screen", "street", "road", "river", "mountain", "beach", "flower",
    "flowers", "animal", "animals", "penguin", "penguins", "monkey", "bus", "train", "plane",
]
_ADJECTIVES = [
    "red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple", "small",
    "large", "big", "little", "old", "new", "young", "happy", "funny", "offensive", "hateful",
    "mean", "kind", "left", "right", "two", "three", "four", "exactly", "least", "more", "fewer",
]
_SENTENCES = """\
What is shown in this image? Describe the image in detail.
Answer the question using a single word or phrase.
Is this meme hateful? Answer yes or no. The answer is yes. The answer is no.
The meme shows a picture with some text written on top of it.
Classify the video into one of the following classes. The video shows a person doing an activity.
Look at the frames of the video and answer with the name of the class.
Here are two images. Is the following statement true or false about the images?
The left image contains exactly two dogs and the right image contains one dog.
There are at least three birds in total across both images.
Question: what is written at the top of the document? Answer: the title of the report.
Read the text in the image carefully before you answer the question.
The quick brown fox jumps over the lazy dog while the children watch from the window.
Please provide a short description of what you see, including colors, objects and people.
This is a photograph of a street in a city, with cars, buses and people walking.
The model was trained on documents, charts, tables, diagrams, screenshots and natural images.
How many people are in the picture? There are four people standing next to each other.
Which year had the highest number of sales according to the chart?
What is the value in the third column of the second row of the table?
The assistant answered the user's question correctly and politely.
You are a helpful assistant. The user asks a question about an image and you answer it.
Thank you for the information; we will send the signed contract by Monday, January 15.
Dear Sir or Madam, please find enclosed the invoice for the services provided last month.
The meeting of the board of directors will be held on Friday at the main office.
Total: $1,234.56 (including tax). Date: 12/31/2019. Ref. No. 0042-A.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 100 2020 2021 2022 2023 2024 3.14 99%
Days: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
Months: January, February, March, April, May, June, July, August, September, October,
November, December.
Punctuation: comma, period; colon: semicolon! question? quote "word" 'word' (paren)
[bracket] {brace} a-b a/b a_b a+b=c 50% #1 @home & more * ~ ^ | < > \\ `code`
A small model can run on a laptop without a graphics card, but it learns much more slowly.
Training uses a learning rate schedule with warmup, weight decay and gradient clipping.
Each example has an image, a question from the user and an answer from the assistant.
The evaluation script compares every prediction with the reference answers and reports the accuracy.
If the answer is not in the document, say that the information cannot be found.
The photo was taken at night, so the colors are dark and the lights look very bright.
A group of friends is sitting around a wooden table, eating pizza and drinking coffee.
Two players are running after the ball on a green field while the crowd is cheering.
The weather forecast says it will rain tomorrow morning, followed by sunshine in the afternoon.
She opened the box, took out a letter and started reading it aloud to her brother.
He walked into the kitchen, washed his hands and began cutting vegetables for dinner.
Our company reported strong growth in revenue, profit and customer satisfaction this quarter.
Please sign and return one copy of this agreement to our office within thirty days.
The figure above illustrates the relationship between temperature and pressure.
According to the survey, most respondents prefer working from home at least twice a week.
Scientists believe that regular exercise improves memory, sleep quality and overall health.
The museum is open every day except holidays; admission for students is free.
Instructions: mix the flour, sugar and eggs, then bake for twenty minutes at high heat.
In summary, the proposed method is simple, fast and achieves better results than previous work.
The image is blurry, which makes it difficult to recognize the small characters on the sign.
Note that some memes combine harmless pictures with harmful captions, or the other way around.
Both statements can be true at the same time, but only one of them describes the picture.
Choose the best option: (A) cat, (B) dog, (C) bird, (D) none of the above.
"""


def _default_corpus() -> list[str]:
    lines = _SENTENCES.splitlines()
    lines.append("Classes: " + ", ".join(_VIDEO_CLASSES) + ".")
    # UCF-101 class names also appear split into words ("Apply Eye Makeup").
    lines.append(" ".join(re.sub(r"(?<!^)([A-Z])", r" \1", name) for name in _VIDEO_CLASSES))
    # Each template once per list entry: enough repetition for task words to become whole
    # tokens without letting a few templates dominate the merges.
    documents = itertools.cycle(_DOCUMENTS)
    lines += [f"What is the {field} on the {next(documents)}?" for field in _DOCUMENT_FIELDS]
    adjectives = itertools.cycle(_ADJECTIVES)
    lines += [f"Is there a {next(adjectives)} {obj} in the image? Yes." for obj in _OBJECTS]
    return lines


DEFAULT_CORPUS = _default_corpus()


def _train_base_vocab(
    corpus: list[str], vocab_size: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn `vocab_size - 259` tokens and their merges; return the Llama-ordered vocab."""
    trainer_tokenizer = Tokenizer(BPE(unk_token="<unk>"))
    trainer_tokenizer.normalizer = _normalizer()
    # Training only: cut at every "▁" (a word keeps its leading "▁", as in sentencepiece),
    # around every digit and punctuation mark, so no merge spans two words, two digits or a word
    # and a punctuation mark. The final tokenizer has no pre-tokenizer (like the released one): the
    # merges simply never match across those boundaries.
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("▁", behavior="merged_with_next"),
            pre_tokenizers.Digits(individual_digits=True),
            # Like sentencepiece's split by Unicode script: no "image?" or "Yes," tokens.
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    trainer = BpeTrainer(
        # The 256 byte tokens are inserted afterwards, so the trainer learns the rest.
        vocab_size=vocab_size - len(_BYTE_TOKENS),
        special_tokens=BASE_SPECIAL_TOKENS,
        initial_alphabet=_INITIAL_ALPHABET,
        show_progress=False,
    )
    # Newlines/tabs are replaced so they stay out of the alphabet (byte fallback, as in Llama).
    trainer_tokenizer.train_from_iterator(
        (line.replace("\n", " ").replace("\t", " ").replace("\r", " ") for line in corpus), trainer
    )
    model = json.loads(trainer_tokenizer.to_str())["model"]
    learned = sorted(model["vocab"].items(), key=lambda item: item[1])
    if len(learned) != vocab_size - len(_BYTE_TOKENS):
        raise ValueError(
            f"build_tokenizer: the corpus only yields {len(learned) + len(_BYTE_TOKENS)} base "
            f"tokens, fewer than vocab_size={vocab_size}; pass more (or more varied) text, or a "
            "smaller vocab_size"
        )
    # Llama layout: <unk> <s> </s>, the 256 byte tokens, then the learned tokens in merge order.
    vocab = {token: i for i, token in enumerate(BASE_SPECIAL_TOKENS + _BYTE_TOKENS)}
    for token, _ in learned[len(BASE_SPECIAL_TOKENS) :]:
        vocab[token] = len(vocab)
    merges = [tuple(merge) for merge in model["merges"]]
    return vocab, merges


def _normalizer() -> normalizers.Normalizer:
    # Released tokenizer.json: applied to each segment between added tokens separately.
    return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])


def build_tokenizer(
    corpus: list[str] | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> TokenizersBackend:
    """Train a tiny tokenizer that behaves like the released Phi-3.5-vision tokenizer.

    Args:
        corpus: training sentences; defaults to `DEFAULT_CORPUS` (task-like English).
        vocab_size: size of the base vocabulary (3 specials + 256 bytes + learned tokens); the 45
            added tokens follow at `vocab_size + offset` (official: 32000 + offset), so the
            tokenizer has `vocab_size + 45` tokens and a model needs at least that many rows.

    Deterministic: the same corpus and vocab_size give the same ids. The result saves with
    `save_pretrained` and reloads with `AutoTokenizer.from_pretrained` to identical ids.
    """
    if corpus is None:
        corpus = DEFAULT_CORPUS
    if isinstance(corpus, str) or not all(isinstance(line, str) for line in corpus):
        raise TypeError(
            "build_tokenizer: corpus must be a list of strings (one sentence or paragraph each)"
        )
    # Room for the specials, the bytes, the alphabet and at least one merge.
    min_size = len(BASE_SPECIAL_TOKENS) + len(_BYTE_TOKENS) + len(_INITIAL_ALPHABET) + 1
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(
            f"build_tokenizer: vocab_size must be an int >= {min_size}, got {vocab_size!r}"
        )

    vocab, merges = _train_base_vocab(list(corpus), vocab_size)
    backend = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    backend.normalizer = _normalizer()
    backend.pre_tokenizer = None
    # Inverse of the normalizer, then bytes back to text; Strip drops the one "▁" that the
    # normalizer put in front of the first segment.
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    # normalized=False: added tokens are matched on the raw text, before the normalizer runs.
    backend.add_special_tokens(
        [
            AddedToken(
                token, rstrip=token in RSTRIP_TOKENS, lstrip=False, normalized=False, special=True
            )
            for token in SPECIAL_TOKENS
        ]
    )

    # Why TokenizersBackend and not LlamaTokenizer: in transformers 5.x, LlamaTokenizer (and its
    # alias LlamaTokenizerFast) rebuilds its own pipeline on load (no normalizer, a Metaspace
    # pre-tokenizer with prepend_scheme="first") instead of using tokenizer.json, which drops the
    # "▁" after every special token ("<|user|>\n" becomes [<|user|>, <0x0A>] instead of
    # [<|user|>, ▁, <0x0A>]) and changes the ids the released model was trained on.
    # TokenizersBackend (= PreTrainedTokenizerFast) keeps tokenizer.json as is; save_pretrained
    # records "TokenizersBackend" and AutoTokenizer loads it back unchanged. (transformers 5.x
    # itself lists "phi3_v" among the models whose hub "LlamaTokenizer" must be loaded this way.)
    return TokenizersBackend(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(ADDITIONAL_SPECIAL_TOKENS),
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
        # The model takes no token_type_ids.
        model_input_names=["input_ids", "attention_mask"],
        # Right padding for training batches; generation code pads left explicitly.
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
