"""Parsing the command line into the flags of recipe.args: exact names, one-line errors, a grouped
--help, and transformers' other TrainingArguments flags passed through by name.

Flags are matched exactly: no abbreviations (argparse would otherwise take `--learning_rat 5` as
the learning rate). Every problem ends in one `error:` line (recipe.errors); the checks across
flags are recipe.flag_checks', run by `parse_flags` before anything loads.

Light on purpose: `--help` and every flag error come from here without importing torch or
transformers' trainer (seconds). transformers' flags the recipes do not declare are known by name
(read from its source, not imported) and parsed by its own field types, with the
`TrainingArguments` object built (recipe.training_args), only for a run that passed every check.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import importlib.util
import sys
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

from transformers import HfArgumentParser

from .args import DEFAULT_DEEPSPEED_CONFIG, REFUSED, DataArguments, ModelArguments, TrainingFlags
from .errors import FlagError
from .flag_checks import check_flags

__all__ = ["Flags", "RecipeArgumentParser", "parse_flags", "parse_args", "build_training_args",
           "parse_transformers_flags", "transformers_flag_names"]

GROUPS = ("task data", "model and method", "training", "evaluation", "other transformers flags")
# Flags shown under "training" besides TrainingFlags' own fields (which go there anyway): the data
# flags of the padding-free layout, which shape the training batches.
TRAINING_FLAGS = {"padding_free", "max_tokens_per_row"}
# Flags shown under "evaluation", wherever they are declared (TrainingFlags, DataArguments).
EVALUATION_FLAGS = {
    "eval_strategy", "eval_steps", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    "eval_batch_size", "max_new_tokens", "eval_turns", "eval_only", "skip_eval_before",
}
HIDDEN = {"remove_unused_columns"}  # must stay as it is; not offered


def _is_switch(action: argparse.Action) -> bool:
    """An on/off flag (HfArgumentParser's bool: `--flag` alone means on; `--flag False` works too)."""
    return action.nargs == "?" and action.const is True


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag under its name with underscores only (the dashed spelling works too); on/off
    flags without a value (`--use_lora`, `--no_activation_checkpointing`); a default shown once:
    where the help text does not already explain it, and not for switches that are off."""

    def _format_action_invocation(self, action):
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            return super()._format_action_invocation(action)
        name = action.option_strings[0]
        if _is_switch(action):
            negation = getattr(action, "negation", None)
            return f"{name}, {negation}" if negation else name
        if action.nargs == 0:
            return name
        return f"{name} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is argparse.SUPPRESS or not action.option_strings:
            return text
        if _is_switch(action):
            return f"{text} (default: on)" if default else text
        return f"{text} (default: %(default)s)"


@functools.lru_cache(maxsize=1)
def transformers_flag_names() -> frozenset[str] | None:
    """The field names of the installed transformers' TrainingArguments, read from its source
    (importing it takes seconds: torch, accelerate, peft, bitsandbytes). None if the source is
    not where or what it used to be (a class with bases: some fields would be elsewhere);
    unknown flags are then left to transformers' parser (build_training_args, after the imports)."""
    try:
        spec = importlib.util.find_spec("transformers")
        source = Path(spec.origin).with_name("training_args.py").read_text(encoding="utf-8")
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
                if node.bases or node.keywords:  # (fields it inherits are not in this source)
                    return None
                names = frozenset(item.target.id for item in node.body
                                  if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                                  and not item.target.id.startswith("_"))
                return names or None
    except (AttributeError, OSError, SyntaxError, TypeError, ValueError):
        pass
    return None


class RecipeArgumentParser(HfArgumentParser):
    """HfArgumentParser with exact flag names, one-line errors and a grouped --help."""

    def __init__(self, dataclass_types, defaults: dict | None = None):
        super().__init__(dataclass_types, allow_abbrev=False, formatter_class=_HelpFormatter,
                         usage="%(prog)s [--flag VALUE ...]   (torchrun --nproc_per_node=N %(prog)s ... on GPUs)")
        defaults = dict(defaults or {})
        unknown = set(defaults) - {action.dest for action in self._actions}
        if unknown:
            raise FlagError(f"task defaults name unknown flags: {sorted(unknown)}")
        self.set_defaults(**defaults)

    def group_help(self, data_args_class) -> None:
        """Moves every flag into one of GROUPS; refused transformers names are not shown, the
        other transformers flags are listed by name."""
        ours = {f.name for f in fields(TrainingFlags)}
        data = {f.name for f in fields(data_args_class)}
        model = {f.name for f in fields(ModelArguments)}
        others = sorted((transformers_flag_names() or frozenset()) - ours - REFUSED.keys() - HIDDEN)
        descriptions = {"other transformers flags": (
            "Any other flag of transformers' TrainingArguments works too, with transformers' meaning (see "
            "its documentation): " + ", ".join(f"--{name}" for name in others) + ".") if others else None}
        groups = {title: self.add_argument_group(title, descriptions.get(title)) for title in GROUPS}
        negations = {a.dest: a.option_strings[0] for a in self._actions
                     if a.option_strings and a.option_strings[0].startswith("--no_") and a.const is False}
        for action in list(self._optionals._group_actions):
            dest = action.dest
            if dest == "help":
                continue
            if _is_switch(action) and dest in negations:
                action.negation = negations[dest]
            if dest in REFUSED or dest in HIDDEN or (action.option_strings[0].startswith("--no_") and action.const
                                                     is False):
                action.help = argparse.SUPPRESS
                continue
            if dest in EVALUATION_FLAGS:
                title = "evaluation"
            elif dest in TRAINING_FLAGS:
                title = "training"
            elif dest in data:
                title = "task data"
            elif dest in model:
                title = "model and method"
            elif dest in ours:
                title = "training"
            else:
                title = "other transformers flags"
            self._optionals._group_actions.remove(action)
            groups[title]._group_actions.append(action)

    def error(self, message: str):
        """argparse's own errors (bad value, missing value): one line instead of usage + message."""
        raise FlagError(f"{message} (see --help)")

    def known_flags(self) -> list[str]:
        return [f"--{action.dest}" for action in self._actions
                if action.option_strings and action.help is not argparse.SUPPRESS]

    def unknown_flags(self, problems: list[str]) -> FlagError:
        return FlagError("; ".join(problems) + "; flags are matched exactly, see --help")


def _unknown(rest: list[str], passable: frozenset[str] | None, known: list[str]) -> list[str]:
    """What argparse left over that is not a transformers flag: each unknown flag with the
    closest real ones. (Values after a flag belong to it; a negative number is a value.)"""
    problems, after_flag = [], False
    for token in rest:
        if token.startswith("-") and not _is_number(token):
            flag = token.split("=", 1)[0]
            name = flag.lstrip("-").replace("-", "_")
            after_flag = True
            if passable is None or name in passable or (name.startswith("no_") and name[3:] in passable):
                continue
            close = difflib.get_close_matches(flag.replace("-", "_").replace("__", "--", 1), known, n=3, cutoff=0.6)
            problems.append(f"unknown flag {flag}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        elif not after_flag:
            problems.append(f"unexpected value {token!r}")
            after_flag = True  # (one such message is enough)
    return problems


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _given(argv: list[str]) -> set[str]:
    """The flag names (dest form) written on the command line."""
    return {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}


def _build(dtype, values: dict):
    values = {f.name: values[f.name] for f in fields(dtype) if f.init and f.name in values}
    try:
        return dtype(**values)
    except FlagError:
        raise
    except (ValueError, OSError) as err:  # transformers' own flag validation (and files its flags name)
        raise FlagError(" ".join(str(err).split())) from None


class Flags(NamedTuple):
    """The parsed, checked flags of a run; `transformers_argv` are the transformers flags that
    TrainingFlags does not declare, parsed by build_training_args."""

    model: ModelArguments
    data: DataArguments
    training: TrainingFlags
    transformers_argv: list[str]


def parse_flags(data_args_class=DataArguments, argv: list[str] | None = None, defaults: dict | None = None,
                late_defaults=None) -> Flags:
    """Parses and checks every flag (recipe.flag_checks.check_flags) without importing torch or
    transformers' trainer: --help and every flag error end here in well under a second of imports.
    `defaults` are the task's own defaults.

    `late_defaults(data_args) -> {flag: value}`: defaults that follow from the data flags (a task
    named and scored by its flags: its metric is --metric_for_best_model's default), applied to
    the flags not given on the command line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    refused = sorted(_given(argv) & REFUSED.keys())
    if refused:
        raise FlagError(f"--{refused[0]} is not used by these recipes; use {REFUSED[refused[0]]}")
    parser = RecipeArgumentParser((ModelArguments, data_args_class, TrainingFlags), defaults)
    parser.group_help(data_args_class)
    namespace, rest = parser.parse_known_args(argv)
    ours = {action.dest for action in parser._actions}
    names = transformers_flag_names()
    passable = None if names is None else names - ours - REFUSED.keys()
    problems = _unknown(rest, passable, parser.known_flags() + sorted(f"--{n}" for n in passable or ()))
    if problems:
        raise parser.unknown_flags(problems)
    values = vars(namespace)
    model_args = _build(ModelArguments, values)
    data_args = _build(data_args_class, values)
    if late_defaults is not None:
        given = _given(argv)
        values.update({name: value for name, value in late_defaults(data_args).items() if name not in given})
    training = _build(TrainingFlags, values)
    if model_args.use_qlora:
        model_args.use_lora = True
    if training.deepspeed == "auto":
        full = not (model_args.use_lora or data_args.eval_only)
        training.deepspeed = DEFAULT_DEEPSPEED_CONFIG if full else None
    elif training.deepspeed in ("none", ""):
        training.deepspeed = None
    check_flags(model_args, data_args, training)
    return Flags(model_args, data_args, training, rest)


def build_training_args(flags: Flags):
    """The run's RecipeTrainingArguments (transformers' TrainingArguments: imports torch and the
    trainer's libraries; sets up devices), from flags that passed their checks."""
    from .training_args import RecipeTrainingArguments

    values = {f.name: getattr(flags.training, f.name) for f in fields(TrainingFlags)}
    values.update({name: value for name, value in parse_transformers_flags(flags).items() if name not in values})
    return _build(RecipeTrainingArguments, values)


def parse_transformers_flags(flags: Flags) -> dict:
    """{name: value} of the transformers flags that TrainingFlags does not declare
    (flags.transformers_argv), parsed by transformers' own field types: an unknown name or a bad
    value is a FlagError. Imports TrainingArguments (not light) but builds nothing, so --dry_run
    checks them too."""
    if not flags.transformers_argv:
        return {}
    from .training_args import RecipeTrainingArguments

    parser = RecipeArgumentParser(RecipeTrainingArguments)
    namespace, rest = parser.parse_known_args(flags.transformers_argv)
    problems = _unknown(rest, frozenset(), parser.known_flags())
    if problems:
        raise parser.unknown_flags(problems)
    values = {}
    for name in _given(flags.transformers_argv):
        name = name if hasattr(namespace, name) or not name.startswith("no_") else name[3:]
        if hasattr(namespace, name):
            values[name] = getattr(namespace, name)
    return values


def parse_args(data_args_class=DataArguments, argv: list[str] | None = None, defaults: dict | None = None,
               late_defaults=None):
    """(model_args, data_args, training_args) from argv; `defaults` are the task's own defaults.

    `late_defaults(data_args) -> {flag: value}`: defaults that follow from the data flags (a task
    named and scored by its flags: its metric is --metric_for_best_model's default), applied to
    the flags not given on the command line.

    Every check (recipe.flag_checks.check_flags) runs before TrainingArguments sets up devices,
    distributed or DeepSpeed, so a wrong flag costs nothing.
    """
    flags = parse_flags(data_args_class, argv, defaults, late_defaults)
    return flags.model, flags.data, build_training_args(flags)
