"""Bugs 13.#8 (compress --dry-run plans like the run) and 13.#13 (CLI errors: clear, rc 2, JSON on request)."""

import json

from brainsurgeon.cli.main import main


def _recipe(tmp_path, body: str) -> str:
    p = tmp_path / "r.yaml"
    p.write_text("brainsurgeon_recipe: 1\nsteps:\n" + body)
    return str(p)


def test_dry_run_reports_every_pattern_refusal_with_rc_2(tmp_path, capsys):
    r = _recipe(tmp_path, "  - method: {type: ExactOBS, pattern: '2:4'}\n")
    assert main(["compress", "--model", "digits-cnn", "--recipe", r, "--dry-run", "--format", "json"]) == 2
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["refusals"]) == 1 and "conv1" in plan["refusals"][0] and "ignore=['conv1']" in plan["refusals"][0]
    assert plan["steps"][0]["layers"] == ["conv1", "conv2", "conv3", "fc1", "fc2"]


def test_dry_run_of_a_valid_recipe_lists_the_planned_layers(tmp_path, capsys):
    r = _recipe(tmp_path, "  - method: {type: ExactOBS, pattern: '2:4'}\n    ignore: [conv1]\n")
    assert main(["compress", "--model", "digits-cnn", "--recipe", r, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layers: conv2, conv3, fc1, fc2" in out and "REFUSED" not in out
