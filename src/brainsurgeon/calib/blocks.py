"""Block mode (``CalibOptions.blocks``): block by block over cached block inputs, one pass over the data.

    >>> _run_blocks(llm, layers, batches, solve, CalibOptions(blocks="model.layers"), torch.float32)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._log import get_logger, progress
from ..config import CalibOptions
from ..errors import CalibrationError, ConfigError
from .data import Batch, first_tensor, relocate_, restore_
from .forwards import Batches, Solve, _forward, _StopForward
from .passes import _solve_dense, _solve_sequential

log = get_logger(__name__)


def _blocks(model: nn.Module, path: str) -> nn.ModuleList | nn.Sequential:
    """``model.<path>``, refused with the model's candidate block lists unless it is a non-empty
    ModuleList/Sequential (checked by the verbs before any calibration)."""
    try:
        blocks = model.get_submodule(path)
    except AttributeError:
        blocks = None
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        lists = [n for n, m in model.named_modules() if n and isinstance(m, (nn.ModuleList, nn.Sequential))
                 and len(m) > 1]
        what = f"no module {path!r}" if blocks is None else f"{path!r} is a {type(blocks).__name__}"
        raise ConfigError(f"CalibOptions.blocks: {what} in {type(model).__name__}, not a non-empty nn.ModuleList "
                          f"of blocks; pass the dotted path of one"
                          + (f" (this model has {', '.join(repr(n) for n in lists[:6])})" if lists else
                             " (this model has none: use per-layer mode, CalibOptions(blocks=''))"))
    return blocks


def _split_by_block(layers: dict[str, nn.Module], path: str, n: int) -> list[dict[str, nn.Module]]:
    per: list[dict[str, nn.Module]] = [{} for _ in range(n)]
    outside = []
    for name, mod in layers.items():
        head, _, rest = name[len(path) + 1:].partition(".") if name.startswith(path + ".") else ("", "", "")
        if head.isdigit() and int(head) < n:
            per[int(head)][name] = mod
        else:
            outside.append(name)
    if outside:
        raise ConfigError(f"layers {outside} are outside the blocks {path!r}; block mode compresses only "
                          f"layers inside the blocks: pass them via ignore={outside} or use per-layer mode "
                          f"(CalibOptions(blocks=''))")
    return per


def _catch_block_inputs(model: nn.Module, block0: nn.Module, path: str, batches: Batches,
                        offload: bool) -> list[Batch]:
    """Run the model up to block 0 for every batch, keeping block 0's (args, kwargs)."""
    cache: list[Batch] = []

    def catcher(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache.append((args, dict(kwargs)))
        raise _StopForward

    handle = block0.register_forward_pre_hook(catcher, with_kwargs=True)
    undo: list[tuple[Any, ...]] = []
    try:
        for i, batch in enumerate(batches()):
            if offload and i == 0:
                t = first_tensor(batch)
                if t is not None:  # everything outside the blocks runs on the inputs' device
                    undo = relocate_(model, t.device, skip=path)
            if not _forward(model, batch)[0]:
                raise CalibrationError(f"block 0 of {path!r} was never reached by calibration batch {i}; "
                                       f"check CalibOptions.blocks and that calib feeds the model")
    finally:
        handle.remove()
        restore_(undo)
    return cache


def _next_input(batch: Batch, out: Any) -> Batch:
    h = out[0] if isinstance(out, (tuple, list)) else out  # HF blocks return a tuple or a tensor
    args, kwargs = batch
    if args:
        return (h, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return (), {**kwargs, key: h}


def _run_blocks(model: nn.Module, layers: dict[str, nn.Module], batches: Batches, solve: Solve,
                options: CalibOptions, dtype: torch.dtype) -> None:
    blocks = _blocks(model, options.blocks)
    per_block = _split_by_block(layers, options.blocks, len(blocks))
    last = max((i for i, d in enumerate(per_block) if d), default=-1)
    if last < 0:
        return
    cache = _catch_block_inputs(model, blocks[0], options.blocks, batches, options.offload)
    x0 = first_tensor(cache[0])  # the compute device is the device of the block inputs
    for i in progress(range(last + 1), desc="blocks"):
        block, local = blocks[i], per_block[i]
        undo = relocate_(block, x0.device) if options.offload and x0 is not None else []
        try:
            if options.mode == "dense":  # next inputs: dense outputs, computed before solving
                outs = _solve_dense(block, local, lambda c=cache: c, solve, dtype, keep_outputs=True)
            else:
                if local and options.true_sequential:  # one block forward per group of layers
                    _solve_sequential(block, local, lambda c=cache: c, solve, dtype)
                elif local:  # every Hessian of the block from one forward
                    _solve_dense(block, local, lambda c=cache: c, solve, dtype)
                outs = [_forward(block, b)[1] for b in cache] if i < last else []
        finally:
            restore_(undo)
        log.debug("block %d: solved %d layer(s)", i, len(local))
        if i < last:
            cache = [_next_input(b, o) for b, o in zip(cache, outs, strict=True)]
