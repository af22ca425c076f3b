"""KD and hint losses against the hand formulas."""

import pytest
import torch
import torch.nn.functional as F

from brainsurgeon.distill import hint_loss, hinton_loss, kd_loss


def logits(seed, shape=(6, 5)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_loss_is_hand_formula(T):
    s, t = logits(0), logits(1)
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    hand = T**2 * (pt * (pt.log() - ps.log())).sum(-1).mean()  # T^2 KL(p_t || p_s), batch mean
    torch.testing.assert_close(kd_loss(s, t, T), hand)


def test_kd_loss_zero_with_zero_gradient_when_student_equals_teacher():
    t = logits(2)
    s = t.clone().requires_grad_(True)
    loss = kd_loss(s, t, 4.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and s.grad.abs().max() < 1e-7


def test_kd_gradient_is_scaled_softmax_difference():
    s, t, T = logits(3).requires_grad_(True), logits(4), 3.0
    kd_loss(s, t, T).backward()
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)) / s.shape[0]  # Hinton Eq. 2 * T^2
    torch.testing.assert_close(s.grad, expected)


def test_teacher_gets_no_gradient_and_sequences_flatten():
    s, t = logits(5, (2, 3, 7)).requires_grad_(True), logits(6, (2, 3, 7)).requires_grad_(True)
    torch.testing.assert_close(kd_loss(s, t, 2.0), kd_loss(s.reshape(6, 7), t.reshape(6, 7), 2.0))
    kd_loss(s, t, 2.0).backward()
    assert t.grad is None


def test_hinton_loss_mixes_soft_and_hard():
    s, t, y = logits(7), logits(8), torch.tensor([0, 1, 2, 3, 4, 0])
    total, soft, hard = hinton_loss(s, t, y, temperature=4.0, alpha=0.7)
    torch.testing.assert_close(hard, F.cross_entropy(s, y))
    torch.testing.assert_close(total, 0.7 * kd_loss(s, t, 4.0) + 0.3 * hard)
    total, soft, hard = hinton_loss(s, t, None, temperature=4.0, alpha=0.7)  # unlabelled: soft only
    assert torch.equal(total, soft) and hard.item() == 0.0


def test_hint_loss_is_mse_and_checks_shapes():
    a, b = logits(9), logits(10)
    torch.testing.assert_close(hint_loss(a, b), ((a - b) ** 2).mean())
    with pytest.raises(ValueError, match="adapter must map"):
        hint_loss(a, b[:, :3])
