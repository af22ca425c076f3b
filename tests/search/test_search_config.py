"""SearchSpace / Budget validation, YAML round trips, and the variant grid."""

import pytest

from brainsurgeon.config import config_from_dict
from brainsurgeon.errors import ConfigError
from brainsurgeon.search import Budget, SearchSpace, layer_variants, load_space
from brainsurgeon.search.variants import unstructured_levels


def test_space_round_trips_through_dict_and_yaml(tmp_path):
    space = SearchSpace(levels=4, bits=(8, 4), nm_bits=(4,), ignore=("conv1",))
    assert config_from_dict(space.to_dict()) == space
    p = tmp_path / "space.yaml"
    p.write_text("levels: 4\nbits: [8, 4]\nnm_bits: [4]\nignore: [conv1]\n")
    assert load_space(str(p)) == space
    assert load_space("space: {levels: 4, bits: [8, 4], nm_bits: [4], ignore: [conv1]}") == space


@pytest.mark.parametrize("kw, field", [({"bits": (9,)}, "SearchSpace.bits"), ({"levels": -1}, "SearchSpace.levels"),
                                       ({"nm": ("4",)}, "pattern"), ({"max_sparsity": 1.0}, "max_sparsity"),
                                       ({"prune_method": "OBQ"}, "prune_method"), ({"act_bits": 0}, "act_bits"),
                                       ({"channel_importance": "x"}, "SearchSpace.channel_importance")])
def test_bad_space_fields_are_named(kw, field):
    with pytest.raises(ConfigError, match=field):
        SearchSpace(**kw)


def test_budget_parse_and_errors():
    assert Budget.parse("flops=0.25") == Budget("flops", 0.25)
    assert Budget.parse("bops=8x") == Budget("bops", 0.125)
    assert str(Budget("bytes", 0.5)) == "bytes=0.5"
    with pytest.raises(ConfigError, match="METRIC=FRACTION"):
        Budget.parse("0.25")
    with pytest.raises(ConfigError, match="Budget.metric"):
        Budget.parse("watts=0.5")
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        Budget.parse("flops=2")


def test_geometric_levels_and_variant_grid():
    levels = unstructured_levels(SearchSpace(levels=10, max_sparsity=0.95))
    dens = [1 - s for s in levels]
    ratios = [b / a for a, b in zip([1.0, *dens], dens, strict=False)]
    assert levels[-1] == 0.95 and max(ratios) - min(ratios) < 2e-3  # geometric in density (4-decimal levels)
    names = [v.name for v in layer_variants(SearchSpace(levels=2), in_channels=6)]  # 6: no 2:4, no block4
    assert names == ["dense", "sp@0.7764", "sp@0.9500", "w8", "w6", "w4", "w3", "w2"]
    v = {v.name: v for v in layer_variants(SearchSpace(levels=0), in_channels=8)}
    assert [type(c).__name__ for c in v["2:4+w4"].configs] == ["ExactOBS", "OBQ"]
    assert v["2:4+w4"].bits == 4 and v["2:4+w4"].sparsity == 0.5 and v["block4@0.7500"].pattern == "block4"
    sgpt = [v.name for v in layer_variants(SearchSpace(prune_method="SparseGPT", levels=0), in_channels=8)]
    assert not any(n.startswith("block") for n in sgpt)  # SparseGPT has no block pattern


def test_quant_sym_false_gives_asymmetric_grids_to_every_quantized_variant():
    vs = layer_variants(SearchSpace(levels=0, quant_sym=False), in_channels=16)
    quant = [c for v in vs for c in v.configs if type(c).verb == "quantize"]
    assert len(quant) == 7 and not any(c.sym for c in quant)  # w8/6/4/3/2 and 2:4+w8/w4
