"""Two pipeline runs against a real `mlflow server` on loopback: lineage, gated promotion,
the served champion, and rollback.

Run 1 barely trains (10 SFT steps) and, with no champion yet and a floor of 0, becomes
champion. Run 2 trains properly on a larger held-out set: its evaluation data differ, so the
gate re-evaluates the champion on run 2's data before comparing, run 2 wins, and run 1
becomes `previous`. The champion is then served by `mlflow models serve`, and rolled back.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from servers import http_post_json, start_model_server

from flows.cli import main
from flows.finetune import finetune
from tasks.config import load_recipe
from tasks.tracking import example_request

REPO = Path(__file__).resolve().parents[2]
SMALL = ["data.max_train_samples=1200", "data.max_preference_samples=64", "dpo.max_steps=8", "promotion.min_primary=0.0"]


@pytest.fixture(scope="module")
def two_runs(mlflow_server, tiny_model_dir, prefect_harness, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifecycle")
    weak = load_recipe(REPO / "configs" / "demo.yaml", [
        *SMALL, f"output_dir={tmp / 'runs'}", "sft.max_steps=10", "data.max_eval_samples=60",
    ])
    strong = load_recipe(REPO / "configs" / "demo.yaml", [
        *SMALL, f"output_dir={tmp / 'runs'}", "sft.max_steps=300", "data.max_eval_samples=90",
    ])
    first = finetune(weak)
    second = finetune(strong)
    return strong.registry.registered_model_name, first, second, mlflow_server


def test_each_run_registers_a_version_and_the_better_one_is_champion(two_runs):
    name, first, second, server = two_runs
    client = MlflowClient(server.url)
    assert first.promotion.promote and "no champion yet" in first.promotion.reason
    assert second.promotion.promote, second.promotion.reason
    aliases = {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    assert aliases == {"candidate": second.registered.version, "champion": second.registered.version,
                       "previous": first.registered.version}


def test_the_champion_was_re_evaluated_on_the_new_held_out_data(two_runs):
    name, first, second, server = two_runs
    client = MlflowClient(server.url)
    tags = client.get_model_version(name, second.registered.version).tags
    assert tags["vlmops.promotion.champion_version"] == first.registered.version
    assert tags["vlmops.data.sft.eval.fingerprint"] != client.get_model_version(
        name, first.registered.version).tags["vlmops.data.sft.eval.fingerprint"]
    parent = client.get_run(second.run_id)
    re_evaluation = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{second.run_id}' and "
                      f"attributes.run_name = 'evaluate models:/{name}/{first.registered.version}'",
    )
    assert len(re_evaluation) == 1
    champion_value = re_evaluation[0].data.metrics["relaxed_accuracy"]
    assert float(tags["vlmops.promotion.champion_value"]) == pytest.approx(champion_value, abs=1e-4)
    assert parent.data.tags["vlmops.promotion.decision"] == "promoted"
    assert parent.data.metrics["promotion.promoted"] == 1.0


def test_versions_carry_lineage_and_metrics(two_runs):
    name, first, second, server = two_runs
    client = MlflowClient(server.url)
    for result in (first, second):
        run = client.get_run(result.run_id)
        version = client.get_model_version(name, result.registered.version)
        assert version.run_id == result.run_id
        for key in ("vlmops.git_commit", "prefect.flow_run_id", "vlmops.data.sft.train.fingerprint",
                    "vlmops.data.preference.eval.fingerprint", "vlmops.base_model"):
            assert version.tags[key] == run.data.tags[key], key
        assert float(version.tags["metric.relaxed_accuracy"]) == pytest.approx(
            result.metrics["dpo"]["relaxed_accuracy"], abs=1e-6)  # tags hold 6 decimals
        assert {item.dataset.name for item in run.inputs.dataset_inputs} >= {"sft/train", "sft/eval"}
    assert client.get_run(first.run_id).data.tags["prefect.flow_run_id"] != \
        client.get_run(second.run_id).data.tags["prefect.flow_run_id"]


def test_the_champion_is_served_over_http(two_runs, tmp_path):
    name, _first, second, server = two_runs
    frame = example_request()
    mlflow.set_tracking_uri(server.url)
    expected = list(mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(frame))
    with start_model_server(f"models:/{name}@champion", server.url, log_path=tmp_path / "serve.log") as served:
        request = json.dumps({"dataframe_split": frame.to_dict(orient="split")}).encode()
        status, body = http_post_json(f"{served.url}/invocations", request)
        assert status == 200, body
        assert json.loads(body)["predictions"] == expected
    assert not served.group_alive()


def test_rollback_returns_the_champion_to_the_previous_version(two_runs, capsys):
    name, first, second, server = two_runs
    assert main(["rollback", name]) == 0
    client = MlflowClient(server.url)
    aliases = {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    assert aliases["champion"] == first.registered.version and "previous" not in aliases
    assert "vlmops.promotion.rolled_back" in client.get_model_version(name, second.registered.version).tags
