"""Tests for tasks.metrics: ChartQA relaxed accuracy and its normalisation."""

from __future__ import annotations

import pytest

from tasks.metrics import normalize_answer, parse_number, relaxed_accuracy, relaxed_match


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        (" Red ", "red"),
        ("dark   blue\tbar", "dark blue bar"),
        ("yes .", "yes"),
        ("3.5", "3.5"),  # only a *trailing* full stop is removed
        ("etc..", "etc."),  # and only one of them
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000", 1000.0),
        ("1,000", 1000.0),
        ("12,345,678.5", 12345678.5),
        ("-3.5", -3.5),
        ("45%", 45.0),
        ("45 %", 45.0),
        ("12.0", 12.0),
        ("12.", 12.0),
        (" 7 ", 7.0),
        (".5", 0.5),
    ],
)
def test_parse_number_accepts_numbers(text: str, expected: float) -> None:
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "text", ["red", "yes", "", "12 apples", "nan", "inf", "1,5", "1,00", "1_000", "%", "-"]
)
def test_parse_number_rejects_non_numbers(text: str) -> None:
    assert parse_number(text) is None


@pytest.mark.parametrize(
    ("prediction", "label"),
    [
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("45%", "45"),
        ("-3.5", "-3.5"),
        ("-3.6", "-3.5"),  # 2.9% off a negative label
        ("104", "100"),
        ("96", "100"),
        ("105", "100"),  # the 5% bound is inclusive
        ("12.0", "12"),
        ("Yes.", "yes"),
        (" Red ", "red"),
        ("0", "0"),
        ("0.0", "0"),
    ],
)
def test_relaxed_match_accepts(prediction: str, label: str) -> None:
    assert relaxed_match(prediction, label)


@pytest.mark.parametrize(
    ("prediction", "label"),
    [
        ("106", "100"),
        ("94", "100"),
        ("3.5", "-3.5"),  # sign matters: tolerance is relative to |label|
        ("-3.8", "-3.5"),
        ("0.01", "0"),  # no relative slack around a zero label
        ("red", "blue"),
        ("yes", "no"),
        ("7", "seven"),  # a number never string-matches a word
        ("1,5", "15"),  # decimal comma is not read as a thousands separator
    ],
)
def test_relaxed_match_rejects(prediction: str, label: str) -> None:
    assert not relaxed_match(prediction, label)


def test_years_are_compared_numerically_like_official_chartqa() -> None:
    # Pinned on purpose: the official metric treats years as numbers, so an
    # off-by-one year is "correct" at 5% tolerance. Change only together with
    # the module docstring.
    assert relaxed_match("2019", "2020")
    assert relaxed_match("1950", "2020")  # 3.5% off
    assert not relaxed_match("1900", "2020")  # 5.9% off


def test_relaxed_match_tolerance_parameter() -> None:
    assert not relaxed_match("101", "100", tolerance=0.0)
    assert relaxed_match("100", "100", tolerance=0.0)
    assert relaxed_match("110", "100", tolerance=0.1)
    with pytest.raises(ValueError, match="tolerance"):
        relaxed_match("1", "1", tolerance=-0.1)


def test_relaxed_accuracy_is_mean_of_matches() -> None:
    predictions = ["1,000", "Red.", "blue", "2019"]
    labels = ["1000", "red", "green", "2020"]
    assert relaxed_accuracy(predictions, labels) == pytest.approx(0.75)
    assert relaxed_accuracy(["5"], ["5"]) == 1.0
    assert relaxed_accuracy(["a", "b"], ["c", "d"]) == 0.0


def test_relaxed_accuracy_passes_tolerance_through() -> None:
    assert relaxed_accuracy(["108"], ["100"]) == 0.0
    assert relaxed_accuracy(["108"], ["100"], tolerance=0.1) == 1.0


def test_relaxed_accuracy_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        relaxed_accuracy(["a", "b"], ["a"])


def test_relaxed_accuracy_rejects_empty_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        relaxed_accuracy([], [])
