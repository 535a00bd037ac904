"""Training: SFT with a LoRA adapter (TRL SFTTrainer), then DPO on top of it (TRL DPOTrainer).

Both functions load the base model themselves and hand back a folder, never a live model,
so that Prefect tasks (and torchrun workers, tasks/distributed.py) pass references.

- SFT trains on conversational prompt + completion samples with `completion_only_loss`, so
  the loss covers the answer tokens and the end-of-turn token only. TRL's own vision
  collator does the masking; none is written here.
- DPO loads the SFT adapter as the trainable policy and passes no `ref_model`: TRL then
  copies that adapter into a frozen "ref" adapter, so the reference policy is the SFT model
  (not the raw base, which is what a plain model plus `peft_config` would give).
- Checkpoints (`save_strategy: steps`) go to `<output_dir>/trainer/checkpoint-N`; training
  in the same output folder resumes from the last one, so a killed run loses at most
  `save_steps` steps and ends with the same number of optimizer steps.
- Out of memory: the per-device batch is halved and gradient accumulation doubled, keeping
  the effective batch (see `train_with_batch_backoff`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import peft
import torch
import transformers
import trl
from transformers.trainer_utils import get_last_checkpoint

from tasks.config import Recipe, TrainerConfig
from tasks.models import load_model, load_processor

logger = logging.getLogger(__name__)

# Recipe fields that are ours, not TrainingArguments': handled here, never passed through.
OWN_TRAINER_FIELDS = {"early_stopping_patience"}


class BatchSizeError(RuntimeError):
    """Out of memory even at the smallest per-device batch the recipe allows."""


def lora_config(recipe: Recipe, model=None) -> peft.LoraConfig:
    """PEFT LoraConfig from the recipe's `lora` section.

    With `language_model_only`, every module outside the model's language model (vision
    tower, connector / projector) is excluded by PEFT's `exclude_modules`, so they get no
    adapter and stay frozen. The language model is found with `get_decoder()`, which every
    transformers image-text-to-text model has, so no family's module names are hard-coded.
    """
    settings = recipe.lora.model_dump(exclude={"language_model_only"})
    if recipe.lora.language_model_only:
        if model is None:
            raise ValueError("lora.language_model_only needs the loaded model to find its language model")
        decoder = model.get_decoder()
        prefix = next(name for name, module in model.named_modules() if module is decoder)
        settings["exclude_modules"] = rf"(?!{re.escape(prefix)}\.).*"
    return peft.LoraConfig(task_type="CAUSAL_LM", **settings)


def _trainer_arguments(stage: TrainerConfig, early_stopping: bool) -> dict:
    """TrainingArguments shared by SFT and DPO: the recipe's fields plus what this project fixes."""
    on_gpu = torch.cuda.is_available()
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    arguments = dict(
        use_cpu=not on_gpu,
        # Under torchrun on CPU the process group needs gloo; on GPUs the Trainer picks NCCL.
        # A single process must not name a backend: the Trainer would expect a process group.
        ddp_backend="gloo" if under_torchrun and not on_gpu else None,
        dataloader_num_workers=0,
        # The recipe's trainer sections hold TrainingArguments names only: they pass through as they are.
        **stage.model_dump(exclude=OWN_TRAINER_FIELDS | {"warmup_ratio"}),
    )
    if stage.warmup_ratio is not None:
        # transformers 5 folds warmup_ratio into warmup_steps (a float below 1 is a ratio).
        arguments["warmup_steps"] = stage.warmup_ratio
    if early_stopping:
        arguments.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    return arguments


def sft_arguments(recipe: Recipe, output_dir: Path, report_to: list[str]) -> trl.SFTConfig:
    return trl.SFTConfig(
        output_dir=str(output_dir),
        completion_only_loss=True,
        report_to=report_to,
        **_trainer_arguments(recipe.sft, recipe.sft.early_stopping_patience is not None),
    )


def dpo_arguments(recipe: Recipe, output_dir: Path, report_to: list[str]) -> trl.DPOConfig:
    return trl.DPOConfig(
        output_dir=str(output_dir),
        report_to=report_to,
        **_trainer_arguments(recipe.dpo, recipe.dpo.early_stopping_patience is not None),
    )


def _callbacks(stage: TrainerConfig, extra: list | None) -> list:
    callbacks = list(extra or [])
    if stage.early_stopping_patience is not None:
        callbacks.append(transformers.EarlyStoppingCallback(early_stopping_patience=stage.early_stopping_patience))
    return callbacks


def _prepare_for_kbit(model, recipe: Recipe, stage: TrainerConfig):
    if recipe.quantization.mode == "none":
        return model
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=stage.gradient_checkpointing)


def _load_dataset(path: Path | None):
    return None if path is None else datasets.load_from_disk(str(path))


def build_sft_trainer(
    recipe: Recipe, train_path: Path, output_dir: Path, report_to: list[str],
    eval_path: Path | None = None, callbacks: list | None = None,
) -> trl.SFTTrainer:
    """An SFTTrainer on the quantized base with a fresh LoRA adapter and TRL's vision collator."""
    model = _prepare_for_kbit(load_model(recipe.model, recipe.quantization), recipe, recipe.sft)
    return trl.SFTTrainer(
        model=model,
        args=sft_arguments(recipe, output_dir / "trainer", report_to),
        train_dataset=_load_dataset(train_path),
        eval_dataset=_load_dataset(eval_path),
        processing_class=load_processor(recipe.model),
        peft_config=lora_config(recipe, model),
        callbacks=_callbacks(recipe.sft, callbacks),
    )


def build_dpo_trainer(
    recipe: Recipe, sft_adapter_dir: Path, preference_path: Path, output_dir: Path, report_to: list[str],
    eval_path: Path | None = None, callbacks: list | None = None,
) -> trl.DPOTrainer:
    """A DPOTrainer whose policy starts as the SFT adapter and whose reference is a frozen copy of it.

    No `ref_model` is passed on purpose: given a PEFT model, TRL copies its adapter into a
    frozen "ref" adapter, which makes the SFT policy the reference.
    """
    base = _prepare_for_kbit(load_model(recipe.model, recipe.quantization), recipe, recipe.dpo)
    policy = peft.PeftModel.from_pretrained(base, str(sft_adapter_dir), is_trainable=True)
    return trl.DPOTrainer(
        model=policy,
        ref_model=None,
        args=dpo_arguments(recipe, output_dir / "trainer", report_to),
        train_dataset=_load_dataset(preference_path),
        eval_dataset=_load_dataset(eval_path),
        processing_class=load_processor(recipe.model),
        callbacks=_callbacks(recipe.dpo, callbacks),
    )


def smaller_batch(per_device: int, accumulation: int, minimum: int) -> tuple[int, int] | None:
    """The next (per-device batch, accumulation) with the same product, per-device about halved.

    8 x 2 -> 4 x 4 -> 2 x 8 -> 1 x 16. An odd size steps to the largest divisor of the
    effective batch at or below half of it, rounded up (6 x 1 -> 3 x 2 -> 2 x 3 -> 1 x 6).
    None when the per-device batch cannot go below `minimum`.
    """
    effective = per_device * accumulation
    for candidate in range((per_device + 1) // 2, 0, -1):
        if minimum <= candidate < per_device and effective % candidate == 0:
            return candidate, effective // candidate
    return None


@dataclass
class TrainingOutcome:
    trainer: transformers.Trainer
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    resumed_from: str | None


def train_with_batch_backoff(
    build_trainer: Callable[[TrainerConfig], transformers.Trainer], stage: TrainerConfig, min_batch: int
) -> TrainingOutcome:
    """Train; on out-of-memory halve the per-device batch, double accumulation, and start again.

    Written by hand: transformers' `auto_find_batch_size` halves the batch too, but leaves
    gradient accumulation alone, so the effective batch (and with it the learning dynamics
    the recipe was tuned for) silently shrinks. Each retry rebuilds the trainer (the model
    is reloaded, memory freed first) and resumes from the last checkpoint if there is one.
    Under torchrun an OOM on one rank cannot be retried alone; it fails the launch.

    Raises BatchSizeError when even `min_batch` runs out of memory.
    """
    while True:
        trainer = build_trainer(stage)
        checkpoint = get_last_checkpoint(trainer.args.output_dir) if Path(trainer.args.output_dir).is_dir() else None
        if checkpoint:
            logger.info("resuming from %s", checkpoint)
        try:
            trainer.train(resume_from_checkpoint=checkpoint)
            return TrainingOutcome(
                trainer, stage.per_device_train_batch_size, stage.gradient_accumulation_steps, checkpoint
            )
        except torch.OutOfMemoryError as error:
            smaller = smaller_batch(stage.per_device_train_batch_size, stage.gradient_accumulation_steps, min_batch)
            if smaller is None:
                raise BatchSizeError(
                    f"out of memory at per-device batch {stage.per_device_train_batch_size} (the minimum, "
                    f"resources.min_per_device_train_batch_size={min_batch}); lower sft/dpo max_length or "
                    "image_longest_edge, use 4-bit quantization or gradient_checkpointing"
                ) from error
            logger.warning(
                "out of memory at per-device batch %d x accumulation %d; retrying at %d x %d "
                "(effective batch %d per process kept)",
                stage.per_device_train_batch_size, stage.gradient_accumulation_steps, *smaller,
                stage.per_device_train_batch_size * stage.gradient_accumulation_steps,
            )
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            stage = stage.model_copy(
                update={"per_device_train_batch_size": smaller[0], "gradient_accumulation_steps": smaller[1]}
            )


def adapter_digest(model) -> str:
    """sha256 over the trainable (adapter) parameters, in name order: equal on all DDP ranks."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _finish(outcome: TrainingOutcome, output_dir: Path, stage_name: str, selected_adapters: list[str] | None) -> Path:
    """Save the adapter (main process only) and the training summary; every rank records its digest."""
    trainer = outcome.trainer
    model = trainer.model
    adapter_dir = output_dir / "adapter"
    world_size = trainer.args.world_size
    if world_size > 1:
        ranks = output_dir / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        rank = trainer.args.process_index
        (ranks / f"rank-{rank}.json").write_text(json.dumps({
            "rank": rank, "world_size": world_size, "global_step": trainer.state.global_step,
            "adapter_sha256": adapter_digest(model),
        }))
    if trainer.is_world_process_zero():
        model.save_pretrained(str(adapter_dir), selected_adapters=selected_adapters)
        trainer.processing_class.save_pretrained(str(adapter_dir))
        trainable, total = model.get_nb_trainable_parameters()
        summary = {
            "global_step": trainer.state.global_step,
            "train_loss": next((e["train_loss"] for e in reversed(trainer.state.log_history) if "train_loss" in e), None),
            "trainable_params": trainable,
            "total_params": total,
            "memory_footprint_bytes": model.get_memory_footprint(),
            "per_device_train_batch_size": outcome.per_device_train_batch_size,
            "gradient_accumulation_steps": outcome.gradient_accumulation_steps,
            "world_size": world_size,
            "resumed_from": outcome.resumed_from,
            # the settings as the libraries resolved them (defaults filled in), for the stage's MLflow run
            "peft_config": _jsonable(model.peft_config["default"].to_dict()),
            "quantization_config": _jsonable(quantization.to_dict()) if (
                quantization := getattr(model.config, "quantization_config", None)) is not None else None,
        }
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=1))
        logger.info(
            "%s done: %d steps, %d of %d parameters trainable (%.2f%%) -> %s",
            stage_name, summary["global_step"], trainable, total, 100 * trainable / total, adapter_dir,
        )
    return adapter_dir


def _jsonable(settings: dict) -> dict:
    """Library settings as JSON values: sets become sorted lists, dtypes and enums their names."""
    def convert(value):
        if isinstance(value, (set, frozenset)):
            return sorted(str(v) for v in value)
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {str(k): convert(v) for k, v in value.items()}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return str(value)

    return convert(settings)


def train_sft(
    recipe: Recipe, train_path: Path, output_dir: Path, report_to: list[str] | None = None,
    eval_path: Path | None = None, callbacks: list | None = None,
) -> Path:
    """Train a LoRA adapter with SFT on the formatted dataset at `train_path`.

    Returns the adapter folder (adapter_config.json, adapter_model.safetensors, processor);
    `output_dir/training_summary.json` holds steps, parameter counts and the batch used.
    Raises BatchSizeError when even the smallest batch runs out of memory.
    """
    def build(stage: TrainerConfig) -> trl.SFTTrainer:
        staged = recipe.model_copy(update={"sft": stage})
        return build_sft_trainer(staged, train_path, output_dir, report_to or ["none"], eval_path, callbacks)

    outcome = train_with_batch_backoff(build, recipe.sft, recipe.resources.min_per_device_train_batch_size)
    return _finish(outcome, output_dir, "SFT", selected_adapters=None)


def train_dpo(
    recipe: Recipe, sft_adapter_dir: Path, preference_path: Path, output_dir: Path,
    report_to: list[str] | None = None, eval_path: Path | None = None, callbacks: list | None = None,
) -> Path:
    """Continue the SFT adapter with DPO on the formatted preference pairs at `preference_path`.

    Returns the DPO adapter folder (the trained policy only: the frozen "ref" copy is the
    SFT adapter, already saved).
    """
    def build(stage: TrainerConfig) -> trl.DPOTrainer:
        staged = recipe.model_copy(update={"dpo": stage})
        return build_dpo_trainer(
            staged, sft_adapter_dir, preference_path, output_dir, report_to or ["none"], eval_path, callbacks
        )

    outcome = train_with_batch_backoff(build, recipe.dpo, recipe.resources.min_per_device_train_batch_size)
    return _finish(outcome, output_dir, "DPO", selected_adapters=["default"])
