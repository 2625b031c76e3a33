"""Scoring generated answers: exact match, normalised exact-match accuracy and DocVQA's ANLS.

Each metric takes the decoded generations (special tokens already removed by the caller)
and the reference answers, one entry per example, and returns the mean score in [0, 1].

Accuracy (Hateful Memes yes/no, NLVR2 true/false, UCF-101 class names) is exact match
after `normalize_answer`; a reference may list several acceptable answers.

ANLS (Average Normalized Levenshtein Similarity; Biten et al. 2019, "Scene Text Visual
Question Answering", the metric of the DocVQA Robust Reading Competition) gives partial
credit for answers that are nearly right, e.g. an OCR slip:

    NL(p, r)  = levenshtein(p, r) / max(len(p), len(r))          (0 when both are empty)
    s(p, r)   = 1 - NL(p, r)   if NL(p, r) < threshold   else 0
    score     = max over the example's references r of s(p, r)
    ANLS      = mean of the scores over the examples           (threshold = 0.5)

Before comparing, prediction and references are normalised as the RRC evaluation script
does: lower-cased, leading/trailing whitespace stripped, internal whitespace runs
collapsed to one space (`" ".join(s.strip().lower().split())`). So ANLS is
case-insensitive and insensitive to extra whitespace, but sensitive to punctuation and to
missing spaces ("coca cola" vs "cocacola" is one edit).

Where the official script differs from the published definition, this module follows the
definition, and the differences are small:
  * The script keeps 1 - NL when it is >= threshold, so NL exactly 0.5 scores 0.5 there
    (e.g. "ab" vs "ac"); the definition, and this module, give 0.
  * The script divides by the lengths of the *unnormalised* strings; this module divides
    by the lengths of the strings it actually compared, so NL stays within [0, 1].
"""

from __future__ import annotations

import importlib
import os
import sys
import unicodedata
from typing import Callable, Sequence

from .errors import FlagError

__all__ = [
    "normalize_answer",
    "accuracy",
    "exact_match",
    "levenshtein",
    "normalize_anls",
    "anls_score",
    "anls",
    "ANLS_THRESHOLD",
    "METRICS",
    "score_function",
]

ANLS_THRESHOLD = 0.5  # the value used by DocVQA, InfographicVQA and ST-VQA leaderboards


# -- accuracy --------------------------------------------------------------------------------


def _is_edge_junk(char: str) -> bool:
    # Unicode punctuation (categories Pc, Pd, Pe, Pf, Pi, Po, Ps) covers ASCII . , ! ? " '
    # as well as typographic quotes “ ” ‘ ’ « » and brackets; symbols (+ $ % ...) are not
    # punctuation, so "c++" or "100%" keep their meaning.
    return char.isspace() or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """Canonical form of a short classification answer, for exact-match accuracy.

    Exactly these steps, in order:
      1. case-fold (`str.casefold`, a stronger `lower()`: "YES" -> "yes", "ß" -> "ss");
      2. remove every whitespace or Unicode punctuation character (quotes, brackets,
         periods, commas, ! ? : ; ...) from both ends, so `'"Yes."'`, `"(no)"` and
         `"yes!"` become "yes"; punctuation inside the answer is kept ("o'clock");
      3. collapse each internal whitespace run (spaces, tabs, newlines) to one space.

    Nothing else: no first-line extraction, no article removal, no number words. A
    generation that says more than the answer ("yes, it is hateful" or "yes\\nno") does not
    match "yes", which is what we want to measure after finetuning. Strip special tokens
    (`<|end|>`) before calling; they are not recognised here.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a str, got {type(text).__name__}: {text!r}")
    text = text.casefold()
    start, end = 0, len(text)
    while start < end and _is_edge_junk(text[start]):
        start += 1
    while end > start and _is_edge_junk(text[end - 1]):
        end -= 1
    return " ".join(text[start:end].split())


def _check_pairs(predictions: Sequence[str], references: Sequence, metric: str) -> None:
    # A bare string is a Sequence too: accuracy("yes", "yes") would silently score the
    # characters, so refuse it outright.
    for name, value in (("predictions", predictions), ("references", references)):
        if isinstance(value, str):
            raise TypeError(f"{metric}: {name} must be a sequence with one entry per example, got a str")
    if len(predictions) != len(references):
        raise ValueError(
            f"{metric}: {len(predictions)} predictions but {len(references)} references; "
            "they must be aligned one per example"
        )
    if len(predictions) == 0:
        # A mean over nothing is undefined; returning 0 or 1 would hide an empty eval split.
        raise ValueError(f"{metric}: no examples to score (empty predictions and references)")
    for i, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise TypeError(f"{metric}: prediction {i} is {type(prediction).__name__}, expected str: {prediction!r}")


def _acceptable(reference: str | Sequence[str], index: int) -> list[str]:
    answers = [reference] if isinstance(reference, str) else list(reference)
    if not answers:
        raise ValueError(f"accuracy: reference {index} lists no acceptable answer")
    for answer in answers:
        if not isinstance(answer, str):
            raise TypeError(f"accuracy: reference {index} contains {type(answer).__name__}, expected str: {answer!r}")
    return answers


def accuracy(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Fraction of predictions equal to their reference after `normalize_answer`.

    `references[i]` is either one answer or a sequence of acceptable answers; the prediction
    is correct if it matches any of them.

    Raises ValueError when the lengths differ or there are no examples, or when an example
    lists no acceptable answer; TypeError for a bare str in place of a sequence or a
    non-str answer.
    """
    _check_pairs(predictions, references, "accuracy")
    correct = 0
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        wanted = {normalize_answer(answer) for answer in _acceptable(reference, i)}
        correct += normalize_answer(prediction) in wanted
    return correct / len(predictions)


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Fraction of predictions equal to one of their references as written, outer whitespace aside
    (case and punctuation count: for answers whose exact form matters, e.g. codes or JSON).

    Errors as `accuracy`.
    """
    _check_pairs(predictions, references, "exact_match")
    correct = 0
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        correct += prediction.strip() in {answer.strip() for answer in _acceptable(reference, i)}
    return correct / len(predictions)


# -- ANLS ------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance between two strings: insertions, deletions, substitutions cost 1.

    Compares Unicode code points as given (no normalisation: a precomposed "é" and "e" plus
    a combining accent differ), like the RRC script. Dynamic programming over two rows:
    O(len(a) * len(b)) time, O(min(len(a), len(b))) memory, fine for short answers.
    """
    if len(a) < len(b):
        a, b = b, a  # keep the row over the shorter string
    if not b:
        return len(a)
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete char_a
                    current[j - 1] + 1,  # insert char_b
                    previous[j - 1] + (char_a != char_b),  # substitute (free if equal)
                )
            )
        previous = current
    return previous[-1]


def normalize_anls(text: str) -> str:
    """The RRC evaluation's normalisation: lower-case, strip, collapse whitespace runs."""
    return " ".join(text.strip().lower().split())


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"ANLS threshold must be in (0, 1], got {threshold!r} (the benchmark uses 0.5)")


def anls_score(prediction: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one prediction against its acceptable answers (see the module docstring).

    Edge cases follow from the formula: identical strings (including both empty after
    normalisation) score 1.0, since NL = 0 and the `max(len) = 0` case is defined as
    NL = 0; an empty prediction against a non-empty answer has NL = 1 and scores 0.
    """
    _check_threshold(threshold)
    if not isinstance(prediction, str):
        raise TypeError(f"anls_score: prediction is {type(prediction).__name__}, expected str: {prediction!r}")
    if isinstance(references, str):
        # Iterating a str would score against single characters; almost surely a mistake.
        raise TypeError(
            f"anls_score: references must be a sequence of answers, got the str {references!r}; wrap it in a list"
        )
    if len(references) == 0:
        raise ValueError("anls_score: no reference answers to compare with")
    pred = normalize_anls(prediction)
    best = 0.0
    for reference in references:
        if not isinstance(reference, str):
            raise TypeError(f"anls_score: reference is {type(reference).__name__}, expected str: {reference!r}")
        ref = normalize_anls(reference)
        longest = max(len(pred), len(ref))
        nl = levenshtein(pred, ref) / longest if longest else 0.0
        if nl < threshold:
            best = max(best, 1.0 - nl)
    return best


def anls(predictions: Sequence[str], references: Sequence[Sequence[str]], threshold: float = ANLS_THRESHOLD) -> float:
    """Mean `anls_score` over examples; `references[i]` lists the answers for example i.

    Raises ValueError when the lengths differ, there are no examples, or an example has no
    reference answer; TypeError for a bare str in place of a sequence.
    """
    _check_pairs(predictions, references, "anls")
    _check_threshold(threshold)
    total = 0.0
    for i, (prediction, answers) in enumerate(zip(predictions, references)):
        try:
            total += anls_score(prediction, answers, threshold)
        except (TypeError, ValueError) as error:
            raise type(error)(f"example {i}: {error}") from None
    return total / len(predictions)


# The scores --metric names (finetune_hf_trainer_custom.py; the generation metric of preference pairs).
METRICS = {"exact_match": exact_match, "accuracy": accuracy, "anls": anls}


def score_function(metric: str) -> Callable[[list[str], list[list[str]]], float]:
    """The score of --metric: a name of METRICS, or module:function (the module found from the
    current directory too)."""
    if metric in METRICS:
        return METRICS[metric]
    module_name, _, function_name = metric.partition(":")
    if not function_name:
        raise FlagError(f"--metric {metric!r}: use one of {', '.join(METRICS)} or module:function")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except ImportError as err:
        raise FlagError(f"--metric {metric}: cannot import module {module_name!r} ({err})") from None
    except AttributeError:
        raise FlagError(f"--metric {metric}: module {module_name!r} has no function {function_name!r}") from None
    if not callable(function):
        raise FlagError(f"--metric {metric}: {function_name!r} is not a function")
    return function
