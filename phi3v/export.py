"""A saved model directory in the form every Phi-3.5-vision tool loads, as released.

`finalize_output(dir, source=...)` is called once a finished model (full finetune, `merged/`)
or adapter has been written by `save_pretrained`; it fixes what transformers 5 and the Trainer
write differently from the release, so the official hub code (transformers 4.x with
trust_remote_code), vLLM and `import phi3v` + the Auto classes all load the directory:

- no `processor_config.json` (AutoProcessor reads it first and, without our package imported,
  cannot resolve its bare class name: it returns a tokenizer, and vLLM refuses to start);
- `additional_special_tokens` as released in tokenizer_config.json and special_tokens_map.json;
- config.json: `eos_token_id` 2 as released (the Trainer aligns it with the tokenizer's
  `<|endoftext|>`), weights and `torch_dtype` in the release dtype (bf16) unless told otherwise;
- an `auto_map` that resolves: the release's code files copied from the source directory when it
  has them (works offline), else references into the release repository on the hub
  (`"microsoft/Phi-3.5-vision-instruct--modeling_phi3_v.Phi3VForCausalLM"`).

`merge_lora` writes base + LoRA adapter as one full model (QLoRA adapters are merged into the
unquantised base, the only form a merged model can be saved in).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .configuration_phi3v import PHI3_5V, PHI3V_128K, detect_model_family
from .image_processing_phi3v import RELEASED_AUTO_MAPS
from .jsonfile import write_json_atomic
from .processing_phi3v import write_released_special_tokens

__all__ = [
    "RELEASE_REPOS",
    "RELEASED_EOS_TOKEN_ID",
    "SAVE_DTYPES",
    "finalize_output",
    "load_merged",
    "merge_lora",
    "release_auto_maps",
]

# config.json of both releases: bos 1, eos 2 (`</s>`); generation stops on <|end|> through
# generation_config.json.
RELEASED_EOS_TOKEN_ID = 2
SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
RELEASE_REPOS = {PHI3_5V: "microsoft/Phi-3.5-vision-instruct", PHI3V_128K: "microsoft/Phi-3-vision-128k-instruct"}


def release_auto_maps(family: str) -> dict[str, dict[str, str]]:
    """The auto_map of each released file, by file name (module names differ between releases)."""
    maps = {
        "config.json": {
            "AutoConfig": "configuration_phi3_v.Phi3VConfig",
            "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        },
        "preprocessor_config.json": dict(RELEASED_AUTO_MAPS[family]),
    }
    if family == PHI3_5V:  # (the 128k tokenizer_config.json has no auto_map)
        maps["tokenizer_config.json"] = {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"}
    return maps


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: Path, data: dict[str, Any]) -> None:
    write_json_atomic(path, data, sort_keys=True)


def _code_files(source: str | os.PathLike | None) -> list[Path]:
    """The release's .py files when `source` is a local copy of a release that has them."""
    if source is None or not Path(source).is_dir():
        return []
    files = sorted(Path(source).glob("*.py"))
    names = {f.name for f in files}
    return files if {"configuration_phi3_v.py", "modeling_phi3_v.py", "processing_phi3_v.py"} <= names else []


def _resolvable_auto_maps(output_dir: Path, family: str, source: str | os.PathLike | None) -> None:
    """Copies the release code next to the weights, or points auto_map at the release repo."""
    code = _code_files(source)
    for file in code:
        if file.resolve() != (output_dir / file.name).resolve():
            shutil.copyfile(file, output_dir / file.name)
    prefix = "" if code else f"{RELEASE_REPOS[family]}--"
    for name, auto_map in release_auto_maps(family).items():
        path = output_dir / name
        if path.is_file():
            data = _read(path)
            data["auto_map"] = {key: prefix + value for key, value in auto_map.items()}
            _write(path, data)


def _convert_weights(output_dir: Path, dtype: torch.dtype) -> None:
    """Casts the floating tensors of every model shard to `dtype` (one shard in memory at a time)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = output_dir / "model.safetensors.index.json"
    shards = sorted(set(_read(index_path)["weight_map"].values())) if index_path.is_file() else ["model.safetensors"]
    total = 0
    for shard in shards:
        path = output_dir / shard
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if any(t.is_floating_point() and t.dtype != dtype for t in tensors.values()):
            tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
            tmp = path.with_name(path.name + ".tmp")
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if index_path.is_file():
        index = _read(index_path)
        index.setdefault("metadata", {})["total_size"] = total
        _write(index_path, index)


def finalize_output(
    output_dir: str | os.PathLike,
    source: str | os.PathLike | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    family: str | None = None,
) -> Path:
    """Puts a directory written by `save_pretrained` into the released layout (see module doc).

    Args:
        output_dir: a full model (config.json + safetensors), `merged/`, or a LoRA adapter
            directory (only its processor files are fixed).
        source: the `--model_name_or_path` the model was trained from: a local release copy
            whose .py files are copied, or a hub id.
        dtype: the weights' dtype on disk (the release's bf16 by default); None keeps them.
        family: "phi3.5v" or "phi3v-128k"; default: what config.json says (detect_model_family).
    Idempotent: running it twice gives the same files.
    """
    output_dir = Path(output_dir)
    (output_dir / "processor_config.json").unlink(missing_ok=True)
    if (output_dir / "tokenizer_config.json").is_file():
        write_released_special_tokens(output_dir)
    config_path = output_dir / "config.json"
    if not config_path.is_file():  # an adapter directory: no model config, no weights of ours
        return output_dir
    config = _read(config_path)
    config["eos_token_id"] = RELEASED_EOS_TOKEN_ID
    if dtype is not None:
        _convert_weights(output_dir, dtype)
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        config.pop("dtype", None)
    _write(config_path, config)
    _resolvable_auto_maps(output_dir, family or detect_model_family(config), source)
    return output_dir


def merge_lora(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    processor: Any = None,
    dtype: torch.dtype | None = torch.bfloat16,
    progress: bool = False,
):
    """Base model + LoRA adapter -> one full model in `output_dir`, finalized; returns it.
    `progress`: PEFT's progress bar over the merged layers.

    The base is loaded unquantised in fp32 whatever the training used (a QLoRA adapter is merged
    into the full-precision base: 4-bit weights cannot be saved merged), the merge is done in
    fp32 and saved in `dtype`. The returned model is in `dtype` too, so evaluating it measures
    what was saved -- for QLoRA that differs from the 4-bit model + adapter evaluated during
    training, which is why the runner evaluates it again (eval_merged.json).
    """
    from peft import PeftConfig, PeftModel

    from .modeling_phi3v import Phi3VForCausalLM

    if base_model is None:
        base_model = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    base = Phi3VForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload(progressbar=progress)
    if dtype is not None:
        merged = merged.to(dtype)
    merged.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    finalize_output(output_dir, source=base_model, dtype=dtype)
    return merged.eval()


def load_merged(merged_dir: str | os.PathLike, generation_config: Any = None):
    """`merged/` as saved, for evaluation on every rank (waits until rank 0 has written it).

    `generation_config`: the generation settings (end tokens, pad id) the merged one should use.
    """
    import torch.distributed as dist

    from .modeling_phi3v import Phi3VForCausalLM

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    model = Phi3VForCausalLM.from_pretrained(merged_dir).eval()
    if generation_config is not None:
        model.generation_config = generation_config
    return model
