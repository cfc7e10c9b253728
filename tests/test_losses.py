"""The GRAM losses against hand computations and the smoothing = regularized Bradley-Terry identity."""

import math

import pytest
import torch
import torch.nn.functional as F

from gram_core.losses import bradley_terry_loss, judge_loss, lm_loss, optimal_margin


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_judge_loss_equals_hand_computation():
    logits = torch.tensor([[2.0, 0.5], [-1.0, 1.0], [0.3, 0.3]])
    labels = torch.tensor([0, 1, 1])
    eps = 0.2
    expected = 0.0
    for (za, zb), y in zip(logits.tolist(), labels.tolist(), strict=True):
        log_z = math.log(math.exp(za) + math.exp(zb))
        logp = [za - log_z, zb - log_z]
        # targets 1 - eps/2 on the label, eps/2 on the other class
        expected += -((1 - eps / 2) * logp[y] + (eps / 2) * logp[1 - y])
    expected /= 3
    assert judge_loss(logits, labels, eps).item() == pytest.approx(expected, rel=1e-6)


def test_judge_loss_without_smoothing_is_plain_two_class_ce():
    logits = torch.tensor([[1.5, -0.5], [0.2, 2.2]])
    labels = torch.tensor([1, 1])
    # -log softmax(z)_y by hand: row 0 -> -(z_B - logsumexp), row 1 likewise
    expected = (-(-0.5 - math.log(math.exp(1.5) + math.exp(-0.5)))
                - (2.2 - math.log(math.exp(0.2) + math.exp(2.2)))) / 2
    assert judge_loss(logits, labels, 0.0).item() == pytest.approx(expected, rel=1e-6)
    assert judge_loss(logits, labels, 0.0).item() == pytest.approx(F.cross_entropy(logits, labels).item())


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("label", [0, 1])
def test_smoothing_is_bradley_terry_plus_linear_margin(eps, label):
    torch.manual_seed(0)
    logits = torch.randn(16, 2) * 3
    labels = torch.full((16,), label)
    chosen = logits[:, label]
    rejected = logits[:, 1 - label]
    delta = chosen - rejected
    # L = -log sigma(D) + (eps/2) D, per example, then the batch mean
    identity = (-F.logsigmoid(delta) + eps / 2 * delta).mean()
    assert judge_loss(logits, labels, eps).item() == pytest.approx(identity.item(), rel=1e-5, abs=1e-6)


def test_gradient_vanishes_at_the_optimal_margin():
    eps = 0.1
    assert optimal_margin(eps) == pytest.approx(2.944, abs=1e-3)
    margin = torch.tensor([[optimal_margin(eps), 0.0]], requires_grad=True)
    judge_loss(margin, torch.tensor([0]), eps).backward()
    assert margin.grad.abs().max().item() < 1e-6
    # away from the optimum the gradient on z_chosen has the sign that moves D toward D*
    below = torch.tensor([[1.0, 0.0]], requires_grad=True)
    judge_loss(below, torch.tensor([0]), eps).backward()
    assert below.grad[0, 0].item() < -0.1


def test_numeric_minimisation_finds_the_optimal_margin():
    eps = 0.1
    delta = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([delta], lr=1.0, max_iter=200, tolerance_grad=1e-10)

    def closure():
        optimizer.zero_grad()
        loss = judge_loss(torch.stack([delta, torch.zeros(1)], dim=1), torch.tensor([0]), eps)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert delta.item() == pytest.approx(math.log(1.9 / 0.1), abs=1e-3)


def test_optimal_margin_edge_cases():
    assert optimal_margin(0.0) == math.inf
    assert optimal_margin(1.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="eps"):
        optimal_margin(-0.1)


def test_judge_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        judge_loss(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="labels"):
        judge_loss(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), 0.1)


def test_lm_loss_is_shifted_and_ignores_masked_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 4, 2]])
    # targets: (b0, t1<-pos0) 3, (b0, t2<-pos1) 1, (b1, t2<-pos1) 4, (b1, t3<-pos2) 2
    logp = torch.log_softmax(logits, dim=-1)
    expected = -(logp[0, 0, 3] + logp[0, 1, 1] + logp[1, 1, 4] + logp[1, 2, 2]) / 4
    assert lm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    summed = lm_loss(logits, labels, reduction="sum")
    assert summed.item() == pytest.approx(4 * expected.item(), rel=1e-6)


def test_lm_loss_does_not_depend_on_ignored_positions():
    torch.manual_seed(1)
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[-100, -100, 2, 3, -100]])
    changed = logits.clone()
    changed[0, 0] += 5.0  # predicts position 1 (ignored)
    changed[0, 3] -= 4.0  # predicts position 4 (ignored)
    changed[0, 4] += 9.0  # last position predicts nothing
    assert lm_loss(changed, labels).item() == pytest.approx(lm_loss(logits, labels).item(), rel=1e-6)
    with pytest.raises(ValueError, match="no target tokens"):
        lm_loss(logits, torch.full((1, 5), -100))


def test_bradley_terry_loss_by_hand():
    r_c = torch.tensor([1.0, -0.5, 2.0])
    r_r = torch.tensor([0.0, 0.5, -1.0])
    expected = -(log_sigmoid(1.0) + log_sigmoid(-1.0) + log_sigmoid(3.0)) / 3
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx(expected, rel=1e-6)
    # eps = 0 judge loss is Bradley-Terry on the logit difference
    logits = torch.stack([r_c, r_r], dim=1)
    assert judge_loss(logits, torch.zeros(3, dtype=torch.long), 0.0).item() == pytest.approx(expected, rel=1e-6)
