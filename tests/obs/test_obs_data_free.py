"""Data-free configs (RTN, Magnitude) run without calibration data and without a forward pass."""

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.api import _levels
from brainsurgeon.errors import ConfigError
from brainsurgeon.obs import compress_weight, is_data_free
from brainsurgeon.obs.baselines import grid_levels, magnitude, rtn


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("cfg", [bs.RTN(bits=4, group_size=16), bs.RTN(bits=3, mse=False), bs.Magnitude(sparsity=0.5),
                                 bs.Magnitude(pattern="2:4")])
def test_data_free_verbs_need_no_calib_and_run_no_forward(cfg):
    model, ref = net(), net()
    calls = []
    for m in model.modules():
        m.register_forward_pre_hook(lambda m, a: calls.append(m))
    verb = bs.quantize_ if cfg.verb == "quantize" else bs.sparsify_
    rep = verb(model, cfg)
    assert calls == [] and is_data_free(cfg)
    assert any("data-free" in n for n in rep.notes)
    for i in (0, 3):
        W = ref[i].weight.detach().reshape(ref[i].weight.shape[0], -1)  # data-free: the weight's precision
        perm = torch.arange(W.shape[1]) if i == 3 else torch.arange(36).reshape(4, 9).t().flatten()
        want = rtn(W, cfg) if cfg.verb == "quantize" else magnitude(W, cfg, perm)
        torch.testing.assert_close(model[i].weight.detach().reshape(W.shape), want, rtol=0, atol=1e-6)
    row = rep.rows[-1]
    D = model[3].weight.detach().double() - ref[3].weight.detach().double()
    assert row.loss == pytest.approx(float(D.pow(2).sum()), rel=1e-6)  # weight-space loss without H


def test_methods_that_need_data_refuse_calib_none_with_the_fix():
    for verb, cfg in ((bs.quantize_, bs.GPTQ(bits=4)), (bs.sparsify_, bs.SparseGPT(sparsity=0.5))):
        model = net()
        before = [p.clone() for p in model.parameters()]
        with pytest.raises(ConfigError, match="need.*calibration data: pass calib="):
            verb(model, cfg)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ConfigError, match="needs the layer's Hessian"):
        compress_weight(torch.randn(4, 8), None, bs.GPTQ(bits=4))


@pytest.mark.parametrize("group_size", [0, 16, 24])
def test_linear_time_levels_equal_the_sorting_count(group_size):
    W = torch.randn(12, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for cfg in (bs.RTN(bits=3, group_size=group_size), bs.GPTQ(bits=3, group_size=group_size)):
        H = torch.eye(48, dtype=torch.float64)
        res = compress_weight(W, H, cfg)
        assert res.info["levels"] == _levels(res.weight, group_size) <= 8
    codes = torch.tensor([[0, 0, 1, 1], [2, 3, 4, 4]])
    assert grid_levels(codes, 7, 2) == 2 and grid_levels(codes, 7, 0) == 3


@pytest.mark.parametrize("maxq", [1, 15, 31, 63, 255])  # int32 bits, int64 bits, bincount
@pytest.mark.parametrize("cols,group_size", [(64, 0), (70, 16), (33, 7), (5, 64)])
def test_grid_levels_counts_distinct_codes_per_group(maxq, cols, group_size):
    g = torch.Generator().manual_seed(maxq + cols)
    for hi in (maxq, min(2, maxq), 0):
        codes = torch.randint(0, hi + 1, (6, cols), generator=g).float()
        step = group_size if 0 < group_size < cols else cols
        want = max(len(set(codes[r, j:j + step].tolist())) for r in range(6) for j in range(0, cols, step))
        assert grid_levels(codes, maxq, group_size) == want


def test_count_nonzero_on_bits_counts_negative_zero_as_zero():
    from brainsurgeon.obs.engine import count_nonzero

    t = torch.tensor([[0.0, -0.0, 1.0], [-2.0, 1e-45, -1e-45]])
    assert count_nonzero(t) == 4 == count_nonzero(t.double()) == count_nonzero(t.t())  # bits, float64, strided
    W = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    res = compress_weight(W, None, bs.Magnitude(sparsity=0.5))  # W * mask: negative weights become -0.0
    assert res.info["nonzeros"] == int((res.weight != 0).sum()) == 64 * 48 // 2
