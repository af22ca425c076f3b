"""Physical removal: slice parameters/buffers in place, fix module attributes, restore on failure.

Tensors are sliced through ``.data`` so parameter identity (tied weights, optimizer references)
survives. Module attributes (``out_channels``, ``num_features``, ``num_heads``, ...) are set by small
per-type *fixers*, registered beside this file and looked up along the module's MRO::

    @register_fixer(nn.PReLU)
    def _prelu(m, removed):          # removed: {tensor name: {dim: original indices removed}}
        m.num_parameters = m.weight.shape[0]

A plan is ``{(module, tensor, dim): removed indices}``; :func:`apply_plan` returns an undo record.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SurgeryError
from .hf import Q_NAMES, _attr

Fixer = Callable[[nn.Module, dict[str, dict[int, np.ndarray]]], None]
_FIXERS: dict[type, Fixer] = {}
Plan = dict[tuple[str, str, int], np.ndarray]


def register_fixer(*types: type) -> Callable[[Fixer], Fixer]:
    """Decorator: ``fn(module, removed)`` updates attributes of modules of ``types`` after slicing."""
    def deco(fn: Fixer) -> Fixer:
        for t in types:
            _FIXERS[t] = fn
        _FOUND.clear()
        return fn
    return deco


_FOUND: dict[tuple[type, int, int], Fixer | None] = {}   # find_fixer per class, while the registries are as then


def find_fixer(module: nn.Module) -> Fixer | None:
    """The fixer of the closest registered class in ``type(module).__mro__`` (HF classes by name).

    Looked up once per class (apply_plan asks it for every touched module and each of its parents); the
    cache is keyed by the registries' sizes and cleared by the ``register_*`` decorators."""
    return class_fixer(type(module))


def class_fixer(cls0: type) -> Fixer | None:
    """:func:`find_fixer` for a class (e.g. the class a ``torch.nn.utils.parametrize`` subclass wraps)."""
    key = (cls0, len(_FIXERS), len(_BY_NAME))
    if key in _FOUND:
        return _FOUND[key]
    found: Fixer | None = None
    for cls in cls0.__mro__:
        if cls in _FIXERS:
            found = _FIXERS[cls]
            break
        if f"{cls.__module__}.{cls.__qualname__}" in _BY_NAME:
            found = _BY_NAME[f"{cls.__module__}.{cls.__qualname__}"]
            break
    else:
        if cls0.__module__.startswith("transformers."):
            found = _hf_attention
    _FOUND[key] = found
    return found


def _removed_count_per_block(removed: np.ndarray, total: int, blocks: int) -> np.ndarray:
    per = total // blocks
    return np.bincount(removed // per, minlength=blocks), per


@register_fixer(nn.modules.conv._ConvNd)
def _conv(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    w = m.weight
    gdim = 0   # weight dim 0 holds the channels split into groups ([O, I/g] or transposed [I, O/g])
    r = removed.get("weight", {}).get(gdim, np.zeros(0, dtype=np.int64))
    if m.groups > 1 and len(r):
        counts, per = _removed_count_per_block(r, w.shape[gdim] + len(r), m.groups)
        full = int((counts == per).sum())
        if full and not ((counts == per) | (counts == 0)).all():
            raise SurgeryError(f"conv {type(m).__name__}: removal mixes whole groups and partial groups "
                               f"(removed per group {counts.tolist()}, {per} channels each)")
        if not full and len(set(counts.tolist())) > 1:
            raise SurgeryError(f"conv {type(m).__name__}: groups={m.groups} needs the same number of channels "
                               f"removed from every group (got {counts.tolist()})")
        m.groups -= full
    if m.transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
    else:
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


@register_fixer(nn.Linear)
def _linear(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    m.out_features, m.in_features = m.weight.shape


@register_fixer(nn.Bilinear)
def _bilinear(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    m.out_features, m.in1_features, m.in2_features = m.weight.shape


@register_fixer(nn.modules.batchnorm._NormBase)
def _batchnorm(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    t = m.weight if m.weight is not None else m.running_mean
    if t is not None:
        m.num_features = t.shape[0]


@register_fixer(nn.LayerNorm, nn.RMSNorm)
def _layernorm(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@register_fixer(nn.GroupNorm)
def _groupnorm(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    r = removed.get("weight", removed.get("bias", {})).get(0, np.zeros(0, dtype=np.int64))
    c_new = m.weight.shape[0] if m.weight is not None else m.num_channels - len(r)
    if len(r):
        counts, per = _removed_count_per_block(r, m.num_channels, m.num_groups)
        m.num_groups -= int((counts == per).sum())
    m.num_channels = c_new


@register_fixer(nn.Embedding)
def _embedding(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@register_fixer(nn.PReLU)
def _prelu(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    m.num_parameters = m.weight.shape[0]


@register_fixer(nn.MultiheadAttention)
def _mha(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """embed_dim/kdim/vdim from the projections; heads removed whole keep head_dim, else head_dim shrinks."""
    w = m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
    name = "in_proj_weight" if m.in_proj_weight is not None else "q_proj_weight"
    r = removed.get(name, {}).get(0, np.zeros(0, dtype=np.int64))
    old_e = m.embed_dim
    r = r[r < old_e]   # the q part
    full = 0
    if len(r):
        counts = np.bincount(r // m.head_dim, minlength=m.num_heads)
        full = int((counts == m.head_dim).sum())
    m.num_heads -= full
    m.embed_dim = w.shape[1] if m.in_proj_weight is not None else m.q_proj_weight.shape[0]
    m.head_dim = m.embed_dim // max(m.num_heads, 1)
    if m.in_proj_weight is not None:
        m.kdim = m.vdim = m.embed_dim
    else:
        m.kdim, m.vdim = m.k_proj_weight.shape[1], m.v_proj_weight.shape[1]


@register_fixer(nn.RNNBase)
def _rnn(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    m.hidden_size = m.weight_hh_l0.shape[1]
    m.input_size = m.weight_ih_l0.shape[1]
    if hasattr(m, "_init_flat_weights"):
        m._init_flat_weights()


def _vit(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """torchvision VisionTransformer reshapes with ``self.hidden_dim``."""
    m.hidden_dim = m.class_token.shape[-1]


def _swin_attention(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """torchvision ShiftedWindowAttention(V2): one bias per head (V1 table column, V2 ``logit_scale``)."""
    per_head = m.logit_scale.shape[0] if getattr(m, "logit_scale", None) is not None else \
        m.relative_position_bias_table.shape[1]
    m.num_heads = int(per_head)


def _maxvit_attention(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """torchvision MaxViT RelativePositionalMultiHeadAttention: heads from the bias table, head_dim from qkv."""
    m.n_heads = int(m.relative_position_bias_table.shape[1])
    m.head_dim = int(m.to_qkv.weight.shape[0]) // 3 // max(m.n_heads, 1)


def _mvit_attention(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """torchvision MViT MultiscaleAttention reshapes qkv with ``(num_heads, head_dim)`` and the result with
    ``output_dim``; head_dim follows the per-dim tensors (relative positions, pooling convs) when present."""
    per_dim = getattr(m, "rel_pos_h", None)
    if per_dim is not None:
        m.head_dim = int(per_dim.shape[1])
    else:
        convs = [getattr(p.pool, "weight", None) for p in (m.pool_q, m.pool_k, m.pool_v) if p is not None]
        convs = [w for w in convs if w is not None]
        if convs:
            m.head_dim = int(convs[0].shape[0])
    m.num_heads = int(m.qkv.weight.shape[0]) // 3 // m.head_dim
    m.output_dim = m.num_heads * m.head_dim


_BY_NAME: dict[str, Fixer] = {"torchvision.models.vision_transformer.VisionTransformer": _vit,
                              "torchvision.models.swin_transformer.ShiftedWindowAttention": _swin_attention,
                              "torchvision.models.video.swin_transformer.ShiftedWindowAttention3d": _swin_attention,
                              "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": _maxvit_attention,
                              "torchvision.models.video.mvit.MultiscaleAttention": _mvit_attention}


_HEAD_DIM_ATTRS = ("attention_head_size", "head_dim")


def _hf_attention(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """transformers attention modules: heads from the query projection; head_dim kept when whole heads go,
    reduced when the same number of dims went from every head (``scaling`` is kept: outputs stay exact)."""
    _hf_moe(m)
    # _attr: getattr(m, name, None) without nn.Module's raise-and-catch for the names a module lacks (this
    # fixer runs on every touched transformers module and each of its transformers ancestors)
    qname = next((n for n in Q_NAMES if isinstance(_attr(m, n), nn.Module)), None)
    q = getattr(m, qname) if qname else None
    if q is None and isinstance(_attr(m, "c_attn"), nn.Module) and isinstance(_attr(m, "split_size"), int):
        _gpt2_attention(m)
        return
    if q is None or not hasattr(q, "weight"):
        return
    width = q.weight.shape[0]
    head = next((getattr(m, a) for a in _HEAD_DIM_ATTRS if isinstance(getattr(m, a, None), int)), None)
    r = removed.get(f"{qname}.weight", {}).get(0, np.zeros(0, dtype=np.int64))
    if head and len(r):
        counts = np.bincount(r // head, minlength=(width + len(r)) // head)
        if counts.min() == counts.max() and 0 < counts[0] < head:   # within-head dims
            head = head - int(counts[0])
            for a in _HEAD_DIM_ATTRS:
                if isinstance(getattr(m, a, None), int):
                    setattr(m, a, head)
    if head:
        for attr in ("num_attention_heads", "num_heads", "n_heads"):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, width // head)
    if isinstance(getattr(m, "all_head_size", None), int):
        m.all_head_size = width
    k = getattr(m, "k_proj", None)
    if head and isinstance(k, nn.Linear) and isinstance(getattr(m, "num_key_value_heads", None), int):
        m.num_key_value_heads = k.weight.shape[0] // head


def _hf_moe(m: nn.Module) -> None:
    """MoE router (``weight`` [experts, hidden], reshapes with ``hidden_dim``) and experts stored as one tensor
    (``gate_up_proj`` [E, 2 x intermediate, hidden])."""
    w, experts = _attr(m, "weight"), _attr(m, "gate_up_proj")
    if isinstance(experts, torch.Tensor) and experts.dim() == 3:
        if isinstance(getattr(m, "hidden_dim", None), int):
            m.hidden_dim = int(experts.shape[2])
        if isinstance(getattr(m, "intermediate_dim", None), int):
            m.intermediate_dim = int(experts.shape[1]) // 2
    elif isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(getattr(m, "hidden_dim", None), int):
        m.hidden_dim = int(w.shape[1])


def _gpt2_attention(m: nn.Module) -> None:
    """GPT-2 attention: one fused ``c_attn`` (Conv1D, out = 3 x q width) split by ``split_size``."""
    width = int(m.c_attn.weight.shape[1]) // 3
    m.split_size = m.embed_dim = width
    if isinstance(getattr(m, "head_dim", None), int) and m.head_dim:
        m.num_heads = width // m.head_dim


def _hf_conv1d(m: nn.Module, removed: dict[str, dict[int, np.ndarray]]) -> None:
    """transformers Conv1D (GPT-2): weight [nx, nf], forward reshapes to ``nf``."""
    m.nx, m.nf = (int(v) for v in m.weight.shape)


_BY_NAME["transformers.pytorch_utils.Conv1D"] = _hf_conv1d
_CONTAINER_FIXERS = [_hf_attention, _vit, _mvit_attention]


def register_named_fixer(*qualnames: str, container: bool = False) -> Callable[[Fixer], Fixer]:
    """Decorator: a fixer for classes named ``"package.module.Class"`` (subclasses too), so the package is
    never imported. ``container``: its attributes mirror its *children's* widths (an attention block's
    ``num_heads``); it then sees the children's removals as ``{"child.tensor": {dim: indices}}``."""
    def deco(fn: Fixer) -> Fixer:
        for q in qualnames:
            _BY_NAME[q] = fn
        _FOUND.clear()
        if container:
            _CONTAINER_FIXERS.append(fn)
        return fn
    return deco


_IMMUTABLE = frozenset({int, float, bool, str, type(None), tuple, frozenset, bytes, complex})


def module_attrs(m: nn.Module) -> dict[str, Any]:
    """A restorable snapshot of a module's plain attributes (``copy.copy`` of each; immutable values, which
    ``copy.copy`` returns as they are, are taken without the call). A config object the module shares with
    the model (an HF ``self.config``: fields and ``to_dict``) is kept by reference: fixers set the module's own
    attributes, and an undo must put back the same config object the model holds, not a copy of it."""
    return {k: v if type(v) in _IMMUTABLE or _is_config(v) else copy.copy(v) for k, v in vars(m).items()
            if not k.startswith("_") and not isinstance(v, (torch.Tensor, nn.Module))}


def _is_config(v: Any) -> bool:
    """A config object (HF ``PretrainedConfig`` and the like): it has fields and ``to_dict``."""
    return hasattr(v, "__dict__") and callable(getattr(v, "to_dict", None)) and not isinstance(v, type)


AttrPlan = dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]


def _set_mirrored_attrs(model: nn.Module, attrs: AttrPlan, undo: dict[str, Any]) -> None:
    """Attributes that mirror traced dims of modules without parameters (``Edges.attr_updates``).

    A shape attribute (``normalized_shape``) is set when it equals the traced sizes; an int attribute
    (``num_features``, ``num_channels``, ``num_groups``) of a ``torch.nn`` norm scales with the dim (a
    batch-flattened InstanceNorm input is ``N*C`` wide).
    """
    for mname, per in attrs.items():
        try:
            m = model.get_submodule(mname)
        except AttributeError:
            continue
        for attr, (old, new) in per.items():
            cur = getattr(m, attr, None)
            if isinstance(cur, (tuple, list, torch.Size)) and tuple(cur) == old:
                value: Any = tuple(new)
            elif (isinstance(cur, int) and not isinstance(cur, bool) and type(m).__module__.startswith("torch.nn")
                  and len(old) == 1 and (cur * new[0]) % old[0] == 0):
                value = cur * new[0] // old[0]
            elif type(cur) is int and len(old) == 1 and cur == old[0] and find_fixer(m) is None:
                value = new[0]   # a user module's size attribute passed to view (graph/view_attrs.py)
            else:
                continue
            undo["attrs"].setdefault(id(m), (m, module_attrs(m)))
            setattr(m, attr, value)


def apply_plan(model: nn.Module, plan: Plan, owners: dict[int, list[tuple[str, str]]],
               attrs: AttrPlan | None = None,
               modules: tuple[dict[str, nn.Module], dict[int, str]] | None = None) -> dict[str, Any]:
    """Slice every tensor in ``plan`` and run the fixers; returns the undo record for :func:`undo`.

    ``owners`` maps ``id(tensor)`` to every (module, attribute) holding it (tied weights); ``attrs``
    (from ``Edges.attr_updates``) updates attributes of parameter-less modules (LayerNorm without affine);
    ``modules``: ``(dict(model.named_modules(remove_duplicate=False)), {id(module): its name in
    model.named_modules()})`` when the caller holds them (the dependency graph), else walked here.
    """
    undo: dict[str, Any] = {"data": {}, "attrs": {}}
    by_tensor: dict[int, tuple[torch.Tensor, dict[int, list[np.ndarray]]]] = {}
    if modules is not None:
        mods, canon = modules
    else:
        mods = dict(model.named_modules(remove_duplicate=False))
        canon = {id(m): n for n, m in model.named_modules()}   # one name per module object
    for (mname, tname, dim), idx in plan.items():
        t = getattr(mods[mname], tname)
        by_tensor.setdefault(id(t), (t, {}))[1].setdefault(dim, []).append(np.asarray(idx, dtype=np.int64))
    modules: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    # (size, removed indices, device) -> (removed sorted and distinct, kept positions): most tensors of a plan
    # share their dim's size and indices with others (every tensor of a hidden-size group), so each distinct
    # set is checked and converted once
    sets: dict[tuple[int, bytes, torch.device], tuple[np.ndarray, torch.Tensor]] = {}
    try:
        for tid, (t, dims) in by_tensor.items():
            new = t.data
            undo["data"][tid] = (t, new)
            for dim, parts in dims.items():
                n = new.shape[dim]
                idx = parts[0] if len(parts) == 1 else np.concatenate(parts)
                key = (n, idx.tobytes(), new.device)
                got = sets.get(key)
                if got is None:
                    if len(idx) and (idx.min() < 0 or idx.max() >= n):
                        raise SurgeryError(f"indices {idx.min()}..{idx.max()} out of range for dim {dim} of size {n} "
                                           f"({owners.get(tid, [('?', '?')])[0]})")
                    keep = np.ones(n, dtype=bool)
                    keep[idx] = False
                    gone = np.nonzero(~keep)[0]          # sorted, distinct: what the fixers expect
                    gone.flags.writeable = False         # shared by the tensors with this set: read-only
                    got = sets[key] = (gone, torch.as_tensor(np.nonzero(keep)[0], device=new.device))
                dims[dim] = got[0]
                new = new.index_select(dim, got[1])
            t.data = new.contiguous()
            if getattr(t, "grad", None) is not None:
                t.grad = None
            seen: set[int] = set()   # a module registered under two names (aliases) is fixed once
            for mname, tname in owners.get(tid, []):
                if id(mods[mname]) not in seen:
                    seen.add(id(mods[mname]))
                    modules.setdefault(canon[id(mods[mname])], {}).setdefault(tname, {}).update(dims)
        # modules whose own tensors were sliced are fixed by their fixers (from the tensors); the mirrored
        # attributes are for modules without sliced tensors (a LayerNorm without affine)
        _set_mirrored_attrs(model, {k: v for k, v in (attrs or {}).items()
                                    if k not in modules or find_fixer(mods[k]) is None}, undo)
        container: dict[str, bool] = {}   # per parent name: whether its fixer is a container's
        for mname in list(modules):   # containers whose attributes mirror their children (HF attention, ViT)
            parts = mname.split(".") if mname else []
            for i in range(len(parts) - 1, -1, -1):
                parent = ".".join(parts[:i])
                is_container = container.get(parent)
                if is_container is None:
                    is_container = container[parent] = find_fixer(mods[parent]) in _CONTAINER_FIXERS
                if is_container:
                    rel = ".".join(parts[i:])   # the container sees its children's removals as 'child.tensor'
                    for tname, dims in list(modules[mname].items()):
                        modules.setdefault(parent, {})[f"{rel}.{tname}"] = dims
        for mname, removed in modules.items():
            m = mods[mname]
            fixer = find_fixer(m)
            if fixer is not None:
                undo["attrs"].setdefault(id(m), (m, module_attrs(m)))
                try:
                    fixer(m, removed)
                except SurgeryError:
                    raise
                except (AttributeError, TypeError, ValueError, RuntimeError) as e:
                    raise SurgeryError(f"fixing attributes of {mname or 'the root module'} "
                                       f"({type(m).__name__}) failed: {e}") from e
    except BaseException:
        undo_plan(undo)
        raise
    return undo


def undo_plan(undo: dict[str, Any]) -> None:
    """Put back the tensors and attributes recorded by :func:`apply_plan` (keyed by object, so a module
    registered under two names is restored once, from its state before the plan)."""
    for t, data in undo["data"].values():
        t.data = data
    for m, attrs in undo["attrs"].values():
        for k, v in attrs.items():
            setattr(m, k, v)
    for m, _ in undo["attrs"].values():
        if isinstance(m, nn.RNNBase) and hasattr(m, "_init_flat_weights"):
            m._init_flat_weights()
