"""The training stages as the flow calls them: validation splits reach the trainers, and
what training measured (memory estimate, trainable parameters, the batch used, eval loss)
reaches MLflow. Real GX checks, real TRL training on the tiny model, a real SQLite store."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from tasks import stages, tracking
from tasks.config import recipe_from_dict


def _stage_run(client: MlflowClient, parent_run_id: str, stage: str):
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`vlmops.stage` = '{stage}'"
    )
    assert len(runs) == 1, f"expected one {stage} run, found {len(runs)}"
    return runs[0]


def test_validation_splits_are_checked_formatted_and_evaluated_on_during_training(
    tiny_model_dir, isolated_mlflow, tmp_path
):
    recipe = recipe_from_dict({
        "output_dir": str(tmp_path / "runs"),
        "data": {
            "max_train_samples": 16, "max_preference_samples": 8, "max_eval_samples": 6,
            "validation_split": "validation", "preference_validation_split": "validation",
        },
        "quantization": {"mode": "4bit"},
        "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1,
                "eval_strategy": "steps", "eval_steps": 2},
        "dpo": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1,
                "eval_strategy": "steps", "eval_steps": 2},
    })
    run_dir = tmp_path / "runs" / "r"
    parent = tracking.start_pipeline_run(recipe)

    fingerprints = stages.fingerprint_datasets.fn(recipe, parent)
    quarantined = stages.validate_dataset.fn(recipe, fingerprints, run_dir, parent)
    assert {"sft/validation", "preference/validation"} <= set(quarantined)
    formatted = stages.format_dataset.fn(recipe, fingerprints, quarantined)
    assert formatted.sft_validation and Path(formatted.sft_validation).is_dir()
    assert formatted.preference_validation and Path(formatted.preference_validation).is_dir()

    stages.prepare_base_model.fn(recipe, parent)
    sft_adapter = stages.train_sft_adapter.fn(recipe, fingerprints, quarantined, formatted, parent)
    stages.train_dpo_adapter.fn(recipe, fingerprints, quarantined, sft_adapter, formatted, parent)

    client = MlflowClient(isolated_mlflow)
    parent_params = client.get_run(parent).data.params
    assert int(parent_params["model.estimated_weight_bytes"]) > 0
    assert client.get_run(parent).data.tags["vlmops.data.sft.validation.fingerprint"]
    for stage in ("sft", "dpo"):
        run = _stage_run(client, parent, stage)
        assert "eval_loss" in run.data.metrics, f"{stage} never evaluated on its validation split"
        params = run.data.params
        assert 0 < int(params["trainable_params"]) < int(params["total_params"])
        assert params["per_device_train_batch_size_used"] == str(getattr(recipe, stage).per_device_train_batch_size)
        assert run.data.metrics["memory_footprint_mib"] > 0
        # PEFT's and bitsandbytes' settings as the libraries resolved them
        assert params["peft.r"] == "16" and params["peft.peft_type"] == "LORA"
        assert params["bnb.bnb_4bit_quant_type"] == "nf4" and params["bnb.load_in_4bit"] == "True"


def test_sft_stage_with_two_processes_runs_under_torchrun_and_logs_into_its_stage_run(
    tiny_model_dir, isolated_mlflow, tmp_path
):
    recipe = recipe_from_dict({
        "output_dir": str(tmp_path / "runs"),
        "data": {"max_train_samples": 16, "max_preference_samples": 8, "max_eval_samples": 6},
        "quantization": {"mode": "4bit"},
        "sft": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1},
        "resources": {"num_processes": 2},
    })
    run_dir = tmp_path / "runs" / "r"
    parent = tracking.start_pipeline_run(recipe)
    fingerprints = stages.fingerprint_datasets.fn(recipe, parent)
    formatted = stages.format_dataset.fn(recipe, fingerprints, {})
    adapter = stages.train_sft_adapter.fn(recipe, fingerprints, {}, formatted, parent)

    assert (Path(adapter) / "adapter_config.json").is_file()
    assert (Path(adapter).parent / "torchrun.log").is_file()
    client = MlflowClient(isolated_mlflow)
    run = _stage_run(client, parent, "sft")
    assert run.data.params["world_size"] == "2"
    # rank 0's trainer logged its curve into this stage's run (MLFLOW_RUN_ID crossed into the workers)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
