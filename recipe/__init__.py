"""The finetuning recipes' shared code: flags, data, model setup, training runner, evaluation.

Importing it quiets third-party messages a user cannot act on (each one named below).
"""

import logging
import os
import warnings

import torch

# bitsandbytes' CPU backend looks for an optional `kernels` download at import and warns when it
# is absent; its built-in fallback is what runs, and nothing is for the user to do.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# DeepSpeed's gloo path (CPU runs) calls torch's deprecated all_gather_into_tensor alias.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
# PEFT's get_peft_model reads transformers' deprecated `is_gradient_checkpointing` property.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# DeepSpeed warns that it "set the accelerator to CPU" on machines without CUDA; say so up front.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
