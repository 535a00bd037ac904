"""Tiny random models of other VLM families, built locally in a fraction of a second each.

`builtin:tiny-smolvlm` (Idefics3) is the project's own offline base; these prove that the
formatting and TRL's collators are family-generic. Each family gets its real classes at toy
size, a byte-level BPE tokenizer trained here on the chart vocabulary with that family's
special tokens, and that family's chat template (copied from the hub checkpoints):

- qwen2-vl: `Qwen2VLForConditionalGeneration` + `Qwen2VLProcessor` (ChatML template of
  Qwen/Qwen2-VL-*-Instruct). Image processor at patch 8, merge 2 and at most 64x64 pixels,
  so a 64x64 chart gives an 8x8 patch grid and 16 image tokens.
- llava: `LlavaForConditionalGeneration` + `LlavaProcessor` (template of
  llava-hf/llava-1.5-7b-hf: "USER: <image>\\n... ASSISTANT: ..."). CLIP vision tower at 32
  pixels, patch 8: 16 patches (+ CLS, dropped by the "default" feature selection) give 16
  image tokens.

Weights are random (seeded); nothing is trained. Everything is written with
`save_pretrained` and read back with `load_processor` / `load_model` through transformers' Auto classes, the
path a real checkpoint takes.

One gap, forced by the environment: transformers 5.24's `Qwen2VLProcessor` requires a video
processor, and Qwen2-VL's video processor requires torchvision, which is not installed here.
`AutoProcessor.from_pretrained` then raises ImportError for any Qwen2-VL checkpoint, real or
tiny. Without torchvision `load_processor` falls back to `Qwen2VLProcessorWithoutVideo`, the
same processor minus the video slot, loaded by the same `from_pretrained` machinery.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tasks import synthetic

FAMILIES = ("qwen2-vl", "llava")
VOCAB_SIZE = 512

# Qwen/Qwen2-VL-7B-Instruct's chat template, verbatim.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llava-1.5-7b-hf's chat template, verbatim. Note that an assistant turn ends with
# a space only: no "</s>", so a completion carries no end-of-turn token.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN2_VL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",  # the processor looks the video token up even when it only sees images
]
LLAVA_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


class Qwen2VLProcessorWithoutVideo(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor slot (which needs torchvision).

    Images take exactly Qwen2VLProcessor's code path; only videos are unsupported.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def _corpus(seed: int = 0) -> list[str]:
    """Chart questions, answers and captions, plus the words the templates add."""
    rng = random.Random(seed)
    texts = ["Answer with a single word or number.", "You are a helpful assistant.", "system", "user", "assistant",
             "USER:", "ASSISTANT:"]
    for _ in range(2000):
        spec = synthetic.sample_chart(rng)
        question, answer, _kind = synthetic.ask_question(spec, rng)
        texts += [synthetic.caption(spec), question, answer]
    for row in synthetic.make_chart_prefs_split("train", 100, seed=seed):
        texts += [row["question"], row["chosen"], row["rejected"]]
    return texts


def build_tokenizer(special_tokens: list[str], **token_names) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the chart vocabulary; any text still tokenizes (bytes)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=1024, **token_names)


def _build_qwen2_vl(out_dir: Path) -> None:
    tokenizer = build_tokenizer(QWEN2_VL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = tokenizer.convert_tokens_to_ids
    # factor = patch 8 x merge 2 = 16 px; 64x64 -> 8x8 patches -> 16 tokens after the 2x2 merge.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=16 * 16, max_pixels=64 * 64, patch_size=8, merge_size=2, temporal_patch_size=2
    )
    processor = Qwen2VLProcessorWithoutVideo(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_TEMPLATE
    )
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            # head_dim 16 -> 8 rotary frequencies, split over (temporal, height, width)
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
            patch_size=8, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    # Make the folder what Qwen2VLProcessor.save_pretrained writes: its class name (AutoProcessor,
    # unable to resolve the stand-in's name, would silently return the bare tokenizer) and a
    # video processor entry (which AutoProcessor loads, with torchvision, as a real checkpoint's).
    for name in ("processor_config.json", "tokenizer_config.json"):
        config_file = out_dir / name
        settings = json.loads(config_file.read_text())
        settings["processor_class"] = "Qwen2VLProcessor"
        if name == "processor_config.json":
            settings["video_processor"] = {
                "video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 8, "merge_size": 2,
                "temporal_patch_size": 2, "size": dict(image_processor.size),
            }
        config_file.write_text(json.dumps(settings, indent=2))


def _build_llava(out_dir: Path) -> None:
    tokenizer = build_tokenizer(
        LLAVA_TOKENS, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    ids = tokenizer.convert_tokens_to_ids
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
            bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>"),
        ),
        image_token_id=ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=ids("<pad>"),
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids("</s>")
    model.generation_config.pad_token_id = ids("<pad>")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_family(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny `family` model and processor into `out_dir`; returns `out_dir`."""
    builders = {"qwen2-vl": _build_qwen2_vl, "llava": _build_llava}
    if family not in builders:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(builders)}")
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    builders[family](out_dir)
    return out_dir


def load_processor(path: Path):
    """AutoProcessor, except Qwen2-VL without torchvision (see the module docstring)."""
    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError as error:
        if "Qwen2VLVideoProcessor" not in str(error):
            raise
        return Qwen2VLProcessorWithoutVideo.from_pretrained(path)


def load_model(path: Path):
    return AutoModelForImageTextToText.from_pretrained(path)
