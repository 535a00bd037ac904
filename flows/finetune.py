"""The fine-tuning flow: the whole chain, from raw data to a registered candidate adapter.

Stages:
1. check that MLflow's tracking server and registry answer, then start the parent run (the
   recipe, flattened, as parameters; lineage tags: base model, code commit, Prefect run);
2. validate every dataset with Great Expectations; stop before any model loads if it fails;
3. format SFT (prompt + completion) and preference (prompt, chosen, rejected) samples;
4. prepare the base model (the offline tiny SmolVLM is built once and cached), estimate its
   memory and refuse, before loading, a recipe this machine cannot run;
5. SFT with a LoRA adapter on the base loaded as the recipe asks (bf16 / 8-bit / 4-bit);
6. DPO from the SFT adapter, the SFT policy as reference;
7. evaluate base, SFT and DPO on the same held-out split; write the comparison and gallery;
8. register the DPO adapter as a new model version with the alias `candidate`, carrying
   the run's lineage tags and its metrics;
9. promote it to `champion` only if it beats the current champion on the same held-out
   data (the old champion becomes `previous`); the decision is written to the version.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow

from tasks import stages
from tasks.config import Recipe
from tasks.promotion import Decision
from tasks.tracking import tracking_uri


@dataclass(frozen=True)
class FinetuneResult:
    run_id: str
    tracking_uri: str
    metrics: dict[str, dict[str, float]]
    registered: stages.RegisteredAdapter
    run_dir: str
    report: dict[str, str]
    promotion: Decision | None


@flow(name="finetune", flow_run_name="finetune {recipe.name}", log_prints=True)
def finetune(recipe: Recipe) -> FinetuneResult:
    """Validate, format, SFT, DPO, evaluate, register: see the module docstring."""
    run_dir = Path(recipe.output_dir) / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{recipe.name}"
    # tracking first: a run that cannot be recorded must not spend GPU hours
    stages.check_tracking_server()
    parent_run_id = stages.start_tracking_run(recipe)

    try:
        # data: nothing is trained on rows that failed the checks
        quarantined = stages.validate_dataset(recipe, run_dir, parent_run_id)
        formatted = stages.format_dataset(recipe, run_dir, quarantined)

        # training: SFT adapter first, DPO continues it
        stages.prepare_base_model(recipe, parent_run_id)
        sft_adapter = stages.train_sft_adapter(recipe, formatted, run_dir, parent_run_id)
        dpo_adapter = stages.train_dpo_adapter(recipe, sft_adapter, formatted, run_dir, parent_run_id)

        # evaluation: the same held-out data and decoding for all three models
        metrics = {
            label: stages.evaluate_model(recipe, label, adapter, formatted, run_dir, parent_run_id)
            for label, adapter in (("base", None), ("sft", sft_adapter), ("dpo", dpo_adapter))
        }
        report = stages.write_evaluation_report(recipe, formatted, run_dir, parent_run_id, metrics)

        # registry: the new adapter becomes a candidate, and champion only if it passes the gate
        registered = stages.register_adapter(recipe, parent_run_id, dpo_adapter, metrics)
        promotion = stages.promote_if_better(recipe, registered, formatted, run_dir, parent_run_id)
        stages.finish_tracking_run(parent_run_id)
    except BaseException:
        # The MLflow run must not stay RUNNING forever when a stage fails.
        stages.finish_tracking_run(parent_run_id, status="FAILED")
        raise
    return FinetuneResult(parent_run_id, tracking_uri(), metrics, registered, str(run_dir), report, promotion)
