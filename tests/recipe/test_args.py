"""The flags without the heavy libraries: --help and flag errors import neither torch nor the
trainer's libraries; --help shows each default once; transformers' other flags still work."""

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import finetune_hf_trainer_ucf101 as ucf
from recipe.args import MIRRORED, FlagError, TrainingFlags
from recipe.checkpoints import TRAINER_STATE_NAME
from recipe.flag_parser import parse_args, parse_flags, transformers_flag_names

REPOSITORY = Path(__file__).resolve().parents[2]
SCRIPTS = ("finetune_hf_trainer_custom.py", "finetune_hf_trainer_docvqa.py", "finetune_hf_trainer_hateful_memes.py",
           "finetune_hf_trainer_nlvr2.py", "finetune_hf_trainer_ucf101.py", "finetune_hf_trainer_rlaif_v.py")
HEAVY = ("torch", "transformers.trainer", "transformers.training_args", "peft", "datasets", "deepspeed",
         "bitsandbytes", "accelerate")

# Runs each script as `python SCRIPT ARGS...` would, in one process, then names the heavy modules loaded.
PROBE = """
import runpy, sys
codes = []
for script in {scripts!r}:
    sys.argv = [script, *{args!r}]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as end:
        codes.append(end.code)
print("HEAVY", sorted(m for m in {heavy!r} if m in sys.modules), "CODES", codes, file=sys.stderr)
"""


def probe(scripts, args):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(scripts=scripts, args=args, heavy=HEAVY)],
                          cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    return proc.stdout, proc.stderr.strip().splitlines()


def test_help_imports_no_heavy_library():
    out, err = probe(SCRIPTS, ["--help"])
    assert err[-1] == f"HEAVY [] CODES {[0] * len(SCRIPTS)}", err
    assert out.count("usage:") == len(SCRIPTS)


@pytest.mark.parametrize("script, args, message", [
    ("finetune_hf_trainer_ucf101.py", ["--learning_rat", "5"],
     "error: unknown flag --learning_rat (did you mean --learning_rate"),
    ("finetune_hf_trainer_ucf101.py", ["--fp16", "--bf16"], "error: --fp16 and --bf16 are exclusive"),
    ("finetune_hf_trainer_ucf101.py", ["--num_crops", "many"], "error: argument --num_crops"),
    # the DPO flags (recipe.preference_args): the loss that reads them is built only for a run
    ("finetune_hf_trainer_rlaif_v.py", ["--use_lora", "--label_smoothing", "0.6"],
     "error: --label_smoothing 0.6 must be in [0, 0.5)"),
], ids=["misspelled", "conflict", "bad value", "dpo flag"])
def test_a_flag_error_imports_no_heavy_library(script, args, message, tmp_path):
    _, err = probe([script], args + ["--output_dir", str(tmp_path)])
    assert err[-2].startswith(message) and err[-1] == "HEAVY [] CODES [2]", err


def test_help_shows_each_default_once_and_switches_without_a_value(capsys):
    with pytest.raises(SystemExit):
        parse_flags(ucf.Ucf101Arguments, ["--help"], ucf.TASK.defaults)
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "(default: None)" not in flat and "[USE_LORA]" not in text and "USE_LORA" not in text
    entries = [entry for entry in flat.split(" --") if entry]
    assert not [entry for entry in entries if entry.lower().count("default") > 1]
    assert "--use_lora Train LoRA adapters instead of all weights." in flat  # off by default: no default shown
    assert "Default: no limit." in flat and "Default: min(4, CPUs available to the process / processes on the node), at least 1." in flat
    # related flags together: the data files with --data_dir, not under "evaluation"
    sections = {}
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            section = line[:-1]
        elif line.startswith("  --"):
            sections[line.split()[0].rstrip(",")] = section
    assert sections["--train_file"] == sections["--eval_file"] == sections["--data_dir"] == "task data"
    assert sections["--eval_batch_size"] == sections["--eval_only"] == "evaluation"


@pytest.mark.parametrize("cpus, local_ranks, workers",
                         [(1, None, 1), (3, None, 3), (16, None, 4), (16, "8", 2), (16, "2", 4), (4, "8", 1)])
def test_data_workers_default_to_the_cpus_available(cpus, local_ranks, workers, monkeypatch):
    # Every rank on a node starts its own workers: the node's CPUs are shared by torchrun's LOCAL_WORLD_SIZE.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    if local_ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    flags = parse_flags(ucf.Ucf101Arguments, ["--use_lora"], ucf.TASK.defaults)
    assert flags.training.dataloader_num_workers == workers


def test_light_flags_agree_with_transformers():
    from transformers import TrainingArguments
    from transformers.trainer import TRAINER_STATE_NAME as transformers_name

    assert TRAINER_STATE_NAME == transformers_name
    assert transformers_flag_names() == {f.name for f in fields(TrainingArguments)}
    defaults = {f.name: f.default for f in fields(TrainingArguments)}
    ours = {f.name: f.default for f in fields(TrainingFlags)}
    assert {name: ours[name] for name in MIRRORED} == {name: defaults[name] for name in MIRRORED}


def test_transformers_only_flags_reach_the_training_arguments(tmp_path):
    _, _, args = parse_args(ucf.Ucf101Arguments, [
        "--output_dir", str(tmp_path), "--use_lora", "--data_seed", "7", "--no_dataloader_pin_memory",
        "--logging_first_step", "--optim", "adafactor", "--learning_rate", "1e-3"], ucf.TASK.defaults)
    assert (args.data_seed, args.dataloader_pin_memory, args.logging_first_step) == (7, False, True)
    assert str(args.optim.value) == "adafactor" and args.learning_rate == 1e-3
    with pytest.raises(FlagError, match=r"unknown flag --data_sed \(did you mean --data_seed"):
        parse_flags(ucf.Ucf101Arguments, ["--use_lora", "--data_sed", "7"], ucf.TASK.defaults)


def test_a_chosen_log_level_shows_the_hidden_library_messages():
    import logging
    import warnings

    import recipe
    from recipe.task import task_flags

    hidden_logger = logging.getLogger(recipe.QUIET_LOGGERS[0])

    def hidden_warnings():
        patterns = {f[1].pattern for f in warnings.filters if f[0] == "ignore" and f[1] is not None}
        return {message for message, _ in recipe.QUIET_WARNINGS} & patterns

    recipe.quiet_libraries()  # as importing recipe did (pytest restores the warning filters after collection)
    try:
        task_flags(ucf.TASK, ["--use_lora"])  # the default, passive: quiet
        assert hidden_logger.level == logging.ERROR and len(hidden_warnings()) == len(recipe.QUIET_WARNINGS)
        task_flags(ucf.TASK, ["--use_lora", "--log_level", "warning"])
        assert hidden_logger.level == logging.NOTSET and not hidden_warnings()
    finally:
        recipe.quiet_libraries()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_deepspeed_file_that_is_no_json_object_is_a_flag_error_naming_it(text, tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(FlagError, match=rf"--deepspeed {config}: not a JSON object"):
        parse_flags(ucf.Ucf101Arguments, ["--deepspeed", str(config), "--dry_run", "--output_dir", str(tmp_path / "o")],
                    ucf.TASK.defaults)


def test_flag_names_are_not_guessed_from_a_class_with_bases(tmp_path, monkeypatch):
    """A newer transformers whose TrainingArguments inherits fields: rather than a partial list
    (its real flags refused as unknown), no list, and transformers' parser judges the flags."""
    import importlib.util
    from types import SimpleNamespace

    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "training_args.py").write_text("class TrainingArguments(Base):\n    own: int = 1\n")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(origin=str(tmp_path / "__init__.py")))
    assert transformers_flag_names.__wrapped__() is None


def test_a_missing_file_named_by_a_transformers_flag_is_a_flag_error(tmp_path):
    with pytest.raises(FlagError, match="accelerator_config.json"):
        parse_args(ucf.Ucf101Arguments, ["--use_lora", "--output_dir", str(tmp_path / "out"), "--accelerator_config",
                                         str(tmp_path / "accelerator_config.json")], ucf.TASK.defaults)


def test_data_flag_checks():
    from recipe.args import DataArguments

    DataArguments(max_train_samples=5, max_eval_samples=1, max_length=512).check()
    with pytest.raises(FlagError, match="--max_eval_samples 0 must be at least 1"):
        DataArguments(max_eval_samples=0).check()


BEST_MODEL = {  # flags -> the FlagError expected (None: accepted), as transformers' TrainingArguments rules
    ("--eval_strategy", "steps", "--eval_steps", "10", "--save_steps", "15"):
        r"--save_steps a multiple of --eval_steps.*--save_steps 15, --eval_steps 10; pass e\.g\. --save_steps 20",
    ("--eval_strategy", "steps", "--save_steps", "15"):  # --eval_steps defaults to --logging_steps (10)
        r"--save_steps 15, --eval_steps 10",
    ("--eval_strategy", "steps", "--eval_steps", "0.1", "--save_steps", "15"): r"a ratio and a number of steps",
    ("--eval_strategy", "epoch"): r"--save_strategy to match --eval_strategy.*--save_strategy steps; pass "
                                  r"--save_strategy epoch",
    ("--eval_strategy", "steps", "--eval_steps", "10", "--save_steps", "20"): None,
    ("--eval_strategy", "steps", "--eval_steps", "0.1", "--save_steps", "0.3"): None,
    ("--eval_strategy", "steps", "--eval_steps", "10", "--save_steps", "15", "--save_strategy", "best"): None,
    ("--eval_strategy", "epoch", "--save_strategy", "epoch"): None,
}


@pytest.mark.parametrize("extra", BEST_MODEL)
def test_best_model_needs_checkpoints_where_the_evaluations_are(extra, tmp_path):
    # Refused before anything loads (and --dry_run), as transformers' TrainingArguments would refuse it once built.
    from transformers import TrainingArguments

    argv = ["--use_lora", "--output_dir", str(tmp_path), "--load_best_model_at_end", *extra]
    values = dict(zip(extra[::2], extra[1::2]))
    transformers_args = {name.lstrip("-"): value if value.isalpha() else float(value) for name, value in values.items()}
    if BEST_MODEL[extra] is None:
        parse_flags(ucf.Ucf101Arguments, argv, ucf.TASK.defaults)
        TrainingArguments(str(tmp_path), load_best_model_at_end=True, logging_steps=10, **transformers_args)
    else:
        with pytest.raises(FlagError, match=BEST_MODEL[extra]):
            parse_flags(ucf.Ucf101Arguments, argv, ucf.TASK.defaults)
        with pytest.raises(ValueError, match="--load_best_model_at_end requires"):
            TrainingArguments(str(tmp_path), load_best_model_at_end=True, logging_steps=10, **transformers_args)


def test_metric_for_best_model_names_the_tasks_metric(tmp_path):
    """The evaluations during training report the task's metric only: another name would fail the
    Trainer's lookup at the first of them, hours in; it is refused before anything loads."""
    from recipe.task import task_flags

    argv = ["--output_dir", str(tmp_path / "out"), "--use_lora"]
    assert task_flags(ucf.TASK, argv).training.metric_for_best_model == ucf.TASK.metric
    for same in (ucf.TASK.metric, f"eval_{ucf.TASK.metric}"):
        assert task_flags(ucf.TASK, [*argv, "--metric_for_best_model", same]).training.metric_for_best_model == same
    with pytest.raises(FlagError, match=rf"^--metric_for_best_model loss: evaluations during training report the "
                                        rf"task's metric, {ucf.TASK.metric}; drop the flag"):
        task_flags(ucf.TASK, [*argv, "--metric_for_best_model", "loss"])
