"""Benchmark: the fine-tuning flow against a running Prefect server vs the same work as a bare script.

    .venv/bin/python bench/flow_overhead.py                       # demo recipe, one bare + one flow run
    .venv/bin/python bench/flow_overhead.py --repeat 2            # interleaved: bare, flow, flow, bare
    .venv/bin/python bench/flow_overhead.py --set sft.max_steps=200 --set dpo.max_steps=20

Both sides run the recipe's model work in a fresh child process of this interpreter, one
after the other, never at the same time:

* bare: ``tasks.data.load_recipe_datasets`` -> ``tasks.formatting.save_sft_dataset`` /
  ``save_preference_dataset`` -> ``tasks.training.train_sft`` -> ``train_dpo`` ->
  ``tasks.evaluation.evaluate_model`` for base, SFT and DPO. TRL, PEFT, transformers only:
  no Prefect, no MLflow, no Great Expectations (none of them is even imported).
* flow: ``flows.finetune.finetune(recipe)`` with ``PREFECT_API_URL`` pointing at a real
  ``prefect server start`` on loopback (SQLite in a temporary folder, started once, before
  any timing), a fresh ``output_dir``, a fresh MLflow store
  (``MLFLOW_TRACKING_URI=sqlite:///<run>/mlflow.db``), a fresh ``PREFECT_HOME`` and result
  storage, so nothing is reused from an earlier run. On top of the bare work the flow checks
  the tracking store, starts an MLflow parent run, fingerprints the data (and logs it as
  MLflow inputs), validates it with GX (Data Docs, quarantine), estimates the base model's
  memory, logs training curves and summaries to nested MLflow runs, logs predictions, writes
  the comparison table / chart / gallery, logs and registers the DPO adapter as a pyfunc
  model version (alias ``candidate``) and runs the promotion gate (first version: no champion
  to re-evaluate). Every task run and log line goes to the Prefect server.

The headline is the ratio of the children's wall times (interpreter start to exit, as a user
waits for ``python script.py`` vs ``vlmops run``). The breakdown: process start and imports,
each stage of the bare script beside the flow's task run of the same work (durations from the
Prefect API), the flow's extra tasks, the time inside the flow not in any task (task-run
creation, state changes, result persistence) and process teardown (Prefect flushing
events and logs). On a shared machine the stages both sides run (SFT above all) vary by tens of seconds from
run to run, more than the whole overhead, so the wall ratio alone is noisy; the summary also
adds up the flow's own extra work (extra tasks, time between tasks, progress-bar updates,
longer imports and teardown) and gives (bare wall + extras) / bare wall beside it.
The benchmark checks that both sides did the same optimizer steps and
evaluated the same number of samples, and prints both sides' metrics (they should agree:
same data, seeds and settings; validation drops no demo row).

The fresh MLflow store gets its tables created (an empty store: no run, no model) just before
the flow's child starts, not counted, like the server's start: a real store pays those
migrations (~5-7 s) once, not every run (``--cold-mlflow`` counts them). Inside the flow's
child, Prefect's artifact calls (the training progress bar updated every 5 steps, tables,
links) and the HF Trainer's MLflow callback are wrapped with timers (about a microsecond a
call), so the part of the SFT / DPO / evaluation tasks that the bare script does not do is
shown apart.

Repeats interleave (bare, flow, then flow, bare, ...) so that drift in the machine's load
falls on both sides. The server runs for the whole benchmark, under both sides.
Results: ``bench/results/flow_overhead.json`` (git-ignored).

Children run with ``OMP_NUM_THREADS=1 MKL_NUM_THREADS=1`` and ``torch.set_num_threads(1)``
unless ``--threads`` says otherwise, and with the tiny model's cache at ``VLMOPS_CACHE_DIR``
(default ``.cache/vlmops``), which is built before any timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "flow_overhead.json"
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"

# Prefect task -> the bare script's stage doing the same model work (None: the flow's extra work).
SAME_WORK = {
    "format_dataset": "load + format",  # it loads the rows again and writes the formatted datasets
    "train_sft_adapter": "sft",
    "train_dpo_adapter": "dpo",
    "evaluate_model": "evaluate",  # + " <label>"
}


# --- children ---------------------------------------------------------------------------------


def _child_setup(threads: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def _dataset_rows(path: str | None) -> int | None:
    if path is None:
        return None
    import datasets

    return datasets.load_from_disk(path).num_rows


def _training_summary(folder: Path) -> dict[str, Any]:
    summary = json.loads((folder / "training_summary.json").read_text())
    return {key: summary[key] for key in ("global_step", "per_device_train_batch_size", "gradient_accumulation_steps",
                                          "train_loss")}


def run_bare(recipe_path: str, overrides: list[str], workdir: Path, threads: int) -> dict[str, Any]:
    """The model work with the project's plain functions: no Prefect, MLflow or GX."""
    started = time.time()
    _child_setup(threads)
    from tasks import data, evaluation, formatting, training
    from tasks.config import load_recipe

    imported = time.time()
    recipe = load_recipe(recipe_path, overrides)
    stages: dict[str, float] = {}

    t = time.perf_counter()
    folders = {}
    for role, (kind, rows) in data.load_recipe_datasets(recipe.data).items():
        save = formatting.save_sft_dataset if kind == "sft" else formatting.save_preference_dataset
        folders[role] = str(save(rows, recipe.data.system_message, workdir / "data" / role.replace("/", "_"),
                                 image_longest_edge=recipe.data.image_longest_edge))
    stages["load + format"] = time.perf_counter() - t

    t = time.perf_counter()
    validation = folders.get("sft/validation")
    sft_adapter = training.train_sft(recipe, Path(folders["sft/train"]), workdir / "sft",
                                     eval_path=Path(validation) if validation else None)
    stages["sft"] = time.perf_counter() - t

    t = time.perf_counter()
    validation = folders.get("preference/validation")
    dpo_adapter = training.train_dpo(recipe, sft_adapter, Path(folders["preference/train"]), workdir / "dpo",
                                     eval_path=Path(validation) if validation else None)
    stages["dpo"] = time.perf_counter() - t

    metrics = {}
    for label, adapter in (("base", None), ("sft", sft_adapter), ("dpo", dpo_adapter)):
        t = time.perf_counter()
        metrics[label], _predictions = evaluation.evaluate_model(
            recipe, None if adapter is None else str(adapter), folders["sft/eval"], folders["preference/eval"])
        stages[f"evaluate {label}"] = time.perf_counter() - t
    done = time.time()

    return {
        "started": started, "imported": imported, "done": done, "stages": stages, "metrics": metrics,
        "sft": _training_summary(workdir / "sft"), "dpo": _training_summary(workdir / "dpo"),
        "rows": {role: _dataset_rows(path) for role, path in folders.items()},
    }


class CallTimer:
    """Seconds and calls spent in wrapped functions, by name (attribution only; ~1 us a call)."""

    def __init__(self):
        self.spent: dict[str, dict[str, float]] = {}

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                entry = self.spent.setdefault(name, {"seconds": 0.0, "calls": 0})
                entry["seconds"] += time.perf_counter() - t
                entry["calls"] += 1

        setattr(owner, attribute, timed)


def _instrument_flow_extras(timer: CallTimer) -> None:
    """Time, inside the training and evaluation tasks, what the bare script does not do.

    Prefect artifacts (the training progress bar every 5 steps, tables, links) are imported
    by name at call time, so patching the module reaches them; the HF Trainer's MLflow
    callback is patched on its class (its entry points only: `setup` runs inside them).
    """
    import prefect.artifacts
    from transformers.integrations import integration_utils

    for name in ("create_progress_artifact", "update_progress_artifact", "create_markdown_artifact",
                 "create_table_artifact", "create_link_artifact"):
        timer.wrap(prefect.artifacts, name, f"prefect artifact: {name}")
    for name in ("on_train_begin", "on_log", "on_save", "on_train_end"):
        timer.wrap(integration_utils.MLflowCallback, name, f"HF MLflowCallback.{name}")


def run_flow(recipe_path: str, overrides: list[str], workdir: Path, threads: int) -> dict[str, Any]:
    """`finetune(recipe)` as `vlmops run` calls it, against the server named by PREFECT_API_URL."""
    started = time.time()
    # what flows/cli.py sets before importing Prefect
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    _child_setup(threads)
    from flows.finetune import finetune
    from tasks.config import load_recipe

    imported = time.time()
    timer = CallTimer()
    _instrument_flow_extras(timer)
    recipe = load_recipe(recipe_path, [*overrides, f"output_dir={workdir / 'runs'}"])
    t = time.perf_counter()
    state = finetune(recipe, return_state=True)
    flow_call = time.perf_counter() - t
    result = state.result()  # raises if the flow failed
    done = time.time()

    cache = workdir / "runs" / "cache"
    formatted = next(cache.glob("format-*"))
    return {
        "started": started, "imported": imported, "done": done, "flow_call": flow_call,
        "flow_run_id": str(state.state_details.flow_run_id), "metrics": result.metrics,
        "sft": _training_summary(next(cache.glob("sft-*"))), "dpo": _training_summary(next(cache.glob("dpo-*"))),
        "rows": {folder.name.replace("_", "/", 1): _dataset_rows(str(folder))
                 for folder in sorted(formatted.iterdir()) if folder.is_dir()},
        "instrumented": timer.spent,
        "registered": None if result.registered is None else vars(result.registered),
        "promotion": None if result.promotion is None else {"promote": result.promotion.promote,
                                                            "reason": result.promotion.reason},
    }


# --- the Prefect server and its API -----------------------------------------------------------


def _servers():
    sys.path.insert(0, str(ROOT / "tests"))
    import servers

    return servers


def start_prefect_server(root: Path):
    servers = _servers()
    port = servers.free_port()
    env = servers.server_env({
        "PREFECT_HOME": str(root / "prefect-server-home"),  # its SQLite database lives here
        "PREFECT_SERVER_UI_API_URL": f"http://{servers.HOST}:{port}/api",
    })
    for key in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        env.pop(key, None)
    return servers.start_http_server(
        "prefect-server",
        lambda p: [servers.venv_executable("prefect"), "server", "start", "--host", servers.HOST, "--port", str(p)],
        "/api/health", env=env, port=port, log_path=root / "prefect-server.log", timeout=300,
    )


def _api(url: str, body: dict | None = None) -> Any:
    servers = _servers()
    if body is None:
        status, payload = servers.http_get(url, timeout=30)
    else:
        status, payload = servers.http_post_json(url, json.dumps(body).encode(), timeout=30)
    if status != 200:
        raise RuntimeError(f"{url}: HTTP {status}: {payload[:500]!r}")
    return json.loads(payload)


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def flow_run_tasks(api: str, flow_run_id: str, wait_s: float = 60.0) -> tuple[dict, list[dict]]:
    """The flow run and its task runs from the server, once every task run has a terminal state."""
    deadline = time.monotonic() + wait_s
    while True:
        run = _api(f"{api}/flow_runs/{flow_run_id}")
        tasks = _api(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200})
        if (run["state_type"] in TERMINAL and tasks and all(t["state_type"] in TERMINAL for t in tasks)) \
                or time.monotonic() > deadline:
            return run, sorted(tasks, key=lambda t: t["start_time"] or "")
        time.sleep(1.0)


def _task_function(task_run: dict) -> str:
    # task_key is "<function qualname>-<hash of its source>"
    return task_run["task_key"].rsplit("-", 1)[0]


# --- one measurement ---------------------------------------------------------------------------


def child_env(threads: int, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for key in [k for k in env if k.startswith(("PREFECT_", "MLFLOW_"))]:
        del env[key]
    env.update({
        "OMP_NUM_THREADS": str(threads) if threads > 0 else env.get("OMP_NUM_THREADS", ""),
        "MKL_NUM_THREADS": str(threads) if threads > 0 else env.get("MKL_NUM_THREADS", ""),
        "VLMOPS_CACHE_DIR": env.get("VLMOPS_CACHE_DIR", str(ROOT / ".cache" / "vlmops")),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


def measure(side: str, args, workdir: Path, api: str) -> dict[str, Any]:
    workdir.mkdir(parents=True)
    extra, mlflow_init = {}, None
    if side == "flow":
        extra = {
            "PREFECT_API_URL": api,
            "PREFECT_HOME": str(workdir / "prefect-home"),
            "PREFECT_LOCAL_STORAGE_PATH": str(workdir / "prefect-results"),  # no cached result from another run
            "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        }
        if not args.cold_mlflow:
            # An empty store with its tables created (no runs, no models): creating the tables
            # (~5-7 s of migrations) is a once-per-store cost, like starting the server.
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "from mlflow import MlflowClient; c = MlflowClient(); "
                            "c.search_experiments(max_results=1); c.search_registered_models(max_results=1)"],
                           cwd=workdir, env=child_env(args.threads, extra), check=True, capture_output=True)
            mlflow_init = time.perf_counter() - t
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--workdir", str(workdir),
               "--config", str(args.config), "--threads", str(args.threads)]
    for override in args.overrides:
        command += ["--set", override]
    log = workdir / f"{side}.log"
    launched = time.time()
    t = time.perf_counter()
    with open(log, "wb") as out:
        code = subprocess.run(command, cwd=workdir, env=child_env(args.threads, extra), stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - t
    exited = time.time()
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{side} run failed (exit {code}); log {log}:\n{tail}")
    child = json.loads((workdir / "child.json").read_text())
    record = {
        "side": side, "wall_s": wall, "log": str(log),
        "startup_imports_s": child["imported"] - launched,
        "work_s": child["done"] - child["imported"],
        "teardown_s": exited - child["done"],
        **{k: child[k] for k in ("metrics", "sft", "dpo", "rows")},
    }
    if side == "bare":
        record["stages"] = child["stages"]
        return record

    run, task_runs = flow_run_tasks(api, child["flow_run_id"])
    tasks = []
    for task_run in task_runs:
        tasks.append({
            "function": _task_function(task_run), "name": task_run["name"], "state": task_run["state_name"],
            "seconds": task_run["total_run_time"],
        })
    record.update({
        "flow_call_s": child["flow_call"], "flow_run_id": child["flow_run_id"],
        "flow_run_state": run["state_name"], "flow_run_total_run_time_s": run["total_run_time"],
        "tasks": tasks, "registered": child["registered"], "promotion": child["promotion"],
        "instrumented": child["instrumented"], "mlflow_store_init_s": mlflow_init,
    })
    cached = [t["name"] for t in tasks if t["state"] != "Completed"]
    if cached:
        print(f"  WARNING: task runs not plainly Completed (cached?): {cached}", flush=True)
    return record


# --- reporting -----------------------------------------------------------------------------------


def _flow_stages(flow: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(same work as a bare stage, extra flow work) in seconds, from the task runs."""
    same, extra = {}, {}
    for task in flow["tasks"]:
        stage = SAME_WORK.get(task["function"])
        if stage == "evaluate":
            stage = task["name"]  # "evaluate base" / "evaluate sft" / "evaluate dpo"
        if stage:
            same[stage] = same.get(stage, 0.0) + task["seconds"]
        else:
            extra[task["function"]] = extra.get(task["function"], 0.0) + task["seconds"]
    return same, extra


def breakdown(bare: dict, flow: dict) -> list[tuple[str, float | None, float | None]]:
    same, extra = _flow_stages(flow)
    rows = [("process start + imports", bare["startup_imports_s"], flow["startup_imports_s"])]
    rows += [(stage, seconds, same.get(stage)) for stage, seconds in bare["stages"].items()]
    rows += [(f"  flow only: {name}", None, seconds) for name, seconds in extra.items()]
    in_tasks = sum(t["seconds"] for t in flow["tasks"])
    rows.append(("  flow only: between tasks (orchestration)", None, flow["flow_call_s"] - in_tasks))
    rows.append(("recipe load + flow/result bookkeeping", bare["work_s"] - sum(bare["stages"].values()),
                 flow["work_s"] - flow["flow_call_s"]))
    rows.append(("process teardown", bare["teardown_s"], flow["teardown_s"]))
    rows.append(("total (wall)", bare["wall_s"], flow["wall_s"]))
    return rows


def flow_extras(bare: dict, flow: dict) -> float:
    """Seconds the flow spends on work the bare script does not do at all.

    Its extra tasks, the time between tasks, and its longer imports and teardown; plus, inside
    the training tasks, the Prefect progress-bar updates. The stages both sides run (format, SFT,
    DPO, evaluation) are left out: on a shared machine their run-to-run noise (tens of seconds
    for SFT) is larger than the flow's additions to them.
    """
    _same, extra = _flow_stages(flow)
    in_tasks = sum(t["seconds"] for t in flow["tasks"])
    progress = sum(entry["seconds"] for name, entry in flow.get("instrumented", {}).items() if "artifact" in name)
    return (sum(extra.values()) + (flow["flow_call_s"] - in_tasks) + progress
            + (flow["startup_imports_s"] - bare["startup_imports_s"]) + (flow["teardown_s"] - bare["teardown_s"]))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:8.1f}"


def print_pair(index: int, bare: dict, flow: dict) -> None:
    print(f"\npair {index + 1}: bare {bare['wall_s']:.1f} s, flow {flow['wall_s']:.1f} s, "
          f"ratio {flow['wall_s'] / bare['wall_s']:.3f}")
    print(f"{'stage':46s} {'bare s':>8s} {'flow s':>8s} {'extra s':>8s}")
    for name, b, f in breakdown(bare, flow):
        diff = None if f is None else f - (b or 0.0)
        print(f"{name:46s} {_fmt(b):>8s} {_fmt(f):>8s} {_fmt(diff):>8s}")
    if flow.get("instrumented"):
        print("inside the flow's tasks (already counted above):")
        for name, entry in sorted(flow["instrumented"].items(), key=lambda item: -item[1]["seconds"]):
            print(f"  {name:44s} {entry['seconds']:8.2f} s in {entry['calls']} calls")
    if flow.get("mlflow_store_init_s") is not None:
        print(f"(creating the empty MLflow store's tables before the flow run, not counted: "
              f"{flow['mlflow_store_init_s']:.1f} s)")


def same_work_check(bare: dict, flow: dict) -> list[str]:
    problems = []
    for stage in ("sft", "dpo"):
        for key in ("global_step", "per_device_train_batch_size", "gradient_accumulation_steps"):
            if bare[stage][key] != flow[stage][key]:
                problems.append(f"{stage} {key}: bare {bare[stage][key]} vs flow {flow[stage][key]}")
    for label in ("base", "sft", "dpo"):
        if bare["metrics"][label]["eval_samples"] != flow["metrics"][label]["eval_samples"]:
            problems.append(f"{label} eval_samples differ")
    if bare["rows"] != flow["rows"]:
        problems.append(f"formatted rows differ: bare {bare['rows']} vs flow {flow['rows']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="recipe YAML (default: the demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, as `vlmops run --set` (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, help="bare/flow pairs, interleaved (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the children (0: torch's default)")
    parser.add_argument("--cold-mlflow", action="store_true",
                        help="count creating the fresh MLflow store's tables in the flow's time (default: done before)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (runs, logs, databases)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=("bare", "flow"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        run = run_bare if args.child == "bare" else run_flow
        record = run(str(args.config), args.overrides, args.workdir, args.threads)
        (args.workdir / "child.json").write_text(json.dumps(record, indent=1, default=str))
        return 0

    import shutil

    root = Path(tempfile.mkdtemp(prefix="vlmops-flow-overhead-"))
    print(f"work folder: {root}", flush=True)
    # the tiny base model is built once and cached: never inside a timed run
    env = child_env(args.threads, {})
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                    "from tasks.tiny_model import tiny_smolvlm_path; tiny_smolvlm_path()", str(ROOT)],
                   env=env, check=True)
    t = time.perf_counter()
    server = start_prefect_server(root)
    api = f"{server.url}/api"
    print(f"prefect server {server.url} up in {time.perf_counter() - t:.1f} s (not counted)", flush=True)
    pairs, load = [], []
    try:
        for i in range(args.repeat):
            order = ("bare", "flow") if i % 2 == 0 else ("flow", "bare")
            pair = {}
            for side in order:
                load_before = os.getloadavg()[0]
                print(f"[{i + 1}/{args.repeat}] {side} ...", flush=True)
                pair[side] = measure(side, args, root / f"{i + 1}-{side}", api)
                pair[side]["loadavg_1min_before"] = load_before
                pair[side]["loadavg_1min_after"] = os.getloadavg()[0]
                print(f"[{i + 1}/{args.repeat}] {side}: {pair[side]['wall_s']:.1f} s "
                      f"(load average {load_before:.1f} -> {pair[side]['loadavg_1min_after']:.1f})", flush=True)
            pair["order"] = list(order)
            pair["ratio"] = pair["flow"]["wall_s"] / pair["bare"]["wall_s"]
            pair["flow_extras_s"] = flow_extras(pair["bare"], pair["flow"])
            pair["ratio_from_extras"] = 1 + pair["flow_extras_s"] / pair["bare"]["wall_s"]
            pair["same_work_problems"] = same_work_check(pair["bare"], pair["flow"])
            pairs.append(pair)
            load.append(os.getloadavg())
    finally:
        server.stop(check=False)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    for i, pair in enumerate(pairs):
        print_pair(i, pair["bare"], pair["flow"])
        bare, flow = pair["bare"], pair["flow"]
        print(f"same work: SFT {bare['sft']['global_step']} / {flow['sft']['global_step']} steps, "
              f"DPO {bare['dpo']['global_step']} / {flow['dpo']['global_step']} steps (bare / flow), "
              f"{int(bare['metrics']['base']['eval_samples'])} held-out samples; "
              + ("OK" if not pair["same_work_problems"] else "DIFFERENT: " + "; ".join(pair["same_work_problems"])))
        print(f"{'metric':22s} " + " ".join(f"{m + ' bare':>10s} {m + ' flow':>10s}" for m in ("base", "sft", "dpo")))
        for metric in ("relaxed_accuracy", "preference_accuracy"):
            print(f"{metric:22s} " + " ".join(
                f"{bare['metrics'][m][metric]:10.3f} {flow['metrics'][m][metric]:10.3f}" for m in ("base", "sft", "dpo")))

    ratios = [pair["ratio"] for pair in pairs]
    best = min(p["flow"]["wall_s"] for p in pairs) / min(p["bare"]["wall_s"] for p in pairs)
    print("\n" + f"{'pair':>4s} {'order':>10s} {'bare s':>8s} {'flow s':>8s} {'ratio':>7s} {'extras s':>9s}")
    for i, pair in enumerate(pairs):
        print(f"{i + 1:4d} {'/'.join(pair['order']):>10s} {pair['bare']['wall_s']:8.1f} "
              f"{pair['flow']['wall_s']:8.1f} {pair['ratio']:7.3f} {pair['flow_extras_s']:9.1f}")
    extras = [pair["flow_extras_s"] for pair in pairs]
    print(f"the flow's own extra work (extra tasks, between tasks, progress bar, longer imports and teardown): "
          f"{min(extras):.1f}-{max(extras):.1f} s a run; bare wall + that, over bare wall: "
          + ", ".join(f"{pair['ratio_from_extras']:.3f}" for pair in pairs))
    worst_extras = max(pair["ratio_from_extras"] for pair in pairs)
    print(f"ratio flow / bare: median {statistics.median(ratios):.3f}, fastest flow / fastest bare {best:.3f} "
          f"(aim <= 1.10: {'met' if statistics.median(ratios) <= 1.10 else 'NOT met'}); from the extras alone, "
          f"at most {worst_extras:.3f} ({'met' if worst_extras <= 1.10 else 'NOT met'})")
    print("The flow also: checks MLflow, starts a parent run, fingerprints the data (MLflow inputs), validates it "
          "with GX, estimates memory, logs curves/summaries/predictions, writes the report, registers the adapter "
          "and runs the promotion gate; every task run and log line goes to the Prefect server.")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "config": str(args.config), "overrides": args.overrides, "repeat": args.repeat, "threads": args.threads,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "loadavg_after_each_pair": load,
        "ratio_median": statistics.median(ratios), "ratio_fastest": best, "aim": 1.10,
        "flow_extras_s": extras, "ratio_from_extras": [pair["ratio_from_extras"] for pair in pairs],
        "pairs": pairs,
    }, indent=1, default=str))
    print(f"results: {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
