"""Promotion through MLflow registry aliases: `candidate` -> `champion`, the old champion -> `previous`.

- The gate (`decide`) is a pure function of the two versions' metrics and the recipe's
  `promotion` section: the candidate's primary metric must beat the champion's by
  `min_improvement`, and no guard metric may drop by more than allowed. With no champion,
  the candidate must reach the absolute floor `min_primary`.
- Metrics are compared only when both were measured on the same held-out data: each
  version carries its evaluation data's fingerprints as tags (`same_eval_data`); the flow
  re-evaluates the champion on the candidate's data when they differ.
- Every decision, its numbers and reason are written to the version's tags
  (`vlmops.promotion.*`) and to the run that produced it.
- Moving aliases is two registry calls that must not interleave with another promotion of
  the same model, or two racing promotions could both take the same champion as `previous`.
  MLflow has no transactions, so the moves happen under a Prefect global concurrency limit
  of 1 per registered model (`registry_lock`), which works across processes and machines
  that share the Prefect API.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from tasks.config import PromotionConfig

logger = logging.getLogger(__name__)

METRIC_TAG_PREFIX = "metric."
EVAL_FINGERPRINT_TAGS = ("vlmops.data.sft.eval.fingerprint", "vlmops.data.preference.eval.fingerprint")
REPLACED_TAG = "vlmops.promotion.replaced_version"  # the champion a version replaced: rollback's trail


class PromotionError(RuntimeError):
    """A promotion or rollback that cannot be done (unknown version, nothing to roll back to)."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    primary_metric: str
    candidate_value: float
    champion_version: str | None = None
    champion_value: float | None = None
    guard_drops: dict[str, float] = field(default_factory=dict)

    def as_tags(self) -> dict[str, str]:
        tags = {
            "vlmops.promotion.decision": "promoted" if self.promote else "rejected",
            "vlmops.promotion.reason": self.reason,
            "vlmops.promotion.primary_metric": self.primary_metric,
            "vlmops.promotion.candidate_value": f"{self.candidate_value:.4f}",
            "vlmops.promotion.champion_version": self.champion_version or "none",
        }
        if self.champion_value is not None:
            tags["vlmops.promotion.champion_value"] = f"{self.champion_value:.4f}"
        for metric, drop in self.guard_drops.items():
            tags[f"vlmops.promotion.guard.{metric}.drop"] = f"{drop:.4f}"
        return tags


def _metric(metrics: dict[str, float], name: str, whose: str) -> float:
    if name not in metrics:
        raise PromotionError(f"{whose} has no metric {name!r}; it has {sorted(metrics)} (check promotion.* in the recipe)")
    return float(metrics[name])


def decide(
    candidate: dict[str, float], champion: dict[str, float] | None, policy: PromotionConfig,
    champion_version: str | None = None,
) -> Decision:
    """Whether the candidate becomes champion, with the numbers and a sentence saying why."""
    primary = policy.primary_metric
    value = _metric(candidate, primary, "the candidate")
    if champion is None:
        promote = value >= policy.min_primary
        verdict = "reaches" if promote else "is below"
        return Decision(
            promote, f"no champion yet; {primary} {value:.4f} {verdict} the floor {policy.min_primary:.4f}", primary, value
        )
    champion_value = _metric(champion, primary, f"champion version {champion_version}")
    drops = {m: _metric(champion, m, "the champion") - _metric(candidate, m, "the candidate") for m in policy.guard_metrics}
    decision = dict(
        primary_metric=primary, candidate_value=value, champion_version=champion_version,
        champion_value=champion_value, guard_drops=drops,
    )
    if value - champion_value < policy.min_improvement:
        return Decision(False, (
            f"{primary} {value:.4f} does not beat champion version {champion_version}'s {champion_value:.4f} "
            f"by the required {policy.min_improvement:.4f}"
        ), **decision)
    for metric, drop in drops.items():
        if drop > policy.guard_metrics[metric]:
            return Decision(False, (
                f"guard {metric} dropped {drop:.4f} against champion version {champion_version} "
                f"(at most {policy.guard_metrics[metric]:.4f} allowed)"
            ), **decision)
    return Decision(True, (
        f"{primary} {value:.4f} beats champion version {champion_version}'s {champion_value:.4f} "
        f"by {value - champion_value:.4f} (>= {policy.min_improvement:.4f}); guards within limits"
    ), **decision)


def version_metrics(version: ModelVersion) -> dict[str, float]:
    """The evaluation metrics a version carries as `metric.*` tags."""
    return {
        key.removeprefix(METRIC_TAG_PREFIX): float(value)
        for key, value in version.tags.items() if key.startswith(METRIC_TAG_PREFIX)
    }


def same_eval_data(a: ModelVersion, b: ModelVersion) -> bool:
    """Both versions were evaluated on the same held-out data (equal, present fingerprints)."""
    return all(a.tags.get(tag) and a.tags.get(tag) == b.tags.get(tag) for tag in EVAL_FINGERPRINT_TAGS)


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@contextlib.contextmanager
def registry_lock(name: str, timeout_seconds: float = 600) -> Iterator[None]:
    """Hold the promotion lock of registered model `name`: a Prefect global concurrency limit of 1."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    lock = f"vlmops-promote-{name}"
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=lock, limit=1))
        except ObjectAlreadyExists:
            pass  # created by an earlier (or the racing) promotion
    with concurrency(lock, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield


def move_champion(client: MlflowClient, name: str, version: str, policy: PromotionConfig) -> str | None:
    """Make `version` the champion; the champion it replaces becomes `previous`. Returns that version.

    Call under `registry_lock`.
    """
    replaced = alias_version(client, name, policy.champion_alias)
    if replaced is not None and str(replaced.version) == str(version):
        return None  # already champion: nothing moves
    if replaced is not None:
        client.set_registered_model_alias(name, policy.previous_alias, replaced.version)
        client.set_model_version_tag(name, version, REPLACED_TAG, str(replaced.version))
    client.set_registered_model_alias(name, policy.champion_alias, version)
    logger.info(
        "%s: version %s is now '%s'%s", name, version, policy.champion_alias,
        f", version {replaced.version} is '{policy.previous_alias}'" if replaced is not None else "",
    )
    return str(replaced.version) if replaced is not None else None


def record_decision(client: MlflowClient, name: str, version: str, decision: Decision, run_id: str | None) -> None:
    """Write the decision to the version's tags and, when given, to the run that produced the version."""
    tags = decision.as_tags()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if run_id:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.log_metric(run_id, "promotion.promoted", 1.0 if decision.promote else 0.0)


def promote_by_hand(client: MlflowClient, name: str, version: str, policy: PromotionConfig) -> str | None:
    """A person's decision: make `version` champion without the gate, and record who and when.

    Returns the version it replaced. Raises PromotionError for an unknown version.
    """
    try:
        client.get_model_version(name, version)
    except MlflowException as error:
        raise PromotionError(f"{name} has no version {version}") from error
    with registry_lock(name):
        replaced = move_champion(client, name, version, policy)
        for key, value in {
            "vlmops.promotion.decision": "manual",
            "vlmops.promotion.reason": f"promoted by hand by {getpass.getuser()} at {_now()}",
        }.items():
            client.set_model_version_tag(name, version, key, value)
    return replaced


def rollback(client: MlflowClient, name: str, policy: PromotionConfig) -> tuple[str, str]:
    """Give `champion` back to the `previous` version; returns (new champion, version rolled back).

    The new `previous` is the version the restored champion had itself replaced (from its
    tags), so repeated rollbacks walk back through the champions; without one the alias goes.
    Raises PromotionError when there is no `previous` to return to.
    """
    with registry_lock(name):
        champion = alias_version(client, name, policy.champion_alias)
        previous = alias_version(client, name, policy.previous_alias)
        if champion is None or previous is None:
            raise PromotionError(
                f"{name}: nothing to roll back to (champion: {champion.version if champion else 'none'}, "
                f"previous: {previous.version if previous else 'none'})"
            )
        client.set_registered_model_alias(name, policy.champion_alias, previous.version)
        older = previous.tags.get(REPLACED_TAG)
        if older and older != str(champion.version) and _exists(client, name, older):
            client.set_registered_model_alias(name, policy.previous_alias, older)
        else:
            client.delete_registered_model_alias(name, policy.previous_alias)
        client.set_model_version_tag(
            name, champion.version, "vlmops.promotion.rolled_back", f"by {getpass.getuser()} at {_now()}"
        )
    logger.info("%s: rolled back from version %s to version %s", name, champion.version, previous.version)
    return str(previous.version), str(champion.version)


def _exists(client: MlflowClient, name: str, version: str) -> bool:
    try:
        client.get_model_version(name, version)
        return True
    except MlflowException:
        return False


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
