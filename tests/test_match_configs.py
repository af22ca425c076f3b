"""One matcher for every verb's plan: ignore regexes drop layers, the first fully matching override wins."""

import brainsurgeon as bs
from brainsurgeon.api import match_configs, plan_layers
from brainsurgeon.config import Step
from brainsurgeon.lowrank import LowRank
from brainsurgeon.lowrank.api import plan_factorization
from brainsurgeon.models import build_model
from brainsurgeon.share import WeightSharing
from brainsurgeon.share.api import plan_sharing


def test_ignore_beats_overrides_and_the_first_full_match_wins():
    a, b, c = bs.RTN(bits=4), bs.RTN(bits=8), bs.RTN(bits=2)
    names = ["conv1", "conv2", "fc1", "fc2", "fc10"]
    got = match_configs(names, a, ignore=("fc2",), overrides={"fc.*": b, "fc1": c, "conv": c})
    assert got == {"conv1": a, "conv2": a, "fc1": b, "fc10": b}  # "conv" is no full match; fc.* listed first
    assert match_configs(names, a, ("fc2",), [("fc.*", b), ("fc1", c)]) == got  # pairs == dict
    assert match_configs(names, a, ignore=(".*",)) == {}


def test_the_three_planners_pick_the_same_layers():
    m = build_model("digits-cnn", seed=0)
    ignore, over = ("conv1",), {"fc.*": 8}
    quant = plan_layers(m, Step(bs.RTN(bits=4), ignore, tuple((p, bs.RTN(bits=v)) for p, v in over.items())))
    lowrank, _ = plan_factorization(m, LowRank(rank=2), ignore, {p: LowRank(rank=v) for p, v in over.items()})
    share = plan_sharing(m, WeightSharing(bits=4), ignore, {p: WeightSharing(bits=v) for p, v in over.items()})
    assert list(quant) == list(lowrank) == list(share) == ["conv2", "conv3", "fc1", "fc2"]
    assert [c.bits for c in quant.values()] == [c.bits for c in share.values()] == [4, 4, 8, 8]
    assert [c.rank for c in lowrank.values()] == [2, 2, 8, 8]
