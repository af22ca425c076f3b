"""compress() runs mixed recipes: structural steps (prune, factorize, share), distill steps and layer-wise steps in
order, and restores the caller's model, shapes included, when any step fails."""

import pytest
import torch

import brainsurgeon as bs
from brainsurgeon.config import Recipe, Step
from brainsurgeon.distill import KD
from brainsurgeon.errors import ConfigError
from brainsurgeon.lowrank import LowRank
from brainsurgeon.models import build_model
from brainsurgeon.prune import ChannelPruning
from brainsurgeon.quant.qat import QAT
from brainsurgeon.share import WeightSharing


def calib(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 1, 8, 8, generator=g) for _ in range(n)]


def shapes(m):
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def test_prune_then_sparsify_then_quantize():
    m = build_model("digits-cnn", seed=0).eval()
    x = calib(1)[0]
    recipe = Recipe((Step(ChannelPruning(ratio=0.5, importance="group_l2"), ignore=("fc2",)),
                     Step(bs.SparseGPT(sparsity=0.5), ignore=("conv1",)),
                     Step(bs.GPTQ(bits=4), ignore=("conv1",))))
    before = sum(p.numel() for p in m.parameters())
    rep = bs.compress(m, recipe, calib())
    assert sum(p.numel() for p in m.parameters()) < 0.6 * before  # channels physically removed
    assert m(x).shape == (16, 10)  # the classifier's outputs are kept
    assert abs(float((m.fc1.weight == 0).float().mean()) - 0.5) < 0.02  # then 50 % of what is left
    assert len(set(m.fc1.weight[0].tolist())) <= 16  # on a 4-bit grid (zeros included)
    assert rep.metrics["params"]["after"] < rep.metrics["params"]["before"]


def test_factorize_and_share_steps_run_from_a_recipe():
    m = build_model("digits-cnn", seed=0).eval()
    rep = bs.compress(m, Recipe((Step(LowRank(rank=4), ignore=("conv.*", "fc2")),
                                 Step(WeightSharing(bits=3), ignore=("fc1.*",)))), calib())
    assert type(m.fc1).__name__ == "LowRankLinear"
    assert len(torch.unique(m.conv2.weight)) <= 8
    assert len(rep.rows) >= 2


def test_quantize_then_pack_from_a_recipe_keeps_the_outputs():
    import copy

    keep = ("conv1", "fc2")
    m = build_model("digits-cnn", seed=0).eval()
    x = calib(1)[0]
    rtn = Step(bs.RTN(bits=4), ignore=keep)
    q = copy.deepcopy(m)
    bs.compress(q, Recipe((rtn,)), calib())
    rep = bs.compress(m, Recipe((rtn, Step(bs.Pack(bits=4, group_size=0, compute_dtype="float32"), ignore=keep))),
                      calib())
    assert type(m.fc1).__name__ == "Int4WeightOnlyLinear" and "layers packed" in rep.notes[-1]
    with torch.no_grad():
        torch.testing.assert_close(m(x), q(x), rtol=1e-4, atol=1e-4)  # packed codes == the on-grid floats


def test_failure_after_a_structural_step_restores_shapes_and_values():
    m = build_model("digits-cnn", seed=0).eval()
    before, state = shapes(m), {k: v.clone() for k, v in m.state_dict().items()}
    bad = [torch.full((16, 1, 8, 8), float("nan"))]  # prune (l2) ignores the data; SparseGPT refuses NaN
    recipe = Recipe((Step(ChannelPruning(ratio=0.5, importance="l2"), ignore=("fc2",)),
                     Step(bs.SparseGPT(sparsity=0.5))))
    with pytest.raises(bs.CalibrationError):
        bs.compress(m, recipe, bad)
    assert shapes(m) == before
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_recipe_step_with_a_non_step_verb_is_refused():
    with pytest.raises(ConfigError, match="recipe step"):
        bs.compress(build_model("digits-cnn", seed=0), Recipe((Step(QAT(bits=4)),)), calib())


def test_a_distill_step_without_training_data_names_the_step_and_the_argument():
    m = build_model("digits-cnn", seed=0).eval()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    recipe = Recipe((Step(ChannelPruning(ratio=0.5), ignore=("fc2",)), Step(KD(epochs=1))))
    with pytest.raises(ConfigError, match=r"recipe step 2 \(KD .*data=train_set"):
        bs.compress(m, recipe, calib())
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())  # refused before any step ran


@pytest.fixture(scope="module")
def digits():
    from brainsurgeon.models import calibration_loader, pretrained

    model, train_ds, test_ds = pretrained("digits-cnn")  # trained in seconds on first use, then cached
    return model, train_ds, test_ds, calibration_loader(train_ds, n=256, batch_size=64)


def test_prune_distill_quantize_keeps_structure_masks_and_grid_and_beats_no_distill(digits):
    """prune -> sparsify -> KD (teacher: the model before the recipe) -> GPTQ, through compress()."""
    import copy

    from brainsurgeon.models import evaluate

    dense, train_ds, test_ds, loader = digits
    steps = [Step(ChannelPruning(ratio=0.5, importance="group_l2"), ignore=("fc2",)),
             Step(bs.SparseGPT(sparsity=0.5), ignore=("conv1",)), Step(bs.GPTQ(bits=4), ignore=("conv1",))]
    plain, kd = copy.deepcopy(dense), copy.deepcopy(dense)
    bs.compress(plain, Recipe(tuple(steps)), loader)
    rep = bs.compress(kd, Recipe((*steps[:2], Step(KD(epochs=2, lr=1e-3)), steps[2])), loader, data=train_ds)
    assert shapes(kd) == shapes(plain) and shapes(kd) != shapes(dense)  # channels removed, and stay removed
    for name in ("conv2", "conv3", "fc1", "fc2"):
        W = kd.get_submodule(name).weight.detach().flatten(1)
        assert float((W == 0).float().mean()) >= 0.5, name  # SparseGPT's zeros survive KD and GPTQ
        assert max(len(set(row.tolist())) for row in W) <= 16, name  # every row on a 4-bit grid
    assert any(n.startswith("KD T=4") for n in rep.notes)
    acc_kd, acc_plain = evaluate(kd, test_ds), evaluate(plain, test_ds)
    assert acc_kd > acc_plain + 0.05, (acc_kd, acc_plain)  # measured: 92.5 % vs 70.6 %


def test_the_example_distill_recipe_loads_with_its_three_verbs():
    from pathlib import Path

    recipe = bs.load_recipe(str(Path(__file__).parents[1] / "recipes" / "digits-prune-kd-gptq4.yaml"))
    assert [type(s.method).verb for s in recipe.steps] == ["prune", "distill", "quantize"]
    assert recipe.steps[1].method == KD(temperature=4.0, alpha=0.9, epochs=3, lr=1e-3)
