"""The data-checks-only flow: run the recipe's GX suites and nothing else (no model, no tracking)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks import stages
from tasks.config import Recipe
from tasks.validation import ValidationReport


@flow(name="validate", flow_run_name="validate {recipe.name}")
def validate(recipe: Recipe, out_dir: str = "runs/validation") -> list[ValidationReport]:
    """Validate every dataset of the recipe; returns one report each (the caller decides to stop)."""
    return stages.check_data(recipe, Path(out_dir))
