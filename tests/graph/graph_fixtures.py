"""Tiny architectures named for the dependency edge case they exercise, with example inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ResidualAdd(nn.Module):
    """Two residual blocks: the stem, both block outputs and the head input are one coupled set."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        x = x + self.c3(x)
        return self.fc(x.mean((2, 3)))


class ConcatSplit(nn.Module):
    """cat of two branches (offsets) and chunk + add (channel i coupled with channel i + C/2)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 4, 1)
        self.d = nn.Conv2d(3, 12, 1)
        self.e = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))
        z1, z2 = self.d(x).chunk(2, 1)
        return y + self.e(torch.tanh(z1 + z2))


class GroupConv(nn.Module):
    """groups=4 conv: input channels removed in whole conv groups, groups attribute updated."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)
        self.g = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(24)
        self.c3 = nn.Conv2d(24, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(F.relu(self.bn2(self.g(F.relu(self.bn1(self.c1(x)))))))


class DepthwiseConv(nn.Module):
    """Depthwise conv with channel multiplier 2: input channel c is output channels {2c, 2c+1}."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(F.relu6(self.bn(self.dw(F.relu(self.c1(x))))))


class FlattenLinear(nn.Module):
    """Conv -> flatten -> Linear: channel c is the block [c*H*W, (c+1)*H*W) of the Linear input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(4 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class MHA(nn.Module):
    """nn.MultiheadAttention between two Linears: embed_dim is pruned in whole heads."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h)
        return self.out(F.relu(a))


class LSTMNet(nn.Module):
    """2-layer LSTM: hidden unit h couples the 4 gate rows of w_ih/w_hh, w_hh's column h and the next layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(self.inp(x))
        return self.out(y[:, -1])


class GRUNet(nn.Module):
    """GRU (decomposed into matmuls at the ATen level): 3 gates coupled through unsafe_split."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(5, 7, batch_first=True)
        self.out = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.gru(x)
        return self.out(y.sum(1))


class TiedEmbedding(nn.Module):
    """Embedding whose weight is also the output head: one Parameter, sliced once."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.ff1, self.ff2 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        h = h + self.ff2(F.gelu(self.ff1(h)))
        return self.head(h)


class GAT(nn.Module):
    """Graph attention layer in plain torch: heads via view(N, -1, F'), masked softmax over neighbours."""

    def __init__(self, f_in: int = 6, f_out: int = 4, heads: int = 3) -> None:
        super().__init__()
        self.f_out = f_out
        self.w = nn.Linear(f_in, heads * f_out, bias=False)
        self.a_src = nn.Parameter(torch.randn(heads, f_out))
        self.a_dst = nn.Parameter(torch.randn(heads, f_out))
        self.out = nn.Linear(heads * f_out, 2)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.w(x).view(n, -1, self.f_out)                       # [N, H, F']
        s = (h * self.a_src).sum(-1)                                # [N, H]
        d = (h * self.a_dst).sum(-1)
        e = F.leaky_relu(s.unsqueeze(1) + d.unsqueeze(0), 0.2)      # [N, N, H]
        e = e.masked_fill(~adj.unsqueeze(-1), float("-inf"))
        alpha = torch.softmax(e, dim=1)                             # over neighbours
        agg = torch.einsum("ijh,jhf->ihf", alpha, h)               # [N, H, F']
        return self.out(F.elu(agg.reshape(n, -1)))


class ConvTranspose(nn.Module):
    """Encoder/decoder with ConvTranspose2d (weight [in, out, k, k])."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.dec(F.relu(self.enc(x))))))


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=24, max_position_embeddings=16, attn_implementation="eager")
    return BertModel(cfg)


def tiny_llama_gqa() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def _adj() -> torch.Tensor:
    a = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) > 0.5
    return a | torch.eye(5, dtype=torch.bool)


FIXTURES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any]]] = {
    "ResidualAdd": (ResidualAdd, lambda: (torch.randn(2, 3, 8, 8),)),
    "ConcatSplit": (ConcatSplit, lambda: (torch.randn(2, 3, 6, 6),)),
    "GroupConv": (GroupConv, lambda: (torch.randn(2, 3, 6, 6),)),
    "DepthwiseConv": (DepthwiseConv, lambda: (torch.randn(2, 3, 6, 6),)),
    "FlattenLinear": (FlattenLinear, lambda: (torch.randn(2, 3, 8, 8),)),
    "MHA": (MHA, lambda: (torch.randn(2, 5, 6),)),
    "LSTM": (LSTMNet, lambda: (torch.randn(2, 4, 5),)),
    "GRU": (GRUNet, lambda: (torch.randn(2, 4, 5),)),
    "TiedEmbedding": (TiedEmbedding, lambda: (torch.randint(0, 20, (2, 5)),)),
    "GAT": (GAT, lambda: (torch.randn(5, 6), _adj())),
    "ConvTranspose": (ConvTranspose, lambda: (torch.randn(2, 3, 8, 8),)),
    "TinyBERT": (tiny_bert, lambda: {"input_ids": torch.randint(0, 50, (2, 6))}),
    "TinyLlamaGQA": (tiny_llama_gqa, lambda: {"input_ids": torch.randint(0, 40, (2, 6))}),
}


def build(name: str) -> tuple[nn.Module, Any]:
    """(model in eval mode with BN statistics made non-trivial, example inputs), seeded."""
    torch.manual_seed(0)
    make, inputs = FIXTURES[name]
    model = make()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval(), inputs()


def zero_slices_(model: nn.Module, grp: Any) -> None:
    """Zero, in place, every tensor position of ``grp``'s slices in ``model`` (the zero-then-prune reference:
    a model whose pruned channels are zero must give the pruned model's output)."""
    with torch.no_grad():
        for s in grp.slices:
            getattr(model.get_submodule(s.module), s.tensor).index_fill_(s.dim, s.idxs.reshape(-1), 0.0)


def reload_hf(model: nn.Module, path: Any) -> nn.Module:
    """``model`` saved and loaded back in eval mode: ``brainsurgeon.export`` where per-layer widths differ (the
    config cannot express them), else the family's own ``save_pretrained`` / ``from_pretrained``."""
    from brainsurgeon.export import from_pretrained, save_pretrained
    if getattr(model.config, "brainsurgeon_layer_widths", None):
        save_pretrained(model, str(path / "m"))
        return from_pretrained(str(path / "m")).eval()
    model.save_pretrained(path)
    return type(model).from_pretrained(path, attn_implementation="eager").eval()
