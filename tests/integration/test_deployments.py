"""`make serve` end to end: prefect.yaml's deployments on a local Prefect server, a run started
from a deployment as the UI's Run button starts it, picked up by the process worker, recorded
in the local MLflow server; then `make stop` leaves no process behind.

The stack is infra/local/serve.sh's (what `make serve` runs) with its state in a temporary
folder and free ports, shared with tests/browser/test_ui.py when both run in one session
(see `shared_local_stack` in tests/browser/conftest.py): started once, about a minute.
The flow run trains the demo recipe briefly (20 SFT steps, 4 DPO steps): about a minute.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from local_stack import DEPLOYMENTS, MODEL, POOL, SERVE, LocalStack, shared_local_stack, small_recipe
from servers import server_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """The session's local stack (started here unless the browser test already did)."""
    yield from shared_local_stack(tmp_path_factory)


@pytest.fixture(scope="module")
def manual_run(stack: LocalStack):
    """A finetune run of `finetune/finetune-manual` created through the API (what the UI's Run button
    calls), with the small recipe; returns the final flow run."""
    recipe = small_recipe(stack.state_dir / "runs", "name=deployment-test")
    with stack.prefect() as client:
        deployment = client.read_deployment_by_name("finetune/finetune-manual")
        start = time.monotonic()
        created = client.create_flow_run_from_deployment(deployment.id, parameters={"recipe": recipe})
    flow_run = stack.wait_for_flow_run(created.id, timeout=600)
    stack.timings["manual flow run"] = time.monotonic() - start
    return flow_run


def test_serve_deployed_every_deployment_onto_the_process_pool(stack: LocalStack):
    with stack.prefect() as client:
        pool = client.read_work_pool(POOL)
        deployments = {name: client.read_deployment_by_name(name) for name in DEPLOYMENTS}
        deployed = {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}
    assert pool.type == "process"
    assert pool.status.value == "READY", "the worker serve.sh started polls the pool"
    assert deployed == set(DEPLOYMENTS)
    assert {name: d.work_pool_name for name, d in deployments.items()} == dict.fromkeys(DEPLOYMENTS, POOL)
    assert deployments["finetune/finetune-manual"].entrypoint == "flows/finetune.py:finetune"
    # The pull step recorded this checkout: the worker starts flow runs in it.
    for deployment in deployments.values():
        (step,) = deployment.pull_steps
        assert Path(step["prefect.deployments.steps.set_working_directory"]["directory"]).resolve() == REPO


def test_weekly_retraining_is_scheduled_sundays_0300_utc(stack: LocalStack):
    with stack.prefect() as client:
        weekly = client.read_deployment_by_name("finetune/finetune-weekly")
        others = [client.read_deployment_by_name(name) for name in DEPLOYMENTS if name != "finetune/finetune-weekly"]
    assert len(weekly.schedules) == 1
    schedule = weekly.schedules[0]
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 3 * * 0", "UTC", True)
    assert weekly.parameters == {"skip_unchanged_data": True}
    assert weekly.global_concurrency_limit.limit == 1  # prefect.yaml's concurrency_limit: one retraining at a time
    assert all(not deployment.schedules for deployment in others)


def test_serve_refuses_to_start_a_second_stack_on_the_same_state(stack: LocalStack):
    before = stack.processes()
    result = subprocess.run(
        [str(SERVE)], cwd=REPO, env=server_env({"VLMOPS_STATE_DIR": str(stack.state_dir)}),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "already running" in result.stderr and "make stop" in result.stderr, result.stderr
    assert set(stack.processes()) >= set(before), "the refused start stopped nothing"


def test_manual_run_completes_on_the_worker_and_registers_a_candidate(stack: LocalStack, manual_run):
    assert manual_run.state.is_completed(), stack.explain(manual_run)
    assert manual_run.name == "finetune deployment-test on builtin:tiny-smolvlm"  # renamed by the flow itself
    version = stack.registered_version(manual_run.id)
    client = stack.mlflow()
    assert client.get_model_version_by_alias(MODEL, "candidate").version == version
    tags = client.get_model_version(MODEL, version).tags
    assert tags["prefect.flow_run_url"] == f"{stack.prefect_url}/runs/flow-run/{manual_run.id}"
    # The worker gave the run the stack's tracking server: its artifacts went through the server's proxy.
    run = client.get_run(tags["vlmops.run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")


def test_stop_leaves_no_process_of_the_stack(stack: LocalStack):
    """Last in the module: `make stop` stops every group (and the flow runs' processes) and says so."""
    processes = stack.processes()
    assert len(processes) >= 3, processes
    result = stack.stop()
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("worker", "mlflow-server", "prefect-server"):
        assert f"stop: {name} stopped" in result.stdout, result.stdout
    survivors = {pid: command for pid, command in processes.items() if _alive(pid)}
    assert not survivors, f"processes of the stack survive `make stop`: {survivors}"
    assert not list(stack.state_dir.glob("*.pid")), "stop.sh removes the PID files of what it stopped"
    for url in (stack.prefect_url, stack.mlflow_url):
        address = urlparse(url)
        with socket.socket() as sock:
            assert sock.connect_ex((address.hostname, address.port)) != 0, f"{url} still answers"
    # A second stop finds nothing to do.
    again = stack.stop()
    assert again.returncode == 0 and "nothing was running" in again.stdout, again.stdout


def _alive(pid: int) -> bool:
    """A process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"
