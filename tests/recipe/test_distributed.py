"""Two CPU ranks (torchrun, gloo) with data that gives one rank an image batch and the other a
text-only batch in the same step: DDP, DeepSpeed ZeRO-2 and ZeRO-3 train, evaluate before and
after (ZeRO-3 generates in lockstep) and save a model that reloads and runs.

Without the dummy image crop (phi3v.modeling_phi3v.Phi3VModel._dummy_image_needed) these runs
fail with a collective mismatch (gloo) or deadlock (ZeRO-3). The launcher logs, per rank, which
micro-batches held images and when the dummy ran, so the tests check that the mix really
happened rather than trusting the sampler.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import finetune_hf_trainer_ucf101 as ucf
from phi3v.modeling_phi3v import Phi3VForCausalLM
from phi3v.processing_phi3v import Phi3VProcessor
from recipe.data import Collator, ConversationDataset
from recipe.records import Conversation, Turn
from recipe.model import count_parameters

LAUNCHER = Path(__file__).with_name("distributed_launcher.py")
ZERO2 = Path(ucf.__file__).parent / "ds_configs" / "zero2.json"
ZERO3 = Path(ucf.__file__).parent / "ds_configs" / "zero3.json"
TIMEOUT = 900  # the first DeepSpeed run on a machine JIT-compiles its CPU comm op (~70 s)


def text_only(index: int, words: int) -> dict:
    question = "Which class is named last in this sentence? " + " ".join(["RedRight GreenLeft"] * words)
    return {"id": f"text-{index}", "source": "text", "conversations": [{"user": question, "assistant": "GreenLeft"}]}


@pytest.fixture(scope="module")
def mixed_data(ucf101_data, tmp_path_factory) -> Path:
    """ucf101 layout whose lines alternate image examples and text-only ones of uneven lengths.

    With sequential sampling and one example per rank and step, rank 0 gets lines 0, 2, ...
    (images) and rank 1 lines 1, 3, ... (text only); evaluation shards the same way.
    """
    out = tmp_path_factory.mktemp("mixed") / "data"
    out.mkdir()
    (out / "images").symlink_to(ucf101_data / "images")
    for split in ("train", "test"):
        lines = (ucf101_data / f"ucf101_{split}.jsonl").read_text().splitlines()[:2]
        texts = [text_only(i, words) for i, words in enumerate((12, 2))]
        mixed = [line for pair in zip(lines, (json.dumps(t) for t in texts)) for line in pair]
        (out / f"ucf101_{split}.jsonl").write_text("\n".join(mixed) + "\n")
    return out


def launch(tiny, data, out, log_dir, *extra, env: dict | None = None, status: int = 0) -> str:
    args = ["--model_name_or_path", tiny, "--data_dir", data, "--output_dir", out, "--num_crops", 1, "--no-tqdm",
            "--logging_steps", 1, "--max_steps", 2, "--batch_size", 2, "--batch_size_per_gpu", 1,
            "--learning_rate", "1e-3", "--save_strategy", "no", "--eval_batch_size", 1, "--max_new_tokens", 2,
            "--dataloader_num_workers", 0, *extra]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(LAUNCHER)]
    log_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RECIPE_TEST_BATCH_LOG": str(log_dir), **(env or {})}
    proc = subprocess.run(command + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == status, (
        f"{command}: exit {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout if status == 0 else proc.stderr


def batch_log(log_dir: Path, rank: int) -> list[list[str]]:
    return [line.split() for line in (log_dir / f"rank{rank}.txt").read_text().splitlines()]


def assert_ranks_mixed_in_every_step(log_dir: Path):
    """Every step: one rank trained on images, the other on text only, and only that one ran
    the dummy crop, once per micro-batch."""
    logs = [batch_log(log_dir, rank) for rank in (0, 1)]
    steps = [{int(line[1]): line[2] for line in log if line[0] == "train"} for log in logs]
    assert steps[0].keys() == steps[1].keys() == {1, 2}
    for step in steps[0]:
        assert {steps[0][step], steps[1][step]} == {"images=0", "images=1"}, step
    for log, rank_steps in zip(logs, steps):
        dummies = [line for line in log if line[:2] == ["dummy", "train"] and line[3] == "needed=1"]
        assert len(dummies) == sum(v == "images=0" for v in rank_steps.values())
        assert all(line[2] == "images=0" for line in dummies)


def assert_lockstep_generation_mixed(log_dir: Path):
    """Generation under ZeRO-3: the image-less rank ran the dummy in the forwards where the
    other rank had images, and no rank ran it in a forward where no rank had images."""
    logs = [[line for line in batch_log(log_dir, rank) if line[:2] == ["dummy", "lockstep"]] for rank in (0, 1)]
    assert len(logs[0]) == len(logs[1]) > 0  # the same number of forwards
    for a, b in zip(*logs):
        any_images = "images=1" in (a[2], b[2])
        for line in (a, b):
            assert line[3] == f"needed={int(any_images and line[2] == 'images=0')}"
    assert any(line[3] == "needed=1" for log in logs for line in log)


def assert_optimizer_steps(log_dir: Path, dtype: str):
    """Each rank's optimizer steps fp32 tensors (DeepSpeed: its fp32 partitions), whatever dtype
    the module's trainable weights have (`dtype`)."""
    for rank in (0, 1):
        lines = {line[0]: line[1] for line in batch_log(log_dir, rank) if line[0] in ("optimizer", "trainable")}
        assert lines == {"optimizer": "torch.float32", "trainable": dtype}, rank


def assert_loaded(log_dir: Path, dtype: str):
    """recipe.model.load_model returned weights of `dtype` on each rank."""
    for rank in (0, 1):
        assert [line[1] for line in batch_log(log_dir, rank) if line[0] == "loaded"] == [dtype], rank


def assert_evaluated_and_saved(out: Path, tiny: Path, data: Path, dtype=torch.bfloat16, vision_trains=True):
    """eval_before/after of all 4 examples, a full official-format model in the release's dtype
    (--save_dtype bfloat16) that differs from the start, reloads with from_pretrained and runs a
    forward on the first two training rows."""
    for name in ("eval_before", "eval_after"):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["num_examples"] == 4 and len(result["predictions"]) == 4
    saved, initial = load_file(out / "model.safetensors"), load_file(tiny / "model.safetensors")
    assert saved.keys() == initial.keys()
    assert all(saved[k].shape == initial[k].shape and saved[k].dtype == dtype for k in saved)
    moved = {k for k in saved if not torch.equal(saved[k], initial[k].to(saved[k].dtype))}
    assert any(".layers.0." in k for k in moved)
    assert any(".img_projection." in k for k in moved) == vision_trains
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is Phi3VForCausalLM
    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    processor = Phi3VProcessor.from_pretrained(out)
    train, _ = ucf.load_data(ucf.Ucf101Arguments(data_dir=str(data)), None)
    dataset = ConversationDataset(train[:2], processor)
    batch = Collator(pad_token_id=processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_mixed_batches_on_two_ranks(stage, tiny_checkpoint, mixed_data, tmp_path):
    """In bf16, as on GPUs: DeepSpeed holds bf16 weights and steps its own fp32 copies. ZeRO-2
    runs without a --deepspeed flag (full finetuning's default) and saves a checkpoint whose
    optimizer state is partitioned over the ranks."""
    out, log_dir = tmp_path / "out", tmp_path / "log"
    stage_flags = ["--save_strategy", "steps", "--save_steps", 2] if stage == "zero2" else ["--deepspeed", ZERO3]
    stdout = launch(tiny_checkpoint, mixed_data, out, log_dir, *stage_flags,
                    "--train_sampling_strategy", "sequential", "--bf16", env={"RECIPE_TEST_RANKS_AS_NODES": "1"})
    # Each rank pretended to be a node: both saw each other's marker in --output_dir, which is clean again.
    assert "is shared by all 2 nodes" in stdout and not list(out.glob(".shared_fs_check*"))
    # The logged counts are the model's, also under ZeRO-3 (whose ranks hold empty placeholders).
    trainable, total = count_parameters(Phi3VForCausalLM.from_pretrained(tiny_checkpoint))
    assert f"parameters: {trainable:,} trainable of {total:,}" in stdout
    assert_ranks_mixed_in_every_step(log_dir)
    assert_optimizer_steps(log_dir, "torch.bfloat16")
    assert_loaded(log_dir, "torch.bfloat16")  # not fp32: half the host memory per rank
    if stage == "zero2":
        zero_files = [p.name for p in (out / "checkpoint-2" / "global_step2").iterdir()]
        assert sum("optim_states" in name for name in zero_files) == 2
    if stage == "zero3":
        assert_lockstep_generation_mixed(log_dir)
    assert json.loads((out / "config.json").read_text())["model_type"] == "phi3_v"
    assert_evaluated_and_saved(out, tiny_checkpoint, mixed_data)


def test_output_dir_not_shared_by_the_nodes_stops_before_training(tiny_checkpoint, mixed_data, tmp_path):
    """Two ranks as two nodes, the second with its own --output_dir: one line naming the node and
    what to do, the ranks exit 2 (torchrun then 1), no model loaded, nothing trained or written,
    no marker left behind."""
    out, log_dir = tmp_path / "out", tmp_path / "log"
    stderr = launch(tiny_checkpoint, mixed_data, out, log_dir, "--deepspeed", "none", status=1,
                    env={"RECIPE_TEST_RANKS_AS_NODES": "1", "RECIPE_TEST_PRIVATE_OUTPUT_DIR": "1"})
    # (a rank still exiting when the other has gone may be stopped by torchrun: SIGTERM, -15)
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", stderr))
    assert "2" in codes and codes <= {"2", "-15"}, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if re.match(r"(\[rank \d\] )?error: ", line)]
    assert len(errors) == 1 and "UserError" not in stderr, stderr[-3000:]
    assert f"--output_dir {out} is not shared by all 2 nodes: node 0 (pretended) does not see" in errors[0]
    assert "every node mounts at the same path" in errors[0]
    # (only the validation cache, which the main process writes while validating, before the check)
    assert sorted(p.name for p in out.iterdir()) in ([], [".cache"])
    assert sorted(p.name for p in (tmp_path / "out-node1").iterdir()) == []
    for rank in (0, 1):
        assert [line for line in batch_log(log_dir, rank) if line[0] in ("loaded", "train")] == []


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model saved in bf16, as the release is."""
    out = tmp_path_factory.mktemp("tiny_bf16") / "model"
    Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).save_pretrained(out)
    Phi3VProcessor.from_pretrained(tiny_checkpoint).save_pretrained(out)
    return out


@pytest.mark.slow  # (~2 x 2 min; the bf16 load itself is checked by the CI test above)
def test_deepspeed_bf16_loads_bf16_and_learns_what_an_fp32_load_learns(bf16_checkpoint, mixed_data, tmp_path):
    """ZeRO-2 --bf16 loads the weights in bf16 (half the host memory per rank); DeepSpeed makes
    its fp32 masters from them, as it does from the bf16 cast of an fp32 load: after 3 steps
    both runs hold the same weights, which moved."""
    saved = {}
    for name, env in (("bf16", {}), ("fp32", {"RECIPE_TEST_LOAD_FP32": "1"})):
        out, log_dir = tmp_path / name, tmp_path / f"{name}_log"
        launch(bf16_checkpoint, mixed_data, out, log_dir, "--deepspeed", ZERO2, "--bf16", "--max_steps", 3,
               "--train_sampling_strategy", "sequential", "--skip_eval_before", "--max_eval_samples", 2, env=env)
        assert_loaded(log_dir, "torch.bfloat16" if name == "bf16" else "torch.float32")
        assert_optimizer_steps(log_dir, "torch.bfloat16")
        saved[name] = load_file(out / "model.safetensors")
    initial = load_file(bf16_checkpoint / "model.safetensors")
    assert saved["bf16"].keys() == saved["fp32"].keys() == initial.keys()
    assert all(torch.equal(saved["bf16"][k], saved["fp32"][k]) for k in initial)
    assert any(not torch.equal(saved["bf16"][k], initial[k]) for k in initial if ".layers.0." in k)


@pytest.mark.slow
def test_deepspeed_zero3_images_only_on_two_ranks(tiny_checkpoint, ucf101_data, tmp_path):
    out, log_dir = tmp_path / "out", tmp_path / "log"
    launch(tiny_checkpoint, ucf101_data, out, log_dir, "--deepspeed", ZERO3)
    assert_optimizer_steps(log_dir, "torch.float32")
    for rank in (0, 1):
        log = batch_log(log_dir, rank)
        assert [line[2] for line in log if line[0] == "train"] == ["images=1"] * 2
        assert not [line for line in log if line[0] == "dummy" and line[3] == "needed=1"]
    assert_evaluated_and_saved(out, tiny_checkpoint, ucf101_data)


@pytest.mark.slow
def test_deepspeed_zero3_frozen_vision_mixed_batches_on_two_ranks(tiny_checkpoint, mixed_data, tmp_path):
    """A frozen image side still has to be gathered on every rank: the dummy runs without autograd."""
    out, log_dir = tmp_path / "out", tmp_path / "log"
    launch(tiny_checkpoint, mixed_data, out, log_dir, "--deepspeed", ZERO3, "--freeze_vision_model",
           "--train_sampling_strategy", "sequential")
    assert_ranks_mixed_in_every_step(log_dir)
    assert_lockstep_generation_mixed(log_dir)
    assert_evaluated_and_saved(out, tiny_checkpoint, mixed_data, vision_trains=False)


@pytest.mark.slow
def test_ddp_full_finetuning_mixed_batches_on_two_ranks(tiny_checkpoint, mixed_data, tmp_path):
    out, log_dir = tmp_path / "out", tmp_path / "log"
    launch(tiny_checkpoint, mixed_data, out, log_dir, "--deepspeed", "none", "--train_sampling_strategy", "sequential",
           "--bf16")
    assert_ranks_mixed_in_every_step(log_dir)
    assert_optimizer_steps(log_dir, "torch.float32")  # fp32 weights, bf16 autocast
    assert_loaded(log_dir, "torch.float32")
    assert_evaluated_and_saved(out, tiny_checkpoint, mixed_data)


@pytest.mark.slow
def test_ddp_lora_mixed_batches_on_two_ranks(tiny_checkpoint, mixed_data, tmp_path):
    out, log_dir = tmp_path / "out", tmp_path / "log"
    launch(tiny_checkpoint, mixed_data, out, log_dir, "--deepspeed", "none", "--use_lora",
           "--train_sampling_strategy", "sequential", "--bf16")
    assert_ranks_mixed_in_every_step(log_dir)
    assert_optimizer_steps(log_dir, "torch.float32")  # fp32 adapters on a bf16 base
    for name in ("eval_before", "eval_after"):
        assert json.loads((out / f"{name}.json").read_text())["num_examples"] == 4
    from peft import PeftModel

    model = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(tiny_checkpoint), str(out))
    moved = [n for n, p in model.named_parameters() if ".lora_B." in n and p.abs().sum() > 0]
    assert any(".vision_embed_tokens." in n for n in moved)


# -- the dummy image on one rank: no effect on the loss, any gradient or generated tokens --------


@pytest.fixture
def text_only_batch(tiny_checkpoint):
    """The processor and two text-only conversations of different lengths."""
    processor = Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=1)
    rows = [Conversation(id=str(i), turns=[Turn(user=text_only(i, words)["conversations"][0]["user"],
                                                assistant="GreenLeft")])
            for i, words in enumerate((5, 1))]
    return processor, rows


def count_dummy_runs(monkeypatch, needed: bool) -> list[int]:
    """`_dummy_image_needed` answers `needed` (as on a rank of a job whose other ranks have
    images); returns a list that grows by one per dummy crop run."""
    from phi3v.modeling_phi3v import Phi3VImageEmbedding, Phi3VModel

    runs = []
    dummy = Phi3VImageEmbedding.dummy_features
    monkeypatch.setattr(Phi3VModel, "_dummy_image_needed", lambda self, has_images, device: needed and not has_images)
    monkeypatch.setattr(Phi3VImageEmbedding, "dummy_features", lambda self, device: runs.append(1) or dummy(self, device))
    return runs


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("frozen_vision", [False, True], ids=["full", "frozen_vision"])
def test_dummy_image_changes_no_loss_and_no_gradient(frozen_vision, tiny_checkpoint, text_only_batch, monkeypatch):
    """With the dummy, the trainable image-side parameters get gradients that are exactly zero
    (tensors, where without the dummy they are None); every other gradient and the loss are
    bit-identical. A frozen image side runs the dummy without autograd: no gradients at all."""
    processor, rows = text_only_batch
    dataset = ConversationDataset(rows, processor)
    batch = Collator(pad_token_id=processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert "pixel_values" not in batch
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).train()
    vision = model.model.vision_embed_tokens
    if frozen_vision:
        vision.requires_grad_(False)
    trainable_vision = {f"model.vision_embed_tokens.{n}" for n, p in vision.named_parameters() if p.requires_grad}
    assert bool(trainable_vision) != frozen_vision

    runs = count_dummy_runs(monkeypatch, needed=False)
    plain_loss, plain = loss_and_grads(model, batch)
    assert not runs
    runs = count_dummy_runs(monkeypatch, needed=True)
    dummy_loss, with_dummy = loss_and_grads(model, batch)
    assert runs == [1]

    assert torch.equal(plain_loss, dummy_loss)
    for name, grad in plain.items():
        if name in trainable_vision:
            assert grad is None, name
            assert with_dummy[name] is not None and not with_dummy[name].any(), name
        elif grad is None:
            assert with_dummy[name] is None, name
        else:
            assert torch.equal(grad, with_dummy[name]), name
    assert any(with_dummy[n] is not None for n in with_dummy if n not in trainable_vision)


def test_dummy_image_changes_no_generated_token(tiny_checkpoint, text_only_batch, monkeypatch):
    """Generation under ZeRO-3 (vision_lockstep): an image-less rank runs the dummy in the
    forwards where another rank has images; its own tokens stay those generated without it."""
    processor, rows = text_only_batch
    dataset = ConversationDataset(rows, processor, for_generation=True)
    batch = Collator(pad_token_id=processor.tokenizer.pad_token_id, padding_side="left")([dataset[0], dataset[1]])
    model = Phi3VForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    model.model.vision_lockstep = True
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                  output_logits=True, return_dict_in_generate=True)

    runs = count_dummy_runs(monkeypatch, needed=False)
    with torch.no_grad():
        plain = model.generate(**batch, **kwargs)
    assert not runs
    runs = count_dummy_runs(monkeypatch, needed=True)
    with torch.no_grad():
        with_dummy = model.generate(**batch, **kwargs)
    assert len(runs) >= 1  # (here: in every forward, prefill and decoding)
    assert torch.equal(plain.sequences, with_dummy.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, with_dummy.logits, strict=True))
