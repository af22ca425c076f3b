"""The config of the distillation / fine-tuning loop.

    >>> KD(temperature=4.0, alpha=0.9, epochs=2)                      # Hinton KD
    >>> KD(hints=(("conv2", "conv2"),), hint_weight=1.0)              # + FitNets hints
    >>> KD(epochs=1, qat=QAT(bits=4))                                # QAT: weights stay on a 4-bit grid
    >>> KD(epochs=10, shift=2, flip=True, alpha=0.5, temperature=2)  # function matching on augmented views
    >>> config_from_dict(KD(qat=QAT(bits=3)).to_dict()) == KD(qat=QAT(bits=3))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import Config, config_from_dict, register_config
from ..errors import ConfigError
from ..quant.qat import QAT

_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULES = ("cosine", "constant")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(f"KD: {msg}")


@register_config
@dataclass(frozen=True)
class KD(Config):
    """Knowledge distillation (Hinton et al. 2015) with optional FitNets hints, in one
    structure-preserving training loop; with no teacher it is plain fine-tuning.

    temperature, alpha: loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE(labels).
    hints: (student layer, teacher layer) name pairs whose outputs are matched (MSE) through a
    learnable 1x1-conv/linear adapter where widths differ; weighted by hint_weight.
    keep_zeros: every weight entry that is exactly zero at the start stays zero (pruned
    weights); set False for QAT of an unpruned model, where zeros come from rounding.
    patience: stop after this many evaluations without improvement of the validation metric
    (0: never stop early); the best state is restored at the end when validation is given.
    eval_every: evaluate every this many steps (0: at the end of every epoch).
    qat: a QAT config: the loop swaps in fake-quant layers, trains, and converts back, so
    quantized weights end on their grid.
    shift, flip: augment every image batch (N, C, H, W) by a random translation of up to `shift`
    pixels and a random left-right mirror; teacher and student see the same view ("function
    matching", Beyer et al. CVPR 2022), and so does plain fine-tuning (no teacher) with the same seed.
    """

    verb: ClassVar[str] = "distill"

    temperature: float = 4.0
    alpha: float = 0.9
    hints: tuple[tuple[str, str], ...] = ()
    hint_weight: float = 1.0
    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    batch_size: int = 128
    max_steps: int = 0  # 0: all epochs
    eval_every: int = 0
    patience: int = 0
    grad_clip: float = 0.0  # max global grad norm; 0: off
    keep_zeros: bool = True
    qat: QAT | None = None
    shift: int = 0  # max random translation in pixels; 0: off
    flip: bool = False  # random left-right mirror
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.qat, dict):
            object.__setattr__(self, "qat", config_from_dict(self.qat))
        hints = tuple(tuple(p) for p in self.hints)  # YAML gives lists
        object.__setattr__(self, "hints", hints)
        _check(self.temperature > 0, f"temperature must be > 0 (typically 1-10), got {self.temperature!r}")
        _check(0.0 <= self.alpha <= 1.0, f"alpha (weight of the soft KD term) must be in [0, 1], got {self.alpha!r}")
        _check(all(len(p) == 2 and all(isinstance(n, str) for n in p) for p in hints),
               f"hints must be (student layer, teacher layer) name pairs, e.g. (('conv2', 'conv2'),), got {hints!r}")
        _check(self.hint_weight >= 0, f"hint_weight must be >= 0, got {self.hint_weight!r}")
        _check(isinstance(self.epochs, int) and self.epochs >= 1,
               f"epochs must be an integer >= 1, got {self.epochs!r}")
        _check(self.lr > 0, f"lr must be > 0 (e.g. 1e-3 for adam), got {self.lr!r}")
        _check(self.optimizer in _OPTIMIZERS, f"optimizer must be one of {list(_OPTIMIZERS)}, got {self.optimizer!r}")
        _check(self.schedule in _SCHEDULES, f"schedule must be one of {list(_SCHEDULES)}, got {self.schedule!r}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1,
               f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        for f in ("max_steps", "eval_every", "patience", "shift"):
            _check(isinstance(getattr(self, f), int) and getattr(self, f) >= 0,
                   f"{f} must be an integer >= 0 (0 = off), got {getattr(self, f)!r}")
        _check(isinstance(self.flip, bool), f"flip must be True or False, got {self.flip!r}")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip!r}")
        _check(self.qat is None or isinstance(self.qat, QAT), f"qat must be None or a QAT config, got {self.qat!r}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["hints"] = [list(p) for p in self.hints]
        d["qat"] = self.qat.to_dict() if self.qat is not None else None
        return d

    def describe(self) -> str:
        parts = [f"KD T={self.temperature:g} a={self.alpha:g}", f"{self.epochs} ep"]
        if self.hints:
            parts.append(f"{len(self.hints)} hint(s)")
        if self.shift or self.flip:
            parts.append(self.describe_aug())
        if self.qat is not None:
            parts.append(self.qat.describe())
        return ", ".join(parts)

    def describe_aug(self) -> str:
        """'aug shift 2+flip' (the augmentation part of :meth:`describe`; '' when off)."""
        on = [a for a, used in ((f"shift {self.shift}", self.shift), ("flip", self.flip)) if used]
        return "aug " + "+".join(on) if on else ""
