"""Preference tuning end to end on the tiny model (finetune_hf_trainer_rlaif_v.py): LoRA DPO on our
own jsonl pairs raises held-out reward accuracy, the reference of each mode is what it should be
(LoRA: the base with adapters disabled; full: a frozen copy that never moves), images are encoded
once per pair and pass (twice with a separate reference, once when the vision side is frozen),
reference log-probs are precomputed and reused, a stopped run resumes exactly, bad input stops
before training with one line. --adapter continues an SFT adapter against its frozen twin;
--eval_only measures against the run's starting point; --metric adds a generation metric."""

import dataclasses
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import finetune_hf_trainer_rlaif_v as rlaif_v
from phi3v.modeling_phi3v import Phi3VForCausalLM, Phi3VImageEmbedding
from phi3v.processing_phi3v import Phi3VProcessor
from recipe.args import ModelArguments
from recipe.dpo import DPOLoss
from recipe.errors import cli
from recipe.pairs import PairCollator, PairDataset, pair_log_probs
from recipe import preference
from recipe.preference import LogProbs, PairEvaluator, Reference
from recipe.pair_layouts import load_pairs_jsonl
from recipe.synthetic_pairs import write_pairs
from recipe.task import run


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """48 training / 16 held-out colour pairs (images), plus 2 text-only pairs in each split."""
    return write_pairs(tmp_path_factory.mktemp("pairs") / "data", train=48, eval_=16, text_only=2)


def flags(tiny, data, out, *extra):
    return ["--model_name_or_path", str(tiny), "--train_file", str(data / "train.jsonl"),
            "--eval_file", str(data / "eval.jsonl"), "--output_dir", str(out), "--num_crops", "1", "--no-tqdm",
            "--dataloader_num_workers", "0", "--warmup_steps", "0", "--logging_steps", "1", "--save_strategy", "no",
            "--eval_batch_size", "10", *map(str, extra)]


def read_json(path):
    return json.loads(path.read_text())


LORA_PASSES: list[str] = []  # lora_run's log-prob passes over a whole dataset, by description


@pytest.fixture(scope="module")
def lora_run(tiny_checkpoint, pairs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    log_probs = preference.dataset_log_probs
    LORA_PASSES.clear()
    patch = pytest.MonkeyPatch()
    patch.setattr(preference, "dataset_log_probs",
                  lambda *args, **kwargs: LORA_PASSES.append(kwargs["desc"]) or log_probs(*args, **kwargs))
    try:
        results = run(rlaif_v.TASK, flags(tiny_checkpoint, pairs_dir, out, "--use_lora", "--deepspeed", "none",
                                          "--max_steps", 16, "--batch_size", 8, "--batch_size_per_gpu", 4,
                                          "--learning_rate", "2e-3", "--report_to", "tensorboard",
                                          "--eval_strategy", "steps", "--eval_steps", 8))
    finally:
        torch.set_num_threads(threads)
        patch.undo()
    return out, results


def test_lora_dpo_raises_held_out_reward_accuracy(lora_run):
    out, results = lora_run
    before, after = read_json(out / "eval_before.json"), read_json(out / "eval_after.json")
    assert results["eval_before"] == before["rewards/accuracies"] == 0.0  # the policy is the reference
    assert before["rewards/margins"] == 0.0
    # the model before training is the reference: eval_before takes the reference pass's log-probs
    assert LORA_PASSES == ["reference log-probs (evaluation)", "eval_step8", "eval_step16", "eval_after"]
    reference = torch.load(out / "ref_log_probs_eval.pt", weights_only=True)
    assert before["logps/chosen"] == pytest.approx(float(reference["chosen"].mean()))
    assert [p["logps/rejected"] for p in before["pairs"]] == pytest.approx(reference["rejected"].tolist())
    assert results["eval_after"] == after["rewards/accuracies"] >= 0.75
    assert after["rewards/margins"] > 0 and after["rewards/chosen"] > after["rewards/rejected"]
    assert after["num_examples"] == len(after["pairs"]) == 18
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert isinstance(after[name], float)
    summary = read_json(out / "run_complete.json")
    throughput = summary["results"]["throughput"]
    assert 16 * 6 < throughput["pairs"] <= 16 * 8 and throughput["pairs_per_s"] > 0  # (epoch ends: smaller batches)
    assert throughput["images"] < throughput["pairs"]  # each image once per pair; text-only pairs have none
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_curves.png").is_file()
    # the model card and the release's eos are the SFT recipes'; the card names DPO and its flags, and
    # the reward before training as the reference's (0 by construction)
    card = (out / "README.md").read_text()
    assert "| method | LoRA (r=" in card and "), DPO (--loss_type sigmoid, --beta 0.1) |" in card
    assert "| rewards/accuracies before finetuning | 0.0000 (the reference: 0 by construction) |" in card
    assert "| rewards/accuracies after finetuning |" in card and "(linear, 0 warmup steps)" in card
    assert read_json(out / "adapter_config.json")["base_model_name_or_path"]


def test_training_logs_trl_metric_names_to_tensorboard(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = lora_run
    scalars: dict[str, list] = {}
    for run_dir in {p.parent for p in (out / "runs").rglob("events.out.tfevents.*")}:
        events = EventAccumulator(str(run_dir))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(events.Scalars(tag))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert f"train/{name}" in scalars, (name, sorted(scalars))
        # before (step 0), --eval_strategy steps (8 and the last, 16), after (16): each logged once
        assert sorted(e.step for e in scalars[f"eval/{name}"]) == [0, 8, 16, 16], name
    during = read_json(out / "eval_step8.json")
    assert [e.value for e in scalars["eval/rewards/margins"] if e.step == 8] == [
        pytest.approx(during["rewards/margins"])]


def test_model_card_names_the_dpo_flags_and_the_warmup_steps_of_a_ratio(tiny_checkpoint, pairs_dir, tmp_path):
    """rlaif_v's default --warmup_steps 0.1 is a ratio: the card prints the steps it made."""
    from recipe.flag_parser import build_training_args
    from recipe.report import model_card
    from recipe.task import task_flags

    argv = flags(tiny_checkpoint, pairs_dir, tmp_path / "out", "--use_lora", "--loss_type", "robust", "--beta", 0.2,
                 "--label_smoothing", 0.1)
    at = argv.index("--warmup_steps")
    parsed = task_flags(rlaif_v.TASK, argv[:at] + argv[at + 2:])
    training_args = build_training_args(parsed)
    assert training_args.warmup_steps == 0.1
    card = model_card(rlaif_v.TASK, {"global_step": 25}, parsed.model, parsed.data, training_args, max_steps=25,
                      objective=preference.Preference())
    assert "(linear, 3 warmup steps)" in card  # ceil(0.1 x 25)
    assert "), DPO (--loss_type robust, --beta 0.2, --label_smoothing 0.1) |" in card
    assert "| rewards/accuracies before finetuning | - |" in card  # (no evaluation before: nothing to say)


# -- the reference per mode ----------------------------------------------------------------------


def pair_batch(tiny, data, n=4):
    processor = Phi3VProcessor.from_pretrained(tiny, num_crops=1)
    pairs = load_pairs_jsonl(data / "eval.jsonl", data / "images")
    dataset = PairDataset([pairs[0], pairs[-1], *pairs[1 : n - 1]], processor)  # an image and a text-only pair
    return PairCollator(pad_token_id=processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def test_lora_reference_is_the_base_with_adapters_disabled(tiny_checkpoint, pairs_dir):
    batch = pair_batch(tiny_checkpoint, pairs_dir)
    base = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = pair_log_probs(base, batch)
    lora = get_peft_model(Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32),
                          LoraConfig(r=4, target_modules=["qkv_proj", "o_proj"], init_lora_weights=False)).eval()
    with torch.no_grad():
        policy = pair_log_probs(lora, batch)
    assert not torch.allclose(policy.chosen_logps, expected.chosen_logps)  # the adapters do change the model
    args = SimpleNamespace(use_lora=True, freeze_vision_model=False)
    reference = Reference(args, SimpleNamespace(precompute_ref_log_probs=False, eval_batch_size=2), None)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    chosen, rejected = reference.log_probs(trainer, lora, batch, policy)
    torch.testing.assert_close(chosen, expected.chosen_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(rejected, expected.rejected_logps, rtol=0, atol=1e-5)


def test_dataset_log_probs_are_the_same_with_data_workers(tiny_checkpoint, pairs_dir):
    """The reference pass (--precompute_ref_log_probs, the held-out pairs) builds its batches in
    --dataloader_num_workers workers: the same batches, in the same order, the same log-probs."""
    processor = Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=1)
    pairs = list(load_pairs_jsonl(pairs_dir / "eval.jsonl", pairs_dir / "images"))
    dataset = preference.IndexedPairDataset([*pairs[:4], pairs[-1]], processor)  # images and a text-only pair
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    collator = preference._collator(processor, model)
    inline = preference.dataset_log_probs(model, dataset, collator, 2, "cpu")
    workers = preference.dataset_log_probs(model, dataset, collator, 2, "cpu",
                                           loader_kwargs=dict(num_workers=2, prefetch_factor=1, timeout=60))
    for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        assert torch.equal(getattr(inline, name), getattr(workers, name)), name
    assert len(inline.chosen) == 5 and inline.chosen_tokens.min() > 0
    with torch.no_grad():  # pair 3 alone: its entry is its own, not another pair's
        alone = pair_log_probs(model.eval(), collator([dataset[3]]))
    torch.testing.assert_close(inline.chosen[3], alone.chosen_logps[0], rtol=0, atol=1e-4)


def count_vision_runs(monkeypatch) -> list[int]:
    runs = []
    forward = Phi3VImageEmbedding.forward
    monkeypatch.setattr(Phi3VImageEmbedding, "forward", lambda self, *a, **k: runs.append(1) or forward(self, *a, **k))
    return runs


@pytest.mark.parametrize("frozen_vision", [False, True], ids=["full", "frozen_vision"])
def test_full_reference_is_a_frozen_copy_and_images_are_encoded_once_per_model(
        frozen_vision, tiny_checkpoint, pairs_dir, tmp_path, monkeypatch):
    """Each step, one image-only micro-batch: the policy encodes its images once, the frozen copy
    once more, or not at all when the vision side is frozen (it takes the policy's features)."""
    import recipe.preference

    seen = {}
    prepare = recipe.preference.Reference.prepare

    def keep(self, trainer, *args, **kwargs):
        prepare(self, trainer, *args, **kwargs)
        seen["reference"], seen["trainer"] = self, trainer
        seen["runs"] = count_vision_runs(monkeypatch)  # training steps (and evaluation after) from here
        seen["steps"] = []
        trainer.add_callback(type("Step", (recipe.preference.TrainerCallback,), {
            "on_step_end": lambda cb, args, state, control, **kw: seen["steps"].append(len(seen["runs"]))})())

    monkeypatch.setattr(recipe.preference.Reference, "prepare", keep)
    out = tmp_path / "out"
    extra = ["--freeze_vision_model"] if frozen_vision else []
    run(rlaif_v.TASK, flags(tiny_checkpoint, pairs_dir, out, "--deepspeed", "none", "--max_steps", 3,
                            "--batch_size", 2, "--batch_size_per_gpu", 2, "--learning_rate", "1e-3",
                            "--train_sampling_strategy", "sequential", "--skip_eval_before", *extra))
    reference = seen["reference"]
    assert reference.mode == "copy" and reference.reuse_features == frozen_vision
    per_step = [b - a for a, b in zip([0, *seen["steps"]], seen["steps"])]
    assert per_step == [1 if frozen_vision else 2] * 3  # (sequential: the first 6 pairs, all with an image)
    initial = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).state_dict()
    copy = reference.copy.state_dict()
    assert all(torch.equal(copy[k].float(), initial[k].float()) for k in initial)
    assert not any(p.requires_grad for p in reference.copy.parameters())
    trained = load_file(out / "model.safetensors")
    assert any(not torch.equal(trained[k].float(), initial[k].float()) for k in trained if ".layers.0." in k)
    # the output is the release's: its eos_token_id stays (no tokenizer-driven rewrite at train start)
    assert read_json(out / "config.json")["eos_token_id"] == read_json(tiny_checkpoint / "config.json")["eos_token_id"]


# -- continuing an SFT adapter (--adapter) ------------------------------------------------------


@pytest.fixture(scope="module")
def sft_adapter(tiny_checkpoint, tmp_path_factory):
    """A LoRA output as an SFT run leaves it (random, non-zero adapters on the language side)."""
    out = tmp_path_factory.mktemp("sft") / "lora"
    torch.manual_seed(0)
    model = get_peft_model(Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["qkv_proj", "o_proj", "down_proj"], init_lora_weights=False))
    model.save_pretrained(str(out))
    return out


def lora_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    """One adapter's weights under their saved names (adapter_model.safetensors' keys)."""
    return {k.replace(f".{adapter}.", "."): v.detach().clone() for k, v in model.state_dict().items()
            if f".{adapter}." in k}


def test_adapter_reference_is_base_plus_the_starting_adapter(tiny_checkpoint, pairs_dir, sft_adapter, tmp_path):
    from recipe.args import ModelArguments
    from recipe.model import REFERENCE_ADAPTER, load_model

    batch = pair_batch(tiny_checkpoint, pairs_dir)
    base = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    model = load_model(ModelArguments(model_name_or_path=str(tiny_checkpoint), use_lora=True),
                       SimpleNamespace(bf16=False, fp16=False, deepspeed=None), adapter=str(sft_adapter),
                       reference_adapter=True)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".default." in name for name in trainable)
    assert sum(f".{REFERENCE_ADAPTER}." in name for name, _ in model.named_parameters()) == len(trainable)
    saved = load_file(sft_adapter / "adapter_model.safetensors")
    for adapter in ("default", REFERENCE_ADAPTER):
        loaded = lora_weights(model, adapter)
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    model.train()
    with torch.no_grad():
        expected = pair_log_probs(base, batch)
    policy = pair_log_probs(model, batch)
    assert not torch.allclose(policy.chosen_logps, expected.chosen_logps)  # the SFT adapter changes the model
    reference = Reference(SimpleNamespace(use_lora=True, freeze_vision_model=False),
                          SimpleNamespace(precompute_ref_log_probs=False, eval_batch_size=2, adapter=str(sft_adapter)),
                          None)
    assert reference.mode == "adapter"
    trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    chosen, rejected = reference.log_probs(trainer, model, batch, policy)
    # before any step the policy is its reference: every reward is 0
    torch.testing.assert_close(chosen, policy.chosen_logps.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(rejected, policy.rejected_logps.detach(), rtol=0, atol=1e-6)
    assert {name for name, param in model.named_parameters() if param.requires_grad} == trainable
    assert model.active_adapter == "default"
    # the output is the trained adapter alone, in the layout of any LoRA output
    model.save_pretrained(str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "adapter_config.json",
                                                                    "adapter_model.safetensors"]
    assert load_file(tmp_path / "out" / "adapter_model.safetensors").keys() == saved.keys()


def test_dpo_continues_an_sft_adapter_against_it(tiny_checkpoint, pairs_dir, sft_adapter, tmp_path, monkeypatch):
    """--adapter: the first step's rewards are 0 (policy = reference = base + SFT adapter), the
    adapter trains, its reference twin does not move, and the output is the trained adapter."""
    import recipe.preference

    seen = {}
    prepare = recipe.preference.Reference.prepare

    def keep(self, trainer, model, *args, **kwargs):
        prepare(self, trainer, model, *args, **kwargs)
        seen["reference"], seen["trainer"] = self, trainer

    monkeypatch.setattr(recipe.preference.Reference, "prepare", keep)
    out = tmp_path / "out"
    results = run(rlaif_v.TASK, flags(tiny_checkpoint, pairs_dir, out, "--use_lora", "--adapter", sft_adapter,
                                      "--deepspeed", "none", "--max_steps", 2, "--batch_size", 2,
                                      "--batch_size_per_gpu", 2, "--learning_rate", "1e-2", "--max_eval_samples", 4))
    assert results["global_step"] == 2 and seen["reference"].mode == "adapter"
    first = next(entry for entry in seen["trainer"].state.log_history if "loss" in entry)
    assert first["step"] == 1 and abs(first["rewards/margins"]) < 1e-6 and abs(first["rewards/chosen"]) < 1e-6
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-4)  # -log sigmoid(0) (the Trainer logs 4 decimals)
    model = seen["trainer"].model
    saved = load_file(sft_adapter / "adapter_model.safetensors")
    still = lora_weights(model, "reference")
    assert all(torch.equal(still[k], saved[k]) for k in saved)
    trained = load_file(out / "adapter_model.safetensors")
    assert trained.keys() == saved.keys() and any(not torch.equal(trained[k], saved[k]) for k in saved)
    assert not (out / "reference").exists()
    assert read_json(out / "adapter_config.json")["r"] == 4  # the adapter's own shape, not --lora_rank's 64


def test_adapter_flag_errors(tiny_checkpoint, pairs_dir, sft_adapter, tmp_path, capsys):
    cases = [
        (["--deepspeed", "none", "--adapter", sft_adapter], f"--adapter {sft_adapter} continues a LoRA adapter"),
        (["--use_lora", "--adapter", tmp_path], "no adapter_config.json (not a LoRA output directory)"),
        (["--use_lora", "--ref_model", tiny_checkpoint], "--ref_model goes with --eval_only"),
        (["--eval_only"], "is a full model: pass --ref_model PATH"),
    ]
    for extra, message in cases:
        code = cli(lambda: rlaif_v.TASK.run(flags(tiny_checkpoint, pairs_dir, tmp_path / "out", *extra)))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (extra, err)


# -- --eval_only -----------------------------------------------------------------------------------


def test_eval_only_measures_rewards_against_the_runs_starting_point(lora_run, tiny_checkpoint, pairs_dir, tmp_path):
    """A LoRA output's rewards against its base (adapters disabled), as its run measured them;
    --ref_model names the reference instead (here the other way round: the margins flip)."""
    out, _ = lora_run
    own = read_json(out / "eval_after.json")
    again = run(rlaif_v.TASK, flags(out, pairs_dir, tmp_path / "lora", "--eval_only"))
    evaluated = read_json(tmp_path / "lora" / "eval_after.json")
    assert again == {"eval_after": own["rewards/accuracies"]}
    assert evaluated["reference"] == "the base model (adapters disabled)"
    assert not (tmp_path / "lora" / "eval_before.json").exists()
    for a, b in zip(evaluated["pairs"], own["pairs"]):
        assert a["id"] == b["id"] and a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    run(rlaif_v.TASK, flags(tiny_checkpoint, pairs_dir, tmp_path / "flipped", "--eval_only", "--ref_model", out))
    flipped = read_json(tmp_path / "flipped" / "eval_after.json")
    assert flipped["reference"] == str(out)
    for a, b in zip(flipped["pairs"], own["pairs"]):
        assert a["rewards/margins"] == pytest.approx(-b["rewards/margins"], abs=1e-5)


def test_eval_only_ref_model_runs_in_the_compute_dtype(tiny_checkpoint, monkeypatch):
    """--ref_model only runs forwards: with --bf16 it runs in bf16 (as training's frozen copy), not
    in the fp32 load_model gives a full model the optimiser would step."""
    loaded, seen = [], []
    monkeypatch.setattr(preference, "load_model", lambda model_args, training_args: loaded.append(
        Phi3VForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=torch.float32)) or loaded[-1])
    evaluator = PairEvaluator.__new__(PairEvaluator)
    evaluator.seconds, evaluator.ref_model = 0.0, str(tiny_checkpoint)
    evaluator.model_args = ModelArguments(model_name_or_path="base", use_lora=True)
    evaluator.training_args = SimpleNamespace(bf16=True, fp16=False)
    evaluator._log_probs = lambda model, desc: seen.append({p.dtype for p in model.parameters()}) or "log-probs"
    evaluator.prepare_eval_only_reference(None)
    assert seen == [{torch.bfloat16}] and evaluator.reference == "log-probs"
    assert not any(p.requires_grad for p in loaded[0].parameters())


def test_generation_metric_of_the_prompts_against_the_chosen_answers(lora_run, pairs_dir, tmp_path):
    """--metric: answers generated to the held-out prompts, scored against the chosen answer,
    next to the reward metrics."""
    from recipe.metrics import exact_match

    out, _ = lora_run
    run(rlaif_v.TASK, flags(out, pairs_dir, tmp_path / "eval", "--eval_only", "--metric", "exact_match",
                            "--max_new_tokens", 3, "--max_eval_samples", 4))
    evaluated = read_json(tmp_path / "eval" / "eval_after.json")
    pairs = {json.loads(line)["id"]: json.loads(line) for line in (pairs_dir / "eval.jsonl").read_text().splitlines()}
    predictions = evaluated["predictions"]
    assert [p["id"] for p in predictions] == [p["id"] for p in evaluated["pairs"]] and len(predictions) == 4
    assert all(p["references"] == [pairs[p["id"]]["chosen"]] for p in predictions)
    assert evaluated["exact_match"] == exact_match([p["prediction"] for p in predictions],
                                                   [p["references"] for p in predictions])
    assert evaluated["metric"] == "rewards/accuracies" and isinstance(evaluated["rewards/margins"], float)


# -- precomputed reference and exact resume ----------------------------------------------------


@pytest.mark.parametrize("mode", [["--use_lora", "--precompute_ref_log_probs"], [], ["--use_lora", "--adapter"]],
                         ids=["lora_precomputed", "full", "sft_adapter"])
def test_stopped_run_resumes_exactly(mode, tiny_checkpoint, pairs_dir, sft_adapter, tmp_path):
    """An uninterrupted run saves at steps 2 and 4; a second directory holding what the run had
    written by step 2 (checkpoint-2, the reference log-probs, eval_before.json) resumes to the
    same weights and the same held-out metrics. (--adapter: the trained adapter resumes, its
    frozen twin is loaded from --adapter again.)"""
    mode = [*mode, sft_adapter] if "--adapter" in mode else mode
    common = ["--deepspeed", "none", "--max_steps", 4, "--save_strategy", "steps", "--save_steps", 2,
              "--batch_size", 4, "--batch_size_per_gpu", 2, "--learning_rate", "1e-3", "--max_train_samples", 16, *mode]
    straight = tmp_path / "straight"
    uninterrupted = run(rlaif_v.TASK, flags(tiny_checkpoint, pairs_dir, straight, *common))
    stored = sorted(p.name for p in straight.glob("ref_log_probs_*.pt"))
    precomputed = "--precompute_ref_log_probs" in mode
    assert stored == (["ref_log_probs_eval.pt", "ref_log_probs_train.pt"] if precomputed else ["ref_log_probs_eval.pt"])
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed_dir / "checkpoint-2")
    for name in [*stored, "eval_before.json"]:
        shutil.copy(straight / name, resumed_dir / name)
    resumed = run(rlaif_v.TASK, flags(tiny_checkpoint, pairs_dir, resumed_dir, *common,
                                      "--resume_from_checkpoint", "auto"))
    assert resumed["global_step"] == uninterrupted["global_step"] == 4
    assert resumed["eval_before"] == uninterrupted["eval_before"]
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-5)
    weights = "adapter_model.safetensors" if mode else "model.safetensors"
    a, b = load_file(straight / weights), load_file(resumed_dir / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(resumed_dir / "eval_after.json")["pairs"] == read_json(straight / "eval_after.json")["pairs"]


def test_resume_without_the_stored_reference_stops(tiny_checkpoint, pairs_dir, tmp_path, capsys):
    common = ["--deepspeed", "none", "--max_steps", 2, "--save_strategy", "steps", "--save_steps", 1,
              "--batch_size", 2, "--batch_size_per_gpu", 2, "--max_train_samples", 4, "--use_lora",
              "--precompute_ref_log_probs"]
    out = tmp_path / "out"
    run(rlaif_v.TASK, flags(tiny_checkpoint, pairs_dir, out, *common))
    (out / "ref_log_probs_train.pt").unlink()
    (out / "run_complete.json").unlink()
    code = cli(lambda: rlaif_v.TASK.run(flags(tiny_checkpoint, pairs_dir, out, *common, "--resume_from_checkpoint",
                                              str(out / "checkpoint-1"))))
    assert code == 2
    assert "resuming with --precompute_ref_log_probs needs" in capsys.readouterr().err



def test_a_fresh_start_ignores_reference_log_probs_left_in_the_output_dir(tmp_path, monkeypatch):
    """A run that stopped before its first checkpoint leaves ref_log_probs_*.pt behind; starting
    again (maybe with another model, same pairs) computes them anew, and only a resumed run reads
    them back."""
    ids = ["p1", "p2"]
    stale = LogProbs(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0]), torch.tensor([1, 1]), torch.tensor([1, 1]))
    fresh = LogProbs(torch.tensor([-5.0, -6.0]), torch.tensor([-7.0, -8.0]), torch.tensor([2, 2]), torch.tensor([2, 2]))
    stale.save(tmp_path / "ref_log_probs_eval.pt", ids)
    stale.save(tmp_path / "ref_log_probs_train.pt", ids)
    pairs = [SimpleNamespace(id=i) for i in ids]

    evaluator = PairEvaluator.__new__(PairEvaluator)
    evaluator.output_dir, evaluator.pairs, evaluator.seconds = tmp_path, pairs, 0.0
    evaluator._log_probs = lambda model, desc: fresh
    evaluator.prepare_reference(None, resumed=False)
    assert torch.equal(evaluator.reference.chosen, fresh.chosen)
    evaluator.prepare_reference(None, resumed=True)  # reads back what the fresh start stored
    assert torch.equal(evaluator.reference.chosen, fresh.chosen)

    stale.save(tmp_path / "ref_log_probs_train.pt", ids)
    monkeypatch.setattr(preference, "dataset_log_probs", lambda *args, **kwargs: fresh)
    reference = Reference.__new__(Reference)
    reference.mode, reference.batch_size, reference.table = "precomputed", 2, None
    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path), device="cpu", bf16=False, fp16=False,
                                                   disable_tqdm=True, dataloader_num_workers=0,
                                                   dataloader_pin_memory=True), is_world_process_zero=lambda: True)
    reference.prepare(trainer, None, SimpleNamespace(pairs=pairs), None, resumed=False)
    assert torch.equal(reference.table.chosen, fresh.chosen)
    stale.save(tmp_path / "ref_log_probs_train.pt", ids)
    reference.prepare(trainer, None, SimpleNamespace(pairs=pairs), None, resumed=True)
    assert torch.equal(reference.table.chosen, stale.chosen)


def bare_evaluator(tmp_path, reference: LogProbs, policy: LogProbs, metric: str, dpo_loss: DPOLoss) -> PairEvaluator:
    """A PairEvaluator of two held-out pairs "a" and "b" without a model: `policy` stands for
    every model's log-probs."""
    evaluator = PairEvaluator.__new__(PairEvaluator)
    evaluator.output_dir, evaluator.pairs, evaluator.seconds = tmp_path, [SimpleNamespace(id="a"),
                                                                          SimpleNamespace(id="b")], 0.0
    evaluator.reference, evaluator.reference_name, evaluator.eval_only = reference, None, False
    evaluator.generation_metric, evaluator._start = None, None
    evaluator.task = SimpleNamespace(metric=metric)
    evaluator.dpo_loss = dpo_loss
    evaluator._log_probs = lambda model, desc: policy
    return evaluator


def test_held_out_rpo_loss_weights_the_nll_per_chosen_token_as_training_does(tmp_path):
    """--rpo_alpha: the held-out loss adds the chosen answers' NLL per token over all pairs (as the
    training loss over a batch, pairs.pair_log_probs' chosen_nll), not a mean of per-pair means."""
    chosen, tokens = torch.tensor([-2.0, -30.0]), torch.tensor([1, 10])
    policy = LogProbs(chosen, torch.tensor([-5.0, -40.0]), tokens, torch.tensor([2, 10]))
    evaluator = bare_evaluator(tmp_path, policy, policy, "rewards/accuracies", DPOLoss(rpo_alpha=1.0))
    evaluator(None, "eval_x")
    # policy == reference: the DPO part is log(2); the NLL is 32 nats over 11 tokens
    assert read_json(tmp_path / "eval_x.json")["loss"] == pytest.approx(math.log(2) + 32 / 11)


def test_the_evaluator_returns_the_tasks_metric_and_another_is_refused(tiny_checkpoint, pairs_dir, tmp_path):
    """The task's metric (the model card's, --metric_for_best_model's) is the one PairEvaluator
    returns; a metric it does not compute stops the run before anything loads."""
    reference = LogProbs(torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -3.0]), torch.tensor([1, 1]),
                         torch.tensor([1, 1]))
    policy = LogProbs(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -5.0]), torch.tensor([1, 1]),
                      torch.tensor([1, 1]))
    evaluator = bare_evaluator(tmp_path, reference, policy, "rewards/margins", DPOLoss(beta=0.5))
    assert evaluator(None, "eval_x") == pytest.approx(0.5 * (1 + 2) / 2)  # beta x the mean margin
    assert read_json(tmp_path / "eval_x.json")["metric"] == "rewards/margins"
    task = dataclasses.replace(rlaif_v.TASK, metric="accuracy")
    with pytest.raises(ValueError, match=r"^task 'rlaif_v': metric 'accuracy' is not one the preference objective "
                                         r"computes \(rewards/chosen, .*logps/rejected\)$"):
        run(task, flags(tiny_checkpoint, pairs_dir, tmp_path / "out", "--use_lora", "--max_steps", 1))
    # --metric adds the generation metric
    assert PairEvaluator.metrics(SimpleNamespace(metric="squad:f1"))[-1] == "f1"

# -- bad input -----------------------------------------------------------------------------------


def bad_data(tmp_path, pairs_dir):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "images").symlink_to(pairs_dir / "images")
    lines = (pairs_dir / "train.jsonl").read_text().splitlines()[:6]
    same = json.loads(lines[1])
    same["rejected"] = same["chosen"]
    missing = json.loads(lines[2])
    del missing["rejected"]
    (data / "train.jsonl").write_text("\n".join([lines[0], json.dumps(same), json.dumps(missing), *lines[3:]]) + "\n")
    shutil.copy(pairs_dir / "eval.jsonl", data / "eval.jsonl")
    return data


@pytest.mark.parametrize("extra, message", [
    ([], r"error: 2 problem\(s\) in rlaif_v training pairs \(first: .*train.jsonl:2: chosen == rejected"),
    (["--max_length", "60"], r"train.jsonl:1: \d+ tokens > --max_length 60 by \d+ \(\d+ text tokens \+ image tokens "
                             r"\d+ per image at --num_crops 1\)"),
    (["--label_smoothing", "0.6"], r"error: --label_smoothing 0.6 must be in \[0, 0.5\)"),
    (["--loss_type", "hinge", "--label_smoothing", "0.1"], r"error: --label_smoothing applies to --loss_type sigmoid"),
])
def test_bad_input_stops_before_training_with_one_line(extra, message, tiny_checkpoint, pairs_dir, tmp_path,
                                                       capsys, monkeypatch):
    import re

    import recipe.runner

    monkeypatch.setattr(recipe.runner, "load_model", lambda *a: pytest.fail("a model was loaded"))
    data = bad_data(tmp_path, pairs_dir)
    code = cli(lambda: rlaif_v.TASK.run(flags(tiny_checkpoint, data, tmp_path / "out", "--use_lora", *extra)))
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_skip_bad_examples_drops_bad_pairs_with_a_warning(tiny_checkpoint, pairs_dir, tmp_path, caplog):
    data = bad_data(tmp_path, pairs_dir)
    results = run(rlaif_v.TASK, flags(tiny_checkpoint, data, tmp_path / "out", "--use_lora", "--deepspeed", "none",
                                      "--max_steps", 1, "--batch_size", 2, "--batch_size_per_gpu", 2,
                                      "--skip_bad_examples", "--skip_eval_before", "--max_eval_samples", 2))
    assert results["global_step"] == 1
    assert "skipped 2 of 6 examples in rlaif_v training pairs (1 chosen == rejected, 1 missing answer)" in caplog.text


# -- the hub layouts through the script ------------------------------------------------------------


def hub_rows(pairs_dir, layout: str, n: int = 6):
    """RLAIF-V's or TRL's columns, built from the synthetic pairs (images decoded into the rows)."""
    import datasets
    from PIL import Image

    rows = [json.loads(line) for line in (pairs_dir / "train.jsonl").read_text().splitlines()[:n]]
    images = [Image.open(pairs_dir / "images" / row["conversations"][0]["images"][0]).convert("RGB") for row in rows]
    questions = [row["conversations"][0]["user"] for row in rows]
    if layout == "rlaif_v":
        answers = {key: [r[key] for r in rows] for key in ("chosen", "rejected")}
        return datasets.Dataset.from_dict({"image": images, "question": questions, **answers})

    def message(role, text, image=False):
        return [{"role": role, "content": ([{"type": "image", "text": None}] if image else [])
                 + [{"type": "text", "text": text}]}]

    return datasets.Dataset.from_dict({
        "images": [[image] for image in images],
        "prompt": [message("user", q, image=True) for q in questions],
        "chosen": [message("assistant", r["chosen"]) for r in rows],
        "rejected": [message("assistant", r["rejected"]) for r in rows],
    })


@pytest.mark.parametrize("layout", ["rlaif_v", "trl"])
def test_hub_layouts_train_through_the_script(layout, tiny_checkpoint, pairs_dir, tmp_path):
    source = tmp_path / "source"
    hub_rows(pairs_dir, layout).save_to_disk(str(source))
    out = tmp_path / "out"
    results = rlaif_v.TASK.run([
        "--model_name_or_path", str(tiny_checkpoint), "--dataset_name_or_path", str(source), "--dataset_layout", layout,
        "--eval_size", "2", "--output_dir", str(out), "--num_crops", "1", "--no-tqdm", "--dataloader_num_workers", "0",
        "--use_lora", "--deepspeed", "none", "--max_steps", "1", "--batch_size", "2", "--batch_size_per_gpu", "2",
        "--save_strategy", "no"])
    assert results["global_step"] == 1 and results["num_eval_examples"] == 2
    assert read_json(out / "eval_after.json")["num_examples"] == 2


def test_streamed_rows_hold_out_the_first_and_train_on_the_next(pairs_dir, tmp_path):
    """--streaming (here from a directory of parquet files): the first --eval_size rows are held
    out, the next --max_train_samples trained on. The pairs hold each image as its encoded bytes
    (20k decoded RLAIF-V images would be ~18 GB per rank), decoded to the same pixels when used
    and keyed by their bytes in the validation cache."""
    from PIL import Image

    from recipe.hub import EncodedImage
    from recipe.records import load_image
    from recipe.validation_cache import example_key

    source = tmp_path / "parquet"
    source.mkdir()
    hub = hub_rows(pairs_dir, "rlaif_v")
    hub.to_parquet(str(source / "train.parquet"))
    args = rlaif_v.RlaifVArguments(dataset_name_or_path=str(source), streaming=True, eval_size=2, max_train_samples=3)
    train, eval_ = rlaif_v.load_data(args, None)
    rows = [json.loads(line) for line in (pairs_dir / "train.jsonl").read_text().splitlines()[:5]]
    assert [p.rejected for p in eval_] == [r["rejected"] for r in rows[:2]]
    assert [p.rejected for p in train] == [r["rejected"] for r in rows[2:5]]
    image = train[0].conversation.images[0]
    assert isinstance(image, EncodedImage) and not isinstance(image, Image.Image)
    assert str(image) == "image of train row 0"
    assert load_image(image).tobytes() == hub[2]["image"].tobytes()
    assert load_image(eval_[1].conversation.images[0]).tobytes() == hub[1]["image"].tobytes()
    again, _ = rlaif_v.load_data(args, None)
    assert example_key(train[0].conversation) is not None
    assert [example_key(p.conversation) for p in again] == [example_key(p.conversation) for p in train]


def test_streamed_trl_rows_hold_their_images_encoded(pairs_dir, tmp_path):
    from recipe.hub import EncodedImage
    from recipe.records import load_image

    source = tmp_path / "parquet"
    source.mkdir()
    hub = hub_rows(pairs_dir, "trl", n=3)
    hub.to_parquet(str(source / "train.parquet"))
    args = rlaif_v.RlaifVArguments(dataset_name_or_path=str(source), dataset_layout="trl", streaming=True,
                                   eval_size=1, max_train_samples=2)
    train, _ = rlaif_v.load_data(args, None)
    image = train[1].conversation.images[0]
    assert isinstance(image, EncodedImage) and str(image) == "images[0] of train row 1"
    assert load_image(image).tobytes() == hub[2]["images"][0].tobytes()
