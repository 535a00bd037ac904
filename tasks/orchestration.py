"""Prefect policy for the pipeline's tasks: cache keys, which failures are retried, artifacts.

Cache keys. A stage's key is a hash of exactly what its output depends on: the content
fingerprints of the datasets it reads (not their names or paths), the rows quarantined from
them, and the recipe sections that shape it. Training stages also write into a folder named
by their key (`<output_dir>/cache/sft-<key>`), so a rerun resumes from that folder's last
checkpoint, and the key is only offered to Prefect once the folder holds a finished
adapter. A deleted folder therefore means training again, never a cached path to nothing.

Retries. Failures that another attempt can fix (a tracking server restarting, a hub
timeout) are retried with exponential backoff; failures another attempt would only repeat
(bad data, an invalid recipe, hardware that cannot run it) are not.

Artifacts. Prefect artifacts (markdown, tables, links, progress) are published only inside
a flow or task run, so the plain functions stay callable from tests and notebooks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers
from prefect.context import FlowRunContext, TaskRunContext

from tasks.config import ConfigError, Recipe

logger = logging.getLogger(__name__)


# --- cache keys -------------------------------------------------------------------------------

def _digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _formatting_settings(recipe: Recipe) -> dict[str, Any]:
    return {"system_message": recipe.data.system_message, "image_longest_edge": recipe.data.image_longest_edge}


def validation_key(recipe: Recipe, fingerprints: dict[str, str]) -> str:
    """Data content + the checks' settings + what the token budget depends on (processor, limits)."""
    return "validate-" + _digest({
        "fingerprints": fingerprints,
        "validation": recipe.validation.model_dump(),
        "tokens": [recipe.model.name_or_path, recipe.model.revision, recipe.sft.max_length, recipe.dpo.max_length],
        **_formatting_settings(recipe),
    })


def format_key(recipe: Recipe, fingerprints: dict[str, str], quarantined: dict[str, list[str]]) -> str:
    return "format-" + _digest({"fingerprints": fingerprints, "quarantined": quarantined, **_formatting_settings(recipe)})


def sft_key(recipe: Recipe, fingerprints: dict[str, str], quarantined: dict[str, list[str]]) -> str:
    """Base model, SFT data (content and what was dropped), formatting, adapter and SFT settings."""
    roles = ("sft/train", "sft/validation")
    return "sft-" + _digest({
        "model": recipe.model.model_dump(),
        "quantization": recipe.quantization.model_dump(),
        "lora": recipe.lora.model_dump(),
        "sft": recipe.sft.model_dump(),
        "num_processes": recipe.resources.num_processes,
        "data": {role: fingerprints.get(role) for role in roles},
        "quarantined": {role: quarantined.get(role, []) for role in roles},
        **_formatting_settings(recipe),
    })


def dpo_key(recipe: Recipe, fingerprints: dict[str, str], quarantined: dict[str, list[str]]) -> str:
    """Everything the SFT adapter depends on, plus the preference data and DPO settings."""
    roles = ("preference/train", "preference/validation")
    return "dpo-" + _digest({
        "sft": sft_key(recipe, fingerprints, quarantined),
        "dpo": recipe.dpo.model_dump(),
        "data": {role: fingerprints.get(role) for role in roles},
        "quarantined": {role: quarantined.get(role, []) for role in roles},
    })


def stage_dir(recipe: Recipe, key: str) -> Path:
    """The folder a cached stage writes into: `<output_dir>/cache/<key>`."""
    return Path(recipe.output_dir) / "cache" / key


def finished(folder: Path) -> bool:
    """A stage folder whose work completed (the marker is written last)."""
    return (folder / "DONE").is_file()


def mark_finished(folder: Path) -> None:
    (folder / "DONE").write_text("")


def cache_key_when_finished(stage_key: Callable[[Recipe, dict[str, str], dict[str, list[str]]], str]):
    """A Prefect `cache_key_fn` for a stage that writes into `stage_dir(recipe, key)`.

    It offers the key only when that folder's work is complete; None means "do not cache
    this run", so a deleted or half-written folder is never served from Prefect's cache.
    """
    def cache_key(_context, parameters: dict[str, Any]) -> str | None:
        recipe = parameters["recipe"]
        key = stage_key(recipe, parameters["fingerprints"], parameters["quarantined"])
        return key if finished(stage_dir(recipe, key)) else None

    return cache_key


# --- retries ----------------------------------------------------------------------------------

def _deterministic_errors() -> tuple[type[BaseException], ...]:
    from tasks.data import DataSourceError
    from tasks.models import HardwareError
    from tasks.promotion import PromotionError
    from tasks.training import BatchSizeError
    from tasks.validation import DataValidationError

    return (DataValidationError, DataSourceError, ConfigError, HardwareError, PromotionError, BatchSizeError)


def retry_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry unless the failure is one a retry would only repeat."""
    try:
        state.result()
    except _deterministic_errors():
        return False
    except Exception:
        return True
    return True


# --- artifacts --------------------------------------------------------------------------------

def in_prefect_run() -> bool:
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-")[:100]


def publish_markdown(key: str, markdown: str, description: str) -> None:
    if in_prefect_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key=artifact_key(key), description=description)


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    if in_prefect_run():
        from prefect.artifacts import create_table_artifact

        create_table_artifact(table=rows, key=artifact_key(key), description=description)


def publish_link(key: str, link: str, text: str, description: str) -> None:
    if in_prefect_run():
        from prefect.artifacts import create_link_artifact

        create_link_artifact(link=link, link_text=text, key=artifact_key(key), description=description)


class TrainingProgress(transformers.TrainerCallback):
    """A Prefect progress artifact (0-100%) that follows the trainer's optimizer steps."""

    def __init__(self, stage: str, every_steps: int = 5):
        self.stage, self.every_steps, self.artifact_id = stage, every_steps, None

    def on_train_begin(self, args, state, control, **kwargs):
        if in_prefect_run() and state.is_world_process_zero:
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(
                progress=0.0, key=artifact_key(self.stage, "progress"), description=f"{self.stage} training progress"
            )

    def _update(self, state, force: bool = False) -> None:
        if self.artifact_id is None or not state.max_steps:
            return
        if force or state.global_step % self.every_steps == 0:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, progress=100.0 * state.global_step / state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self._update(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._update(state, force=True)
