"""Weight memory estimated from the config alone, checked against really loaded models.

Each model is loaded the project's way (`tasks.models.load_model`) in every mode, and the
estimate must match to the byte: `footprint_bytes` against `get_memory_footprint()` and the
quantization statistics against what bitsandbytes holds. Models: the offline tiny SmolVLM,
a random Idefics3 with tied embeddings and sizes that are no multiple of bitsandbytes'
blocks, a random BLIP-2 (modules kept in float32), and the tiny LLaVA / Qwen2-VL of
tests/tiny_families.py (other quantizer paths: CLIP, Qwen2-VL's vision merger).
"""

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, Idefics3Config, Idefics3ForConditionalGeneration

import tiny_families  # in tests/, which pytest puts on sys.path for tests/conftest.py
from tasks.config import ModelConfig, QuantizationConfig
from tasks.memory import (
    WeightMemoryEstimate,
    estimate_weight_memory,
    format_bytes,
    load_model_config,
    measure_quant_state_bytes,
    smolvlm_instruct_config,
)
from tasks.models import load_model

# (dtype, mode, double quant)
CASES = [
    ("float32", "none", True),
    ("bfloat16", "none", True),
    ("bfloat16", "8bit", True),
    ("bfloat16", "4bit", True),
    ("bfloat16", "4bit", False),
    ("float32", "4bit", True),
    ("float16", "none", True),
    ("float16", "8bit", True),
    ("float16", "4bit", True),
]


@pytest.fixture(scope="module")
def random_idefics3_dir(tmp_path_factory) -> Path:
    """A random Idefics3 (~1.4M parameters, 2.8 MB in bf16), tied embeddings, odd widths."""
    torch.manual_seed(0)
    config = Idefics3Config(
        text_config={
            "model_type": "llama",
            "hidden_size": 96,
            "intermediate_size": 200,  # 96 x 200 = 19,200 weights: 300 blocks of 64, 2 nested blocks
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1003,
            "tie_word_embeddings": True,
        },
        vision_config={
            "hidden_size": 72,
            "intermediate_size": 150,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 48,
            "patch_size": 8,
        },
        scale_factor=2,
        tie_word_embeddings=True,
    )
    model = Idefics3ForConditionalGeneration(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("random-idefics3")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def random_blip2_dir(tmp_path_factory) -> Path:
    """A random BLIP-2: its `_keep_in_fp32_modules` (Q-Former) stay float32 under float16 and unquantized."""
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "encoder_hidden_size": 32, "vocab_size": 100},
        text_config={"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 100, "word_embed_proj_dim": 32},
        num_query_tokens=4,
    )
    path = tmp_path_factory.mktemp("random-blip2")
    Blip2ForConditionalGeneration(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, random_idefics3_dir, random_blip2_dir, tmp_path_factory) -> dict[str, Path]:
    dirs = {"tiny-smolvlm": tiny_model_dir, "random-idefics3": random_idefics3_dir, "random-blip2": random_blip2_dir}
    for family in tiny_families.FAMILIES:
        dirs[family] = tiny_families.build_family(family, tmp_path_factory.mktemp(family))
    return dirs


def _load(path: Path, dtype: str, mode: str, double_quant: bool):
    return load_model(
        ModelConfig(name_or_path=str(path), dtype=dtype),
        QuantizationConfig(mode=mode, bnb_4bit_use_double_quant=double_quant),
    )


def _quantized_params(model) -> int:
    """Parameters in the layers bitsandbytes replaced (a 4-bit weight's own numel is the packed one)."""
    layers = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, layers))


@pytest.mark.parametrize("name", ["tiny-smolvlm", "random-idefics3", "random-blip2", *tiny_families.FAMILIES])
@pytest.mark.parametrize("dtype, mode, double_quant", CASES)
def test_estimate_matches_the_loaded_model(model_dirs, name, dtype, mode, double_quant):
    path = model_dirs[name]
    estimate = estimate_weight_memory(
        load_model_config(str(path)), dtype, mode, bnb_4bit_use_double_quant=double_quant
    )
    model = _load(path, dtype, mode, double_quant)

    footprint = model.get_memory_footprint()
    quant_state = measure_quant_state_bytes(model)
    # To the byte, not just within 5%: the skeleton is the loaded model's, layer for layer.
    assert estimate.footprint_bytes == footprint
    assert estimate.quant_state_bytes == quant_state
    assert estimate.total_bytes == footprint + quant_state
    assert estimate.quantized_params == _quantized_params(model)
    assert estimate.params == sum(
        m.in_features * m.out_features if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) else 0
        for m in model.modules()
    ) + sum(p.numel() for n, p in model.named_parameters() if not _is_quantized_weight(model, n))
    # The statistics are what get_memory_footprint leaves out. At toy size they are not small
    # (each 4-bit layer carries ~1.1 KiB of code books: up to 15% of these models); at
    # SmolVLM's size they are ~3% of the 4-bit weights (bench/model_memory.py).
    if mode == "none":
        assert estimate.quantized_params == 0 and estimate.quant_state_bytes == 0
    else:
        assert estimate.quantized_params > 0 and estimate.quant_state_bytes > 0


def _is_quantized_weight(model, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    return leaf == "weight" and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


@pytest.mark.parametrize("name", ["tiny-smolvlm", "random-idefics3"])
def test_four_bit_is_smaller_than_eight_bit_smaller_than_bf16(model_dirs, name):
    config = load_model_config(str(model_dirs[name]))
    bf16, eight, four, four_plain = (
        estimate_weight_memory(config, "bfloat16", mode, bnb_4bit_use_double_quant=dq).total_bytes
        for mode, dq in [("none", True), ("8bit", True), ("4bit", True), ("4bit", False)]
    )
    assert four < eight < bf16 and four_plain < eight
    # At toy size double quantization costs more than it saves: its second-level code book
    # (1 KiB a layer) outweighs 3 bytes saved a block of 64 below ~350 blocks a layer.


def test_full_size_smolvlm_estimate():
    """SmolVLM-Instruct at full depth, meta device only: where the 0.35-of-bf16 aim stands."""
    config = smolvlm_instruct_config()
    bf16, four, four_plain = (
        estimate_weight_memory(config, "bfloat16", mode, bnb_4bit_use_double_quant=dq)
        for mode, dq in [("none", True), ("4bit", True), ("4bit", False)]
    )
    assert bf16.params == four.params == 2_246_272_880
    embeddings = 2 * 49155 * 2048  # embed_tokens + untied lm_head stay bf16
    # + SigLIP's patch and position embeddings (1.5M), norms and the quantized layers' biases
    assert embeddings < four.other_params < embeddings + 2_100_000
    assert four.total_bytes / bf16.total_bytes < 0.35
    assert four.total_bytes < four_plain.total_bytes


def test_embeddings_lm_head_and_convolutions_stay_unquantized(tiny_model_dir):
    """transformers' choice, which the estimate follows: every nn.Linear except lm_head."""
    config = load_model_config(str(tiny_model_dir))
    estimate = estimate_weight_memory(config, "bfloat16", "4bit")
    model = _load(tiny_model_dir, "bfloat16", "4bit", True)
    plain_linear = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain_linear == ["lm_head"]
    text = config.text_config
    embeddings = 2 * text.vocab_size * text.hidden_size  # embed_tokens + untied lm_head
    assert estimate.other_params > embeddings


def test_builtin_name_resolves(tiny_model_dir):
    assert load_model_config("builtin:tiny-smolvlm").model_type == "idefics3"


def test_unknown_dtype_or_mode_is_refused(tiny_model_dir):
    config = load_model_config(str(tiny_model_dir))
    with pytest.raises(ValueError, match="dtype"):
        estimate_weight_memory(config, "int8", "none")
    with pytest.raises(ValueError, match="mode"):
        estimate_weight_memory(config, "bfloat16", "2bit")


def test_format_bytes():
    assert format_bytes(int(1.234 * 2**30)) == "1.23 GiB"
    assert format_bytes(int(456.7 * 2**20)) == "456.7 MiB"
    assert format_bytes(12 * 2**10) == "12.0 KiB"
    assert format_bytes(512) == "512 B"


def test_footprint_leaves_out_the_quantization_statistics():
    estimate = WeightMemoryEstimate(total_bytes=1000, quantized_params=10, other_params=5, quant_state_bytes=40)
    assert estimate.footprint_bytes == 960 and estimate.params == 15
