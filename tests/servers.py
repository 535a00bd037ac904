"""Real servers on loopback for tests: the MLflow tracking server, the MLflow model server.

Plain helpers, no pytest. Every server runs as the leader of its own process group
(`start_new_session=True`) because the processes it spawns outlive a SIGTERM of the parent
alone (`mlflow server`: uvicorn workers, huey job consumers; `mlflow models serve`: uvicorn).
`ManagedProcess.stop()` signals the whole group (SIGTERM, wait, SIGKILL) and raises if any
process of the group, or any descendant that moved to another group, survives.

    with start_mlflow_server(f"sqlite:///{tmp / 'mlflow.db'}", tmp / "artifacts") as server:
        mlflow.set_tracking_uri(server.url)

`start_http_server(name, cmd_for_port, health_path, env=server_env(...))` (or
`ManagedProcess.start` + `.wait_http`) starts anything else the same way: a Prefect server,
an MLflow server on PostgreSQL (`start_mlflow_server("postgresql://...", ...)`).
"""

from __future__ import annotations

import atexit
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"

# Nothing a test starts may phone home; inherited by the servers' own children.
QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}

# Loopback requests never go through a proxy, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_RUNNING: set[ManagedProcess] = set()


def free_port() -> int:
    """A TCP port free on loopback right now (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def venv_executable(name: str) -> str:
    """`name` from the running interpreter's environment (the project's .venv under pytest)."""
    for folder in (Path(sys.executable).parent, REPO / ".venv" / "bin"):
        if (folder / name).is_file():
            return str(folder / name)
    raise FileNotFoundError(f"no {name} next to {sys.executable} or in {REPO / '.venv' / 'bin'}")


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, quiet (`QUIET_ENV`), the interpreter's bin folder first on
    PATH (`mlflow models serve` runs a bare `uvicorn`), plus `extra`."""
    env = {**os.environ, **QUIET_ENV}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def log_tail(log_path: Path | None, lines: int = 60) -> str:
    if log_path is None or not Path(log_path).is_file():
        return "(no log)"
    return "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-lines:])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET without proxies; returns (status, body); HTTP errors are returned, not raised."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def http_post_json(url: str, body: bytes, timeout: float = 120.0) -> tuple[int, bytes]:
    """POST a JSON body without proxies; returns (status, body); HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_http(
    url: str, timeout: float, process: subprocess.Popen | None = None, log_path: Path | None = None
) -> float:
    """Poll `url` until it answers 200; returns the seconds waited.

    Raises RuntimeError (with the log tail) when `process` exits first, TimeoutError (with the
    log tail) after `timeout` seconds.
    """
    start = time.monotonic()
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{url}: the server exited with code {process.returncode} before answering; log:\n{log_tail(log_path)}"
            )
        try:
            status, _body = http_get(url, timeout=2.0)
            if status == 200:
                return time.monotonic() - start
        except (OSError, http.client.HTTPException):
            pass  # not listening yet, or cut off while starting
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s; log:\n{log_tail(log_path)}")
        time.sleep(0.25)


def process_table() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (ppid, pgid, state, command line) for every process, from /proc (Linux)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0], cmdline)
    return table


class ManagedProcess:
    """A process started as the leader of its own process group, stopped with its whole group."""

    def __init__(self, name: str, process: subprocess.Popen, log_path: Path, url: str | None = None, port: int | None = None):
        self.name = name
        self.process = process
        self.pgid = process.pid  # start_new_session: the leader's pid is the group id
        self.log_path = log_path
        self.url = url
        self.port = port
        self.started_in_s: float | None = None  # set by wait_http
        self._stopped = False

    @classmethod
    def start(
        cls,
        name: str,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
        url: str | None = None,
        port: int | None = None,
    ) -> ManagedProcess:
        """Start `cmd` in a new session, stdout and stderr to `log_path` (a temporary file when None)."""
        if log_path is None:
            handle, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
            os.close(handle)
            log_path = Path(path)
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                list(cmd), env=dict(env) if env is not None else None, cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        managed = cls(name, process, log_path, url, port)
        _RUNNING.add(managed)
        return managed

    def wait_http(self, path: str = "/health", timeout: float = 120.0) -> float:
        """Wait until `self.url + path` answers 200 (see `wait_http`); stops the group on failure."""
        try:
            self.started_in_s = wait_http(f"{self.url}{path}", timeout, self.process, self.log_path)
        except BaseException:
            self.stop(check=False)
            raise
        return self.started_in_s

    def group_members(self) -> list[int]:
        """Live (non-zombie) processes of the group."""
        self.process.poll()  # reap the leader if it exited
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        if not Path("/proc/self/stat").exists():
            return [self.pgid]  # no /proc: the group exists, assume it is alive
        return [pid for pid, (_ppid, pgid, state, _cmd) in process_table().items() if pgid == self.pgid and state != "Z"]

    def group_alive(self) -> bool:
        return bool(self.group_members())

    def _descendants(self) -> dict[int, int]:
        """pid -> pgid of every live descendant of the leader (some may have left the group)."""
        if not Path("/proc/self/stat").exists():
            return {}
        table = process_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _pgid, _state, _cmd) in table.items():
            children.setdefault(ppid, []).append(pid)
        found, todo = {}, [self.process.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                if table[child][2] != "Z":
                    found[child] = table[child][1]
                    todo.append(child)
        return found

    def stop(self, timeout: float = 15.0, check: bool = True) -> None:
        """SIGTERM the group, wait up to `timeout` s, SIGKILL what is left; idempotent.

        Descendants that moved to a session of their own are signalled one by one.
        Raises RuntimeError (when `check`) if any process survives SIGKILL.
        """
        if self._stopped:
            return
        strays = [pid for pid, pgid in self._descendants().items() if pgid != self.pgid]
        survivors = self._signal_and_wait(signal.SIGTERM, strays, timeout)
        if survivors:
            survivors = self._signal_and_wait(signal.SIGKILL, strays, 10.0)
        if not survivors:
            self.process.wait(timeout=5)  # reap the leader: no zombie left behind
        self._stopped = True
        _RUNNING.discard(self)
        if survivors and check:
            raise RuntimeError(f"{self.name}: processes {survivors} survived SIGKILL of group {self.pgid}")

    def _signal_and_wait(self, sig: signal.Signals, strays: list[int], timeout: float) -> list[int]:
        for send, target in [(os.killpg, self.pgid)] + [(os.kill, pid) for pid in strays]:
            try:
                send(target, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        while True:
            alive = set(self.group_members()) | {pid for pid in strays if _alive(pid)}
            if not alive or time.monotonic() > deadline:
                return sorted(alive)
            time.sleep(0.1)

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.process.pid} url={self.url} log={self.log_path}>"


def _alive(pid: int) -> bool:
    """A process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return not Path("/proc/self/stat").exists()  # gone, or no /proc to ask
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


@atexit.register
def _stop_leftovers() -> None:
    """A test run that ends without stopping its servers (Ctrl-C, a crash) still stops them."""
    for managed in list(_RUNNING):
        managed.stop(check=False)


class MlflowServer(ManagedProcess):
    """A running `mlflow server`: `.url`, `.port`, `.process`, `.stop()`, and where it stores things."""

    backend_store_uri: str = ""
    artifacts_destination: str = ""


def start_http_server(
    name: str,
    cmd_for_port: Callable[[int], Sequence[str]],
    health_path: str,
    *,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    log_path: Path | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
    kind: type[ManagedProcess] = ManagedProcess,
) -> ManagedProcess:
    """Start `cmd_for_port(port)` (see `ManagedProcess.start`) and wait until `health_path` answers 200.

    With no `port` given, a free one is picked, and another one if the first was taken
    meanwhile ("address already in use" in the log). E.g. a Prefect server:

        start_http_server("prefect-server", lambda p: [venv_executable("prefect"), "server", "start",
                          "--host", HOST, "--port", str(p)], "/api/health", env=server_env())
    """
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        logged_before = Path(log_path).stat().st_size if log_path is not None and Path(log_path).exists() else 0
        server = kind.start(name, cmd_for_port(chosen), env, log_path, cwd, f"http://{HOST}:{chosen}", chosen)
        try:
            server.wait_http(health_path, timeout)
            return server
        except RuntimeError:
            with open(server.log_path, "rb") as log:
                log.seek(logged_before)
                port_taken = b"address already in use" in log.read().lower()
            if attempt + 1 == attempts or not port_taken:
                raise
    raise AssertionError("unreachable")


def start_mlflow_server(
    backend_store_uri: str,
    artifacts_destination: str | Path,
    port: int | None = None,
    log_path: Path | None = None,
    *,
    job_execution: bool = False,
    timeout: float = 120.0,
    extra_env: Mapping[str, str] | None = None,
) -> MlflowServer:
    """`mlflow server` on loopback, proxying artifacts to `artifacts_destination`; returns once /health answers.

    One uvicorn worker. MLflow's job execution (seven busy huey consumers) is off unless
    `job_execution`: nothing the tests do needs it and it costs the 2 cores. Raises
    RuntimeError / TimeoutError with the server log's tail when it does not come up.
    """
    if isinstance(artifacts_destination, Path):
        artifacts_destination = str(artifacts_destination.resolve())
    mlflow = venv_executable("mlflow")

    def cmd(chosen: int) -> list[str]:
        return [
            mlflow, "server", "--host", HOST, "--port", str(chosen),
            "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", artifacts_destination, "--serve-artifacts",
            "--workers", "1",
        ]

    env = server_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": str(job_execution).lower(), **(extra_env or {})})
    server = start_http_server(
        "mlflow-server", cmd, "/health", env=env, port=port, log_path=log_path, timeout=timeout, kind=MlflowServer
    )
    server.backend_store_uri = backend_store_uri
    server.artifacts_destination = artifacts_destination
    return server


def start_model_server(
    model_uri: str,
    tracking_uri: str,
    port: int | None = None,
    log_path: Path | None = None,
    *,
    timeout: float = 180.0,
    request_timeout: int = 120,
    extra_env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    """`mlflow models serve --env-manager local` for `model_uri`; returns once /ping answers (model loaded).

    The model is fetched from `tracking_uri` (MLFLOW_TRACKING_URI of the server process).
    POST to `server.url + "/invocations"`. Raises like `start_mlflow_server`.
    """
    mlflow = venv_executable("mlflow")

    def cmd(chosen: int) -> list[str]:
        return [
            mlflow, "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", HOST, "-p", str(chosen), "-w", "1", "-t", str(request_timeout),
        ]

    env = server_env({"MLFLOW_TRACKING_URI": tracking_uri, **(extra_env or {})})
    return start_http_server("model-server", cmd, "/ping", env=env, port=port, log_path=log_path, cwd=cwd, timeout=timeout)
