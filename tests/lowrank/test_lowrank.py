"""lowrank: exact at full rank, activation-aware beats plain SVD on ||WX - ABX||, Tucker-2, the verb."""

import json

import pytest
import torch
from torch import nn

from brainsurgeon.config import CalibOptions, config_from_dict
from brainsurgeon.errors import CalibrationError, ConfigError, UnsupportedModuleError
from brainsurgeon.formats import module_format, registered_module_formats
from brainsurgeon.lowrank import (
    LowRank,
    LowRankConv2d,
    LowRankLinear,
    Tucker2Conv2d,
    choose_rank,
    choose_tucker_ranks,
    decompose,
    factorize_,
    factorize_module,
    rank_entries,
    reconstruct,
    truncate,
    tucker2,
    tucker_entries,
)


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(n, dim) inputs with a strongly non-isotropic covariance (a few dominant directions)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * torch.logspace(0, -3, dim)  # decaying column scales
    return torch.randn(n, dim, generator=g) @ mix.T


def hessian(X: torch.Tensor) -> torch.Tensor:
    X = X.double()
    return 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
@pytest.mark.parametrize("aware", [False, True])
def test_full_rank_factorization_is_exact(shape, aware):
    torch.manual_seed(0)
    W = torch.randn(*shape, dtype=torch.float64)
    H = hessian(correlated_inputs(64, shape[1])) if aware else None
    spec = decompose(W, H, damp=0.0 if aware else 0.01)
    A, B = truncate(spec, spec.full_rank, torch.float64)
    torch.testing.assert_close(A @ B, W, atol=1e-8, rtol=0)
    assert float(spec.losses(H)[-1]) == pytest.approx(0.0, abs=1e-10)


def test_activation_aware_beats_plain_svd_on_correlated_inputs():
    torch.manual_seed(0)
    W = torch.randn(24, 32)
    X = correlated_inputs(512, 32)  # (n, in)
    H = hessian(X)
    for r in (2, 4, 8, 16):
        errs = {}
        for aware in (False, True):
            A, B = truncate(decompose(W, H if aware else None, damp=1e-6), r)
            errs[aware] = float(((W - A @ B) @ X.T).pow(2).sum())
        assert errs[True] < errs[False] * 0.9, (r, errs)


def test_spectrum_losses_match_direct_computation():
    torch.manual_seed(1)
    W = torch.randn(10, 6, dtype=torch.float64)
    H = hessian(correlated_inputs(50, 6))
    for aware in (False, True):
        spec = decompose(W, H if aware else None, damp=0.0)
        losses = spec.losses(H)
        for r in range(1, 7):
            A, B = truncate(spec, r, torch.float64)
            dW = W - A @ B
            assert float(losses[r]) == pytest.approx(float(torch.trace(dW @ H @ dW.T)), rel=1e-8, abs=1e-10)
    assert float(decompose(W).losses()[0]) == pytest.approx(float((W ** 2).sum()))


def test_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    assert choose_rank(s, 100, 4, LowRank(rank=3)) == 3
    assert choose_rank(s, 100, 4, LowRank(rank=99)) == 4
    assert choose_rank(s, 100, 4, LowRank(rank_ratio=0.5)) == 2
    assert choose_rank(s, 100, 4, LowRank(energy=16 / 22)) == 1
    assert choose_rank(s, 100, 4, LowRank(energy=20 / 22 + 1e-9)) == 3
    r = choose_rank(torch.ones(64), 64, 256, LowRank(param_ratio=0.3))
    assert r * (64 + 256) <= 0.3 * 64 * 256 < (r + 1) * (64 + 256)


def test_config_errors_name_the_field_and_fix():
    with pytest.raises(ConfigError, match="exactly one rank rule"):
        LowRank(rank=4, energy=0.9)
    with pytest.raises(ConfigError, match="exactly one rank rule"):
        LowRank()
    with pytest.raises(ConfigError, match="param_ratio must be in"):
        LowRank(param_ratio=1.5)
    with pytest.raises(ConfigError, match="conv must be 'tucker2' or 'svd'"):
        LowRank(rank=2, conv="cp")
    cfg = LowRank(param_ratio=0.5, activation_aware=True)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_tucker2_exact_at_full_ranks_and_sweeps_do_not_hurt():
    torch.manual_seed(0)
    K = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    U, G, V = tucker2(K, 8, 6)
    torch.testing.assert_close(reconstruct(U, G, V), K, atol=1e-10, rtol=0)
    errs = [float((reconstruct(*tucker2(K, 4, 3, sweeps=s)) - K).pow(2).sum()) for s in (0, 1, 5)]
    assert errs[1] <= errs[0] + 1e-9 and errs[2] <= errs[1] + 1e-9


def test_tucker_budget_is_respected():
    K = torch.randn(64, 32, 3, 3)
    r_out, r_in = choose_tucker_ranks(K, LowRank(param_ratio=0.25))
    assert 32 * r_in + r_out * r_in * 9 + 64 * r_out <= 0.25 * 64 * 32 * 9
    assert (r_out, r_in) == (24, 12)


def test_tucker_ranks_are_the_ranks_the_factors_have():
    """A 3-channel stem at 45 % asks (10, 1); a core (R_out, 1, 9) has mode-0 rank <= 9, so (9, 1) is chosen,
    the factors have exactly those shapes after HOOI sweeps, and a pair beyond the cap is refused."""
    torch.manual_seed(0)
    K = torch.randn(32, 3, 3, 3, dtype=torch.float64)
    r_out, r_in = choose_tucker_ranks(K, LowRank(param_ratio=0.45))
    assert (r_out, r_in) == (9, 1)
    U, G, V = tucker2(K, r_out, r_in, sweeps=2)
    assert (U.shape, G.shape, V.shape) == ((32, 9), (9, 1, 3, 3), (3, 1))
    assert choose_tucker_ranks(K, LowRank(rank=30)) == (27, 3)
    with pytest.raises(ConfigError, match="r_in\\*k=9"):
        tucker2(K, 10, 1, sweeps=1)


CONVS = {
    "pad1_bias": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "stride2_dil2_nobias": lambda: nn.Conv2d(6, 8, 3, stride=2, dilation=2, padding=2, bias=False),
    "reflect_rect": lambda: nn.Conv2d(6, 8, (3, 2), padding=(1, 1), padding_mode="reflect"),
    "circular_same": lambda: nn.Conv2d(6, 8, 3, padding="same", padding_mode="circular"),
}


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("conv_kind", ["tucker2", "svd"])
def test_conv_factorization_full_rank_equals_conv(name, conv_kind):
    torch.manual_seed(0)
    conv = CONVS[name]().double()
    x = torch.randn(2, 6, 9, 10, dtype=torch.float64)
    new, row = factorize_module("c", conv, LowRank(rank=8, conv=conv_kind, skip_larger=False))
    assert isinstance(new, Tucker2Conv2d if conv_kind == "tucker2" else LowRankConv2d)
    torch.testing.assert_close(new(x), conv(x), atol=1e-9, rtol=0)
    torch.testing.assert_close(new.dense_weight(), conv.weight.detach(), atol=1e-9, rtol=0)
    assert row.rel_loss < 1e-20 and row.params == sum(p.numel() for n, p in new.named_parameters()
                                                      if n.endswith("weight"))


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc1 = nn.Linear(16 * 4 * 4, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        h = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def _model():
    torch.manual_seed(0)
    return TwoLayer().eval()


def test_factorize_full_rank_keeps_outputs_and_counts_params():
    model, x = _model(), torch.randn(4, 3, 4, 4)
    y = model(x)
    rep = factorize_(model, LowRank(rank_ratio=1.0, skip_larger=False))
    assert isinstance(model.fc1, LowRankLinear) and isinstance(model.conv, Tucker2Conv2d)
    assert isinstance(model.dw, nn.Conv2d) and any("groups=16" in n for n in rep.notes)
    torch.testing.assert_close(model(x), y, atol=1e-4, rtol=1e-4)
    assert {r.name: r.params for r in rep.rows} == {"conv": 3 * 3 + 16 * 3 * 9 + 16 * 16, "fc1": 48 * (256 + 48),
                                                    "fc2": 10 * (48 + 10)}


def test_factorize_budget_shrinks_and_skips_layers_that_would_grow():
    model = _model()
    rep = factorize_(model, LowRank(param_ratio=0.5))
    rows = {r.name: r for r in rep.rows}
    assert isinstance(model.fc1, LowRankLinear) and model.fc1.rank == int(0.5 * 256 * 48 / (256 + 48))
    assert rows["fc1"].params <= 0.5 * 256 * 48 and 0 < rows["fc1"].rel_loss < 1
    assert all(r.params <= 0.5 * r.shape[0] * torch.Size(r.shape[1:]).numel() or "kept dense" in r.method
               for r in rep.rows)
    tiny = nn.Sequential(nn.Linear(4, 3))
    rep = factorize_(tiny, LowRank(rank=3))
    assert isinstance(tiny[0], nn.Linear) and "kept dense" in rep.rows[0].method


def test_activation_aware_verb_beats_plain_on_the_calibration_inputs():
    torch.manual_seed(0)
    fc = nn.Linear(32, 24)
    X = correlated_inputs(256, 32, seed=3)
    calib = [X[i:i + 64] for i in range(0, 256, 64)]
    errs = {}
    for aware in (False, True):
        model = nn.Sequential(nn.Linear(32, 24))
        model.load_state_dict(nn.Sequential(fc).state_dict())
        rep = factorize_(model, LowRank(rank=6, activation_aware=aware), calib=calib)
        with torch.no_grad():
            errs[aware] = float((model(X) - fc(X)).pow(2).sum())
        if aware:
            assert rep.rows[0].rel_loss == pytest.approx(errs[True] / float((X @ fc.weight.detach().T).pow(2).sum()),
                                                         rel=1e-3)
    assert errs[True] < errs[False]


def test_failure_restores_every_replaced_module():
    model, x = _model(), torch.randn(2, 3, 4, 4)
    before = {n: type(m) for n, m in model.named_modules()}
    y = model(x)
    calls = {"n": 0}

    def calib():
        calls["n"] += 1
        if calls["n"] >= 3:  # pass 1: execution order, pass 2: conv solved, pass 3 fails
            raise CalibrationError("boom")
        return [x]

    with pytest.raises(CalibrationError, match="boom"):
        factorize_(model, LowRank(rank=4, activation_aware=True, conv="svd"), calib=calib,
                   options=CalibOptions(mode="sequential"))
    assert {n: type(m) for n, m in model.named_modules()} == before
    torch.testing.assert_close(model(x), y)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_verb_errors_are_clear():
    with pytest.raises(ConfigError, match="needs calibration data"):
        factorize_(_model(), LowRank(rank=4, activation_aware=True))
    with pytest.raises(ConfigError, match="loosen ignore"):
        factorize_(_model(), LowRank(rank=4), ignore=(".*",))
    with pytest.raises(ConfigError, match="needs a LowRank config"):
        factorize_(_model(), object())
    with pytest.raises(UnsupportedModuleError, match="not a Linear or a Conv2d"):
        rank_entries(nn.Conv2d(4, 4, 3, groups=2))


def test_rank_entries_are_monotone_and_exact():
    torch.manual_seed(0)
    fc = nn.Linear(20, 12)
    H = hessian(correlated_inputs(128, 20))
    for aware in (False, True):
        entries = rank_entries(fc, H, activation_aware=aware)
        assert [e.rank for e in entries] == list(range(1, 13))
        assert [e.params for e in entries] == [r * 32 for r in range(1, 13)]
        losses = [e.loss for e in entries]
        assert all(a >= b - 1e-9 for a, b in zip(losses, losses[1:], strict=False))
        assert losses[-1] == pytest.approx(0.0, abs=1e-6)
        W = fc.weight.detach().double()
        assert all(e.rel_loss == pytest.approx(e.loss / float(torch.trace(W @ H @ W.T))) for e in entries)
    plain = rank_entries(fc, H, activation_aware=False)
    aware = rank_entries(fc, H)
    assert all(a.loss <= p.loss + 1e-9 for a, p in zip(aware, plain, strict=True))


@pytest.mark.parametrize("cls_name", ["lowrank_linear", "lowrank_conv2d", "tucker2_conv2d"])
def test_formats_round_trip_through_json_spec(cls_name):
    torch.manual_seed(0)
    assert cls_name in registered_module_formats()
    if cls_name == "lowrank_linear":
        m, x = factorize_module("l", nn.Linear(16, 12), LowRank(rank=3))[0], torch.randn(2, 16)
    else:
        conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, padding_mode="reflect")
        m = factorize_module("c", conv, LowRank(rank=3, conv="tucker2" if "tucker" in cls_name else "svd"))[0]
        x = torch.randn(1, 8, 7, 7)
    spec = json.loads(json.dumps(m.spec()))
    m2 = module_format(cls_name).from_spec(spec)
    m2.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(m2(x), m(x), atol=0, rtol=0)


class Blocks(nn.Module):
    """Two residual MLP blocks in a ModuleList, like a tiny transformer stack."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 16)) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_block_mode_calibration_and_overrides():
    torch.manual_seed(0)
    model = Blocks().eval()
    X = correlated_inputs(256, 16, seed=5)
    y = model(X).detach()
    calib = [X[i:i + 64] for i in range(0, 256, 64)]
    errs = {}
    for aware in (False, True):
        m = Blocks().eval()
        m.load_state_dict(model.state_dict())
        rep = factorize_(m, LowRank(rank=4, activation_aware=aware), calib=calib,
                         overrides={r"blocks\.1\.2": LowRank(rank=8, activation_aware=aware)},
                         options=CalibOptions(blocks="blocks"))
        assert [r.name for r in rep.rows] == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]
        assert m.blocks[1][2].rank == 8 and m.blocks[0][2].rank == 4
        with torch.no_grad():
            errs[aware] = float((m(X) - y).pow(2).sum())
    assert errs[True] < errs[False]


def test_tucker_entries_respect_budgets_and_shrink_error_with_budget():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)
    entries = tucker_entries(conv, param_ratios=[0.75, 0.5, 0.15])
    assert [e.params <= r * 16 * 32 * 9 for e, r in zip(entries, [0.75, 0.5, 0.15], strict=True)] == [True] * 3
    assert entries[0].rel_loss < entries[1].rel_loss < entries[2].rel_loss < 1
    new, row = factorize_module("c", conv, LowRank(param_ratio=0.5, tucker_sweeps=2))
    assert row.rel_loss == pytest.approx(entries[1].rel_loss) and row.params == entries[1].params
