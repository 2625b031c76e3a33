"""`--dry_run` on the tiny model: the printed figures are those of the data and the flags, and no
weights are loaded (the checkpoint it reads has none)."""

import math
import re
import shutil
from pathlib import Path

import pytest

import finetune_hf_trainer_ucf101 as ucf
from recipe.data import ConversationDataset
from recipe.errors import FlagError
from recipe.layouts import load_jsonl
from recipe.records import image_size
from recipe.tokenization import image_tokens


def numbers(line: str) -> list[float]:
    """The numbers of a printed line, after its name."""
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", line.split(":", 1)[1])]


@pytest.fixture
def weightless(tiny_checkpoint, tmp_path):
    """The tiny checkpoint without its weights file: loading weights would fail."""
    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    return model


def test_dry_run_prints_the_cost_and_loads_no_weights(weightless, tiny_checkpoint, ucf101_data, tmp_path, capsys,
                                                      monkeypatch):
    from phi3v.modeling_phi3v import Phi3VForCausalLM
    from phi3v.processing_phi3v import Phi3VProcessor

    def no_loading(*args, **kwargs):
        raise AssertionError("--dry_run loaded weights")

    monkeypatch.setattr(Phi3VForCausalLM, "from_pretrained", no_loading)
    out = tmp_path / "out"
    results = ucf.TASK.run(["--model_name_or_path", str(weightless), "--data_dir", str(ucf101_data), "--output_dir",
                            str(out), "--num_crops", "1",
                            "--batch_size", "2",  # (ZeRO-2, the default, needs no launcher)
                            "--batch_size_per_gpu", "1", "--num_train_epochs", "3", "--no-tqdm", "--dry_run", "--bf16"])
    text = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if ":" in line}
    assert not out.exists()  # nothing written

    # the data, measured independently: every example kept, its tokens, each image's tokens
    train = load_jsonl(ucf101_data / "ucf101_train.jsonl", ucf101_data / "images")
    test = load_jsonl(ucf101_data / "ucf101_test.jsonl", ucf101_data / "images")
    assert numbers(lines["training examples"]) == [len(train), len(train)]
    assert numbers(lines["evaluation examples"]) == [len(test), len(test)]
    processor = Phi3VProcessor.from_pretrained(tiny_checkpoint, num_crops=1)
    dataset = ConversationDataset(train, processor)
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(train))]
    assert numbers(lines["tokens per training example"]) == [min(lengths), round(sum(lengths) / len(lengths), 1),
                                                             max(lengths)]
    per_image = [image_tokens(*image_size(image), 1) for c in train for image in c.images]
    assert numbers(lines["image tokens per image at --num_crops 1"]) == [
        min(per_image), round(sum(per_image) / len(per_image), 1), max(per_image), len(per_image)]
    # 4 examples, global batch 2 on one process: 2 steps per epoch, 3 epochs
    assert numbers(lines["optimizer steps"])[:2] == [3 * math.ceil(len(train) / 2), math.ceil(len(train) / 2)]
    assert numbers(lines["batch 1"])[:2] == [1, lengths[0]]  # input_ids 1 x the first example's tokens

    # the model's size from its config.json, as the real model counts it
    model = Phi3VForCausalLM._from_config(Phi3VForCausalLM.config_class.from_pretrained(tiny_checkpoint))
    total = sum(p.numel() for p in model.parameters())
    assert f"({total:,} parameters by its config.json)" in lines["model"]
    assert "full finetuning, DeepSpeed ZeRO-2, bf16" in lines["model"]
    memory = numbers(lines["memory per GPU, rough, 1 process(es)"])
    assert memory[0] == round(2 * total / 2**30, 2)  # DeepSpeed's bf16 weights
    assert results["dry_run"] and results["memory"].weights == 2 * total


def test_dry_run_lora_counts_the_adapters(weightless, ucf101_data, tmp_path, capsys):
    results = ucf.TASK.run(["--model_name_or_path", str(weightless), "--data_dir", str(ucf101_data), "--output_dir",
                            str(tmp_path / "out"), "--num_crops", "1", "--use_lora", "--lora_rank", "4",
                            "--batch_size", "2", "--no-tqdm", "--dry_run"])
    from peft import LoraConfig, get_peft_model

    from phi3v.modeling_phi3v import Phi3VForCausalLM
    from recipe.model import lora_target_modules

    model = Phi3VForCausalLM._from_config(Phi3VForCausalLM.config_class.from_pretrained(weightless))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=lora_target_modules(model, True)))
    assert results["trainable_parameters"] == peft_model.get_nb_trainable_parameters()[0]
    assert "LoRA (rank 4), no DeepSpeed, fp32" in capsys.readouterr().out


@pytest.mark.parametrize("flag, names_readable", [(["--torch_compile", "maybe"], True),
                                                  (["--lr_scheduler_typ", "cosine"], False)])
def test_dry_run_checks_the_transformers_flags_too(weightless, ucf101_data, tmp_path, flag, names_readable,
                                                   monkeypatch):
    """A transformers-only flag the run would refuse (a bad value; or an unknown flag, when
    transformers' flag names could not be read from its source) fails the dry run too."""
    from recipe import flag_parser
    from recipe.errors import FlagError

    if not names_readable:
        monkeypatch.setattr(flag_parser, "transformers_flag_names", lambda: None)
    with pytest.raises(FlagError, match=flag[0]):
        ucf.TASK.run(["--model_name_or_path", str(weightless), "--data_dir", str(ucf101_data), "--output_dir",
                      str(tmp_path / "out"), "--num_crops", "1", "--use_lora", "--batch_size", "2", "--no-tqdm",
                      "--dry_run", *flag])


def test_memory_estimate_of_lora_under_zero3_partitions_the_frozen_base(monkeypatch):
    """The standard accounting: ZeRO-3 keeps 1/N of every weight per GPU, the LoRA base included."""
    from types import SimpleNamespace

    from recipe.dry_run import estimate_memory

    monkeypatch.setenv("WORLD_SIZE", "4")
    config = SimpleNamespace(hidden_size=8, num_hidden_layers=1, vocab_size=8, vision_config=None)
    model_args = SimpleNamespace(use_lora=True, use_qlora=False, freeze_vision_model=True)
    training = SimpleNamespace(bf16=True, fp16=False, activation_checkpointing=True,
                               deepspeed=str(Path(ucf.__file__).parent / "ds_configs" / "zero3.json"))
    total, trainable = 4_000_000, 40_000
    memory = estimate_memory(model_args, training, config, (total, trainable, 0), tokens=1, crops=0)
    assert memory.weights == (2 * total + 4 * trainable) / 4
    assert memory.gradients + memory.optimizer == 12 * trainable / 4  # ZeRO-2/3: sharded
    training.deepspeed = None  # DDP: everything on every GPU
    memory = estimate_memory(model_args, training, config, (total, trainable, 0), tokens=1, crops=0)
    assert (memory.weights, memory.gradients, memory.optimizer) == (2 * total + 4 * trainable, 4 * trainable,
                                                                   8 * trainable)


def test_dry_run_refuses_what_it_does_not_model(tmp_path):
    """--dry_run plans supervised finetuning; a preference task says so in one line instead of
    planning the wrong run."""
    import finetune_hf_trainer_rlaif_v as rlaif_v

    with pytest.raises(FlagError, match="--dry_run plans supervised finetuning; rlaif_v trains with the 'preference' "
                                        "objective"):
        rlaif_v.TASK.run(["--output_dir", str(tmp_path / "out"), "--dry_run", "--deepspeed", "none"])
    assert not (tmp_path / "out").exists()


def test_dry_run_plans_the_task_the_flags_name(weightless, ucf101_data, tmp_path, capsys):
    # The custom script's task is named by --task_name (Task.resolve), as the run itself names it.
    import finetune_hf_trainer_custom as custom

    custom.TASK.run(["--model_name_or_path", str(weightless), "--output_dir", str(tmp_path / "out"), "--num_crops", "1",
                     "--task_name", "shapes", "--train_file", str(ucf101_data / "ucf101_train.jsonl"),
                     "--eval_file", str(ucf101_data / "ucf101_test.jsonl"), "--image_dir", str(ucf101_data / "images"),
                     "--batch_size", "2", "--use_lora", "--no-tqdm", "--dry_run"])
    assert "dry run of shapes: flags and data checked" in capsys.readouterr().out


def test_dry_run_prices_the_largest_example_wherever_it_is(weightless, ucf101_data, tmp_path, capsys):
    # The memory estimate is the worst micro-batch's, not the first batches': an example with more images
    # and text, last in the file, raises it (padding-free: tokens as packed; image crops for CLIP).
    import json

    import finetune_hf_trainer_custom as custom

    records = [json.loads(line) for line in (ucf101_data / "ucf101_train.jsonl").read_text().splitlines()]
    big = json.loads(json.dumps(records[-1]))
    big["conversations"][0]["images"] *= 3
    big["conversations"][0]["user"] *= 5
    estimates = {}
    for name, rows in (("plain", records), ("largest last", records[:-1] + [big])):
        train = tmp_path / f"{name}.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in rows))
        results = custom.TASK.run([
            "--model_name_or_path", str(weightless), "--output_dir", str(tmp_path / "out"), "--num_crops", "1",
            "--train_file", str(train), "--eval_file", str(ucf101_data / "ucf101_test.jsonl"),
            "--image_dir", str(ucf101_data / "images"), "--batch_size", "2", "--batch_size_per_gpu", "2",
            "--padding_free", "--use_lora", "--no-tqdm", "--dry_run"])
        memory_line = capsys.readouterr().out.splitlines()[-1]
        lengths = sorted(results["tokens"])
        assert f"({lengths[-1] + lengths[-2]} tokens per micro-batch" in memory_line  # the two longest, one row
        estimates[name] = results["memory"].activations
    assert estimates["largest last"] > estimates["plain"]
