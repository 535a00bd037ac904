"""Evaluation: per-question-type accuracy consistent with the predictions, and a fixed, recorded decoding."""

from __future__ import annotations

import pytest

from tasks import evaluation
from tasks.config import Recipe
from tasks.data import CHART_PREFS_SYNTH, CHARTQA_SYNTH, load_preference_rows, load_sft_rows
from tasks.formatting import save_preference_dataset, save_sft_dataset
from tasks.report import comparison_table

SYSTEM = "Answer with a single word or number."


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("held-out")
    rows = load_sft_rows(CHARTQA_SYNTH, "test", 7)
    rows[6] = dict(rows[6], question_type=None)  # a sample without a type counts overall only
    sft = save_sft_dataset(rows, SYSTEM, folder / "sft_eval")
    prefs = save_preference_dataset(load_preference_rows(CHART_PREFS_SYNTH, "test", 2), SYSTEM, folder / "pref_eval")
    return str(sft), str(prefs), rows


def test_decoding_config_is_greedy_and_names_the_recipe_settings():
    recipe = Recipe.model_validate({"evaluation": {"max_new_tokens": 5, "batch_size": 3}})
    config = evaluation.decoding_config(recipe)
    assert config["do_sample"] is False and config["num_beams"] == 1
    assert config["max_new_tokens"] == 5 and config["batch_size"] == 3
    assert set(evaluation.DECODING.items()) <= set(config.items())
    assert all(isinstance(value, (bool, int, float, str)) for value in config.values()), "loggable as params"


def test_generation_uses_the_fixed_decoding(held_out, monkeypatch):
    sft, _prefs, _rows = held_out
    recipe = Recipe.model_validate({"evaluation": {"max_new_tokens": 2, "batch_size": 4}})
    model, processor = evaluation.load_for_evaluation(recipe, None)
    seen = []
    real_generate = model.generate

    def spy(**kwargs):
        seen.append(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    import datasets

    samples = list(datasets.load_from_disk(sft))
    answers = evaluation.generate_answers(model, processor, samples, 4, 2)
    assert len(answers) == len(samples) and len(seen) == 2  # 7 samples, batches of 4
    for kwargs in seen:
        assert {key: kwargs[key] for key in evaluation.DECODING} == evaluation.DECODING
        assert kwargs["max_new_tokens"] == 2


def test_per_type_metrics_are_consistent_with_the_predictions(held_out, monkeypatch):
    sft, prefs, rows = held_out
    # Correct on rows 0, 1, 4 and 6 (argmax, count, count, untyped), wrong elsewhere.
    right = {0, 1, 4, 6}

    def answers(model, processor, samples, batch_size, max_new_tokens):
        return [row["answer"] if i in right else "wrong" for i, row in enumerate(rows)]

    monkeypatch.setattr(evaluation, "generate_answers", answers)
    recipe = Recipe.model_validate({"evaluation": {"batch_size": 4}})
    metrics, predictions = evaluation.evaluate_model(recipe, None, sft, prefs)

    assert [p["row_index"] for p in predictions] == list(range(7))
    assert [p["question_type"] for p in predictions] == ["argmax", "count", "value"] * 2 + [None]
    assert [p["correct"] for p in predictions] == [i in right for i in range(7)]
    assert [p["label"] for p in predictions] == [row["answer"] for row in rows]

    assert metrics["relaxed_accuracy"] == pytest.approx(4 / 7)
    assert metrics["relaxed_accuracy.argmax"] == pytest.approx(1 / 2)
    assert metrics["relaxed_accuracy.count"] == pytest.approx(2 / 2)
    assert metrics["relaxed_accuracy.value"] == pytest.approx(0 / 2)
    assert {key for key in metrics if "." in key} == {
        f"{metric}.{kind}" for metric in ("relaxed_accuracy", "eval_samples") for kind in ("argmax", "count", "value")
    }
    for kind in ("argmax", "count", "value"):
        typed = [p for p in predictions if p["question_type"] == kind]
        assert metrics[f"eval_samples.{kind}"] == len(typed)
        assert metrics[f"relaxed_accuracy.{kind}"] == sum(p["correct"] for p in typed) / len(typed)
    # Typed samples: the sample-weighted mean of the types' accuracies is their overall accuracy.
    typed = [p for p in predictions if p["question_type"]]
    weighted = sum(metrics[f"relaxed_accuracy.{k}"] * metrics[f"eval_samples.{k}"] for k in ("argmax", "count", "value"))
    assert weighted / len(typed) == pytest.approx(sum(p["correct"] for p in typed) / len(typed))
    assert 0.0 <= metrics["preference_accuracy"] <= 1.0

    table = comparison_table({"base": metrics})
    assert {(r["metric"], r["question_type"]) for r in table} >= {("relaxed_accuracy", "all"), ("relaxed_accuracy", "value")}


def test_evaluate_model_end_to_end_on_the_tiny_model(held_out):
    sft, prefs, rows = held_out
    recipe = Recipe.model_validate({"evaluation": {"max_new_tokens": 3, "batch_size": 4}})
    metrics, predictions = evaluation.evaluate_model(recipe, None, sft, prefs)
    assert metrics["eval_samples"] == 7.0
    n_typed = sum(metrics[f"eval_samples.{k}"] for k in ("argmax", "count", "value"))
    assert n_typed == 6
    overall_typed = sum(p["correct"] for p in predictions if p["question_type"]) / 6
    weighted = sum(metrics[f"relaxed_accuracy.{k}"] * metrics[f"eval_samples.{k}"] for k in ("argmax", "count", "value"))
    assert weighted / n_typed == pytest.approx(overall_typed)
    assert metrics["relaxed_accuracy"] == pytest.approx(sum(p["correct"] for p in predictions) / 7)
    assert all(isinstance(p["prediction"], str) for p in predictions)


def test_per_type_metrics_skip_untyped_and_sanitise_names():
    predictions = [
        {"question_type": "yes/no", "correct": True},
        {"question_type": "yes/no", "correct": False},
        {"question_type": "a:b", "correct": True},
        {"question_type": None, "correct": True},
        {"question_type": "", "correct": False},
    ]
    assert evaluation.per_type_metrics(predictions) == {
        "relaxed_accuracy.a_b": 1.0,
        "eval_samples.a_b": 1.0,
        "relaxed_accuracy.yes/no": 0.5,
        "eval_samples.yes/no": 2.0,
    }
