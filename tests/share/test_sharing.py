"""share: k-means codebooks, gradient sharing, masks kept, the verb, adaptive bits."""

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainsurgeon.config import config_from_dict
from brainsurgeon.errors import BudgetInfeasibleError, ConfigError
from brainsurgeon.share import (
    WeightSharing,
    adaptive_bits,
    allocate_bits,
    cluster_weight,
    gradient_sensitivity,
    hessian_sensitivity,
    kmeans_1d,
    load_encoded,
    share_,
    sharing_hooks,
)


def pruned(shape, sparsity=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=g)
    W[W.abs() < W.abs().flatten().kthvalue(int(sparsity * W.numel())).values] = 0
    return W


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("init", ["linear", "density"])
def test_codebook_has_2_to_the_bits_centroids_and_zeros_stay_zero(bits, init):
    W = pruned((32, 40))
    cb = cluster_weight(W, bits, init)
    assert cb.centroids.shape == (2 ** bits,)
    Ws = cb.weight()
    assert torch.equal(Ws == 0, W == 0)  # the pruning mask survives exactly
    assert torch.unique(Ws[Ws != 0]).numel() <= 2 ** bits
    nz = W != 0
    d = (W[nz][:, None] - cb.centroids[None]).abs()  # (nnz, k): every weight sits at its nearest centroid
    assert torch.allclose(d.gather(1, cb.labels[nz][:, None]).squeeze(1), d.min(1).values)


def test_codebook_size_is_kept_when_there_are_fewer_distinct_weights():
    c, labels = kmeans_1d(torch.tensor([1.0, 1.0, 2.0]), 8)
    assert c.shape == (8,) and c[labels].tolist() == [1.0, 1.0, 2.0]


def test_lloyd_iterations_do_not_increase_the_error():
    w = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    errs = []
    for iters in (0, 1, 5, 30):
        c, labels = kmeans_1d(w, 8, iters=iters)
        errs.append(float((w - c[labels]).pow(2).sum()))
    assert all(a >= b - 1e-4 for a, b in itertools.pairwise(errs)) and errs[-1] < errs[0]


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    torch.manual_seed(0)
    fc = nn.Linear(12, 5)
    with torch.no_grad():
        fc.weight.copy_(pruned((5, 12), 0.5))
    model = nn.Sequential(fc)
    cb = cluster_weight(fc.weight, 2)
    x, y = torch.randn(7, 12), torch.randint(0, 5, (7,))
    w_param = fc.weight
    with sharing_hooks(model, {"0": cb}) as (c,):
        F.cross_entropy(model(x), y).backward()
        grad_c = c.grad.clone()
        assert not isinstance(fc.weight, nn.Parameter)
    # the same loss with an ordinary weight tensor at the shared values
    W = cb.weight().clone().requires_grad_(True)
    F.cross_entropy(x @ W.T + fc.bias, y).backward()
    expect = torch.zeros(4).index_add_(0, cb.labels[cb.labels < 4], W.grad[cb.labels < 4])
    torch.testing.assert_close(grad_c, expect)
    assert fc.weight is w_param and list(fc.state_dict()) == ["weight", "bias"]
    assert not fc._forward_pre_hooks


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    with torch.no_grad():
        net[3].weight.copy_(pruned((10, 288), 0.8))
    return net.eval()


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def test_share_keeps_masks_through_fine_tuning_and_lowers_the_loss(tmp_path):
    net, data = _net(), _data()
    mask = net[3].weight != 0
    grads = [p.requires_grad for p in net.parameters()]
    rep = share_(net, WeightSharing(bits=3, finetune_steps=40, lr=3e-3), data=data, path=str(tmp_path / "m.bsdc"))
    assert torch.equal(net[3].weight != 0, mask)
    assert all(r.levels <= 8 for r in rep.rows) and [r.name for r in rep.rows] == ["0", "3"]
    assert not net.training and [p.requires_grad for p in net.parameters()] == grads
    assert all(p.grad is None for p in net.parameters())
    size = os.path.getsize(tmp_path / "m.bsdc")
    assert rep.metrics["bytes_on_disk"]["after"] == size
    state = load_encoded(tmp_path / "m.bsdc")
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_fine_tuning_reduces_the_training_loss():
    from brainsurgeon.share import finetune_centroids

    net, data = _net(), _data(8)
    cbs = {"0": cluster_weight(net[0].weight, 2), "3": cluster_weight(net[3].weight, 2)}
    losses = finetune_centroids(net, cbs, data, steps=64, lr=1e-2)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first


def test_share_restores_weights_on_failure():
    net, data = _net(), _data()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def bad_loss(out, batch):
        raise RuntimeError("loss exploded")

    with pytest.raises(RuntimeError, match="loss exploded"):
        share_(net, WeightSharing(bits=2, finetune_steps=3), data=data, loss_fn=bad_loss)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    assert list(net.state_dict()) == list(before) and isinstance(net[3].weight, nn.Parameter)


def test_share_overrides_and_errors():
    net = _net()
    rep = share_(net, WeightSharing(bits=2), overrides={"3": WeightSharing(bits=5)})
    assert {r.name: r.bits for r in rep.rows} == {"0": 2.0, "3": 5.0}
    with pytest.raises(ConfigError, match="same finetune_steps and lr"):
        share_(_net(), WeightSharing(bits=2, finetune_steps=2), data=_data(),
               overrides={"3": WeightSharing(bits=5)})
    with pytest.raises(ConfigError, match="needs data"):
        share_(_net(), WeightSharing(finetune_steps=2))
    with pytest.raises(ConfigError, match="bits must be an integer in \\[1, 8\\]"):
        WeightSharing(bits=9)
    with pytest.raises(ConfigError, match="loosen ignore"):
        share_(_net(), WeightSharing(), ignore=(".*",))
    cfg = WeightSharing(bits=5, finetune_steps=10)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_allocate_bits_is_optimal_on_small_equal_size_instances():
    torch.manual_seed(0)
    names = ["a", "b", "c", "d"]
    sens = dict(zip(names, torch.rand(4).mul(100).tolist(), strict=True))
    choices = [2, 3, 4, 6, 8]
    costs = {n: {b: s / 4 ** b for b in choices} for n, s in sens.items()}
    params = dict.fromkeys(names, 100)
    for avg in (2.0, 3.0, 3.5, 5.0):
        plan = allocate_bits(costs, params, avg)
        assert sum(plan[n] * 100 for n in names) <= avg * 400
        best = min((sum(costs[n][b] for n, b in zip(names, combo, strict=True)), combo)
                   for combo in itertools.product(choices, repeat=4) if sum(combo) * 100 <= avg * 400)
        assert sum(costs[n][plan[n]] for n in names) == pytest.approx(best[0])


def test_allocate_bits_respects_budget_and_never_loses_to_uniform():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        names = [f"l{i}" for i in range(6)]
        params = {n: int(p) for n, p in zip(names, torch.randint(10, 5000, (6,), generator=gen), strict=True)}
        costs = {n: {b: float(s) * p / 4 ** b for b in range(2, 9)}
                 for (n, p), s in zip(params.items(), torch.rand(6, generator=gen), strict=True)}
        plan = allocate_bits(costs, params, 4.0)
        assert sum(params[n] * b for n, b in plan.items()) <= 4.0 * sum(params.values())
        assert sum(costs[n][b] for n, b in plan.items()) <= sum(costs[n][4] for n in names) + 1e-12
    with pytest.raises(BudgetInfeasibleError, match="cheapest plan averages 2.000 bits"):
        allocate_bits({"a": {2: 1.0, 4: 0.1}}, {"a": 10}, 1.5)


def test_sensitivities_match_hand_computation_and_leave_no_trace():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).train()
    x = torch.randn(20, 6)
    data = [(x[:10], torch.randint(0, 3, (10,))), (x[10:], torch.randint(0, 3, (10,)))]
    s = hessian_sensitivity(net, data)
    assert s["0"] == pytest.approx(4 * float(2 * (x.double() ** 2).sum() / 20), rel=1e-9)
    rel = hessian_sensitivity(net, data, relative=True)
    W, H = net[0].weight.detach().double(), 2 * x.double().T @ x.double() / 20
    assert rel["0"] == pytest.approx(s["0"] / float(torch.trace(W @ H @ W.T)), rel=1e-9)
    conv = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    assert hessian_sensitivity(conv, [torch.randn(2, 4, 5, 5)], relative=True)["0"] > 0
    g = gradient_sensitivity(net, data)
    expect = 0.0
    for xb, yb in data:
        net.zero_grad()
        F.cross_entropy(net.eval()(xb), yb).backward()
        expect += float(net[2].weight.grad.pow(2).sum()) / 2
    net.zero_grad(set_to_none=True)
    net.train()
    g = gradient_sensitivity(net, data)
    assert g["2"] == pytest.approx(expect, rel=1e-6)
    assert net.training and all(p.grad is None and p.requires_grad for p in net.parameters())
    bits = adaptive_bits(net, {"0": 100.0, "2": 0.001}, avg_bits=4.0)
    assert bits["0"] > bits["2"]


def test_fisher_and_centroid_tuning_give_every_submodule_its_own_mode_back():
    from brainsurgeon.share import finetune_centroids

    net, data = _net(), _data(2)
    net[0].train()  # mixed flags: model.train() / model.eval() afterwards would lose them
    flags = [m.training for m in net.modules()]
    gradient_sensitivity(net, data)
    assert [m.training for m in net.modules()] == flags
    cbs = {"3": cluster_weight(net[3].weight, 3)}
    finetune_centroids(net, cbs, data, steps=2)
    assert [m.training for m in net.modules()] == flags
