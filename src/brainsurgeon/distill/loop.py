"""One structure-preserving training loop: KD, hints, plain fine-tuning and QAT.

    >>> hist = distill(pruned, dense, train_ds, KD(temperature=4, alpha=0.9, epochs=2), val=val_ds)
    >>> hist = distill(pruned, None, train_ds, KD(epochs=2))            # plain fine-tuning
    >>> hist = distill(quantized, dense, train_ds, KD(qat=QAT(bits=4), keep_zeros=False))

The student is trained in place and keeps its structure: pruned channels stay gone (shapes
are checked), zeros stay zero (gradient masks + re-masking after each step), quantized weights
end on their grid (fake-quant during training, converted back after). The teacher is used in
eval mode without gradients and left as it was. With validation data the best state (the
starting one included) is kept, so validation never ends worse than it started. On any error
the student is restored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._log import get_logger, progress
from .._modes import eval_mode
from ..errors import ConfigError, NumericalError
from ..quant.fakequant import FAKE_QUANT_TYPES
from ..quant.qat import convert_qat_, prepare_qat_
from .augment import shift_flip
from .config import KD
from .hints import HintHooks
from .history import DistillHistory, Period
from .losses import hinton_loss
from .structure import apply_masks_, check_structure, masked_gradients, shapes, zero_masks

log = get_logger(__name__)

Val = Dataset | DataLoader | Callable[[nn.Module], float] | None


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        raise ConfigError(f"{type(model).__name__} has no parameters to train")
    return p.device


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"model output of type {type(out).__name__} has no logits tensor; "
                      f"return a tensor, a tuple starting with one, or an object with .logits")


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise ConfigError(f"a training batch must be x or (x, y) tensors, got {type(batch).__name__}")


def _loader(data: Any, cfg: KD) -> Iterable[Any]:
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        g = torch.Generator().manual_seed(cfg.seed)
        return DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=g)
    if isinstance(data, Iterator):
        raise ConfigError("data is a one-shot iterator, but training needs one pass per epoch; pass a "
                          "Dataset, a DataLoader or a list of (x, y) batches")
    if isinstance(data, Iterable):
        return data
    raise ConfigError(f"data must be a Dataset or an iterable of (x, y) batches (e.g. a DataLoader), "
                      f"got {type(data).__name__}")


@torch.no_grad()
def evaluate_metric(model: nn.Module, val: Val) -> float:
    """The validation metric (higher is better): ``val(model)`` if callable, else top-1 accuracy
    over (x, y) batches of a Dataset/DataLoader. The model's mode is restored.

    >>> evaluate_metric(model, test_ds)
    0.991
    """
    if callable(val) and not isinstance(val, (Dataset, DataLoader)):
        return float(val(model))
    dev = _device(model)
    loader = DataLoader(val, batch_size=512) if isinstance(val, Dataset) else val
    correct = total = 0
    with eval_mode(model):
        for batch in loader:  # type: ignore[union-attr]
            x, y = _split(batch)
            if y is None:
                raise ConfigError("validation batches need labels (x, y), or pass val=callable(model) -> float")
            correct += int((_logits(model(x.to(dev))).argmax(-1).cpu() == y.cpu()).sum())
            total += y.numel()
    if total == 0:
        raise ConfigError("validation data is empty; pass a data set of (x, y) pairs or val=None")
    return correct / total


def _optimizer(params: list[nn.Parameter], cfg: KD) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _total_steps(loader: Iterable[Any], cfg: KD) -> int | None:
    try:
        n = cfg.epochs * len(loader)  # type: ignore[arg-type]
    except TypeError:
        return cfg.max_steps or None
    return min(n, cfg.max_steps) if cfg.max_steps else n


def distill(student: nn.Module, teacher: nn.Module | None, data: Any, cfg: KD | None = None,
            val: Val = None, *, masks: dict[str, torch.Tensor] | None = None) -> DistillHistory:
    """Fine-tune `student` in place, distilling from `teacher` (None: plain fine-tuning).

    data: a Dataset (shuffled with cfg.seed, batches of cfg.batch_size) or an iterable of
    (x, y) / x batches. val: a Dataset/DataLoader of (x, y) (accuracy) or ``callable(model)
    -> float`` (higher is better), for early stopping and best-state selection. masks:
    {param name: True where the weight must stay zero}; default: the zeros found at the start
    (``cfg.keep_zeros``). Deterministic given cfg.seed; the global RNG is left as it was.

    >>> hist = distill(pruned, dense, train_ds, KD(temperature=4.0, alpha=0.9, epochs=2), val=val_ds)
    >>> print(hist.to_table())
    """
    cfg = cfg if cfg is not None else KD()
    if not isinstance(cfg, KD):
        raise ConfigError(f"distill needs a KD config, e.g. KD(temperature=4.0); got {cfg!r}")
    if teacher is None and cfg.hints:
        raise ConfigError(f"KD(hints={list(cfg.hints)}) needs a teacher; pass teacher=... or hints=()")
    if teacher is student:
        raise ConfigError("the teacher must be a separate model (e.g. copy.deepcopy(model) before compressing)")
    dev = _device(student)
    loader = _loader(data, cfg)
    saved = {k: v.detach().clone() for k, v in student.state_dict().items()}
    originals = {n: m for n, m in student.named_modules() if type(m) in FAKE_QUANT_TYPES}
    t_mode = teacher.training if teacher is not None else False
    t_grads = [(p, p.requires_grad) for p in teacher.parameters()] if teacher is not None else []
    s_mode, qat_layers = student.training, []
    plain = ", ".join(p for p in (f"fine-tune, {cfg.epochs} ep", cfg.describe_aug()) if p)
    hist = DistillHistory(method=cfg.describe() if teacher is not None else plain)
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            masks = zero_masks(student) if masks is None and cfg.keep_zeros else (masks or {})
            before = shapes(student)
            if teacher is not None:
                teacher.eval().requires_grad_(False)
            if cfg.qat is not None:
                qat_layers = list(prepare_qat_(student, cfg.qat, calib=loader if cfg.qat.act_bits else None))
            _train(student, teacher, loader, cfg, val, masks, hist)
            if cfg.qat is not None:
                convert_qat_(student)
            check_structure(student, before, masks)
    except BaseException:
        for name in qat_layers:
            student.set_submodule(name, originals[name])
        student.load_state_dict(saved)
        raise
    finally:
        student.train(s_mode)
        if teacher is not None:
            teacher.train(t_mode)
            for p, rg in t_grads:
                p.requires_grad_(rg)
    hist.qat_layers = qat_layers
    hist.masked_weights, hist.masked_zeros = len(masks), int(sum(int(m.sum()) for m in masks.values()))
    return hist


def _batches(loader: Iterable[Any], cfg: KD) -> Iterator[tuple[int, Any, bool]]:
    """(epoch, batch, last batch of the epoch) over cfg.epochs passes (one batch of lookahead)."""
    for epoch in range(cfg.epochs):
        it = iter(loader)
        cur = next(it, None)
        if cur is None:
            raise ConfigError("the training data yielded no batches; pass a non-empty data set")
        for nxt in it:
            yield epoch, cur, False
            cur = nxt
        yield epoch, cur, True


def _train(student: nn.Module, teacher: nn.Module | None, loader: Iterable[Any], cfg: KD, val: Val,
           masks: dict[str, torch.Tensor], hist: DistillHistory) -> None:
    dev = _device(student)
    t_dev = _device(teacher) if teacher is not None else dev
    t0 = time.perf_counter()
    with ExitStack() as stack:
        hooks = stack.enter_context(HintHooks(student, teacher, cfg.hints)) if cfg.hints else None
        extra: list[nn.Parameter] = []
        if hooks is not None:
            x0, _ = _split(next(iter(loader)))
            student.eval()
            adapters = hooks.build_adapters(lambda: (student(x0.to(dev)), teacher(x0.to(t_dev))))  # type: ignore[misc]
            extra = list(adapters.parameters())
            hist.adapters = sum(1 for a in adapters.values() if not isinstance(a, nn.Identity))
        stack.enter_context(masked_gradients(student, masks))
        apply_masks_(student, masks)
        params = [p for p in student.parameters() if p.requires_grad]
        opt = _optimizer(params + extra, cfg)
        total = _total_steps(loader, cfg)
        if cfg.schedule == "cosine" and total:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1))))
        else:
            sched = None
        best_state = {k: v.detach().clone() for k, v in student.state_dict().items()} if val is not None else None
        if val is not None:
            hist.val_start = hist.best_metric = evaluate_metric(student, val)
        since_best, sums, n_avg = 0, torch.zeros(4, dtype=torch.float64), 0
        student.train()
        step = 0
        for epoch, batch, epoch_end in progress(_batches(loader, cfg), desc="distill", total=total):
            x, y = _split(batch)
            x = x.to(dev)
            if cfg.shift or cfg.flip:  # one view for teacher and student (function matching)
                x = shift_flip(x, cfg.shift, cfg.flip)
            out = _logits(student(x))
            if teacher is not None:
                with torch.no_grad():
                    t_out = _logits(teacher(x.to(t_dev))).to(dev)
                alpha = cfg.alpha if y is not None else 1.0
                loss, soft, hard = hinton_loss(out, t_out, None if y is None else y.to(dev), cfg.temperature, alpha)
            else:
                if y is None:
                    raise ConfigError("plain fine-tuning (teacher=None) needs labelled (x, y) batches")
                hard = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.to(dev).reshape(-1))
                loss, soft = hard, torch.zeros_like(hard)
            hint = hooks.loss() if hooks is not None else torch.zeros_like(loss)
            loss = loss + cfg.hint_weight * hint
            if not torch.isfinite(loss):
                raise NumericalError(f"distill: the loss became {loss.item()} at step {step + 1}; lower lr "
                                     f"(now {cfg.lr}), set grad_clip, or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params + extra, cfg.grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            apply_masks_(student, masks)
            step += 1
            sums += torch.tensor([loss.item(), soft.item(), hard.item(), hint.item()], dtype=torch.float64)
            n_avg += 1
            last = bool(total) and step >= total  # type: ignore[operator]
            if (step % cfg.eval_every == 0 if cfg.eval_every else epoch_end) or last:
                metric = evaluate_metric(student, val) if val is not None else None
                a = (sums / max(n_avg, 1)).tolist()
                hist.periods.append(Period(epoch + 1, step, *a, lr=opt.param_groups[0]["lr"],
                                           seconds=time.perf_counter() - t0, val=metric))
                log.info("distill step %d: loss %.4f%s", step, a[0], "" if metric is None else f", val {metric:.4f}")
                sums.zero_()
                n_avg = 0
                if metric is not None:
                    if metric > hist.best_metric:  # type: ignore[operator]
                        hist.best_metric, hist.best_step, since_best = metric, step, 0
                        best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
                    else:
                        since_best += 1
                    if cfg.patience and since_best >= cfg.patience:
                        hist.stopped_early = True
                        break
            if last:
                break
        if best_state is not None:  # the best evaluated state, the starting one included
            student.load_state_dict(best_state)
    hist.steps, hist.seconds = step, time.perf_counter() - t0
