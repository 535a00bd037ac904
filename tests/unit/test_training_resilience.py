"""Training that survives what real runs meet: out-of-memory, a killed process, a plateau.

All of it is real TRL training on the tiny model (4-bit QLoRA, a few steps); only the
out-of-memory error is injected, since a CPU has no memory limit to hit.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import transformers
from safetensors.torch import load_file

from tasks.config import recipe_from_dict
from tasks.data import CHARTQA_SYNTH, load_sft_rows
from tasks.formatting import save_sft_dataset
from tasks.training import BatchSizeError, build_sft_trainer, smaller_batch, train_sft

SYSTEM = "Answer with a single word or number."
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    return save_sft_dataset(load_sft_rows(CHARTQA_SYNTH, "train", 32), SYSTEM, tmp_path_factory.mktemp("sft") / "data")


@pytest.fixture(scope="module")
def validation_data(tmp_path_factory) -> Path:
    rows = load_sft_rows(CHARTQA_SYNTH, "validation", 8)
    return save_sft_dataset(rows, SYSTEM, tmp_path_factory.mktemp("sft-validation") / "data")


def _recipe(data: dict | None = None, **sft):
    return recipe_from_dict({
        "data": data or {},
        "quantization": {"mode": "4bit"},
        "sft": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, **sft},
    })


@pytest.mark.parametrize("start, expected", [
    ((8, 1), (4, 2)), ((4, 2), (2, 4)), ((2, 4), (1, 8)), ((1, 8), None),
    ((6, 1), (3, 2)), ((3, 2), (2, 3)), ((2, 3), (1, 6)),
])
def test_smaller_batch_halves_the_per_device_batch_and_keeps_the_product(start, expected):
    assert smaller_batch(*start, minimum=1) == expected
    if expected:
        assert expected[0] * expected[1] == start[0] * start[1]


def test_smaller_batch_stops_at_the_minimum():
    assert smaller_batch(8, 1, minimum=4) == (4, 2)
    assert smaller_batch(4, 2, minimum=4) is None


@pytest.fixture
def memory_limit(monkeypatch):
    """Out of memory whenever a training step sees more than 2 samples, like a GPU at its limit."""
    real_step = transformers.Trainer.training_step
    attempts: list[int] = []

    def limited_step(self, model, inputs, *args, **kwargs):
        batch = inputs["input_ids"].shape[0]
        attempts.append(batch)
        if batch > 2:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at batch {batch})")
        return real_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", limited_step)
    return attempts


def test_out_of_memory_halves_the_batch_and_keeps_the_effective_batch(
    tiny_model_dir, sft_data, tmp_path, memory_limit, caplog
):
    recipe = _recipe(per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="tasks.training"):
        adapter = train_sft(recipe, sft_data, tmp_path / "sft")

    summary = json.loads((tmp_path / "sft" / "training_summary.json").read_text())
    assert (summary["per_device_train_batch_size"], summary["gradient_accumulation_steps"]) == (2, 4)
    assert summary["global_step"] == 2
    # two steps down, each logged with both batch shapes and the kept effective batch
    messages = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(messages) == 2
    assert "batch 8 x accumulation 1; retrying at 4 x 2 (effective batch 8" in messages[0]
    assert "batch 4 x accumulation 2; retrying at 2 x 4 (effective batch 8" in messages[1]
    assert memory_limit[0] == 8 and set(memory_limit[-8:]) == {2}  # 2 steps x 4 micro-batches of 2
    assert (adapter / "adapter_model.safetensors").is_file()


def test_out_of_memory_at_the_minimum_batch_says_what_to_change(tiny_model_dir, sft_data, tmp_path, memory_limit):
    recipe = _recipe(per_device_train_batch_size=8, max_steps=1)
    recipe.resources.min_per_device_train_batch_size = 4
    with pytest.raises(BatchSizeError, match="min_per_device_train_batch_size=4.*gradient_checkpointing"):
        train_sft(recipe, sft_data, tmp_path / "sft")


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import transformers
    from tasks.config import Recipe
    from tasks.training import train_sft

    recipe_json, data, out, kill_at = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])

    class KillAfterCheckpoint(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final save: like a preempted node

    train_sft(Recipe.model_validate_json(recipe_json), data, out, callbacks=[KillAfterCheckpoint()])
""")


class CountSteps(transformers.TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_model_dir, sft_data, tmp_path):
    recipe = _recipe(max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=3)
    out = tmp_path / "sft"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, recipe.model_dump_json(), str(sft_data), str(out), "4"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = sorted(p.name for p in (out / "trainer").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "adapter").exists()

    counter = CountSteps()
    adapter = train_sft(recipe, sft_data, out, callbacks=[counter])

    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-4")
    assert summary["global_step"] == 6  # the same number of optimizer steps as an uninterrupted run
    assert counter.steps == 2  # only the steps the killed run had not checkpointed
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in weights.items())


@pytest.mark.parametrize("optim, paged", [("adamw_bnb_8bit", False), ("paged_adamw_8bit", True)])
def test_bitsandbytes_optimizers_train_on_cpu(tiny_model_dir, sft_data, tmp_path, optim, paged):
    """bitsandbytes 0.50 runs its 8-bit and paged optimizers on CPU (paging is a no-op there)."""
    trainer = build_sft_trainer(_recipe(optim=optim, max_steps=2), sft_data, tmp_path, ["none"])
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # inside accelerate's wrapper
    assert isinstance(optimizer, bnb.optim.optimizer.Optimizer8bit), type(optimizer)
    assert optimizer.is_paged == paged
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert any(p.abs().sum() > 0 for p in lora_b), "the optimizer never moved the adapter"
    states = trainer.optimizer.optimizer.state.values()
    assert any(state["state1"].dtype == torch.uint8 for state in states), "optimizer states are not 8-bit"


def test_training_stops_early_when_the_validation_loss_stops_improving(
    tiny_model_dir, sft_data, validation_data, tmp_path
):
    # A learning rate too small to change a bf16 forward pass: the validation loss cannot improve.
    recipe = _recipe(
        data={"validation_split": "validation"},
        learning_rate=1e-12, max_steps=20, eval_strategy="steps", eval_steps=1,
        save_strategy="steps", save_steps=1, early_stopping_patience=2,
    )
    train_sft(recipe, sft_data, tmp_path / "sft", eval_path=validation_data)
    summary = json.loads((tmp_path / "sft" / "training_summary.json").read_text())
    # best at the first evaluation, then two without improvement: stopped at step 3 of 20
    assert summary["global_step"] == 3
