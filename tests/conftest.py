"""Shared fixtures: the built tiny model and one Prefect test harness for the whole session.

The offline tiny SmolVLM is built once into the repository's `.cache/` (ignored by git)
unless VLMOPS_CACHE_DIR points elsewhere, so tests never touch the user's own cache.
"""

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("VLMOPS_CACHE_DIR", str(REPO / ".cache" / "vlmops"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # its telemetry writes race the test harness
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # plain-function tests log too
# Cached task results (validation, formatting, training) go to a throwaway folder, not ~/.prefect.
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", tempfile.mkdtemp(prefix="vlmops-prefect-results-"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from tasks.tiny_model import tiny_smolvlm_path

    return tiny_smolvlm_path()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for every flow test: starting one costs 12-15 s."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def isolated_mlflow(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store and artifact folder under tmp_path; cwd moves there too."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """No hub access, and a datasets cache under tmp_path instead of the user's."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets
