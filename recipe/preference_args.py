"""The preference-tuning (DPO) flags and their checks, with TRL's names and defaults.

Light on purpose, as recipe.args is: a preference task script's --help and flag errors answer
without torch. The loss these flags describe is recipe.dpo's (`DPOLoss.from_flags`), built only
for a run; --loss_type's choices are named here, and recipe.dpo computes each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .args import DataArguments, ModelArguments
from .errors import FlagError
from .metrics import score_function

__all__ = ["PreferenceArguments", "LOSS_TYPES", "is_lora_output"]

# --loss_type's choices (recipe.dpo computes each).
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def is_lora_output(path: str) -> bool:
    """Whether `path` is a LoRA run's output directory (an adapter, not a full model)."""
    return (Path(path) / "adapter_config.json").is_file()


@dataclass
class PreferenceArguments(DataArguments):
    """The DPO flags, with TRL's names and defaults."""

    beta: float = field(default=0.1, metadata={"help": "DPO's beta: how far the policy may move from the reference "
                                                       "(higher: closer). IPO: its regularisation tau."})
    loss_type: str = field(default="sigmoid", metadata={
        "help": "sigmoid (DPO), ipo (on log-probs averaged over answer tokens), hinge (RSO), robust "
                "(noise-robust DPO).",
        "choices": list(LOSS_TYPES)})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "Assumed share of flipped preference labels, 0 <= x < 0.5 (cDPO with sigmoid; robust)."})
    rpo_alpha: float | None = field(default=None, metadata={
        "help": "Add this times the chosen answers' NLL per token to the loss (RPO; the paper uses 1.0)."})
    precompute_ref_log_probs: bool = field(default=False, metadata={
        "help": "Compute the reference log-probs of every training pair in one pass before training (stored in "
                "OUTPUT_DIR, reused on resume): no reference model in memory during training."})
    adapter: str | None = field(default=None, metadata={
        "help": "Continue from this LoRA output (an SFT run's OUTPUT_DIR, --model_name_or_path its base; with "
                "--use_lora/--use_qlora): DPO trains that adapter (its rank and targets), and the reference is "
                "base + that adapter, frozen (loaded twice: adapters only, one base)."})
    metric: str | None = field(default=None, metadata={
        "help": "Also generate an answer to each held-out pair's prompt and score it against the chosen answer: "
                "exact_match, accuracy, anls or module:function (as finetune_hf_trainer_custom.py's --metric); "
                "written next to the reward metrics in eval_*.json, with the predictions."})
    ref_model: str | None = field(default=None, metadata={
        "help": "--eval_only: the reference the rewards are measured against (the run's starting model; a model or "
                "LoRA output directory). Default for a LoRA output: its base (adapters disabled)."})

    def check(self) -> None:
        super().check()
        if self.beta <= 0:
            raise FlagError(f"--beta {self.beta} must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise FlagError(f"--label_smoothing {self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise FlagError(f"--label_smoothing applies to --loss_type sigmoid or robust, not {self.loss_type}")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise FlagError(f"--rpo_alpha {self.rpo_alpha} must be >= 0")
        if self.metric:
            score_function(self.metric)  # an unknown metric or unimportable function stops here
        if self.ref_model and not self.eval_only:
            raise FlagError("--ref_model goes with --eval_only; in training the reference is the starting model")
        if self.adapter and self.eval_only:
            raise FlagError("--adapter continues training an adapter; to evaluate a LoRA output pass it as "
                            "--model_name_or_path with --eval_only")
        for flag, path in (("--adapter", self.adapter), ("--ref_model", self.ref_model)):
            if path and Path(path).exists() and not Path(path).is_dir():
                raise FlagError(f"{flag} {path}: not a directory")
        if self.adapter and not is_lora_output(self.adapter):
            raise FlagError(f"--adapter {self.adapter}: no adapter_config.json (not a LoRA output directory)")

    def check_model_flags(self, model_args: ModelArguments) -> None:
        """The DPO flags that depend on the model flags: --adapter continues a LoRA adapter that
        the model flags can train; --eval_only of a full model needs the reference named."""
        if self.adapter:
            if not model_args.use_lora:
                raise FlagError(f"--adapter {self.adapter} continues a LoRA adapter: add --use_lora (or --use_qlora)")
            targets = json.loads((Path(self.adapter) / "adapter_config.json").read_text(encoding="utf-8")).get(
                "target_modules") or []
            if model_args.freeze_vision_model and "vision_embed_tokens" in " ".join(
                    [targets] if isinstance(targets, str) else targets):
                raise FlagError(f"--adapter {self.adapter} has LoRA weights on the image side, which "
                                "--freeze_vision_model cannot freeze: drop --freeze_vision_model")
        if self.eval_only and not self.ref_model and not is_lora_output(model_args.model_name_or_path):
            raise FlagError(f"--eval_only measures rewards against a reference, and {model_args.model_name_or_path} "
                            "is a full model: pass --ref_model PATH, the model its run started from")
