"""Pruning history round trip, blocked-op report, unit validation, the analyze CLI, leave-no-trace."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from graph_fixtures import build
from torch import nn

from brainsurgeon.errors import ConfigError, FormatError, SurgeryError, UnsupportedOpError
from brainsurgeon.graph import DependencyGraph, load_history, replay, save_history


def _prune_half(g: DependencyGraph) -> None:
    g.prune([grp.select(torch.arange(0, grp.n, 2)) for grp in g.groups()])


@pytest.mark.parametrize("name", ["ResidualAdd", "GroupConv", "LSTM", "TiedEmbedding"])
def test_history_replay_gives_identical_weights(name, tmp_path):
    model, x = build(name)
    fresh = copy.deepcopy(model)
    g = DependencyGraph(model, x)
    _prune_half(g)
    g.groups()[0].select([0]).prune()           # a second step, after re-tracing
    save_history(g, tmp_path / "h.json")
    replay(fresh, load_history(tmp_path / "h.json"), example_inputs=x)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        torch.testing.assert_close(fresh(*x), model(*x), rtol=0, atol=0)


def test_history_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FormatError, match="not a brainsurgeon pruning history"):
        load_history(bad)
    bad.write_text("{truncated")
    with pytest.raises(FormatError, match="cannot be read"):
        load_history(bad)
    model, _ = build("ResidualAdd")
    with pytest.raises(SurgeryError, match="no module 'nope'"):
        replay(model, [{"slices": [{"module": "nope", "tensor": "weight", "dim": 0, "idxs": [0]}]}])


def test_unit_validation_and_whole_units():
    model, x = build("GroupConv")
    g = DependencyGraph(model, x)
    with pytest.raises(ConfigError, match=r"units of 4 .*e\.g\. idxs=\[0, 1, 2, 3\]"):
        g.group(model.c1, "out", [0, 1])
    grp = g.group(model.c1, "out", [4, 5, 6, 7])
    assert grp.n == 1 and grp.root.idxs.tolist() == [[4, 5, 6, 7]]
    with pytest.raises(ConfigError, match="rows must lie in"):
        grp.select([1])


class _HardCoded(nn.Module):
    """Sums a fixed 6 channels: pruning conv1 keeps every shape downstream but would change the meaning."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(1, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)[:, :6].sum(1, keepdim=True))


def test_hard_coded_size_is_caught_and_model_restored():
    torch.manual_seed(0)
    model, x = _HardCoded().eval(), torch.randn(1, 3, 4, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = DependencyGraph(model, x)
    with pytest.raises(SurgeryError, match=r"aten\.slice \(op 1\) was skipped"):
        g.group(model.conv1, "out", [0, 1]).prune()        # conv1 keeps 6 rows -> the slice still returns 6
    assert model.conv1.out_channels == 8
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class _Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return self.conv2(torch.linalg.matrix_exp(y))    # no rule: blocks every dim of y


def test_op_without_rule_blocks_and_is_reported():
    model, x = _Unknown().eval(), torch.randn(1, 3, 4, 4)
    g = DependencyGraph(model, x)
    with pytest.raises(UnsupportedOpError, match="linalg_matrix_exp"):
        g.group(model.conv1, "out", [0])
    assert g.groups() == []
    assert "linalg_matrix_exp" in g.report()


def test_leaves_no_trace():
    model, x = build("ResidualAdd")
    model.train()
    flags = {n: m.training for n, m in model.named_modules()}
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    g = DependencyGraph(model, x, train_trace=True)
    g.groups()
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k       # train-mode trace restored BN running statistics


def test_analyze_cli_prints_groups(capsys):
    import argparse

    from brainsurgeon.cli import analyze

    parser = argparse.ArgumentParser()
    analyze.add_parser(parser.add_subparsers())
    args = parser.parse_args(["analyze", "--model", "digits-cnn", "--format", "json"])
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert [grp["root"] for grp in info["groups"]] == ["conv1.weight", "conv2.weight", "conv3.weight", "fc1.weight"]
    assert info["left_out"] == [{"set": "fc2.weight dim 0", "reason": "model output"}]
    with pytest.raises(ConfigError, match="--input-shape"):
        analyze.run(parser.parse_args(["analyze", "--model", "digits-cnn", "--input-shape", "a,b"]))
