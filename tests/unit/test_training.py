"""SFT then DPO on the tiny model: real TRL training, a few steps each."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.config import recipe_from_dict
from tasks.data import CHART_PREFS_SYNTH, CHARTQA_SYNTH, load_preference_rows, load_sft_rows
from tasks.formatting import save_preference_dataset, save_sft_dataset
from tasks.training import build_dpo_trainer, train_dpo, train_sft

SYSTEM = "Answer with a single word or number."


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("training")
    recipe = recipe_from_dict({
        "quantization": {"mode": "4bit"},
        "sft": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1},
        "dpo": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1},
    })
    sft_data = save_sft_dataset(load_sft_rows(CHARTQA_SYNTH, "train", 16), SYSTEM, tmp / "sft")
    pref_data = save_preference_dataset(load_preference_rows(CHART_PREFS_SYNTH, "train", 8), SYSTEM, tmp / "pref")
    sft_adapter = train_sft(recipe, sft_data, tmp / "sft_out")
    return recipe, sft_adapter, pref_data, tmp


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_sft_saves_a_lora_adapter_and_processor(trained):
    _recipe, sft_adapter, _pref, _tmp = trained
    assert (sft_adapter / "adapter_config.json").is_file()
    weights = _adapter_weights(sft_adapter)
    assert any("lora_B" in name for name in weights)
    # LoRA B starts at zero: a non-zero B proves the optimizer stepped.
    assert any(tensor.abs().sum() > 0 for name, tensor in weights.items() if "lora_B" in name)
    assert (sft_adapter / "processor_config.json").is_file()


def test_dpo_reference_is_the_frozen_sft_adapter(trained):
    recipe, sft_adapter, pref_data, tmp = trained
    trainer = build_dpo_trainer(recipe, sft_adapter, pref_data, tmp / "dpo_probe", ["none"])
    model = trainer.model
    assert set(model.peft_config) == {"default", "ref"}
    sft_weights = _adapter_weights(sft_adapter)
    compared = 0
    for name, param in model.named_parameters():
        if ".ref." in name:
            assert not param.requires_grad, f"reference adapter weight {name} is trainable"
            saved = name.replace(".ref.", ".")  # the file stores adapter weights without the adapter name
            if saved in sft_weights:
                assert torch.allclose(param.detach().float().cpu(), sft_weights[saved].float()), name
                compared += 1
    assert compared > 0, "no reference weight could be matched to the SFT adapter"


def test_dpo_moves_the_policy_away_from_the_sft_adapter(trained):
    recipe, sft_adapter, pref_data, tmp = trained
    dpo_adapter = train_dpo(recipe, sft_adapter, pref_data, tmp / "dpo_out")
    before, after = _adapter_weights(sft_adapter), _adapter_weights(dpo_adapter)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not (dpo_adapter / "ref").exists()


@pytest.mark.parametrize("lora, sft", [
    ({"use_dora": True, "init_lora_weights": "gaussian"}, {}),  # the SmolVLM recipe's adapter
    ({}, {"gradient_checkpointing": True}),
])
def test_dora_and_gradient_checkpointing_train_on_the_4bit_base(tiny_model_dir, tmp_path, lora, sft):
    recipe = recipe_from_dict({
        "quantization": {"mode": "4bit"},
        "lora": lora,
        "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, **sft},
    })
    data = save_sft_dataset(load_sft_rows(CHARTQA_SYNTH, "train", 8), SYSTEM, tmp_path / "sft")
    adapter = train_sft(recipe, data, tmp_path / "out")
    weights = _adapter_weights(adapter)
    if lora.get("use_dora"):
        assert any("lora_magnitude_vector" in name for name in weights), "no DoRA magnitude vectors saved"
    assert any(t.abs().sum() > 0 for n, t in weights.items() if "lora_B" in n)
