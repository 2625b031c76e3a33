"""The tiny checkpoint factory: official layout, Auto classes, processor -> model end to end."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

import phi3v
from phi3v.tiny import main, save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    start = time.perf_counter()
    save_tiny_checkpoint(out, num_crops=4)
    assert time.perf_counter() - start < 30  # generous: the issue asks for well under ~10 s
    return out


def test_layout_is_the_official_one(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "preprocessor_config.json"} <= names
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "phi3_v" and config["architectures"] == ["Phi3VForCausalLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert config["embd_layer"]["hd_transform_order"] == "sub_glb"
    pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Phi3VImageProcessor" and pre["processor_class"] == "Phi3VProcessor"
    assert pre["num_crops"] == 4 and "AutoProcessor" in pre["auto_map"]
    tok = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    # Readable by transformers 4.x tools (the hub code, vLLM) as the released file is.
    assert tok["tokenizer_class"] == "LlamaTokenizer" and tok["add_bos_token"] is True
    assert "<|assistant|>" in tok["chat_template"]


def test_everything_loads_with_the_auto_classes_without_remote_code(tiny_dir):
    assert type(AutoConfig.from_pretrained(tiny_dir)).__name__ == "Phi3VConfig"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    image_processor = AutoImageProcessor.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert type(model) is phi3v.Phi3VForCausalLM
    assert type(processor) is phi3v.Phi3VProcessor and type(image_processor) is phi3v.Phi3VImageProcessor
    text = "<|user|>\nHow many pages?<|end|>\n<|assistant|>\n"
    assert tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end_id in model.generation_config.eos_token_id
    assert model.config.vocab_size >= len(tokenizer) and model.config.vocab_size % 64 == 0
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_model_card_inference_path(tiny_dir):
    """The official usage: chat template, processor(prompt, images), generate, decode."""
    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    images = [Image.new("RGB", (500, 400), (10, 200, 30)), Image.new("RGB", (300, 900), (200, 10, 30))]
    messages = [{"role": "user", "content": "<|image_1|>\n<|image_2|>\nWhich is greener?"}]
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(prompt, images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    assert 1 <= new.shape[1] <= 5
    assert isinstance(processor.batch_decode(new, skip_special_tokens=True)[0], str)


def test_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    main(["--output_dir", str(tmp_path / "t"), "--num_crops", "1", "--seed", "3"])
    assert "written to" in capsys.readouterr().out
    assert AutoProcessor.from_pretrained(tmp_path / "t").image_processor.num_crops == 1


@pytest.mark.slow
def test_module_runs_as_a_script(tmp_path):
    subprocess.run([sys.executable, "-m", "phi3v.tiny", "--output_dir", str(tmp_path / "t")], cwd=ROOT, check=True)
    assert (tmp_path / "t" / "model.safetensors").exists()


def test_processor_alone_saves_a_tokenizer_that_auto_tokenizer_reads_right(tiny_dir, tmp_path):
    """A directory without a model config.json (e.g. a LoRA adapter) must not say LlamaTokenizer,
    which transformers 5 would rebuild with a different pipeline."""
    processor = AutoProcessor.from_pretrained(tiny_dir)
    processor.save_pretrained(tmp_path)
    text = "<|user|>\nHi there<|end|>\n<|assistant|>\n"
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"


def test_preprocessor_config_is_the_one_source_of_image_settings(tiny_dir, tmp_path):
    AutoProcessor.from_pretrained(tiny_dir).save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config["num_crops"] = 16  # as a user editing the released file would
    path.write_text(json.dumps(config))
    assert AutoProcessor.from_pretrained(tmp_path).image_processor.num_crops == 16
    assert AutoImageProcessor.from_pretrained(tmp_path).num_crops == 16
