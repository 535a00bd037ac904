"""Tests for tasks.validation: the GX data-validation stage, its quarantine and its threshold."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image

from tasks.config import ValidationConfig
from tasks.validation import (
    ROW_CHECK_IDS,
    DataValidationError,
    ValidationReport,
    ValidationSettings,
    build_metadata_frame,
    raise_if_failed,
    sample_key,
    validate_rows,
)

SETTINGS = ValidationSettings()


def tiny_image(size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, color=color)


def lazy_png(image: Image.Image) -> Image.Image:
    """``image`` saved as PNG and opened again, lazily (header read, pixels not yet decoded)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    buf.seek(0)
    return Image.open(buf)


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
        "row_id", "row_pos", "text_is_string", "question_chars", "answer_chars",
        "image_inside_dataset", "image_pixels", "image_within_budget", "image_decodes", "image_rgb",
        "image_width", "image_height", "image_mode", "image_error",
        "sample_key", "duplicate_of",
    ]  # fmt: skip
    assert frame["row_pos"].tolist() == [0, 1, 2, 3]
    assert frame["image_decodes"].tolist() == [True, False, False, False]
    assert frame.loc[0, ["image_width", "image_height", "image_mode"]].tolist() == [16, 16, "RGB"]
    # Undecodable images have no size, even when the header (truncated PNG) knows one...
    assert frame["image_width"].isna().tolist() == [False, True, True, True]
    # ...but the header's pixel count is kept (the pixel budget is checked before decoding).
    assert frame["image_pixels"].tolist()[0::2] == [256, 256]
    errors = frame["image_error"].tolist()
    assert pd.isna(errors[0]) and errors[1] == "no image" and errors[3] == "not a PIL image: str"
    assert errors[2].startswith("OSError: image file is truncated")
    assert frame["sample_key"].notna().tolist() == [True, False, False, False]


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
    ("kind", "bad_row", "check", "check_id", "value"),
    [
        ("sft", sft_row(99, answer=""), "answer is not empty", "answer_not_empty", 0),
        ("sft", sft_row(99, answer="   "), "answer is not empty", "answer_not_empty", 0),
        ("sft", sft_row(99, question="q" * 513), "question is at most 512 chars", "question_within_max_chars", 513),
        ("sft", sft_row(99, image=None), "image decodes", "image_decodes", "no image"),
        (
            "sft",
            sft_row(99, image=truncated_png()),
            "image decodes",
            "image_decodes",
            "OSError: image file is truncated",
        ),
        (
            "sft",
            sft_row(99, image=tiny_image((16, 5000))),
            "image height is between 8 and 4096 px",
            "image_height_in_bounds",
            5000,
        ),
        (
            "sft",
            sft_row(99, image=tiny_image((4, 16))),
            "image width is between 8 and 4096 px",
            "image_width_in_bounds",
            4,
        ),
        (
            "preference",
            pref_row(99, chosen="B", rejected="B"),
            "chosen differs from rejected",
            "chosen_differs",
            False,
        ),
        ("preference", pref_row(99, rejected=None), "rejected is not empty", "rejected_not_empty", 0),
        # "La" opens and loads but cannot be converted to RGB (Pillow: "conversion from La to L").
        ("sft", sft_row(99, image=Image.new("La", (16, 16))), "image converts to RGB", "image_rgb", "La"),
        # Loader errors: the path escape counts only under its own check, with the error as value.
        (
            "sft",
            sft_row(99, image=None, image_error="image path escapes the dataset folder: ../x.png"),
            "image path is inside the dataset folder",
            "image_path_inside_dataset",
            "image path escapes the dataset folder: ../x.png",
        ),
        (
            "sft",
            sft_row(99, image=None, image_error="image file not found: img/9.png"),
            "image decodes",
            "image_decodes",
            "image file not found: img/9.png",
        ),
        (  # tasks/data.py's message when PIL's own decompression-bomb guard refuses the file
            "sft",
            sft_row(99, image=None, image_error="image refused before decoding: Image size (200000000 pixels) ..."),
            "image has at most 16777216 pixels",
            "image_within_pixel_budget",
            "image refused before decoding: Image size (200000000 pixels) ...",
        ),
        (
            "preference",
            pref_row(99, image=None, image_error="image path escapes the dataset folder: /etc/x.png"),
            "image path is inside the dataset folder",
            "image_path_inside_dataset",
            "image path escapes the dataset folder: /etc/x.png",
        ),
    ],
)
def test_bad_row_is_quarantined_and_dropped(
    tmp_path: Path, kind: str, bad_row: dict[str, Any], check: str, check_id: str, value: Any
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
    assert failed.check_id == check_id
    assert read_quarantine(report) == [
        {
            "row_id": bad_row["row_id"],
            "dataset": f"{kind}/train",
            "source": "",
            "check": check,
            "check_id": check_id,
            "value": value,
        }
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
    def without_answer_chars(rows: list[dict[str, Any]], kind: str, *args: Any, **kwargs: Any) -> Any:
        return real(rows, kind, *args, **kwargs).drop(columns="answer_chars")

    monkeypatch.setattr(validation, "build_metadata_frame", without_answer_chars)

    kept, report = validate_rows([sft_row(0)], "sft", "sft/train", SETTINGS, tmp_path)

    assert not report.passed and report.n_failed_rows == 0
    failed = {check.name: check for check in report.failed_checks}
    assert "column answer_chars exists" in failed
    assert failed["answer is not empty"].detail.startswith("could not run")
    assert "could not run" in report.summary()


# ---------------------------------------------------------------------------- settings and check ids


def test_settings_accept_every_validation_config_field() -> None:
    """tasks/stages.py builds the settings with ValidationSettings(**recipe.validation.model_dump())."""
    assert ValidationSettings(**ValidationConfig().model_dump()) == ValidationSettings()

    config = ValidationConfig(mostly={"image_decodes": 0.99}, max_image_pixels=100, min_split_rows=2, max_split_rows=9)
    settings = ValidationSettings(**config.model_dump())
    assert (settings.mostly, settings.max_image_pixels, settings.min_split_rows, settings.max_split_rows) == (
        {"image_decodes": 0.99}, 100, 2, 9,
    )  # fmt: skip


@pytest.mark.parametrize("bad_id", ["imge_decodes", "split_size_in_bounds"])
def test_mostly_with_an_unknown_check_id_is_rejected(bad_id: str) -> None:
    with pytest.raises(ValueError, match=bad_id) as excinfo:
        ValidationSettings(mostly={bad_id: 0.9})
    assert "image_decodes" in str(excinfo.value) and "duplicate_in_split" in str(excinfo.value)  # lists valid ids


def test_settings_reject_out_of_range_mostly_and_split_sizes() -> None:
    with pytest.raises(ValueError, match="image_decodes"):
        ValidationSettings(mostly={"image_decodes": 1.5})
    with pytest.raises(ValueError, match="max_split_rows"):
        ValidationSettings(min_split_rows=10, max_split_rows=5)
    with pytest.raises(ValueError, match="max_image_pixels"):
        ValidationSettings(max_image_pixels=0)


def test_every_check_has_a_stable_unique_id(tmp_path: Path) -> None:
    _, report = validate_rows(
        [sft_row(0)], "sft", "sft/train", SETTINGS, tmp_path,
        reference_keys=set(), count_tokens=lambda row: 1, max_tokens=10,
    )  # fmt: skip

    ids = [check.check_id for check in report.checks]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", check_id) for check_id in ids)
    expected = {
        "dataset_not_empty", "split_size_in_bounds", "row_id_present", "row_id_unique",
        "question_not_empty", "question_within_max_chars", "answer_not_empty", "answer_within_max_chars",
        "image_path_inside_dataset", "image_within_pixel_budget", "image_decodes", "image_rgb",
        "image_width_in_bounds", "image_height_in_bounds", "duplicate_in_split", "leaks_into_reference",
        "within_token_budget", "column_answer_chars_exists",
    }  # fmt: skip
    assert expected <= set(ids)
    table_level = {i for i in ids if i.startswith("column_")} | {"dataset_not_empty", "split_size_in_bounds"}
    assert set(ids) - table_level <= set(ROW_CHECK_IDS)


# ---------------------------------------------------------------------------- mostly


def _answers_missing(n_rows: int, n_bad: int) -> list[dict[str, Any]]:
    return [sft_row(i) for i in range(n_rows - n_bad)] + [sft_row(i, answer="") for i in range(n_rows - n_bad, n_rows)]


def test_mostly_tolerates_a_check_but_its_rows_are_still_quarantined(tmp_path: Path) -> None:
    rows = _answers_missing(20, 1)
    settings = ValidationSettings(mostly={"answer_not_empty": 0.9}, max_failed_fraction=0.1)

    kept, report = validate_rows(rows, "sft", "sft/train", settings, tmp_path)

    assert kept == rows[:19]
    assert report.passed and report.n_failed_rows == 1
    assert report.failed_checks == []
    (tolerated,) = report.tolerated_checks
    assert tolerated.check_id == "answer_not_empty" and tolerated.success and tolerated.mostly == 0.9
    assert tolerated.unexpected_row_ids == ["sft-19"]
    assert report.quarantined_row_ids == ["sft-19"]
    assert [line["row_id"] for line in read_quarantine(report)] == ["sft-19"]
    assert "within their mostly" in report.summary() and "mostly 0.9" in report.summary()
    gx = json.loads(report.gx_result_path.read_text())
    (result,) = [r for r in gx["results"] if r["expectation_config"]["meta"]["check_id"] == "answer_not_empty"]
    assert result["expectation_config"]["kwargs"]["mostly"] == 0.9 and result["success"] is True


def test_a_check_listed_in_mostly_that_fails_stops_the_run(tmp_path: Path) -> None:
    settings = ValidationSettings(mostly={"answer_not_empty": 0.99}, max_failed_fraction=0.5)

    _, report = validate_rows(_answers_missing(20, 1), "sft", "sft/train", settings, tmp_path)

    (failed,) = report.failed_checks
    assert failed.check_id == "answer_not_empty" and failed.mostly == 0.99
    assert not report.passed  # 5% failing is under max_failed_fraction, but the listed check failed
    assert "mostly 0.99" in report.summary()


def test_max_failed_fraction_still_applies_to_tolerated_checks(tmp_path: Path) -> None:
    settings = ValidationSettings(mostly={"answer_not_empty": 0.5}, max_failed_fraction=0.05)

    kept, report = validate_rows(_answers_missing(20, 2), "sft", "sft/train", settings, tmp_path)

    assert report.failed_checks == [] and len(kept) == 18
    assert not report.passed  # 10% of the rows set aside > 5%


# ---------------------------------------------------------------------------- quarantine source


def test_quarantine_lines_carry_the_source(tmp_path: Path) -> None:
    rows = [sft_row(0), sft_row(1, answer=""), sft_row(2, answer="", source="hub:HuggingFaceM4/ChartQA")]

    _, report = validate_rows(rows, "sft", "sft/train", SETTINGS, tmp_path, source="data/train.jsonl")

    sources = {line["row_id"]: line["source"] for line in read_quarantine(report)}
    assert sources == {"sft-1": "data/train.jsonl", "sft-2": "hub:HuggingFaceM4/ChartQA"}


# ---------------------------------------------------------------------------- pixel budget


def test_image_over_the_pixel_budget_is_refused_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = lazy_png(Image.new("1", (1100, 1000)))  # a small file, 1.1 M pixels once decoded
    calls: list[str] = []
    real_load, real_convert = bomb.load, bomb.convert
    monkeypatch.setattr(bomb, "load", lambda: calls.append("load") or real_load())
    monkeypatch.setattr(bomb, "convert", lambda *a, **k: calls.append("convert") or real_convert(*a, **k))
    rows = [sft_row(0), sft_row(1, image=bomb), sft_row(2)]

    kept, report = validate_rows(rows, "sft", "sft/train", ValidationSettings(max_image_pixels=1_000_000), tmp_path)

    assert calls == []  # never decoded: only the header was read
    assert getattr(bomb, "_im", None) is None  # Pillow 13: no pixel buffer allocated
    assert kept == [rows[0], rows[2]]
    (failed,) = report.failed_checks  # counted once: not also under decode or size checks
    assert failed.check_id == "image_within_pixel_budget" and failed.unexpected_row_ids == ["sft-1"]
    assert read_quarantine(report)[0]["value"] == 1_100_000

    # The spy works: the same image within budget is decoded.
    _, ok = validate_rows(rows, "sft", "sft/val", ValidationSettings(max_image_pixels=2_000_000), tmp_path)
    assert "load" in calls and ok.failed_checks == []


# ---------------------------------------------------------------------------- duplicates


def test_later_copies_of_a_sample_are_duplicates(tmp_path: Path) -> None:
    rows = [
        sft_row(0),
        sft_row(1),
        # Same pixels (re-encoded as PNG), same question up to case and spacing, same answer.
        sft_row(2, image=lazy_png(tiny_image()), question="  what is BAR 0? ", answer="0"),
        sft_row(3, question="What is bar 0?", answer="7"),  # same prompt, other answer: not a copy
        sft_row(4, image=tiny_image(color=(0, 0, 255)), question="What is bar 0?", answer="0"),  # other image
        sft_row(5, question="What is bar 0?", answer="0"),  # a third copy: also points at the first
    ]

    kept, report = validate_rows(rows, "sft", "sft/train", SETTINGS, tmp_path)

    assert kept == [rows[0], rows[1], rows[3], rows[4]]  # first copy kept
    (failed,) = report.failed_checks
    assert failed.check_id == "duplicate_in_split" and failed.unexpected_row_ids == ["sft-2", "sft-5"]
    assert [line["value"] for line in read_quarantine(report)] == ["sft-0", "sft-0"]  # the first copy


def test_preference_duplicates_need_the_same_pair(tmp_path: Path) -> None:
    rows = [
        pref_row(0),
        pref_row(1, question="What is bar 0?", chosen="0", rejected="1"),  # copy of pref-0
        pref_row(2, question="What is bar 0?", chosen="0", rejected="5"),  # another pair, same prompt
    ]

    kept, report = validate_rows(rows, "preference", "preference/train", SETTINGS, tmp_path)

    assert kept == [rows[0], rows[2]]
    assert failed_check_names(report) == {"sample is not a repeat of an earlier row"}


# ---------------------------------------------------------------------------- leakage


def test_rows_leaking_into_the_reference_split_are_dropped(tmp_path: Path) -> None:
    eval_rows = [sft_row(i, row_id=f"eval-{i}", image=tiny_image(color=(i, 0, 0))) for i in range(3)]
    _, eval_report = validate_rows(eval_rows, "sft", "sft/test", SETTINGS, tmp_path)
    assert eval_report.sample_keys == {sample_key(row) for row in eval_rows}

    train_rows = [sft_row(i, image=tiny_image(color=(i, 50, 0))) for i in range(4)]
    # Same chart and question as eval-1 (re-encoded, other case), other answer: still a leak.
    train_rows.append(sft_row(9, image=lazy_png(tiny_image(color=(1, 0, 0))), question="WHAT is bar 1?", answer="x"))

    kept, report = validate_rows(
        train_rows, "sft", "sft/train", SETTINGS, tmp_path, reference_keys=eval_report.sample_keys
    )

    assert kept == train_rows[:4]
    (failed,) = report.failed_checks
    assert failed.check_id == "leaks_into_reference" and failed.unexpected_row_ids == ["sft-9"]
    assert read_quarantine(report)[0]["value"] == sample_key(eval_rows[1])

    _, unchecked = validate_rows(train_rows, "sft", "sft/train", SETTINGS, tmp_path)
    assert "leaks_into_reference" not in {check.check_id for check in unchecked.checks}


def test_sample_keys_skip_broken_images_and_sample_key_refuses_them(tmp_path: Path) -> None:
    rows = [sft_row(0), sft_row(1, image=None)]

    _, report = validate_rows(rows, "sft", "sft/train", SETTINGS, tmp_path)

    assert report.sample_keys == {sample_key(rows[0])}
    with pytest.raises(ValueError, match="sft-1"):
        sample_key(rows[1])


# ---------------------------------------------------------------------------- token budget


def test_rows_over_the_token_budget_fail(tmp_path: Path) -> None:
    counted: list[str] = []

    def count_tokens(row: dict[str, Any]) -> int:  # a fake: one token per character
        counted.append(row["row_id"])
        return len(row["question"]) + len(row["answer"])

    rows = [sft_row(0), sft_row(1, question="What is the value of the tallest bar?"), sft_row(2, image=None)]

    kept, report = validate_rows(rows, "sft", "sft/train", SETTINGS, tmp_path, count_tokens=count_tokens, max_tokens=20)

    assert kept == [rows[0]]
    assert counted == ["sft-0", "sft-1"]  # rows without a usable image are not counted
    assert failed_check_names(report) == {"sample is at most 20 tokens", "image decodes"}
    lines = {line["check_id"]: line["value"] for line in read_quarantine(report)}
    assert lines["within_token_budget"] == 38


def test_token_budget_needs_a_counter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="count_tokens"):
        validate_rows([sft_row(0)], "sft", "sft/train", SETTINGS, tmp_path, max_tokens=20)


# ---------------------------------------------------------------------------- split size


@pytest.mark.parametrize(
    ("settings", "name"),
    [
        (ValidationSettings(min_split_rows=5), "split has at least 5 rows"),
        (ValidationSettings(max_split_rows=2), "split has between 1 and 2 rows"),
    ],
)
def test_split_size_out_of_bounds_fails_the_split(tmp_path: Path, settings: ValidationSettings, name: str) -> None:
    rows = [sft_row(i) for i in range(3)]

    kept, report = validate_rows(rows, "sft", "sft/train", settings, tmp_path)

    assert kept == rows and report.n_failed_rows == 0  # no row is to blame
    (failed,) = report.failed_checks
    assert (failed.check_id, failed.name, failed.unexpected_row_ids) == ("split_size_in_bounds", name, [])
    assert failed.detail == "observed 3"
    assert not report.passed
    assert report.quarantine_path is None


# ---------------------------------------------------------------------------- label distribution


def test_label_distribution_counts_the_kept_answers(tmp_path: Path) -> None:
    answers = ["Blue"] * 3 + ["2"] * 2 + [str(i) for i in range(10, 22)]
    rows = [sft_row(i, answer=a) for i, a in enumerate(answers)]
    rows.append(sft_row(99, answer="Blue", image=None))  # quarantined: not counted

    _, report = validate_rows(rows, "sft", "sft/train", ValidationSettings(max_failed_fraction=0.1), tmp_path)

    assert len(report.label_distribution) == 10
    assert list(report.label_distribution.items())[:2] == [("Blue", 3), ("2", 2)]
    summary_lines = [line for line in report.summary().splitlines() if "top answers" in line]
    assert len(summary_lines) == 1 and summary_lines[0].strip().startswith('top answers: "Blue" 3, "2" 2, ')


def test_label_distribution_of_preferences_counts_chosen(tmp_path: Path) -> None:
    rows = [pref_row(0, chosen="yes", rejected="no"), pref_row(1, chosen="yes", rejected="maybe"), pref_row(2)]

    _, report = validate_rows(rows, "preference", "preference/train", SETTINGS, tmp_path)

    assert report.label_distribution == {"yes": 2, "2": 1}
    assert 'top chosen: "yes" 2, "2" 1' in report.summary()


def test_text_fields_must_be_strings(tmp_path: Path) -> None:
    rows = [sft_row(i) for i in range(10)] + [sft_row(10, answer=42), sft_row(11, question=["a", "list"])]
    kept, report = validate_rows(rows, "sft", "sft/train", SETTINGS, tmp_path)
    failed = {check.check_id: set(check.unexpected_row_ids) for check in report.failed_checks}
    assert failed["text_fields_are_strings"] == {"sft-10", "sft-11"}
    assert [row["row_id"] for row in kept] == [f"sft-{i}" for i in range(10)]
