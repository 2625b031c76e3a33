"""Saved outputs in the released layout (phi3v/export.py): what the official hub code, vLLM and
`import phi3v` + Auto classes need, checked file by file against the released files, and through
the runner (full finetuning, QLoRA + --merge_lora)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module

import phi3v  # noqa: F401  (registers the Auto classes)
from phi3v.configuration_phi3v import PHI3_5V, PHI3V_128K
from phi3v.export import finalize_output, merge_lora, release_auto_maps
from phi3v.modeling_phi3v import Phi3VForCausalLM
from phi3v.processing_phi3v import Phi3VProcessor
from phi3v.tiny import save_tiny_checkpoint

RELEASE = Path(__file__).resolve().parents[1] / "fixtures" / "release"
RELEASE_35 = RELEASE / "phi-3.5-vision-instruct"
# The release's file set, weights aside (128k: no generation_config.json).
RELEASE_FILES = {"config.json", "generation_config.json", "preprocessor_config.json", "special_tokens_map.json",
                 "tokenizer.json", "tokenizer_config.json"}


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def tensor_dtypes(directory: Path) -> set[torch.dtype]:
    dtypes = set()
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            dtypes |= {f.get_tensor(key).dtype for key in f.keys()}
    return dtypes


def assert_released_layout(directory: Path, dtype: str = "bfloat16"):
    """File set and fields as released: what every consumer of the checkpoint reads."""
    names = {p.name for p in directory.iterdir()}
    assert RELEASE_FILES <= names and "processor_config.json" not in names, names
    # Special tokens exactly as released, in both files, and nothing list-valued under the key
    # transformers 4.57 reads as a dict.
    released_map = read(RELEASE_35 / "special_tokens_map.json")
    assert read(directory / "special_tokens_map.json") == released_map
    tokenizer_config = read(directory / "tokenizer_config.json")
    assert tokenizer_config["additional_special_tokens"] == released_map["additional_special_tokens"]
    assert "extra_special_tokens" not in tokenizer_config
    config = read(directory / "config.json")
    assert (config["eos_token_id"], config["bos_token_id"], config["torch_dtype"]) == (2, 1, dtype)
    assert "dtype" not in config
    assert tensor_dtypes(directory) == {getattr(torch, dtype)}
    # auto_map: the release's entries, resolvable as hub references (no code files here).
    for name, auto_map in release_auto_maps(PHI3_5V).items():
        written = read(directory / name)["auto_map"]
        assert written == {k: f"microsoft/Phi-3.5-vision-instruct--{v}" for k, v in auto_map.items()}, name
    assert read(RELEASE_35 / "preprocessor_config.json")["auto_map"] == release_auto_maps(PHI3_5V)[
        "preprocessor_config.json"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", num_crops=1)


def image_prompt(processor, n_images=2):
    images = [Image.new("RGB", (40 + 30 * i, 60), (40 * i, 200, 90)) for i in range(n_images)]
    tags = "".join(f"<|image_{i + 1}|>" for i in range(n_images))
    return processor(f"<|user|>\n{tags}\nWhat is shown?<|end|>\n<|assistant|>\n", images)


def test_finalize_gives_the_released_layout_and_the_same_model(tiny, tmp_path):
    out = tmp_path / "out"
    # What the runner writes: model (fp32) + processor, then the Trainer's eos change.
    model = Phi3VForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    model.config.eos_token_id = 1024
    model.save_pretrained(out)
    processor = Phi3VProcessor.from_pretrained(tiny)
    processor.save_pretrained(out)
    (out / "processor_config.json").write_text('{"processor_class": "Phi3VProcessor"}')  # as transformers 5 writes
    finalize_output(out, source=str(tiny))
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    finalize_output(out, source=str(tiny))  # idempotent
    assert snapshot == {p.name: p.read_bytes() for p in out.iterdir()}
    assert_released_layout(out)

    loaded = AutoProcessor.from_pretrained(out)
    assert type(loaded) is Phi3VProcessor
    inputs, expected = image_prompt(loaded), image_prompt(processor)
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is Phi3VForCausalLM and reloaded.dtype == torch.bfloat16
    with torch.no_grad():
        logits = reloaded.float()(**inputs).logits
        reference = model(**inputs).logits
    torch.testing.assert_close(logits, reference, atol=3e-2, rtol=3e-2)  # bf16 weights
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.95


def test_float32_kept_when_asked(tiny, tmp_path):
    out = tmp_path / "out"
    Phi3VForCausalLM.from_pretrained(tiny, dtype=torch.float32).save_pretrained(out)
    Phi3VProcessor.from_pretrained(tiny).save_pretrained(out)
    finalize_output(out, source=str(tiny), dtype=torch.float32)
    assert_released_layout(out, dtype="float32")


def test_sharded_weights_are_converted_and_indexed(tiny, tmp_path):
    out = tmp_path / "out"
    Phi3VForCausalLM.from_pretrained(tiny, dtype=torch.float32).save_pretrained(out, max_shard_size="300KB")
    assert len(list(out.glob("*.safetensors"))) > 1
    finalize_output(out, source=str(tiny))
    index = read(out / "model.safetensors.index.json")
    sizes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert 0 < index["metadata"]["total_size"] <= sizes and tensor_dtypes(out) == {torch.bfloat16}
    reloaded = Phi3VForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = Phi3VForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), original.state_dict().items()):
        torch.testing.assert_close(a, b.to(torch.bfloat16).float(), msg=name)


def test_release_code_in_the_source_is_copied_and_auto_map_resolves(tiny, tmp_path):
    # A local release copy with code files: the output carries them and auto_map names them, so
    # trust_remote_code loaders work offline. (Stand-in modules: the real ones are the hub's.)
    source = tmp_path / "release"
    source.mkdir()
    classes = {"configuration_phi3_v": ["Phi3VConfig"], "modeling_phi3_v": ["Phi3VForCausalLM"],
               "processing_phi3_v": ["Phi3VProcessor", "Phi3VImageProcessor"]}
    for module, names in classes.items():
        (source / f"{module}.py").write_text("".join(f"class {n}:\n    source = {module!r}\n" for n in names))
    out = tmp_path / "out"
    Phi3VForCausalLM.from_pretrained(tiny).save_pretrained(out)
    Phi3VProcessor.from_pretrained(tiny).save_pretrained(out)
    finalize_output(out, source=str(source))
    assert {f"{m}.py" for m in classes} <= {p.name for p in out.iterdir()}
    for name, auto_map in release_auto_maps(PHI3_5V).items():
        assert read(out / name)["auto_map"] == auto_map
        for reference in auto_map.values():
            cls = get_class_from_dynamic_module(reference, str(out))
            assert cls.__name__ == reference.rsplit(".", 1)[1] and cls.source == reference.split(".")[0]


def test_128k_release_auto_maps_are_its_own():
    # (which family a config means is phi3v.configuration_phi3v.detect_model_family's job, tested there)
    maps = release_auto_maps(PHI3V_128K)
    preprocessor = read(RELEASE / "phi-3-vision-128k-instruct" / "preprocessor_config.json")
    assert maps["preprocessor_config.json"] == preprocessor["auto_map"] and "tokenizer_config.json" not in maps


def test_merge_lora_equals_the_adapter(tiny, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = Phi3VForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["qkv_proj", "o_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    processor = Phi3VProcessor.from_pretrained(tiny)
    merged = merge_lora(tmp_path / "adapter", tmp_path / "merged", base_model=str(tiny), processor=processor)
    assert_released_layout(tmp_path / "merged")
    inputs = image_prompt(processor, 1)
    reference_base = Phi3VForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = reference_base(**inputs).logits
        expected = PeftModel.from_pretrained(reference_base, str(tmp_path / "adapter")).eval()(**inputs).logits
        got = merged.float()(**inputs).logits
    assert (plain - expected).abs().max() > 0.1  # the adapter does something
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)


def test_processor_has_the_official_attributes_vllm_reads(tiny):
    processor = Phi3VProcessor.from_pretrained(tiny)
    assert processor.img_tokens[:3] == ["<|image_1|>", "<|image_2|>", "<|image_3|>"]
    assert processor.img_tokens[9] == "<|image_10|>"
    inputs = image_prompt(processor, 2)
    ids = inputs["input_ids"][0]
    for k, (height, width) in enumerate(((60, 40), (60, 70))):
        assert processor.calc_num_image_tokens_from_image_size(width, height) == int((ids == -(k + 1)).sum())


# -- through the runner: what a finetuning run leaves behind ------------------------------------


@pytest.fixture(scope="module")
def ucf101(tmp_path_factory) -> Path:
    import convert_ucf101

    out = tmp_path_factory.mktemp("ucf101") / "data"
    assert convert_ucf101.main([
        "--synthetic", "--out_dir", str(out), "--no-tqdm", "--num_frames", "2", "--synthetic_frames", "2",
        "--synthetic_classes", "2", "--synthetic_videos_per_class", "1", "--synthetic_eval_videos_per_class", "1",
    ]) == 0
    return out


def short_run(tiny, data, out, *extra):
    import finetune_hf_trainer_ucf101 as ucf
    from recipe.task import run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(ucf.TASK, [
            "--model_name_or_path", str(tiny), "--data_dir", str(data), "--output_dir", str(out), "--num_crops", "1",
            "--no-tqdm", "--deepspeed", "none", "--max_steps", "1", "--batch_size", "2", "--batch_size_per_gpu", "2",
            "--eval_batch_size", "2", "--max_new_tokens", "2", "--skip_eval_before", "--save_strategy", "no",
            "--dataloader_num_workers", "0", *extra,
        ])
    finally:
        torch.set_num_threads(threads)


def test_full_finetuning_output_has_the_released_layout(tiny, ucf101, tmp_path):
    out = tmp_path / "full"
    short_run(tiny, ucf101, out, "--learning_rate", "1e-3")
    assert_released_layout(out)
    assert type(AutoProcessor.from_pretrained(out)) is Phi3VProcessor
    trained = Phi3VForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = Phi3VForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)  # the trained weights, not the base


def test_qlora_merge_is_evaluated_and_saved_in_the_released_layout(tiny, ucf101, tmp_path):
    out = tmp_path / "qlora"
    results = short_run(tiny, ucf101, out, "--use_qlora", "--merge_lora", "--learning_rate", "1e-2")
    merged_eval = read(out / "eval_merged.json")
    assert merged_eval["accuracy"] == results["eval_merged"] and merged_eval["num_examples"] == 2
    assert_released_layout(out / "merged")
    assert type(AutoProcessor.from_pretrained(out / "merged")) is Phi3VProcessor
    # The adapter directory: processor files as released too.
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "special_tokens_map.json"} <= names and "processor_config.json" not in names
