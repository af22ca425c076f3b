"""Small models for the export tests: a narrowed CNN, a registered int8 test format, tiny HF models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from brainsurgeon.formats import register_module_format
from brainsurgeon.models import build_model


def digits(seed: int = 0) -> nn.Module:
    """The built-in digits CNN with BN statistics that are not the defaults (so they must round-trip)."""
    m = build_model("digits-cnn", seed=seed)
    g = torch.Generator().manual_seed(seed)
    for bn in (m.bn1, m.bn2, m.bn3):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return m.eval()


def _slice_conv(conv: nn.Conv2d, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Conv2d:
    W = conv.weight.detach()
    W = W[out_idx] if out_idx is not None else W
    W = W[:, in_idx] if in_idx is not None else W
    new = nn.Conv2d(W.shape[1], W.shape[0], conv.kernel_size, padding=conv.padding, bias=conv.bias is not None)
    new.weight.data = W.clone()
    return new


def _slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx))
    for k in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, k).data = getattr(bn, k).detach()[idx].clone()
    return new.train(bn.training)


def narrowed_digits(seed: int = 0) -> nn.Module:
    """digits CNN with conv2 cut from 32 to 12 channels (bn2 and conv3's inputs follow), fc1 to 40 units."""
    m = digits(seed)
    keep = torch.tensor([0, 3, 4, 7, 9, 12, 15, 18, 21, 24, 27, 31])
    m.conv2 = _slice_conv(m.conv2, out_idx=keep)
    m.bn2 = _slice_bn(m.bn2, keep)
    m.conv3 = _slice_conv(m.conv3, in_idx=keep)
    hid = torch.arange(40)
    fc1, fc2 = m.fc1, m.fc2
    m.fc1 = nn.Linear(fc1.in_features, 40)
    m.fc1.weight.data, m.fc1.bias.data = fc1.weight.detach()[hid].clone(), fc1.bias.detach()[hid].clone()
    m.fc2 = nn.Linear(40, fc2.out_features)
    m.fc2.weight.data, m.fc2.bias.data = fc2.weight.detach()[:, hid].clone(), fc2.bias.detach().clone()
    return m.eval()


@register_module_format("test_int8_linear")
class Int8Linear(nn.Module):
    """Weight-only int8 Linear (per-row scales) for the tests; dequantizes in forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.to(x.dtype) * self.scale, self.bias)

    def spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> Int8Linear:
        return cls(**spec)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        q = cls(lin.in_features, lin.out_features, lin.bias is not None)
        W = lin.weight.detach()
        s = W.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        q.qweight.copy_(torch.round(W / s).clamp(-127, 127).to(torch.int8))
        q.scale.copy_(s)
        if lin.bias is not None:
            q.bias.data.copy_(lin.bias.detach())
        return q

    def dequantize(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        lin.weight.data = self.qweight.float() * self.scale
        if self.bias is not None:
            lin.bias.data = self.bias.detach().clone()
        return lin


def quantized_digits(seed: int = 0) -> nn.Module:
    """digits CNN with fc1 and fc2 replaced by the int8 test format."""
    m = digits(seed)
    m.fc1, m.fc2 = Int8Linear.from_linear(m.fc1), Int8Linear.from_linear(m.fc2)
    return m


def sparsified_digits(seed: int = 0, sparsity: float = 0.75) -> nn.Module:
    """digits CNN with the smallest 75% of every conv/linear weight set to zero (unstructured)."""
    m = digits(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                w = mod.weight
                k = int(w.numel() * sparsity)
                thr = w.abs().flatten().kthvalue(k).values
                w.masked_fill_(w.abs() <= thr, 0.0)
    return m


def narrow_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A copy of `lin` keeping only `rows` (outputs) and/or `cols` (inputs)."""
    W = lin.weight.detach()
    W = W[rows] if rows is not None else W
    W = W[:, cols] if cols is not None else W
    new = nn.Linear(W.shape[1], W.shape[0], bias=lin.bias is not None)
    new.weight.data = W.clone()
    if lin.bias is not None:
        new.bias.data = (lin.bias.detach()[rows] if rows is not None else lin.bias.detach()).clone()
    return new


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True)


def narrowed_tiny_llama(seed: int = 0) -> nn.Module:
    """Tiny LLaMA (tied embeddings): per-layer MLP widths 24 and 40 (config says 48), and layer 0 keeps
    only q heads 0 and 2 (one q head per kv head): widths and an attribute the HF config cannot express."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(tiny_llama_config()).eval()
    for layer, k in zip(m.model.layers, (24, 40), strict=True):
        mlp, keep = layer.mlp, torch.arange(k)
        mlp.gate_proj = narrow_linear(mlp.gate_proj, rows=keep)
        mlp.up_proj = narrow_linear(mlp.up_proj, rows=keep)
        mlp.down_proj = narrow_linear(mlp.down_proj, cols=keep)
    att = m.model.layers[0].self_attn
    heads = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])  # head_dim 8: q heads 0 and 2
    att.q_proj = narrow_linear(att.q_proj, rows=heads)
    att.o_proj = narrow_linear(att.o_proj, cols=heads)
    att.num_key_value_groups = 1
    return m
