"""Bug 13.#14's parts in this branch: factorize_ keeps user hooks (refuses with a note), and a budget
equal to the dense cost gives the dense plan."""

import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.search import Plan, SearchSpace, apply_plan_, search


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_factorize_keeps_a_hooked_layer_dense_with_a_note():
    m = mlp()
    seen = []
    hooked = m[0]
    hooked.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    rep = bs.factorize_(m, bs.LowRank(rank=2))
    assert m[0] is hooked and type(m[2]) is not nn.Linear  # the other layer is factorized
    assert any("0: kept dense because it carries 1 hook(s) of yours (forward_hooks)" in n for n in rep.notes)
    m(torch.randn(2, 16))
    assert seen == [torch.Size([2, 32])]


def test_a_budget_equal_to_the_dense_cost_returns_the_dense_plan(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    space = SearchSpace(prune_method="Magnitude", levels=2, max_sparsity=0.5, nm=(), block_sparsities=(), bits=(4,),
                        nm_bits=(), quant_method="RTN", model_loss_batches=1)
    calib = [torch.randn(8, 16) for _ in range(2)]
    plan = search(m, space, "flops=1.0", calib, db=str(tmp_path / "db"))
    assert plan.info["cost"] <= 1.0 and not plan.to_recipe().steps
    plan.save(str(tmp_path / "plan.yaml"))  # used to raise "loosen the budget"
    again = Plan.load(str(tmp_path / "plan.yaml"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    apply_plan_(m, again, calib)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_compress_keeps_every_submodules_train_eval_flag():
    from test_rollback import Net, calib

    m = Net().eval()
    m.bn1.train()  # a submodule in another mode than the root
    before = {n: x.training for n, x in m.named_modules()}
    bs.compress(m, bs.Recipe((bs.config.Step(bs.ChannelPruning(ratio=0.5)), bs.config.Step(bs.RTN(bits=4)))), calib())
    assert {n: x.training for n, x in m.named_modules()} == before
