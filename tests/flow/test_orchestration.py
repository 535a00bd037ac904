"""Prefect policy, for real: cached stages across flow runs, the weekly run's early exit on
unchanged data, retries only for transient failures, and the typed form the UI renders."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.utilities.callables import parameter_schema

from flows.finetune import DEMO_RECIPE, finetune
from tasks import stages, training
from tasks.config import ConfigError, load_recipe

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "data.max_train_samples=200", "data.max_preference_samples=32", "data.max_eval_samples=20",
    "sft.max_steps=20", "dpo.max_steps=4", "promotion.min_primary=0.0",
    "registry.registered_model_name=orchestration-adapter",
]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, prefect_harness, tmp_path_factory):
    """A run that fails in DPO, the same run again, a weekly run on unchanged data, and a forced one."""
    tmp = tmp_path_factory.mktemp("orchestration")
    patch = pytest.MonkeyPatch()
    patch.chdir(tmp)
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    recipe = load_recipe(REPO / "configs" / "demo.yaml", [*SMALL, f"output_dir={tmp / 'runs'}"])

    calls = {"sft": 0, "dpo": 0}
    real_sft, real_dpo = training.train_sft, training.train_dpo

    def counting_sft(*args, **kwargs):
        calls["sft"] += 1
        return real_sft(*args, **kwargs)

    def failing_dpo(*args, **kwargs):
        calls["dpo"] += 1
        raise RuntimeError("DPO crashed (injected)")

    def counting_dpo(*args, **kwargs):
        calls["dpo"] += 1
        return real_dpo(*args, **kwargs)

    patch.setattr(training, "train_sft", counting_sft)
    patch.setattr(training, "train_dpo", failing_dpo)
    with pytest.raises(RuntimeError, match="DPO crashed"):
        finetune(recipe)
    after_failure = dict(calls)

    patch.setattr(training, "train_dpo", counting_dpo)
    rerun = finetune(recipe)
    after_rerun = dict(calls)
    weekly = finetune(recipe, skip_unchanged_data=True)
    after_weekly = dict(calls)
    forced = finetune(recipe, skip_unchanged_data=True, force=True)
    yield {
        "recipe": recipe, "rerun": rerun, "weekly": weekly, "forced": forced,
        "calls": (after_failure, after_rerun, after_weekly, dict(calls)),
    }
    patch.undo()


def _task_states(flow_run_id: str) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.split(" ")[0]: run.state.name for run in task_runs}  # "validate demo" -> "validate"


def test_a_run_that_failed_in_dpo_reuses_its_sft_adapter_when_started_again(runs):
    after_failure, after_rerun, _weekly, _forced = runs["calls"]
    assert after_failure == {"sft": 1, "dpo": 1}
    assert after_rerun == {"sft": 1, "dpo": 2}, "the rerun trained SFT again instead of reusing the adapter"
    assert runs["rerun"].registered is not None


def test_validation_is_served_from_prefects_cache_on_the_rerun(runs):
    rerun = runs["rerun"]
    flow_run_id = MlflowClient(rerun.tracking_uri).get_run(rerun.run_id).data.tags["prefect.flow_run_id"]
    states = _task_states(flow_run_id)
    assert states["validate"] == "Cached", states
    assert states["sft"] in ("Completed", "Cached")


def test_weekly_run_on_unchanged_data_ends_early_and_completed(runs):
    weekly = runs["weekly"]
    _failure, after_rerun, after_weekly, _forced = runs["calls"]
    assert weekly.skipped and "data unchanged since champion orchestration-adapter version" in weekly.skipped
    assert weekly.registered is None and after_weekly == after_rerun  # nothing trained
    run = MlflowClient(weekly.tracking_uri).get_run(weekly.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["vlmops.skipped"] == weekly.skipped
    from flows.cli import format_summary

    assert "nothing trained: data unchanged since champion" in format_summary(weekly)


def test_force_trains_even_on_unchanged_data(runs):
    forced = runs["forced"]
    assert forced.skipped is None and forced.registered is not None
    assert forced.registered.version != runs["rerun"].registered.version


def test_retries_cover_transient_failures_only(prefect_harness):
    attempts = {"transient": 0, "bad recipe": 0}
    policy = {**stages.TRANSIENT_RETRIES, "retry_delay_seconds": 0}

    @task(**policy)
    def flaky_tracking_call():
        attempts["transient"] += 1
        if attempts["transient"] < 3:
            raise ConnectionError("tracking server restarting")
        return "ok"

    @task(**policy)
    def bad_recipe():
        attempts["bad recipe"] += 1
        raise ConfigError("unknown key 'sft.learnin_rate'")

    @flow
    def probe():
        result = flaky_tracking_call()
        try:
            bad_recipe()
        except ConfigError:
            pass
        return result

    assert probe() == "ok"
    assert attempts == {"transient": 3, "bad recipe": 1}


def test_the_form_is_typed_described_and_starts_from_the_demo_recipe():
    schema = parameter_schema(finetune).model_dump_for_openapi()
    definitions = schema["definitions"]
    undescribed = [
        f"{model}.{field}" for model, spec in definitions.items()
        for field, field_spec in spec.get("properties", {}).items() if "description" not in field_spec
    ]
    assert not undescribed, f"form fields without a description: {undescribed}"
    assert definitions["QuantizationConfig"]["properties"]["mode"]["enum"] == ["none", "8bit", "4bit"]
    assert "ipo" in definitions["DPOConfig"]["properties"]["loss_type"]["enum"]
    default = schema["properties"]["recipe"]["default"]
    assert default["quantization"]["mode"] == DEMO_RECIPE.quantization.mode == "4bit"
    assert default["sft"]["max_steps"] == DEMO_RECIPE.sft.max_steps
    for flag in ("skip_unchanged_data", "force"):
        assert schema["properties"][flag]["type"] == "boolean" and schema["properties"][flag]["description"]
