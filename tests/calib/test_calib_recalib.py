"""calib.recalib: BatchNorm re-estimation and per-channel mean/std correction."""

import copy

import pytest
import torch
from torch import nn

from brainsurgeon.calib import correct_mean_std_, reestimate_batchnorm_
from brainsurgeon.errors import CalibrationError


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=0.3)
        self.drop = nn.Dropout(0.9)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def test_bn_reestimation_restores_batch_statistics():
    torch.manual_seed(0)
    model = ConvBN().eval()
    batches = [torch.randn(8, 3, 5, 5) + 1.0 for _ in range(2)]
    with torch.no_grad():
        feats = [model.conv(x) for x in batches]
    model.bn.running_mean.fill_(5.0)
    model.bn.running_var.fill_(0.01)
    assert reestimate_batchnorm_(model, batches) == 1
    mean = torch.cat(feats).mean((0, 2, 3))  # equal-size batches: mean of batch means
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.bn.running_var, var, atol=1e-5, rtol=1e-5)
    assert model.bn.momentum == 0.3 and not model.training and not model.bn.training
    assert int(model.bn.num_batches_tracked) == 2


def test_bn_reestimation_without_batchnorm_and_on_error():
    assert reestimate_batchnorm_(nn.Linear(3, 3), [torch.randn(2, 3)]) == 0
    model = ConvBN().train()
    before = model.bn.running_mean.clone()
    with pytest.raises(CalibrationError, match="unsupported type"):
        reestimate_batchnorm_(model, [torch.randn(2, 3, 5, 5), "oops"])
    torch.testing.assert_close(model.bn.running_mean, before)  # old statistics back on failure
    assert model.training and model.bn.momentum == 0.3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 6, 3, groups=2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


def _outputs(model, names, x):
    outs = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, y, n=n: outs.__setitem__(n, y)) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outs


def _channel_stats(y):
    y = y.movedim(1, -1) if y.dim() > 2 else y
    y = y.reshape(-1, y.shape[-1]).double()
    return y.mean(0), y.std(0, unbiased=False)


@pytest.mark.parametrize("damage", ["prune_half", "shrink"])
def test_mean_std_correction_matches_dense_channel_stats(damage):
    torch.manual_seed(0)
    dense = Net()
    comp = copy.deepcopy(dense)
    with torch.no_grad():  # a crude "compression" of every layer
        for m in (comp.conv1, comp.conv2, comp.fc):
            w = m.weight
            w.mul_((torch.rand_like(w) > 0.5).float() * 0.8 if damage == "prune_half" else 0.7)
    names = ["conv1", "conv2", "fc"]
    calib = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    shifts = correct_mean_std_(comp, dense, names, calib)
    assert set(shifts) == set(names) and all(v >= 0 for v in shifts.values())
    assert comp.conv1.bias is not None and comp.conv1.bias.shape == (6,)  # created
    x = torch.cat(calib)
    got, want = _outputs(comp, names, x), _outputs(dense, names, x)
    for n in names:
        mc, sc = _channel_stats(got[n])
        md, sd = _channel_stats(want[n])
        torch.testing.assert_close(mc, md, atol=1e-4, rtol=0)
        if damage == "shrink":  # std ratio 1/0.7 is inside the [0.5, 2] clamp: stds match too
            torch.testing.assert_close(sc, sd, atol=1e-4, rtol=1e-4)


def test_mean_std_correction_leaves_no_hooks_and_restores_modes():
    dense, comp = Net().train(), Net().train()
    correct_mean_std_(comp, dense, ["fc"], [torch.randn(2, 3, 6, 6)])
    for m in (dense, comp):
        assert m.training and all(not x._forward_hooks and not x._forward_pre_hooks for x in m.modules())


def _noisy_input(module, args):
    """A 'compression' that adds input noise independent of the signal (as activation quantization does)."""
    g = module.noise_gen
    return (args[0] + 0.5 * torch.randn(args[0].shape, generator=g),)


def _slope(c, d):
    """Least-squares slope of c on d per channel (rows: samples)."""
    c, d = c - c.mean(0), d - d.mean(0)
    return (c * d).sum(0) / (d * d).sum(0)


@pytest.mark.parametrize("std", ["match", "none"])
def test_std_matching_shrinks_a_noisy_layer_and_mean_only_leaves_it(std):
    """Why std matching hurts quantized models: independent input noise (as activation quantization adds)
    inflates std_c, and matching it shrinks the layer's signal by std_d / std_c; std='none' leaves W."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        dense[0].bias.fill_(0.3)
    comp = copy.deepcopy(dense)
    comp[0].noise_gen = torch.Generator().manual_seed(1)
    comp[0].register_forward_pre_hook(_noisy_input)
    calib = [torch.randn(512, 8) for _ in range(8)]
    w0 = comp[0].weight.detach().clone()
    correct_mean_std_(comp, dense, ["0"], calib, std=std)
    ratio = (comp[0].weight / w0)[:, 0]
    x = torch.randn(4096, 8)
    with torch.no_grad():
        slope = _slope(comp(x), dense(x))
    if std == "match":  # the old behaviour: rows shrunk, the signal attenuated
        assert (ratio < 0.95).all() and (slope < 0.95).all()
    else:
        torch.testing.assert_close(ratio, torch.ones(4), atol=0.03, rtol=0)
        torch.testing.assert_close(slope, torch.ones(4), atol=0.05, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(comp(x).mean(0), dense(x).mean(0), atol=0.08, rtol=0)


def test_correction_std_mode_is_validated():
    with pytest.raises(ValueError, match="std must be one of"):
        correct_mean_std_(nn.Linear(2, 2), nn.Linear(2, 2), ["weight"], [torch.randn(2, 2)], std="var")


@pytest.mark.parametrize("std", ["match", "none"])
def test_correction_of_an_activation_quantized_model_matches_means_and_lowers_the_output_error(std):
    """W4A4 fake-quantized MLP (ActQuant layers): after the correction on `calib`, every corrected layer's
    channel means equal the dense ones there, and the final output is closer to the dense model's."""
    import brainsurgeon as bs
    from brainsurgeon.quant.act import act_quant_layers

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(256, 8, generator=g) + 0.5 for _ in range(4)]
    comp = copy.deepcopy(dense)
    bs.quantize_(comp, bs.ActQuant(bits=4), calib)
    bs.quantize_(comp, bs.RTN(bits=4, sym=True, mse=False))
    names = list(act_quant_layers(comp))
    assert names == ["0", "2", "4"]
    x = torch.cat(calib)
    with torch.no_grad():
        err0 = (comp(x) - dense(x)).pow(2).mean()
    correct_mean_std_(comp, dense, names, calib, std=std)
    got, want = _outputs(comp, names, x), _outputs(dense, names, x)
    for n in names:
        torch.testing.assert_close(got[n].mean(0), want[n].mean(0), atol=1e-4, rtol=0)
    with torch.no_grad():
        err1 = (comp(x) - dense(x)).pow(2).mean()
    assert err1 < err0, (err0, err1)  # 5.6e-4 -> 5.1e-4 (none), 5.0e-4 (match)


def test_bias_correction_removes_each_layers_own_mean_error_only():
    """correct_bias_ (Nagel et al. 2019): a layer with its own weight error gets the mean of that error off
    its bias; a layer that is exact but receives an upstream error is left alone (correct_mean_std_ would
    compensate the upstream error there, before the ReLU)."""
    import brainsurgeon as bs
    from brainsurgeon.calib import correct_bias_

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    comp = copy.deepcopy(dense)
    with torch.no_grad():
        comp[0].weight.add_(0.05)  # layer 0: its own (mean-shifting) error; layer 2 exact
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(128, 8, generator=g) + 1.0 for _ in range(2)]
    bs.quantize_(comp, bs.ActQuant(bits=8), calib)  # ActQuant layers: the hooks must read the raw inputs
    w2, b2 = comp[2].weight.detach().clone(), comp[2].bias.detach().clone()
    x = torch.cat(calib)
    with torch.no_grad():
        own = (comp[0](x) - dense[0](x)).mean(0)  # comp[0] quantizes x itself: layer 0's own error
    shifts = correct_bias_(comp, dense, ["0", "2"], calib)
    assert set(shifts) == {"0", "2"} and shifts["0"] > 10 * shifts["2"]
    with torch.no_grad():
        torch.testing.assert_close((comp[0](x) - dense[0](x)).mean(0), torch.zeros(16), atol=1e-5, rtol=0)
        assert own.abs().mean() > 0.05
        h = comp[1](comp[0](x))  # the (corrected) compressed input of layer 2
        torch.testing.assert_close(comp[2].weight, w2)
        # layer 2's own error is only its 8-bit input quantization: a bias change far below the upstream
        # error at its output, which correct_mean_std_ would have moved into its bias
        upstream = (dense[2](h) - dense[2](dense[1](dense[0](x)))).mean(0)
        assert (comp[2].bias - b2).abs().max() < 0.1 * upstream.abs().max()
        # one pass: layer 2's statistics saw layer 0 before its correction, hence not 1e-5
        torch.testing.assert_close((comp[2](h) - dense[2](h)).mean(0), torch.zeros(4), atol=1e-3, rtol=0)
    for m in (comp, dense):
        assert all(not x._forward_hooks and not x._forward_pre_hooks or hasattr(x, "input_quantizer")
                   for x in m.modules())
