"""`vlmops` from the command line: exit codes and the reports users read."""

import shutil
import subprocess
from pathlib import Path

from flows.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")
SMALL = ["--set", "data.max_train_samples=40", "--set", "data.max_preference_samples=20", "--set", "data.max_eval_samples=10"]


def test_validate_passes_on_demo_data(prefect_harness, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "-c", DEMO, *SMALL]) == 0
    out = capsys.readouterr().out
    assert "data checks passed" in out and "sft/train" in out


def test_validate_fails_with_readable_report(prefect_harness, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # Every synthetic question is longer than 5 characters, so every row fails this check.
    assert main(["validate", "-c", DEMO, *SMALL, "--set", "validation.max_question_chars=5"]) == 1
    captured = capsys.readouterr()
    assert "data checks FAILED" in captured.err
    assert "question" in captured.out and "quarantine" in captured.out.lower()
    assert list((tmp_path / "runs" / "validation" / "quarantine").glob("*.jsonl"))


def test_unknown_recipe_key_exits_2_naming_key_and_file(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("sft:\n  learnin_rate: 0.1\n")
    assert main(["run", "-c", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "sft.learnin_rate" in err and str(recipe) in err


def test_console_script_is_installed():
    script = shutil.which("vlmops") or str(REPO / ".venv" / "bin" / "vlmops")
    completed = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0
    assert "validate" in completed.stdout and "run" in completed.stdout


def test_a_recipe_this_machine_cannot_run_exits_3_before_training(prefect_harness, tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("fp16 runs on a GPU: this checks the CPU refusal")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["run", "-c", DEMO, *SMALL, "--set", "sft.fp16=true"]) == 3
    err = capsys.readouterr().err
    assert "cannot run the recipe" in err and "sft.fp16 mixed precision needs a GPU" in err
    assert not list(tmp_path.glob("runs/cache/sft-*")), "training started although the hardware check failed"
