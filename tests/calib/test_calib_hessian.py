"""calib.hessian: columns reproduce the layer, H = 2 X^T X / n, clear errors, no hooks left."""

import warnings

import pytest
import torch
from torch import nn

from brainsurgeon.calib import (
    HessianAccumulator,
    capture_hessians,
    layer_columns,
    num_groups,
    set_weight_matrix_,
    supported,
    weight_matrix,
)
from brainsurgeon.errors import CalibrationError, ConfigError, UnsupportedModuleError


class Conv1D(nn.Module):
    """Stand-in for transformers.pytorch_utils.Conv1D: weight stored as (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def _no_bias_output(layer, x):
    with torch.no_grad():
        y = layer(x)
        if layer.bias is not None and isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            y = y - layer.bias.reshape(-1, *([1] * (y.dim() - 2)))  # (out,) -> (out, 1[, 1])
        elif layer.bias is not None:
            y = y - layer.bias
    return y


def test_linear_hessian_matches_hand_computation():
    torch.manual_seed(0)
    fc = nn.Linear(5, 3)
    x = torch.randn(2, 7, 5)
    with capture_hessians(nn.Sequential(fc), ["0"]) as hs:
        fc(x)
    X = x.reshape(-1, 5).double()
    torch.testing.assert_close(hs["0"].H, 2 * X.T @ X / 14, atol=1e-10, rtol=0)
    assert hs["0"].n == 14 and hs["0"].H.dtype == torch.float64


def test_linear_and_hf_conv1d_columns_reproduce_output():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6)
    for layer in (nn.Linear(6, 5), Conv1D(5, 6)):
        assert supported(layer)
        y = _no_bias_output(layer, x).reshape(-1, 5)
        torch.testing.assert_close(layer_columns(layer, x) @ weight_matrix(layer).T, y)


CONVS = {
    "stride2_pad1_dil2_groups2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
    "reflect": lambda: nn.Conv2d(3, 5, (3, 2), padding=(1, 2), padding_mode="reflect"),
    "circular": lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular", bias=False),
    "same_even_kernel": lambda: nn.Conv2d(3, 4, (4, 3), padding="same", dilation=(1, 2)),
    "depthwise": lambda: nn.Conv2d(4, 8, 3, groups=4),
    "conv1d_groups2": lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
    "conv1d_reflect": lambda: nn.Conv1d(3, 5, 3, padding=1, padding_mode="reflect"),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_unfold_columns_reproduce_conv(name):
    torch.manual_seed(0)
    conv = CONVS[name]()
    spatial = (9, 11) if isinstance(conv, nn.Conv2d) else (13,)
    x = torch.randn(2, conv.in_channels, *spatial)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 'same' with an even kernel pads a copy
        y = _no_bias_output(conv, x)
    n, out = y.shape[:2]
    y = y.reshape(n, out, -1).permute(1, 0, 2).reshape(out, -1)  # (out, N*L)
    W = weight_matrix(conv)
    cols = layer_columns(conv, x)
    g = num_groups(conv)
    assert W.shape == (out, conv.weight[0].numel())
    if g == 1:
        torch.testing.assert_close(W @ cols.T, y, atol=1e-5, rtol=1e-5)
    else:
        og = out // g
        assert cols.shape == (g, y.shape[1], W.shape[1])
        for j in range(g):
            torch.testing.assert_close(W[j * og:(j + 1) * og] @ cols[j].T, y[j * og:(j + 1) * og],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [nn.Linear(4, 3), nn.Conv2d(4, 6, 3, groups=2), Conv1D(3, 4)])
def test_set_weight_matrix_is_the_inverse(layer):
    W = weight_matrix(layer).clone()
    set_weight_matrix_(layer, W * 2)
    torch.testing.assert_close(weight_matrix(layer), W * 2)
    with pytest.raises(ConfigError, match="must have shape"):
        set_weight_matrix_(layer, W.T)


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 3), lambda: nn.Conv2d(4, 6, 3, groups=2)])
def test_streaming_equals_one_big_batch(make):
    torch.manual_seed(0)
    layer = make()
    xs = [torch.randn(b, 6) if isinstance(layer, nn.Linear) else torch.randn(b, 4, 5, 5) for b in (2, 5, 3)]
    stream, big = HessianAccumulator("l", layer), HessianAccumulator("l", layer)
    for x in xs:
        stream.add_input(x)
    big.add_input(torch.cat(xs))
    assert stream.n == big.n
    torch.testing.assert_close(stream.H, big.H, atol=1e-12, rtol=1e-10)
    if num_groups(layer) > 1:
        assert stream.H.shape == (2, 18, 18)


def test_float32_option():
    acc = HessianAccumulator("fc", nn.Linear(3, 2), dtype="float32")
    acc.add_input(torch.randn(4, 3))
    assert acc.H.dtype == torch.float32


def test_non_finite_input_names_the_layer():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    x = torch.randn(2, 3)
    x[0, 1] = float("nan")
    with pytest.raises(CalibrationError, match="layer '0' received non-finite activations"):
        with capture_hessians(model, ["0"]):
            model(x)
    assert not model[0]._forward_pre_hooks


def test_shape_mismatch_names_the_layer():
    acc = HessianAccumulator("fc", nn.Linear(3, 2))
    with pytest.raises(CalibrationError, match="'fc'.*3 features"):
        acc.add_input(torch.randn(2, 4))
    with pytest.raises(CalibrationError, match="'fc': input columns of shape"):
        acc.add(torch.randn(2, 4))


def test_unreached_layer_raises_with_ignore_hint_and_hooks_are_removed():
    model = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    with capture_hessians(model, ["a", "b"]) as hs:
        model["a"](torch.randn(2, 3))
    assert hs["a"].n == 2
    with pytest.raises(CalibrationError, match=r"layer 'b' was never reached.*ignore=\['b'\]"):
        _ = hs["b"].H
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_unknown_and_unsupported_layers():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(ConfigError, match="no module named 'fc'"):
        with capture_hessians(model, ["fc"]):
            pass
    with pytest.raises(UnsupportedModuleError, match="LayerNorm.*ignore"):
        with capture_hessians(model, ["1"]):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_accumulate_on_the_module_device():
    fc = nn.Linear(8, 4).cuda()
    x = torch.randn(16, 8, device="cuda")
    with capture_hessians(nn.Sequential(fc), ["0"]) as hs:
        fc(x)
    assert hs["0"].H.device.type == "cuda"
    X = x.double()
    torch.testing.assert_close(hs["0"].H, 2 * X.T @ X / 16, atol=1e-10, rtol=1e-8)


def test_hessian_memory_is_estimated_up_front_with_fallback_and_refusal():
    from brainsurgeon.calib.hessian import check_hessian_memory, hessian_bytes

    big = nn.Conv2d(128, 8, 8)  # 8,192 columns: 512 MiB in float64, 256 MiB in float32
    assert hessian_bytes(big, torch.float64) == 8192**2 * 8
    dtype, notes = check_hessian_memory({"conv": big}, torch.float64, False, limit=300 * 2**20)
    assert dtype == torch.float32 and "'conv'" in notes[0] and "float32" in notes[0]
    with pytest.raises(CalibrationError, match=r"layer 'conv'.*GiB even in float32.*ignore=\['conv'\]"):
        check_hessian_memory({"conv": big}, torch.float32, False, limit=100 * 2**20)
    small = {"fc": nn.Linear(16, 4)}
    assert check_hessian_memory(small, torch.float64, True) == (torch.float64, [])
    from brainsurgeon.calib import run_layerwise
    from brainsurgeon.config import CalibOptions

    calls = []
    model = nn.Sequential(nn.Conv2d(1024, 1, 8))  # 65,536 columns: 16 GiB in float32
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(CalibrationError, match=r"layer '0'.*16.0 GiB even in float32"):
        run_layerwise(model, ["0"], [torch.randn(1, 1024, 8, 8)], lambda *a: None, CalibOptions())
    assert calls == []  # refused before any forward
