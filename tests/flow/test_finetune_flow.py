"""The demo recipe end to end under Prefect, recorded in a real (SQLite) MLflow store."""

import base64
import io
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.cli import format_summary
from flows.finetune import finetune
from tasks import synthetic
from tasks.config import load_recipe

REPO = Path(__file__).resolve().parents[2]
MODELS = ("base", "sft", "dpo")


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, prefect_harness, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    patch = pytest.MonkeyPatch()
    patch.chdir(tmp)
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    recipe = load_recipe(REPO / "configs" / "demo.yaml", [f"output_dir={tmp / 'runs'}"])
    result = finetune(recipe)
    yield recipe, result, tmp
    patch.undo()


def test_new_version_is_registered_with_candidate_alias(demo_run):
    recipe, result, _tmp = demo_run
    client = MlflowClient(result.tracking_uri)
    version = client.get_model_version_by_alias(recipe.registry.registered_model_name, "candidate")
    assert str(version.version) == result.registered.version
    assert version.run_id == result.run_id
    assert version.tags["vlmops.base_model"] == "builtin:tiny-smolvlm"


def test_adapter_can_be_downloaded_from_the_registry(demo_run):
    recipe, result, tmp = demo_run
    mlflow.set_tracking_uri(result.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(
        f"models:/{recipe.registry.registered_model_name}@candidate", dst_path=str(tmp / "download")
    ))
    adapter = local / "artifacts" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert list(adapter.glob("*.safetensors")), "no adapter weights in the registered model"


def test_metrics_exist_for_base_sft_and_dpo(demo_run):
    _recipe, result, _tmp = demo_run
    logged = MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics
    for model in MODELS:
        for metric in ("relaxed_accuracy", "preference_accuracy", "preference_margin"):
            assert f"{model}.{metric}" in logged
            assert logged[f"{model}.{metric}"] == pytest.approx(result.metrics[model][metric])
    # SFT must have taught the base something: the base captions instead of answering.
    assert result.metrics["sft"]["relaxed_accuracy"] >= result.metrics["base"]["relaxed_accuracy"] + 0.15


def test_stages_have_nested_runs_with_training_curves(demo_run):
    _recipe, result, _tmp = demo_run
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    by_name = {child.info.run_name: child for child in children}
    assert {"validate", "sft", "dpo", "evaluate base", "evaluate sft", "evaluate dpo"} <= set(by_name)
    assert len(client.get_metric_history(by_name["sft"].info.run_id, "loss")) >= 5
    assert len(client.get_metric_history(by_name["dpo"].info.run_id, "loss")) >= 2
    assert parent.data.params["sft.learning_rate"] == "0.002"
    assert parent.info.status == "FINISHED"


def test_registered_model_answers_an_image_question(demo_run):
    recipe, result, _tmp = demo_run
    mlflow.set_tracking_uri(result.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{recipe.registry.registered_model_name}@candidate")
    buffer = io.BytesIO()
    synthetic.render_chart(synthetic.ChartSpec(("red", "blue"), (3, 8))).save(buffer, format="PNG")
    frame = pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()], "question": ["How many bars are there?"]})
    answers = model.predict(frame)
    assert len(answers) == 1 and isinstance(answers[0], str) and answers[0]


def test_summary_names_run_version_alias_and_ui_command(demo_run):
    recipe, result, _tmp = demo_run
    summary = format_summary(result)
    assert result.run_id in summary
    assert f"{recipe.registry.registered_model_name} version {result.registered.version}" in summary
    assert "'candidate'" in summary and "mlflow ui --backend-store-uri" in summary
    for model in MODELS:
        assert model in summary


def test_bad_data_stops_the_run_before_any_training(tiny_model_dir, prefect_harness, isolated_mlflow, tmp_path):
    from tasks.validation import DataValidationError

    recipe = load_recipe(REPO / "configs" / "demo.yaml", [
        f"output_dir={tmp_path / 'runs'}", "validation.max_question_chars=5",
        "data.max_train_samples=40", "data.max_preference_samples=20", "data.max_eval_samples=10",
    ])
    with pytest.raises(DataValidationError, match="question"):
        finetune(recipe)
    client = MlflowClient(isolated_mlflow)
    experiment = client.get_experiment_by_name(recipe.registry.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert {run.info.run_name for run in runs} == {"finetune demo", "validate"}  # no sft, no dpo
    parent = next(run for run in runs if run.info.run_name == "finetune demo")
    assert parent.info.status == "FAILED"
    assert list((tmp_path / "runs").glob("*/validation/quarantine/*.jsonl"))
    assert not list((tmp_path / "runs").glob("cache/sft-*"))


def test_evaluate_flow_reproduces_the_registered_versions_metrics(demo_run, capsys):
    """Same model, data and decoding: evaluating the registered version gives the run's DPO numbers."""
    from flows.cli import main

    recipe, result, tmp = demo_run
    uri = f"models:/{recipe.registry.registered_model_name}/{result.registered.version}"
    assert main(["evaluate", uri, "-c", str(REPO / "configs" / "demo.yaml"), "--set", f"output_dir={tmp / 'eval'}"]) == 0
    printed = {line.split()[0]: float(line.split()[1]) for line in capsys.readouterr().out.splitlines() if line.strip()}
    for metric in ("relaxed_accuracy", "preference_accuracy"):
        assert printed[metric] == pytest.approx(result.metrics["dpo"][metric], abs=1e-4)  # printed to 4 places
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id], filter_string=f"tags.`vlmops.model_uri` = '{uri}'"
    )
    assert len(runs) == 1 and runs[0].data.metrics["relaxed_accuracy"] == pytest.approx(printed["relaxed_accuracy"])


def test_comparison_and_gallery_are_written_and_logged(demo_run):
    _recipe, result, _tmp = demo_run
    for name in ("csv", "md", "png", "gallery"):
        assert Path(result.report[name]).is_file(), name
    gallery = Path(result.report["gallery"]).read_text()
    assert gallery.count("data:image/png;base64") >= 10
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    assert parent.data.params["decoding.do_sample"] == "False"
    assert "sft.relaxed_accuracy.count" in parent.data.metrics  # per question type
    report_run = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.run_id}' and attributes.run_name = 'report'",
    )[0]
    logged = {item.path for item in client.list_artifacts(report_run.info.run_id)}
    assert {"comparison.png", "comparison.md", "gallery.html"} <= logged


def test_learning_proof_on_the_held_out_split(demo_run):
    """The demo recipe teaches: SFT >= base + 30 points, DPO keeps it and prefers chosen answers."""
    _recipe, result, _tmp = demo_run
    base, sft, dpo = (result.metrics[m] for m in MODELS)
    assert sft["relaxed_accuracy"] >= base["relaxed_accuracy"] + 0.30
    assert dpo["preference_accuracy"] >= 0.90
    assert dpo["relaxed_accuracy"] >= sft["relaxed_accuracy"] - 0.02


def _all_runs(client: MlflowClient, result):
    experiment_id = client.get_run(result.run_id).info.experiment_id
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    return [client.get_run(result.run_id), *children]


def test_every_run_and_the_version_carry_the_lineage_tags(demo_run):
    recipe, result, _tmp = demo_run
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    lineage = {key: parent.data.tags[key] for key in (
        "vlmops.base_model", "vlmops.base_model_revision", "vlmops.git_commit", "prefect.flow_run_id",
        "vlmops.data.sft.train.fingerprint", "vlmops.data.sft.eval.fingerprint",
        "vlmops.data.preference.train.fingerprint", "vlmops.data.preference.eval.fingerprint",
    )}
    assert lineage["vlmops.base_model"] == "builtin:tiny-smolvlm"
    assert len(lineage["vlmops.git_commit"].removesuffix("-dirty")) == 40
    assert parent.data.tags["mlflow.source.git.commit"] == lineage["vlmops.git_commit"].removesuffix("-dirty")
    runs = _all_runs(client, result)
    assert len(runs) >= 7
    for run in runs:
        missing = {k: v for k, v in lineage.items() if run.data.tags.get(k) != v}
        assert not missing, f"run {run.info.run_name!r} lacks {sorted(missing)}"
    version = client.get_model_version(recipe.registry.registered_model_name, result.registered.version)
    assert {k: version.tags.get(k) for k in lineage} == lineage
    assert version.tags["vlmops.run_id"] == result.run_id
    assert float(version.tags["metric.relaxed_accuracy"]) == pytest.approx(result.metrics["dpo"]["relaxed_accuracy"])


def test_datasets_are_logged_as_inputs_with_their_fingerprints(demo_run):
    _recipe, result, _tmp = demo_run
    parent = MlflowClient(result.tracking_uri).get_run(result.run_id)
    inputs = {item.dataset.name: item for item in parent.inputs.dataset_inputs}
    assert set(inputs) == {"sft/train", "sft/eval", "preference/train", "preference/eval"}
    for role, item in inputs.items():
        assert item.dataset.digest == parent.data.tags[f"vlmops.data.{role.replace('/', '.')}.fingerprint"]
        context = {tag.key: tag.value for tag in item.tags}["mlflow.data.context"]
        assert context == ("evaluation" if role.endswith("/eval") else "training")


def test_stage_runs_record_the_resolved_library_settings(demo_run):
    recipe, result, _tmp = demo_run
    client = MlflowClient(result.tracking_uri)
    sft = next(run for run in _all_runs(client, result) if run.info.run_name == "sft")
    params = sft.data.params
    assert params["learning_rate"] == "0.002"  # TRL's SFTConfig, logged by the trainer
    assert params["peft.r"] == str(recipe.lora.r) and params["bnb.bnb_4bit_use_double_quant"] == "True"
    assert int(params["trainable_params"]) > 0


def test_the_first_version_passing_the_floor_becomes_champion(demo_run):
    recipe, result, _tmp = demo_run
    assert result.promotion is not None and result.promotion.promote
    assert "no champion yet" in result.promotion.reason
    client = MlflowClient(result.tracking_uri)
    name = recipe.registry.registered_model_name
    assert str(client.get_model_version_by_alias(name, "champion").version) == result.registered.version
    tags = client.get_model_version(name, result.registered.version).tags
    assert tags["vlmops.promotion.decision"] == "promoted"
    assert client.get_run(result.run_id).data.tags["vlmops.promotion.decision"] == "promoted"
    assert "PROMOTED to champion" in format_summary(result)


def test_an_unreachable_tracking_server_stops_the_run_before_any_work(prefect_harness, tmp_path, monkeypatch):
    import socket

    from tasks.tracking import TrackingUnavailableError

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    recipe = load_recipe(REPO / "configs" / "demo.yaml", [f"output_dir={tmp_path / 'runs'}"])
    with pytest.raises(TrackingUnavailableError, match=f"127.0.0.1:{port} does not answer"):
        finetune(recipe)
    assert not (tmp_path / "runs").exists(), "data work started although MLflow was down"


def test_the_flow_run_publishes_its_artifacts(demo_run):
    """What the Prefect UI's Artifacts tab shows: validation summary, training progress, comparison, MLflow pointer."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _recipe, result, _tmp = demo_run
    flow_run_id = MlflowClient(result.tracking_uri).get_run(result.run_id).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert {"validation-demo", "sft-progress", "dpo-progress", "evaluation-demo", "mlflow-run"} <= set(by_key)
    assert by_key["sft-progress"].data == pytest.approx(100.0) and by_key["dpo-progress"].data == pytest.approx(100.0)
    assert by_key["validation-demo"].type == "markdown" and "sft/train" in by_key["validation-demo"].data
    table = by_key["evaluation-demo"]
    assert table.type == "table" and "relaxed_accuracy" in str(table.data)
    assert result.run_id in by_key["mlflow-run"].data
