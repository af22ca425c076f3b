"""ChannelPruning: validation errors name the field and the fix; dict/YAML round trip."""

import pytest
import yaml

from brainsurgeon.config import config_from_dict
from brainsurgeon.errors import ConfigError
from brainsurgeon.prune import ChannelPruning


@pytest.mark.parametrize("kw,match", [
    ({"ratio": 1.0}, r"ratio .* must be in \[0, 1\)"),
    ({"ratio": -0.1}, r"ratio"),
    ({"scope": "layer"}, r"scope must be one of \['local', 'global'\]"),
    ({"max_layer_ratio": 1.0}, r"max_layer_ratio must be in \(0, 1\)"),
    ({"ratio": 0.95, "max_layer_ratio": 0.9}, r"raise max_layer_ratio or lower ratio"),
    ({"steps": 0}, r"steps must be an integer >= 1"),
    ({"round_to": 0}, r"round_to must be an integer >= 1"),
    ({"ignore": 3}, r"ignore must be a module-name regex or a list of them"),
    ({"ignore": ["("]}, r"ChannelPruning.ignore pattern '\(' is not a valid regular expression"),
    ({"normalize": "l2"}, r"normalize must be one of"),
    ({"reconstruct": "yes"}, r"reconstruct must be one of \['none', 'obs'\]"),
    ({"importance": "magnitude"}, r"unknown importance 'magnitude'; registered: .*@register_importance"),
])
def test_invalid_fields_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        ChannelPruning(**kw)


def test_a_plain_string_ignore_is_one_pattern():
    assert ChannelPruning(ratio=0.5, ignore="fc").ignore == ("fc",)


def test_global_scope_may_exceed_the_layer_guard_ratio():
    assert ChannelPruning(ratio=0.95, scope="global", max_layer_ratio=0.9).ratio == 0.95


def test_round_trip_through_yaml():
    cfg = ChannelPruning(ratio=0.3, importance="obs", reconstruct="obs", ignore=("fc2", "head.*"), round_to=8)
    text = yaml.safe_dump(cfg.to_dict())
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_needs_calib():
    assert not ChannelPruning(importance="group_l2").needs_calib
    assert ChannelPruning(importance="taylor").needs_calib
    assert ChannelPruning(importance="l2", reconstruct="obs").needs_calib
