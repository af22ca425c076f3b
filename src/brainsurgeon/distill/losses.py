"""Distillation losses: Hinton's soft-target KD and FitNets hint (feature) regression.

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network" (2015), Sec. 2::

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

The T^2 factor keeps the soft term's gradient magnitude independent of T (its gradient
scales as 1/T^2). Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), Eq. 3::

    L_hint = 1/2 ||u_h(x) - r(v_g(x))||^2        (teacher hint u_h, student guided layer v_g,
                                                   learnable regressor r where widths differ)

    >>> s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    >>> kd_loss(s, t, temperature=4.0)              # T^2 * KL, batch mean
    >>> hinton_loss(s, t, y, temperature=4.0, alpha=0.9)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_t || p_s) with p = softmax(logits / T), averaged over samples.

    Logits are (N, C) or (..., C) (flattened to rows). Zero, with zero gradient, when the
    student's logits equal the teacher's.

    >>> kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 2.0)
    tensor(0.)
    """
    c = student_logits.shape[-1]
    zs = student_logits.reshape(-1, c) / temperature  # (N, C)
    zt = teacher_logits.reshape(-1, c).detach() / temperature  # (N, C)
    kl = F.kl_div(F.log_softmax(zs, dim=-1), F.log_softmax(zt, dim=-1), reduction="batchmean", log_target=True)
    return kl * temperature**2


def hinton_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor | None,
                temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, soft, hard): alpha * kd_loss + (1 - alpha) * cross-entropy with the labels.

    Without labels (``target=None``) the hard term is 0 and the total is the soft term alone.

    >>> total, soft, hard = hinton_loss(s, t, y, temperature=4.0, alpha=0.9)
    """
    soft = kd_loss(student_logits, teacher_logits, temperature)
    if target is None:
        return soft, soft, torch.zeros_like(soft)
    hard = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]), target.reshape(-1))
    return alpha * soft + (1 - alpha) * hard, soft, hard


def hint_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: mean squared error between the (adapted) student and teacher features.

    >>> hint_loss(torch.ones(2, 4), torch.zeros(2, 4))
    tensor(1.)
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(f"hint_loss: adapted student feature {tuple(student_feature.shape)} and teacher "
                         f"feature {tuple(teacher_feature.shape)} differ; the adapter must map one to the other")
    return F.mse_loss(student_feature, teacher_feature.detach())
