"""Model loading: the base model, quantized as the recipe asks, and its processor.

`builtin:tiny-smolvlm` resolves to a locally built folder (tasks/tiny_model.py); any other
name is a hub id or a local path handed to transformers' auto classes unchanged.
Quantization goes through `BitsAndBytesConfig`; 4-bit is QLoRA's NF4 by default.
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from tasks.config import ModelConfig, QuantizationConfig
from tasks.tiny_model import TINY_SMOLVLM, tiny_smolvlm_path

logger = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str) -> str:
    """Return what `from_pretrained` should load: a built folder for builtins, else the name itself."""
    if name_or_path == TINY_SMOLVLM:
        return str(tiny_smolvlm_path())
    if name_or_path.startswith("builtin:"):
        raise ValueError(f"unknown builtin model {name_or_path!r}; the offline default is {TINY_SMOLVLM}")
    return name_or_path


def bitsandbytes_config(quantization: QuantizationConfig) -> BitsAndBytesConfig | None:
    """The BitsAndBytesConfig for the recipe's mode, or None for unquantized loading."""
    if quantization.mode == "none":
        return None
    if quantization.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quantization.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quantization.bnb_4bit_compute_dtype),
    )


def load_processor(model: ModelConfig):
    """The model's processor (tokenizer + image processor + chat template)."""
    return AutoProcessor.from_pretrained(
        resolve_model_path(model.name_or_path),
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
    )


def load_model(model: ModelConfig, quantization: QuantizationConfig):
    """Load the base model in the recipe's dtype and quantization; logs its memory footprint."""
    quantization_config = bitsandbytes_config(quantization)
    loaded = AutoModelForImageTextToText.from_pretrained(
        resolve_model_path(model.name_or_path),
        revision=model.revision,
        dtype=getattr(torch, model.dtype),
        quantization_config=quantization_config,
        attn_implementation=model.attn_implementation,
        trust_remote_code=model.trust_remote_code,
        use_safetensors=True,
    )
    logger.info(
        "loaded %s (%s, quantization %s): %.1f MB",
        model.name_or_path, model.dtype, quantization.mode, loaded.get_memory_footprint() / 2**20,
    )
    return loaded
