"""The layer-wise driver: decides when each layer is solved and which inputs built its Hessian.

The caller passes ``solve(name, module, H)``, which compresses the module's weight in place.

* ``mode="dense"`` (OBC): every Hessian from the dense model in one pass, then every solve.
* ``mode="sequential"`` (GPTQ): layers in execution order; each Hessian is collected with the
  earlier layers already compressed. Inside ``nn.Sequential`` parts (chains) the inputs are cached
  once and replayed child by child, so the cost is linear in depth; layers outside every chain
  use forwards from the model input that stop early at the layer.
* ``blocks="model.layers"``: block by block over cached block inputs (one pass over the data).
  Sequential: every Hessian of a block from one forward over its inputs, then one forward of the
  compressed block makes the next block's inputs (``true_sequential=True``: one forward per group
  of layers, each seeing the block's earlier groups compressed). ``offload=True`` keeps only the
  current block on the compute device (the inputs' device).

    >>> def solve(name, module, H):
    ...     set_weight_matrix_(module, my_solver(weight_matrix(module), H))
    >>> run_layerwise(model, ["fc1", "fc2"], loader, solve, CalibOptions(mode="sequential"))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._log import get_logger, progress
from ..config import CalibOptions
from ..errors import CalibrationError, ConfigError
from .data import (
    Batch,
    cache_batches,
    first_tensor,
    is_one_shot,
    iter_batches,
    model_device,
    move_to,
    relocate_,
    restore_,
)
from .hessian import HessianAccumulator, capture_layers, check_hessian_memory, first_input, resolve_layers

log = get_logger(__name__)

Solve = Callable[[str, nn.Module, torch.Tensor], None]
Batches = Callable[[], Iterable[Batch]]


class _StopForward(Exception):
    """Raised inside a hook to end a forward early; always caught by the driver."""


def _forward(root: nn.Module, batch: Batch) -> tuple[bool, Any]:
    """Run ``root(*args, **kwargs)``; returns (stopped early, output)."""
    args, kwargs = batch
    try:
        return False, root(*args, **kwargs)
    except _StopForward:
        return True, None


def _unreached(names: list[str]) -> CalibrationError:
    return CalibrationError(f"layer(s) {names} were never reached by the calibration data; check that calib "
                            f"feeds the model's forward (and these layers' branches), or pass ignore={names}")


def _signature(m: nn.Module) -> tuple[Any, ...]:
    """Layers with equal signatures turn the same input tensor into the same columns."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return (type(m), m.in_channels, m.kernel_size, m.stride, m.dilation, m.groups, m.padding_mode,
                tuple(m._reversed_padding_repeated_twice))
    return ("matmul", int(m.weight.shape[1] if isinstance(m, nn.Linear) else m.weight.shape[0]))


def execution_order(root: nn.Module, layers: dict[str, nn.Module],
                    batches: Batches) -> tuple[list[list[str]], set[str]]:
    """Groups of layers in execution order, and the layers called more than once per forward.

    A group is consecutive layers reading the very same input tensor object (q/k/v
    projections): one Hessian serves all of them. Raises :class:`CalibrationError` naming unreached layers.

    >>> groups, repeated = execution_order(model, {"fc1": model.fc1}, lambda: [((x,), {})])
    """
    first: dict[str, int] = {}
    same_as_prev: dict[str, bool] = {}  # first call read the tensor the previous hook call read
    calls: Counter[str] = Counter()
    state: dict[str, Any] = {"stop": False, "last": None}  # only the last input is kept alive
    repeated: set[str] = set()
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls[name] += 1
            x = first_input(args, kwargs)
            if name not in first:
                first[name] = len(first)
                same_as_prev[name] = x is state["last"]
            state["last"] = x
            if state["stop"] and len(first) == len(layers):
                raise _StopForward
        return hook

    try:
        for name, mod in layers.items():
            handles.append(mod.register_forward_pre_hook(make_hook(name), with_kwargs=True))
        for i, batch in enumerate(batches()):
            _forward(root, batch)  # the first batch runs fully to count repeated calls
            state["last"] = None
            if i == 0:
                repeated = {n for n, c in calls.items() if c > 1}
                state["stop"] = True
            if len(first) == len(layers):
                break
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in first]
    if missing:
        raise _unreached(missing)
    groups: list[list[str]] = []
    for name in sorted(first, key=first.__getitem__):
        prev = groups[-1][-1] if groups else None
        if (prev is not None and same_as_prev[name] and name not in repeated and prev not in repeated
                and _signature(layers[name]) == _signature(layers[prev])):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups, repeated


def _solve_group(group: list[str], layers: dict[str, nn.Module], H: torch.Tensor, solve: Solve) -> None:
    for j, name in enumerate(group):
        solve(name, layers[name], H if j == len(group) - 1 else H.clone())  # solvers may damp H in place


def _capture(root: nn.Module, layers: dict[str, nn.Module], batches: Batches, dtype: torch.dtype,
             keep_outputs: bool = False) -> tuple[dict[str, HessianAccumulator], list[Any]]:
    """One pass over the batches accumulating every layer's H (and the outputs, if asked).

    A layer that reads the very tensor the layer hooked just before it read, with the same column
    layout (q/k/v, gate/up), shares that layer's accumulator: one X^T X instead of three. Sharing
    holds only if it held for every call; a layer for which it did not is accumulated on its own
    in one more pass.
    """
    accs = {n: HessianAccumulator(n, m, dtype) for n, m in layers.items()}
    sig = {n: _signature(m) for n, m in layers.items()}
    hist: dict[str, list[str | None]] = {n: [] for n in layers}  # per call: the lead it shared, or None
    state: dict[str, Any] = {"x": None, "lead": None}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x, lead = first_input(args, kwargs), state["lead"]
            if lead is not None and x is state["x"] and sig[name] == sig[lead]:
                hist[name].append(lead)
                return
            accs[name].add_input(x)
            hist[name].append(None)
            state["x"], state["lead"] = x, name
        return hook

    outs, handles = [], []
    try:
        for name, mod in layers.items():  # prepend=False: pre-hooks installed earlier (act-quant) run first
            handles.append(mod.register_forward_pre_hook(make_hook(name), with_kwargs=True))
        for batch in batches():
            out = _forward(root, batch)[1]
            state["x"] = state["lead"] = None  # never share across forwards
            if keep_outputs:
                outs.append(out)
    finally:
        for h in handles:
            h.remove()
    broken = []
    for name, h in hist.items():
        leads = set(h)
        if not h or leads == {None}:
            continue
        lead = next(iter(leads))
        if len(leads) == 1 and lead is not None and set(hist[lead]) == {None} and len(hist[lead]) == len(h):
            accs[name] = accs[lead]
        else:
            broken.append(name)
    if broken:
        log.debug("layers %s read a shared input only in some calls: accumulated on their own", broken)
        with capture_layers({n: layers[n] for n in broken}, dtype) as extra:
            for batch in batches():
                _forward(root, batch)
        accs.update(extra)
    return accs, outs


def _solve_dense(root: nn.Module, layers: dict[str, nn.Module], batches: Batches, solve: Solve,
                 dtype: torch.dtype, keep_outputs: bool = False) -> list[Any]:
    """One pass collecting every Hessian (and the dense outputs), then every solve.

    Layers sharing an accumulator get the same H tensor (so a solver may reuse its factorisation);
    if a solve changes H in place, the next one gets the original back.
    """
    accs, outs = _capture(root, layers, batches, dtype, keep_outputs)
    missing = [n for n, a in accs.items() if a.n == 0]
    if missing:
        raise _unreached(missing)
    users = Counter(id(a) for a in accs.values())
    for name in progress(list(layers), desc="layers"):
        acc = accs[name]
        H = acc.H
        users[id(acc)] -= 1
        backup = H.clone() if users[id(acc)] else None
        version = H._version
        solve(name, layers[name], H)
        if not users[id(acc)]:
            acc.reset()
        elif H._version != version:
            acc._H = backup
    return outs


def _solve_sequential(root: nn.Module, layers: dict[str, nn.Module], batches: Batches, solve: Solve,
                      dtype: torch.dtype) -> None:
    """Layer (group) by layer in execution order; each Hessian sees the compressed predecessors."""
    groups, repeated = execution_order(root, layers, batches)
    for group in progress(groups, desc="layers"):
        lead = group[0]
        acc = HessianAccumulator(lead, layers[lead], dtype)
        stop = lead not in repeated  # a layer reused later in the forward needs the whole forward

        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 acc: HessianAccumulator = acc, stop: bool = stop) -> None:
            acc.add_input(first_input(args, kwargs))
            if stop:
                raise _StopForward

        handle = layers[lead].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for batch in batches():
                _forward(root, batch)
        finally:
            handle.remove()
        log.debug("layers %s: H from %d columns", group, acc.n)
        _solve_group(group, layers, acc.H, solve)


def _is_chain(m: nn.Module) -> bool:
    """An nn.Sequential (or subclass) whose forward is Sequential's: child i's output is child i+1's input."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _chains(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Sequential]:
    """The outermost chains (see :func:`_is_chain`) holding two or more of the layers, by path."""
    out: dict[str, nn.Sequential] = {}

    def visit(prefix: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            path = f"{prefix}.{name}" if prefix else name
            n = sum(1 for ln in layers if ln.startswith(path + "."))
            if n >= 2 and _is_chain(child):
                out[path] = child  # type: ignore[assignment]
            elif n:
                visit(path, child)

    visit("", model)
    return out


def _replay(chain: nn.Sequential, path: str, layers: dict[str, nn.Module], xs: list[Any], solve: Solve,
            dtype: torch.dtype) -> list[Any]:
    """Sequential calibration inside a chain from its cached inputs `xs` (one per batch).

    Child by child: a child without layers just maps the cache forward; a nested chain recurses;
    any other child (a residual block, a single layer) is calibrated layer by layer over the cache
    with early-stopped forwards of that child only, then maps the cache through its compressed self.
    Every child runs O(1) times per layer it holds, so the cost is linear in depth.
    """
    for idx, child in enumerate(chain):
        cpath = f"{path}.{idx}" if path else str(idx)
        local = {n: m for n, m in layers.items() if n == cpath or n.startswith(cpath + ".")}
        if local and _is_chain(child) and len(local) > 1:
            xs = _replay(child, cpath, local, xs, solve, dtype)
            continue
        if local:
            _solve_sequential(child, local, lambda xs=xs: [((x,), {}) for x in xs], solve, dtype)
        xs = [child(x) for x in xs]
    return xs


def _catch_inputs(model: nn.Module, target: nn.Module, batches: Batches) -> list[Any] | None:
    """The first positional input of `target` for every batch (a forward stopped there), or None when a
    batch never reaches it or it is called with keywords."""
    cache: list[Any] = []

    def catcher(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(args) != 1 or kwargs:
            cache.append(None)
        else:
            cache.append(args[0])
        raise _StopForward

    handle = target.register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for batch in batches():
            if not _forward(model, batch)[0]:
                return None
    finally:
        handle.remove()
    return None if any(x is None for x in cache) else cache


def _solve_replay(model: nn.Module, layers: dict[str, nn.Module], batches: Batches, solve: Solve,
                  dtype: torch.dtype) -> None:
    """Sequential mode in linear time: chains (nn.Sequential parts) replay from their cached inputs.

    Units in execution order: a run of layers outside every chain is calibrated as before (a forward
    per group, stopped at the layer); a chain gets its inputs in one stopped forward per batch and
    is calibrated by :func:`_replay`. A chain called more than once per forward is not replayed.
    """
    chains = _chains(model, layers)
    groups, repeated = execution_order(model, layers, batches)
    owner = {n: next((p for p in chains if n.startswith(p + ".")), None) for n in layers}
    calls: Counter[str] = Counter()
    hooks = [c.register_forward_pre_hook(lambda m, a, p=p: calls.update([p])) for p, c in chains.items()]
    try:
        _forward(model, next(iter(batches())))
    finally:
        for h in hooks:
            h.remove()
    for p in [p for p in chains if calls[p] != 1 or any(n in repeated for n in layers if owner[n] == p)]:
        del chains[p]
    owner = {n: (o if o in chains else None) for n, o in owner.items()}
    units: list[tuple[str | None, list[str]]] = []  # (chain path or None, layers) in execution order
    for n in (n for group in groups for n in group):
        if units and units[-1][0] == owner[n]:
            units[-1][1].append(n)
        else:
            units.append((owner[n], [n]))
    for key, names in units:
        local = {n: layers[n] for n in names}
        xs = _catch_inputs(model, chains[key], batches) if key is not None else None
        if xs is None:  # outside every chain (or inputs not cacheable): stopped forwards from the model input
            _solve_sequential(model, local, batches, solve, dtype)
        else:
            _replay(chains[key], key, local, xs, solve, dtype)
        log.debug("sequential unit %s: %d layer(s)", key or "(outside chains)", len(names))


def _blocks(model: nn.Module, path: str) -> nn.ModuleList | nn.Sequential:
    try:
        blocks = model.get_submodule(path)
    except AttributeError as e:
        raise ConfigError(f"CalibOptions.blocks: no module {path!r} in {type(model).__name__}; pass the "
                          f"dotted path of the ModuleList of blocks, e.g. 'model.layers'") from e
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ConfigError(f"CalibOptions.blocks: {path!r} is a {type(blocks).__name__}, not a non-empty "
                          f"nn.ModuleList of blocks; e.g. 'model.layers' or 'encoder.layer'")
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


def run_layerwise(model: nn.Module, names: list[str], calib: Any, solve: Solve,
                  options: CalibOptions) -> None:
    """Collect each named layer's Hessian from `calib` and call ``solve(name, module, H)``.

    H is float32 by default (``options.hessian_dtype``), (cols, cols) or (g, cols, cols) for
    grouped convs. Runs under ``torch.no_grad()`` in eval mode; hooks and train/eval modes are
    restored on exit, also on error. See the module docstring for the modes. Hessian memory is
    estimated first (:func:`~brainsurgeon.calib.hessian.check_hessian_memory`); returns its notes.

    >>> run_layerwise(model, ["fc1", "fc2"], loader, solve, CalibOptions(mode="dense"))
    >>> run_layerwise(llm, names, loader, solve, CalibOptions(blocks="model.layers", offload=True))
    """
    layers = resolve_layers(model, names)
    if not layers:
        return []
    resident = options.mode == "dense" and not options.blocks
    dtype, notes = check_hessian_memory(layers, getattr(torch, options.hessian_dtype), resident)
    for note in notes:
        log.warning(note)
    if not options.blocks and is_one_shot(calib) and options.mode == "sequential":
        calib = cache_batches(calib, options.max_batches)  # sequential mode reads the data many times
    if options.offload and not options.blocks:
        log.warning("CalibOptions.offload=True has no effect without CalibOptions.blocks")
    dev = None if (options.blocks and options.offload) else model_device(model)

    def batches() -> Iterable[Batch]:
        return (move_to(b, dev) for b in iter_batches(calib, options.max_batches))

    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if options.blocks:
                _run_blocks(model, layers, batches, solve, options, dtype)
            elif options.mode == "dense":
                _solve_dense(model, layers, batches, solve, dtype)
            else:
                _solve_replay(model, layers, batches, solve, dtype)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return notes
