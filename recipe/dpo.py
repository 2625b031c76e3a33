"""DPO losses and metrics, with TRL's option and metric names so users' habits carry over.

Given the summed log-probabilities of the chosen and rejected answers under the policy and
under the reference model (per pair), with

    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)

the per-pair losses are (beta = --beta, eps = --label_smoothing):

    sigmoid  -logsigmoid(beta * logits) * (1 - eps) - logsigmoid(-beta * logits) * eps   (DPO; cDPO with eps)
    robust   (-logsigmoid(beta * logits) * (1 - eps) + logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    hinge    relu(1 - beta * logits)                                                      (RSO)
    ipo      (logits - 1 / (2 * beta)) ** 2, on log-probs averaged over each answer's tokens (IPO)

and --rpo_alpha adds alpha x the chosen answers' NLL per token, over the batch's chosen tokens as
in TRL (RPO). The rewards are beta * (policy - reference) log-probs of each answer; the logged
metrics are TRL's:
rewards/chosen, rewards/rejected, rewards/accuracies (chosen reward strictly above the rejected
one), rewards/margins, logps/chosen, logps/rejected (the policy's), and nll_loss with RPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .preference_args import LOSS_TYPES

__all__ = ["DPOLoss", "dpo_losses", "sequence_logps", "pair_metrics", "METRIC_NAMES"]

METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


def sequence_logps(summed: torch.Tensor, tokens: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The log-probability a loss works on: the answer's sum of token log-probs, or (IPO, as in
    TRL) its mean over the answer's tokens, which keeps IPO's fixed target margin 1/(2 beta)
    independent of answer length."""
    if loss_type == "ipo":
        return summed / tokens.clamp(min=1).to(summed.dtype)
    return summed


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), every input of shape [pairs].

    The inputs are the log-probs the loss works on (see `sequence_logps`); the rewards are
    detached (metrics only)."""
    ref_chosen, ref_rejected = ref_chosen.to(policy_chosen), ref_rejected.to(policy_rejected)
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; one of {', '.join(LOSS_TYPES)}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy_chosen: torch.Tensor,
                 policy_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair values of TRL's metrics (averaged over pairs when logged)."""
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }


@dataclass(frozen=True)
class DPOLoss:
    """The loss of a batch of pairs from the flags (--beta, --loss_type, --label_smoothing, --rpo_alpha).

    `__call__` takes summed log-probs and answer token counts (policy and reference) and the
    chosen answers' mean NLL; returns the mean loss over pairs and the per-pair metrics.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None

    @classmethod
    def from_flags(cls, flags) -> DPOLoss:
        """The loss the parsed DPO flags describe (recipe.preference_args.PreferenceArguments)."""
        return cls(flags.beta, flags.loss_type, flags.label_smoothing, flags.rpo_alpha)

    def __call__(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
                 chosen_nll: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = [sequence_logps(x, n, self.loss_type) for x, n in (
            (policy_chosen, chosen_tokens), (policy_rejected, rejected_tokens),
            (ref_chosen, chosen_tokens), (ref_rejected, rejected_tokens))]
        losses, chosen_rewards, rejected_rewards = dpo_losses(*logps, beta=self.beta, loss_type=self.loss_type,
                                                              label_smoothing=self.label_smoothing)
        loss = losses.mean()
        metrics = pair_metrics(chosen_rewards, rejected_rewards, logps[0], logps[1])
        if self.rpo_alpha is not None:
            if chosen_nll is None:
                raise ValueError("--rpo_alpha needs the chosen answers' NLL")
            loss = loss + self.rpo_alpha * chosen_nll.mean()
            metrics["nll_loss"] = chosen_nll.detach().reshape(-1)
        return loss, metrics
