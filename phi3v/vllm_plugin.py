"""vLLM general plugin: serve Phi-3.5-vision outputs without trust_remote_code.

vLLM has its own Phi-3-V model, but reads the checkpoint's config and processor through
transformers' Auto classes, which know "phi3_v" only from the release's remote code (fetched
from the hub; impossible offline, and the output of a finetuning run does not contain it).
Installed with our package (`pip install .`), this entry point (`vllm.general_plugins` in
pyproject.toml) runs in every vLLM process before a model is loaded, and registers our
`Phi3VConfig` and `Phi3VProcessor` with those Auto classes: `LLM(model=OUTPUT_DIR)` and
`vllm serve OUTPUT_DIR` then work offline and without `--trust-remote-code`.

vLLM calls plugins once per process, possibly several times; registration is idempotent.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Registers the phi3_v config, model and processor classes with transformers' Auto classes."""
    import phi3v  # noqa: F401  (importing registers them, with exist_ok=True)
