"""compress() runs mixed recipes: structural steps (prune, factorize, share) and layer-wise steps in order,
and restores the caller's model, shapes included, when any step fails."""

import pytest
import torch

import brainsurgeon as bs
from brainsurgeon.config import Recipe, Step
from brainsurgeon.errors import ConfigError
from brainsurgeon.lowrank import LowRank
from brainsurgeon.models import build_model
from brainsurgeon.prune import ChannelPruning
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
    from brainsurgeon.distill import KD

    with pytest.raises(ConfigError, match="recipe step"):
        bs.compress(build_model("digits-cnn", seed=0), Recipe((Step(KD()),)), calib())
