"""Configs validate every field with a message naming it and the fix; recipes round-trip."""

import pytest

from brainsurgeon import GPTQ, OBQ, RTN, CalibOptions, ConfigError, ExactOBS, Magnitude, Recipe, SparseGPT, Step
from brainsurgeon.config import config_from_dict, dump_recipe, load_recipe


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\)"):
        ExactOBS(sparsity=bad)


def test_n_greater_than_m_and_unknown_pattern():
    with pytest.raises(ConfigError, match="0 < N < M"):
        ExactOBS(pattern="4:2")
    with pytest.raises(ConfigError, match="block4"):
        ExactOBS(sparsity=0.5, pattern="diagonal")
    with pytest.raises(ConfigError, match="not supported"):
        SparseGPT(sparsity=0.5, pattern="block4")


def test_nm_contradicting_sparsity_and_missing_sparsity():
    with pytest.raises(ConfigError, match="contradicts"):
        ExactOBS(sparsity=0.75, pattern="2:4")
    with pytest.raises(ConfigError, match="sparsity is required"):
        Magnitude()
    assert ExactOBS(pattern="2:4").target_sparsity == 0.5


@pytest.mark.parametrize("bits", [1, 9, 4.5])
def test_bits_range(bits):
    with pytest.raises(ConfigError, match=r"bits must be an integer in \[2, 8\]"):
        OBQ(bits=bits)


def test_damp_and_group_size():
    with pytest.raises(ConfigError, match="damp"):
        GPTQ(bits=4, damp=-1)
    with pytest.raises(ConfigError, match="group_size"):
        RTN(bits=4, group_size=-8)


@pytest.mark.parametrize("cfg", [ExactOBS(sparsity=0.5, pattern="block4"), SparseGPT(pattern="2:4", resolve=True),
                                 OBQ(bits=3, group_size=64), GPTQ(bits=4, act_order=False), Magnitude(sparsity=0.1)])
def test_dict_round_trip(cfg):
    d = cfg.to_dict()
    assert d["type"] == type(cfg).__name__ and d["version"] == 1
    assert config_from_dict(d) == cfg


def test_unknown_type_field_version_are_refused():
    with pytest.raises(ConfigError, match="registered"):
        config_from_dict({"type": "os.system", "cmd": "rm"})
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_dict({"type": "OBQ", "bits": 4, "bitz": 3})
    with pytest.raises(ConfigError, match="version"):
        config_from_dict({"type": "OBQ", "version": 99, "bits": 4})


def test_recipe_yaml_round_trip():
    r = Recipe((Step(ExactOBS(sparsity=0.75), ignore=("fc3",)),
                Step(OBQ(bits=4), overrides=(("conv1", OBQ(bits=8)),))), CalibOptions(bn_reestimate=True))
    assert load_recipe(dump_recipe(r)) == r


def test_recipe_errors_name_the_problem():
    with pytest.raises(ConfigError, match="brainsurgeon_recipe"):
        load_recipe("steps: []")
    with pytest.raises(ConfigError, match="steps' is empty"):
        load_recipe("brainsurgeon_recipe: 1\nsteps: []")
    with pytest.raises(ConfigError, match="unknown key"):
        load_recipe("brainsurgeon_recipe: 1\nsteps: [{method: {type: OBQ}, ignor: [x]}]")
    with pytest.raises(ConfigError, match="python/object"):
        load_recipe("brainsurgeon_recipe: 1\nsteps: !!python/object:os.system {}")
    with pytest.raises(ConfigError, match="quantize config"):
        Step(ExactOBS(sparsity=0.5), overrides=(("x", OBQ(bits=4)),))
