"""The evaluation flow: score any registered adapter on any recipe's held-out data.

Stages:
1. fetch the registered model (`models:/NAME/VERSION` or `models:/NAME@ALIAS`);
2. load, check and format the recipe's held-out splits;
3. evaluate the adapter on the base it was trained on; log the metrics to a new MLflow run.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from prefect import flow

from tasks import stages
from tasks.config import Recipe


@flow(name="evaluate", flow_run_name="evaluate {model_uri}")
def evaluate(model_uri: str, recipe: Recipe) -> dict[str, float]:
    """Evaluate the registered adapter at `model_uri` on `recipe`'s held-out split; returns its metrics."""
    run_dir = Path(recipe.output_dir) / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-evaluate"
    registered = stages.fetch_registered_adapter(model_uri, run_dir)
    eval_data = stages.prepare_eval_data(recipe, run_dir)
    return stages.evaluate_registered(recipe, registered, eval_data, run_dir)
