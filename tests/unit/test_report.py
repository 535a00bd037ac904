"""Reports: the comparison table, its bar chart and the HTML gallery of sample predictions."""

from __future__ import annotations

import base64
import csv
import io
import re

import pytest
from PIL import Image

from tasks.data import CHARTQA_SYNTH, load_sft_rows
from tasks.formatting import save_sft_dataset
from tasks.report import CHART_SIZE, chart_groups, comparison_table, write_comparison, write_gallery

METRICS = {
    "base": {
        "relaxed_accuracy": 0.0,
        "relaxed_accuracy.argmax": 0.0,
        "relaxed_accuracy.count": 0.0,
        "preference_accuracy": 0.7,
        "preference_margin": 60.0,
        "eval_samples": 4.0,
    },
    "sft": {
        "relaxed_accuracy": 0.5,
        "relaxed_accuracy.argmax": 1.0,
        "relaxed_accuracy.count": 0.0,
        "preference_accuracy": 0.9,
        "preference_margin": 62.5,
        "eval_samples": 4.0,
    },
    "dpo": {
        "relaxed_accuracy": 0.75,
        "relaxed_accuracy.argmax": 1.0,
        "relaxed_accuracy.count": 0.5,
        "preference_accuracy": 0.95,
        "preference_margin": 70.0,
        "eval_samples": 4.0,
    },
}


def test_comparison_table_has_every_model_metric_and_type():
    rows = comparison_table(METRICS)
    assert len(rows) == 3 * 6
    assert {tuple(row) for row in rows} == {("model", "metric", "question_type", "value")}
    cells = {(r["model"], r["metric"], r["question_type"]): r["value"] for r in rows}
    assert cells[("sft", "relaxed_accuracy", "argmax")] == 1.0
    assert cells[("dpo", "relaxed_accuracy", "all")] == 0.75
    assert cells[("base", "preference_margin", "all")] == 60.0
    for model, metrics in METRICS.items():
        for key, value in metrics.items():
            metric, _, question_type = key.partition(".")
            assert cells[(model, metric, question_type or "all")] == value
    # Metric by metric, overall first, models in the given order.
    assert [r["model"] for r in rows[:3]] == ["base", "sft", "dpo"]
    assert [(r["metric"], r["question_type"]) for r in rows[::3][:3]] == [
        ("relaxed_accuracy", "all"), ("relaxed_accuracy", "argmax"), ("relaxed_accuracy", "count"),
    ]


def test_a_metric_one_model_lacks_stays_in_the_table_as_none():
    rows = comparison_table({"a": {"relaxed_accuracy": 1.0, "relaxed_accuracy.count": 1.0}, "b": {"relaxed_accuracy": 0.0}})
    assert {(r["model"], r["question_type"]): r["value"] for r in rows} == {
        ("a", "all"): 1.0, ("b", "all"): 0.0, ("a", "count"): 1.0, ("b", "count"): None,
    }


def test_write_comparison_writes_csv_markdown_and_png(tmp_path):
    paths = write_comparison(METRICS, tmp_path / "report")
    assert set(paths) == {"csv", "md", "png"}
    assert [p.name for p in paths.values()] == ["comparison.csv", "comparison.md", "comparison.png"]

    with paths["csv"].open(newline="") as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == 18
    assert {(r["model"], r["metric"], r["question_type"]): float(r["value"]) for r in read} == {
        (r["model"], r["metric"], r["question_type"]): r["value"] for r in comparison_table(METRICS)
    }

    markdown = paths["md"].read_text().splitlines()
    assert markdown[0] == "| metric | question type | base | sft | dpo |"
    assert "| relaxed_accuracy | count | 0.000 | 0.000 | 0.500 |" in markdown
    assert "| eval_samples | all | 4 | 4 | 4 |" in markdown
    assert len(markdown) == 2 + 6

    with Image.open(paths["png"]) as image:
        assert image.format == "PNG"
        assert image.size == CHART_SIZE
        rgb = image.convert("RGB")
    colours = {colour for _, colour in rgb.getcolors(maxcolors=1 << 16)}
    assert colours - {(255, 255, 255)}, "the chart is blank"
    from tasks.report import MODEL_COLORS

    assert set(MODEL_COLORS[:3]) <= colours, "each model's bar colour is drawn"


def test_chart_groups_are_overall_then_types_then_preference():
    assert [key for _, key in chart_groups(METRICS)] == [
        "relaxed_accuracy", "relaxed_accuracy.argmax", "relaxed_accuracy.count", "preference_accuracy",
    ]


def test_chart_draws_without_types_and_without_models(tmp_path):
    paths = write_comparison({"base": {"relaxed_accuracy": 0.2, "preference_accuracy": 0.5}}, tmp_path / "one")
    assert Image.open(paths["png"]).size == CHART_SIZE
    assert Image.open(write_comparison({}, tmp_path / "none")["png"]).size == CHART_SIZE


# --- gallery -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_dataset(tmp_path_factory):
    rows = load_sft_rows(CHARTQA_SYNTH, "test", 4)
    rows[1] = dict(rows[1], question="<script>alert('x')</script> How many bars?")
    path = save_sft_dataset(rows, "Answer briefly.", tmp_path_factory.mktemp("gallery") / "eval")
    return path, rows


def _predictions(rows, answers, correct):
    return [
        {
            "row_index": i,
            "question_type": row["question_type"],
            "question": row["question"],
            "label": row["answer"],
            "prediction": answer,
            "correct": ok,
        }
        for i, (row, answer, ok) in enumerate(zip(rows, answers, correct))
    ]


def test_gallery_shows_every_answer_marked_and_escaped(eval_dataset, tmp_path):
    path, rows = eval_dataset
    predictions = {
        "base": _predictions(rows, ["caption-a", "caption-b", "caption-c", "caption-d"], [False] * 4),
        "sft": _predictions(rows, [rows[0]["answer"], "<b>7</b>", rows[2]["answer"], "zz"], [True, False, True, False]),
    }
    out = write_gallery(path, predictions, tmp_path / "gallery" / "gallery.html")
    page = out.read_text()

    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<b>7</b>" not in page and "&lt;b&gt;7&lt;/b&gt;" in page
    for answers in predictions.values():
        for prediction in answers:
            assert re.sub(r"<", "&lt;", prediction["prediction"]).replace(">", "&gt;") in page
    # One row per sample; per model cell the mark matches `correct`.
    table_rows = re.findall(r"<tr><td>(\d+)</td>(.*?)</tr>", page, flags=re.S)
    assert [int(index) for index, _ in table_rows] == [0, 1, 2, 3]
    for index, row_html in table_rows:
        marks = re.findall(r'<td class="(correct|incorrect)">([✓✗]) ', row_html)
        expected = [predictions[model][int(index)]["correct"] for model in ("base", "sft")]
        assert [(css == "correct", mark == "✓") for css, mark in marks] == [(ok, ok) for ok in expected]
    assert "base: 0/4 correct" in page and "sft: 2/4 correct" in page

    # Images inline, as PNGs that decode; no external references.
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 4
    assert Image.open(io.BytesIO(base64.b64decode(uris[0]))).size == rows[0]["image"].size
    assert "http://" not in page and "https://" not in page
    assert 'src="' not in re.sub(r'src="data:image/png;base64,[^"]*"', "", page)


def test_gallery_takes_types_in_turn_up_to_max_samples(eval_dataset, tmp_path):
    path, rows = eval_dataset
    predictions = {"dpo": _predictions(rows, ["x"] * 4, [False] * 4)}
    page = write_gallery(path, predictions, tmp_path / "g.html", max_samples=3).read_text()
    shown = [int(i) for i in re.findall(r"<tr><td>(\d+)</td>", page)]
    # Types of rows 0..3: argmax, count, value, argmax: one of each type first.
    assert shown == [0, 1, 2]
    assert "3 of 4 held-out samples" in page
