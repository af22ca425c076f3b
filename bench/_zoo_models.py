"""The models of ``graph_zoo.py``: one small model per timm family, Hugging Face families from tiny
configs, and hand-written architectures. Each builder returns a :class:`Case`.

    >>> case = build("hf:llama")
    >>> case.model, case.inputs, case.ignore      # model (eval), kwargs/tuple for one forward, head names

Random weights everywhere (seed 0); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
TIMM_LIST = os.path.join(HERE, "graph_zoo_timm.json")


@dataclass
class Case:
    """One model to prune: ``inputs`` (a tuple of args or a dict of kwargs), ``ignore`` (head module names)."""

    model: Any
    inputs: Any
    ignore: list[str] = field(default_factory=list)
    hf: bool = False


# ------------------------------------------------------------------ timm
_SMALL = ("atto", "femto", "pico", "nano", "zepto", "xxxs", "xxs", "tiny", "xs", "mini", "small", "lite0", "b0",
          "_s_", "_s", "t_", "18", "26", "050", "075", "100", "s0", "t0", "a0", "b1")


def _rank(name: str) -> tuple[int, int, str]:
    for i, w in enumerate(_SMALL):
        if w in name:
            return (i, len(name), name)
    return (len(_SMALL), len(name), name)


def timm_selection(refresh: bool = False) -> dict[str, str]:
    """``{family (timm module): model}``: among each family's 3 best-ranked names by a size heuristic, the
    one with the fewest parameters (counted on the meta device). Cached in ``graph_zoo_timm.json``."""
    if os.path.exists(TIMM_LIST) and not refresh:
        with open(TIMM_LIST, encoding="utf-8") as f:
            return json.load(f)
    import timm
    import torch
    from timm.models import _registry

    fams: dict[str, list[str]] = {}
    for n in timm.list_models():
        fams.setdefault(_registry._model_to_module[n], []).append(n)
    out = {}
    for fam, names in sorted(fams.items()):
        best = None
        for n in sorted(names, key=_rank)[:3]:
            try:
                with torch.device("meta"):
                    m = timm.create_model(n, pretrained=False)
                p = sum(t.numel() for t in m.parameters())
            except Exception:  # noqa: BLE001  (a family whose first names need extra packages)
                continue
            if p <= 100e6 and (best is None or p < best[1]):
                best = (n, p)
        if best:
            out[fam] = best[0]
    with open(TIMM_LIST, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    return out


def _timm(name: str) -> Case:
    import timm
    import torch
    from torch import nn

    m = timm.create_model(name, pretrained=False).eval()
    size = tuple(m.pretrained_cfg.get("input_size", (3, 224, 224)))
    fixed = m.pretrained_cfg.get("fixed_input_size", False)
    if fixed and size[-1] > 288:       # a fixed size the model can be built smaller at (SAM ViT: 1024 px)
        try:
            m, fixed = timm.create_model(name, pretrained=False, img_size=224).eval(), False
        except TypeError:
            pass
    if not fixed and size[-1] > 288:   # large defaults (288-1024 px) at 224 px; 256 px kept (halo windows)
        size = (size[0], 224, 224)
    x = torch.rand(1, *size, generator=torch.Generator().manual_seed(0))
    heads = m.pretrained_cfg.get("classifier") or ()
    heads = [heads] if isinstance(heads, str) else list(heads)
    names = {n for n, _ in m.named_modules()}
    ignore = [h for h in heads if h in names]
    ncls = getattr(m, "num_classes", 1000)
    ignore += [n for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))
               and (getattr(mod, "out_features", None) or getattr(mod, "out_channels", None)) == ncls
               and n not in ignore and not any(n.startswith(h + ".") for h in ignore)]
    return Case(m, (x,), ignore)


# ------------------------------------------------------------------ Hugging Face (tiny configs)
_TXT = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 64}


def _ids(n: int = 16, vocab: int = 128) -> Any:
    import torch
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(0))


def _pix(size: int = 32, ch: int = 3) -> Any:
    import torch
    return torch.rand(1, ch, size, size, generator=torch.Generator().manual_seed(0))


def _hf_specs() -> dict[str, Any]:
    """family -> (config class, model class, config kwargs, inputs builder, ignored heads)."""
    import transformers as tf
    lm = ["lm_head"]
    dec = {**_TXT, "num_key_value_heads": 2}
    txt_cls = {**_TXT, "num_labels": 3}
    specs: dict[str, Any] = {
        "bert": (tf.BertConfig, tf.BertForSequenceClassification, txt_cls, "ids", ["classifier"]),
        "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification, {**txt_cls, "max_position_embeddings": 80},
                    "ids", ["classifier.out_proj"]),
        "distilbert": (tf.DistilBertConfig, tf.DistilBertForSequenceClassification,
                       {"vocab_size": 128, "dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128,
                        "max_position_embeddings": 64, "num_labels": 3}, "ids", ["classifier"]),
        "albert": (tf.AlbertConfig, tf.AlbertForSequenceClassification, {**txt_cls, "embedding_size": 32},
                   "ids", ["classifier"]),
        "electra": (tf.ElectraConfig, tf.ElectraForSequenceClassification, {**txt_cls, "embedding_size": 32},
                    "ids", ["classifier.out_proj"]),
        "deberta_v2": (tf.DebertaV2Config, tf.DebertaV2ForSequenceClassification, txt_cls, "ids", ["classifier"]),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, {"vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4,
                                                      "n_positions": 64}, "ids", lm),
        "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, _TXT, "ids", lm),
        "opt": (tf.OPTConfig, tf.OPTForCausalLM, {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
                                                   "num_attention_heads": 4, "ffn_dim": 128,
                                                   "max_position_embeddings": 64, "word_embed_proj_dim": 64},
                "ids", lm),
        "falcon": (tf.FalconConfig, tf.FalconForCausalLM, {"vocab_size": 128, "hidden_size": 64,
                                                            "num_hidden_layers": 2, "num_attention_heads": 4},
                   "ids", lm),
        "bloom": (tf.BloomConfig, tf.BloomForCausalLM, {"vocab_size": 128, "hidden_size": 64, "n_layer": 2,
                                                         "n_head": 4}, "ids", lm),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dec, "ids", lm),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dec, "ids", lm),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, {**dec, "num_local_experts": 4,
                                                               "num_experts_per_tok": 2}, "ids", lm),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dec, "ids", lm),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {**dec, "pad_token_id": 0}, "ids", lm),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {**dec, "head_dim": 16}, "ids", lm),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {**dec, "head_dim": 16}, "ids", lm),
        "t5": (tf.T5Config, tf.T5ForConditionalGeneration, {"vocab_size": 128, "d_model": 64, "d_kv": 16,
                                                             "d_ff": 128, "num_layers": 2, "num_heads": 4},
               "enc_dec", lm),
        "bart": (tf.BartConfig, tf.BartForConditionalGeneration,
                 {"vocab_size": 128, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
                  "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
                  "decoder_ffn_dim": 128, "max_position_embeddings": 64}, "enc_dec", lm),
        "vit": (tf.ViTConfig, tf.ViTForImageClassification, {"hidden_size": 64, "num_hidden_layers": 2,
                                                             "num_attention_heads": 4, "intermediate_size": 128,
                                                             "image_size": 32, "patch_size": 8, "num_labels": 3},
                "pix32", ["classifier"]),
        "convnext": (tf.ConvNextConfig, tf.ConvNextForImageClassification,
                     {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "num_labels": 3}, "pix64",
                     ["classifier"]),
        "swin": (tf.SwinConfig, tf.SwinForImageClassification,
                 {"image_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 4],
                  "window_size": 4, "num_labels": 3}, "pix32", ["classifier"]),
        "mobilevit": (tf.MobileViTConfig, tf.MobileViTForImageClassification,
                      {"image_size": 64, "hidden_sizes": [32, 48, 64], "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64],
                       "num_labels": 3}, "pix64", ["classifier"]),
        "resnet": (tf.ResNetConfig, tf.ResNetForImageClassification,
                   {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "num_labels": 3}, "pix32",
                   ["classifier.1"]),
        "segformer": (tf.SegformerConfig, tf.SegformerForImageClassification,
                      {"num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [16, 32],
                       "num_attention_heads": [1, 2], "num_labels": 3, "decoder_hidden_size": 32}, "pix32",
                      ["classifier"]),
        "clip": (tf.CLIPConfig, tf.CLIPModel, {"text_config": {**_TXT, "max_position_embeddings": 32},
                                               "vision_config": {"hidden_size": 64, "num_hidden_layers": 2,
                                                                 "num_attention_heads": 4, "intermediate_size": 128,
                                                                 "image_size": 32, "patch_size": 8},
                                               "projection_dim": 32}, "clip", []),
        "wav2vec2": (tf.Wav2Vec2Config, tf.Wav2Vec2ForSequenceClassification,
                     {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                      "conv_dim": (32, 32), "conv_stride": (5, 2), "conv_kernel": (10, 3),
                      "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4, "num_labels": 3,
                      "classifier_proj_size": 16}, "audio", ["classifier"]),
    }
    return specs


def _hf_inputs(kind: str) -> Any:
    import torch
    if kind == "ids":
        return {"input_ids": _ids()}
    if kind == "enc_dec":
        return {"input_ids": _ids(), "decoder_input_ids": _ids(8)}
    if kind.startswith("pix"):
        return {"pixel_values": _pix(int(kind[3:]))}
    if kind == "clip":
        return {"input_ids": _ids(), "pixel_values": _pix(32)}
    if kind == "audio":
        return {"input_values": torch.randn(1, 1600, generator=torch.Generator().manual_seed(0))}
    raise KeyError(kind)


HF_FAMILIES = ("albert", "bart", "bert", "bloom", "clip", "convnext", "deberta_v2", "distilbert", "electra", "falcon",
               "gemma", "gemma2", "gpt2", "gpt_neox", "llama", "mistral", "mixtral", "mobilevit", "opt", "phi3",
               "qwen2", "resnet", "roberta", "segformer", "swin", "t5", "vit", "wav2vec2")


def hf_families() -> list[str]:
    """The HF families of the sweep (the keys of ``_hf_specs``, listed without importing transformers)."""
    import importlib.util
    return list(HF_FAMILIES) if importlib.util.find_spec("transformers") else []


def _hf(fam: str) -> Case:
    import torch
    cfg_cls, model_cls, kw, kind, heads = _hf_specs()[fam]
    torch.manual_seed(0)
    cfg = cfg_cls(**kw)
    if hasattr(cfg, "_attn_implementation"):
        cfg._attn_implementation = "eager"
    m = model_cls(cfg).eval()
    return Case(m, _hf_inputs(kind), heads, hf=True)


# ------------------------------------------------------------------ hand-written
def _hand_specs() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            def blk(i, o):
                return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
            self.e1, self.e2, self.mid = blk(3, 16), blk(16, 32), blk(32, 64)
            self.up2, self.d2 = nn.ConvTranspose2d(64, 32, 2, 2), blk(64, 32)
            self.up1, self.d1 = nn.ConvTranspose2d(32, 16, 2, 2), blk(32, 16)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            a = self.e1(x)
            b = self.e2(F.max_pool2d(a, 2))
            c = self.mid(F.max_pool2d(b, 2))
            d = self.d2(torch.cat([self.up2(c), b], 1))
            return self.head(self.d1(torch.cat([self.up1(d), a], 1)))

    class ChunkSplit(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, padding=1)
            self.left, self.right = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 24, 3, padding=1)
            self.fuse = nn.Conv2d(40, 32, 1)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            u, v = torch.chunk(F.relu(self.stem(x)), 2, dim=1)
            h = torch.cat([self.left(u), self.right(v)], 1)
            p, q = torch.split(h, [self.left.out_channels, self.right.out_channels], 1)
            return self.head(self.fuse(torch.cat([q, p], 1)).mean((2, 3)))

    class EinsumSDPA(nn.Module):
        def __init__(self, d=64, h=4):
            super().__init__()
            self.h, self.inp, self.qkv, self.o = h, nn.Linear(32, d), nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.w1, self.w2, self.head = nn.Parameter(torch.randn(d, 128) * 0.05), nn.Linear(128, d), nn.Linear(d, 5)

        def forward(self, x):
            x = self.inp(x)
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, self.h, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
            x = x + self.o(a)
            x = x + self.w2(F.gelu(torch.einsum("btd,df->btf", x, self.w1)))
            return self.head(x.mean(1))

    class GAT(nn.Module):
        def __init__(self, heads=4, hd=8):
            super().__init__()
            self.heads, self.hd = heads, hd
            self.w = nn.Linear(16, heads * hd, bias=False)
            self.a_src, self.a_dst = nn.Parameter(torch.randn(heads, hd)), nn.Parameter(torch.randn(heads, hd))
            self.out = nn.Linear(heads * hd, 32)
            self.head = nn.Linear(32, 3)

        def forward(self, x, adj):
            n = x.shape[0]
            h = self.w(x).view(n, self.heads, self.hd)
            e = (h * self.a_src).sum(-1)[:, None, :] + (h * self.a_dst).sum(-1)[None, :, :]
            att = torch.softmax(F.leaky_relu(e).masked_fill(adj[..., None] == 0, -1e9), dim=1)
            h = torch.einsum("ijh,jhd->ihd", att, h).reshape(n, -1)
            return self.head(F.elu(self.out(h)))

    class LSTMLM(nn.Module):
        def __init__(self, v=100, d=32):
            super().__init__()
            self.emb, self.rnn = nn.Embedding(v, d), nn.LSTM(d, 64, batch_first=True)
            self.proj = nn.Linear(64, d)
            self.dec = nn.Linear(d, v)
            self.dec.weight = self.emb.weight

        def forward(self, ids):
            return self.dec(self.proj(self.rnn(self.emb(ids))[0]))

    class PointNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv1d(3, 64, 1), nn.Conv1d(64, 128, 1), nn.Conv1d(128, 256, 1)
            self.b1, self.b2, self.b3 = nn.BatchNorm1d(64), nn.BatchNorm1d(128), nn.BatchNorm1d(256)
            self.fc1, self.head = nn.Linear(256, 128), nn.Linear(128, 10)

        def forward(self, x):
            x = F.relu(self.b1(self.c1(x)))
            x = F.relu(self.b2(self.c2(x)))
            x = self.b3(self.c3(x)).max(2).values
            return self.head(F.relu(self.fc1(x)))

    class DWSep1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv1d(8, 32, 3, padding=1)
            self.dw, self.pw = nn.Conv1d(32, 32, 5, padding=2, groups=32), nn.Conv1d(32, 64, 1)
            self.dw2, self.pw2 = nn.Conv1d(64, 64, 5, padding=2, groups=64), nn.Conv1d(64, 64, 1)
            self.head = nn.Linear(64, 4)

        def forward(self, x):
            x = F.relu(self.stem(x))
            x = F.relu(self.pw(self.dw(x)))
            x = F.relu(self.pw2(self.dw2(x)))
            return self.head(x.mean(2))

    g = torch.Generator().manual_seed(0)
    adj = (torch.rand(12, 12, generator=g) > 0.6).float() + torch.eye(12)
    return {"unet": (UNet, (torch.rand(1, 3, 32, 32, generator=g),), ["head"]),
            "chunk_split": (ChunkSplit, (torch.rand(1, 3, 16, 16, generator=g),), ["head"]),
            "einsum_sdpa": (EinsumSDPA, (torch.rand(2, 10, 32, generator=g),), ["head"]),
            "gat": (GAT, (torch.rand(12, 16, generator=g), adj), ["head"]),
            "lstm_lm_tied": (LSTMLM, (torch.randint(0, 100, (2, 12), generator=g),), ["dec"]),
            "pointnet": (PointNet, (torch.rand(2, 3, 64, generator=g),), ["head"]),
            "dwsep_conv1d": (DWSep1d, (torch.rand(2, 8, 32, generator=g),), ["head"])}


def _hand(name: str) -> Case:
    import torch
    cls, x, heads = _hand_specs()[name]
    torch.manual_seed(0)
    return Case(cls().eval(), x, heads)


# ------------------------------------------------------------------ torchvision classification
def tv_models() -> list[str]:
    """Every classification model torchvision lists (``list_models(module=torchvision.models)``)."""
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models))


def _tv(name: str) -> Case:
    """A torchvision classifier as ``graph_coverage.py`` builds it (weights=None; ViTs built for their small
    input), on one 1x3x64x64 image -- ViTs at the size they were built for, MaxViT at 224 px (its fixed
    window partition), Inception-v3 at 96 px (its 75 px minimum); heads: ``graph_coverage.head_modules``."""
    import torch

    from graph_coverage import build as tv_build
    from graph_coverage import head_modules
    from graph_coverage import inputs as tv_inputs

    torch.manual_seed(0)
    m = tv_build(name)
    (x,) = tv_inputs(name)
    heads = {id(h) for h in head_modules(m, name)}
    return Case(m, (x[:1],), [n for n, mod in m.named_modules() if id(mod) in heads])


# ------------------------------------------------------------------ registry
def all_names(timm_too: bool = True) -> list[str]:
    """Every model of the sweep: ``hand:*``, ``hf:*``, ``timm:<family>:<model>`` and ``tv:<model>``."""
    names = [f"hand:{n}" for n in ("unet", "chunk_split", "einsum_sdpa", "gat", "lstm_lm_tied", "pointnet",
                                   "dwsep_conv1d")]
    names += [f"hf:{f}" for f in hf_families()]
    if timm_too:
        try:
            names += [f"timm:{fam}:{m}" for fam, m in sorted(timm_selection().items())]
        except ImportError:
            pass
    return names + [f"tv:{n}" for n in tv_models()]


def build(name: str) -> Case:
    kind, _, rest = name.partition(":")
    if kind == "timm":
        return _timm(rest.partition(":")[2])
    if kind == "hf":
        return _hf(rest)
    if kind == "hand":
        return _hand(rest)
    if kind == "tv":
        return _tv(rest)
    raise KeyError(f"unknown zoo model {name!r}; names look like hand:unet, hf:llama, timm:resnet:resnet18, "
                   "tv:resnet50")
