"""How much memory a model's weights will take, worked out from its config before loading.

`estimate_weight_memory` builds the model's skeleton on the meta device (no weights, no
memory), lets transformers' own bitsandbytes quantizer swap in the layers it would swap in
`from_pretrained`, and adds up bytes per parameter:

| weights                                   | bytes a parameter                                     |
|-------------------------------------------|-------------------------------------------------------|
| kept in the load dtype                    | 4 (float32), 2 (bfloat16, float16)                    |
| 8-bit (`Linear8bitLt`)                    | 1 (int8) + 4 per output row (fp32 scale, `SCB`)       |
| 4-bit (`Linear4bit`), no double quant     | 0.5 + 4 / 64 (fp32 absmax a block of 64) = 0.5625     |
| 4-bit, double quant (QLoRA's default)     | 0.5 + 1 / 64 (uint8 absmax) + 4 / (64 * 256) ~= 0.516 |

plus, per 4-bit layer, its 16-entry code book (64 B) and, with double quantization, the
absmax offset (4 B) and 256-entry second-level code book (1 KiB); plus the model's buffers
(rotary `inv_freq` and the like, float32 whatever the load dtype).

Which layers are quantized is transformers' decision, not ours: every `nn.Linear` except the
output embeddings (`lm_head`), tied weights, the model's last parameter, `_keep_in_fp32_modules`
and `llm_int8_skip_modules` (`HfQuantizer.get_modules_to_not_convert` +
`replace_with_bnb_linear`). Embeddings, norms, convolutions (SigLIP's patch embedding) and
`lm_head` stay in the load dtype: for SmolVLM-Instruct the embeddings and `lm_head` alone
are 2 x 49,155 x 2,048 = 201M parameters, 9% of the model, which is why 4-bit lands near
a third of bf16 rather than a quarter.

`model.get_memory_footprint()` counts parameters and buffers only, so it misses the
quantization statistics (absmax, code books, `SCB`), which bitsandbytes keeps as plain
tensor attributes: `WeightMemoryEstimate.footprint_bytes` is the number to compare with it,
`total_bytes` (= footprint + `quant_state_bytes`) what the weights really take.
`measure_quant_state_bytes(model)` reads those statistics off a loaded model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("none", "8bit", "4bit")

# bitsandbytes' 4-bit layout (bitsandbytes 0.50 `functional.quantize_4bit`, the defaults that
# `BitsAndBytesConfig` leaves alone): one absmax a block of 64 weights; with double
# quantization the absmaxes are themselves quantized to uint8 in blocks of 256 (fp32 absmax
# each) after subtracting their mean (`offset`). Code books: 16 fp32 values for NF4/FP4,
# 256 fp32 values for the nested 8-bit dynamic map; each layer holds its own copies.
BNB_4BIT_BLOCKSIZE = 64
BNB_NESTED_BLOCKSIZE = 256
BNB_4BIT_CODE_BYTES = 16 * 4
BNB_NESTED_CODE_BYTES = 256 * 4
BNB_OFFSET_BYTES = 4
FP32_BYTES = 4


@dataclass(frozen=True)
class WeightMemoryEstimate:
    """Memory the weights of a model take once loaded in one dtype and quantization mode.

    `total_bytes` counts parameters, buffers and bitsandbytes' quantization statistics;
    `footprint_bytes` leaves the statistics out, as `model.get_memory_footprint()` does.
    """

    total_bytes: int
    quantized_params: int  # parameters in layers bitsandbytes replaces (their weights; biases stay unquantized)
    other_params: int  # parameters kept in the load dtype (or float32 for keep-in-fp32 modules)
    quant_state_bytes: int = 0  # absmax, code books, 8-bit row scales: not parameters or buffers
    buffer_bytes: int = 0

    @property
    def footprint_bytes(self) -> int:
        """What `model.get_memory_footprint()` will report for the loaded model."""
        return self.total_bytes - self.quant_state_bytes

    @property
    def params(self) -> int:
        return self.quantized_params + self.other_params


def smolvlm_instruct_config(text_layers: int = 24, vision_layers: int = 27):
    """`HuggingFaceTB/SmolVLM-Instruct`'s architecture as an `Idefics3Config`, built offline.

    Layer shapes are the checkpoint's (config.json): Llama text model, hidden 2048,
    intermediate 8192, 32 heads (no GQA), vocab 49,155, untied lm_head; SigLIP vision tower,
    hidden 1152, intermediate 4304, 16 heads, patch 14 at 384 px; pixel shuffle scale 3, so
    one 384 px image is (384 / 14)^2 = 729 patches -> 81 image tokens. At full depth
    (24 text, 27 vision layers) that is 2,246,272,880 parameters. Fewer layers give a slice
    with the same widths, for benchmarks that cannot afford the whole model.
    """
    from transformers import Idefics3Config

    return Idefics3Config(
        text_config={
            "model_type": "llama",
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "head_dim": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 273768.0,
            "max_position_embeddings": 16384,
            "vocab_size": 49155,
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 384,
        },
        scale_factor=3,
        image_token_id=49153,
        vocab_size=49155,
        tie_word_embeddings=False,
    )


def load_model_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's `PretrainedConfig`, read without touching its weights.

    `builtin:tiny-smolvlm` resolves to the locally built folder (built on first use).
    Raises whatever `AutoConfig.from_pretrained` raises for a missing or unreachable model.
    """
    from transformers import AutoConfig

    from tasks.tiny_model import TINY_SMOLVLM, tiny_smolvlm_path

    path = str(tiny_smolvlm_path()) if name_or_path == TINY_SMOLVLM else name_or_path
    return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


def bnb_4bit_bytes(numel: int, double_quant: bool) -> tuple[int, int]:
    """(packed weight bytes, quantization statistics bytes) of one 4-bit weight of `numel` values."""
    blocks = math.ceil(numel / BNB_4BIT_BLOCKSIZE)
    packed = math.ceil(numel / 2)  # two 4-bit values a uint8
    if not double_quant:
        return packed, blocks * FP32_BYTES + BNB_4BIT_CODE_BYTES
    nested_blocks = math.ceil(blocks / BNB_NESTED_BLOCKSIZE)
    stats = blocks + BNB_OFFSET_BYTES + BNB_4BIT_CODE_BYTES + nested_blocks * FP32_BYTES + BNB_NESTED_CODE_BYTES
    return packed, stats


def bnb_8bit_bytes(numel: int, rows: int) -> tuple[int, int]:
    """(int8 weight bytes, fp32 row-scale bytes) of one LLM.int8 weight."""
    return numel, rows * FP32_BYTES


def _bnb_config(mode: str, dtype: torch.dtype, double_quant: bool):
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # Quant type and compute dtype do not change what is stored; the compute dtype is the
    # load dtype here only so the config is valid for every dtype.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def _build_skeleton(config, dtype: torch.dtype, mode: str, double_quant: bool, trust_remote_code: bool):
    """The model on the meta device, with bitsandbytes layers where `from_pretrained` puts them.

    Returns (model, dtype plan of the keep-in-fp32 modules, as `from_pretrained` makes it).
    """
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import meta_device_safe_creation_ops
    from transformers.modeling_utils import local_torch_dtype
    from transformers.quantizers import AutoHfQuantizer

    quantizer = None
    if mode != "none":
        try:
            import bitsandbytes  # noqa: F401  (replace_with_bnb_linear needs it imported)
        except ImportError as error:
            raise ImportError(f"estimating {mode} loading needs bitsandbytes installed") from error
        quantizer = AutoHfQuantizer.from_config(_bnb_config(mode, dtype, double_quant), pre_quantized=False)
        dtype = quantizer.update_dtype(dtype)

    config = copy.deepcopy(config)  # from_config writes the dtype into the config
    # The meta device the way from_pretrained uses it (`get_init_context`), not accelerate's
    # `init_empty_weights`: that one re-wraps every parameter assigned to a module, so
    # `tie_weights` leaves a tied lm_head as a second, separately counted copy.
    with torch.device("meta"), meta_device_safe_creation_ops():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        if quantizer is not None:
            # The very call `from_pretrained` makes, under the same default dtype, so the
            # quantizer picks the layers (and gives the new layers' biases the dtype) it would.
            with local_torch_dtype(dtype):
                quantizer.preprocess_model(
                    model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None, use_kernels=False
                )
    return model, model._get_dtype_plan(dtype)


def estimate_weight_memory(
    config,
    dtype: str,
    mode: str,
    *,
    bnb_4bit_use_double_quant: bool = True,
    trust_remote_code: bool = False,
) -> WeightMemoryEstimate:
    """Estimate the memory of the model's weights loaded in `dtype` with quantization `mode`.

    `config` is a transformers `PretrainedConfig` of an image-text-to-text model (SmolVLM,
    Qwen2-VL, LLaVA, ...); nothing is downloaded or allocated. `dtype` is the dtype of the
    weights that are not quantized ("float32", "bfloat16", "float16"); `mode` is "none",
    "8bit" or "4bit". Raises ValueError for an unknown dtype or mode, or a config that
    `AutoModelForImageTextToText` has no class for; ImportError when a quantized mode is
    asked for without bitsandbytes installed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {list(MODES)}")
    from transformers.core_model_loading import build_glob_alternation

    model, dtype_plan = _build_skeleton(config, DTYPES[dtype], mode, bnb_4bit_use_double_quant, trust_remote_code)
    linear_4bit = linear_8bit = ()  # isinstance(x, ()) is False: nothing is quantized in mode none
    if mode != "none":
        import bitsandbytes as bnb

        linear_4bit, linear_8bit = bnb.nn.Linear4bit, bnb.nn.Linear8bitLt

    # Which layers are replaced and which dtype the rest gets come from transformers itself
    # (the skeleton above). Written by hand: the bytes a quantized weight really takes
    # (transformers' own `HfQuantizer.param_element_size` says 0.5 / 1 byte and leaves out the
    # statistics), and the three lines of `core_model_loading` that match keep-in-fp32 patterns.
    fp32_pattern = build_glob_alternation(list(dtype_plan))[:2] if dtype_plan else None
    modules = dict(model.named_modules())
    quantized_params = other_params = param_bytes = quant_state_bytes = 0
    for name, param in model.named_parameters():  # tied parameters once, as get_memory_footprint
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name]
        numel = param.numel()
        if isinstance(module, linear_4bit) and leaf == "weight":
            packed, stats = bnb_4bit_bytes(numel, bnb_4bit_use_double_quant)
        elif isinstance(module, linear_8bit) and leaf == "weight":
            packed, stats = bnb_8bit_bytes(numel, module.out_features)
        else:
            # Same rule as transformers' loader: a keep-in-fp32 pattern wins, else the
            # dtype the skeleton was built in.
            param_dtype = param.dtype
            if fp32_pattern is not None and (match := fp32_pattern[0].search(name)) is not None:
                param_dtype = dtype_plan[fp32_pattern[1][match.lastgroup]]
            other_params += numel
            param_bytes += numel * param_dtype.itemsize
            continue
        quantized_params += numel
        param_bytes += packed
        quant_state_bytes += stats
    buffer_bytes = sum(buf.numel() * buf.element_size() for buf in model.buffers())
    return WeightMemoryEstimate(
        total_bytes=param_bytes + quant_state_bytes + buffer_bytes,
        quantized_params=quantized_params,
        other_params=other_params,
        quant_state_bytes=quant_state_bytes,
        buffer_bytes=buffer_bytes,
    )


def measure_quant_state_bytes(model: torch.nn.Module) -> int:
    """Bytes of bitsandbytes' quantization statistics in a loaded model (absmax, code books, SCB).

    These are tensor attributes of the quantized weights, invisible to `parameters()` and
    `buffers()` and so to `get_memory_footprint()`. Shared storages count once; the int8
    weight's `CB` is its own data and counts zero here.
    """
    seen: set[int] = set()
    weight_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or ptr in weight_ptrs:
            return
        seen.add(ptr)
        total += tensor.untyped_storage().nbytes()

    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:  # a nested QuantState carries its own state2
            for attr in ("absmax", "code", "offset"):
                add(getattr(state, attr, None))
            state = getattr(state, "state2", None)
        add(getattr(param, "SCB", None))
        add(getattr(param, "CB", None))
    return total


def format_bytes(n: int) -> str:
    """Human-readable binary size: "1.23 GiB", "456.7 MiB", "12.0 KiB", "512 B"."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"
