"""MLflow: one parent run per pipeline run, a nested run per stage, the adapter in the registry.

The tracking target comes from `MLFLOW_TRACKING_URI`; unset, it is a local SQLite
database (`./mlflow.db`) with artifacts in `./mlruns`, MLflow 3's own default.

Tasks may run on different threads, so nothing here relies on MLflow's "active run"
crossing task boundaries: the parent run is created by id and every stage opens its own
nested run under that id.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from tasks.config import Recipe

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
REPO_ROOT = Path(__file__).resolve().parents[1]
# Tags copied from the parent run onto every stage run and registered version: where the
# adapter came from (base model, data, code, orchestration run).
LINEAGE_PREFIXES = ("vlmops.base_model", "vlmops.data.", "vlmops.git", "prefect.", "mlflow.source.git.commit")
SERVING_MODULE = Path(__file__).with_name("serving.py")
# Loaded by the pyfunc model on the serving side; pinned like the project itself.
SERVING_REQUIREMENTS = [
    "torch==2.13.0", "transformers==5.24.0", "peft==0.21.2", "bitsandbytes==0.50.2",
    "accelerate==1.15.0", "pillow", "pandas", "mlflow==3.17.2",
]


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server or its model registry does not answer."""


def check_tracking_available(timeout_s: int = 10) -> None:
    """Ask the tracking store and the registry for one item each; raise TrackingUnavailableError if either fails.

    Runs before any training so that a run never spends GPU hours it cannot record. MLflow's
    HTTP client retries for minutes by default; here it gets one short try (the Prefect task
    around this retries once more).
    """
    uri = tracking_uri()
    saved = {name: os.environ.get(name) for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_s))
    try:
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    except Exception as error:  # any failure means the same thing to the user: fix the server or the URI
        raise TrackingUnavailableError(
            f"MLflow at {uri} does not answer ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
            "Start the server or fix MLFLOW_TRACKING_URI; nothing was trained."
        ) from error
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def git_commit() -> str | None:
    """The code's git commit, with `-dirty` when tracked files differ from it; None outside a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def lineage_tags(recipe: Recipe, flow_run_id: str | None = None, flow_run_url: str | None = None) -> dict[str, str]:
    """Tags naming what a run is made of: base model and revision, code commit, Prefect flow run."""
    tags = {
        "vlmops.base_model": recipe.model.name_or_path,
        "vlmops.base_model_revision": recipe.model.revision or "default",
        "vlmops.recipe": recipe.name,
    }
    commit = git_commit()
    if commit:
        tags["vlmops.git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    if flow_run_url:
        tags["prefect.flow_run_url"] = flow_run_url
    return tags


def inherited_tags(run_id: str) -> dict[str, str]:
    """The lineage tags of a run (see LINEAGE_PREFIXES), to copy onto its stage runs and versions."""
    mlflow.set_tracking_uri(tracking_uri())
    tags = MlflowClient().get_run(run_id).data.tags
    return {key: value for key, value in tags.items() if key.startswith(LINEAGE_PREFIXES)}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"sft": {"learning_rate": 1e-4}} -> {"sft.learning_rate": 1e-4}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def start_pipeline_run(recipe: Recipe, tags: dict[str, str] | None = None) -> str:
    """Create the parent run, log the whole recipe (flattened params + YAML); returns its id."""
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.set_experiment(recipe.registry.experiment_name)
    client = MlflowClient()
    run = client.create_run(experiment.experiment_id, run_name=f"finetune {recipe.name}", tags=tags or {})
    run_id = run.info.run_id
    recipe_dict = recipe.model_dump(mode="json")
    params = [mlflow.entities.Param(key, str(value)) for key, value in flatten(recipe_dict).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start : start + 100])
    client.log_text(run_id, yaml.safe_dump(recipe_dict, sort_keys=False), "recipe.yaml")
    return run_id


@contextlib.contextmanager
def stage_run(parent_run_id: str, stage: str) -> Iterator[mlflow.ActiveRun]:
    """A nested run for one stage, active for the duration of the block (trainer callbacks log into it)."""
    mlflow.set_tracking_uri(tracking_uri())
    parent = MlflowClient().get_run(parent_run_id)
    with mlflow.start_run(
        experiment_id=parent.info.experiment_id,
        run_name=stage,
        parent_run_id=parent_run_id,
        nested=True,
        tags={**inherited_tags(parent_run_id), "vlmops.stage": stage},
    ) as run:
        yield run


def tag_run(run_id: str, tags: dict[str, str]) -> None:
    """Set tags on a run (lineage: dataset fingerprints, registered version)."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log parameters on an existing run (e.g. the decoding configuration)."""
    mlflow.set_tracking_uri(tracking_uri())
    MlflowClient().log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])


def log_dataset_inputs(run_id: str, datasets: dict[str, tuple[str, str, str, Any]]) -> None:
    """Log each dataset a run used as an MLflow input: role -> (source, split, fingerprint, frame).

    The frame holds the text columns (no pixels); its digest is our content fingerprint, so
    two runs on the same data show the same digest in the MLflow UI.
    """
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run_id):
        for role, (source, split, fingerprint, frame) in datasets.items():
            if source.startswith("builtin:") or Path(source.split("{")[0]).expanduser().exists():
                # local and synthetic data: MLflow has no source type for them, so name it in tags
                dataset_source = CodeDatasetSource(tags={"vlmops.source": source, "vlmops.split": split})
            else:
                dataset_source = HuggingFaceDatasetSource(path=source, split=split)
            dataset = mlflow.data.from_pandas(frame, source=dataset_source, name=role, digest=fingerprint)
            context = "evaluation" if role.endswith("/eval") else "validation" if role.endswith("/validation") else "training"
            mlflow.log_input(dataset, context=context, tags={"vlmops.role": role})


def log_stage_artifacts(parent_run_id: str, stage: str, paths: list[Path], metrics: dict[str, float]) -> None:
    """Log files and metrics of a stage that ran without a trainer (validation, evaluation)."""
    with stage_run(parent_run_id, stage):
        for path in paths:
            if path is not None and Path(path).exists():
                mlflow.log_artifact(str(path))
        if metrics:
            mlflow.log_metrics(metrics)


def log_comparison(parent_run_id: str, metrics_by_model: dict[str, dict[str, float]]) -> None:
    """Log every model's metrics on the parent run as `<model>.<metric>` (base.relaxed_accuracy, ...)."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    for model, metrics in metrics_by_model.items():
        for name, value in metrics.items():
            client.log_metric(parent_run_id, f"{model}.{name}", value)


def register_adapter(
    parent_run_id: str,
    recipe: Recipe,
    adapter_dir: Path,
    base_model_dir: Path | None,
    version_tags: dict[str, str],
) -> tuple[str, str]:
    """Log the adapter as a pyfunc model (models from code), register it, alias it `candidate`.

    The model loads base + adapter + processor and answers image questions (tasks/serving.py).
    For a builtin base the base folder travels with the model, so it loads anywhere; a hub
    base is named in the model config and fetched where the model is loaded.
    Returns (registered model name, version).
    """
    mlflow.set_tracking_uri(tracking_uri())
    artifacts = {"adapter": str(adapter_dir)}
    if base_model_dir is not None:
        artifacts["base_model"] = str(base_model_dir)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "question")]),
        outputs=Schema([ColSpec("string")]),
    )
    name = recipe.registry.registered_model_name
    version_tags = {**inherited_tags(parent_run_id), "vlmops.run_id": parent_run_id, **version_tags}
    with mlflow.start_run(run_id=parent_run_id):
        info = mlflow.pyfunc.log_model(
            name="adapter",
            python_model=str(SERVING_MODULE),
            artifacts=artifacts,
            model_config={
                "base_model": recipe.model.name_or_path,
                "revision": recipe.model.revision,
                "dtype": recipe.model.dtype,
                "quantization": recipe.quantization.model_dump(),
                "system_message": recipe.data.system_message,
                "max_new_tokens": recipe.evaluation.max_new_tokens,
                # served answers must match the evaluation's: same batching (left padding) and resize
                "batch_size": recipe.evaluation.batch_size,
                "image_longest_edge": recipe.data.image_longest_edge,
                "attn_implementation": recipe.model.attn_implementation,
                "trust_remote_code": recipe.model.trust_remote_code,
            },
            code_paths=[str(Path(__file__).parent)],
            pip_requirements=SERVING_REQUIREMENTS,
            signature=signature,
            input_example=example_request(),
        )
    version = mlflow.register_model(info.model_uri, name, tags=version_tags)
    client = MlflowClient()
    client.set_registered_model_alias(name, recipe.registry.candidate_alias, version.version)
    client.set_tag(parent_run_id, "vlmops.registered_version", f"{name}/{version.version}")
    return name, str(version.version)


def example_request() -> pd.DataFrame:
    """One request the served model answers: a rendered bar chart (base64 PNG) and a question."""
    from tasks import synthetic

    buffer = io.BytesIO()
    synthetic.render_chart(synthetic.sample_chart(random.Random(0))).save(buffer, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()], "question": ["How many bars are there?"]})


def download_registered_adapter(model_uri: str, dst: Path) -> dict[str, Any]:
    """Fetch a registered adapter model (`models:/NAME/VERSION` or `models:/NAME@ALIAS`).

    Returns what evaluating it needs: the adapter folder, the base model (its folder when it
    travelled with the model, else its hub id), revision, dtype and quantization.
    """
    mlflow.set_tracking_uri(tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
    flavor = mlflow.models.Model.load(str(local)).flavors["python_function"]
    config, artifacts = flavor["config"], flavor["artifacts"]
    base = str(local / artifacts["base_model"]["path"]) if "base_model" in artifacts else config["base_model"]
    return {
        "model_uri": model_uri,
        "adapter_dir": str(local / artifacts["adapter"]["path"]),
        "base_model": base,
        "revision": config.get("revision"),
        "dtype": config["dtype"],
        "quantization": config["quantization"],
    }


def log_evaluation_run(experiment_name: str, model_uri: str, metrics: dict[str, float], paths: list[Path]) -> str:
    """One MLflow run holding a registered model's evaluation; returns its id."""
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment_name)
    with mlflow.start_run(run_name=f"evaluate {model_uri}", tags={"vlmops.model_uri": model_uri}) as run:
        mlflow.log_metrics(metrics)
        for path in paths:
            mlflow.log_artifact(str(path))
    return run.info.run_id


def end_pipeline_run(parent_run_id: str, status: str = "FINISHED") -> None:
    mlflow.set_tracking_uri(tracking_uri())
    MlflowClient().set_terminated(parent_run_id, status=status)
