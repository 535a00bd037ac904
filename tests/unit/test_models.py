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


# --- refusing, before anything loads, a recipe this machine cannot run -------------------

from tasks.config import recipe_from_dict  # noqa: E402
from tasks.models import Hardware, HardwareError, check_hardware, hardware_problems  # noqa: E402

CPU = Hardware(cuda_devices=0, bf16_on_gpu=False, flash_attn_installed=False, free_memory_bytes=16 * 2**30)
OLD_GPU = Hardware(cuda_devices=1, bf16_on_gpu=False, flash_attn_installed=False, free_memory_bytes=15 * 2**30)
BIG_GPU = Hardware(cuda_devices=2, bf16_on_gpu=True, flash_attn_installed=True, free_memory_bytes=80 * 2**30)


def test_the_demo_and_the_real_recipes_pass_where_they_are_meant_to_run():
    from pathlib import Path

    from tasks.config import load_recipe

    configs = Path(__file__).resolve().parents[2] / "configs"
    assert hardware_problems(load_recipe(configs / "demo.yaml"), CPU) == []
    for real in ("smolvlm-chartqa.yaml", "qwen2vl-chartqa.yaml"):
        assert hardware_problems(load_recipe(configs / real), BIG_GPU) == []


@pytest.mark.parametrize("settings, hardware, expected", [
    ({"sft": {"fp16": True}}, CPU, "sft.fp16 mixed precision needs a GPU"),
    ({"dpo": {"bf16": True}}, OLD_GPU, "dpo.bf16: this GPU has no bf16; set dpo.bf16: false and dpo.fp16: true"),
    ({"model": {"dtype": "bfloat16"}}, OLD_GPU, "model.dtype: this GPU has no bf16"),
    ({"quantization": {"mode": "4bit"}}, OLD_GPU, "quantization.bnb_4bit_compute_dtype: this GPU has no bf16"),
    ({"model": {"attn_implementation": "flash_attention_2"}}, CPU, "flash_attention_2 needs a CUDA GPU"),
    ({"model": {"attn_implementation": "flash_attention_2"}}, OLD_GPU, "pip install flash-attn"),
    ({"resources": {"num_processes": 4}}, BIG_GPU, "num_processes is 4 but this machine has 2 GPU(s)"),
])
def test_hardware_problems_name_the_field_and_the_fix(settings, hardware, expected):
    problems = hardware_problems(recipe_from_dict(settings), hardware)
    assert any(expected in problem for problem in problems), problems


def test_cpu_runs_bf16_and_several_processes():
    recipe = recipe_from_dict({"sft": {"bf16": True}, "resources": {"num_processes": 2}, "quantization": {"mode": "4bit"}})
    assert hardware_problems(recipe, CPU) == []


def test_weights_that_do_not_fit_are_refused_before_loading():
    with pytest.raises(HardwareError, match=r"about 20.0 GiB in quantization none but only 15.0 GiB of GPU memory"):
        check_hardware(recipe_from_dict({}), OLD_GPU, estimated_weight_bytes=20 * 2**30)
    check_hardware(recipe_from_dict({}), OLD_GPU, estimated_weight_bytes=10 * 2**30)  # fits: no error
