"""Training: SFT with a LoRA adapter (TRL SFTTrainer), then DPO on top of it (TRL DPOTrainer).

Both functions load the base model themselves and hand back a folder, never a live model,
so that Prefect tasks pass references between them.

- SFT trains on conversational prompt + completion samples with `completion_only_loss`, so
  the loss covers the answer tokens and the end-of-turn token only. TRL's own vision
  collator does the masking; none is written here.
- DPO loads the SFT adapter as the trainable policy and passes no `ref_model`: TRL then
  copies that adapter into a frozen "ref" adapter, so the reference policy is the SFT model
  (not the raw base, which is what a plain model plus `peft_config` would give).
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import peft
import torch
import trl

from tasks.config import Recipe
from tasks.models import load_model, load_processor

logger = logging.getLogger(__name__)


def lora_config(recipe: Recipe) -> peft.LoraConfig:
    """PEFT LoraConfig from the recipe's `lora` section."""
    return peft.LoraConfig(task_type="CAUSAL_LM", **recipe.lora.model_dump())


def sft_arguments(recipe: Recipe, output_dir: Path, report_to: list[str]) -> trl.SFTConfig:
    return trl.SFTConfig(
        output_dir=str(output_dir),
        completion_only_loss=True,
        # Checkpoints arrive with resumable training; the adapter is saved explicitly at the end.
        save_strategy="no",
        report_to=report_to,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        # The recipe's trainer sections hold TrainingArguments names only: they pass through as they are.
        **recipe.sft.model_dump(),
    )


def dpo_arguments(recipe: Recipe, output_dir: Path, report_to: list[str]) -> trl.DPOConfig:
    return trl.DPOConfig(
        output_dir=str(output_dir),
        save_strategy="no",
        report_to=report_to,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        **recipe.dpo.model_dump(),
    )


def _prepare_for_kbit(model, recipe: Recipe):
    if recipe.quantization.mode == "none":
        return model
    return peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=recipe.sft.gradient_checkpointing
    )


def build_sft_trainer(recipe: Recipe, train_path: Path, output_dir: Path, report_to: list[str]) -> trl.SFTTrainer:
    """An SFTTrainer on the quantized base with a fresh LoRA adapter and TRL's vision collator."""
    model = _prepare_for_kbit(load_model(recipe.model, recipe.quantization), recipe)
    return trl.SFTTrainer(
        model=model,
        args=sft_arguments(recipe, output_dir / "trainer", report_to),
        train_dataset=datasets.load_from_disk(str(train_path)),
        processing_class=load_processor(recipe.model),
        peft_config=lora_config(recipe),
    )


def train_sft(recipe: Recipe, train_path: Path, output_dir: Path, report_to: list[str] | None = None) -> Path:
    """Train a LoRA adapter with SFT on the formatted dataset at `train_path`.

    Returns the adapter folder (adapter_config.json, adapter_model.safetensors, processor).
    """
    trainer = build_sft_trainer(recipe, train_path, output_dir, report_to or ["none"])
    result = trainer.train()
    adapter_dir = output_dir / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))
    trainer.processing_class.save_pretrained(str(adapter_dir))
    logger.info("SFT done: %d steps, train loss %.4f -> %s", result.global_step, result.training_loss, adapter_dir)
    return adapter_dir


def build_dpo_trainer(
    recipe: Recipe, sft_adapter_dir: Path, preference_path: Path, output_dir: Path, report_to: list[str]
) -> trl.DPOTrainer:
    """A DPOTrainer whose policy starts as the SFT adapter and whose reference is a frozen copy of it.

    No `ref_model` is passed on purpose: given a PEFT model, TRL copies its adapter into a
    frozen "ref" adapter, which makes the SFT policy the reference.
    """
    base = _prepare_for_kbit(load_model(recipe.model, recipe.quantization), recipe)
    policy = peft.PeftModel.from_pretrained(base, str(sft_adapter_dir), is_trainable=True)
    return trl.DPOTrainer(
        model=policy,
        ref_model=None,
        args=dpo_arguments(recipe, output_dir / "trainer", report_to),
        train_dataset=datasets.load_from_disk(str(preference_path)),
        processing_class=load_processor(recipe.model),
    )


def train_dpo(
    recipe: Recipe,
    sft_adapter_dir: Path,
    preference_path: Path,
    output_dir: Path,
    report_to: list[str] | None = None,
) -> Path:
    """Continue the SFT adapter with DPO on the formatted preference pairs at `preference_path`.

    Returns the DPO adapter folder.
    """
    trainer = build_dpo_trainer(recipe, sft_adapter_dir, preference_path, output_dir, report_to or ["none"])
    result = trainer.train()
    adapter_dir = output_dir / "adapter"
    # Only the trained policy: the frozen "ref" copy is the SFT adapter, already saved.
    trainer.model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    trainer.processing_class.save_pretrained(str(adapter_dir))
    logger.info("DPO done: %d steps, train loss %.4f -> %s", result.global_step, result.training_loss, adapter_dir)
    return adapter_dir
