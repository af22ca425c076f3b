"""Batch augmentation for function matching: teacher and student see the *same* augmented view.

Beyer et al., "Knowledge distillation: A good teacher is patient and consistent" (CVPR 2022),
Sec. 3: distillation works best as *function matching* -- the student matches the teacher's
output on the very image the teacher sees ("consistent teaching"), under aggressive
augmentation and long schedules. The loop augments each batch once, then feeds that tensor to
both models (and to the plain fine-tuning arm, so both arms see identical views per seed)::

    >>> x = torch.rand(4, 1, 28, 28)
    >>> shift_flip(x, shift=2, flip=True).shape      # each image moved by <= 2 px, maybe mirrored
    torch.Size([4, 1, 28, 28])
    >>> torch.equal(shift_flip(x, shift=0, flip=False), x)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def shift_flip(x: torch.Tensor, shift: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image of `x` (N, C, H, W) by a random (dy, dx) in [-shift, shift]^2 (zero fill),
    then mirror it left-right with probability 1/2 when `flip`. Draws from `generator` (default:
    the global RNG, which :func:`~brainsurgeon.distill.distill` seeds with ``cfg.seed``).

    >>> y = shift_flip(torch.ones(2, 3, 8, 8), shift=1, flip=False)
    >>> bool((y.sum((1, 2, 3)) >= 3 * 7 * 7).all())            # at most one row and one column lost
    True
    """
    if x.dim() != 4:
        raise ConfigError(f"shift/flip augmentation (KD(shift=, flip=), train(shift=, flip=)) needs image batches "
                          f"(N, C, H, W), got a batch of shape {tuple(x.shape)}; set shift=0 and flip=False for "
                          f"non-image inputs")
    n, _, h, w = x.shape
    if shift:
        p = shift
        xp = F.pad(x, (p, p, p, p))  # (N, C, H + 2p, W + 2p)
        a, b = torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=x.device)  # top-left corners
        rows = a[:, None] + torch.arange(h, device=x.device)  # (N, H)
        cols = b[:, None] + torch.arange(w, device=x.device)  # (N, W)
        idx = torch.arange(n, device=x.device)[:, None, None]
        x = xp[idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if flip:
        mirror = torch.rand(n, generator=generator, device=x.device) < 0.5  # (N,)
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x.contiguous()
