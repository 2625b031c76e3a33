"""vLLM (CPU) serves a finetuned output of ours: the greedy tokens equal our own generate().

Needs vLLM and our package installed together in one venv: `make test-vllm` builds it (../vllm-venv,
or VLLM_VENV=DIR), installs the checkout there and runs this file; `make test` deselects it (marker
`vllm`). vLLM runs in a subprocess that never imports phi3v: the plugin must do it. vLLM's Phi-3-V hard-codes the CLIP ViT-L/14-336 tower and
image token id 32044, so the model here has the released tokenizer (vocabulary 32064), the full
CLIP-L tower and a tiny language model (head size 64, which vLLM's CPU attention supports).
"""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from PIL import Image

from phi3v.configuration_phi3v import Phi3VConfig
from phi3v.export import finalize_output
from phi3v.image_processing_phi3v import Phi3VImageProcessor
from phi3v.modeling_phi3v import Phi3VForCausalLM
from phi3v.processing_phi3v import Phi3VProcessor

pytestmark = pytest.mark.vllm

RELEASE = Path(__file__).resolve().parent / "fixtures" / "release" / "phi-3.5-vision-instruct"
PROMPT = "<|user|>\n<|image_1|>\n<|image_2|>\nWhat do the two pictures show?<|end|>\n<|assistant|>\n"
NEW_TOKENS = 8


def vllm_sized_output(directory: Path) -> Path:
    """The released config at tiny text widths (head size 64), full CLIP-L, random weights,
    saved and finalized as a training run saves its result (bf16, released layout)."""
    config = json.loads((RELEASE / "config.json").read_text())
    config.pop("_attn_implementation", None)
    head_dim, heads = 64, 2
    rope = config["rope_scaling"]
    for key in ("short_factor", "long_factor"):  # one factor per rotary pair: head_dim / 2
        rope[key] = [rope[key][round(i * (len(rope[key]) - 1) / (head_dim // 2 - 1))] for i in range(head_dim // 2)]
    config.update(hidden_size=head_dim * heads, num_attention_heads=heads, num_key_value_heads=heads,
                  intermediate_size=256, num_hidden_layers=2, initializer_range=0.2)
    torch.manual_seed(0)
    model = Phi3VForCausalLM(Phi3VConfig(**config)).eval()
    model.save_pretrained(directory)
    tokenizer = Phi3VProcessor.from_pretrained(RELEASE).tokenizer  # the released tokenizer
    Phi3VProcessor(image_processor=Phi3VImageProcessor(num_crops=1), tokenizer=tokenizer).save_pretrained(directory)
    finalize_output(directory, source="microsoft/Phi-3.5-vision-instruct")
    return directory


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    return vllm_sized_output(tmp_path_factory.mktemp("vllm") / "model")


def images():
    return [Image.new("RGB", (96, 64), (220, 30, 30)), Image.new("RGB", (50, 120), (20, 40, 210))]


def test_plugin_is_installed_for_vllm():
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("phi3v") == "phi3v.vllm_plugin:register", "pip install . into the vLLM venv first"


# Run in a fresh process that never imports phi3v itself: vLLM must find our config and
# processor through the plugin alone, offline, without trust_remote_code.
VLLM_SCRIPT = """
import json, sys
from PIL import Image
import vllm
assert "phi3v" not in sys.modules
directory, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
images = [Image.new("RGB", (96, 64), (220, 30, 30)), Image.new("RGB", (50, 120), (20, 40, 210))]
llm = vllm.LLM(model=directory, dtype="float32", max_model_len=4096, max_num_seqs=1, enforce_eager=True,
               limit_mm_per_prompt={"image": 2}, seed=0)
params = vllm.SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
(result,) = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, params)
print("RESULT " + json.dumps({"prompt": list(result.prompt_token_ids), "output": list(result.outputs[0].token_ids),
                              "plugin_loaded": "phi3v" in sys.modules}), flush=True)
"""


def test_vllm_greedy_tokens_equal_ours(output):
    processor = Phi3VProcessor.from_pretrained(output)
    model = Phi3VForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    inputs = processor(PROMPT, images())
    with torch.no_grad():
        ours = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                              min_new_tokens=NEW_TOKENS)[0, inputs["input_ids"].shape[1]:].tolist()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(output), PROMPT, str(NEW_TOKENS)], env=env,
                          cwd=output.parent, capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["plugin_loaded"]
    # vLLM tokenizes the prompt as the official processor does: same positions, same ids.
    assert result["prompt"] == [i if i >= 0 else 32044 for i in inputs["input_ids"][0].tolist()]
    assert result["output"] == ours
