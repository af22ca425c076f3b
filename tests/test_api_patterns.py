"""N:M / block patterns on layers that cannot take them: kept dense with one note each, or refused (strict)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.cli.main import main
from brainsurgeon.config import Step
from brainsurgeon.errors import ConfigError
from brainsurgeon.planning import check_step


def _mixed() -> nn.Module:
    """1-channel stem, a depthwise conv, a normal conv, a 6-feature Linear and a normal Linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),            # 0: 1 input channel          -> skipped
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # 2: depthwise, 1 per group   -> skipped
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),                       # 3: 8 input channels         -> 2:4
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 6),                  # 5: 128 features             -> 2:4
        nn.Linear(6, 4),                          # 6: 6 features               -> skipped
    ).eval()




def test_mixed_model_skips_exactly_the_layers_the_pattern_cannot_divide():
    m = nn.Sequential(*list(_mixed().children()))
    calib = [torch.randn(4, 1, 4, 4)]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    rep = bs.sparsify_(m, bs.SparseGPT(sparsity=0.5, pattern="2:4"), calib)
    assert [r.name for r in rep.rows] == ["3", "5"]
    skipped = [n for n in rep.notes if "kept dense" in n]
    assert len(skipped) == 3
    assert [n.split()[0] for n in skipped] == ["0", "1", "6"]
    assert "(8, 1, 3, 3)" in skipped[0] and "strict=True" in skipped[0] and "2:4" in skipped[0]
    for name in ("0", "1", "6"):
        assert torch.equal(dict(m.named_parameters())[f"{name}.weight"], before[f"{name}.weight"])
    for name in ("3", "5"):  # 2 of every 4 input columns kept
        W = dict(m.named_modules())[name].weight.detach()
        W = W.permute(0, 2, 3, 1).reshape(W.shape[0], -1) if W.dim() == 4 else W
        assert int((W.reshape(W.shape[0], -1, 4) != 0).sum(-1).max()) <= 2


def test_strict_refuses_and_leaves_the_model_untouched():
    m = nn.Sequential(*list(_mixed().children()))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(ConfigError, match=r"layer 0: input channels = 1 is not divisible by the group size 4"):
        bs.sparsify_(m, bs.SparseGPT(sparsity=0.5, pattern="2:4"), [torch.randn(4, 1, 4, 4)],
                     options=bs.CalibOptions(strict=True))
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_check_step_reports_the_same_skips_and_strict_refusals():
    m = nn.Sequential(*list(_mixed().children()))
    step = Step(bs.SparseGPT(sparsity=0.5, pattern="2:4"))
    plan, notes, refusals = check_step(m, step)
    assert list(plan) == ["3", "5"] and refusals == [] and sum("kept dense" in n for n in notes) == 3
    plan, notes, refusals = check_step(m, step, bs.CalibOptions(strict=True))
    assert len(refusals) == 3 and not any("kept dense" in n for n in notes)


def test_no_layer_left_is_a_clear_error():
    m = nn.Sequential(nn.Conv2d(3, 6, 3))
    with pytest.raises(ConfigError, match="no layer of Sequential can take the step's pattern"):
        bs.sparsify_(m, bs.SparseGPT(sparsity=0.5, pattern="2:4"), [torch.randn(2, 3, 8, 8)])


def test_cli_dry_run_reports_the_skip(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("brainsurgeon_recipe: 1\nsteps:\n  - method: {type: SparseGPT, sparsity: 0.5, pattern: '2:4'}\n")
    assert main(["compress", "--model", "digits-cnn", "--recipe", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "note: conv1 (16, 1, 3, 3) kept dense" in out and "REFUSED" not in out
    assert "layers: conv2, conv3, fc1, fc2" in out
    strict = tmp_path / "s.yaml"
    strict.write_text(recipe.read_text() + "calib: {strict: true}\n")
    main(["compress", "--model", "digits-cnn", "--recipe", str(strict), "--dry-run"])
    assert "REFUSED: layer conv1: input channels = 1" in capsys.readouterr().out


def test_mobilenet_v2_2_4_skips_depthwise_and_stem():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.mobilenet_v2(weights=None).eval()
    depthwise = [n for n, c in m.named_modules() if isinstance(c, nn.Conv2d) and c.groups > 1]
    rep = bs.sparsify_(m, bs.SparseGPT(sparsity=0.5, pattern="2:4"), [torch.randn(2, 3, 32, 32)],
                       options=bs.CalibOptions(mode="dense"))
    skipped = sorted(n.split()[0] for n in rep.notes if "kept dense" in n)
    assert skipped == sorted(["features.0.0", *depthwise]) and len(depthwise) == 17
    assert "features.0.0" not in {r.name for r in rep.rows}
    assert all(m.get_submodule(n).weight.ne(0).all() for n in skipped)
