"""Formatting: internal rows -> the conversational samples TRL's trainers take.

SFT samples are *prompt + completion* (not one `messages` list): with that shape TRL's
vision collator masks the prompt, so the loss falls on the answer and the end-of-turn
text only, never on the system message, the question or the image tokens.

The image is given once: an `{"type": "image"}` placeholder in the user turn and the PIL
image in `images`. (The cookbook notebooks put it in both places, which current TRL
rejects: "Number of images provided (1) does not match number of image placeholders".)
Images are converted to RGB and, given `image_longest_edge`, downscaled here, before any
processor sees them.

`count_sample_tokens` gives the sequence length TRL's collators will build for a sample,
image tokens included, so that a token budget can be checked before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
from PIL import Image
from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages

_COMPLETION_KEYS = ("completion", "chosen", "rejected")


def _prompt(system_message: str, question: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": [{"type": "text", "text": system_message}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
    ]


def _assistant(text: str) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def resize_image(image: Image.Image, longest_edge: int | None = None) -> Image.Image:
    """The image in RGB, downscaled (aspect ratio kept, LANCZOS) so its longest edge is at most `longest_edge`.

    Never upscales; None leaves the size alone. The longer side becomes exactly
    `longest_edge`, the shorter one is rounded to the nearest pixel (at least 1):
    300x120 at 64 gives 64x26 (120 x 64/300 = 25.6). Raises ValueError if `longest_edge` < 1.
    """
    image = image.convert("RGB")
    if longest_edge is None:
        return image
    if longest_edge < 1:
        raise ValueError(f"image_longest_edge must be at least 1, got {longest_edge}")
    width, height = image.size
    if max(width, height) <= longest_edge:
        return image
    if width >= height:
        size = (longest_edge, max(1, round(height * longest_edge / width)))
    else:
        size = (max(1, round(width * longest_edge / height)), longest_edge)
    return image.resize(size, Image.Resampling.LANCZOS)


def to_sft_sample(row: dict[str, Any], system_message: str, image_longest_edge: int | None = None) -> dict[str, Any]:
    """One SFT row -> {prompt, completion, images, question_type} in TRL's conversational prompt-completion form.

    `question_type` is the row's type for per-type evaluation ("" when unknown: a plain string
    column, which TRL's vision collator ignores).
    """
    return {
        "prompt": _prompt(system_message, row["question"]),
        "completion": _assistant(row["answer"]),
        "images": [resize_image(row["image"], image_longest_edge)],
        "question_type": row.get("question_type") or "",
    }


def to_preference_sample(
    row: dict[str, Any], system_message: str, image_longest_edge: int | None = None
) -> dict[str, Any]:
    """One preference row -> {prompt, chosen, rejected, images} in TRL's conversational preference form."""
    return {
        "prompt": _prompt(system_message, row["question"]),
        "chosen": _assistant(row["chosen"]),
        "rejected": _assistant(row["rejected"]),
        "images": [resize_image(row["image"], image_longest_edge)],
    }


def save_sft_dataset(
    rows: list[dict[str, Any]], system_message: str, path: Path, image_longest_edge: int | None = None
) -> Path:
    """Format SFT rows and save them as a `datasets` folder; returns the folder."""
    samples = [to_sft_sample(row, system_message, image_longest_edge) for row in rows]
    datasets.Dataset.from_list(samples).save_to_disk(str(path))
    return path


def save_preference_dataset(
    rows: list[dict[str, Any]], system_message: str, path: Path, image_longest_edge: int | None = None
) -> Path:
    """Format preference rows and save them as a `datasets` folder; returns the folder."""
    samples = [to_preference_sample(row, system_message, image_longest_edge) for row in rows]
    datasets.Dataset.from_list(samples).save_to_disk(str(path))
    return path


def count_sample_tokens(processor, sample: dict[str, Any]) -> int:
    """Tokens of the longest sequence TRL's vision collators build from `sample`.

    That is the prompt, rendered and processed with its images (so image tokens are
    expanded exactly as the processor expands them), plus the longest completion: the
    completion of an SFT sample, the longer of chosen / rejected for a preference pair.
    Rendering and tokenizing follow DataCollatorForVisionLanguageModeling and
    DataCollatorForVisionPreference step by step (prompt and completion tokenized apart,
    no special tokens added), so the count equals the collated row's attention-mask sum
    when no `max_length` truncates it. The sample is not modified.
    """
    completion_keys = [key for key in _COMPLETION_KEYS if key in sample]
    if "prompt" not in sample or not completion_keys:
        raise KeyError(f"expected a prompt-completion or preference sample, got keys {sorted(sample)}")
    images = list(sample["images"]) if "images" in sample else [sample["image"]] if "image" in sample else []
    example = {key: sample[key] for key in ("prompt", *completion_keys)}
    if is_conversational(example):
        example["prompt"] = prepare_multimodal_messages(example["prompt"], images=images)
        for key in completion_keys:
            example[key] = prepare_multimodal_messages(example[key])
        example = apply_chat_template(example, processor)
    prompt = processor(images=[images] if images else None, text=[example["prompt"]], add_special_tokens=False)
    completions = processor(text=[example[key] for key in completion_keys], add_special_tokens=False)
    return len(prompt["input_ids"][0]) + max(len(ids) for ids in completions["input_ids"])
