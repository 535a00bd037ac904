"""Promote or roll back a registered adapter by hand, through MLflow registry aliases.

- `promote`: the version becomes `champion`, the replaced champion `previous`; the version
  is tagged with who promoted it and when. The automatic, gated promotion runs at the end
  of the fine-tuning flow; this is the person's override.
- `rollback`: `champion` goes back to `previous` (and `previous` one step further back).

Both hold the registered model's promotion lock, so two at once end consistent.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from tasks import stages
from tasks.config import PromotionConfig


@flow(name="promote", flow_run_name="{action} {registered_model}", log_prints=True)
def promote(
    registered_model: str,
    version: str | None = None,
    action: Literal["promote", "rollback"] = "promote",
    policy: PromotionConfig = PromotionConfig(),
) -> dict[str, str | None]:
    """Promote `version` of `registered_model` to champion, or roll the champion back."""
    if action == "rollback":
        return stages.rollback_champion(registered_model, policy)
    if version is None:
        raise ValueError("promote needs the version to promote")
    return stages.promote_version(registered_model, version, policy)
