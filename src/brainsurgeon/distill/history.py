"""What a distillation / fine-tuning run did: per-evaluation losses and metrics, the best point.

    >>> hist = distill(student, teacher, train_ds, KD(epochs=2), val=val_ds)
    >>> hist.best_metric, hist.best_step, hist.stopped_early
    (0.991, 782, False)
    >>> text = hist.to_table()             # the library never prints; callers do
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Period:
    """Averages over the training steps since the previous evaluation (all measured)."""

    epoch: int
    step: int
    loss: float
    soft: float  # T^2 KL(teacher || student); 0 without a teacher
    hard: float  # cross-entropy with the labels; 0 without labels
    hint: float  # FitNets hint loss; 0 without hints
    lr: float
    seconds: float
    val: float | None = None


@dataclass
class DistillHistory:
    """The run: periods, the start/best validation metric, early stopping and what was preserved."""

    method: str
    periods: list[Period] = field(default_factory=list)
    val_start: float | None = None
    best_metric: float | None = None
    best_step: int = 0  # 0: the starting weights were best (and were kept)
    stopped_early: bool = False
    steps: int = 0
    seconds: float = 0.0
    masked_weights: int = 0  # weights whose zeros were kept
    masked_zeros: int = 0  # entries held at zero
    qat_layers: list[str] = field(default_factory=list)
    adapters: int = 0  # learnable hint adapters (trained, then discarded)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_table(self) -> str:
        """A fixed-width table, one line per evaluation period, then the summary."""
        head = f"{'epoch':>5} {'step':>7} {'loss':>9} {'soft':>9} {'hard':>9} {'hint':>9} {'lr':>9} {'val':>8}"
        lines = [self.method, head, "-" * len(head)]
        for p in self.periods:
            val = f"{p.val:.4f}" if p.val is not None else "-"
            lines.append(f"{p.epoch:>5} {p.step:>7} {p.loss:>9.4f} {p.soft:>9.4f} {p.hard:>9.4f} "
                         f"{p.hint:>9.4f} {p.lr:>9.2e} {val:>8}")
        if self.best_metric is not None:
            start = f"{self.val_start:.4f}" if self.val_start is not None else "-"
            lines.append(f"val: start {start}, best {self.best_metric:.4f} at step {self.best_step}"
                         f"{' (stopped early)' if self.stopped_early else ''}")
        lines.append(f"{self.steps} steps in {self.seconds:.1f}s; zeros kept in {self.masked_weights} weights "
                     f"({self.masked_zeros} entries); QAT layers: {len(self.qat_layers)}; "
                     f"hint adapters: {self.adapters}")
        return "\n".join(lines)
