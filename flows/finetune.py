"""The fine-tuning flow: the whole chain, from raw data to a registered (and maybe promoted) adapter.

Stages:
1. check that MLflow's tracking server and registry answer, then start the parent run (the
   recipe, flattened, as parameters; lineage tags: base model, code commit, Prefect run);
2. fingerprint every dataset (tags + MLflow inputs); with `skip_unchanged_data` (the weekly
   deployment), stop here, Completed, when the champion was trained on the same data;
3. validate every dataset with Great Expectations; stop before any model loads if it fails;
4. format SFT (prompt + completion) and preference (prompt, chosen, rejected) samples;
5. prepare the base model (the offline tiny SmolVLM is built once and cached), estimate its
   memory and refuse, before loading, a recipe this machine cannot run;
6. SFT with a LoRA adapter on the base loaded as the recipe asks (bf16 / 8-bit / 4-bit);
7. DPO from the SFT adapter, the SFT policy as reference;
8. evaluate base, SFT and DPO on the same held-out split; write the comparison and gallery;
9. register the DPO adapter as a new model version with the alias `candidate`, carrying
   the run's lineage tags and its metrics;
10. promote it to `champion` only if it beats the current champion on the same held-out
    data (the old champion becomes `previous`); the decision is written to the version.

Stages 3, 4, 6 and 7 are cached on data fingerprints and settings: a run that failed in
DPO, started again with the same parameters, reuses its SFT adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow

from tasks import stages
from tasks.config import Recipe, load_recipe
from tasks.promotion import Decision
from tasks.tracking import tracking_uri

# The UI's form starts from the offline demo recipe: a run started with no changes works anywhere.
DEMO_RECIPE = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


@dataclass(frozen=True)
class FinetuneResult:
    run_id: str
    tracking_uri: str
    metrics: dict[str, dict[str, float]]
    registered: stages.RegisteredAdapter | None
    run_dir: str
    report: dict[str, str]
    promotion: Decision | None
    skipped: str | None = None  # why nothing was trained (unchanged data), when so


@flow(name="finetune", flow_run_name="finetune {recipe.name} on {recipe.model.name_or_path}", log_prints=True)
def finetune(recipe: Recipe = DEMO_RECIPE, skip_unchanged_data: bool = False, force: bool = False) -> FinetuneResult:
    """Validate, format, SFT, DPO, evaluate, register, promote: see the module docstring.

    Args:
        recipe: the whole run's settings (configs/*.yaml); the form's defaults are the demo's.
        skip_unchanged_data: end early, Completed, when the champion was trained on data with
            the same fingerprints (the weekly retraining sets this).
        force: train even when `skip_unchanged_data` finds nothing new.
    """
    run_dir = Path(recipe.output_dir) / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{recipe.name}"
    # tracking first: a run that cannot be recorded must not spend GPU hours
    stages.check_tracking_server()
    parent_run_id = stages.start_tracking_run(recipe)

    try:
        # data: fingerprinted, checked, formatted; nothing is trained on rows that failed the checks
        fingerprints = stages.fingerprint_datasets(recipe, parent_run_id)
        if skip_unchanged_data and not force:
            unchanged = stages.data_unchanged_since_champion(recipe, fingerprints)
            if unchanged:
                print(unchanged)
                stages.finish_tracking_run(parent_run_id, skipped=unchanged)
                return FinetuneResult(parent_run_id, tracking_uri(), {}, None, str(run_dir), {}, None, unchanged)
        quarantined = stages.validate_dataset(recipe, fingerprints, run_dir, parent_run_id)
        formatted = stages.format_dataset(recipe, fingerprints, quarantined)

        # training: SFT adapter first, DPO continues it
        stages.prepare_base_model(recipe, parent_run_id)
        sft_adapter = stages.timed(stages.train_sft_adapter, recipe.resources.sft_timeout_minutes)(
            recipe, fingerprints, quarantined, formatted, parent_run_id)
        dpo_adapter = stages.timed(stages.train_dpo_adapter, recipe.resources.dpo_timeout_minutes)(
            recipe, fingerprints, quarantined, sft_adapter, formatted, parent_run_id)

        # evaluation: the same held-out data and decoding for all three models
        metrics = {
            label: stages.timed(stages.evaluate_model, recipe.resources.evaluation_timeout_minutes)(
                recipe, label, adapter, formatted, run_dir, parent_run_id)
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
