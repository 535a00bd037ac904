"""Formatting: internal rows -> the conversational samples TRL's trainers take.

SFT samples are *prompt + completion* (not one `messages` list): with that shape TRL's
vision collator masks the prompt, so the loss falls on the answer and the end-of-turn
token only, never on the system message, the question or the image tokens.

The image is given once: an `{"type": "image"}` placeholder in the user turn and the PIL
image in `images`. (The cookbook notebooks put it in both places, which current TRL
rejects: "Number of images provided (1) does not match number of image placeholders".)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets


def _prompt(system_message: str, question: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": [{"type": "text", "text": system_message}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
    ]


def _assistant(text: str) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def to_sft_sample(row: dict[str, Any], system_message: str) -> dict[str, Any]:
    """One SFT row -> {prompt, completion, images} in TRL's conversational prompt-completion form."""
    return {
        "prompt": _prompt(system_message, row["question"]),
        "completion": _assistant(row["answer"]),
        "images": [row["image"].convert("RGB")],
    }


def to_preference_sample(row: dict[str, Any], system_message: str) -> dict[str, Any]:
    """One preference row -> {prompt, chosen, rejected, images} in TRL's conversational preference form."""
    return {
        "prompt": _prompt(system_message, row["question"]),
        "chosen": _assistant(row["chosen"]),
        "rejected": _assistant(row["rejected"]),
        "images": [row["image"].convert("RGB")],
    }


def save_sft_dataset(rows: list[dict[str, Any]], system_message: str, path: Path) -> Path:
    """Format SFT rows and save them as a `datasets` folder; returns the folder."""
    dataset = datasets.Dataset.from_list([to_sft_sample(row, system_message) for row in rows])
    dataset.save_to_disk(str(path))
    return path


def save_preference_dataset(rows: list[dict[str, Any]], system_message: str, path: Path) -> Path:
    """Format preference rows and save them as a `datasets` folder; returns the folder."""
    dataset = datasets.Dataset.from_list([to_preference_sample(row, system_message) for row in rows])
    dataset.save_to_disk(str(path))
    return path
