"""QAT: fake-quant reproduces the PTQ model, STE/LSQ gradients, conversion back onto the grid."""

import copy

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.errors import CalibrationError, ConfigError
from brainsurgeon.quant.fakequant import FakeQuantConv2d, FakeQuantLinear, fake_quantize
from brainsurgeon.quant.grid import fit_grid
from brainsurgeon.quant.qat import QAT, convert_qat_, fake_quant_layers, infer_grid, prepare_qat_, quantized_state


class ConvNet(nn.Module):
    """Conv (grouped too) + linear layers: every layer type QAT swaps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.fc1 = nn.Linear(8 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def net():
    torch.manual_seed(0)
    return ConvNet().eval()


def calib(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 1, 6, 6, generator=g) for _ in range(n)]


X = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(2))

PTQ = [bs.RTN(bits=4), bs.GPTQ(bits=3), bs.OBQ(bits=4), bs.GPTQ(bits=4, group_size=16),
       bs.RTN(bits=3, sym=False), bs.GPTQ(bits=2, sym=False, group_size=24)]


@pytest.mark.parametrize("ptq", PTQ, ids=lambda c: c.describe())
def test_fake_quant_forward_equals_quantized_forward(ptq):
    m = net()
    bs.quantize_(m, ptq, calib())
    ref = m(X)
    inits = prepare_qat_(m, QAT(bits=ptq.bits, sym=ptq.sym, group_size=ptq.group_size, init="grid"))
    assert set(inits) == {"conv1", "conv2", "fc1", "fc2"} and set(inits.values()) == {"grid"}
    assert isinstance(m.conv2, FakeQuantConv2d) and isinstance(m.fc1, FakeQuantLinear)
    torch.testing.assert_close(m(X), ref, rtol=1e-5, atol=1e-6)
    for fq in fake_quant_layers(m).values():  # the recovered grid quantizes the weights to themselves
        torch.testing.assert_close(fq.quantized_weight(), fq.weight, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits,sym,gs", [(4, True, 0), (2, True, 0), (3, False, 0), (8, True, 32)])
def test_infer_grid_recovers_fit_grid(bits, sym, gs):
    W = torch.randn(24, 96, generator=torch.Generator().manual_seed(bits))
    W[3] = 0  # a dead row
    g = fit_grid(W, bits, sym, gs)
    Wq = g.quantize(W)
    h = infer_grid(Wq, bits, sym, gs)
    assert h is not None and h.scale.shape == g.scale.shape
    torch.testing.assert_close(h.quantize(Wq), Wq, rtol=0, atol=1e-6)
    live = Wq.abs().amax(1) > 0
    torch.testing.assert_close(h.scale[live], g.scale[live], rtol=1e-5, atol=0)  # the same step
    assert infer_grid(W, bits, sym, gs) is None  # float weights are on no grid


def test_ste_gradient_passes_inside_clip_range_only():
    s, z, maxq = torch.tensor(0.5), torch.tensor(8.0), 15  # representable range [-4.0, 3.5]
    x = torch.tensor([-5.0, -4.0, -1.3, 0.0, 2.2, 3.5, 3.6, 9.0], requires_grad=True)
    y = fake_quantize(x, s, z, maxq)
    torch.testing.assert_close(y.detach(), torch.tensor([-4.0, -4.0, -1.5, 0.0, 2.0, 3.5, 3.5, 3.5]))
    y.backward(torch.ones_like(y))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_lsq_scale_gradient_matches_formula():
    s = torch.tensor([0.5], requires_grad=True)
    z, maxq = torch.tensor([8.0]), 15
    x = torch.tensor([-5.0, -1.3, 0.2, 2.2, 9.0])
    fake_quantize(x, s, z, maxq).sum().backward()
    v = x / 0.5
    inside = (v >= -8) & (v <= 7)
    expected = torch.where(inside, v.round() - v, torch.clamp(v.round() + 8, 0, 15) - 8).sum()
    torch.testing.assert_close(s.grad, expected.reshape(1))
    s.grad = None
    fake_quantize(x, s, z, maxq, grad_scale=0.1).sum().backward()
    torch.testing.assert_close(s.grad, 0.1 * expected.reshape(1))


def test_convert_puts_weights_exactly_on_grid_and_keeps_forward():
    m = net()
    prepare_qat_(m, QAT(bits=3, init="fit"))
    with torch.no_grad():  # training moves the latent weights off the grid
        for fq in fake_quant_layers(m).values():
            fq.weight.add_(0.01 * torch.randn_like(fq.weight))
    ref = m(X)
    codes, scale, zero = quantized_state(m.fc1)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7
    names = convert_qat_(m)
    assert names == ["conv1", "conv2", "fc1", "fc2"] and not fake_quant_layers(m)
    assert type(m.conv2) is nn.Conv2d and m.conv2.groups == 2 and type(m.fc1) is nn.Linear
    torch.testing.assert_close(m(X), ref, rtol=0, atol=0)
    assert torch.equal(m.fc1.weight, scale * (codes.float() - zero))  # float weights = s (q - z)
    assert max(r.unique().numel() for r in m.fc1.weight) <= 8
    assert "w_scale" not in "".join(m.state_dict())


def test_learnable_scales_are_parameters_and_train():
    m = net()
    prepare_qat_(m, QAT(bits=4, learn_scale=True))
    assert "fc1.w_scale" in dict(m.named_parameters())
    m(X).square().mean().backward()
    assert m.fc1.w_scale.grad is not None and m.fc1.w_scale.grad.abs().sum() > 0


def test_activation_quantization_uses_calibrated_ranges():
    m = net()
    ref = m(X)
    with pytest.raises(ConfigError, match="needs calibration batches"):
        prepare_qat_(copy.deepcopy(m), QAT(bits=8, act_bits=8))
    prepare_qat_(m, QAT(bits=8, act_bits=8), calib=calib())
    assert all(not fq._forward_pre_hooks for fq in fake_quant_layers(m).values())  # observers removed
    assert m.conv1.a_scale.item() > 0 and m.fc2.a_zero.item() == 0  # fc2's input is post-ReLU
    out = m(X)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # 8/8-bit stays close


def test_prepare_restores_model_on_failure():
    m = net()
    m.fc2 = nn.Sequential(nn.Linear(32, 10))  # fine
    m.unused = nn.Linear(4, 4)  # never reached by the forward: no activation range
    before = {n: type(mod) for n, mod in m.named_modules()}
    with pytest.raises(CalibrationError, match="unused"):
        prepare_qat_(m, QAT(bits=4, act_bits=8), calib=calib())
    assert {n: type(mod) for n, mod in m.named_modules()} == before


def test_init_grid_rejects_float_weights_with_fix():
    with pytest.raises(ConfigError, match=r"quantize it first.*init='auto'"):
        prepare_qat_(net(), QAT(bits=4, init="grid"))
    m = net()
    assert set(prepare_qat_(m, QAT(bits=4)).values()) == {"fit"}  # auto falls back to a fitted grid


def test_init_existing_leaves_layers_off_the_grid_float():
    m = net()
    bs.quantize_(m, bs.RTN(bits=4), calib(), ignore=("conv1",))
    assert prepare_qat_(m, QAT(bits=4, init="existing")) == {"conv2": "grid", "fc1": "grid", "fc2": "grid"}
    assert type(m.conv1) is nn.Conv2d
    with pytest.raises(ConfigError, match="no layer .* is on a 4-bit grid"):
        prepare_qat_(net(), QAT(bits=4, init="existing"))


@pytest.mark.parametrize("kw,match", [({"bits": 1}, "bits"), ({"act_bits": 1}, "act_bits"),
                                      ({"init": "x"}, "init"), ({"group_size": -1}, "group_size")])
def test_qat_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        QAT(**kw)


@pytest.mark.parametrize("bits,gs", [(4, 0), (3, 0), (8, 0), (4, 32)])
def test_fake_quant_forward_equals_packed_forward(bits, gs):
    pytest.importorskip("brainsurgeon.quant.packed")
    from brainsurgeon.quant.packed import Int4WeightOnlyLinear, Int8WeightOnlyLinear
    from brainsurgeon.quant.packed_conv import PackedConv2d

    m = net()
    # convs have 9 and 36 columns, which groups of 32 do not tile: with groups only the Linears
    prepare_qat_(m, QAT(bits=bits, group_size=gs, learn_scale=True), ignore=("conv1", "conv2") if gs else ())
    with torch.no_grad():
        for fq in fake_quant_layers(m).values():
            fq.weight.add_(0.02 * torch.randn_like(fq.weight))  # off the grid, as after training
            fq.w_scale.mul_(1.1)  # a learned scale
    ref = m(X)
    exact = copy.deepcopy(m)
    convert_qat_(exact, packed=True, compute_dtype="float32")
    fc1 = Int4WeightOnlyLinear if bits <= 4 else Int8WeightOnlyLinear
    assert type(exact.fc1) is fc1 and type(exact.fc2) is Int8WeightOnlyLinear  # fc2 (32 -> 10): no int4 kernel
    if not gs:
        assert type(exact.conv1) is PackedConv2d and type(exact.conv2) is PackedConv2d
    torch.testing.assert_close(exact(X), ref, rtol=1e-4, atol=1e-5)
    fast = copy.deepcopy(m)
    convert_qat_(fast, packed=True)  # bfloat16 activations: the kernels' fast path
    rel = ((fast(X) - ref).norm() / ref.norm()).item()
    assert rel < 0.03, rel  # bfloat16 has 8 mantissa bits
