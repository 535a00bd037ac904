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
from tasks.config import Recipe, load_recipe

DEMO_RECIPE = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


@flow(name="evaluate", flow_run_name="evaluate {model_uri}")
def evaluate(model_uri: str, recipe: Recipe = DEMO_RECIPE) -> dict[str, float]:
    """Evaluate the registered adapter at `model_uri` on `recipe`'s held-out split; returns its metrics.

    Args:
        model_uri: the registered adapter, `models:/NAME/VERSION` or `models:/NAME@ALIAS`.
        recipe: whose held-out data, decoding and MLflow experiment to use; the form starts from the demo's.
    """
    run_dir = Path(recipe.output_dir) / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-evaluate"
    registered = stages.fetch_registered_adapter(model_uri, run_dir)
    eval_data = stages.prepare_eval_data(recipe, run_dir)
    return stages.evaluate_registered(recipe, registered, eval_data, run_dir)
