"""Data sources: load a split and map its columns onto the pipeline's internal schema.

Internal schema, whatever the source:
- SFT rows: `row_id`, `image` (PIL), `question`, `answer`;
- preference rows: `row_id`, `image` (PIL), `question`, `chosen`, `rejected`.

Sources:
- `builtin:chartqa-synth` / `builtin:chart-prefs-synth`: offline synthetic charts in
  ChartQA's and RLAIF-V's columns (tasks/synthetic.py);
- anything else is a Hugging Face dataset id or a local dataset folder, loaded with
  `datasets.load_dataset` and mapped by the column names ChartQA and RLAIF-V use.

ChartQA's `label` is a list of accepted answers: the first one becomes `answer`.
"""

from __future__ import annotations

from typing import Any

from tasks import synthetic
from tasks.config import DataConfig

CHARTQA_SYNTH = "builtin:chartqa-synth"
CHART_PREFS_SYNTH = "builtin:chart-prefs-synth"

# Source column -> internal column, by the names the reference datasets use.
SFT_COLUMNS = {"query": "question", "question": "question", "label": "answer", "answer": "answer", "image": "image"}
PREFERENCE_COLUMNS = {"question": "question", "chosen": "chosen", "rejected": "rejected", "image": "image"}


class DataSourceError(ValueError):
    """A source that cannot be read or lacks a column the pipeline needs."""


def _load_source_rows(source: str, split: str, limit: int, seed: int) -> list[dict[str, Any]]:
    if source == CHARTQA_SYNTH:
        return synthetic.make_chartqa_split(split, limit, seed=seed)
    if source == CHART_PREFS_SYNTH:
        return synthetic.make_chart_prefs_split(split, limit, seed=seed)
    if source.startswith("builtin:"):
        raise DataSourceError(
            f"unknown builtin data source {source!r}; choose {CHARTQA_SYNTH} or {CHART_PREFS_SYNTH}"
        )
    import datasets  # imported here: only real sources need it

    loaded = datasets.load_dataset(source, split=f"{split}[:{limit}]")
    return list(loaded)


def _map_columns(rows: list[dict[str, Any]], mapping: dict[str, str], source: str, split: str) -> list[dict]:
    wanted = set(mapping.values())
    mapped = []
    for index, row in enumerate(rows):
        item: dict[str, Any] = {"row_id": f"{split}-{index:06d}"}
        for column, value in row.items():
            if column in mapping and mapping[column] not in item:
                item[mapping[column]] = value
        missing = wanted - item.keys()
        if missing:
            raise DataSourceError(
                f"{source} [{split}] row {index}: missing column(s) {sorted(missing)}; "
                f"the row has {sorted(row)}. Rename the columns to one of {sorted(mapping)}."
            )
        if isinstance(item.get("answer"), list):
            # ChartQA stores accepted answers as a list; the first is the reference answer.
            item["answer"] = str(item["answer"][0]) if item["answer"] else ""
        mapped.append(item)
    return mapped


def load_sft_rows(source: str, split: str, limit: int, seed: int = 0) -> list[dict[str, Any]]:
    """Load up to `limit` SFT rows of `split` in the internal schema. Raises DataSourceError."""
    return _map_columns(_load_source_rows(source, split, limit, seed), SFT_COLUMNS, source, split)


def load_preference_rows(source: str, split: str, limit: int, seed: int = 0) -> list[dict[str, Any]]:
    """Load up to `limit` preference pairs of `split` in the internal schema. Raises DataSourceError."""
    return _map_columns(_load_source_rows(source, split, limit, seed), PREFERENCE_COLUMNS, source, split)


def load_recipe_datasets(data: DataConfig) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Every dataset a run uses, by name: {"sft/train": ("sft", rows), "preference/test": ("preference", rows), ...}."""
    return {
        f"sft/{data.train_split}": (
            "sft", load_sft_rows(data.sft_source, data.train_split, data.max_train_samples, data.seed)),
        f"sft/{data.eval_split}": (
            "sft", load_sft_rows(data.sft_source, data.eval_split, data.max_eval_samples, data.seed)),
        f"preference/{data.train_split}": (
            "preference",
            load_preference_rows(data.preference_source, data.train_split, data.max_preference_samples, data.seed)),
        f"preference/{data.eval_split}": (
            "preference",
            load_preference_rows(data.preference_source, data.eval_split, data.max_eval_samples, data.seed)),
    }
