"""Promotion: the gate's arithmetic, and alias moves in a real (SQLite) MLflow registry under
the Prefect lock, including two promotions racing for one registered model."""

from __future__ import annotations

import threading

import mlflow
import pytest
from mlflow import MlflowClient

from flows.cli import main
from flows.promote import promote
from tasks import promotion
from tasks.config import PromotionConfig
from tasks.promotion import PromotionError, decide

POLICY = PromotionConfig(primary_metric="relaxed_accuracy", min_improvement=0.01,
                         guard_metrics={"preference_accuracy": 0.02}, min_primary=0.3)


@pytest.mark.parametrize("candidate, champion, promote_it, reason", [
    ({"relaxed_accuracy": 0.5}, None, True, "no champion yet; relaxed_accuracy 0.5000 reaches the floor 0.3000"),
    ({"relaxed_accuracy": 0.2}, None, False, "is below the floor 0.3000"),
    ({"relaxed_accuracy": 0.70, "preference_accuracy": 0.90}, {"relaxed_accuracy": 0.68, "preference_accuracy": 0.91},
     True, "beats champion version 1's 0.6800 by 0.0200"),
    ({"relaxed_accuracy": 0.685, "preference_accuracy": 0.95}, {"relaxed_accuracy": 0.68, "preference_accuracy": 0.91},
     False, "does not beat champion version 1's 0.6800 by the required 0.0100"),
    ({"relaxed_accuracy": 0.80, "preference_accuracy": 0.85}, {"relaxed_accuracy": 0.68, "preference_accuracy": 0.91},
     False, "guard preference_accuracy dropped 0.0600"),
])
def test_the_gate_promotes_only_a_clear_improvement_that_breaks_no_guard(candidate, champion, promote_it, reason):
    decision = decide(candidate, champion, POLICY, "1" if champion else None)
    assert decision.promote is promote_it
    assert reason in decision.reason
    tags = decision.as_tags()
    assert tags["vlmops.promotion.decision"] == ("promoted" if promote_it else "rejected")
    assert tags["vlmops.promotion.candidate_value"] == f"{candidate['relaxed_accuracy']:.4f}"


def test_a_missing_metric_names_what_there_is():
    with pytest.raises(PromotionError, match=r"no metric 'relaxed_accuracy'.*\['exact_match'\]"):
        decide({"exact_match": 1.0}, None, POLICY)


@pytest.fixture
def registry(isolated_mlflow, prefect_harness):
    """A registered model with versions 1-3 (each a logged run), version 1 the champion."""
    client = MlflowClient(isolated_mlflow)
    name = "adapter"
    client.create_registered_model(name)
    mlflow.set_tracking_uri(isolated_mlflow)
    mlflow.set_experiment("promotion")  # not an experiment id left active by an earlier test's store
    for _ in range(3):
        with mlflow.start_run() as run:
            mlflow.log_text("weights", "model/adapter.txt")
        client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias(name, "champion", "1")
    return client, name


def _aliases(client, name) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def test_promote_by_hand_keeps_the_replaced_champion_as_previous_and_rollback_walks_back(registry):
    client, name = registry
    assert promote(name, "2") == {"champion": "2", "previous": "1"}
    assert promote(name, "3") == {"champion": "3", "previous": "2"}
    assert _aliases(client, name) == {"champion": "3", "previous": "2"}
    tags = client.get_model_version(name, "3").tags
    assert tags["vlmops.promotion.decision"] == "manual" and "promoted by hand by" in tags["vlmops.promotion.reason"]

    assert promote(name, action="rollback") == {"champion": "2", "rolled_back": "3"}
    assert _aliases(client, name) == {"champion": "2", "previous": "1"}  # 2 had replaced 1
    assert "vlmops.promotion.rolled_back" in client.get_model_version(name, "3").tags
    assert promote(name, action="rollback") == {"champion": "1", "rolled_back": "2"}
    assert _aliases(client, name) == {"champion": "1"}  # 1 replaced nothing: no previous left
    with pytest.raises(PromotionError, match="nothing to roll back to"):
        promote(name, action="rollback")


def test_promoting_an_unknown_version_fails_with_its_name(registry):
    _client, name = registry
    with pytest.raises(PromotionError, match="adapter has no version 9"):
        promote(name, "9")


def test_two_promotions_racing_end_with_one_consistent_champion(registry, monkeypatch):
    """Without the lock both would read champion 1 and both set previous=1; with it they queue."""
    client, name = registry
    real_read = MlflowClient.get_model_version_by_alias
    both_read = threading.Barrier(2)

    def read_then_wait_for_the_other(self, *args, **kwargs):
        # Each promotion reads the champion, then waits (up to 3 s) for the other to read it too:
        # without the lock both then hold "champion is 1"; with it the second cannot read yet,
        # so the first times out of the barrier and finishes alone.
        version = real_read(self, *args, **kwargs)
        try:
            both_read.wait(timeout=3)
        except threading.BrokenBarrierError:
            pass
        return version

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", read_then_wait_for_the_other)
    results, errors = {}, []

    def run(version: str) -> None:
        try:
            results[version] = promote(name, version)
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(v,)) for v in ("2", "3")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    first, second = sorted(results, key=lambda v: results[v]["previous"] != "1")
    assert results[first]["previous"] == "1" and results[second]["previous"] == first
    assert _aliases(client, name) == {"champion": second, "previous": first}
    assert client.get_model_version(name, second).tags[promotion.REPLACED_TAG] == first


def test_cli_promote_and_rollback(registry, capsys):
    client, name = registry
    assert main(["promote", name, "3"]) == 0
    assert "champion" in capsys.readouterr().out
    assert main(["rollback", name]) == 0
    assert _aliases(client, name) == {"champion": "1"}
    assert main(["rollback", name]) == 1
    assert "nothing to roll back to" in capsys.readouterr().err
