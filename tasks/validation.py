"""Data-validation stage: check mapped rows with Great Expectations before training.

Rows arrive in the internal schema (one list of dicts per split). Images and free text are not
something GX can inspect directly, so each split is first reduced to a *metadata frame*: one
pandas row per sample holding the measurable facts (text lengths, whether the image decodes, its
size). The GX suite runs on that frame; every failing row is named by its ``row_id`` and set
aside in a quarantine JSONL file, and the rows that pass every check go on to training. When the
share of failing rows exceeds ``ValidationSettings.max_failed_fraction`` the report says
``passed=False`` and :func:`raise_if_failed` stops the run.

What is hand-written here and why (everything else is GX):

* building the metadata frame: GX checks columns, it cannot open a PIL image;
* dropping failing rows and writing the quarantine file: GX reports failures, it does not
  filter data;
* the pass/fail threshold over *rows*: GX's ``mostly`` is per expectation, while a run must stop
  on the share of rows that fail *any* check;
* the readable summary and the exception that carries it.

Plain functions, no Prefect imports, so the stage is testable without an orchestrator.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
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
    "sft": ("question_chars", "answer_chars"),
    "preference": ("question_chars", "chosen_chars", "rejected_chars", "chosen_differs"),
}
_IMAGE_COLUMNS: tuple[str, ...] = ("image_decodes", "image_width", "image_height", "image_mode")

# Ask GX for every failing row, named by row_id rather than by pandas index position.
_RESULT_FORMAT: dict[str, Any] = {
    "result_format": "COMPLETE",
    "unexpected_index_column_names": ["row_id"],
}

# How many failing row ids a summary lists per check.
_SUMMARY_IDS = 5


@dataclass(frozen=True)
class ValidationSettings:
    """Limits the GX suite checks against, and the share of failing rows a run tolerates."""

    max_question_chars: int = 512
    max_answer_chars: int = 256
    min_image_side: int = 8
    max_image_side: int = 4096
    max_failed_fraction: float = 0.05  # more failing rows than this -> the run stops

    def __post_init__(self) -> None:
        """Reject settings that would make every check pass or fail by construction.

        Raises:
            ValueError: when a limit is out of range.
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


@dataclass
class CheckResult:
    """The outcome of one GX expectation."""

    name: str  # human name, e.g. "question is not empty"
    expectation: str  # GX expectation type, e.g. "expect_column_values_to_be_between"
    success: bool
    unexpected_count: int
    # One entry per failing row (a duplicated row_id appears once per copy); None only for rows
    # that have no row_id at all, which the "row_id is present" check reports.
    unexpected_row_ids: list[str | None]
    # For a failure GX could not pin on rows: the observed value (table checks) or the error
    # GX raised while computing the check. Empty otherwise.
    detail: str = ""


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
    passed: bool  # n_failed_rows / n_rows <= max_failed_fraction (see validate_rows)
    max_failed_fraction: float = 0.05
    data_docs_path: Path | None = None  # GX Data Docs HTML page, when it could be rendered

    @property
    def failed_checks(self) -> list[CheckResult]:
        """The checks that did not succeed, in suite order."""
        return [check for check in self.checks if not check.success]

    def summary(self) -> str:
        """Return a readable multi-line report: rows, failing checks, quarantine, verdict."""
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
        if self.quarantine_path is not None:
            lines.append(f"  quarantine: {self.quarantine_path}")
        lines.append(f"  GX result: {self.gx_result_path}")
        if self.data_docs_path is not None:
            lines.append(f"  Data Docs: {self.data_docs_path}")
        return "\n".join(lines)


def _describe_failure(check: CheckResult) -> str:
    """One summary line for a failing check: name, GX type, count and a few row ids."""
    head = f"{check.name} [{check.expectation}]"
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
            "and the value that failed), or, if the share is acceptable, raise validation.max_failed_fraction."
        )
        super().__init__(f"Data validation failed for {names}:\n\n{body}\n\n{fix}")


# --------------------------------------------------------------------------------------------
# Metadata frame (hand-written: GX cannot look inside images or Python objects)
# --------------------------------------------------------------------------------------------


def build_metadata_frame(rows: Sequence[dict[str, Any]], kind: str) -> pd.DataFrame:
    """Reduce rows to one metadata record per sample, the frame the GX suite runs on.

    Columns: ``row_id``, ``question_chars``, then ``answer_chars`` (SFT) or ``chosen_chars``,
    ``rejected_chars``, ``chosen_differs`` (preference), then ``image_decodes``,
    ``image_width``, ``image_height``, ``image_mode``. Text lengths count characters after
    stripping surrounding whitespace, so a whitespace-only answer counts as empty; a missing or
    None field counts as empty too. Width, height and mode are null when the image does not
    decode.

    Raises:
        ValueError: when ``kind`` is not "sft" or "preference".
    """
    _check_kind(kind)
    records = [_metadata_record(row, kind) for row in rows]
    columns = ["row_id", *_TEXT_COLUMNS[kind], *_IMAGE_COLUMNS]
    frame = pd.DataFrame.from_records(records, columns=columns)
    # Fixed dtypes, so an empty split or a split of only broken images still has the types
    # the suite expects. Sizes use nullable Int64: ints, with <NA> where the image is broken
    # (a plain int column would turn into float at the first missing size).
    dtypes = {column: ("int64" if column.endswith("_chars") else "bool") for column in _TEXT_COLUMNS[kind]}
    dtypes |= {"image_decodes": "bool", "image_width": "Int64", "image_height": "Int64"}
    return frame.astype(dtypes)


def _metadata_record(row: dict[str, Any], kind: str) -> dict[str, Any]:
    """Measure one row: text lengths, whether its image decodes and the image's size."""
    record: dict[str, Any] = {
        "row_id": row.get("row_id"),
        "question_chars": _text_chars(row.get("question")),
    }
    if kind == "sft":
        record["answer_chars"] = _text_chars(row.get("answer"))
    else:
        chosen, rejected = _clean_text(row.get("chosen")), _clean_text(row.get("rejected"))
        record["chosen_chars"] = len(chosen)
        record["rejected_chars"] = len(rejected)
        record["chosen_differs"] = chosen != rejected
    record.update(_image_facts(row.get("image")))
    return record


def _clean_text(value: Any) -> str:
    """The text as training will see it, minus surrounding whitespace; None reads as ""."""
    return "" if value is None else str(value).strip()


def _text_chars(value: Any) -> int:
    return len(_clean_text(value))


def _image_facts(image: Any) -> dict[str, Any]:
    """Decode the image the way training will (``convert("RGB")``) and report its size.

    Anything that is not a PIL image, or a PIL image whose pixels cannot be read (a truncated
    file opens lazily and only fails here), counts as not decoding.
    """
    undecodable = dict.fromkeys(_IMAGE_COLUMNS) | {"image_decodes": False}
    if not isinstance(image, Image.Image):
        return undecodable
    try:
        image.convert("RGB")
    except Exception:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError...; all mean "broken"
        return undecodable
    width, height = image.size
    return {"image_decodes": True, "image_width": width, "image_height": height, "image_mode": image.mode}


# --------------------------------------------------------------------------------------------
# The GX suite
# --------------------------------------------------------------------------------------------


def _build_expectations(kind: str, settings: ValidationSettings) -> list[Expectation]:
    """The suite for one kind. Each expectation carries its human name in ``meta["check"]``.

    Rows whose image does not decode have null width/height; GX column-map expectations skip
    nulls, so such rows fail only "image decodes", not the size checks as well.
    """
    import great_expectations.expectations as gxe

    def named(name: str, expectation: Expectation) -> Expectation:
        expectation.meta = {"check": name}
        return expectation

    def between(column: str, low: int | None, high: int | None) -> Expectation:
        return gxe.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=high)

    def is_true(column: str) -> Expectation:
        return gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[True])

    columns = ["row_id", *_TEXT_COLUMNS[kind], *_IMAGE_COLUMNS]
    suite = [named(f"column {c} exists", gxe.ExpectColumnToExist(column=c)) for c in columns]
    suite += [
        named("dataset is not empty", gxe.ExpectTableRowCountToBeBetween(min_value=1)),
        named("row_id is present", gxe.ExpectColumnValuesToNotBeNull(column="row_id")),
        named("row_id is unique", gxe.ExpectColumnValuesToBeUnique(column="row_id")),
        named("question is not empty", between("question_chars", 1, None)),
        named(
            f"question is at most {settings.max_question_chars} chars",
            between("question_chars", None, settings.max_question_chars),
        ),
    ]
    if kind == "sft":
        suite += [
            named("answer is not empty", between("answer_chars", 1, None)),
            named(
                f"answer is at most {settings.max_answer_chars} chars",
                between("answer_chars", None, settings.max_answer_chars),
            ),
        ]
    else:
        suite += [
            named("chosen is not empty", between("chosen_chars", 1, None)),
            named("rejected is not empty", between("rejected_chars", 1, None)),
            named("chosen differs from rejected", is_true("chosen_differs")),
        ]
    low, high = settings.min_image_side, settings.max_image_side
    suite += [
        named("image decodes", is_true("image_decodes")),
        named(f"image width is between {low} and {high} px", between("image_width", low, high)),
        named(f"image height is between {low} and {high} px", between("image_height", low, high)),
    ]
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
) -> list[tuple[CheckResult, str | None, list[dict[str, Any]]]]:
    """Turn GX's per-expectation results into CheckResults, in suite order.

    Returns (check, checked column or None, GX's unexpected_index_list) per expectation.
    GX 1.24 does not return results in suite order, so they are matched by ``meta["check"]``.
    """
    by_name = {res.expectation_config.meta["check"]: res for res in gx_result.results}
    out = []
    for expectation in expectations:
        name = expectation.meta["check"]
        res = by_name[name]
        failing_rows: list[dict[str, Any]] = list(res.result.get("unexpected_index_list") or [])
        check = CheckResult(
            name=name,
            expectation=res.expectation_config.type,
            success=bool(res.success),
            unexpected_count=int(res.result.get("unexpected_count") or 0),
            unexpected_row_ids=[_json_safe(entry.get("row_id")) for entry in failing_rows],
            detail="" if res.success else _failure_detail(res),
        )
        out.append((check, getattr(expectation, "column", None), failing_rows))
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


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def validate_rows(
    rows: Sequence[dict[str, Any]],
    kind: str,
    dataset: str,
    settings: ValidationSettings,
    out_dir: Path,
) -> tuple[list[dict[str, Any]], ValidationReport]:
    """Run the GX suite on one split and set aside the rows that fail it.

    Writes ``out_dir/<dataset>.gx.json`` (the GX result), ``out_dir/<dataset>.gx.html`` (a Data
    Docs page, best effort) and, when rows fail, ``out_dir/quarantine/<dataset>.jsonl`` with one
    line per (row, failed check): ``{"row_id", "dataset", "check", "value"}``; "/" in the
    dataset name becomes "_". Returns the rows that passed every check, in input order, and the
    report.

    ``report.passed`` is False when the failing share exceeds ``settings.max_failed_fraction``,
    and also when a check failed without naming rows (the split is empty, a metadata column is
    missing, or GX could not compute a check), since then no row can be vouched for.

    Does not raise for bad data; use :func:`raise_if_failed` to stop a run.

    Raises:
        ValueError: when ``kind`` is not "sft" or "preference" (a caller bug, not bad data).
    """
    _check_kind(kind)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", dataset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    frame = build_metadata_frame(rows, kind)
    expectations = _build_expectations(kind, settings)
    gx_result = _run_suite(frame, expectations, label=stem)

    gx_result_path = out_dir / f"{stem}.gx.json"
    gx_result_path.write_text(json.dumps(gx_result.to_json_dict(), indent=2))
    data_docs_path = _write_data_docs(gx_result, out_dir / f"{stem}.gx.html")

    checks: list[CheckResult] = []
    quarantine_lines: list[dict[str, Any]] = []
    failing_ids: set[Any] = set()
    for check, column, failing_rows in _check_results(gx_result, expectations):
        checks.append(check)
        for entry in failing_rows:
            row_id = _json_safe(entry.get("row_id"))
            failing_ids.add(row_id)
            # The row_id checks' checked column is row_id itself, so the value is the id.
            value = entry.get(column, row_id)
            quarantine_lines.append(
                {"row_id": row_id, "dataset": dataset, "check": check.name, "value": _json_safe(value)}
            )

    # Drop by row_id: a duplicated id fails "row_id is unique" on every copy, so an id never
    # stands for both a failing and a passing row.
    kept = [row for row in rows if _json_safe(row.get("row_id")) not in failing_ids]
    n_failed = len(rows) - len(kept)

    quarantine_path = _write_quarantine(quarantine_lines, out_dir / "quarantine" / f"{stem}.jsonl")

    unattributed_failure = any(not c.success and not c.unexpected_row_ids for c in checks)
    within_limit = bool(rows) and n_failed / len(rows) <= settings.max_failed_fraction
    report = ValidationReport(
        dataset=dataset,
        kind=kind,
        n_rows=len(rows),
        n_failed_rows=n_failed,
        checks=checks,
        quarantine_path=quarantine_path,
        gx_result_path=gx_result_path,
        passed=within_limit and not unattributed_failure,
        max_failed_fraction=settings.max_failed_fraction,
        data_docs_path=data_docs_path,
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
        from great_expectations.render.view import DefaultJinjaPageView

        document = ValidationResultsPageRenderer().render(gx_result)
        path.write_text(DefaultJinjaPageView().render(document), encoding="utf-8")
    except Exception:  # noqa: BLE001 - see docstring
        logger.warning("could not render GX Data Docs page %s", path, exc_info=True)
        return None
    return path


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
