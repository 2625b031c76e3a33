"""Each DPO loss against values computed by hand from given log-probabilities.

The pair: policy chosen -1, rejected -3; reference chosen -2, rejected -2, so
logits = (-1 - -3) - (-2 - -2) = 2 and, at beta 0.5, beta * logits = 1. With
log(1 + e^-1) = 0.3132617 and log(1 + e) = 1.3132617:
"""

import math

import pytest
import torch

from recipe.dpo import DPOLoss, dpo_losses, sequence_logps

POLICY = (torch.tensor([-1.0]), torch.tensor([-3.0]))
REFERENCE = (torch.tensor([-2.0]), torch.tensor([-2.0]))
SOFTPLUS_MINUS_1 = 0.31326169  # -logsigmoid(1)
SOFTPLUS_1 = 1.31326169  # -logsigmoid(-1)


@pytest.mark.parametrize("loss_type, label_smoothing, beta, expected", [
    ("sigmoid", 0.0, 0.5, SOFTPLUS_MINUS_1),
    ("sigmoid", 0.1, 0.5, 0.9 * SOFTPLUS_MINUS_1 + 0.1 * SOFTPLUS_1),  # cDPO
    ("robust", 0.1, 0.5, (0.9 * SOFTPLUS_MINUS_1 - 0.1 * SOFTPLUS_1) / 0.8),
    ("robust", 0.0, 0.5, SOFTPLUS_MINUS_1),
    ("hinge", 0.0, 0.5, 0.0),  # relu(1 - 1)
    ("hinge", 0.0, 0.25, 0.5),  # relu(1 - 0.5)
    ("ipo", 0.0, 0.5, (2 - 1) ** 2),  # (logits - 1/(2 beta))^2 on the log-probs as given
    ("ipo", 0.0, 0.1, (2 - 5) ** 2),
])
def test_losses_by_hand(loss_type, label_smoothing, beta, expected):
    losses, chosen, rejected = dpo_losses(*POLICY, *REFERENCE, beta=beta, loss_type=loss_type,
                                          label_smoothing=label_smoothing)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert chosen.item() == pytest.approx(beta * 1.0) and rejected.item() == pytest.approx(beta * -1.0)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        dpo_losses(*POLICY, *REFERENCE, loss_type="kto")


def test_ipo_works_on_log_probs_averaged_over_answer_tokens():
    """Chosen 2 tokens, rejected 4: policy means -0.5 and -0.75, reference -1 and -0.5;
    logits = 0.25 - (-0.5) = 0.75, target 1/(2 * 0.5) = 1: loss 0.0625."""
    tokens = torch.tensor([2]), torch.tensor([4])
    loss, metrics = DPOLoss(beta=0.5, loss_type="ipo")(*POLICY, *REFERENCE, *tokens)
    assert loss.item() == pytest.approx(0.0625)
    assert metrics["logps/chosen"].item() == pytest.approx(-0.5)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5 * (-0.5 - -1.0))
    # every other loss sums the answer's log-probs
    assert torch.equal(sequence_logps(torch.tensor([-3.0]), torch.tensor([4]), "sigmoid"), torch.tensor([-3.0]))


def test_rpo_adds_alpha_times_the_chosen_nll_and_metrics_have_trl_names():
    """Two pairs: the second prefers the rejected answer (logits -2)."""
    policy = torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0])
    reference = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    tokens = torch.tensor([1, 1]), torch.tensor([1, 1])
    nll = torch.tensor([2.0, 4.0])
    loss, metrics = DPOLoss(beta=0.5, rpo_alpha=0.5)(*policy, *reference, *tokens, chosen_nll=nll)
    dpo = (SOFTPLUS_MINUS_1 + SOFTPLUS_1) / 2
    assert loss.item() == pytest.approx(dpo + 0.5 * 3.0, abs=1e-6)
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert metrics["rewards/margins"].tolist() == pytest.approx([1.0, -1.0])
    assert metrics["rewards/rejected"].tolist() == pytest.approx([-0.5, 0.5])
    assert metrics["logps/rejected"].tolist() == [-3.0, -1.0]
    assert metrics["nll_loss"].tolist() == [2.0, 4.0]
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected", "nll_loss"}


def test_equal_policy_and_reference_give_log2_and_zero_accuracy():
    """Before training (policy == reference) every sigmoid loss is log 2 and no pair counts as won."""
    loss, metrics = DPOLoss()(*POLICY, *POLICY, torch.tensor([3]), torch.tensor([3]))
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["rewards/accuracies"].tolist() == [0.0]


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    loss, _ = DPOLoss()(chosen, rejected, *REFERENCE, torch.tensor([1]), torch.tensor([1]))
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()
