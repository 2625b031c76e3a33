"""Native, transformers-5 implementation of Phi-3.5-vision-instruct (no trust_remote_code).

Importing this package registers the classes with the Auto factories under the official
model_type "phi3_v", so official-format directories load with the usual calls:

    import phi3v
    from transformers import AutoModelForCausalLM, AutoProcessor
    model = AutoModelForCausalLM.from_pretrained(path)   # no trust_remote_code
    processor = AutoProcessor.from_pretrained(path)
"""

import os

import torch

# DeepSpeed (imported by transformers when saving or loading, if installed) warns that it "set
# the accelerator to CPU" on every machine without CUDA; say so up front instead. (The only place
# that sets it: recipe.training_args imports this package before transformers for it.)
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoProcessor  # noqa: E402

from .configuration_phi3v import Phi3VConfig  # noqa: E402
from .image_processing_phi3v import Phi3VImageProcessor  # noqa: E402
from .modeling_phi3v import Phi3VForCausalLM, Phi3VModel, Phi3VPreTrainedModel  # noqa: E402
from .processing_phi3v import Phi3VProcessor  # noqa: E402

__all__ = [
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VImageProcessor",
    "Phi3VModel",
    "Phi3VPreTrainedModel",
    "Phi3VProcessor",
]

AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig, exist_ok=True)
AutoModel.register(Phi3VConfig, Phi3VModel, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
AutoImageProcessor.register(Phi3VConfig, image_processor_classes={"pil": Phi3VImageProcessor}, exist_ok=True)
AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)
# No AutoTokenizer entry: transformers already maps "phi3_v" to the tokenizer.json-backed class,
# which keeps the released normalizer (its LlamaTokenizer would rebuild a different pipeline).
