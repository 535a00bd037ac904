"""Integration fixtures: a real `mlflow server` (SQLite + local artifacts) on loopback.

Started once per test module (about 10 s on 2 cores) so each module gets a fresh store and
MLFLOW_TRACKING_URI points at it only while that module's tests run.
"""

from __future__ import annotations

from collections.abc import Iterator

import mlflow
import pytest
from mlflow.tracking._tracking_service import utils as tracking_utils
from servers import MlflowServer, start_mlflow_server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """A running tracking server with registry and proxied artifacts; MLFLOW_TRACKING_URI points at it.

    Afterwards the environment and mlflow's process-wide tracking URI are what they were,
    and no process of the server's group is left.
    """
    tmp = tmp_path_factory.mktemp("mlflow-server")
    server = start_mlflow_server(
        f"sqlite:///{tmp / 'mlflow.db'}", tmp / "artifacts", log_path=tmp / "mlflow-server.log"
    )
    patch = pytest.MonkeyPatch()
    # mlflow.set_tracking_uri (tasks/tracking.py calls it) sets a module global and the env var.
    previous_uri = tracking_utils._tracking_uri
    patch.setenv("MLFLOW_TRACKING_URI", server.url)
    try:
        yield server
    finally:
        mlflow.set_tracking_uri(previous_uri)  # None clears the global (and the env var, restored next)
        patch.undo()
        server.stop()
        assert not server.group_alive(), f"mlflow server processes survive: {server.group_members()}"
