"""Quantization-aware training: swap layers for fake-quant ones initialised from an OBQ/GPTQ
result, train, and convert back to real quantized weights (or to packed modules).

After ``quantize_(model, OBQ(bits=4))`` every weight row already lies on a grid. :func:`infer_grid`
recovers that grid (scale, zero) from the weights themselves, so the first fake-quant forward
equals the quantized model's forward; layers that are not on a grid get a fresh
:func:`~brainsurgeon.quant.grid.fit_grid` (``init="auto"``) or an error (``init="grid"``)::

    >>> bs.quantize_(model, bs.GPTQ(bits=4), calib=loader)     # PTQ: weights on a 4-bit grid
    >>> prepare_qat_(model, QAT(bits=4))                        # same forward, now trainable
    >>> distill(model, teacher, train_loader, KD(epochs=1))      # or any training loop
    >>> convert_qat_(model)                                      # plain layers, weights on grid
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._log import get_logger
from .._modes import eval_mode
from ..config import Config, compile_patterns, register_config
from ..errors import CalibrationError, ConfigError
from .fakequant import FAKE_QUANT_TYPES, _FakeQuantMixin, rebuild_layer, to_fake_quant
from .grid import Grid, fit_grid

log = get_logger(__name__)

_INITS = ("auto", "grid", "fit", "existing")


@register_config
@dataclass(frozen=True)
class QAT(Config):
    """Fake-quant training: per-output-channel (or per-group) weight grids, optional per-tensor
    activation grids, straight-through estimator, optional learnable scales (LSQ).

    init: ``grid`` reads the grid the weights already lie on (after OBQ/GPTQ/RTN with the same
    bits/sym/group_size), ``fit`` fits a new one (:func:`~brainsurgeon.quant.grid.fit_grid`),
    ``auto`` reads it where the weights are on a grid and fits it elsewhere, ``existing`` reads it
    where the weights are on a grid and leaves the other layers float (e.g. layers a recipe ignored).

    >>> QAT(bits=4); QAT(bits=3, learn_scale=True); QAT(bits=4, act_bits=8)
    """

    verb: ClassVar[str] = "qat"

    bits: int = 4
    sym: bool = True
    group_size: int = 0  # 0: one grid per output channel
    act_bits: int = 0  # 0: weights only; else per-tensor asymmetric input quantization
    learn_scale: bool = False  # LSQ (Esser et al., ICLR 2020)
    init: str = "auto"
    mse: bool = True  # shrink search when a grid is fitted (init "fit"/"auto")

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"QAT: {msg}")

        check(isinstance(self.bits, int) and 2 <= self.bits <= 8,
              f"bits must be an integer in [2, 8], got {self.bits!r}")
        check(isinstance(self.group_size, int) and self.group_size >= 0,
              f"group_size must be 0 (per output channel) or a positive column count, got {self.group_size!r}")
        check(isinstance(self.act_bits, int) and (self.act_bits == 0 or 2 <= self.act_bits <= 16),
              f"act_bits must be 0 (off) or an integer in [2, 16], got {self.act_bits!r}")
        check(self.init in _INITS, f"init must be one of {list(_INITS)}, got {self.init!r}")

    def describe(self) -> str:
        g = f" g{self.group_size}" if self.group_size else ""
        a = f" a{self.act_bits}" if self.act_bits else ""
        return f"QAT {self.bits}-bit{g}{a}{' LSQ' if self.learn_scale else ''}"


def infer_grid(W: torch.Tensor, bits: int, sym: bool = True, group_size: int = 0,
               tol: float = 1e-3) -> Grid | None:
    """The `bits`-bit grid that the values of W (rows x cols) already lie on, or None.

    Every row (or row-group) of a grid-quantized W holds values s * k with integers k
    (sym: k in [-2^(b-1), 2^(b-1) - 1]; asym: max k - min k <= 2^b - 1). With a = max |v|, the
    step is s = a / m for some m <= 2^b - 1; the smallest m whose every v / s is within `tol`
    of an integer gives the coarsest consistent step (the original one when two neighbouring
    levels are used), then s is refined by least squares s = <v, k> / <k, k>. Zero rows get the
    median step. The grid quantizes W to itself: ``infer_grid(Wq, b).quantize(Wq) ~= Wq``.

    >>> Wq = fit_grid(W, 4).quantize(W)
    >>> torch.allclose(infer_grid(Wq, 4).quantize(Wq), Wq)
    True
    """
    rows, cols = W.shape
    g = group_size if 0 < group_size < cols else 0
    gs = g or cols
    ng = -(-cols // gs)
    V = torch.nn.functional.pad(W.detach().double(), (0, ng * gs - cols))  # (rows, ng * gs)
    V = V.reshape(rows * ng, gs)  # one grid per line
    maxq = 2**bits - 1
    half = 2 ** (bits - 1)
    srt = V.sort(dim=1).values
    if int((1 + (srt[:, 1:] != srt[:, :-1]).sum(1)).max()) > maxq + 1:
        return None  # more distinct values in a line than the grid has levels
    amax = V.abs().amax(1)  # (R,)
    live = amax > 0
    scale = torch.zeros_like(amax)
    found = ~live
    for m in range(1, (half if sym else maxq) + 1):
        s = torch.where(live, amax / m, torch.ones_like(amax))
        K = V / s[:, None]
        Kr = K.round()
        ok = ((K - Kr).abs() <= tol).all(1)
        lo, hi = Kr.min(1).values, Kr.max(1).values
        ok &= (lo >= -half) & (hi <= half - 1) if sym else (hi - lo <= maxq)
        new = ok & ~found
        scale = torch.where(new, s, scale)
        found |= new
        if bool(found.all()):
            break
    if not bool(found.all()):
        return None
    K = torch.where(live[:, None], (V / torch.where(live, scale, 1.0)[:, None]).round(), 0.0)  # (R, gs)
    kk = (K * K).sum(1)
    scale = torch.where(live & (kk > 0), (V * K).sum(1) / kk.clamp_min(1), scale)  # least squares
    fill = scale[live].median() if bool(live.any()) else torch.tensor(1.0, dtype=scale.dtype)
    scale = torch.where(live, scale, fill)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:  # lowest used level at code 0 (fit_grid's zero = round(-min / s)), 0 kept on the grid
        zero = (-K.min(1).values).clamp(0, maxq)  # |k| <= m <= maxq, so k + zero stays in [0, maxq]
    shape = (rows, ng)
    return Grid(scale.reshape(shape).to(W.dtype), zero.reshape(shape).to(W.dtype), maxq, g)


def _fit_layer_grid(name: str, W: torch.Tensor, cfg: QAT) -> tuple[Grid | None, str]:
    """The grid of one layer per cfg.init, and how it was obtained ("grid", "fit"; None: left float)."""
    if cfg.init != "fit":
        g = infer_grid(W, cfg.bits, cfg.sym, cfg.group_size)
        if g is not None:
            return g, "grid"
        if cfg.init == "existing":
            return None, "float"
        if cfg.init == "grid":
            raise ConfigError(f"layer {name!r}: the weights are not on a {cfg.bits}-bit "
                              f"{'symmetric' if cfg.sym else 'asymmetric'} grid with group_size="
                              f"{cfg.group_size}; quantize it first with the same settings "
                              f"(e.g. bs.quantize_(model, bs.GPTQ(bits={cfg.bits}), calib)) or use "
                              f"QAT(init='auto') to fit a new grid")
    return fit_grid(W.detach().float(), cfg.bits, cfg.sym, cfg.group_size, cfg.mse), "fit"


def prepare_qat_(model: nn.Module, cfg: QAT, calib: Iterable[Any] | None = None, *,
                 ignore: Iterable[str] = (), max_batches: int = 8) -> dict[str, str]:
    """Replace every Linear/Conv1d/Conv2d of `model` (in place) by its fake-quant twin.

    The twin shares the layer's weight/bias Parameters and adds the grid (``w_scale``,
    ``w_zero``; ``a_scale``, ``a_zero`` with act_bits). ignore: module-name regexes to keep
    as they are. With ``act_bits``, `calib` batches (x or (x, ...)) set each input range
    (min/max over `max_batches` batches). Returns {layer name: "grid" | "fit"} for the swapped
    layers (``init="existing"`` skips layers off the grid). On failure the model is restored.

    >>> prepare_qat_(model, QAT(bits=4), ignore=("fc2",))
    {'conv1': 'grid', 'conv2': 'grid', 'conv3': 'grid', 'fc1': 'grid'}
    """
    if not isinstance(cfg, QAT):
        raise ConfigError(f"prepare_qat_ needs a QAT config, e.g. QAT(bits=4); got {cfg!r}")
    if cfg.act_bits and calib is None and not any(True for _ in _act_layers(model)):
        raise ConfigError(f"QAT(act_bits={cfg.act_bits}) needs calibration batches to set the input "
                          f"ranges: pass calib=loader, or act_bits=0 for weight-only QAT")
    ign = compile_patterns(ignore, [n for n, _ in model.named_modules() if n],
                           candidates=[n for n, m in model.named_modules() if n and type(m) in FAKE_QUANT_TYPES])
    from .act import act_quant_layers

    acts = act_quant_layers(model)  # layers with calibrated input quantizers: their scales seed the act grid
    todo = [(n, m) for n, m in model.named_modules()
            if n and (type(m) in FAKE_QUANT_TYPES or n in acts) and not any(p.fullmatch(n) for p in ign)]
    for n, m in todo:
        q = getattr(m, "input_quantizer", None)
        if q is not None and q.cfg.granularity != "tensor":
            raise ConfigError(f"prepare_qat_: layer {n!r} has {q.cfg.describe()} inputs; QAT trains per-tensor "
                              f"static activation scales only: quantize its inputs with granularity='tensor' "
                              f"or pass ignore=['{n}']")
    if not todo:
        raise ConfigError(f"prepare_qat_: no Linear/Conv1d/Conv2d left in {type(model).__name__} after "
                          f"ignore={list(ignore)}; loosen ignore")
    done: list[tuple[str, nn.Module]] = []
    inits: dict[str, str] = {}
    try:
        for name, mod in todo:
            W = mod.weight.detach().reshape(mod.weight.shape[0], -1)  # (out, in/g * prod(k))
            grid, how = _fit_layer_grid(name, W, cfg)
            if grid is None:
                continue
            aq = getattr(mod, "input_quantizer", None)
            plain = mod if aq is None else rebuild_layer(mod, next(t for t in FAKE_QUANT_TYPES if isinstance(mod, t)))
            fq = to_fake_quant(plain, grid.scale, grid.zero, cfg.bits, grid.group_size,
                               cfg.act_bits if aq is None else aq.cfg.bits, cfg.learn_scale)
            if aq is not None:  # the calibrated input grid, trained from here (LSQ with learn_scale)
                with torch.no_grad():
                    fq.a_scale.copy_(aq.scale.reshape(1))
                    fq.a_zero.copy_(aq.zero.reshape(1))
            model.set_submodule(name, fq)
            done.append((name, mod))
            inits[name] = how
        if not done:
            raise ConfigError(f"prepare_qat_: no layer of {type(model).__name__} is on a {cfg.bits}-bit grid "
                              f"(init='existing'); quantize it first, or use init='auto' to fit grids")
        if cfg.act_bits and [n for n, _ in done if n not in acts]:
            _observe_inputs(model, [n for n, _ in done if n not in acts], calib, max_batches)  # type: ignore[arg-type]
    except BaseException:
        for name, mod in done:
            model.set_submodule(name, mod)
        raise
    fitted = [n for n, h in inits.items() if h == "fit"]
    if fitted and cfg.init == "auto":
        log.info("QAT: %d layer(s) were not on a %d-bit grid and got a fitted one: %s",
                 len(fitted), cfg.bits, fitted)
    return inits


def _act_layers(model: nn.Module) -> Iterable[str]:
    from .act import act_quant_layers

    return act_quant_layers(model)


@torch.no_grad()
def _observe_inputs(model: nn.Module, names: list[str], calib: Iterable[Any], max_batches: int) -> None:
    """Per-tensor min/max of each fake-quant layer's input over the calibration batches."""
    from ..calib import iter_batches, move_to

    ranges: dict[str, list[float]] = {}
    handles = []

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            lo, hi = ranges.setdefault(name, [float("inf"), float("-inf")])
            ranges[name] = [min(lo, float(x.min())), max(hi, float(x.max()))]
        return fn

    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
        dev = _device(model)
        with eval_mode(model):
            for args, kwargs in iter_batches(calib, max_batches):
                model(*move_to(args, dev), **move_to(kwargs, dev))
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in ranges]
    if missing:
        raise CalibrationError(f"QAT: layer(s) {missing} never received an input from the calibration "
                               f"data; check that calib feeds the model's forward, or ignore them")
    for n in names:
        model.get_submodule(n).set_act_range(*ranges[n])  # type: ignore[operator]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def fake_quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every fake-quant layer in `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _FakeQuantMixin)}


@torch.no_grad()
def quantized_state(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) of a fake-quant layer: integer codes q (out, cols) in [0, 2^b - 1] with
    weight = scale * (q - zero) expanded per column, and scale/zero as (out, groups)."""
    if not isinstance(module, _FakeQuantMixin):
        raise ConfigError(f"quantized_state needs a fake-quant layer (see prepare_qat_), got "
                          f"{type(module).__name__}")
    W = module.weight.reshape(module.weight.shape[0], -1)  # (out, cols)
    s, z = module.weight_columns()
    q = torch.clamp(torch.round(W / s) + z, 0, module.maxq)
    return q.to(torch.uint8 if module.maxq < 256 else torch.int32), module.w_scale.detach().clone(), \
        module.w_zero.detach().clone()


def convert_qat_(model: nn.Module, *, packed: bool = False, compute_dtype: str = "bfloat16") -> list[str]:
    """Replace every fake-quant layer (in place) by a plain layer whose float weight is the
    fake-quantized one (exactly on the grid), or with ``packed=True`` by the packed int module
    of :mod:`brainsurgeon.quant.packed` (Linear: int4/int8 weight-only kernels run with
    `compute_dtype` activations; Conv2d: packed storage). Returns the converted layer names.

    Layers with activation fake-quant (act_bits > 0) become ActQuant layers
    (:mod:`brainsurgeon.quant.act`) holding the trained input scale (not with ``packed``: dropped with
    a warning there); :func:`~brainsurgeon.quant.static.convert_static_int8_` then runs them in int8.

    >>> convert_qat_(model)
    ['conv1', 'conv2', 'conv3', 'fc1', 'fc2']
    >>> convert_qat_(model2, packed=True)        # Int4WeightOnlyLinear / PackedConv2d modules
    """
    layers = fake_quant_layers(model)
    # build every replacement first: on an error nothing has changed
    if packed:
        new = {name: _to_packed(m, compute_dtype) for name, m in layers.items()}
    else:
        new = {name: _with_act(_to_plain(m), m) for name, m in layers.items()}
    dropped = [n for n, m in layers.items() if m.act_bits and packed]
    if dropped:
        log.warning("convert_qat_: activation fake-quant of %s is dropped (weights stay on grid)", dropped)
    for name, m in new.items():
        model.set_submodule(name, m)
    return list(new)


@torch.no_grad()
def _with_act(plain: nn.Module, fq: nn.Module) -> nn.Module:
    """`plain` with a per-tensor input quantizer holding fq's (trained) activation grid, if fq has one."""
    if not fq.act_bits:
        return plain
    from ..config import ActQuant
    from .act import with_act_quant

    new = with_act_quant(plain, ActQuant(bits=fq.act_bits))
    new.input_quantizer.scale.copy_(fq.a_scale.detach().reshape(1))
    new.input_quantizer.zero.copy_(fq.a_zero.detach().reshape(1))
    return new


@torch.no_grad()
def _to_plain(fq: nn.Module) -> nn.Module:
    base = next(t for t, f in FAKE_QUANT_TYPES.items() if isinstance(fq, f))
    plain = rebuild_layer(fq, base)
    plain.weight = nn.Parameter(fq.quantized_weight().detach().clone(),  # type: ignore[operator]
                                requires_grad=fq.weight.requires_grad)
    return plain


def _to_packed(fq: nn.Module, compute_dtype: str) -> nn.Module:
    """The packed module of :mod:`brainsurgeon.quant.packed` holding fq's codes, scales and zeros.

    Linear: int4 storage for <= 4 bits where the int4 kernel's shape rules hold, else int8
    storage (same codes, 8-bit slots); Conv2d: PackedConv2d. The grid is passed as codes, so
    the packed weight equals the fake-quantized one exactly (up to float32 scales).
    """
    from .codes import GridCodes
    from .packed import Int4WeightOnlyLinear, Int8WeightOnlyLinear
    from .packed_conv import PackedConv2d

    q, scale, zero = quantized_state(fq)
    cols = q.shape[1]
    gs = fq.group_size or cols
    if cols % gs:
        raise ConfigError(f"{type(fq).__name__} ({cols} input columns): group_size={gs} does not divide them, "
                          f"so the last group is ragged and cannot be packed; use a group size that divides "
                          f"{cols}, or convert_qat_(model) for float weights on the grid")
    codes = GridCodes(q.to(torch.int32), scale.float(), zero.float(), fq.bits, gs)
    plain = _to_plain(fq)
    if isinstance(plain, nn.Conv2d):
        return PackedConv2d.from_conv(plain, codes)
    if not isinstance(plain, nn.Linear):
        raise ConfigError(f"{type(plain).__name__} has no packed module (packed: Linear, Conv2d); "
                          f"pass it in ignore=[...] to prepare_qat_, or convert_qat_(model) without packed")
    if fq.bits <= 4:
        try:
            return Int4WeightOnlyLinear.from_linear(plain, codes, compute_dtype=compute_dtype)
        except ConfigError as e:  # int4 kernel shape rules: keep the codes in int8 slots
            log.info("convert_qat_: %s; stored as int8", e)
    if fq.bits < 8:  # re-centre on the int8 zero (128): same weights, no large offset term to cancel
        zc = codes.zero.repeat_interleave(gs, dim=1)  # (rows, cols)
        codes = GridCodes((codes.q - zc.to(torch.int32) + 128), codes.scale, torch.full_like(codes.zero, 128.0), 8, gs)
    return Int8WeightOnlyLinear.from_linear(plain, codes, compute_dtype=compute_dtype)
