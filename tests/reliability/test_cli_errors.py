"""Bugs 13.#8 (compress --dry-run plans like the run) and 13.#13 (CLI errors: clear, rc 2, JSON on request)."""

import json
import re

import pytest

from brainsurgeon.cli.main import main


def _recipe(tmp_path, body: str) -> str:
    p = tmp_path / "r.yaml"
    p.write_text("brainsurgeon_recipe: 1\nsteps:\n" + body)
    return str(p)


def test_dry_run_reports_every_pattern_refusal_with_rc_2(tmp_path, capsys):
    r = _recipe(tmp_path, "  - method: {type: ExactOBS, pattern: '2:4'}\ncalib: {strict: true}\n")
    assert main(["compress", "--model", "digits-cnn", "--recipe", r, "--dry-run", "--format", "json"]) == 2
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["refusals"]) == 1 and "conv1" in plan["refusals"][0] and "ignore=['conv1']" in plan["refusals"][0]
    assert plan["steps"][0]["layers"] == ["conv1", "conv2", "conv3", "fc1", "fc2"]


def test_dry_run_without_strict_keeps_the_layer_dense_with_a_note(tmp_path, capsys):
    r = _recipe(tmp_path, "  - method: {type: ExactOBS, pattern: '2:4'}\n")
    assert main(["compress", "--model", "digits-cnn", "--recipe", r, "--dry-run", "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["refusals"] == [] and plan["steps"][0]["layers"] == ["conv2", "conv3", "fc1", "fc2"]
    assert [n.split()[0] for n in plan["steps"][0]["notes"] if "kept dense" in n] == ["conv1"]


def test_dry_run_of_a_valid_recipe_lists_the_planned_layers(tmp_path, capsys):
    r = _recipe(tmp_path, "  - method: {type: ExactOBS, pattern: '2:4'}\n    ignore: [conv1]\n")
    assert main(["compress", "--model", "digits-cnn", "--recipe", r, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "layers: conv2, conv3, fc1, fc2" in out and "REFUSED" not in out


# ------------------------------------------------- 13.#13: every failure is clear, rc 2, JSON on request

BAD = {  # argv -> (exit code, error type, text in the message)
    "bad input shape": (["analyze", "--model", "digits-cnn", "--input-shape", "1,3"], 2, "CalibrationError",
                        r"--input-shape 1,3: the model's forward fails.*conv1 is a Conv2d with 1 input channels.*"
                        r"e\.g\. --input-shape 1,1,8,8"),
    "absurd input shape": (["analyze", "--model", "digits-cnn", "--input-shape", "100000000,1,8,8"], 2,
                           "CalibrationError", r"needs about [\d.]+ GiB .* is available; use a smaller batch"),
    "non-integer input shape": (["analyze", "--model", "digits-cnn", "--input-shape", "a,b"], 2, "ConfigError",
                                "comma-separated integers"),
    "bad ignore regex": (["analyze", "--model", "digits-cnn", "--ignore", "[fc"], 2, "ConfigError",
                         r"--ignore pattern '\[fc' is not a valid regular expression"),
    "ignore typo": (["analyze", "--model", "digits-cnn", "--ignore", "fc9"], 2, "ConfigError",
                    r"matches no module.*did you mean"),
    "unknown flag": (["analyze", "--model", "digits-cnn", "--bogus"], 2, "UsageError", "unrecognized arguments"),
    "bad choice": (["compress", "--model", "nope", "--recipe", "x.yaml"], 2, "UsageError", "invalid choice"),
    "missing recipe": (["compress", "--model", "digits-cnn", "--recipe", "missing.yaml", "--dry-run"], 2,
                       "ConfigError", "not found"),
    "prune bad regex": (["prune", "--model", "digits-cnn", "--ignore", "(conv", "--out", "x"], 2, "ConfigError",
                        r"ChannelPruning.ignore pattern '\(conv' is not a valid regular expression"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("fmt", ["table", "json"])
def test_cli_failures_are_clear_errors(case, fmt, capsys):
    argv, rc, kind, text = BAD[case]
    assert main(argv + ["--format", fmt]) == rc
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert re.search(text, err), err
    if fmt == "json":
        obj = json.loads(out.strip().splitlines()[-1])
        assert obj["error"]["type"] == kind and obj["error"]["exit_code"] == rc
        assert re.search(text, obj["error"]["message"])


def test_a_wrongly_typed_recipe_is_rc_2_with_the_field(tmp_path, capsys):
    r = _recipe(tmp_path, "  - method: {type: ExactOBS, sparsity: 0.5, damp: '0.01'}\n")
    assert main(["compress", "--model", "digits-cnn", "--recipe", r, "--dry-run", "--format", "json"]) == 2
    obj = json.loads(capsys.readouterr().out)
    assert obj["error"]["type"] == "ConfigError" and "ExactOBS.damp must be a number" in obj["error"]["message"]


def test_an_unexpected_exception_is_rc_1_with_a_json_error(monkeypatch, capsys):
    from brainsurgeon.cli import env

    def boom(args):
        raise KeyError("internal")

    monkeypatch.setattr(env, "run", boom)
    assert main(["env", "--format", "json"]) == 1
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert obj["error"]["type"] == "KeyError" and "unexpected KeyError in `brainsurgeon env`" in obj["error"]["message"]


def test_dry_run_refusals_carry_a_json_error(tmp_path, capsys):
    r = _recipe(tmp_path, "  - method: {type: ExactOBS, pattern: '2:4'}\ncalib: {strict: true}\n")
    assert main(["compress", "--model", "digits-cnn", "--recipe", r, "--dry-run", "--format", "json"]) == 2
    obj = json.loads(capsys.readouterr().out)
    assert obj["error"]["exit_code"] == 2 and "conv1" in obj["error"]["message"]
