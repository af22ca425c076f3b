"""Compact-design transforms: exactness, data-aware <= weight-space output error, counts, round trips."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import brainsurgeon as bs
from brainsurgeon.calib import layer_columns
from brainsurgeon.errors import ConfigError
from brainsurgeon.lowrank import (
    DepthwiseSeparableConv2d,
    Separable,
    SpatialSeparableConv2d,
    fit_separable,
    transform_,
)
from brainsurgeon.lowrank.modules import Tucker2Conv2d
from brainsurgeon.lowrank.separable import (
    KINDS,
    dense_kernel,
    design_params,
    design_rank,
    init_weight_space,
    output_loss,
)
from brainsurgeon.prune.costs import measure

RANKS = {"spatial": 3, "depthwise": 2, "bottleneck": (5, 3)}


class ConvBN(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> fc: the layout the transforms must keep valid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def _model() -> ConvBN:
    torch.manual_seed(0)
    m = ConvBN()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _calib(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 3, 10, 10, generator=g)
    # correlated pixels (a smoothed field), so X X^T is far from the identity
    return [F.avg_pool2d(base + 0.1 * torch.randn(8, 3, 10, 10, generator=g), 3, 1, 1) for _ in range(n)]


def _hessian(conv: nn.Conv2d, xs: list[torch.Tensor]) -> torch.Tensor:
    X = torch.cat([layer_columns(conv, x) for x in xs]).double()  # (n, cols)
    return X.t() @ X / X.shape[0]


@pytest.mark.parametrize("kind", KINDS)
def test_already_separable_kernel_is_reconstructed_exactly(kind):
    torch.manual_seed(0)
    W = dense_kernel(kind, init_weight_space(torch.randn(16, 8, 3, 3), kind, RANKS[kind]), (16, 8, 3, 3))
    H = _hessian(nn.Conv2d(8, 16, 3, padding=1), [torch.randn(4, 8, 6, 6)])
    fit = fit_separable(W.float(), H, kind, RANKS[kind])
    assert fit.loss <= 1e-9 * fit.total
    rebuilt = dense_kernel(kind, fit.factors, W.shape)
    assert torch.allclose(rebuilt, W, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_data_aware_output_error_is_at_most_weight_space(kind):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    xs = [F.avg_pool2d(torch.randn(4, 8, 8, 8), 3, 1, 1) for _ in range(3)]
    H = _hessian(conv, xs)
    W = conv.weight.detach()
    aware = fit_separable(W, H, kind, RANKS[kind], sweeps=5)
    plain = fit_separable(W, None, kind, RANKS[kind])
    Wm = W.double().reshape(16, -1)
    plain_out = output_loss(Wm, dense_kernel(kind, plain.factors, W.shape).reshape(16, -1), H)
    assert aware.init_loss == pytest.approx(plain_out, rel=1e-9)  # ALS starts from the weight-space fit
    assert aware.loss <= plain_out
    assert aware.loss < 0.95 * plain_out  # and, on correlated inputs, clearly improves on it


@pytest.mark.parametrize("kind", KINDS)
def test_module_computes_the_fitted_kernel(kind):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=True)
    model = nn.Sequential(copy.deepcopy(conv))
    rep = transform_(model, Separable(kind=kind, ratio=0.5, data_aware=False))
    assert rep.rows[0].params < 6 * 10 * 9
    x = torch.randn(2, 6, 9, 9)
    new = model[0]
    ref = F.conv2d(x, new.dense_weight(), conv.bias, stride=2, padding=1)
    assert torch.allclose(new(x), ref, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_and_mac_counts_are_exact(kind):
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    model = nn.Sequential(conv)
    x = torch.randn(1, 8, 7, 7)
    rank = design_rank(kind, (16, 8, 3, 3), 0.4)
    transform_(model, Separable(kind=kind, ratio=0.4, data_aware=False))
    new = model[0]
    assert sum(p.numel() for p in new.parameters()) == design_params(kind, (16, 8, 3, 3), rank)
    assert design_params(kind, (16, 8, 3, 3), rank) <= 0.4 * 16 * 8 * 9
    # stride 1, same padding: every factor runs at the full 7x7 resolution, so MACs = weights * 49
    assert measure(model, x).total_macs == design_params(kind, (16, 8, 3, 3), rank) * 49


def test_transform_through_bn_model_with_sequential_calibration_and_save_load(tmp_path):
    model, calib = _model(), _calib()
    dense = copy.deepcopy(model)
    x = _calib(1)[0]
    rep = transform_(model, Separable(kind="depthwise", ratio=0.5), calib=calib)
    assert isinstance(model.conv1, DepthwiseSeparableConv2d) and isinstance(model.conv2, DepthwiseSeparableConv2d)
    assert isinstance(model.bn1, nn.BatchNorm2d)  # BN placement unchanged
    assert len(rep.rows) == 2 and all(0 <= r.rel_loss < 1 for r in rep.rows)
    with torch.no_grad():
        y = model(x)
    assert y.shape == dense(x).shape
    bs.save(model, str(tmp_path / "ck"))
    again = bs.load(str(tmp_path / "ck"), _model).eval()
    assert isinstance(again.conv2, DepthwiseSeparableConv2d)
    with torch.no_grad():
        assert torch.equal(again(x), y)


def test_data_aware_model_beats_weight_space_on_calibration_outputs():
    model, calib = _model(), _calib()
    dense = copy.deepcopy(model)
    errs = {}
    for aware in (False, True):
        m = copy.deepcopy(model)
        transform_(m, Separable(kind="spatial", ratio=0.4, data_aware=aware), calib=calib,
                   options=bs.CalibOptions(mode="dense"))
        with torch.no_grad():
            errs[aware] = sum(float(((dense(x) - m(x)) ** 2).sum()) for x in calib)
    assert errs[True] < errs[False]


def test_every_design_exports_to_onnx(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    for kind in KINDS:
        model = _model()
        transform_(model, Separable(kind=kind, ratio=0.5, data_aware=False))
        x = _calib(1)[0]
        path = str(tmp_path / f"{kind}.onnx")
        bs.export_onnx(model, x, path, dynamo=False)  # checks onnxruntime against torch itself
        sess = ort.InferenceSession(path)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(got), model(x), atol=1e-4)
    assert isinstance(model.conv1, Tucker2Conv2d)  # the last kind exported: bottleneck


def test_graph_still_prunes_a_transformed_model():
    model = _model()
    transform_(model, Separable(kind="spatial", ratio=0.5, data_aware=False))
    x = _calib(1)[0]
    bs.prune_(model, bs.ChannelPruning(ratio=0.25), example_inputs=x)
    assert isinstance(model.conv2, SpatialSeparableConv2d)
    assert model(x).shape == (8, 5)


def test_refusals_name_the_fix():
    with pytest.raises(ConfigError, match="kind"):
        Separable(kind="diagonal")
    with pytest.raises(ConfigError, match="ratio"):
        Separable(ratio=1.0)
    with pytest.raises(ConfigError, match="calib"):
        transform_(_model(), Separable(kind="depthwise"))
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1))
    with pytest.raises(ConfigError, match="groups=4"):
        transform_(model, Separable(data_aware=False))


def test_failure_leaves_the_model_untouched():
    model, calib = _model(), _calib()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [torch.randn(2, 5, 10, 10)]  # wrong channel count: calibration fails on conv1
    with pytest.raises(Exception):  # noqa: B017 - any calibration error; the point is the rollback
        transform_(model, Separable(kind="spatial"), calib=bad)
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.conv2, nn.Conv2d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert calib  # the good data is untouched too


def test_recipe_step_runs_transform():
    model, calib = _model(), _calib()
    recipe = bs.Recipe(steps=(bs.Step(Separable(kind="bottleneck", ratio=0.5)),))
    rep = bs.compress(model, recipe, calib=calib)
    assert isinstance(model.conv1, Tucker2Conv2d) and len(rep.rows) == 2


def test_following_batchnorm_is_found_by_tensor_identity_and_weights_the_fit():
    from brainsurgeon.lowrank.transform import following_batchnorm

    model, calib = _model(), _calib()
    scales = following_batchnorm(model, ["conv1", "conv2"], calib)
    bn = model.bn2
    assert torch.allclose(scales["conv2"], bn.weight / (bn.running_var + bn.eps).sqrt())
    assert scales["conv1"].shape == (12,)
    conv = model.conv2
    H = _hessian(conv, [torch.randn(4, 12, 6, 6)])
    s = torch.linspace(0.1, 3.0, 16)
    fit = fit_separable(conv.weight, H, "depthwise", 2, row_scale=s)
    W_hat = dense_kernel("depthwise", fit.factors, conv.weight.shape).reshape(16, -1)
    Ws = conv.weight.detach().double().reshape(16, -1) * s.double()[:, None]
    assert output_loss(Ws, W_hat * s.double()[:, None], H) == pytest.approx(fit.loss, rel=1e-9)


def test_separable_entries_report_real_costs_and_data_aware_losses():
    from brainsurgeon.lowrank import separable_entries

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    H = _hessian(conv, [F.avg_pool2d(torch.randn(4, 8, 8, 8), 3, 1, 1)])
    aware = separable_entries(conv, H, input_hw=(6, 6), ratios=(0.5, 0.25))
    plain = separable_entries(conv, H, input_hw=(6, 6), ratios=(0.5, 0.25), data_aware=False)
    assert [(e.kind, e.ratio) for e in aware] == [(k, r) for k in KINDS for r in (0.5, 0.25)]
    for a, p in zip(aware, plain, strict=True):
        assert a.params == p.params == design_params(a.kind, (16, 8, 3, 3), a.rank) <= a.ratio * 16 * 8 * 9
        assert a.macs == a.params * 36  # stride 1, same padding: every factor runs at 6 x 6
        assert a.loss <= p.loss + 1e-12
