"""Model loading: the base model, quantized as the recipe asks, and its processor.

`builtin:tiny-smolvlm` resolves to a locally built folder (tasks/tiny_model.py); any other
name is a hub id or a local path handed to transformers' auto classes unchanged.
Quantization goes through `BitsAndBytesConfig`; 4-bit is QLoRA's NF4 by default.

Before anything loads, `check_hardware` refuses a recipe this machine cannot run (fp16 or
flash-attention without a GPU, bf16 on a GPU without it, more processes than GPUs, weights
that do not fit) with a message that says what to change.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from tasks.config import ModelConfig, QuantizationConfig, Recipe
from tasks.tiny_model import TINY_SMOLVLM, tiny_smolvlm_path

logger = logging.getLogger(__name__)


class HardwareError(ValueError):
    """The recipe asks for something this machine cannot run; raised before any model loads."""


def resolve_model_path(name_or_path: str) -> str:
    """Return what `from_pretrained` should load: a built folder for builtins, else the name itself."""
    if name_or_path == TINY_SMOLVLM:
        return str(tiny_smolvlm_path())
    if name_or_path.startswith("builtin:"):
        raise ValueError(f"unknown builtin model {name_or_path!r}; the offline default is {TINY_SMOLVLM}")
    return name_or_path


@dataclass(frozen=True)
class Hardware:
    """What the machine offers, as far as the recipe's choices depend on it."""

    cuda_devices: int
    bf16_on_gpu: bool
    flash_attn_installed: bool
    free_memory_bytes: int  # the first GPU's free memory, or available RAM without a GPU

    @classmethod
    def detect(cls) -> Hardware:
        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cuda:
            free = torch.cuda.mem_get_info(0)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return cls(
            cuda_devices=cuda,
            bf16_on_gpu=bool(cuda) and torch.cuda.is_bf16_supported(),
            flash_attn_installed=importlib.util.find_spec("flash_attn") is not None,
            free_memory_bytes=free,
        )


def hardware_problems(recipe: Recipe, hardware: Hardware, estimated_weight_bytes: int | None = None) -> list[str]:
    """Every reason this machine cannot run the recipe, each with its fix; empty when it can."""
    problems = []
    on_gpu = hardware.cuda_devices > 0
    for stage in ("sft", "dpo"):
        settings = getattr(recipe, stage)
        if settings.fp16 and not on_gpu:
            problems.append(f"{stage}.fp16 mixed precision needs a GPU; on CPU set {stage}.fp16: false (bf16 works on CPU)")
        if settings.bf16 and on_gpu and not hardware.bf16_on_gpu:
            problems.append(f"{stage}.bf16: this GPU has no bf16; set {stage}.bf16: false and {stage}.fp16: true")
    bf16_dtypes = [("model.dtype", recipe.model.dtype)]
    if recipe.quantization.mode == "4bit":
        bf16_dtypes.append(("quantization.bnb_4bit_compute_dtype", recipe.quantization.bnb_4bit_compute_dtype))
    for field, dtype in bf16_dtypes:
        if dtype == "bfloat16" and on_gpu and not hardware.bf16_on_gpu:
            problems.append(f"{field}: this GPU has no bf16; use float16")
    if recipe.model.attn_implementation == "flash_attention_2":
        if not on_gpu:
            problems.append("model.attn_implementation flash_attention_2 needs a CUDA GPU; use sdpa on CPU")
        elif not hardware.flash_attn_installed:
            problems.append("model.attn_implementation flash_attention_2 needs `pip install flash-attn`; or use sdpa")
    if on_gpu and recipe.resources.num_processes > hardware.cuda_devices:
        problems.append(
            f"resources.num_processes is {recipe.resources.num_processes} but this machine has "
            f"{hardware.cuda_devices} GPU(s): one process per GPU"
        )
    if estimated_weight_bytes is not None and estimated_weight_bytes > hardware.free_memory_bytes:
        where = "GPU memory" if on_gpu else "available RAM"
        problems.append(
            f"the weights alone need about {estimated_weight_bytes / 2**30:.1f} GiB in quantization "
            f"{recipe.quantization.mode} but only {hardware.free_memory_bytes / 2**30:.1f} GiB of {where} is free; "
            "use quantization.mode 4bit, a smaller model, or a bigger machine"
        )
    return problems


def check_hardware(recipe: Recipe, hardware: Hardware | None = None, estimated_weight_bytes: int | None = None) -> None:
    """Raise HardwareError listing every problem `hardware_problems` finds; nothing is loaded."""
    problems = hardware_problems(recipe, hardware or Hardware.detect(), estimated_weight_bytes)
    if problems:
        raise HardwareError("this machine cannot run the recipe:\n  " + "\n  ".join(problems))


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
        bnb_4bit_quant_storage=getattr(torch, quantization.bnb_4bit_quant_storage),
    )


def load_processor(model: ModelConfig):
    """The model's processor (tokenizer + image processor + chat template)."""
    return AutoProcessor.from_pretrained(
        resolve_model_path(model.name_or_path),
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
    )


def _device_map(quantization: QuantizationConfig) -> dict[str, int] | None:
    # bitsandbytes places quantized weights at load time, so under torchrun each process
    # must load onto its own GPU; unquantized models are moved by the Trainer instead.
    if quantization.mode == "none" or not torch.cuda.is_available():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def load_model(model: ModelConfig, quantization: QuantizationConfig):
    """Load the base model in the recipe's dtype and quantization; logs its memory footprint."""
    loaded = AutoModelForImageTextToText.from_pretrained(
        resolve_model_path(model.name_or_path),
        revision=model.revision,
        dtype=getattr(torch, model.dtype),
        quantization_config=bitsandbytes_config(quantization),
        attn_implementation=model.attn_implementation,
        trust_remote_code=model.trust_remote_code,
        use_safetensors=True,
        device_map=_device_map(quantization),
    )
    logger.info(
        "loaded %s (%s, quantization %s): %.1f MiB",
        model.name_or_path, model.dtype, quantization.mode, loaded.get_memory_footprint() / 2**20,
    )
    return loaded
