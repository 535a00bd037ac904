"""Every file under infra/ parses, and agrees with the project and with the engines that read it.

- compose (docker-compose.yml + .env.example): services, health checks, named volumes, ports,
  every `${VAR}` defined in .env.example and no secret committed; every PREFECT_* / MLFLOW_*
  name is one that Prefect / `mlflow server` really read; `docker compose config` (or
  Debian's docker-compose v1) validates the file when a compose CLI is installed;
- the image (Dockerfile): CUDA base, torch pinned as in pyproject.toml, the project installed,
  the `vlmops` entry point and the code prefect.yaml's entrypoints name;
- the Kubernetes work pool (k8s/gpu-job-template.json): Prefect's base job template shape,
  rendered by prefect-kubernetes' own KubernetesWorkerJobConfiguration into a Job that
  requests nvidia.com/gpu and that kubernetes' V1Job model accepts; the Helm worker values
  and the cache claim name the same pool, secret and claim;
- accelerate configs: read by accelerate's own config loader and launcher, the FSDP and
  DeepSpeed plugins built from what `accelerate launch` would export, each noting which
  quantization modes it supports.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shutil
import subprocess
import tomllib
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
COMPOSE_GPU = INFRA / "docker-compose.gpu.yml"
ENV_EXAMPLE = INFRA / ".env.example"
DOCKERFILE = INFRA / "Dockerfile"
JOB_TEMPLATE = INFRA / "k8s" / "gpu-job-template.json"
WORKER_VALUES = INFRA / "k8s" / "worker-values.yaml"
CACHE_PVC = INFRA / "k8s" / "cache-pvc.yaml"
ACCELERATE = INFRA / "accelerate"

# The ports the project documents: Prefect 4200, MLflow 5000, MinIO 9000 (S3) / 9001
# (console), PostgreSQL 5432.
PORTS = {"prefect-server": {4200}, "mlflow": {5000}, "minio": {9000, 9001}, "postgres": {5432}}
# Work pools, by type: what compose and the Helm values poll, and what prefect.yaml must deploy to.
POOLS = {"process": "vlmops-process", "kubernetes": "vlmops-k8s-gpu"}
# Values of these names are credentials: they may only come from .env (or a Kubernetes Secret).
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY|API_KEY")
# ${VAR}, ${VAR:-default}, ${VAR:?error}; `$${...}` is an escaped dollar for the container's shell.
COMPOSE_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# ---------------------------------------------------------------- helpers


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=VALUE"
            values[key.strip()] = value.strip()
    return values


def _filled_env() -> dict[str, str]:
    """.env.example with a value for every empty entry, as a user's infra/.env would have."""
    return {key: value or f"test{key.lower().replace('_', '')}1" for key, value in _env_example().items()}


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation, applied to every string in `value` (`$$` stays `$$`)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        current = env.get(name)
        if operator == ":?" and not current:
            raise KeyError(f"{name} is required: {argument}")
        if operator == ":-" and not current:
            return argument
        return current or ""

    return COMPOSE_VAR.sub(substitute, value)


def _strings(value) -> list[str]:
    """Every string in a parsed YAML document (compose interpolates values, not comments)."""
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _rendered_compose() -> dict:
    return interpolate(_compose(), _filled_env())


def _service_env(service: str) -> dict[str, str]:
    environment = _rendered_compose()["services"][service].get("environment", {})
    assert isinstance(environment, dict), f"{service}: write environment as a mapping"
    return {key: str(value) for key, value in environment.items()}


def _published_ports(service: dict) -> set[int]:
    ports = set()
    for entry in service.get("ports", []):
        container = str(entry).rsplit(":", 1)[-1].split("/")[0]
        ports.add(int(container))
    return ports


def _prefect_yaml() -> dict:
    path = REPO / "prefect.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _pool_names() -> dict[str, str]:
    """Pool name by type, as the infra files must use them (prefect.yaml is checked against these)."""
    return dict(POOLS)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _copied() -> set[str]:
    """Top-level paths of the build context that COPY puts into the image."""
    sources = set()
    for keyword, arguments in _dockerfile_instructions():
        if keyword == "COPY":
            sources |= {Path(source).parts[0] for source in arguments.split()[:-1] if not source.startswith("--")}
    return sources


def _dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, arguments in _dockerfile_instructions():
        if keyword == "ENV":
            for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", arguments):
                env[key] = value
    return env


def _job_template() -> dict:
    return json.loads(JOB_TEMPLATE.read_text())


def _job_container(template: dict) -> dict:
    return template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---------------------------------------------------------------- compose


def test_compose_runs_the_stack_with_health_checks_and_pinned_images():
    services = _compose()["services"]
    assert set(services) == {"postgres", "minio", "create-bucket", "prefect-server", "mlflow", "worker"}
    for name, service in services.items():
        if name == "create-bucket":
            assert service["restart"] == "no", "the bucket job runs once"
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        assert service.get("restart") == "unless-stopped", name
    for name, service in services.items():
        image = service["image"]
        if "${" in image:
            continue  # the project image: its tag is VLMOPS_IMAGE (checked against the job template)
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
    # Start order follows health, not just container start.
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    assert services["worker"]["depends_on"] == {
        "prefect-server": {"condition": "service_healthy"}, "mlflow": {"condition": "service_healthy"}
    }


def test_compose_keeps_state_in_named_volumes():
    compose = _compose()
    declared = set(compose["volumes"])
    mounted = set()
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source.startswith("."):
                # a bind mount: only configuration files from infra/, read-only
                assert (INFRA / source).is_file() and mount.endswith(":ro"), f"{name}: {mount}"
            else:
                assert source in declared, f"{name}: {source} is not a named volume"
                mounted.add(source)
    assert mounted == declared, f"declared but unused volumes: {declared - mounted}"
    assert "postgres-data:/var/lib/postgresql/data" in compose["services"]["postgres"]["volumes"]
    assert "minio-data:/data" in compose["services"]["minio"]["volumes"]


def test_every_compose_variable_is_in_env_example_and_every_example_is_used():
    used = {match.group(1) for text in _strings(_compose()) + _strings(yaml.safe_load(COMPOSE_GPU.read_text()))
            for match in COMPOSE_VAR.finditer(text)}
    example = _env_example()
    assert used - set(example) == set(), f"not in infra/.env.example: {sorted(used - set(example))}"
    # COMPOSE_PROJECT_NAME is read by compose itself.
    assert set(example) - used - {"COMPOSE_PROJECT_NAME"} == set(), "stale keys in .env.example"
    assert example["COMPOSE_PROJECT_NAME"] == "vlmops"


def test_no_secret_is_committed():
    example = _env_example()
    secrets = [key for key in example if SECRET_NAME.search(key)]
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "PREFECT_AUTH_STRING", "HF_TOKEN"} <= set(secrets)
    for key in secrets:
        assert example[key] == "", f".env.example must leave {key} empty"
    # In the compose file a credential is only ever a ${VAR} reference (or a URL built from them).
    for name, service in _compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:[-?][^}]*)?\}", str(value)), f"{name}.{key} is a literal"
            if "://" in str(value) and "@" in str(value):
                userinfo = urlsplit(COMPOSE_VAR.sub("VAR", str(value))).netloc.rpartition("@")[0]
                assert set(userinfo.split(":")) == {"VAR"}, f"{name}.{key}: literal credentials in a URL"
    # Kubernetes: secrets come from a Secret, never from the template or the Helm values.
    for entry in _job_container(_job_template())["env"]:
        if SECRET_NAME.search(entry["name"]):
            assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry
    values = WORKER_VALUES.read_text()
    assert not re.search(r"(?i)(api_?key|password|token)\s*:\s*\S", values.split("extraEnvVarsSecret")[0])
    # Nothing that looks like a real credential anywhere under infra/.
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not re.search(r"AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|-----BEGIN [A-Z ]*PRIVATE KEY", text), path


def test_compose_ports_and_addresses_agree_with_the_project():
    services = _rendered_compose()["services"]
    for name, ports in PORTS.items():
        assert _published_ports(services[name]) == ports, name
    # Databases and stores only on the host's loopback; the team reaches Prefect and MLflow.
    for name in ("postgres", "minio"):
        assert all(str(entry).startswith("127.0.0.1:") for entry in services[name]["ports"]), name

    worker = _service_env("worker")
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"

    prefect = _service_env("prefect-server")
    assert services["prefect-server"]["command"][-4:] == ["--host", "0.0.0.0", "--port", "4200"]
    assert (prefect["PREFECT_SERVER_DATABASE_HOST"], prefect["PREFECT_SERVER_DATABASE_PORT"]) == ("postgres", "5432")
    assert prefect["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert prefect["PREFECT_SERVER_DATABASE_NAME"] == _service_env("postgres")["POSTGRES_DB"] == "prefect"
    assert urlsplit(_env_example()["PREFECT_UI_API_URL"]).port == 4200

    mlflow_env = _service_env("mlflow")
    store = urlsplit(mlflow_env["MLFLOW_BACKEND_STORE_URI"])
    assert (store.scheme, store.hostname, store.port, store.path) == ("postgresql", "postgres", 5432, "/mlflow")
    assert "CREATE DATABASE mlflow;" in (INFRA / "postgres" / "init.sql").read_text()
    assert mlflow_env["MLFLOW_PORT"] == "5000" and mlflow_env["MLFLOW_HOST"] == "0.0.0.0"
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{_filled_env()['MLFLOW_ARTIFACTS_BUCKET']}/"
    assert "mlflow:5000" in mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(","), "the worker's Host header"
    assert services["minio"]["command"] == ["server", "/data", "--address", ":9000", "--console-address", ":9001"]
    assert "http://minio:9000" in services["create-bucket"]["command"][0]

    # Health checks probe the same ports.
    assert ":4200/api/health" in str(services["prefect-server"]["healthcheck"]["test"])
    assert ":5000/health" in str(services["mlflow"]["healthcheck"]["test"])
    assert "-p 5432" in str(services["postgres"]["healthcheck"]["test"])


def test_worker_health_port_is_prefects_default():
    from prefect.settings import Settings

    port = Settings().worker.webserver.port
    assert f":{port}/health" in str(_compose()["services"]["worker"]["healthcheck"]["test"])


def test_prefect_yaml_names_the_infra_pools():
    """Deployments only target pools the infra serves; both pools are named in prefect.yaml
    (on a deployment, or under `definitions.work_pools` for deployments to switch to)."""
    document = _prefect_yaml()
    deployed = {(deployment.get("work_pool") or {}).get("name") for deployment in document.get("deployments") or []}
    defined = {pool.get("name") for pool in ((document.get("definitions") or {}).get("work_pools") or {}).values()}
    if not (deployed | defined) & set(POOLS.values()):
        pytest.skip(f"prefect.yaml does not use the team work pools yet (it names {sorted(map(str, deployed))})")
    assert deployed <= set(POOLS.values()), f"prefect.yaml deploys to pools no infra file serves: {deployed - set(POOLS.values())}"
    assert set(POOLS.values()) <= deployed | defined, f"prefect.yaml never names {set(POOLS.values()) - deployed - defined}"


def test_compose_worker_polls_the_process_pool_of_prefect_yaml():
    command = _compose()["services"]["worker"]["command"]
    pool = command[command.index("--pool") + 1]
    assert command[command.index("--type") + 1] == "process"
    assert pool == _pool_names()["process"]


def test_prefect_variables_are_prefect_settings(monkeypatch):
    """Each PREFECT_* name the stack sets is one Prefect 3.9 reads (a typo would be ignored)."""
    from prefect.settings import Settings

    names = {}
    for service in ("prefect-server", "worker"):
        names.update({key: value for key, value in _service_env(service).items() if key.startswith("PREFECT_")})
    for entry in _job_container(_job_template())["env"]:
        if entry["name"].startswith("PREFECT_"):
            names.setdefault(entry["name"], "x:y")
    for key in list(os.environ):
        if key.startswith("PREFECT_"):
            monkeypatch.delenv(key)
    for key, value in names.items():
        monkeypatch.setenv(key, value)
    read = Settings().to_environment_variables(exclude_unset=True)
    assert set(names) - set(read) == set(), f"not Prefect settings: {sorted(set(names) - set(read))}"


def test_mlflow_variables_are_mlflow_server_options():
    import mlflow.cli
    import mlflow.environment_variables

    server_options = {param.envvar for param in mlflow.cli.server.params if param.envvar}
    known = server_options | {
        value.name for value in vars(mlflow.environment_variables).values() if hasattr(value, "name")
    }
    mlflow_env = _service_env("mlflow")
    for key in mlflow_env:
        if key.startswith("MLFLOW_"):
            assert key in known, f"mlflow server does not read {key}"
    # Those the server needs are options of `mlflow server` itself.
    assert {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_HOST", "MLFLOW_PORT",
            "MLFLOW_SERVE_ARTIFACTS", "MLFLOW_SERVER_ALLOWED_HOSTS"} <= server_options
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(mlflow_env)
    assert _compose()["services"]["mlflow"]["command"] == ["mlflow", "server"]


def test_the_project_reads_the_variables_the_stack_sets(monkeypatch):
    sources = "".join(path.read_text() for path in (REPO / "tasks").glob("*.py"))
    for name in ("MLFLOW_TRACKING_URI", "VLMOPS_CACHE_DIR"):
        assert f'"{name}"' in sources, f"tasks/ never reads {name}"
    import huggingface_hub
    import huggingface_hub.constants

    assert '"HF_HOME"' in Path(huggingface_hub.constants.__file__).read_text()
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert huggingface_hub.get_token() == "hf_test"
    worker = _service_env("worker")
    container = {entry["name"] for entry in _job_container(_job_template())["env"]}
    for name in ("MLFLOW_TRACKING_URI", "VLMOPS_CACHE_DIR", "HF_HOME", "HF_TOKEN"):
        assert name in worker and name in container, name


def test_versions_in_the_stack_match_the_project():
    import mlflow
    import prefect

    services = _compose()["services"]
    assert services["prefect-server"]["image"].startswith(f"prefecthq/prefect:{prefect.__version__}-")
    mlflow_dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert f"mlflow=={mlflow.__version__}" in mlflow_dockerfile
    assert services["mlflow"]["image"].endswith(f":{mlflow.__version__}")
    # The server's drivers: the versions the integration test runs the MLflow server with.
    from importlib.metadata import PackageNotFoundError, version

    for package, pattern in (("psycopg", r'"psycopg\[binary\]==([^"]+)"'), ("boto3", r"boto3==(\S+)")):
        pinned = re.search(pattern, mlflow_dockerfile)
        assert pinned, f"mlflow/Dockerfile: pin {package}"
        try:
            assert pinned.group(1) == version(package), f"{package}: the image and the tested environment differ"
        except PackageNotFoundError:
            pass
    # The PostgreSQL major version the integration test runs (Debian bookworm: 15).
    assert services["postgres"]["image"].startswith("postgres:15")


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return [shutil.which("docker-compose")]
    return None


def test_compose_cli_validates_the_files(tmp_path):
    """`compose config` needs no daemon: it validates the schema and the interpolation."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no compose CLI (docker compose plugin or Debian's docker-compose) is installed")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in _filled_env().items()))
    base = [*cli, "-f", str(COMPOSE), "-f", str(COMPOSE_GPU), "--env-file", str(env_file)]
    result = subprocess.run([*base, "config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)
    assert merged["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert merged["services"]["mlflow"]["environment"]["MLFLOW_PORT"] == "5000"
    # The empty passwords of .env.example are refused, naming the variable.
    unfilled = subprocess.run(
        [*cli, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config"], capture_output=True, text=True, timeout=60
    )
    assert unfilled.returncode != 0 and "POSTGRES_PASSWORD" in unfilled.stderr


# ---------------------------------------------------------------- the image


def test_dockerfile_builds_the_project_on_cuda():
    instructions = _dockerfile_instructions()
    base = next(arguments for keyword, arguments in instructions if keyword == "FROM")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", base), base
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    torch_pin = next(dep for dep in _pyproject()["project"]["dependencies"] if dep.startswith("torch=="))
    torch_run = next(i for i, run in enumerate(runs) if "pip install" in run and "torch==" in run)
    assert f"pip install {torch_pin}" in runs[torch_run], "the image's torch must be the pinned version"
    project_run = next(i for i, run in enumerate(runs) if re.search(r"pip install (-e )?\.$", run))
    assert torch_run < project_run, "torch first, so the project does not resolve another torch build"
    assert {"pyproject.toml", "README.md", "flows", "tasks", "configs", "prefect.yaml"} <= _copied()
    assert ("WORKDIR", "/opt/vlmops") in instructions
    assert any(keyword == "USER" and arguments != "root" for keyword, arguments in instructions)

    cmd = json.loads(next(arguments for keyword, arguments in instructions if keyword == "CMD"))
    assert cmd[0] in _pyproject()["project"]["scripts"], f"{cmd[0]} is not an entry point of the project"
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "runs", "mlruns"} <= set(ignored)


def test_image_paths_agree_with_compose_and_the_job_template():
    from tasks.config import Recipe

    env = _dockerfile_env()
    worker = _service_env("worker")
    container = {entry["name"]: entry.get("value") for entry in _job_container(_job_template())["env"]}
    for name in ("VLMOPS_CACHE_DIR", "HF_HOME"):
        assert env[name] == worker[name] == container[name], name
        assert env[name].startswith("/cache/")
    assert "vlmops-cache:/cache" in _compose()["services"]["worker"]["volumes"]
    assert {"name": "cache", "mountPath": "/cache"} in _job_container(_job_template())["volumeMounts"]
    # Run outputs land in WORKDIR/<recipe output_dir>, which the compose worker keeps in a volume.
    assert f"vlmops-runs:/opt/vlmops/{Recipe().output_dir}" in _compose()["services"]["worker"]["volumes"]


def test_prefect_yaml_entrypoints_are_in_the_image():
    deployments = _prefect_yaml().get("deployments") or []
    if not deployments:
        pytest.skip("prefect.yaml has no deployments")
    for deployment in deployments:
        path, _, function = deployment["entrypoint"].partition(":")
        assert Path(path).parts[0] in _copied(), f"{path} is not copied into the image"
        source = REPO / path
        if not source.is_file():
            pytest.skip(f"{path} does not exist yet (prefect.yaml names it)")
        names = {node.name for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, ast.FunctionDef)}
        assert function in names, f"{deployment['entrypoint']}: no function {function}"


# ---------------------------------------------------------------- Kubernetes work pool


def test_job_template_has_prefects_shape_and_requests_gpus():
    template = _job_template()
    assert set(template) == {"job_configuration", "variables"}
    variables = template["variables"]["properties"]
    # Every placeholder refers to a variable of the template.
    placeholders = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert placeholders - set(variables) == set(), f"undefined: {placeholders - set(variables)}"
    # Prefect's default Kubernetes variables are all still there.
    pytest.importorskip("prefect_kubernetes", reason="prefect-kubernetes (test extra) renders the template")
    from prefect_kubernetes.worker import KubernetesWorker

    default = KubernetesWorker.get_default_base_job_template()
    assert set(default["variables"]["properties"]) <= set(variables)
    assert set(default["job_configuration"]) == set(template["job_configuration"])

    container = _job_container(template)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert variables["gpu_count"]["default"] >= 1 and variables["gpu_count"]["minimum"] == 1
    assert variables["image"]["default"] == _env_example()["VLMOPS_IMAGE"], "the image compose builds"


def test_job_template_renders_to_a_valid_gpu_job():
    pytest.importorskip("prefect_kubernetes", reason="prefect-kubernetes (test extra) renders the template")
    from kubernetes_asyncio.client import ApiClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = _job_template()
    api_url = "http://prefect.example.internal:4200/api"

    async def render() -> dict:
        # The template references no blocks or Prefect variables, so the client is never called.
        configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
            template, {"gpu_count": 4, "env": {"EXTRA": "1"}, "node_selector": {"gpu": "h100"}}
        )
        configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="weekly-run"))
        return configuration.job_manifest

    # An API URL as a worker has one (and no temporary local server is started).
    with temporary_settings({PREFECT_API_URL: api_url}):
        manifest = asyncio.run(render())
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert container["image"] == _env_example()["VLMOPS_IMAGE"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = {entry["name"]: entry for entry in container["env"]}
    assert env["PREFECT_API_URL"]["value"] == api_url, "the worker hands its API URL to the pod"
    assert env["EXTRA"]["value"] == "1", "a deployment's env is added, not replacing the template's"
    assert env["MLFLOW_TRACKING_URI"]["value"] == template["variables"]["properties"]["mlflow_tracking_uri"]["default"]
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "vlmops-cache"

    # kubernetes' own V1Job model accepts it (required fields, types of known fields).
    class Response:
        data = json.dumps(manifest)

    async def deserialize():
        async with ApiClient() as client:
            return client.deserialize(Response(), "V1Job")

    job = asyncio.run(deserialize())
    assert job.spec.template.spec.containers[0].resources.limits == {"nvidia.com/gpu": "4"}


def test_helm_worker_and_cache_claim_match_the_template():
    import prefect

    template = _job_template()["variables"]["properties"]
    values = yaml.safe_load(WORKER_VALUES.read_text())["worker"]
    assert values["config"]["workPool"] == _pool_names()["kubernetes"]
    assert values["config"]["type"] == "kubernetes"
    assert values["apiConfig"] == "server"
    assert values["image"]["prefectTag"].startswith(f"{prefect.__version__}-")
    assert values["extraEnvVarsSecret"] == template["secret_name"]["default"]
    # The worker's auth string reaches Jobs as a reference to that Secret, never as plain text.
    pytest.importorskip("prefect_kubernetes", reason="prefect-kubernetes (test extra) reads these settings")
    from prefect_kubernetes.settings import KubernetesSettings

    extra = {entry["name"]: entry["value"] for entry in values["extraEnvVars"]}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in extra.items():
            patch.setenv(key, value)
        settings = KubernetesSettings().worker
    assert settings.api_auth_string_secret_name == template["secret_name"]["default"]
    assert settings.api_auth_string_secret_key == "PREFECT_API_AUTH_STRING"
    claim = yaml.safe_load(CACHE_PVC.read_text())
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["metadata"]["name"] == template["cache_claim_name"]["default"]
    assert claim["metadata"]["namespace"] == template["namespace"]["default"]


# ---------------------------------------------------------------- accelerate configs

ACCELERATE_CONFIGS = {
    "single_gpu.yaml": "NO",
    "multi_gpu.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
}


def test_accelerate_folder_holds_exactly_the_documented_configs():
    assert {path.name for path in ACCELERATE.glob("*.yaml")} == set(ACCELERATE_CONFIGS)


def _launch_args(path: Path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), "-m", "tasks.distributed", "sft", "--recipe", "r.json"])
    return parser, *_validate_launch_command(args)


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_is_read_by_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig

    path = ACCELERATE / name
    raw = yaml.safe_load(path.read_text())
    config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown top-level keys
    assert config.distributed_type.value == ACCELERATE_CONFIGS[name]

    parser, args, defaults, _ = _launch_args(path)
    # Nested keys become launcher options (fsdp_config.x -> --fsdp_x); a misspelt one would be dropped silently.
    options = {action.dest for action in parser._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        for key in raw.get(section, {}):
            dest = key if section == "deepspeed_config" or key.startswith("fsdp_") else f"fsdp_{key}"
            assert dest in options, f"{name}: accelerate launch has no option for {section}.{key}"
    assert args.module and args.training_script == "tasks.distributed"
    assert (args.use_fsdp, args.use_deepspeed) == (ACCELERATE_CONFIGS[name] == "FSDP", ACCELERATE_CONFIGS[name] == "DEEPSPEED")
    if name == "single_gpu.yaml":
        assert args.num_processes == 1 and not args.multi_gpu
    else:
        assert args.num_processes > 1


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_says_which_quantization_it_supports(name):
    header = "\n".join(line for line in (ACCELERATE / name).read_text().splitlines() if line.startswith("#"))
    assert "Quantization" in header, f"{name}: say which quantization modes work"
    for mode in ("none", "8bit", "4bit"):
        assert re.search(rf"\b{mode}\b", header), f"{name}: nothing said about {mode}"
    # The launch line in the comment uses this very file and the project's entry point.
    assert f"--config_file infra/accelerate/{name}" in header and "-m tasks.distributed sft" in header


def test_launch_entry_point_exists():
    from tasks.distributed import _parse_args

    for stage in ("sft", "dpo"):
        args = _parse_args([stage, "--recipe", "r.json", "--output-dir", "out", "--train-path", "data",
                            *(["--sft-adapter", "adapter"] if stage == "dpo" else [])])
        assert args.stage == stage


def test_fsdp_config_builds_accelerates_plugin(monkeypatch):
    """What `accelerate launch` exports for fsdp.yaml, read back by FullyShardedDataParallelPlugin."""
    import accelerate.utils.dataclasses as accelerate_dataclasses
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    _, args, _, _ = _launch_args(ACCELERATE / "fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # sync_module_states looks up the current GPU; there is none here.
    monkeypatch.setattr(accelerate_dataclasses, "is_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plugin = FullyShardedDataParallelPlugin()
    # What PEFT asks of FSDP + (Q)LoRA.
    assert plugin.fsdp_version == 1 and plugin.use_orig_params is False
    assert plugin.cpu_ram_efficient_loading is True and plugin.sync_module_states is True
    assert plugin.sharding_strategy.name == "FULL_SHARD"


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_config_builds_accelerates_plugin(monkeypatch, name, stage):
    """What `accelerate launch` exports for the DeepSpeed configs, read back by DeepSpeedPlugin."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    _, args, defaults, mixed_precision_from_config = _launch_args(ACCELERATE / name)
    # as accelerate's launch_command does before it starts the DeepSpeed launcher
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage
    assert plugin.zero3_init_flag is (stage == 3)
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
