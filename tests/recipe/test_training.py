"""The shared training core end to end on the tiny model: every training mode learns, DeepSpeed
and 2-process runs work, a killed run resumes exactly, merged LoRA weights equal the adapter,
flag conflicts stop the run before any model is loaded, and the outputs are written (by rank 0).

Runs that need a launcher (DeepSpeed, 2 processes) or must die (SIGKILL) are subprocesses of
tests/recipe/ucf101_launcher.py; everything else runs in this process.
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import finetune_hf_trainer_ucf101 as ucf
import phi3v  # noqa: F401  (registers Phi3VForCausalLM with AutoModelForCausalLM)
from phi3v.modeling_phi3v import Phi3VForCausalLM
from phi3v.processing_phi3v import Phi3VProcessor
from recipe.checkpoints import RUN_COMPLETE_FILE, TMP_DIR
from recipe.errors import FlagError
from recipe.flag_checks import check_flags
from recipe.flag_parser import parse_args
from recipe.data import Collator, ConversationDataset
from recipe.records import subset
from recipe.evaluate import evaluate
from recipe.model import load_model
from recipe.task import run
from recipe.trainer import GroupedByLengthSampler, RecipeTrainer

LAUNCHER = Path(__file__).with_name("ucf101_launcher.py")
SUBPROCESS_TIMEOUT = 900  # the first DeepSpeed run on a machine JIT-compiles its CPU comm op


def flags(tiny, data, out, *extra) -> list[str]:
    return ["--model_name_or_path", str(tiny), "--data_dir", str(data), "--output_dir", str(out), "--num_crops", "1",
            "--no-tqdm", "--logging_steps", "1", "--eval_batch_size", "2", "--max_new_tokens", "4",
            "--dataloader_num_workers", "0", "--warmup_steps", "0", *map(str, extra)]


def launch(args, *, env=None, torchrun_procs=None, check=True) -> subprocess.CompletedProcess:
    command = [sys.executable, str(LAUNCHER)]
    if torchrun_procs:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}",
                   str(LAUNCHER)]  # = torchrun
    proc = subprocess.run(command + list(args), env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    if check:
        assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def read_json(path: Path):
    return json.loads(path.read_text())


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# -- 1. every training mode learns ------------------------------------------------------------


def repeated_batch_trainer(tiny, data, out, *extra) -> RecipeTrainer:
    """One training example as every batch, constant high learning rate: the loss must fall."""
    argv = flags(tiny, data, out, "--deepspeed", "none", "--batch_size", 1, "--batch_size_per_gpu", 1,
                 "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--max_steps", 8,
                 "--save_strategy", "no", *extra)
    model_args, data_args, training_args = parse_args(ucf.Ucf101Arguments, argv, ucf.TASK.defaults)
    check_flags(model_args, data_args, training_args)
    processor = Phi3VProcessor.from_pretrained(tiny, num_crops=1)
    train, _ = ucf.load_data(data_args, model_args)
    return RecipeTrainer(
        model=load_model(model_args, training_args),
        args=training_args,
        train_dataset=ConversationDataset(train[:1], processor),
        data_collator=Collator(pad_token_id=processor.tokenizer.pad_token_id),
        processing_class=processor,
        model_args=model_args,
    )


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def assert_learns(trainer):
    trainer.train()
    curve = losses(trainer)
    assert len(curve) == 8
    assert curve[-1] < curve[0] - 0.3, curve


def test_full_finetuning_learns_everything(tiny_checkpoint, ucf101_data, tmp_path):
    trainer = repeated_batch_trainer(tiny_checkpoint, ucf101_data, tmp_path)
    model = trainer.model
    vision, language = snapshot(model.model.vision_embed_tokens), snapshot(model.model.layers)
    assert_learns(trainer)
    moved = changed(vision, snapshot(model.model.vision_embed_tokens))
    assert any(k.startswith("img_projection.") for k in moved) and any("encoder.layers.0." in k for k in moved)
    assert changed(language, snapshot(model.model.layers)) == set(language)


def test_frozen_vision_stays_bit_identical(tiny_checkpoint, ucf101_data, tmp_path):
    trainer = repeated_batch_trainer(tiny_checkpoint, ucf101_data, tmp_path, "--freeze_vision_model")
    model = trainer.model
    vision, language = snapshot(model.model.vision_embed_tokens), snapshot(model.model.layers)
    head = model.lm_head.weight.detach().clone()
    assert_learns(trainer)
    assert_same_tensors(vision, snapshot(model.model.vision_embed_tokens))
    assert all(p.grad is None and not p.requires_grad for p in model.model.vision_embed_tokens.parameters())
    assert changed(language, snapshot(model.model.layers)) == set(language)
    assert not torch.equal(head, model.lm_head.weight)


def lora_names(model) -> tuple[set[str], set[str]]:
    names = {n for n, _ in model.named_parameters() if ".lora_" in n}
    return {n for n in names if ".vision_embed_tokens." in n}, {n for n in names if ".vision_embed_tokens." not in n}


@pytest.mark.parametrize("mode", ["--use_lora", "--use_qlora"])
def test_lora_and_qlora_learn_adapters_only(mode, tiny_checkpoint, ucf101_data, tmp_path):
    import bitsandbytes as bnb

    trainer = repeated_batch_trainer(tiny_checkpoint, ucf101_data, tmp_path, mode)
    model = trainer.model
    before = snapshot(model)
    assert_learns(trainer)
    after = snapshot(model)
    vision_adapters, language_adapters = lora_names(model)
    assert vision_adapters and language_adapters  # the image side gets adapters unless frozen
    moved = changed(before, after)
    assert moved and all(".lora_" in k for k in moved)
    assert any(".vision_embed_tokens." in k for k in moved) and any(".layers.0." in k for k in moved)
    base = model.get_base_model()
    quantized = {n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    if mode == "--use_qlora":
        # 4-bit language model; the image side stays in full precision.
        assert any(".layers.0.self_attn.qkv_proj" in n for n in quantized)
        assert not [n for n in quantized if "vision_embed_tokens" in n]
    else:
        assert not quantized


def test_lora_with_frozen_vision_has_no_vision_adapters(tiny_checkpoint, ucf101_data, tmp_path):
    trainer = repeated_batch_trainer(tiny_checkpoint, ucf101_data, tmp_path, "--use_lora", "--freeze_vision_model")
    vision_adapters, language_adapters = lora_names(trainer.model)
    assert not vision_adapters and language_adapters


def test_activation_checkpointing_with_lora_and_frozen_vision(tiny_checkpoint, ucf101_data, tmp_path):
    # On by default, as in the original recipe. Non-reentrant checkpointing (the default kwargs)
    # needs no input-grad hooks for frozen parts.
    trainer = repeated_batch_trainer(tiny_checkpoint, ucf101_data, tmp_path, "--use_lora", "--freeze_vision_model")
    assert_learns(trainer)
    assert trainer.model.get_base_model().is_activation_checkpointing


def test_bf16_trains_on_cpu(tiny_checkpoint, ucf101_data, tmp_path):
    trainer = repeated_batch_trainer(tiny_checkpoint, ucf101_data, tmp_path, "--use_lora", "--bf16", "--max_steps", 2)
    assert trainer.model.get_base_model().lm_head.weight.dtype == torch.bfloat16
    trainer.train()
    assert all(torch.isfinite(torch.tensor(losses(trainer))))


@pytest.mark.parametrize("separate", [True, False], ids=["separate-rates", "one-rate"])
@pytest.mark.parametrize("mode", [[], ["--use_lora"]], ids=["full", "lora"])
def test_param_groups_rates_and_one_weight_decay_rule(mode, separate, tiny_checkpoint, ucf101_data, tmp_path):
    rates = ["--vision_learning_rate", "1e-5", "--projector_learning_rate", "2e-5"] if separate else []
    trainer = repeated_batch_trainer(tiny_checkpoint, ucf101_data, tmp_path, *mode, "--learning_rate", "3e-4",
                                     *rates, "--wd", "0.1", "--max_steps", 1)
    trainer.train()  # the groups the Trainer really steps with (constant schedule: lr as set)
    group_of = {id(p): (g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert len(group_of) == len(trainable)
    seen = set()
    for name, param in trainable:
        separator = name.endswith(("glb_GN", "sub_GN"))
        if ".img_processor." in name and separate:
            lr = 1e-5
        elif (".img_projection." in name or separator) and separate:
            lr = 2e-5
        else:
            lr = 3e-4
        # the same rule on both paths: no decay for biases, norms and the image separators
        decay = 0.0 if param.ndim < 2 or separator or "norm" in name else 0.1
        assert group_of[id(param)] == (lr, decay), name
        seen.add(lr)
    assert seen == ({1e-5, 2e-5, 3e-4} if separate else {3e-4})


def test_length_grouped_sampler_is_reproducible_per_epoch():
    lengths = [i % 7 * 10 + i for i in range(64)]
    sampler = GroupedByLengthSampler(lengths, group_size=4, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(64)) and list(sampler) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    assert list(GroupedByLengthSampler(lengths, group_size=4, seed=3)) == epoch0


# -- 6. flag conflicts: an error that says what to do, before any model is loaded ----------


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model or processor was loaded before the flags were checked")

    monkeypatch.setattr("recipe.runner.load_model", refuse)
    monkeypatch.setattr("recipe.runner.Phi3VProcessor.from_pretrained", refuse)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def missing_package(monkeypatch, package):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))


def finished_run(out):
    out.mkdir()
    (out / RUN_COMPLETE_FILE).write_text("{}")


def unfinished_run(out):
    (out / "checkpoint-2").mkdir(parents=True)


def evaluated(out):
    out.mkdir()
    (out / "eval_after.json").write_text("{}")


CONFLICTS = {
    "flash attention without bf16": (["--use_flash_attention"], None, r"--use_flash_attention needs --bf16"),
    "transformers' batch flag": (["--per_device_train_batch_size", 4], None,
                                 r"--per_device_train_batch_size is not used.*use --batch_size_per_gpu"),
    "transformers' weight decay": (["--weight_decay", "0.1"], None, r"--weight_decay is not used.*use --wd"),
    "transformers' accumulation": (["--gradient_accumulation_steps", 2], None, r"use --batch_size \(global"),
    "a copy per node": (["--save_on_each_node"], None, r"--save_on_each_node is not used.*shared --output_dir"),
    "eval_only over earlier results": (["--eval_only"], evaluated, r"already holds eval_after.json"),
    "fp16 with flash attention": (["--fp16", "--use_flash_attention"], None, r"cannot be combined with --fp16.*--bf16"),
    "flash attention not installed": (["--bf16", "--use_flash_attention"], "flash_attn",
                                      r"needs the flash-attn package.*pip install -r requirements-gpu.txt"),
    "qlora without bitsandbytes": (["--use_qlora"], "bitsandbytes", r"--use_qlora needs bitsandbytes.*pip install"),
    "batch not divisible": (["--batch_size", 5, "--batch_size_per_gpu", 2], "WORLD_SIZE=2",
                            r"--batch_size 5 .* not divisible by 2 process\(es\) x --batch_size_per_gpu 2; "
                            r"pick a multiple of 4"),
    "num_crops 0": (["--num_crops", 0], None, r"--num_crops 0 is outside 1\.\.16"),
    "num_crops 17": (["--num_crops", 17], None, r"--num_crops 17 is outside 1\.\.16"),
    "finished run": ([], finished_run, r"holds a finished run.*another --output_dir or pass --overwrite_output_dir"),
    "unfinished run": ([], unfinished_run, r"unfinished run: pass --resume_from_checkpoint auto"),
    "unknown flag": (["--lerning_rate", "1e-4"], None, r"^unknown flag --lerning_rate \(did you mean --learning_rate\b"),
    # argparse would take an abbreviation as the flag it abbreviates (learning rate 5).
    "abbreviated flag": (["--learning_rat", "5"], None, r"^unknown flag --learning_rat \(did you mean --learning_rate\b"),
    "bad value": (["--num_train_epochs", "many"], None, r"argument --num_train_epochs.*invalid float value: 'many'"),
    "deepspeed without launcher": (["--deepspeed", "ds_configs/zero2.json"], None, r"needs a launcher.*torchrun"),
    "default deepspeed without launcher": ([], "default deepspeed", r"needs a launcher.*--deepspeed none"),
    "fp16 without gpu": (["--fp16"], None, r"--fp16 needs a CUDA GPU; on CPU use --bf16"),
    "fp16 and bf16": (["--fp16", "--bf16"], None, r"exclusive; pick one"),
    "merge without lora": (["--merge_lora"], None, r"--merge_lora needs --use_lora"),
    "frozen vision learning rate": (["--freeze_vision_model", "--vision_learning_rate", "0"], None,
                                    r"make no sense with --freeze_vision_model"),
    "missing checkpoint": (["--resume_from_checkpoint", "nowhere/checkpoint-3"], None,
                           r"no such checkpoint directory \(or use 'auto'\)"),
}


@pytest.mark.parametrize("name", CONFLICTS)
def test_flag_conflict_stops_before_loading(name, no_model_loading, monkeypatch, tmp_path):
    extra, setup, message = CONFLICTS[name]
    out = tmp_path / "out"
    base = ["--model_name_or_path", "does-not-exist", "--data_dir", str(tmp_path), "--output_dir", str(out)]
    if setup != "default deepspeed":
        base += ["--deepspeed", "none"]
    if isinstance(setup, str) and "=" in setup:
        monkeypatch.setenv(*setup.split("="))
    elif setup in ("flash_attn", "bitsandbytes"):
        missing_package(monkeypatch, setup)
    elif callable(setup):
        setup(out)
    monkeypatch.chdir(Path(ucf.__file__).parent)  # ds_configs/ is relative to the repository
    with pytest.raises(FlagError, match=message):
        run(ucf.TASK, base + [str(a) for a in extra])


def test_qlora_under_deepspeed_is_refused(tmp_path):
    # Only reachable under a launcher (DeepSpeed needs one), so checked on parsed flags here.
    model_args, data_args, training_args = parse_args(
        ucf.Ucf101Arguments, ["--use_qlora", "--deepspeed", "none", "--output_dir", str(tmp_path)], ucf.TASK.defaults)
    training_args.deepspeed = "ds_configs/zero2.json"
    with pytest.raises(FlagError, match=r"--use_qlora does not run under DeepSpeed.*drop --deepspeed"):
        check_flags(model_args, data_args, training_args)


def test_help_lists_the_flags_that_work_grouped_with_recipe_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(ucf.Ucf101Arguments, ["--help"], ucf.TASK.defaults)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    groups = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert groups[-5:] == ["task data", "model and method", "training", "evaluation", "other transformers flags"]
    for flag in ("--use_lora", "--data_dir", "--max_eval_samples", "--batch_size_per_gpu", "--learning_rate",
                 "--eval_strategy", "--report_to", "--optim", "--torch_compile"):
        assert flag in text
    # transformers' names that the recipes refuse are not offered
    for refused in ("--weight_decay", "--per_device_train_batch_size", "--gradient_accumulation_steps",
                    "--gradient_checkpointing", "--per_device_eval_batch_size"):
        assert refused not in text
    flat = " ".join(text.split())
    # the recipe's defaults, not transformers'
    for flag, default in (("--adam_beta2", "0.95"), ("--adam_epsilon", "1e-07"), ("--warmup_steps", "50"),
                          ("--activation_checkpointing, --no_activation_checkpointing", "on"),
                          ("--wd", "0.01"), ("--learning_rate", str(ucf.TASK.defaults["learning_rate"]))):
        assert re.search(rf"{re.escape(flag)} \S+ .*?\(default: {re.escape(default)}\)", flat), flag
    assert "none for LoRA" in flat and "ds_configs/zero2.json" in flat and str(Path.cwd()) not in flat
    assert len(text.splitlines()) < 300


def test_original_optimisation_settings_are_the_defaults(tmp_path):
    model_args, data_args, args = parse_args(ucf.Ucf101Arguments, ["--output_dir", str(tmp_path), "--use_lora"],
                                             ucf.TASK.defaults)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.95, 1e-7)
    assert (str(args.lr_scheduler_type.value), args.warmup_steps, args.max_grad_norm) == ("linear", 50, 1.0)
    assert args.activation_checkpointing is True and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert (args.dataloader_num_workers, args.dataloader_prefetch_factor) == (min(4, len(os.sched_getaffinity(0))), 2)
    assert args.weight_decay == args.wd == 0.01
    # each still overridable by its flag
    _, _, args = parse_args(ucf.Ucf101Arguments, ["--output_dir", str(tmp_path), "--use_lora", "--adam_beta2", "0.999",
                                                  "--warmup_steps", "0", "--dataloader_num_workers", "0",
                                                  "--no_activation_checkpointing", "--wd", "0"], ucf.TASK.defaults)
    assert (args.adam_beta2, args.warmup_steps, args.dataloader_num_workers) == (0.999, 0, 0)
    assert args.dataloader_prefetch_factor is None and args.activation_checkpointing is False
    assert args.weight_decay == 0


@pytest.mark.parametrize("flags, ours, libraries", [
    ([], logging.INFO, None),  # default: the recipe's progress lines, the libraries as they are
    (["--log_level", "error"], logging.ERROR, logging.ERROR),
    (["--log_level", "debug"], logging.DEBUG, logging.DEBUG),
])
def test_log_level_sets_the_process_log_levels(flags, ours, libraries, tmp_path):
    import datasets
    import transformers

    from recipe.runner import _setup_logging

    before = transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    try:
        *_, args = parse_args(ucf.Ucf101Arguments, ["--output_dir", str(tmp_path), "--use_lora", *flags],
                              ucf.TASK.defaults)
        _setup_logging(args)
        assert logging.getLogger("recipe").level == ours
        if libraries is None:
            assert (transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity()) == before
        else:
            assert transformers.utils.logging.get_verbosity() == datasets.utils.logging.get_verbosity() == libraries
    finally:
        transformers.utils.logging.set_verbosity(before[0])
        datasets.utils.logging.set_verbosity(before[1])
        logging.getLogger("recipe").setLevel(logging.NOTSET)


def test_script_ends_a_user_error_with_one_line_and_status_2(tmp_path):
    script = Path(ucf.__file__)
    proc = subprocess.run([sys.executable, str(script), "--learning_rat", "5", "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: unknown flag --learning_rat (did you mean --learning_rate"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [line for line in lines if "Warning" in line or "kernels" in line], proc.stderr


# -- 5 and 7. a LoRA run: outputs, tensorboard, merged model -------------------------------


@pytest.fixture(scope="module")
def lora_run(tiny_checkpoint, ucf101_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run(ucf.TASK, flags(
            tiny_checkpoint, ucf101_data, out, "--use_lora", "--merge_lora", "--report_to", "tensorboard",
            "--max_steps", 3, "--batch_size", 2, "--batch_size_per_gpu", 2, "--learning_rate", "1e-2",
            "--max_eval_samples", 3, "--save_steps", 2, "--save_dtype", "float32",  # exact merged logits
            # mid-training evaluation with the task metric, and the best checkpoint as the result
            "--eval_strategy", "steps", "--eval_steps", 2, "--load_best_model_at_end",
        ))
    finally:
        torch.set_num_threads(threads)
    return out, results


def test_run_writes_its_outputs(lora_run, ucf101_data):
    out, results = lora_run
    test_ids = [json.loads(line)["id"] for line in (ucf101_data / "ucf101_test.jsonl").read_text().splitlines()]
    for name in ("eval_before", "eval_after"):
        written = read_json(out / f"{name}.json")
        assert written["metric"] == "accuracy" and written["num_examples"] == 3
        assert written["accuracy"] == results[name]
        assert [p["id"] for p in written["predictions"]] == list(subset(test_ids, 3, seed=42))  # --max_eval_samples
        assert all(isinstance(p["prediction"], str) and p["references"] for p in written["predictions"])
    summary = read_json(out / RUN_COMPLETE_FILE)
    assert summary["results"]["global_step"] == 3 and summary["model_args"]["use_lora"]
    args = summary["training_args"]
    assert (args["learning_rate"], args["seed"], args["lr_scheduler_type"], args["adam_beta2"]) == (1e-2, 42, "linear", 0.95)
    assert summary["world_size"] == 1 and summary["versions"]["transformers"] and summary["versions"]["torch"]
    speed = summary["results"]["throughput"]
    first = json.loads((ucf101_data / "ucf101_train.jsonl").read_text().splitlines()[0])
    frames = len(first["conversations"][0]["images"])
    # 3 steps x 2 examples, one video of `frames` images each; 2 crops per image (num_crops 1: global + 1)
    assert speed["images"] == 3 * 2 * frames and speed["crops"] == 2 * speed["images"]
    assert speed["images_per_s"] > 0 and speed["real_tokens_per_s"] > speed["images_per_s"]
    assert speed["peak_memory_gb"] > 0.1 and speed["peak_memory_kind"] == "process peak RSS"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "LoRA (r=64, alpha=128)" in card
    assert f"accuracy before finetuning | {results['eval_before']:.4f}" in card
    assert f"accuracy after finetuning | {results['eval_after']:.4f}" in card
    assert (out / "merged" / "README.md").read_text() == card
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert Phi3VProcessor.from_pretrained(out).tokenizer.pad_token_id is not None
    # Adapters only: no copy of the frozen base lm_head (a LoRA target) in the adapter file.
    from safetensors import safe_open

    for adapter in (out / "adapter_model.safetensors", out / "checkpoint-2" / "adapter_model.safetensors"):
        with safe_open(adapter, "pt") as f:
            assert f.keys() and all(".lora_" in key for key in f.keys()), adapter


def test_tensorboard_logs_the_loss_and_the_task_metric(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results = lora_run
    scalars: dict[str, list] = {}
    for run_dir in {p.parent for p in (out / "runs").rglob("events.out.tfevents.*")}:
        events = EventAccumulator(str(run_dir))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(events.Scalars(tag))
    assert len(scalars["train/loss"]) == 3
    # before (step 0), during (steps 2 and 3, the Trainer's evaluation at the last step), after (step 3)
    metric = sorted((e.step, round(e.value, 5)) for e in scalars["eval/accuracy"])
    during = [(n, round(read_json(out / f"eval_step{n}.json")["accuracy"], 5)) for n in (2, 3)]
    assert metric == sorted([(0, round(results["eval_before"], 5)), *during, (3, round(results["eval_after"], 5))])


def test_mid_training_evaluation_picks_the_best_checkpoint(lora_run):
    out, results = lora_run
    during = {n: read_json(out / f"eval_step{n}.json") for n in (2, 3)}
    assert all(d["metric"] == "accuracy" and d["num_examples"] == 3 for d in during.values())
    state = read_json(out / "checkpoint-3" / "trainer_state.json")
    best = state["best_global_step"]
    assert state["best_metric"] == max(d["accuracy"] for d in during.values()) == during[best]["accuracy"]
    # the final adapter is the best checkpoint's, and eval_after measured it
    assert_same_tensors(load_file(out / "adapter_model.safetensors"),
                        load_file(out / f"checkpoint-{best}" / "adapter_model.safetensors"))
    assert read_json(out / "eval_after.json")["predictions"] == during[best]["predictions"]


def test_merged_lora_has_the_adapters_logits(lora_run, tiny_checkpoint, ucf101_data):
    from peft import PeftModel

    out, _ = lora_run
    merged_dir = out / "merged"
    assert load_file(merged_dir / "model.safetensors").keys() == load_file(tiny_checkpoint / "model.safetensors").keys()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert type(merged) is Phi3VForCausalLM
    base = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    base_logits = None
    processor = Phi3VProcessor.from_pretrained(merged_dir)
    conversations, _ = ucf.load_data(ucf.Ucf101Arguments(data_dir=str(ucf101_data)), None)
    batch = Collator(pad_token_id=processor.tokenizer.pad_token_id)(
        [ConversationDataset(conversations[:2], processor)[i] for i in range(2)])
    batch.pop("labels")
    with torch.no_grad():
        base_logits = base(**batch).logits
        adapted = PeftModel.from_pretrained(base, str(out)).eval()
        peft_logits = adapted(**batch).logits
        merged_logits = merged(**batch).logits
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-5, atol=1e-5)


def test_eval_only_evaluates_once(tiny_checkpoint, ucf101_data, tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # no launcher: no DeepSpeed default for evaluation
    out = tmp_path / "out"
    results = run(ucf.TASK, flags(tiny_checkpoint, ucf101_data, out, "--eval_only", "--max_eval_samples", 2))
    assert list(results) == ["eval_after"]
    assert [p.name for p in out.iterdir()] == ["eval_after.json"]
    assert read_json(out / "eval_after.json")["num_examples"] == 2


def test_eval_only_overwrite_keeps_the_model_it_evaluates(tiny_checkpoint, ucf101_data, tmp_path, monkeypatch):
    """--overwrite_output_dir with --eval_only replaces eval_after.json, never the model in that directory."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    out = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, out)
    (out / "eval_after.json").write_text("{}")
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "eval_after.json"}
    flags_ = flags(out, ucf101_data, out, "--eval_only", "--max_eval_samples", 1, "--overwrite_output_dir")
    run(ucf.TASK, flags_)
    assert read_json(out / "eval_after.json")["num_examples"] == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "eval_after.json"} == files


# -- 4. a killed run resumes to exactly the weights of an uninterrupted one ------------------


@pytest.mark.parametrize("mode", [["--use_lora"], []], ids=["lora", "full"])
def test_killed_run_resumes_exactly(mode, tiny_checkpoint, ucf101_data, tmp_path, caplog, capfd):
    caplog.set_level(logging.INFO, logger="recipe")
    # 4 examples, 2 per step: 2 steps per epoch, so the kill after step 3 lands mid-epoch.
    common = ["--deepspeed", "none", "--batch_size", 2, "--batch_size_per_gpu", 1, "--max_steps", 5,
              "--save_steps", 3, "--learning_rate", "1e-3", "--max_eval_samples", 1, "--max_new_tokens", 2, *mode]
    killed = tmp_path / "killed"
    proc = launch(flags(tiny_checkpoint, ucf101_data, killed, *common), env={"RECIPE_TEST_KILL_AFTER_SAVE": "3"},
                  check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (killed / "checkpoint-3" / "trainer_state.json").is_file() and not (killed / RUN_COMPLETE_FILE).exists()
    # As if the next save had been cut short as well: resuming must not pick it.
    (killed / "checkpoint-4").mkdir()
    (killed / "checkpoint-4" / "config.json").write_text("{")

    capfd.readouterr()
    resumed = run(ucf.TASK, flags(tiny_checkpoint, ucf101_data, killed, *common, "--resume_from_checkpoint", "auto"))
    resume_stderr = capfd.readouterr().err
    # no warnings about the checkpoint's config (the release's RoPE keys read by a generic class)
    assert "rope" not in resume_stderr.lower(), resume_stderr
    uninterrupted = run(ucf.TASK, flags(tiny_checkpoint, ucf101_data, tmp_path / "straight", *common))

    assert resumed["global_step"] == uninterrupted["global_step"] == 5
    assert resumed["eval_before"] == uninterrupted["eval_before"]
    # the training loss of the whole run, not of the resumed part only
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-5)
    assert "resuming from " + str(killed / "checkpoint-3") in caplog.text
    weights = "adapter_model.safetensors" if mode else "model.safetensors"
    assert_same_tensors(load_file(killed / weights), load_file(tmp_path / "straight" / weights))
    history = [h for h in read_json(killed / "checkpoint-5" / "trainer_state.json")["log_history"] if "loss" in h]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_killed_deepspeed_run_resumes_exactly(tiny_checkpoint, ucf101_data, tmp_path):
    common = ["--batch_size", 2, "--batch_size_per_gpu", 1, "--max_steps", 5, "--save_steps", 3,
              "--learning_rate", "1e-3", "--skip_eval_before", "--max_eval_samples", 1, "--max_new_tokens", 2]
    killed = tmp_path / "killed"
    proc = launch(flags(tiny_checkpoint, ucf101_data, killed, *common), torchrun_procs=1,
                  env={"RECIPE_TEST_KILL_AFTER_SAVE": "3"}, check=False)
    assert proc.returncode != 0 and (killed / "checkpoint-3" / "trainer_state.json").is_file()
    launch(flags(tiny_checkpoint, ucf101_data, killed, *common, "--resume_from_checkpoint", "auto"), torchrun_procs=1)
    launch(flags(tiny_checkpoint, ucf101_data, tmp_path / "straight", *common), torchrun_procs=1)
    assert_same_tensors(load_file(killed / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors"))


# -- 2. DeepSpeed ZeRO-2 full finetuning under torchrun ---------------------------------------


# CI covers both stages with the 2-rank bf16 runs of test_distributed.py (which also check the
# default ZeRO-2 config, the partitioned optimizer state and the saved official format); these
# fp32 runs repeat that at the cost of two more DeepSpeed launches.
@pytest.mark.slow
def test_deepspeed_zero2_trains_and_saves_official_format(tiny_checkpoint, ucf101_data, tmp_path):
    out = tmp_path / "out"
    # No --deepspeed flag: full finetuning defaults to ds_configs/zero2.json.
    launch(flags(tiny_checkpoint, ucf101_data, out, "--max_steps", 2, "--batch_size", 2, "--batch_size_per_gpu", 1,
                 "--learning_rate", "1e-3", "--save_steps", 2, "--skip_eval_before", "--max_eval_samples", 1),
           torchrun_procs=2)
    zero_files = [p.name for p in (out / "checkpoint-2" / "global_step2").iterdir()]
    assert sum("optim_states" in name for name in zero_files) == 2  # optimizer state partitioned over 2 ranks
    assert read_json(out / "config.json")["model_type"] == "phi3_v"
    saved, initial = load_file(out / "model.safetensors"), load_file(tiny_checkpoint / "model.safetensors")
    assert saved.keys() == initial.keys()  # the official parameter names
    assert all(saved[k].dtype == torch.bfloat16 for k in saved)  # the release's dtype (--save_dtype)
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is Phi3VForCausalLM
    assert_same_tensors({k: v for k, v in reloaded.state_dict().items() if k in saved}, saved)


@pytest.mark.slow
def test_deepspeed_zero3_evaluates_trains_and_saves(tiny_checkpoint, ucf101_data, tmp_path):
    """ZeRO-3 partitions the weights at load time: the evaluation before training has to run
    through the DeepSpeed engine (generate with synced ranks), and saving gathers them back."""
    out = tmp_path / "out"
    zero3 = Path(ucf.__file__).parent / "ds_configs" / "zero3.json"
    launch(flags(tiny_checkpoint, ucf101_data, out, "--deepspeed", zero3, "--max_steps", 2,
                 "--batch_size", 2, "--batch_size_per_gpu", 2, "--learning_rate", "1e-3", "--save_steps", 2,
                 "--max_eval_samples", 2), torchrun_procs=1)
    before, after = read_json(out / "eval_before.json"), read_json(out / "eval_after.json")
    assert before["num_examples"] == after["num_examples"] == 2
    saved, initial = load_file(out / "model.safetensors"), load_file(tiny_checkpoint / "model.safetensors")
    assert saved.keys() == initial.keys()
    assert all(saved[k].shape == initial[k].shape for k in saved)  # gathered, not partitioned shards
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)


# -- 3 and 7. two processes: data parallel training, identical evaluation, rank 0 writes -----


@pytest.fixture(scope="module")
def two_rank_run(tiny_checkpoint, ucf101_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_ranks")
    out, writes = root / "out", root / "writes"
    writes.mkdir()
    # 3 evaluation examples, batches of 1: rank 0 generates twice, rank 1 once plus a dummy call.
    proc = launch(flags(tiny_checkpoint, ucf101_data, out, "--deepspeed", "none", "--use_lora", "--merge_lora",
                        "--max_steps", 2, "--batch_size", 2, "--batch_size_per_gpu", 1, "--learning_rate", "1e-2",
                        "--save_steps", 1, "--max_eval_samples", 3, "--eval_batch_size", 1,
                        "--report_to", "tensorboard"),
                  env={"RECIPE_TEST_WRITE_LOG": str(writes)}, torchrun_procs=2)
    return out, writes, proc.stdout, proc.stderr


def test_two_ranks_train_data_parallel(two_rank_run):
    out, _, stdout, _ = two_rank_run
    history = read_json(out / "checkpoint-2" / "trainer_state.json")["log_history"]
    # Each step consumes the global batch of 2 of the 4 examples: half an epoch, not a quarter
    # (which is what two independent single-process trainings would log).
    assert [h["epoch"] for h in history if "loss" in h] == [0.5, 1.0]
    assert read_json(out / RUN_COMPLETE_FILE)["results"]["global_step"] == 2
    assert stdout.count("eval_after accuracy") == 1  # only rank 0 logs


# Messages a user cannot act on, and deprecations our own calls would cause.
NOISE = ("kernels-community", "FutureWarning", "DeprecationWarning", "is_gradient_checkpointing",
         "Setting accelerator to CPU", "all_gather_into_tensor", "Traceback")


def test_a_run_is_quiet(two_rank_run):
    *_, stderr = two_rank_run
    assert not [line for line in stderr.splitlines() if any(n in line for n in NOISE)], stderr[-3000:]


def test_two_rank_evaluation_equals_one_rank(two_rank_run, tiny_checkpoint, ucf101_data):
    from peft import PeftModel

    out, *_ = two_rank_run
    processor = Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=1)
    _, conversations = ucf.load_data(ucf.Ucf101Arguments(data_dir=str(ucf101_data), eval_only=True), None)
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    for name in ("eval_before", "eval_after"):
        if name == "eval_after":
            model = PeftModel.from_pretrained(model, str(out))  # (adds the adapter in place)
        # --max_eval_samples 3: the seeded subset (default --seed 42)
        one_rank = evaluate(model, processor, subset(conversations, 3, seed=42), ucf.score, "accuracy", None,
                            batch_size=2, max_new_tokens=4)
        assert read_json(out / f"{name}.json") == one_rank, name
    assert read_json(out / "eval_before.json") != read_json(out / "eval_after.json")


def test_only_rank_zero_writes_shared_files(two_rank_run):
    out, writes, *_ = two_rank_run

    def written(rank) -> set[tuple[str, Path]]:
        events = (line.split(" ", 1) for line in (writes / f"rank{rank}.txt").read_text().splitlines())
        return {(event, Path(path).relative_to(out)) for event, path in events if path.startswith(f"{out}{os.sep}")}

    rank0, rank1 = written(0), written(1)
    names0 = {path.name for _, path in rank0}
    for name in ("eval_before.json", "eval_after.json", RUN_COMPLETE_FILE, "training_curves.png"):
        assert any(n == name or n.startswith(f".{name}") for n in names0), name
    assert {path.parts[0] for _, path in rank0} >= {"runs", "merged", TMP_DIR, "adapter_config.json"}
    # Checkpoints are written under .checkpoint-tmp/ and published by rank 0's rename.
    assert ("os.rename", Path(TMP_DIR, "checkpoint-2")) in rank0
    # Rank 1 only creates the checkpoint directories (if rank 0 has not yet) and writes its RNG state into them.
    assert rank1, "the write log of rank 1 is empty"
    for event, path in rank1:
        assert path.parts[0] == TMP_DIR and (len(path.parts) == 1 or path.parts[1].startswith("checkpoint-")), path
        assert (event, path.parts[2:]) in {("os.mkdir", ()), ("open", ("rng_state_1.pth",))}, (event, path)


def test_overwrite_output_dir_starts_over(tiny_checkpoint, ucf101_data, tmp_path):
    """Checkpoints of an earlier run must not survive --overwrite_output_dir: they could be
    resumed by mistake, or rotated away instead of the new ones."""
    out = tmp_path / "out"
    (out / "checkpoint-900").mkdir(parents=True)
    (out / "checkpoint-900" / "trainer_state.json").write_text("{}")
    (out / RUN_COMPLETE_FILE).write_text("{}")
    earlier = ["model.safetensors", "config.json", "README.md", "eval_step7.json", "merged/model.safetensors",
               "runs/old/events.out.tfevents.1"]
    for name in earlier:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("old")
    (out / "my_notes.txt").write_text("the user's own file")
    run(ucf.TASK, [str(a) for a in flags(tiny_checkpoint, ucf101_data, out, "--deepspeed", "none",
                                         "--overwrite_output_dir", "--max_steps", 1, "--batch_size", 1,
                                         "--save_steps", 1, "--max_eval_samples", 1, "--skip_eval_before")])
    assert not (out / "checkpoint-900").exists() and (out / "checkpoint-1" / "trainer_state.json").is_file()
    assert read_json(out / RUN_COMPLETE_FILE)["results"]["global_step"] == 1
    for name in earlier:
        assert not (out / name).exists() or (out / name).read_bytes() != b"old", name
    assert not (out / "merged").exists() and (out / "my_notes.txt").read_text() == "the user's own file"
