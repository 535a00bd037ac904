"""Tests for tasks.validation: the GX data-validation stage, its quarantine and its threshold."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tasks.validation import (
    DataValidationError,
    ValidationReport,
    ValidationSettings,
    build_metadata_frame,
    raise_if_failed,
    validate_rows,
)

SETTINGS = ValidationSettings()


def tiny_image(size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, color=(200, 30, 30))


def truncated_png() -> Image.Image:
    """A PNG whose header opens (size known) but whose pixels cannot be read, as from a bad file."""
    buf = io.BytesIO()
    # Varied pixels so the compressed data is long enough to cut after the header.
    Image.frombytes("RGB", (16, 16), bytes(range(256)) * 3).save(buf, format="PNG")
    data = buf.getvalue()
    return Image.open(io.BytesIO(data[: len(data) // 2]))


def sft_row(i: int, **overrides: Any) -> dict[str, Any]:
    row = {"row_id": f"sft-{i}", "image": tiny_image(), "question": f"What is bar {i}?", "answer": str(i)}
    return row | overrides


def pref_row(i: int, **overrides: Any) -> dict[str, Any]:
    row = {
        "row_id": f"pref-{i}",
        "image": tiny_image(),
        "question": f"What is bar {i}?",
        "chosen": str(i),
        "rejected": str(i + 1),
    }
    return row | overrides


def read_quarantine(report: ValidationReport) -> list[dict[str, Any]]:
    assert report.quarantine_path is not None
    return [json.loads(line) for line in report.quarantine_path.read_text().splitlines()]


def failed_check_names(report: ValidationReport) -> set[str]:
    return {check.name for check in report.checks if not check.success}


# ---------------------------------------------------------------------------- metadata frame


def test_metadata_frame_columns_and_image_facts() -> None:
    rows = [
        sft_row(0),
        sft_row(1, image=None),
        sft_row(2, image=truncated_png()),
        sft_row(3, image="not an image"),
    ]
    frame = build_metadata_frame(rows, "sft")

    assert list(frame.columns) == [
        "row_id", "question_chars", "answer_chars",
        "image_decodes", "image_width", "image_height", "image_mode",
    ]  # fmt: skip
    assert frame["image_decodes"].tolist() == [True, False, False, False]
    assert frame.loc[0, ["image_width", "image_height", "image_mode"]].tolist() == [16, 16, "RGB"]
    # Undecodable images have no size, even when the header (truncated PNG) knows one.
    assert frame["image_width"].isna().tolist() == [False, True, True, True]


def test_metadata_frame_preference_columns() -> None:
    frame = build_metadata_frame([pref_row(0), pref_row(1, chosen=" same ", rejected="same")], "preference")

    assert {"chosen_chars", "rejected_chars", "chosen_differs"} <= set(frame.columns)
    assert "answer_chars" not in frame.columns
    assert frame["chosen_differs"].tolist() == [True, False]  # surrounding whitespace is ignored


def test_unknown_kind_is_a_caller_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        validate_rows([sft_row(0)], "dpo", "x/train", SETTINGS, tmp_path)


# ---------------------------------------------------------------------------- clean data


@pytest.mark.parametrize(("kind", "make_row"), [("sft", sft_row), ("preference", pref_row)])
def test_clean_rows_pass_without_quarantine(tmp_path: Path, kind: str, make_row: Any) -> None:
    rows = [make_row(i) for i in range(5)]

    kept, report = validate_rows(rows, kind, f"{kind}/train", SETTINGS, tmp_path)

    assert kept == rows
    assert report.passed
    assert report.n_rows == 5 and report.n_failed_rows == 0
    assert all(check.success for check in report.checks)
    assert report.quarantine_path is None
    assert not (tmp_path / "quarantine").exists() or not any((tmp_path / "quarantine").iterdir())
    assert "PASSED" in report.summary()


def test_gx_result_json_is_written_and_parses(tmp_path: Path) -> None:
    _, report = validate_rows([sft_row(0), sft_row(1, answer="")], "sft", "sft/train", SETTINGS, tmp_path)

    assert report.gx_result_path == tmp_path / "sft_train.gx.json"
    result = json.loads(report.gx_result_path.read_text())
    assert result["success"] is False
    assert len(result["results"]) == len(report.checks)
    types = {r["expectation_config"]["type"] for r in result["results"]}
    assert {
        "expect_column_to_exist",
        "expect_column_values_to_be_unique",
        "expect_column_values_to_be_between",
    } <= types


def test_data_docs_page_is_rendered(tmp_path: Path) -> None:
    _, report = validate_rows([sft_row(0)], "sft", "sft/val", SETTINGS, tmp_path)

    assert report.data_docs_path == tmp_path / "sft_val.gx.html"
    assert "<html" in report.data_docs_path.read_text().lower()


# ---------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    ("kind", "bad_row", "check", "value"),
    [
        ("sft", sft_row(99, answer=""), "answer is not empty", 0),
        ("sft", sft_row(99, answer="   "), "answer is not empty", 0),
        ("sft", sft_row(99, question="q" * 513), "question is at most 512 chars", 513),
        ("sft", sft_row(99, image=None), "image decodes", False),
        ("sft", sft_row(99, image=truncated_png()), "image decodes", False),
        ("sft", sft_row(99, image=tiny_image((16, 5000))), "image height is between 8 and 4096 px", 5000),
        ("sft", sft_row(99, image=tiny_image((4, 16))), "image width is between 8 and 4096 px", 4),
        ("preference", pref_row(99, chosen="B", rejected="B"), "chosen differs from rejected", False),
        ("preference", pref_row(99, rejected=None), "rejected is not empty", 0),
    ],
)
def test_bad_row_is_quarantined_and_dropped(
    tmp_path: Path, kind: str, bad_row: dict[str, Any], check: str, value: Any
) -> None:
    make_row = sft_row if kind == "sft" else pref_row
    good = [make_row(i) for i in range(4)]
    rows = [*good[:2], bad_row, *good[2:]]

    kept, report = validate_rows(rows, kind, f"{kind}/train", SETTINGS, tmp_path)

    assert kept == good
    assert report.n_failed_rows == 1
    # Only the expected check fails: e.g. a None image must not also fail the size checks.
    assert failed_check_names(report) == {check}
    (failed,) = report.failed_checks
    assert failed.unexpected_count == 1 and failed.unexpected_row_ids == [bad_row["row_id"]]
    assert report.quarantine_path == tmp_path / "quarantine" / f"{kind}_train.jsonl"
    assert read_quarantine(report) == [
        {"row_id": bad_row["row_id"], "dataset": f"{kind}/train", "check": check, "value": value}
    ]


def test_row_failing_two_checks_gets_two_quarantine_lines(tmp_path: Path) -> None:
    rows = [sft_row(0), sft_row(1, answer="", image=None)]

    kept, report = validate_rows(rows, "sft", "sft/train", SETTINGS, tmp_path)

    assert kept == [rows[0]]
    assert report.n_failed_rows == 1
    lines = read_quarantine(report)
    assert {(line["row_id"], line["check"]) for line in lines} == {
        ("sft-1", "answer is not empty"),
        ("sft-1", "image decodes"),
    }


def test_duplicate_row_ids_are_all_quarantined(tmp_path: Path) -> None:
    rows = [sft_row(0), sft_row(1), sft_row(1, answer="other")]

    kept, report = validate_rows(rows, "sft", "sft/train", SETTINGS, tmp_path)

    assert kept == [rows[0]]
    assert failed_check_names(report) == {"row_id is unique"}
    assert [line["value"] for line in read_quarantine(report)] == ["sft-1", "sft-1"]


def test_empty_split_does_not_pass(tmp_path: Path) -> None:
    kept, report = validate_rows([], "sft", "sft/train", SETTINGS, tmp_path)

    assert kept == []
    assert not report.passed
    assert "dataset is not empty" in failed_check_names(report)
    with pytest.raises(DataValidationError, match="dataset is not empty"):
        raise_if_failed([report])


def test_stale_quarantine_file_is_removed_when_rows_are_clean(tmp_path: Path) -> None:
    _, first = validate_rows([sft_row(0, answer="")], "sft", "sft/train", SETTINGS, tmp_path)
    assert first.quarantine_path is not None and first.quarantine_path.exists()

    _, second = validate_rows([sft_row(0)], "sft", "sft/train", SETTINGS, tmp_path)

    assert second.quarantine_path is None
    assert not first.quarantine_path.exists()


# ---------------------------------------------------------------------------- threshold


def test_one_bad_row_in_a_hundred_passes(tmp_path: Path) -> None:
    rows = [sft_row(i) for i in range(99)] + [sft_row(99, answer="")]

    settings = ValidationSettings(max_failed_fraction=0.05)
    kept, report = validate_rows(rows, "sft", "sft/train", settings, tmp_path)

    assert len(kept) == 99
    assert report.passed and report.n_failed_rows == 1
    assert report.quarantine_path is not None  # set aside even though the run goes on
    raise_if_failed([report])  # does not raise


def test_ten_bad_rows_in_a_hundred_stop_the_run(tmp_path: Path) -> None:
    rows = [sft_row(i) for i in range(90)] + [sft_row(i, answer="") for i in range(90, 100)]
    _, clean = validate_rows([sft_row(0)], "sft", "sft/val", SETTINGS, tmp_path)

    settings = ValidationSettings(max_failed_fraction=0.05)
    kept, report = validate_rows(rows, "sft", "sft/train", settings, tmp_path)

    assert len(kept) == 90
    assert not report.passed and report.n_failed_rows == 10
    (failed,) = report.failed_checks
    assert failed.unexpected_count == 10  # COMPLETE result format names every row, not a sample
    assert sorted(failed.unexpected_row_ids) == sorted(f"sft-{i}" for i in range(90, 100))

    with pytest.raises(DataValidationError) as excinfo:
        raise_if_failed([clean, report])
    message = str(excinfo.value)
    assert "sft/train" in message and "sft/val" not in message
    assert "answer is not empty" in message
    assert "10 rows" in message
    assert str(report.quarantine_path) in message
    assert "validation.max_failed_fraction" in message  # the message says how to fix it
    assert excinfo.value.reports == [report]


def test_summary_lists_at_most_five_row_ids(tmp_path: Path) -> None:
    rows = [sft_row(i, image=None) for i in range(8)]

    _, report = validate_rows(rows, "sft", "sft/train", SETTINGS, tmp_path)
    summary = report.summary()

    assert "image decodes" in summary and "8 rows" in summary
    assert "sft-4" in summary and "sft-5" not in summary and "(+3 more)" in summary
    assert "FAILED" in summary


def test_settings_reject_out_of_range_fraction() -> None:
    with pytest.raises(ValueError, match="max_failed_fraction"):
        ValidationSettings(max_failed_fraction=1.5)


def test_check_that_cannot_run_fails_the_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure GX cannot pin on rows (here: a metadata column is missing) must stop the run."""
    import tasks.validation as validation

    real = validation.build_metadata_frame
    def without_answer_chars(rows: list[dict[str, Any]], kind: str) -> Any:
        return real(rows, kind).drop(columns="answer_chars")

    monkeypatch.setattr(validation, "build_metadata_frame", without_answer_chars)

    kept, report = validate_rows([sft_row(0)], "sft", "sft/train", SETTINGS, tmp_path)

    assert not report.passed and report.n_failed_rows == 0
    failed = {check.name: check for check in report.failed_checks}
    assert "column answer_chars exists" in failed
    assert failed["answer is not empty"].detail.startswith("could not run")
    assert "could not run" in report.summary()
