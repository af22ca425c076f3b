"""save -> load gives identical outputs, dtypes, ties and manifest data, for every kind of compressed model."""

from __future__ import annotations

import json

import pytest
import torch
from export_fixtures import Int8Linear, digits, narrowed_digits, quantized_digits, sparsified_digits
from torch import nn

from brainsurgeon import ExactOBS, Recipe, Step
from brainsurgeon.export import build_module, load, module_spec, read_manifest, save
from brainsurgeon.export.specs import _TABLE
from brainsurgeon.models import build_model
from brainsurgeon.report import CompressionReport, LayerRow

X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def fresh() -> nn.Module:
    return build_model("digits-cnn")


@pytest.mark.parametrize("make", [digits, narrowed_digits, sparsified_digits, quantized_digits],
                         ids=["dense", "narrowed", "sparsified", "quantized"])
def test_round_trip_is_exact(tmp_path, make):
    model = make()
    with torch.no_grad():
        y = model(X)
    save(model, str(tmp_path / "ck"))
    again = load(str(tmp_path / "ck"), fresh).eval()
    with torch.no_grad():
        assert torch.equal(again(X), y)
    assert [type(m) for m in again.modules()] == [type(m) for m in model.modules()]
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)


def test_narrowed_model_records_only_shapes(tmp_path):
    model = narrowed_digits()
    save(model, str(tmp_path / "ck"))
    man = read_manifest(str(tmp_path / "ck"))
    assert man["modules"]["conv2"] == {"format": "torch.Conv2d", "spec": {
        "in_channels": 16, "out_channels": 12, "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1],
        "dilation": [1, 1], "groups": 1, "bias": False, "padding_mode": "zeros"}}
    assert man["modules"]["bn2"]["spec"]["num_features"] == 12
    assert man["modules"]["fc1"]["spec"] == {"in_features": 512, "out_features": 40, "bias": True}
    assert (tmp_path / "ck" / "model.safetensors").stat().st_size == man["weights"]["bytes"]
    params = sum(p.numel() for p in load(str(tmp_path / "ck"), fresh).parameters())
    assert params == sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in fresh().parameters())


def test_quantized_format_is_stored_as_int8(tmp_path):
    save(quantized_digits(), str(tmp_path / "ck"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("fc1.qweight").get_dtype() == "I8"
    man = read_manifest(str(tmp_path / "ck"))
    assert man["modules"]["fc1"]["format"] == "test_int8_linear"
    assert isinstance(load(str(tmp_path / "ck"), fresh).fc1, Int8Linear)


def test_manifest_keeps_recipe_plan_history_and_versions(tmp_path):
    recipe = Recipe(steps=(Step(ExactOBS(sparsity=0.5)),))
    rep = CompressionReport()
    rep.add_row(LayerRow("fc1", "ExactOBS 50%", (64, 512), 32768, 16384, 32.0, 0.1, 0.01, 0.5))
    history = [{"group": "conv2:out", "idxs": [1, 2]}]
    save(digits(), str(tmp_path / "ck"), recipe=recipe, plan={"fc1": ExactOBS(sparsity=0.5)}, history=history)
    man = read_manifest(str(tmp_path / "ck"))
    assert Recipe.from_dict(man["recipe"]) == recipe
    assert man["plan"]["fc1"] == ExactOBS(sparsity=0.5).to_dict()
    assert man["history"] == history
    assert {"brainsurgeon", "torch", "safetensors"} <= set(man["versions"])
    assert man["model_class"].endswith("DigitsCNN")
    save(digits(), str(tmp_path / "ck2"), history=rep)
    assert read_manifest(str(tmp_path / "ck2"))["history"]["rows"][0]["name"] == "fc1"


def test_dtype_tied_weights_and_grad_flags_survive(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.emb(ids)))

    torch.manual_seed(0)
    model = Tied().to(torch.bfloat16)
    model.norm.weight.requires_grad_(False)
    ids = torch.randint(0, 20, (3, 7))
    save(model, str(tmp_path / "ck"))
    assert read_manifest(str(tmp_path / "ck"))["aliases"] == {"head.weight": "emb.weight"}

    def fn() -> nn.Module:
        m = Tied()
        m.norm.weight.requires_grad_(False)
        return m

    again = load(str(tmp_path / "ck"), fn)
    assert again.head.weight is again.emb.weight and again.emb.weight.dtype == torch.bfloat16
    assert not again.norm.weight.requires_grad and again.norm.bias.requires_grad
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


# one narrowed instance per entry of the spec table: build_module(module_spec(m)) has m's exact shapes
_CASES = {
    "torch.Linear": lambda: nn.Linear(7, 3, bias=False),
    "torch.Conv1d": lambda: nn.Conv1d(4, 6, 3, stride=2, padding="valid", groups=2),
    "torch.Conv2d": lambda: nn.Conv2d(3, 5, (3, 1), padding=(1, 0), dilation=2, padding_mode="reflect"),
    "torch.Conv3d": lambda: nn.Conv3d(2, 4, 1),
    "torch.BatchNorm1d": lambda: nn.BatchNorm1d(5, momentum=None),
    "torch.BatchNorm2d": lambda: nn.BatchNorm2d(7, affine=False),
    "torch.BatchNorm3d": lambda: nn.BatchNorm3d(3, track_running_stats=False),
    "torch.LayerNorm": lambda: nn.LayerNorm((4, 6), bias=False),
    "torch.GroupNorm": lambda: nn.GroupNorm(3, 9, bias=False),
    "torch.Embedding": lambda: nn.Embedding(11, 6, padding_idx=0),
    "torch.MultiheadAttention": lambda: nn.MultiheadAttention(12, 3, kdim=5, vdim=7, batch_first=True),
    "torch.LSTM": lambda: nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3),
    "torch.GRU": lambda: nn.GRU(4, 3, batch_first=True, bias=False),
    "torch.RNN": lambda: nn.RNN(4, 3, nonlinearity="relu"),
}


@pytest.mark.parametrize("name", sorted(_TABLE))
def test_every_spec_table_entry_rebuilds_exact_shapes(name):
    m = _CASES[name]()
    entry = module_spec(m)
    assert entry["format"] == name
    json.dumps(entry)  # JSON-safe
    rebuilt = build_module(json.loads(json.dumps(entry)))
    assert type(rebuilt) is type(m)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert module_spec(rebuilt) == entry


def test_narrowed_sequence_model_round_trip(tmp_path):
    class Seq(nn.Module):
        def __init__(self, emb: int = 16, hid: int = 12, heads: int = 4) -> None:
            super().__init__()
            self.emb = nn.Embedding(30, emb)
            self.attn = nn.MultiheadAttention(emb, heads, batch_first=True)
            self.gn = nn.GroupNorm(2, emb)
            self.lstm = nn.LSTM(emb, hid, batch_first=True)
            self.gru = nn.GRU(hid, hid, batch_first=True)
            self.out = nn.Linear(hid, 5)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.emb(ids)
            h = h + self.attn(h, h, h, need_weights=False)[0]
            h = self.gn(h.transpose(1, 2)).transpose(1, 2)
            h = self.gru(self.lstm(h)[0])[0]
            return self.out(h)

    torch.manual_seed(0)
    small = Seq(emb=8, hid=6, heads=2).eval()  # a "pruned" instance: every width smaller than the dense one
    ids = torch.randint(0, 30, (2, 9))
    save(small, str(tmp_path / "ck"))
    again = load(str(tmp_path / "ck"), Seq).eval()
    assert again.lstm.hidden_size == 6 and again.attn.num_heads == 2
    with torch.no_grad():
        assert torch.equal(again(ids), small(ids))


def test_loaded_tensors_own_aligned_memory(tmp_path):
    """safetensors views the mapped file at unaligned offsets; int8 CPU kernels crash on those."""
    import shutil

    model = quantized_digits()
    save(model, str(tmp_path / "ck"))
    again = load(str(tmp_path / "ck"), fresh).eval()
    assert all(t.data_ptr() % 64 == 0 for t in again.state_dict().values() if t.numel())
    shutil.rmtree(tmp_path / "ck")  # the model no longer depends on the file
    with torch.no_grad():
        assert torch.equal(again(X), model(X))


def test_model_pruned_by_the_dependency_graph(tmp_path):
    graph = pytest.importorskip("brainsurgeon.graph")
    model = digits()
    g = graph.DependencyGraph(model, (X,))
    g.group(model.conv2, dim="out", idxs=[0, 2, 6, 9]).prune()
    g.group(model.fc1, dim="out", idxs=list(range(0, 64, 3))).prune()
    with torch.no_grad():
        ref = model(X)
    save(model, str(tmp_path / "ck"), history=g.history)
    man = read_manifest(str(tmp_path / "ck"))
    assert man["history"] == json.loads(json.dumps(g.history))
    assert man["modules"]["bn2"]["spec"]["num_features"] == 28 and man["modules"]["fc2"]["spec"]["in_features"] == 42
    again = load(str(tmp_path / "ck"), fresh).eval()
    with torch.no_grad():
        assert torch.equal(again(X), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_round_trip_lands_on_cuda(tmp_path):
    def mlp(hidden: int = 16) -> nn.Module:
        return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    model = mlp(6).cuda()  # the first layer is narrowed, so it is rebuilt on load
    x = torch.randn(3, 8, device="cuda")
    with torch.no_grad():
        ref = model(x)
    save(model, str(tmp_path / "ck"))
    again = load(str(tmp_path / "ck"), lambda: mlp().cuda())
    assert all(t.is_cuda for t in again.state_dict().values())
    with torch.no_grad():
        assert torch.equal(again(x), ref)


def test_views_of_one_buffer_are_stored_separately(tmp_path):
    class Views(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = torch.arange(10.0)
            self.register_buffer("a", base[:4])
            self.register_buffer("b", base[4:].view(2, 3).t())  # non-contiguous view of the same storage

    m = Views()
    save(m, str(tmp_path / "ck"))
    again = load(str(tmp_path / "ck"), Views)
    assert torch.equal(again.a, m.a) and torch.equal(again.b, m.b)
    assert read_manifest(str(tmp_path / "ck"))["aliases"] == {}
    assert m.a.untyped_storage().data_ptr() == m.b.untyped_storage().data_ptr()  # the caller's model untouched
