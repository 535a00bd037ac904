"""The local stack `make serve` starts, shared by the deployment and browser tests.

`LocalStack` runs infra/local/serve.sh (what `make serve` runs) with its state in a temporary
folder and free ports, and stop.sh (`make stop`). Starting it costs about a minute on 2
cores (both servers at once ~30 s, `prefect deploy --all` ~20-40 s, the worker ~5 s), so a
test session starts it once, in `<basetemp>/local-stack`: whichever of
tests/browser/test_ui.py and tests/integration/test_deployments.py comes first starts it,
the other finds it running there and uses it (`shared_local_stack`). The deployment test
ends by stopping it and checking that nothing survives; every fixture's teardown stops
whatever is still running.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from servers import free_port, log_tail, process_table, server_env

REPO = Path(__file__).resolve().parents[1]
SERVE, STOP = REPO / "infra" / "local" / "serve.sh", REPO / "infra" / "local" / "stop.sh"
SERVICES = ("prefect-server", "mlflow-server", "worker")
DEPLOYMENTS = ("finetune/finetune-weekly", "finetune/finetune-manual", "evaluate/evaluate", "promote/promote")
POOL = "vlmops-process"
MODEL = "vlmops-demo-adapter"
# Every stage does real work, in about a minute of flow run on 2 cores.
SMALL = [
    "data.max_train_samples=200", "data.max_preference_samples=32", "data.max_eval_samples=20",
    "sft.max_steps=20", "dpo.max_steps=4", "promotion.min_primary=0.0",
]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]


def small_recipe(output_dir: Path, *overrides: str) -> dict:
    """configs/demo.yaml made small (`SMALL`), as the JSON a deployment's `recipe` parameter takes."""
    from tasks.config import load_recipe

    recipe = load_recipe(REPO / "configs" / "demo.yaml", [*SMALL, f"output_dir={output_dir}", *overrides])
    return recipe.model_dump(mode="json")


@dataclass
class LocalStack:
    """A stack serve.sh started: the two servers' URLs, its state folder, its processes."""

    state_dir: Path
    prefect_url: str
    mlflow_url: str
    timings: dict[str, float] = field(default_factory=dict)
    serve_output: str = ""  # what serve.sh printed

    @property
    def api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @classmethod
    def serve(cls, state_dir: Path, timeout: float = 600) -> LocalStack:
        """Run serve.sh with its state in `state_dir` on two free ports; returns once all answer.

        Raises AssertionError with serve.sh's output (it prints the failing log's tail).
        """
        prefect_port = free_port()
        mlflow_port = free_port()
        while mlflow_port == prefect_port:
            mlflow_port = free_port()
        env = server_env({
            "VLMOPS_STATE_DIR": str(state_dir), "PREFECT_PORT": str(prefect_port), "MLFLOW_PORT": str(mlflow_port),
            # Flow runs' cached task results stay with the stack, not with the in-process test harness's.
            "PREFECT_LOCAL_STORAGE_PATH": str(state_dir / "prefect" / "storage"),
        })
        start = time.monotonic()
        result = subprocess.run([str(SERVE)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"serve.sh failed ({result.returncode}):\n{output[-8000:]}"
        stack = cls.running_in(state_dir)
        assert stack is not None, f"serve.sh succeeded but its processes are not all running:\n{output[-4000:]}"
        stack.timings["serve"] = time.monotonic() - start
        stack.serve_output = output
        return stack

    @classmethod
    def running_in(cls, state_dir: Path) -> LocalStack | None:
        """The stack whose state is `state_dir` if all its processes run, else None."""
        env_file = state_dir / "stack.env"
        if not env_file.is_file():
            return None
        values = dict(
            line.removeprefix("export ").split("=", 1)
            for line in env_file.read_text().splitlines() if line.startswith("export ")
        )
        stack = cls(state_dir, values["PREFECT_UI_URL"], values["MLFLOW_TRACKING_URI"])
        alive = {pgid for _pid, (_ppid, pgid, state, _cmd) in process_table().items() if state != "Z"}
        groups = stack.groups()
        return stack if len(groups) == len(SERVICES) and set(groups.values()) <= alive else None

    def groups(self) -> dict[str, int]:
        """service -> process group id, from the PID files serve.sh wrote."""
        return {
            name: int((self.state_dir / f"{name}.pid").read_text())
            for name in SERVICES if (self.state_dir / f"{name}.pid").is_file()
        }

    def processes(self) -> dict[int, str]:
        """pid -> command line of every live process of the stack: its groups and their descendants."""
        table = process_table()
        picked = {pid for pid, (_ppid, pgid, _state, _cmd) in table.items() if pgid in set(self.groups().values())}
        grew = True
        while grew:
            more = {pid for pid, (ppid, *_rest) in table.items() if ppid in picked and pid not in picked}
            picked |= more
            grew = bool(more)
        return {pid: table[pid][3] for pid in picked if table[pid][2] != "Z"}

    def stop(self) -> subprocess.CompletedProcess:
        """Run stop.sh (what `make stop` runs) for this stack; returns its result."""
        start = time.monotonic()
        result = subprocess.run(
            [str(STOP)], cwd=REPO, env=server_env({"VLMOPS_STATE_DIR": str(self.state_dir)}),
            capture_output=True, text=True, timeout=120,
        )
        if " stopped (" in result.stdout:
            self.timings["stop"] = time.monotonic() - start
        return result

    def prefect(self):
        """A Prefect client for this server, whatever PREFECT_API_URL / the test harness say."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url, httpx_settings={"trust_env": False})

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_url, registry_uri=self.mlflow_url)

    def wait_for_flow_run(self, flow_run_id, timeout: float = 600):
        """Poll the API until the flow run is final (or `timeout` s pass); returns the last read."""
        deadline = time.monotonic() + timeout
        with self.prefect() as client:
            while True:
                flow_run = client.read_flow_run(flow_run_id)
                if (flow_run.state and flow_run.state.is_final()) or time.monotonic() > deadline:
                    return flow_run
                time.sleep(2)

    def explain(self, flow_run) -> str:
        """A failed or hung flow run, for an assertion message: its state and the worker log's tail."""
        state = flow_run.state
        return (
            f"flow run {flow_run.id} ({flow_run.name}) is {state.type.value if state else None}: "
            f"{state.message if state else ''}\nworker log ({self.state_dir / 'logs' / 'worker.log'}):\n"
            f"{log_tail(self.state_dir / 'logs' / 'worker.log', 80)}"
        )

    def registered_version(self, flow_run_id) -> str:
        """The version of `MODEL` the flow run registered (lineage tag `prefect.flow_run_id`)."""
        versions = [
            v for v in self.mlflow().search_model_versions(f"name = '{MODEL}'")
            if v.tags.get("prefect.flow_run_id") == str(flow_run_id)
        ]
        assert len(versions) == 1, f"{len(versions)} versions of {MODEL} carry prefect.flow_run_id={flow_run_id}"
        return str(versions[0].version)


def shared_local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The session's stack in `<basetemp>/local-stack`: used if running there, else started; stopped at the end.

    For a fixture: `yield from shared_local_stack(tmp_path_factory)`. The teardown fails if
    stop.sh reports a survivor.
    """
    state_dir = tmp_path_factory.getbasetemp() / "local-stack"
    stack = LocalStack.running_in(state_dir)
    if stack is None:
        if state_dir.exists():
            LocalStack(state_dir, "", "").stop()  # a half-dead stack from an earlier test: clear its PID files
        try:
            stack = LocalStack.serve(state_dir)
        except BaseException:
            LocalStack(state_dir, "", "").stop()  # serve.sh cleans up after itself, unless it was killed
            raise
    try:
        yield stack
    finally:
        result = stack.stop()
        print(result.stdout.rstrip())
        print(f"local stack ({state_dir}) timings (s): "
              + ", ".join(f"{name} {seconds:.1f}" for name, seconds in stack.timings.items()))
        assert result.returncode == 0, f"stop.sh failed:\n{result.stdout}{result.stderr}"


