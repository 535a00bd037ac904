"""The team stack for real, on loopback: PostgreSQL, a Prefect server and an MLflow server on
it, an S3 artifact store, and one pipeline run against them.

What infra/docker-compose.yml runs in containers runs here as local processes, configured
from the compose file itself: each server gets its service's `environment` (interpolated
with test credentials, service host names mapped to 127.0.0.1), PostgreSQL gets the
prefect database the compose file names and infra/postgres/init.sql. The S3 store is moto's
S3 server (MinIO has no Debian package); MLflow reaches it through the same
MLFLOW_S3_ENDPOINT_URL / AWS_* variables the compose file sets.

Then `vlmops run` (the CLI a team member runs, a subprocess with only PREFECT_API_URL,
PREFECT_API_AUTH_STRING and MLFLOW_TRACKING_URI pointing at the servers) trains the demo
recipe briefly, and the test checks the flow run COMPLETED in Prefect's API, the registered
version with alias `candidate` in MLflow's registry, the artifacts in the bucket, and the
rows in PostgreSQL itself. Both work pools prefect.yaml uses are created on the server, the
Kubernetes one from infra/k8s/gpu-job-template.json. Every process group is stopped and
checked gone.

Needs PostgreSQL's server binaries (Debian: `apt-get install postgresql`, which .ci/run does);
skipped, saying so, without them.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from servers import HOST, ManagedProcess, free_port, server_env, start_mlflow_server, venv_executable

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PROCESS_POOL, K8S_POOL = "vlmops-process", "vlmops-k8s-gpu"
# Small enough for 2 CPU cores, large enough for every stage to do real work.
OVERRIDES = [
    "data.max_train_samples=200", "data.max_preference_samples=40", "data.max_eval_samples=20",
    "sft.max_steps=20", "sft.logging_steps=5", "dpo.max_steps=4", "dpo.logging_steps=2",
    "evaluation.batch_size=20", "registry.registered_model_name=vlmops-team-adapter",
    "registry.experiment_name=vlmops-team",
]
COMPOSE_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")

pytestmark = pytest.mark.slow


def _postgres_bin() -> Path | None:
    """The newest installed PostgreSQL server's bin folder (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path else None


PG_BIN = _postgres_bin()
if PG_BIN is None or not all((PG_BIN / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
    pytest.skip(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) are not installed; "
        "Debian: apt-get install postgresql (.ci/run installs it)",
        allow_module_level=True,
    )


def _as_postgres_user() -> list[str]:
    """root may not run the PostgreSQL server: run it as the `postgres` account then."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _compose_env(service: str, values: dict[str, str], hosts: dict[str, str]) -> dict[str, str]:
    """`service`'s environment from infra/docker-compose.yml, interpolated, host:port mapped."""
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    rendered = {}
    for key, value in compose["services"][service]["environment"].items():
        value = COMPOSE_VAR.sub(lambda match: values[match.group(1)], str(value))
        for address, local in hosts.items():
            value = value.replace(address, local)
        rendered[key] = value
    return rendered


def _api(url: str, body: dict | None = None, auth: str | None = None) -> tuple[int, object]:
    """JSON request without proxies; returns (status, parsed body)."""
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


class Postgres:
    """A throwaway cluster on 127.0.0.1, password auth over TCP, like the compose service."""

    def __init__(self, root: Path, user: str, password: str):
        self.root, self.user, self.password = root, user, password
        self.port = free_port()
        self.data = root / "data"
        self.process: ManagedProcess | None = None

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(pwfile, "postgres")
        subprocess.run(
            [*_as_postgres_user(), str(PG_BIN / "initdb"), "-D", str(self.data), "-U", self.user,
             f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            check=True, capture_output=True, text=True, timeout=120,
        )
        self.process = ManagedProcess.start(
            "postgres",
            [*_as_postgres_user(), str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", f"listen_addresses={HOST}", "-c", f"unix_socket_directories={self.root}", "-c", "fsync=off"],
            log_path=self.root / "postgres.log",
        )
        deadline = time.monotonic() + 60
        while subprocess.run([str(PG_BIN / "pg_isready"), "-h", HOST, "-p", str(self.port)],
                             capture_output=True).returncode != 0:
            if self.process.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{(self.root / 'postgres.log').read_text()}")
            time.sleep(0.2)

    def psql(self, database: str, sql: str | None = None, file: Path | None = None) -> str:
        """Run SQL over TCP with the password, like the servers do; returns unaligned rows."""
        command = [shutil.which("psql") or str(PG_BIN / "psql"), "-h", HOST, "-p", str(self.port), "-U", self.user,
                   "-d", database, "-v", "ON_ERROR_STOP=1", "-At"]
        command += ["-f", str(file)] if file else ["-c", sql]
        result = subprocess.run(command, env={**os.environ, "PGPASSWORD": self.password},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def stop(self) -> None:
        if self.process is None:
            return
        # Fast shutdown (a plain SIGTERM waits for clients); then the group must be empty.
        subprocess.run([*_as_postgres_user(), str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                        "stop"], capture_output=True, timeout=60)
        self.process.stop()


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    """PostgreSQL + S3 (moto) + Prefect server + MLflow server, configured from the compose file."""
    timings: dict[str, float] = {}
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="vlmops-stack-"))
    root.chmod(0o755)  # the postgres account must reach root/pg
    values = {key: value for key, value in _env_example().items()}
    values.update(
        POSTGRES_USER="vlmops", POSTGRES_PASSWORD=secrets.token_hex(12),
        MINIO_ROOT_USER="vlmops", MINIO_ROOT_PASSWORD=secrets.token_hex(12),
        PREFECT_AUTH_STRING=f"vlmops:{secrets.token_hex(8)}",
    )
    postgres = Postgres(root / "pg", values["POSTGRES_USER"], values["POSTGRES_PASSWORD"])
    (root / "pg").mkdir()
    started: list = []
    try:
        start = time.monotonic()
        postgres.start()
        started.append(postgres)
        # What the postgres image does on first start: POSTGRES_DB, then docker-entrypoint-initdb.d.
        prefect_db = _compose_env("postgres", values, {})["POSTGRES_DB"]
        postgres.psql("postgres", f"CREATE DATABASE {prefect_db}")
        postgres.psql(prefect_db, file=INFRA / "postgres" / "init.sql")
        timings["postgres"] = time.monotonic() - start

        start = time.monotonic()
        s3_port = free_port()
        s3 = ManagedProcess.start(
            "s3", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(s3_port)],
            env=server_env(), log_path=root / "s3.log", url=f"http://{HOST}:{s3_port}", port=s3_port,
        )
        started.append(s3)
        s3.wait_http("/moto-api/", timeout=60)
        timings["s3"] = time.monotonic() - start

        hosts = {"@postgres:5432/": f"@{HOST}:{postgres.port}/", "http://minio:9000": s3.url}
        # create-bucket's job, with boto3 instead of MinIO's mc
        import boto3

        mlflow_env = _compose_env("mlflow", values, hosts)
        bucket_client = boto3.client(
            "s3", endpoint_url=mlflow_env["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
            aws_access_key_id=mlflow_env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=mlflow_env["AWS_SECRET_ACCESS_KEY"],
        )
        bucket_client.create_bucket(Bucket=values["MLFLOW_ARTIFACTS_BUCKET"])

        start = time.monotonic()
        prefect_env = _compose_env("prefect-server", values, hosts)
        assert prefect_env.pop("PREFECT_SERVER_DATABASE_HOST") == "postgres"
        prefect_env.update(PREFECT_SERVER_DATABASE_HOST=HOST, PREFECT_SERVER_DATABASE_PORT=str(postgres.port),
                           PREFECT_HOME=str(root / "prefect-home"))
        prefect_port = free_port()
        prefect_env["PREFECT_SERVER_UI_API_URL"] = f"http://{HOST}:{prefect_port}/api"
        environment = server_env(prefect_env)
        for key in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
            environment.pop(key, None)  # only the compose file's settings decide where the server stores
        prefect = ManagedProcess.start(
            "prefect-server",
            [venv_executable("prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
            env=environment, log_path=root / "prefect-server.log", url=f"http://{HOST}:{prefect_port}",
            port=prefect_port,
        )
        started.append(prefect)
        prefect.wait_http("/api/health", timeout=240)
        timings["prefect-server"] = time.monotonic() - start

        start = time.monotonic()
        mlflow_server = start_mlflow_server(
            mlflow_env["MLFLOW_BACKEND_STORE_URI"], mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"],
            log_path=root / "mlflow-server.log", timeout=240,
            extra_env={key: mlflow_env[key] for key in (
                "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_SERVER_ALLOWED_HOSTS",
            )},
        )
        started.append(mlflow_server)
        timings["mlflow-server"] = time.monotonic() - start

        yield {
            "root": root, "postgres": postgres, "prefect": prefect, "mlflow": mlflow_server, "s3": bucket_client,
            "values": values, "timings": timings, "groups": started,
        }
    finally:
        start = time.monotonic()
        for process in reversed(started):
            process.stop()
        timings["stop"] = time.monotonic() - start
        print("stack timings (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in timings.items()))
        survivors = {
            getattr(process, "name", "postgres"): (process.process if isinstance(process, Postgres) else process).group_members()
            for process in started
        }
        shutil.rmtree(root, ignore_errors=True)
        assert not any(survivors.values()), f"processes survive: {survivors}"


def _env_example() -> dict[str, str]:
    values = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def pipeline_run(stack, tmp_path_factory):
    """`vlmops run` on the demo recipe, as a team member runs it against the shared servers."""
    workdir = tmp_path_factory.mktemp("team-run")
    env = {
        **os.environ,
        "PREFECT_API_URL": f"{stack['prefect'].url}/api",
        "PREFECT_API_AUTH_STRING": stack["values"]["PREFECT_AUTH_STRING"],
        "MLFLOW_TRACKING_URI": stack["mlflow"].url,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }
    command = [venv_executable("vlmops"), "run", "-c", str(REPO / "configs" / "demo.yaml")]
    for override in OVERRIDES:
        command += ["--set", override]
    start = time.monotonic()
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=1200)
    stack["timings"]["vlmops run"] = time.monotonic() - start
    (workdir / "vlmops-run.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"vlmops run failed ({result.returncode}):\n{(result.stdout + result.stderr)[-6000:]}"
    run_id = re.search(r"MLflow run:\s+([0-9a-f]{32})", result.stdout).group(1)
    return {"run_id": run_id, "stdout": result.stdout, "workdir": workdir}


def test_flow_run_completed_in_the_prefect_server(stack, pipeline_run):
    prefect, auth = stack["prefect"], stack["values"]["PREFECT_AUTH_STRING"]
    status, runs = _api(f"{prefect.url}/api/flow_runs/filter",
                        {"flows": {"name": {"any_": ["finetune"]}}, "sort": "START_TIME_DESC"}, auth)
    assert status == 200, runs
    assert [run["state_type"] for run in runs] == ["COMPLETED"], [(r["name"], r["state_name"]) for r in runs]
    status, task_runs = _api(f"{prefect.url}/api/task_runs/filter",
                             {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}}, auth)
    assert status == 200 and {"COMPLETED"} == {task["state_type"] for task in task_runs}, task_runs
    # The basic auth of PREFECT_SERVER_API_AUTH_STRING is enforced.
    status, _ = _api(f"{prefect.url}/api/flow_runs/filter", {})
    assert status == 401
    # ... and the run is a row of the PostgreSQL database the compose file names.
    postgres = stack["postgres"]
    assert postgres.psql("prefect", f"SELECT state_type FROM flow_run WHERE id = '{runs[0]['id']}'") == "COMPLETED"


def test_candidate_version_is_in_the_mlflow_registry(stack, pipeline_run):
    from mlflow import MlflowClient

    client = MlflowClient(stack["mlflow"].url)
    run = client.get_run(pipeline_run["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts go through the server's proxy"
    version = client.get_model_version_by_alias("vlmops-team-adapter", "candidate")
    assert version.run_id == pipeline_run["run_id"]
    assert f"version {version.version} (alias 'candidate')" in pipeline_run["stdout"]

    # In PostgreSQL: the run, the registered model and its alias.
    postgres = stack["postgres"]
    assert postgres.psql("mlflow", f"SELECT status FROM runs WHERE run_uuid = '{pipeline_run['run_id']}'") == "FINISHED"
    assert postgres.psql(
        "mlflow", "SELECT version FROM registered_model_aliases "
                  "WHERE name = 'vlmops-team-adapter' AND alias = 'candidate'"
    ) == str(version.version)


def test_artifacts_are_in_the_s3_bucket(stack, pipeline_run):
    bucket = stack["values"]["MLFLOW_ARTIFACTS_BUCKET"]
    keys = []
    for page in stack["s3"].get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [item["Key"] for item in page.get("Contents", [])]
    assert any(key.endswith("adapter_config.json") for key in keys), keys[:20]
    assert any(key.endswith("MLmodel") for key in keys), "the registered pyfunc model is in the bucket"


def test_mlflow_answers_only_the_allowed_host_names(stack):
    """MLFLOW_SERVER_ALLOWED_HOSTS from .env.example: the compose service name passes, others not."""
    import http.client

    def status_for(host: str) -> int:
        connection = http.client.HTTPConnection(HOST, stack["mlflow"].port, timeout=10)
        connection.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
        status = connection.getresponse().status
        connection.close()
        return status

    assert status_for("mlflow:5000") == 200
    assert status_for(f"127.0.0.1:{stack['mlflow'].port}") == 200
    assert status_for("attacker.example.com") in (400, 403)


def test_both_work_pools_are_created_on_the_server(stack):
    """The pools prefect.yaml deploys to, the Kubernetes one from infra/k8s/gpu-job-template.json."""
    pytest.importorskip("prefect_kubernetes", reason="prefect-kubernetes (test extra) provides the kubernetes pool type")
    prefect, auth = stack["prefect"], stack["values"]["PREFECT_AUTH_STRING"]
    env = {**os.environ, "PREFECT_API_URL": f"{prefect.url}/api", "PREFECT_API_AUTH_STRING": auth}
    template = INFRA / "k8s" / "gpu-job-template.json"
    for name, extra in ((PROCESS_POOL, ["--type", "process"]),
                        (K8S_POOL, ["--type", "kubernetes", "--base-job-template", str(template)])):
        result = subprocess.run([venv_executable("prefect"), "--no-prompt", "work-pool", "create", name, *extra],
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    status, pool = _api(f"{prefect.url}/api/work_pools/{K8S_POOL}", auth=auth)
    assert status == 200 and pool["type"] == "kubernetes"
    assert pool["base_job_template"] == json.loads(template.read_text())
    status, pool = _api(f"{prefect.url}/api/work_pools/{PROCESS_POOL}", auth=auth)
    assert status == 200 and pool["type"] == "process"
    assert stack["postgres"].psql("prefect", "SELECT count(*) FROM work_pool WHERE name IN "
                                             f"('{PROCESS_POOL}', '{K8S_POOL}')") == "2"
