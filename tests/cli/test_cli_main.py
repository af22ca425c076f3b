from __future__ import annotations

import json

import pytest

from brainsurgeon import _log
from brainsurgeon.cli.main import build_parser, main


@pytest.mark.parametrize("argv", [[], ["env"], ["compress"], ["demo"]])
def test_every_help_ends_with_examples(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    tail = out[out.rindex("examples:"):]
    assert "brainsurgeon " in tail and out.rstrip().endswith(tail.rstrip())


def test_env_table_and_json(capsys):
    assert main(["env"]) == 0
    assert "torch:" in capsys.readouterr().out
    assert main(["env", "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("brainsurgeon", "torch", "python", "platform", "torch threads", "cuda available"):
        assert key in info


def test_global_flags_work_before_and_after_the_command():
    p = build_parser()
    assert p.parse_args(["--no-progress", "env"]).no_progress is True
    assert p.parse_args(["env", "--no-progress"]).no_progress is True
    assert p.parse_args(["--log-level", "info", "env"]).log_level == "info"
    assert p.parse_args(["env"]).no_progress is False


def test_progress_switch_is_restored(monkeypatch):
    seen = []
    monkeypatch.setattr("brainsurgeon.cli.env.collect", lambda: seen.append(_log.progress_enabled()) or {"k": 1})
    _log.set_progress(False)
    assert main(["env"]) == 0 and main(["env", "--no-progress"]) == 0
    monkeypatch.setenv("CI", "true")
    assert main(["env"]) == 0
    assert seen == [True, False, False]
    assert _log.progress_enabled() is False


def test_bad_recipe_is_a_clean_error_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("brainsurgeon_recipe: 1\nsteps:\n  - method: {type: ExactOBS, sparsity: 1.5}\n")
    assert main(["compress", "--model", "digits-cnn", "--recipe", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe") and "sparsity must be in [0, 1)" in err
    assert "Traceback" not in err


def test_missing_recipe_file_says_so(capsys):
    assert main(["compress", "--model", "digits-cnn", "--recipe", "nope.yaml", "--dry-run"]) == 2
    assert "recipe file 'nope.yaml' not found" in capsys.readouterr().err


def test_unknown_model_is_a_usage_error(capsys, recipe_path):
    assert main(["compress", "--model", "resnet", "--recipe", str(recipe_path), "--dry-run"]) == 2
    assert "digits-cnn" in capsys.readouterr().err
