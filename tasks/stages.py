"""The pipeline's Prefect tasks: one unit of work each, policy in the decorator.

Each task is a thin shell over plain functions in the sibling modules (which tests call
without Prefect). Tasks hand each other references only: folders, MLflow run ids,
registered versions. A live model never crosses a task boundary.

Policy (tasks/orchestration.py): validation, formatting, SFT and DPO are cached on the
content fingerprints of their data and the settings that shape them, so a flow that failed
in DPO, run again, reuses its SFT adapter; tracking and registry calls retry with backoff on
transient failures and never on deterministic ones; other tasks are not cached (`NO_CACHE`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL

import mlflow
import pandas as pd

from mlflow import MlflowClient

from tasks import data, distributed, evaluation, formatting, memory, orchestration, promotion, report, tracking, training
from tasks.config import PromotionConfig, QuantizationConfig, Recipe
from tasks.models import check_hardware, load_processor, resolve_model_path
from tasks.tiny_model import TINY_SMOLVLM
from tasks.validation import ValidationReport, ValidationSettings, raise_if_failed, validate_rows

logger = logging.getLogger(__name__)

# For tasks that talk to MLflow or a hub: 3 retries after 2, 4 and 8 s, unless the error is deterministic.
TRANSIENT_RETRIES = dict(
    retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.2,
    retry_condition_fn=orchestration.retry_transient,
)


@dataclass(frozen=True)
class FormattedData:
    """Folders of the formatted datasets (datasets.save_to_disk) a run trains and evaluates on."""

    sft_train: str
    sft_eval: str
    preference_train: str
    preference_eval: str
    # evaluated on during training (eval loss, early stopping) when the recipe names the splits
    sft_validation: str | None = None
    preference_validation: str | None = None


@dataclass(frozen=True)
class RegisteredAdapter:
    name: str
    version: str
    alias: str


@task(name="check-tracking-server", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def check_tracking_server() -> str:
    """Fail at once, before any data or model work, when MLflow's tracking store or registry does not answer."""
    tracking.check_tracking_available()
    return tracking.tracking_uri()


def _flow_run_url(flow_run_id: str | None) -> str | None:
    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui and flow_run_id else None


@task(name="start-tracking-run", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def start_tracking_run(recipe: Recipe) -> str:
    """Create the MLflow parent run holding the recipe and the lineage tags; returns its id."""
    flow_run_id = flow_run.get_id()
    tags = tracking.lineage_tags(recipe, str(flow_run_id) if flow_run_id else None, _flow_run_url(flow_run_id))
    return tracking.start_pipeline_run(recipe, tags)


def _token_counter(recipe: Recipe, kind: str) -> tuple[Callable[[dict], int] | None, int | None]:
    """(count_tokens, max_tokens) for the token-budget check, or (None, None) when nothing truncates."""
    max_tokens = recipe.sft.max_length if kind == "sft" else recipe.dpo.max_length
    if max_tokens is None:
        return None, None
    processor = load_processor(recipe.model)
    to_sample = formatting.to_sft_sample if kind == "sft" else formatting.to_preference_sample
    system_message, edge = recipe.data.system_message, recipe.data.image_longest_edge

    def count_tokens(row: dict) -> int:
        return formatting.count_sample_tokens(processor, to_sample(row, system_message, image_longest_edge=edge))

    return count_tokens, max_tokens


@dataclass(frozen=True)
class CheckedData:
    """What the data checks found: one report and one content fingerprint per dataset, by role."""

    reports: list[ValidationReport]
    fingerprints: dict[str, str]
    loaded: dict[str, tuple[str, list[dict]]]


def _split_of(recipe: Recipe, role: str) -> tuple[str, str]:
    """(source, split) a dataset role reads."""
    d = recipe.data
    splits = {
        "sft/train": (d.sft_source, d.train_split),
        "sft/eval": (d.sft_source, d.eval_split),
        "sft/validation": (d.sft_source, d.validation_split),
        "preference/train": (d.preference_source, d.preference_train_split or d.train_split),
        "preference/eval": (d.preference_source, d.preference_eval_split or d.eval_split),
        "preference/validation": (d.preference_source, d.preference_validation_split),
    }
    return splits[role]


def run_data_checks(recipe: Recipe, out_dir: Path) -> CheckedData:
    """Load every dataset of the recipe and run its GX suite. Raises nothing on bad data.

    Returns one report per dataset, each dataset's content fingerprint and the loaded rows, by role.

    Held-out splits are checked first: their sample keys (image + question) guard the
    training splits, so a leaked pair is dropped from training and the held-out set stays fixed.
    """
    settings = ValidationSettings(**recipe.validation.model_dump())
    loaded = data.load_recipe_datasets(recipe.data)
    reports: dict[str, ValidationReport] = {}
    fingerprints = {name: data.fingerprint_rows(rows) for name, (_kind, rows) in loaded.items()}
    validation_roles = [name for name in loaded if name.endswith("/validation")]
    for name in ("sft/eval", "preference/eval", *validation_roles, "sft/train", "preference/train"):
        kind, rows = loaded[name]
        held_out = reports.get(name.replace("/train", "/eval")) if name.endswith("/train") else None
        count_tokens, max_tokens = _token_counter(recipe, kind)
        _kept, data_report = validate_rows(
            rows, kind=kind, dataset=name, settings=settings, out_dir=out_dir,
            reference_keys=held_out.sample_keys if held_out else None,
            count_tokens=count_tokens, max_tokens=max_tokens,
        )
        logger.info(data_report.summary())
        reports[name] = data_report
    return CheckedData(list(reports.values()), fingerprints, loaded)


def _text_frame(rows: list[dict]) -> pd.DataFrame:
    """The rows' text columns and image paths, no pixels: what MLflow shows of a dataset input."""
    return pd.DataFrame([{k: v for k, v in row.items() if k not in ("image", "image_error")} for row in rows])


@task(name="fingerprint-datasets", task_run_name="fingerprint data {recipe.name}", cache_policy=NO_CACHE,
      **TRANSIENT_RETRIES)
def fingerprint_datasets(recipe: Recipe, parent_run_id: str) -> dict[str, str]:
    """Load every dataset, hash its content, and record it on the run (lineage tags + MLflow inputs).

    Returns the fingerprints by role: the cache keys of every later stage start from them.
    """
    loaded = data.load_recipe_datasets(recipe.data)
    fingerprints = {name: data.fingerprint_rows(rows) for name, (_kind, rows) in loaded.items()}
    tracking.tag_run(parent_run_id, {
        f"vlmops.data.{name.replace('/', '.')}.fingerprint": value for name, value in fingerprints.items()
    })
    tracking.log_dataset_inputs(parent_run_id, {
        name: (*_split_of(recipe, name), fingerprints[name], _text_frame(rows)) for name, (_kind, rows) in loaded.items()
    })
    return fingerprints


@task(name="compare-with-champion", task_run_name="data changed since champion?", cache_policy=NO_CACHE,
      **TRANSIENT_RETRIES)
def data_unchanged_since_champion(recipe: Recipe, fingerprints: dict[str, str]) -> str | None:
    """A sentence saying why retraining is pointless when the champion saw exactly this data; else None."""
    client = MlflowClient(tracking.tracking_uri())
    name = recipe.registry.registered_model_name
    champion = promotion.alias_version(client, name, recipe.promotion.champion_alias)
    if champion is None:
        return None
    trained_on = {
        role: champion.tags.get(f"vlmops.data.{role.replace('/', '.')}.fingerprint") for role in fingerprints
    }
    if trained_on != fingerprints:
        changed = sorted(role for role in fingerprints if trained_on[role] != fingerprints[role])
        logger.info("data changed since champion version %s: %s", champion.version, ", ".join(changed))
        return None
    return (
        f"data unchanged since champion {name} version {champion.version} (same fingerprints for "
        f"{', '.join(sorted(fingerprints))}); nothing retrained. Run with force=true to retrain anyway."
    )


@task(name="check-data", task_run_name="check data {recipe.name}", cache_policy=NO_CACHE)
def check_data(recipe: Recipe, out_dir: Path) -> list[ValidationReport]:
    """The data checks alone (for `vlmops validate`): reports, no tracking, no exception."""
    return run_data_checks(recipe, out_dir).reports


@task(
    name="validate-dataset", task_run_name="validate {recipe.name}", persist_result=True,
    cache_key_fn=lambda _context, p: orchestration.validation_key(p["recipe"], p["fingerprints"]),
)
def validate_dataset(recipe: Recipe, fingerprints: dict[str, str], run_dir: Path, parent_run_id: str) -> dict[str, list[str]]:
    """Run the GX suites on every dataset of the run; quarantine failing rows.

    Returns the quarantined row ids by dataset name. Raises DataValidationError, with a
    report naming checks, counts and the quarantine file, when a dataset fails more rows
    than `validation.max_failed_fraction` allows: the run stops before any model loads.
    Cached on the data's fingerprints and the checks' settings.
    """
    checked = run_data_checks(recipe, run_dir / "validation")
    reports = checked.reports
    orchestration.publish_markdown(
        f"validation-{recipe.name}", "\n\n".join(f"```\n{r.summary()}\n```" for r in reports),
        f"Data checks of {recipe.name}: rows checked, failed and quarantined per dataset",
    )
    artifacts = [path for r in reports for path in (r.gx_result_path, r.quarantine_path, r.data_docs_path)]
    metrics = {f"{r.dataset.replace('/', '.')}.failed_rows": float(r.n_failed_rows) for r in reports}
    tracking.log_stage_artifacts(parent_run_id, "validate", artifacts, metrics)
    raise_if_failed(reports)
    return {r.dataset: r.quarantined_row_ids for r in reports}


@task(
    name="format-dataset", task_run_name="format {recipe.name}", persist_result=True,
    cache_key_fn=orchestration.cache_key_when_finished(orchestration.format_key),
)
def format_dataset(recipe: Recipe, fingerprints: dict[str, str], quarantined: dict[str, list[str]]) -> FormattedData:
    """Drop quarantined rows and write chat-formatted SFT and preference datasets; returns their folders.

    Written to `<output_dir>/cache/format-<key>`, keyed on the data's fingerprints, the rows
    dropped and the formatting settings; an already finished folder is reused as it is.
    """
    out = orchestration.stage_dir(recipe, orchestration.format_key(recipe, fingerprints, quarantined))
    roles = data.recipe_roles(recipe.data)
    folders = {name: str(out / name.replace("/", "_")) for name in roles}
    if not orchestration.finished(out):
        system_message = recipe.data.system_message
        for name, (kind, rows) in data.load_recipe_datasets(recipe.data).items():
            dropped = set(quarantined.get(name, []))
            kept = [row for row in rows if row["row_id"] not in dropped]
            save = formatting.save_sft_dataset if kind == "sft" else formatting.save_preference_dataset
            save(kept, system_message, Path(folders[name]), image_longest_edge=recipe.data.image_longest_edge)
        orchestration.mark_finished(out)
    return FormattedData(
        sft_train=folders["sft/train"],
        sft_eval=folders["sft/eval"],
        preference_train=folders["preference/train"],
        preference_eval=folders["preference/eval"],
        sft_validation=folders.get("sft/validation"),
        preference_validation=folders.get("preference/validation"),
    )


@task(name="prepare-base-model", task_run_name="prepare {recipe.model.name_or_path}", cache_policy=NO_CACHE)
def prepare_base_model(recipe: Recipe, parent_run_id: str) -> str:
    """Resolve the base model (the offline tiny SmolVLM is built once, then cached) and check it fits.

    Estimates the weights' memory in the recipe's quantization from the model's config
    alone and logs it; raises HardwareError, before any weight loads, when this machine
    cannot run the recipe (see tasks/models.py).
    """
    path = resolve_model_path(recipe.model.name_or_path)
    config = memory.load_model_config(path, recipe.model.revision, recipe.model.trust_remote_code)
    estimate = memory.estimate_weight_memory(
        config, recipe.model.dtype, recipe.quantization.mode,
        bnb_4bit_use_double_quant=recipe.quantization.bnb_4bit_use_double_quant,
    )
    logger.info(
        "%s in %s / quantization %s: weights need about %s (%d parameters quantized, %d kept in %s)",
        recipe.model.name_or_path, recipe.model.dtype, recipe.quantization.mode, memory.format_bytes(estimate.total_bytes),
        estimate.quantized_params, estimate.other_params, recipe.model.dtype,
    )
    tracking.log_params(parent_run_id, {
        "model.estimated_weight_bytes": estimate.total_bytes,
        "model.parameters": estimate.quantized_params + estimate.other_params,
    })
    check_hardware(recipe, estimated_weight_bytes=estimate.total_bytes)
    return path


def _log_training_summary(stage_dir: Path) -> None:
    """Log what training measured (parameter counts, footprint, the batch actually used) on the active stage run."""
    summary = json.loads((stage_dir / "training_summary.json").read_text())
    # Names differ from TrainingArguments' (which the trainer logs as the recipe asked), since the
    # batch may have been lowered on out-of-memory.
    mlflow.log_params({
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "per_device_train_batch_size_used": summary["per_device_train_batch_size"],
        "gradient_accumulation_steps_used": summary["gradient_accumulation_steps"],
        "world_size": summary["world_size"],
    })
    resolved = {f"peft.{k}": v for k, v in summary["peft_config"].items()}
    resolved |= {f"bnb.{k}": v for k, v in (summary["quantization_config"] or {}).items()}
    mlflow.log_params({key: str(value)[:6000] for key, value in resolved.items() if value not in (None, "", [], {})})
    mlflow.log_metric("memory_footprint_mib", summary["memory_footprint_bytes"] / 2**20)
    mlflow.log_artifact(str(stage_dir / "training_summary.json"))


def timed(stage_task, minutes: float | None):
    """The task with the recipe's time limit (`resources.*_timeout_minutes`); None leaves it unlimited."""
    return stage_task.with_options(timeout_seconds=minutes * 60) if minutes else stage_task


def _optional_path(path: str | None) -> Path | None:
    return Path(path) if path else None


@task(
    name="train-sft", task_run_name="sft {recipe.name} r{recipe.lora.r}", tags=["gpu"], persist_result=True,
    cache_key_fn=orchestration.cache_key_when_finished(orchestration.sft_key),
)
def train_sft_adapter(
    recipe: Recipe, fingerprints: dict[str, str], quarantined: dict[str, list[str]], formatted: FormattedData,
    parent_run_id: str,
) -> str:
    """SFT with a LoRA adapter; the trainer's curves go to a nested `sft` MLflow run. Returns the adapter folder.

    Cached: the folder is named by the base model, the SFT data's fingerprints and the
    adapter and SFT settings. A finished folder is reused without training; an unfinished
    one (a killed run) resumes from its last checkpoint. With `resources.num_processes > 1`
    the same training runs under torchrun (tasks/distributed.py).
    """
    out = orchestration.stage_dir(recipe, orchestration.sft_key(recipe, fingerprints, quarantined))
    if orchestration.finished(out):
        logger.info("SFT adapter for these data and settings already trained: reusing %s", out / "adapter")
        return str(out / "adapter")
    with tracking.stage_run(parent_run_id, "sft") as run:
        if recipe.resources.num_processes > 1:
            adapter = distributed.launch_training(
                "sft", recipe, out, train_path=Path(formatted.sft_train),
                eval_path=_optional_path(formatted.sft_validation), report_to=["mlflow"],
                env={"MLFLOW_RUN_ID": run.info.run_id, "MLFLOW_TRACKING_URI": tracking.tracking_uri()},
            )
        else:
            adapter = training.train_sft(
                recipe, Path(formatted.sft_train), out, report_to=["mlflow"],
                eval_path=_optional_path(formatted.sft_validation), callbacks=[orchestration.TrainingProgress("sft")],
            )
        _log_training_summary(out)
    orchestration.mark_finished(out)
    return str(adapter)


@task(
    name="train-dpo", task_run_name="dpo {recipe.name} beta{recipe.dpo.beta}", tags=["gpu"], persist_result=True,
    cache_key_fn=orchestration.cache_key_when_finished(orchestration.dpo_key),
)
def train_dpo_adapter(
    recipe: Recipe, fingerprints: dict[str, str], quarantined: dict[str, list[str]], sft_adapter: str,
    formatted: FormattedData, parent_run_id: str,
) -> str:
    """DPO from the SFT adapter (the SFT policy is the reference); curves go to a nested `dpo` run.

    Cached like SFT, on everything the SFT adapter depends on plus the preference data and DPO settings.
    """
    out = orchestration.stage_dir(recipe, orchestration.dpo_key(recipe, fingerprints, quarantined))
    if orchestration.finished(out):
        logger.info("DPO adapter for these data and settings already trained: reusing %s", out / "adapter")
        return str(out / "adapter")
    with tracking.stage_run(parent_run_id, "dpo") as run:
        if recipe.resources.num_processes > 1:
            adapter = distributed.launch_training(
                "dpo", recipe, out, train_path=Path(formatted.preference_train), sft_adapter_dir=Path(sft_adapter),
                eval_path=_optional_path(formatted.preference_validation), report_to=["mlflow"],
                env={"MLFLOW_RUN_ID": run.info.run_id, "MLFLOW_TRACKING_URI": tracking.tracking_uri()},
            )
        else:
            adapter = training.train_dpo(
                recipe, Path(sft_adapter), Path(formatted.preference_train), out, ["mlflow"],
                eval_path=_optional_path(formatted.preference_validation), callbacks=[orchestration.TrainingProgress("dpo")],
            )
        _log_training_summary(out)
    orchestration.mark_finished(out)
    return str(adapter)


@task(name="evaluate-model", task_run_name="evaluate {label}", cache_policy=NO_CACHE)
def evaluate_model(
    recipe: Recipe, label: str, adapter_dir: str | None, formatted: FormattedData, run_dir: Path, parent_run_id: str
) -> dict[str, float]:
    """Evaluate one model (the base when `adapter_dir` is None) on the held-out split; returns its metrics."""
    metrics, predictions = evaluation.evaluate_model(recipe, adapter_dir, formatted.sft_eval, formatted.preference_eval)
    predictions_path = run_dir / "evaluation" / f"{label}_predictions.json"
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    predictions_path.write_text(json.dumps(predictions, indent=1))
    tracking.log_stage_artifacts(parent_run_id, f"evaluate {label}", [predictions_path], metrics)
    return metrics


@task(name="write-evaluation-report", task_run_name="report {recipe.name}", cache_policy=NO_CACHE)
def write_evaluation_report(
    recipe: Recipe, formatted: FormattedData, run_dir: Path, parent_run_id: str,
    metrics_by_model: dict[str, dict[str, float]],
) -> dict[str, str]:
    """Comparison table (CSV, markdown, bar-chart PNG) and prediction gallery (HTML) of all models."""
    out_dir = run_dir / "evaluation"
    predictions_by_model = {
        label: json.loads((out_dir / f"{label}_predictions.json").read_text()) for label in metrics_by_model
    }
    paths = report.write_comparison(metrics_by_model, out_dir)
    orchestration.publish_table(
        f"evaluation-{recipe.name}",
        [{"metric": metric, **{model: round(values[metric], 4) for model, values in metrics_by_model.items()}}
         for metric in metrics_by_model["base"] if not metric.startswith("eval_samples")],
        f"Base, SFT and DPO on the same held-out data ({recipe.name})",
    )
    paths["gallery"] = report.write_gallery(formatted.sft_eval, predictions_by_model, out_dir / "gallery.html")
    tracking.log_stage_artifacts(parent_run_id, "report", list(paths.values()), {})
    tracking.log_params(parent_run_id, {f"decoding.{k}": v for k, v in evaluation.decoding_config(recipe).items()})
    return {name: str(path) for name, path in paths.items()}


@task(name="register-adapter", task_run_name="register {recipe.registry.registered_model_name}",
      cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def register_adapter(
    recipe: Recipe, parent_run_id: str, adapter_dir: str, metrics_by_model: dict[str, dict[str, float]]
) -> RegisteredAdapter:
    """Log all models' metrics, register the adapter as a new version, alias it `candidate`."""
    tracking.log_comparison(parent_run_id, metrics_by_model)
    base_model_dir = resolve_model_path(TINY_SMOLVLM) if recipe.model.name_or_path == TINY_SMOLVLM else None
    # lineage (base model, data fingerprints, commit, Prefect run) is copied from the run by register_adapter
    version_tags = {f"metric.{name}": f"{value:.6f}" for name, value in metrics_by_model["dpo"].items()}
    name, version = tracking.register_adapter(
        parent_run_id, recipe, Path(adapter_dir), Path(base_model_dir) if base_model_dir else None, version_tags
    )
    _publish_mlflow_links(parent_run_id, name, version)
    return RegisteredAdapter(name=name, version=version, alias=recipe.registry.candidate_alias)


def _publish_mlflow_links(run_id: str, name: str, version: str) -> None:
    """Prefect link artifacts to the MLflow run and the registered version (a command for a local store)."""
    uri = tracking.tracking_uri()
    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        orchestration.publish_link("mlflow-run", f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
                                   f"MLflow run {run_id}", "The pipeline's MLflow run")
        orchestration.publish_link("mlflow-model-version", f"{base}/#/models/{name}/versions/{version}",
                                   f"{name} version {version}", "The registered adapter version")
    else:
        orchestration.publish_markdown("mlflow-run", (
            f"MLflow run `{run_id}`, registered as **{name} version {version}** in `{uri}`.\n\n"
            f"Open it: `mlflow ui --backend-store-uri {uri}`, then experiment {experiment_id}."
        ), "Where the run and the registered adapter are")


@task(name="promote-if-better", task_run_name="gate {registered.name} v{registered.version}", cache_policy=NO_CACHE,
      **TRANSIENT_RETRIES)
def promote_if_better(
    recipe: Recipe, registered: RegisteredAdapter, formatted: FormattedData, run_dir: Path, parent_run_id: str
) -> promotion.Decision | None:
    """The promotion gate: the new version becomes champion only if it beats the current one.

    Champion and candidate are compared on the same held-out data: when the champion was
    evaluated on other data (its fingerprint tags differ), it is evaluated again here on
    this run's. The decision is written to the version's tags and the run. None when the
    recipe turns the gate off.
    """
    if not recipe.promotion.enabled:
        return None
    policy, name = recipe.promotion, registered.name
    client = MlflowClient(tracking.tracking_uri())
    with promotion.registry_lock(name):
        candidate = client.get_model_version(name, registered.version)
        champion = promotion.alias_version(client, name, policy.champion_alias)
        champion_metrics = None
        if champion is not None:
            if promotion.same_eval_data(candidate, champion):
                champion_metrics = promotion.version_metrics(champion)
            else:
                logger.info("champion version %s was evaluated on other data: evaluating it on this run's", champion.version)
                champion_metrics = _evaluate_version(
                    recipe, f"models:/{name}/{champion.version}", formatted, run_dir / "champion", parent_run_id
                )
        decision = promotion.decide(
            promotion.version_metrics(candidate), champion_metrics, policy,
            str(champion.version) if champion is not None else None,
        )
        promotion.record_decision(client, name, registered.version, decision, parent_run_id)
        if decision.promote:
            promotion.move_champion(client, name, registered.version, policy)
    logger.info("promotion of %s version %s: %s", name, registered.version, decision.reason)
    return decision


def _evaluate_version(recipe: Recipe, model_uri: str, formatted: FormattedData, out_dir: Path, parent_run_id: str):
    """Metrics of a registered version on this run's held-out data, logged as a nested run."""
    registered = tracking.download_registered_adapter(model_uri, out_dir)
    metrics, _predictions = evaluation.evaluate_model(
        _as_trained(recipe, registered), registered["adapter_dir"], formatted.sft_eval, formatted.preference_eval
    )
    tracking.log_stage_artifacts(parent_run_id, f"evaluate {model_uri}", [], metrics)
    return metrics


def _as_trained(recipe: Recipe, registered: dict) -> Recipe:
    """The recipe with the base model and quantization a registered adapter was trained on."""
    return recipe.model_copy(update={
        "model": recipe.model.model_copy(update={
            "name_or_path": registered["base_model"], "revision": registered["revision"], "dtype": registered["dtype"],
        }),
        "quantization": QuantizationConfig(**registered["quantization"]),
    })


@task(name="finish-tracking-run", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def finish_tracking_run(parent_run_id: str, status: str = "FINISHED", skipped: str | None = None) -> None:
    """Close the MLflow parent run as FINISHED or FAILED; a skipped run says why in `vlmops.skipped`."""
    if skipped:
        tracking.tag_run(parent_run_id, {"vlmops.skipped": skipped})
    tracking.end_pipeline_run(parent_run_id, status)


@dataclass(frozen=True)
class EvalData:
    """Folders of the formatted held-out datasets."""

    sft_eval: str
    preference_eval: str


@task(name="fetch-registered-adapter", task_run_name="fetch {model_uri}", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def fetch_registered_adapter(model_uri: str, run_dir: Path) -> dict:
    """Download a registered adapter model; returns its adapter folder and base model settings."""
    return tracking.download_registered_adapter(model_uri, run_dir / "registered")


@task(name="prepare-eval-data", task_run_name="prepare eval data {recipe.name}", cache_policy=NO_CACHE)
def prepare_eval_data(recipe: Recipe, run_dir: Path) -> EvalData:
    """Load the recipe's held-out splits, drop rows failing the checks, format them."""
    settings = ValidationSettings(**recipe.validation.model_dump())
    held_out = data.load_recipe_datasets(recipe.data, roles=("sft/eval", "preference/eval"))
    folders = {}
    for name, (kind, rows) in held_out.items():
        kept, data_report = validate_rows(rows, kind=kind, dataset=name, settings=settings, out_dir=run_dir / "validation")
        logger.info(data_report.summary())
        raise_if_failed([data_report])
        save = formatting.save_sft_dataset if kind == "sft" else formatting.save_preference_dataset
        path = run_dir / "data" / name.replace("/", "_")
        folders[name] = str(save(kept, recipe.data.system_message, path,
                                 image_longest_edge=recipe.data.image_longest_edge))
    return EvalData(sft_eval=folders["sft/eval"], preference_eval=folders["preference/eval"])


@task(name="evaluate-registered", task_run_name="evaluate {registered[model_uri]}", cache_policy=NO_CACHE)
def evaluate_registered(recipe: Recipe, registered: dict, eval_data: EvalData, run_dir: Path) -> dict[str, float]:
    """Evaluate a registered adapter on its own base (as it was trained) and the recipe's held-out data."""
    metrics, predictions = evaluation.evaluate_model(
        _as_trained(recipe, registered), registered["adapter_dir"], eval_data.sft_eval, eval_data.preference_eval
    )
    predictions_path = run_dir / "evaluation" / "predictions.json"
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    predictions_path.write_text(json.dumps(predictions, indent=1))
    tracking.log_evaluation_run(recipe.registry.experiment_name, registered["model_uri"], metrics, [predictions_path])
    return metrics


@task(name="promote-version", task_run_name="promote {name} v{version}", cache_policy=NO_CACHE)
def promote_version(name: str, version: str, policy: PromotionConfig) -> dict[str, str | None]:
    """Make a version champion by hand (no gate); the replaced champion becomes `previous`."""
    client = MlflowClient(tracking.tracking_uri())
    replaced = promotion.promote_by_hand(client, name, version, policy)
    return {"champion": version, "previous": replaced}


@task(name="rollback-champion", task_run_name="rollback {name}", cache_policy=NO_CACHE)
def rollback_champion(name: str, policy: PromotionConfig) -> dict[str, str | None]:
    """Give `champion` back to the `previous` version."""
    champion, rolled_back = promotion.rollback(MlflowClient(tracking.tracking_uri()), name, policy)
    return {"champion": champion, "rolled_back": rolled_back}
