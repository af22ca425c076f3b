"""Activation quantization: observers against hand-computed scales, the insertion verb, H from X_q."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.calib import HessianAccumulator
from brainsurgeon.errors import CalibrationError, ConfigError
from brainsurgeon.quant.act import (
    ActQuantConv2d,
    ActQuantLinear,
    Observer,
    act_quant_layers,
    learn_act_scales_,
    remove_act_quant_,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _calib(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, generator=g) for _ in range(n)]


def test_minmax_asym_and_sym_by_hand():
    x = torch.tensor([[-1.0, 0.5, 3.0]])
    s, z = _params(bs.ActQuant(bits=8), x)
    assert s.item() == pytest.approx(4 / 255) and z.item() == round(1 / (4 / 255)) == 64
    s, z = _params(bs.ActQuant(bits=8, sym=True), x)
    assert s.item() == pytest.approx(6 / 255) and z.item() == 128
    s, z = _params(bs.ActQuant(bits=4), torch.tensor([[1.0, 2.0]]))  # 0 is always on the grid
    assert s.item() == pytest.approx(2 / 15) and z.item() == 0


def _params(cfg: bs.ActQuant, *batches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    obs = Observer(cfg)
    for b in batches:
        obs.update(b)
    return obs.params()


def test_minmax_over_batches_and_ema_by_hand():
    a, b = torch.tensor([[-2.0, 1.0]]), torch.tensor([[-1.0, 5.0]])
    s, _ = _params(bs.ActQuant(bits=8), a, b)
    assert s.item() == pytest.approx(7 / 255)  # [-2, 5]
    s, z = _params(bs.ActQuant(bits=8, observer="ema", ema_decay=0.75), a, b)
    lo, hi = 0.75 * -2 + 0.25 * -1, 0.75 * 1 + 0.25 * 5
    assert s.item() == pytest.approx((hi - lo) / 255)
    assert z.item() == round(-lo / ((hi - lo) / 255))


def test_percentile_is_the_mean_of_batch_percentiles():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 1000, generator=g), torch.randn(1, 1000, generator=g) * 2
    cfg = bs.ActQuant(bits=8, observer="percentile", percentile=99.0)
    s, _ = _params(cfg, a, b)
    lo = (torch.quantile(a, 0.01) + torch.quantile(b, 0.01)) / 2
    hi = (torch.quantile(a, 0.99) + torch.quantile(b, 0.99)) / 2
    assert s.item() == pytest.approx(((hi - lo) / 255).item(), rel=1e-5)


def test_mse_clips_an_outlier_and_lowers_the_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4000, generator=g)
    x[0, 0] = 40.0  # one outlier
    s_mm, z_mm = _params(bs.ActQuant(bits=4), x)
    s_mse, z_mse = _params(bs.ActQuant(bits=4, observer="mse"), x)
    assert s_mse.item() < s_mm.item()

    def err(s, z):
        q = torch.clamp(torch.round(x / s) + z, 0, 15)
        return float(((s * (q - z) - x) ** 2).sum())

    assert err(s_mse, z_mse) < err(s_mm, z_mm)


def test_channel_observer_on_conv_input_by_hand():
    conv = nn.Conv2d(2, 3, 1)
    model = nn.Sequential(conv)
    x = torch.zeros(2, 2, 3, 3)
    x[:, 0] = torch.linspace(-1, 1, 9).view(3, 3)
    x[:, 1] = torch.linspace(0, 4, 9).view(3, 3)
    bs.quantize_(model, bs.ActQuant(bits=8, granularity="channel"), calib=[x])
    q = model[0].input_quantizer
    assert isinstance(model[0], ActQuantConv2d)
    assert torch.allclose(q.scale, torch.tensor([2 / 255, 4 / 255]))
    assert q.zero.tolist() == [torch.round(1 / torch.tensor(2 / 255)).item(), 0.0]  # float32 arithmetic


def test_dynamic_token_quantizes_each_row_on_its_own_range():
    model = _mlp()
    bs.quantize_(model, bs.ActQuant(bits=8, granularity="token", sym=True), calib=_calib())
    x = torch.tensor([[0.01] * 8, [100.0] * 8])
    xq = model[0].input_quantizer(x)
    assert torch.allclose(xq, x, rtol=1e-2)  # a small row is not crushed by a large one


def test_hessian_is_built_from_the_quantized_inputs(monkeypatch):
    """The recipe [GPTQ 4-bit, ActQuant 4-bit]: the activation step runs first, GPTQ's H = 2 X_q X_q^T / n."""
    import brainsurgeon.api as api

    seen: dict[str, torch.Tensor] = {}
    real = api.compress_weight

    def spy(W, H, cfg, name):
        seen[name] = H.clone()
        return real(W, H, cfg, name)

    monkeypatch.setattr(api, "compress_weight", spy)
    model, calib = _mlp(), _calib()
    dense = _mlp()
    recipe = bs.Recipe((bs.Step(bs.GPTQ(bits=4, shrink=0.0)), bs.Step(bs.ActQuant(bits=4))),
                       bs.CalibOptions(mode="dense"))
    rep = bs.compress(model, recipe, calib)
    assert any("Hessians are built from the quantized inputs" in n for n in rep.notes)
    q = model[0].input_quantizer
    acc_q, acc_f = HessianAccumulator("0", dense[0]), HessianAccumulator("0", dense[0])
    for x in calib:
        acc_q.add_input(q(x))
        acc_f.add_input(x)
    assert torch.allclose(seen["0"].double(), acc_q.H.double(), rtol=1e-5, atol=1e-6)  # H may be accumulated in fp32
    assert not torch.allclose(seen["0"].double(), acc_f.H.double(), atol=1e-3)


def test_failure_leaves_the_model_untouched():
    model = _mlp()
    before = [type(m) for m in model]
    with pytest.raises(CalibrationError):
        bs.quantize_(model, bs.ActQuant(bits=8), calib=[])
    assert [type(m) for m in model] == before and not act_quant_layers(model)


def test_w8a8_recipe_stays_close_to_dense_and_reports():
    model, dense, calib = _mlp(), _mlp(), _calib()
    bs.compress(model, bs.W8A8(), calib)
    assert set(act_quant_layers(model)) == {"0", "2"}
    x = torch.cat(calib)  # inside the calibrated ranges (outside them, inputs are clipped)
    rel = (model(x) - dense(x)).norm() / dense(x).norm()
    assert rel < 0.03
    with pytest.raises(ConfigError, match="weights="):
        bs.W8A8("ExactOBS")


def test_act_scales_survive_save_and_load(tmp_path):
    model, calib = _mlp(), _calib()
    bs.quantize_(model, bs.ActQuant(bits=6, observer="mse"), calib)
    bs.save(model, str(tmp_path / "ckpt"))
    again = bs.load(str(tmp_path / "ckpt"), _mlp)
    assert isinstance(again[0], ActQuantLinear) and again[0].input_quantizer.cfg == model[0].input_quantizer.cfg
    assert torch.equal(again[0].input_quantizer.scale, model[0].input_quantizer.scale)
    x = torch.randn(8, 8)
    assert torch.equal(again(x), model(x))


def test_lsq_trains_the_activation_scale_and_remove_restores_plain_layers():
    model = _mlp()
    bs.quantize_(model, bs.ActQuant(bits=4), _calib())
    assert learn_act_scales_(model) == ["0", "2"]
    model(torch.randn(4, 8)).pow(2).sum().backward()
    assert model[0].input_quantizer.scale.grad is not None
    assert remove_act_quant_(model) == ["0", "2"] and type(model[0]) is nn.Linear


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="observer"):
        bs.ActQuant(observer="max")
    with pytest.raises(ConfigError, match="granularity"):
        bs.ActQuant(granularity="row")
    with pytest.raises(ConfigError, match="bits"):
        bs.ActQuant(bits=1)


def test_qat_starts_from_the_calibrated_act_scales_trains_them_and_converts_back():
    from brainsurgeon.quant.static import convert_static_int8_

    model, calib = _mlp(), _calib()
    bs.compress(model, bs.W8A8("RTN"), calib)
    x = torch.cat(calib)
    with torch.no_grad():
        ref = model(x)
    scale0 = model[0].input_quantizer.scale.clone()
    bs.prepare_qat_(model, bs.QAT(bits=8, learn_scale=True))  # no calib needed: the act grids exist
    assert torch.allclose(model(x), ref, atol=1e-5)  # same forward, now trainable
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (model(x) - ref * 1.1).pow(2).mean().backward()
        opt.step()
    assert model[0].a_scale.grad is not None and not torch.equal(model[0].a_scale.detach(), scale0)
    bs.convert_qat_(model)
    assert isinstance(model[0], ActQuantLinear)
    assert not torch.equal(model[0].input_quantizer.scale, scale0)  # the trained scale survives
    with torch.no_grad():
        y = model(x)
        convert_static_int8_(model)
        assert (model(x) - y).abs().max() <= 1e-4 * y.abs().max()
