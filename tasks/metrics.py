"""ChartQA "relaxed accuracy".

ChartQA (Masry et al., 2022) scores an answer as correct when it matches the
label exactly or, for numeric answers, lies within 5% of the label. This
module implements that metric with a light normalisation step so that
surface differences a human grader would ignore ("Yes." vs "yes", "1,000" vs
"1000", "45%" vs "45") do not count as errors.

Differences from the reference implementation (pix2struct's
``relaxed_correctness``), all deliberate:

* a trailing ``%`` is dropped rather than dividing by 100, because ChartQA
  labels are written without the sign ("45") while models often add it;
* thousands separators are accepted ("1,000");
* a label of 0 is compared numerically with exact equality ("0.0" matches
  "0") instead of falling back to string comparison.

Like the reference metric, any two numbers are compared with the relative
tolerance, *including years*: "2019" vs "2020" differ by 0.05% and therefore
match. That is lenient for year questions, but it is what published ChartQA
numbers use, so it is kept for comparability.
"""

from __future__ import annotations

import re

__all__ = ["normalize_answer", "parse_number", "relaxed_match", "relaxed_accuracy"]

DEFAULT_TOLERANCE = 0.05

# A plain decimal: optional sign, digits with optional fraction, or ".5".
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# Comma-grouped thousands ("1,000", "-12,345.6"). Commas anywhere else (e.g.
# the decimal comma of "1,5") are rejected rather than silently dropped, which
# would turn 1.5 into 15.
_GROUPED_NUMBER = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def normalize_answer(text: str) -> str:
    """Canonical form of an answer for comparison.

    Lowercases, collapses runs of whitespace to one space, strips surrounding
    whitespace and removes one trailing full stop ("Yes." -> "yes").
    """
    normalized = " ".join(text.lower().split())
    if normalized.endswith("."):
        # rstrip again so "yes ." also becomes "yes".
        normalized = normalized[:-1].rstrip()
    return normalized


def parse_number(text: str) -> float | None:
    """Read ``text`` as a number, or return None when it is not one.

    Accepts plain decimals ("1000", "-3.5", "12.0"), comma-grouped thousands
    ("1,000") and a trailing percent sign ("45%" -> 45.0; the value is not
    divided by 100). Words, "nan"/"inf" and anything with extra text
    ("12 apples") are not numbers.
    """
    normalized = normalize_answer(text)
    if normalized.endswith("%"):
        normalized = normalized[:-1].rstrip()
    if _GROUPED_NUMBER.fullmatch(normalized):
        normalized = normalized.replace(",", "")
    elif not _PLAIN_NUMBER.fullmatch(normalized):
        # float() alone would also accept "nan", "inf" and "1_000".
        return None
    return float(normalized)


def relaxed_match(prediction: str, label: str, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """Whether ``prediction`` counts as correct for ``label`` under ChartQA's rule.

    When both parse as numbers, the prediction must be within ``tolerance``
    relative to the label (``|pred - label| <= tolerance * |label|``); a label
    of 0 requires exact numeric equality. Otherwise the normalised strings
    must be identical. Note that years are compared numerically too, so
    "2019" matches "2020" at the default 5% tolerance.

    Raises:
        ValueError: if ``tolerance`` is negative.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance}")
    pred_number = parse_number(prediction)
    label_number = parse_number(label)
    if pred_number is not None and label_number is not None:
        if label_number == 0:
            return pred_number == 0
        return abs(pred_number - label_number) <= tolerance * abs(label_number)
    return normalize_answer(prediction) == normalize_answer(label)


def relaxed_accuracy(
    predictions: list[str], labels: list[str], tolerance: float = DEFAULT_TOLERANCE
) -> float:
    """Fraction of predictions that :func:`relaxed_match` their labels.

    Raises:
        ValueError: if the lists differ in length, are empty (an accuracy
            over nothing would silently read as 0.0), or ``tolerance`` is
            negative.
    """
    if len(predictions) != len(labels):
        raise ValueError(
            f"predictions and labels differ in length: {len(predictions)} != {len(labels)}"
        )
    if not predictions:
        raise ValueError("relaxed_accuracy needs at least one prediction; got empty lists")
    matches = sum(relaxed_match(p, l, tolerance) for p, l in zip(predictions, labels))
    return matches / len(predictions)
