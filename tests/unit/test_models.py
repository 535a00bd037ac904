"""Loading the base model as the recipe asks: unquantized, 8-bit or 4-bit through bitsandbytes."""

import bitsandbytes as bnb
import pytest
import torch

from tasks.config import ModelConfig, QuantizationConfig
from tasks.models import bitsandbytes_config, load_model, resolve_model_path


def test_builtin_resolves_to_the_built_folder(tiny_model_dir):
    assert resolve_model_path("builtin:tiny-smolvlm") == str(tiny_model_dir)
    assert resolve_model_path("HuggingFaceTB/SmolVLM-Instruct") == "HuggingFaceTB/SmolVLM-Instruct"
    with pytest.raises(ValueError, match="builtin:tiny-smolvlm"):
        resolve_model_path("builtin:nope")


def test_bitsandbytes_config_follows_the_recipe():
    assert bitsandbytes_config(QuantizationConfig(mode="none")) is None
    assert bitsandbytes_config(QuantizationConfig(mode="8bit")).load_in_8bit
    four = bitsandbytes_config(QuantizationConfig(mode="4bit", bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False))
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "fp4" and not four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize("mode, layer", [("4bit", bnb.nn.Linear4bit), ("8bit", bnb.nn.Linear8bitLt)])
def test_quantized_loading_replaces_linear_layers_and_shrinks_the_model(tiny_model_dir, mode, layer):
    full = load_model(ModelConfig(), QuantizationConfig(mode="none"))
    quantized = load_model(ModelConfig(), QuantizationConfig(mode=mode))
    assert any(isinstance(module, layer) for module in quantized.modules())
    assert quantized.get_memory_footprint() < full.get_memory_footprint()


def test_remote_code_stays_off_by_default():
    assert ModelConfig().trust_remote_code is False
