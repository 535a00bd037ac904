"""Data-validation stage: check mapped rows with Great Expectations before training.

Rows arrive in the internal schema (one list of dicts per split). Images and free text are not
something GX can inspect directly, so each split is first reduced to a *metadata frame*: one
pandas row per sample holding the measurable facts (text lengths, whether the image decodes, its
size, whether it repeats another sample). The GX suite runs on that frame; every failing row is
named by its ``row_id`` and set aside in a quarantine JSONL file, and the rows that pass every
check go on to training. When the share of failing rows exceeds
``ValidationSettings.max_failed_fraction`` the report says ``passed=False`` and
:func:`raise_if_failed` stops the run.

Every check has a stable snake_case id (``CheckResult.check_id``, the quarantine's ``check_id``,
the keys of ``ValidationSettings.mostly``) next to its human name, which may carry the limit
and so change with the settings. :data:`ROW_CHECK_IDS` lists the ids ``mostly`` accepts.

``mostly`` (GX's per-expectation tolerance) and quarantine: a row that fails a row-level check is
*always* quarantined and dropped, whatever ``mostly`` says. ``mostly`` only decides whether the
check itself counts as failed; a check listed in ``mostly`` that fails stops the run on its own
(so ``mostly={"image_decodes": 1.0}`` makes one broken image fatal), and
``max_failed_fraction`` still applies to the rows failing any check. GX computes the share over
the rows a check applies to: nulls are skipped (``image_rgb`` counts only images that decoded).

What is hand-written here and why (everything else is GX):

* building the metadata frame: GX checks columns, it cannot open a PIL image, hash pixels or
  find a repeated sample; so decoding, hashing and duplicate / leak detection happen in the
  single pass that builds the frame, and GX checks the resulting columns;
* dropping failing rows and writing the quarantine file: GX reports failures, it does not
  filter data;
* the pass/fail threshold over *rows*: GX's ``mostly`` is per expectation, while a run must stop
  on the share of rows that fail *any* check;
* the readable summary and the exception that carries it.

Plain functions, no Prefect imports, so the stage is testable without an orchestrator.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from PIL import Image

if TYPE_CHECKING:
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResult,
        ExpectationValidationResult,
    )
    from great_expectations.expectations.expectation import Expectation

logger = logging.getLogger(__name__)

Kind = Literal["sft", "preference"]
KINDS: tuple[Kind, ...] = ("sft", "preference")

# Metadata columns, in frame order. Image columns are shared by both kinds.
_TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("text_is_string", "question_chars", "answer_chars"),
    "preference": ("text_is_string", "question_chars", "chosen_chars", "rejected_chars", "chosen_differs"),
}
# The text fields each kind must carry as strings (a number, list or null is refused, not guessed at).
_TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("question", "answer"),
    "preference": ("question", "chosen", "rejected"),
}
_IMAGE_COLUMNS: tuple[str, ...] = (
    "image_inside_dataset",  # False only for a loader error "image path escapes ..."
    "image_pixels",  # width * height from the header; null when there is no image
    "image_within_budget",  # image_pixels <= max_image_pixels; False too when the loader refused a bomb
    "image_decodes",  # pixels load; null when not attempted (path escapes, over the pixel budget)
    "image_rgb",  # converts to RGB; null when the pixels did not load
    "image_width",  # width and height: only for images whose pixels loaded
    "image_height",
    "image_mode",  # from the header
    "image_error",  # why there is no usable image: the loader's image_error or the decoder's error
)
_SAMPLE_COLUMNS: tuple[str, ...] = (
    "sample_key",  # see sample_key(); null when the image did not decode to RGB
    "duplicate_of",  # row_id of the first copy of this sample in the split; null for first copies
)
_REFERENCE_COLUMN = "in_reference"  # only with reference_keys
_TOKENS_COLUMN = "total_tokens"  # only with count_tokens

# Nullable dtypes: an empty split or a split of only broken images still has the types the
# suite expects, and sizes stay ints with <NA> (a plain int column turns into float at the first
# missing value). GX column-map expectations skip nulls.
_DTYPES: dict[str, str] = {
    "row_pos": "int64",
    "chosen_differs": "bool",
    "image_inside_dataset": "bool",
    "image_pixels": "Int64",
    "image_within_budget": "boolean",
    "image_decodes": "boolean",
    "image_rgb": "boolean",
    "image_width": "Int64",
    "image_height": "Int64",
    "duplicate_of": "object",  # row ids as they are; all-null would otherwise become float
    _REFERENCE_COLUMN: "boolean",
    _TOKENS_COLUMN: "Int64",
}

# A loader's image_error starting with this fails image_path_inside_dataset (and only that)...
PATH_ESCAPE_PREFIX = "image path escapes"
# ...and one starting with this (tasks/data.py: PIL's DecompressionBombError at open) fails
# image_within_pixel_budget (and only that). Any other image_error fails image_decodes.
BOMB_PREFIX = "image refused before decoding"

# Ask GX for every failing row, named by row_id and located by row_pos (row ids may repeat or
# be missing; the position is what the quarantine and the drop use).
_RESULT_FORMAT: dict[str, Any] = {
    "result_format": "COMPLETE",
    "unexpected_index_column_names": ["row_id", "row_pos"],
}

# How many failing row ids a summary lists per check, and how many labels the report keeps.
_SUMMARY_IDS = 5
_TOP_LABELS = 10

# Row-level checks: the ids ``ValidationSettings.mostly`` accepts. Kind-specific and optional
# ones (answer_* for SFT, chosen_*/rejected_* for preference, leaks_into_reference with
# reference_keys, within_token_budget with a token counter) are included.
ROW_CHECK_IDS: tuple[str, ...] = (
    "row_id_present",
    "row_id_unique",
    "text_fields_are_strings",
    "question_not_empty",
    "question_within_max_chars",
    "answer_not_empty",
    "answer_within_max_chars",
    "chosen_not_empty",
    "rejected_not_empty",
    "chosen_differs",
    "image_path_inside_dataset",
    "image_within_pixel_budget",
    "image_decodes",
    "image_rgb",
    "image_width_in_bounds",
    "image_height_in_bounds",
    "duplicate_in_split",
    "leaks_into_reference",
    "within_token_budget",
)
# Split-level checks (no rows named; a failure fails the split). Plus one
# ``column_<name>_exists`` per metadata column.
TABLE_CHECK_IDS: tuple[str, ...] = ("dataset_not_empty", "split_size_in_bounds")


@dataclass(frozen=True)
class ValidationSettings:
    """Limits the GX suite checks against, and the share of failing rows a run tolerates.

    Accepts every field of ``tasks.config.ValidationConfig`` with the same defaults.
    """

    max_question_chars: int = 512
    max_answer_chars: int = 256
    min_image_side: int = 8
    max_image_side: int = 4096
    max_failed_fraction: float = 0.05  # more failing rows than this -> the run stops
    # check id (ROW_CHECK_IDS) -> GX mostly; a listed check that fails stops the run by itself
    mostly: dict[str, float] = field(default_factory=dict)
    max_image_pixels: int = 16_777_216  # width * height from the header; larger is not decoded
    min_split_rows: int = 1
    max_split_rows: int | None = None  # None: no upper limit

    def __post_init__(self) -> None:
        """Reject settings that would make every check pass or fail by construction.

        Raises:
            ValueError: when a limit is out of range, or ``mostly`` names an id that is not a
                row-level check (the message lists the valid ids) or a share outside [0, 1].
        """
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ValueError(f"max_failed_fraction must be in [0, 1], got {self.max_failed_fraction}")
        if self.max_question_chars < 1 or self.max_answer_chars < 1:
            raise ValueError("max_question_chars and max_answer_chars must be at least 1")
        if not 1 <= self.min_image_side <= self.max_image_side:
            raise ValueError(
                "need 1 <= min_image_side <= max_image_side, got "
                f"{self.min_image_side} and {self.max_image_side}"
            )
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be at least 1, got {self.max_image_pixels}")
        if self.min_split_rows < 0:
            raise ValueError(f"min_split_rows must be at least 0, got {self.min_split_rows}")
        if self.max_split_rows is not None and self.max_split_rows < max(1, self.min_split_rows):
            raise ValueError(
                f"max_split_rows must be at least max(1, min_split_rows={self.min_split_rows}), "
                f"got {self.max_split_rows}"
            )
        unknown = sorted(set(self.mostly) - set(ROW_CHECK_IDS))
        if unknown:
            raise ValueError(
                f"unknown check id(s) in mostly: {', '.join(unknown)}; "
                f"valid ids: {', '.join(ROW_CHECK_IDS)}"
            )
        for check_id, share in self.mostly.items():
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"mostly[{check_id!r}] must be in [0, 1], got {share}")
        object.__setattr__(self, "mostly", dict(self.mostly))  # a copy the caller cannot mutate


@dataclass
class CheckResult:
    """The outcome of one GX expectation."""

    name: str  # human name, e.g. "question is not empty"
    expectation: str  # GX expectation type, e.g. "expect_column_values_to_be_between"
    success: bool
    unexpected_count: int
    # One entry per failing row (a duplicated row_id appears once per copy); None only for rows
    # that have no row_id at all, which the "row_id is present" check reports. Rows are listed
    # (and quarantined) even when the check succeeds under a ``mostly`` below 1.
    unexpected_row_ids: list[str | None]
    # For a failure GX could not pin on rows: the observed value (table checks) or the error
    # GX raised while computing the check. Empty otherwise.
    detail: str = ""
    check_id: str = ""  # stable snake_case id, e.g. "question_not_empty"
    mostly: float | None = None  # the GX mostly the check ran with, when settings.mostly set one


@dataclass
class ValidationReport:
    """Everything one split's validation found, and where its artefacts were written."""

    dataset: str  # e.g. "sft/train"
    kind: str  # "sft" | "preference"
    n_rows: int
    n_failed_rows: int
    checks: list[CheckResult]
    quarantine_path: Path | None  # JSONL of the rows set aside (None when none)
    gx_result_path: Path  # the GX validation result, JSON
    passed: bool  # see validate_rows
    max_failed_fraction: float = 0.05
    data_docs_path: Path | None = None  # GX Data Docs HTML page, when it could be rendered
    # sample_key() of every row whose image decoded, kept or quarantined: pass the held-out
    # split's keys as reference_keys when validating the training split.
    sample_keys: set[str] = field(default_factory=set)
    # The most common answers (SFT) or chosen answers (preference) among the kept rows, stripped,
    # most common first, at most 10.
    label_distribution: dict[str, int] = field(default_factory=dict)

    @property
    def failed_checks(self) -> list[CheckResult]:
        """The checks that did not succeed, in suite order."""
        return [check for check in self.checks if not check.success]

    @property
    def tolerated_checks(self) -> list[CheckResult]:
        """Checks that succeeded under a ``mostly`` below 1 although some rows failed them."""
        return [check for check in self.checks if check.success and check.unexpected_row_ids]

    @property
    def quarantined_row_ids(self) -> list[str]:
        """Sorted ids of every quarantined row, including rows of checks tolerated by ``mostly``."""
        return sorted({str(rid) for check in self.checks for rid in check.unexpected_row_ids if rid is not None})

    def summary(self) -> str:
        """Return a readable multi-line report: rows, failing checks, quarantine, labels, verdict."""
        share = self.n_failed_rows / self.n_rows if self.n_rows else 0.0
        verdict = "PASSED" if self.passed else "FAILED"
        if self.passed and self.n_failed_rows:
            verdict += f" ({self.n_failed_rows} rows set aside)"
        lines = [
            f"Data validation of {self.dataset} ({self.kind}): {verdict}",
            f"  rows: {self.n_rows}, failing: {self.n_failed_rows} "
            f"({share:.1%}, limit {self.max_failed_fraction:.1%})",
        ]
        failed = self.failed_checks
        if failed:
            lines.append("  failing checks:")
            for check in failed:
                lines.append(f"    - {_describe_failure(check)}")
        else:
            lines.append(f"  all {len(self.checks)} checks passed")
        tolerated = self.tolerated_checks
        if tolerated:
            lines.append("  within their mostly (rows still set aside):")
            for check in tolerated:
                lines.append(f"    - {_describe_failure(check)}")
        if self.label_distribution:
            shown = ", ".join(f"{_short(label)} {n}" for label, n in self.label_distribution.items())
            what = "answers" if self.kind == "sft" else "chosen"
            lines.append(f"  top {what}: {shown}")
        if self.quarantine_path is not None:
            lines.append(f"  quarantine: {self.quarantine_path}")
        lines.append(f"  GX result: {self.gx_result_path}")
        if self.data_docs_path is not None:
            lines.append(f"  Data Docs: {self.data_docs_path}")
        return "\n".join(lines)


def _short(label: str, limit: int = 24) -> str:
    text = label if len(label) <= limit else label[: limit - 1] + "…"
    return json.dumps(text, ensure_ascii=False)


def _describe_failure(check: CheckResult) -> str:
    """One summary line for a failing check: name, GX type, count and a few row ids."""
    head = f"{check.name} [{check.expectation}]"
    if check.mostly is not None:
        head += f" (mostly {check.mostly:g})"
    if not check.unexpected_row_ids:
        return f"{head}: {check.detail or 'failed'}"
    shown = ", ".join(str(row_id) for row_id in check.unexpected_row_ids[:_SUMMARY_IDS])
    more = len(check.unexpected_row_ids) - _SUMMARY_IDS
    suffix = f" (+{more} more)" if more > 0 else ""
    return f"{head}: {check.unexpected_count} rows, e.g. {shown}{suffix}"


class DataValidationError(Exception):
    """Raised by :func:`raise_if_failed` when a split has too many failing rows.

    ``reports`` holds the failing reports; ``str()`` is their readable summaries, naming each
    failing check, its count and the quarantine file.
    """

    def __init__(self, reports: Sequence[ValidationReport]) -> None:
        self.reports = list(reports)
        names = ", ".join(report.dataset for report in self.reports)
        body = "\n\n".join(report.summary() for report in self.reports)
        fix = (
            "Fix: correct or remove the listed rows at the source (the quarantine files name each row "
            "and the value that failed), or, if the share is acceptable, raise validation.max_failed_fraction "
            "(or the check's validation.mostly; split sizes: validation.min_split_rows / max_split_rows)."
        )
        super().__init__(f"Data validation failed for {names}:\n\n{body}\n\n{fix}")


# --------------------------------------------------------------------------------------------
# Metadata frame (hand-written: GX cannot look inside images or Python objects)
# --------------------------------------------------------------------------------------------


def normalize_text(value: Any) -> str:
    """Text as the duplicate and leak checks compare it: stripped, whitespace runs collapsed,
    case-folded; None reads as ""."""
    return "" if value is None else " ".join(str(value).split()).casefold()


def sample_key(row: dict[str, Any]) -> str:
    """Identify a sample by what the model sees: its image's pixels and its question.

    A hex digest of the image's RGB pixels (and size) and the normalised question
    (:func:`normalize_text`); the answer is not part of it. The same chart and question stored in
    two files, or encoded differently, get the same key. This is the key of
    ``ValidationReport.sample_keys`` and of ``validate_rows(reference_keys=...)``.

    Raises:
        ValueError: when the row has no image that decodes to RGB.
    """
    image = row.get("image")
    if not isinstance(image, Image.Image):
        raise ValueError(f"row {row.get('row_id')!r} has no PIL image")
    try:
        image.load()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError...
        raise ValueError(f"row {row.get('row_id')!r}: image does not decode to RGB: {exc}") from exc
    return _sample_key(_pixel_digest(rgb), normalize_text(row.get("question")))


def _pixel_digest(rgb: Image.Image) -> bytes:
    """Hash of an RGB image's size and raw pixel bytes (no re-encoding).

    SHA-256: with the SHA CPU extensions (x86 since ~2017-2019, ARMv8) it is the fastest hashlib
    digest, about 2x blake2b on small images.
    """
    digest = hashlib.sha256(b"%dx%d:" % rgb.size)
    digest.update(rgb.tobytes())
    return digest.digest()


def _sample_key(pixel_digest: bytes, question: str) -> str:
    return hashlib.sha256(pixel_digest + b"\x1f" + question.encode("utf-8")).hexdigest()[:32]


def _target_text(row: dict[str, Any], kind: str) -> str:
    """What makes two copies of a prompt the *same* sample: the answer, or chosen + rejected."""
    if kind == "sft":
        return normalize_text(row.get("answer"))
    return normalize_text(row.get("chosen")) + "\x1f" + normalize_text(row.get("rejected"))


def build_metadata_frame(
    rows: Sequence[dict[str, Any]],
    kind: str,
    settings: ValidationSettings | None = None,
    *,
    reference_keys: set[str] | frozenset[str] | None = None,
    count_tokens: Callable[[dict[str, Any]], int] | None = None,
) -> pd.DataFrame:
    """Reduce rows to one metadata record per sample, the frame the GX suite runs on.

    One pass over the rows; each image is decoded at most once (its header is read first: an
    image over ``settings.max_image_pixels`` is never decoded) and hashed from its raw RGB bytes.

    Columns: ``row_id``, ``row_pos`` (position in ``rows``), ``question_chars``, then
    ``answer_chars`` (SFT) or ``chosen_chars``, ``rejected_chars``, ``chosen_differs``
    (preference), then the image columns ``image_inside_dataset``, ``image_pixels``,
    ``image_within_budget``, ``image_decodes``, ``image_rgb``, ``image_width``, ``image_height``,
    ``image_mode``, ``image_error``, then ``sample_key`` and ``duplicate_of``; ``in_reference`` when
    ``reference_keys`` is given and ``total_tokens`` when ``count_tokens`` is.

    Text lengths count characters after stripping surrounding whitespace, so a whitespace-only
    answer counts as empty; a missing or None field counts as empty too. A row may carry
    ``image=None`` and ``image_error`` (the loader's reason); an ``image_error`` starting with
    "image path escapes" marks ``image_inside_dataset`` False and leaves ``image_decodes`` null,
    one starting with "image refused before decoding" (PIL's bomb guard in the loader) marks
    ``image_within_budget`` False, any other marks ``image_decodes`` False. Width and height are
    null unless the pixels load.

    A row is a duplicate (``duplicate_of`` = the first copy's row_id) when an earlier row has the
    same sample key and the same normalised answer (SFT) or chosen and rejected (preference).
    ``count_tokens(row)`` is called only for rows whose image decodes to RGB; its errors propagate.

    Raises:
        ValueError: when ``kind`` is not "sft" or "preference".
    """
    _check_kind(kind)
    settings = settings or ValidationSettings()
    columns = _frame_columns(kind, with_reference=reference_keys is not None, with_tokens=count_tokens is not None)

    first_copy: dict[tuple[str, str], Any] = {}
    records = []
    for pos, row in enumerate(rows):
        record = _metadata_record(row, kind)
        record["row_pos"] = pos
        rgb = _image_facts(record, row.get("image"), row.get("image_error"), settings.max_image_pixels)
        if rgb is not None:
            key = _sample_key(_pixel_digest(rgb), normalize_text(row.get("question")))
            record["sample_key"] = key
            dup_key = (key, _target_text(row, kind))
            if dup_key in first_copy:
                record["duplicate_of"] = first_copy[dup_key]
            else:
                row_id = _json_safe(row.get("row_id"))
                first_copy[dup_key] = f"<row {pos}>" if row_id is None else row_id
            if reference_keys is not None:
                record[_REFERENCE_COLUMN] = key in reference_keys
            if count_tokens is not None:
                record[_TOKENS_COLUMN] = int(count_tokens(row))
        records.append(record)

    frame = pd.DataFrame.from_records(records, columns=columns)
    dtypes = {column: "int64" for column in columns if column.endswith("_chars")}
    dtypes |= {column: dtype for column, dtype in _DTYPES.items() if column in frame.columns}
    return frame.astype(dtypes)


def _frame_columns(kind: str, *, with_reference: bool, with_tokens: bool) -> list[str]:
    """The metadata frame's columns, in order (the suite checks that each exists)."""
    columns = ["row_id", "row_pos", *_TEXT_COLUMNS[kind], *_IMAGE_COLUMNS, *_SAMPLE_COLUMNS]
    if with_reference:
        columns.append(_REFERENCE_COLUMN)
    if with_tokens:
        columns.append(_TOKENS_COLUMN)
    return columns


def _metadata_record(row: dict[str, Any], kind: str) -> dict[str, Any]:
    """Measure one row's text: lengths, and whether chosen differs from rejected."""
    record: dict[str, Any] = {
        "row_id": row.get("row_id"),
        # A missing (None) field fails only its "not empty" check; a number or list fails here.
        "text_is_string": all(row.get(field) is None or isinstance(row.get(field), str) for field in _TEXT_FIELDS[kind]),
        "question_chars": _text_chars(row.get("question")),
    }
    if kind == "sft":
        record["answer_chars"] = _text_chars(row.get("answer"))
    else:
        chosen, rejected = _clean_text(row.get("chosen")), _clean_text(row.get("rejected"))
        record["chosen_chars"] = len(chosen)
        record["rejected_chars"] = len(rejected)
        record["chosen_differs"] = chosen != rejected
    return record


def _clean_text(value: Any) -> str:
    """The text as training will see it, minus surrounding whitespace; None reads as ""."""
    return "" if value is None else str(value).strip()


def _text_chars(value: Any) -> int:
    return len(_clean_text(value))


def _image_facts(record: dict[str, Any], image: Any, image_error: Any, max_pixels: int) -> Image.Image | None:
    """Fill ``record``'s image columns; return the image as RGB when it decodes, else None.

    Order: the loader's ``image_error`` wins; then the header (mode, size, pixel budget: an image
    over the budget is neither loaded nor converted); then ``load()`` (a truncated file opens
    lazily and only fails here); then ``convert("RGB")``, as training does, skipped for RGB images.
    """
    record["image_inside_dataset"] = True
    if image_error:
        error = str(image_error)
        record["image_error"] = error
        if error.startswith(PATH_ESCAPE_PREFIX):
            record["image_inside_dataset"] = False  # image_decodes stays null: counted once
        elif error.startswith(BOMB_PREFIX):
            record["image_within_budget"] = False
        else:
            record["image_decodes"] = False
        return None
    if image is None:
        record.update(image_decodes=False, image_error="no image")
        return None
    if not isinstance(image, Image.Image):
        record.update(image_decodes=False, image_error=f"not a PIL image: {type(image).__name__}")
        return None
    width, height = image.size  # header only: PIL opens lazily
    record["image_mode"] = image.mode
    record["image_pixels"] = width * height
    record["image_within_budget"] = width * height <= max_pixels
    if width * height > max_pixels:
        return None  # not decoded: image_decodes and image_rgb stay null
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError...; all mean "broken"
        record.update(image_decodes=False, image_error=f"{type(exc).__name__}: {exc}")
        return None
    record.update(image_decodes=True, image_width=width, image_height=height)
    try:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - e.g. ValueError "conversion from La to L not supported"
        record.update(image_rgb=False, image_error=f"{type(exc).__name__}: {exc}")
        return None
    record["image_rgb"] = True
    return rgb


# --------------------------------------------------------------------------------------------
# The GX suite
# --------------------------------------------------------------------------------------------


def _build_expectations(
    kind: str,
    settings: ValidationSettings,
    *,
    with_reference: bool = False,
    max_tokens: int | None = None,
) -> list[Expectation]:
    """The suite for one kind; ``leaks_into_reference`` and ``within_token_budget`` when asked.

    Each expectation carries its human name in ``meta["check"]``, its id in ``meta["check_id"]``
    and, for row-level checks, the metadata column whose value the quarantine records in
    ``meta["value_columns"]`` (the first non-null one). ``mostly`` from the settings goes on the
    row-level checks.

    Rows whose image does not decode have null width/height; GX column-map expectations skip
    nulls, so such rows fail only "image decodes", not the size checks as well.
    """
    import great_expectations.expectations as gxe

    def named(check_id: str, name: str, expectation: Expectation, value_columns: Sequence[str] = ()) -> Expectation:
        expectation.meta = {"check": name, "check_id": check_id}
        if value_columns:
            expectation.meta["value_columns"] = list(value_columns)
        return expectation

    def row_level(check_id: str, name: str, cls: Any, column: str, value_columns: Sequence[str] = (), **kw: Any):
        if check_id in settings.mostly:
            kw["mostly"] = settings.mostly[check_id]
        return named(check_id, name, cls(column=column, **kw), value_columns or [column])

    def between(check_id: str, name: str, column: str, low: int | None, high: int | None, **kw: Any):
        return row_level(check_id, name, gxe.ExpectColumnValuesToBeBetween, column, min_value=low, max_value=high, **kw)

    def is_value(check_id: str, name: str, column: str, value: bool, value_columns: Sequence[str] = ()):
        return row_level(check_id, name, gxe.ExpectColumnValuesToBeInSet, column, value_columns, value_set=[value])

    columns = _frame_columns(kind, with_reference=with_reference, with_tokens=max_tokens is not None)
    suite = [named(f"column_{c}_exists", f"column {c} exists", gxe.ExpectColumnToExist(column=c)) for c in columns]
    size_name = f"split has at least {settings.min_split_rows} rows"
    if settings.max_split_rows is not None:
        size_name = f"split has between {settings.min_split_rows} and {settings.max_split_rows} rows"
    suite += [
        named("dataset_not_empty", "dataset is not empty", gxe.ExpectTableRowCountToBeBetween(min_value=1)),
        named(
            "split_size_in_bounds",
            size_name,
            gxe.ExpectTableRowCountToBeBetween(min_value=settings.min_split_rows, max_value=settings.max_split_rows),
        ),
        row_level("row_id_present", "row_id is present", gxe.ExpectColumnValuesToNotBeNull, "row_id"),
        row_level("row_id_unique", "row_id is unique", gxe.ExpectColumnValuesToBeUnique, "row_id"),
        is_value("text_fields_are_strings", "text fields are strings", "text_is_string", True),
        between("question_not_empty", "question is not empty", "question_chars", 1, None),
        between(
            "question_within_max_chars",
            f"question is at most {settings.max_question_chars} chars",
            "question_chars",
            None,
            settings.max_question_chars,
        ),
    ]
    if kind == "sft":
        suite += [
            between("answer_not_empty", "answer is not empty", "answer_chars", 1, None),
            between(
                "answer_within_max_chars",
                f"answer is at most {settings.max_answer_chars} chars",
                "answer_chars",
                None,
                settings.max_answer_chars,
            ),
        ]
    else:
        suite += [
            between("chosen_not_empty", "chosen is not empty", "chosen_chars", 1, None),
            between("rejected_not_empty", "rejected is not empty", "rejected_chars", 1, None),
            is_value("chosen_differs", "chosen differs from rejected", "chosen_differs", True),
        ]
    low, high = settings.min_image_side, settings.max_image_side
    suite += [
        is_value(
            "image_path_inside_dataset",
            "image path is inside the dataset folder",
            "image_inside_dataset",
            True,
            ["image_error"],
        ),
        is_value(
            "image_within_pixel_budget",
            f"image has at most {settings.max_image_pixels} pixels",
            "image_within_budget",
            True,
            ["image_pixels", "image_error"],
        ),
        is_value("image_decodes", "image decodes", "image_decodes", True, ["image_error"]),
        is_value("image_rgb", "image converts to RGB", "image_rgb", True, ["image_mode"]),
        between("image_width_in_bounds", f"image width is between {low} and {high} px", "image_width", low, high),
        between("image_height_in_bounds", f"image height is between {low} and {high} px", "image_height", low, high),
        row_level(
            "duplicate_in_split",
            "sample is not a repeat of an earlier row",
            gxe.ExpectColumnValuesToBeNull,
            "duplicate_of",
        ),
    ]
    if with_reference:
        suite.append(
            is_value(
                "leaks_into_reference",
                "sample is not in the reference split",
                _REFERENCE_COLUMN,
                False,
                ["sample_key"],
            )
        )
    if max_tokens is not None:
        suite.append(
            between("within_token_budget", f"sample is at most {max_tokens} tokens", _TOKENS_COLUMN, None, max_tokens)
        )
    return suite


def _import_gx() -> Any:
    """Import GX on first use, quietly.

    Imported here rather than at module top because it takes ~3 s, and the CLI imports this
    module for commands that never validate.
    """
    # No-op in 1.24.1 (this build ships no analytics client); keeps an upgrade from phoning home.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        # GX logs chatty INFO lines per context ("Created temporary directory ... docs site").
        gx_logger.setLevel(logging.WARNING)
    import great_expectations as gx

    return gx


def _run_suite(
    frame: pd.DataFrame, expectations: list[Expectation], label: str
) -> ExpectationSuiteValidationResult:
    """Validate ``frame`` against ``expectations`` in a fresh ephemeral GX context.

    A context per call keeps calls independent (e.g. Prefect tasks on threads); the uuid suffix
    keeps names unique anyway, as GX stores are keyed by name.
    """
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # GX shows tqdm "Calculating Metrics" bars unless the context says otherwise.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)

    name = f"vlmops-{label}-{uuid.uuid4().hex[:8]}"
    source = context.data_sources.add_pandas(name=name)
    asset = source.add_dataframe_asset(name=f"{name}-metadata")
    batch_definition = asset.add_batch_definition_whole_dataframe(name=f"{name}-all")
    suite = context.suites.add(gx.ExpectationSuite(name=f"{name}-suite", expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{name}-validation", data=batch_definition, suite=suite)
    )
    return definition.run(batch_parameters={"dataframe": frame}, result_format=_RESULT_FORMAT)


def _check_results(
    gx_result: ExpectationSuiteValidationResult, expectations: list[Expectation]
) -> list[tuple[CheckResult, list[str], list[dict[str, Any]]]]:
    """Turn GX's per-expectation results into CheckResults, in suite order.

    Returns (check, value columns, GX's unexpected_index_list) per expectation.
    GX 1.24 does not return results in suite order, so they are matched by ``meta["check_id"]``.
    """
    by_id = {res.expectation_config.meta["check_id"]: res for res in gx_result.results}
    out = []
    for expectation in expectations:
        meta = expectation.meta
        res = by_id[meta["check_id"]]
        failing_rows: list[dict[str, Any]] = list(res.result.get("unexpected_index_list") or [])
        check = CheckResult(
            name=meta["check"],
            expectation=res.expectation_config.type,
            success=bool(res.success),
            unexpected_count=int(res.result.get("unexpected_count") or 0),
            unexpected_row_ids=[_json_safe(entry.get("row_id")) for entry in failing_rows],
            detail="" if res.success else _failure_detail(res),
            check_id=meta["check_id"],
        )
        out.append((check, meta.get("value_columns", []), failing_rows))
    return out


def _failure_detail(res: ExpectationValidationResult) -> str:
    """Why a check failed when no rows explain it: GX's error, or the observed value."""
    info = res.exception_info or {}
    # A single error sits at the top level; errors while computing metrics are keyed by metric.
    nested = [v for v in info.values() if isinstance(v, dict)]
    messages = [e.get("exception_message") for e in [info, *nested] if e.get("raised_exception")]
    if messages:
        return "could not run: " + "; ".join(str(m) for m in messages)
    if "observed_value" in res.result:
        return f"observed {res.result['observed_value']!r}"
    return ""


def _json_safe(value: Any) -> Any:
    """Make a metadata value JSON-safe: numpy scalars to Python, NaN/NA to None."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _label_distribution(rows: Sequence[dict[str, Any]], kind: str) -> dict[str, int]:
    column = "answer" if kind == "sft" else "chosen"
    counts = Counter(_clean_text(row.get(column)) for row in rows)
    return dict(counts.most_common(_TOP_LABELS))


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def validate_rows(
    rows: Sequence[dict[str, Any]],
    kind: str,
    dataset: str,
    settings: ValidationSettings,
    out_dir: Path,
    *,
    source: str = "",
    reference_keys: set[str] | frozenset[str] | None = None,
    count_tokens: Callable[[dict[str, Any]], int] | None = None,
    max_tokens: int | None = None,
) -> tuple[list[dict[str, Any]], ValidationReport]:
    """Run the GX suite on one split and set aside the rows that fail it.

    Writes ``out_dir/<dataset>.gx.json`` (the GX result), ``out_dir/<dataset>.gx.html`` (a Data
    Docs page, best effort) and, when rows fail, ``out_dir/quarantine/<dataset>.jsonl`` with one
    line per (row, failed check): ``{"row_id", "dataset", "source", "check", "check_id",
    "value"}``; "/" in the dataset name becomes "_". ``source`` is the row's own ``source`` key
    when it has one, else the ``source`` argument. Returns the rows that passed every row-level
    check, in input order, and the report. A row failing a check is quarantined even when the
    check succeeds under a ``mostly`` below 1.

    Optional checks: with ``reference_keys`` (e.g. the held-out split's
    ``report.sample_keys``), rows whose :func:`sample_key` is among them fail
    ``leaks_into_reference``; with ``count_tokens`` and ``max_tokens``, rows whose
    ``count_tokens(row)`` exceeds ``max_tokens`` fail ``within_token_budget``.

    ``report.passed`` is False when the failing share exceeds ``settings.max_failed_fraction``,
    when a check listed in ``settings.mostly`` fails, and when a check failed without naming
    rows (the split is empty or out of its size bounds, a metadata column is missing, or GX
    could not compute a check), since then no row can be vouched for.

    Does not raise for bad data; use :func:`raise_if_failed` to stop a run.

    Raises:
        ValueError: when ``kind`` is not "sft" or "preference", or ``max_tokens`` is given
            without ``count_tokens`` or below 1 (caller bugs, not bad data).
    """
    _check_kind(kind)
    if max_tokens is not None and (count_tokens is None or max_tokens < 1):
        raise ValueError("max_tokens needs count_tokens and must be at least 1")
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", dataset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    counter = count_tokens if max_tokens is not None else None
    frame = build_metadata_frame(rows, kind, settings, reference_keys=reference_keys, count_tokens=counter)
    expectations = _build_expectations(
        kind, settings, with_reference=reference_keys is not None, max_tokens=max_tokens
    )
    gx_result = _run_suite(frame, expectations, label=stem)

    gx_result_path = out_dir / f"{stem}.gx.json"
    gx_result_path.write_text(json.dumps(gx_result.to_json_dict(), indent=2))
    data_docs_path = _write_data_docs(gx_result, out_dir / f"{stem}.gx.html")

    checks: list[CheckResult] = []
    quarantine_lines: list[dict[str, Any]] = []
    failing_pos: set[int] = set()
    values = {column: frame[column].tolist() for column in frame.columns}
    for check, value_columns, failing_rows in _check_results(gx_result, expectations):
        if check.check_id in settings.mostly:
            check.mostly = settings.mostly[check.check_id]
        checks.append(check)
        for entry in failing_rows:
            row_id = _json_safe(entry.get("row_id"))
            pos = int(entry["row_pos"])
            failing_pos.add(pos)
            # The value that failed: the first non-null of the check's value columns; for the
            # row_id checks (value column row_id) that is the id itself.
            found = [values[c][pos] for c in value_columns if c in values and _json_safe(values[c][pos]) is not None]
            value = found[0] if found else row_id
            row_source = rows[pos].get("source")
            quarantine_lines.append(
                {
                    "row_id": row_id,
                    "dataset": dataset,
                    "source": source if row_source is None else str(row_source),
                    "check": check.name,
                    "check_id": check.check_id,
                    "value": _json_safe(value),
                }
            )

    kept = [row for pos, row in enumerate(rows) if pos not in failing_pos]
    n_failed = len(rows) - len(kept)

    quarantine_path = _write_quarantine(quarantine_lines, out_dir / "quarantine" / f"{stem}.jsonl")

    unattributed_failure = any(not c.success and not c.unexpected_row_ids for c in checks)
    strict_failure = any(not c.success and c.mostly is not None for c in checks)
    within_limit = bool(rows) and n_failed / len(rows) <= settings.max_failed_fraction
    report = ValidationReport(
        dataset=dataset,
        kind=kind,
        n_rows=len(rows),
        n_failed_rows=n_failed,
        checks=checks,
        quarantine_path=quarantine_path,
        gx_result_path=gx_result_path,
        passed=within_limit and not unattributed_failure and not strict_failure,
        max_failed_fraction=settings.max_failed_fraction,
        data_docs_path=data_docs_path,
        sample_keys={key for key in values.get("sample_key", []) if isinstance(key, str)},
        label_distribution=_label_distribution(kept, kind),
    )
    logger.info("validated %s: %d rows, %d set aside, passed=%s", dataset, len(rows), n_failed, report.passed)
    return kept, report


def _write_quarantine(lines: list[dict[str, Any]], path: Path) -> Path | None:
    """Write the quarantine JSONL, or remove a stale one from an earlier run when nothing failed."""
    if not lines:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def _write_data_docs(gx_result: ExpectationSuiteValidationResult, path: Path) -> Path | None:
    """Render the GX Data Docs page for one result; None if rendering fails.

    Best effort: the page is for people, the JSON result is the record, so a renderer problem
    must not fail validation. The page loads its CSS/JS from public CDNs, so it is unstyled
    when opened offline.
    """
    try:
        from great_expectations.render.renderer import ValidationResultsPageRenderer

        document = ValidationResultsPageRenderer().render(gx_result)
        path.write_text(_page_view().render(document), encoding="utf-8")
    except Exception:  # noqa: BLE001 - see docstring
        logger.warning("could not render GX Data Docs page %s", path, exc_info=True)
        return None
    return path


@functools.cache
def _page_view() -> Any:
    """One Data Docs page view per process: its jinja environment caches the compiled templates
    (a fresh view recompiles them, ~0.15 s a page). Rendering keeps no state on the view."""
    from great_expectations.render.view import DefaultJinjaPageView

    return DefaultJinjaPageView()


def raise_if_failed(reports: Sequence[ValidationReport]) -> None:
    """Stop the run when any split failed validation.

    Raises:
        DataValidationError: naming every failing dataset, its failing checks with counts and
            its quarantine file, when any report has ``passed == False``.
    """
    failing = [report for report in reports if not report.passed]
    if failing:
        raise DataValidationError(failing)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
