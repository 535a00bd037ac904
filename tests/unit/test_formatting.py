"""The loss falls on the answer only: checked on the batches TRL's own collators build.

Also: images are downscaled before any processor sees them, and `count_sample_tokens` gives
the length the collators build (other families: tests/unit/test_families.py).
"""

import datasets
import pytest
import torch
import trl
from PIL import Image
from transformers import AutoProcessor
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from tasks.config import Recipe
from tasks.data import CHART_PREFS_SYNTH, CHARTQA_SYNTH, load_preference_rows, load_sft_rows
from tasks.formatting import (
    count_sample_tokens,
    resize_image,
    save_preference_dataset,
    save_sft_dataset,
    to_preference_sample,
    to_sft_sample,
)
from tasks.models import load_model
from tasks.training import lora_config, sft_arguments

SYSTEM = "Answer with a single word or number."


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def test_sft_sample_gives_the_image_once(processor):
    row = load_sft_rows(CHARTQA_SYNTH, "train", 1)[0]
    sample = to_sft_sample(row, SYSTEM)
    placeholders = [part for message in sample["prompt"] for part in message["content"] if part["type"] == "image"]
    assert len(placeholders) == 1 and len(sample["images"]) == 1
    assert sample["prompt"][0] == {"role": "system", "content": [{"type": "text", "text": SYSTEM}]}
    assert sample["completion"][0]["content"][0]["text"] == row["answer"]


def test_sft_trainer_labels_cover_exactly_the_answer_and_end_of_turn(processor, tmp_path):
    rows = load_sft_rows(CHARTQA_SYNTH, "train", 6)
    samples = [to_sft_sample(row, SYSTEM) for row in rows]
    recipe = Recipe()
    # The collator the trainer builds from our arguments, not one constructed by the test.
    trainer = trl.SFTTrainer(
        model=load_model(recipe.model, recipe.quantization),
        args=sft_arguments(recipe, tmp_path, ["none"]),
        train_dataset=datasets.Dataset.from_list(samples),
        processing_class=processor,
        peft_config=lora_config(recipe),
    )
    assert {sample["question_type"] for sample in samples} == {"argmax", "count", "value"}  # an extra column
    batch = trainer.data_collator([dict(sample) for sample in samples])
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_token).any(), "the batch carries no image tokens"
    for i, row in enumerate(rows):
        labels = batch["labels"][i]
        trained = labels[labels != -100]
        assert processor.tokenizer.decode(trained) == f" {row['answer']}<end_of_utterance>\n"
        assert not (labels == image_token).any()


def test_dpo_collator_masks_everything_but_chosen_and_rejected(processor):
    rows = load_preference_rows(CHART_PREFS_SYNTH, "train", 4)
    batch = DataCollatorForVisionPreference(processor=processor)([to_preference_sample(row, SYSTEM) for row in rows])
    half = len(rows)
    for i, row in enumerate(rows):
        for offset, text in ((0, row["chosen"]), (half, row["rejected"])):
            ids = batch["input_ids"][i + offset][batch["completion_mask"][i + offset].bool()]
            assert processor.tokenizer.decode(ids) == f" {text}<end_of_utterance>\n"
    assert batch["pixel_values"].shape[0] == 2 * half  # one image per chosen and per rejected sequence
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][half])


@pytest.mark.parametrize(
    ("size", "longest_edge", "expected"),
    [
        ((300, 120), 64, (64, 26)),  # 120 x 64/300 = 25.6, rounded to the nearest pixel
        ((120, 300), 64, (26, 64)),
        ((40, 20), 64, (40, 20)),  # never upscaled
        ((64, 64), 64, (64, 64)),
        ((300, 120), None, (300, 120)),
        ((1000, 2), 10, (10, 1)),  # the short side keeps at least one pixel
    ],
)
def test_resize_keeps_the_aspect_ratio_and_never_upscales(size, longest_edge, expected):
    resized = resize_image(Image.new("RGBA", size, (200, 10, 10, 255)), longest_edge)
    assert resized.size == expected
    assert resized.mode == "RGB"


def test_resize_refuses_a_longest_edge_below_one():
    with pytest.raises(ValueError, match="image_longest_edge"):
        resize_image(Image.new("RGB", (10, 10)), 0)


def test_samples_and_saved_datasets_carry_resized_rgb_images(tmp_path):
    sft_row = load_sft_rows(CHARTQA_SYNTH, "train", 1)[0]
    preference_row = load_preference_rows(CHART_PREFS_SYNTH, "train", 1)[0]
    assert sft_row["image"].size == (64, 64)
    grey = {**sft_row, "image": sft_row["image"].convert("L")}
    assert to_sft_sample(grey, SYSTEM, image_longest_edge=32)["images"][0].size == (32, 32)
    assert to_sft_sample(grey, SYSTEM)["images"][0].mode == "RGB"
    assert to_preference_sample(preference_row, SYSTEM, image_longest_edge=16)["images"][0].size == (16, 16)

    def saved_image(path):
        return datasets.load_from_disk(str(path))[0]["images"][0]

    for image in (
        saved_image(save_sft_dataset([sft_row], SYSTEM, tmp_path / "sft", image_longest_edge=32)),
        saved_image(save_preference_dataset([preference_row], SYSTEM, tmp_path / "dpo", image_longest_edge=32)),
    ):
        assert image.size == (32, 32) and image.mode == "RGB"
    assert saved_image(save_sft_dataset([sft_row], SYSTEM, tmp_path / "full")).size == (64, 64)


def test_count_sample_tokens_matches_the_collated_rows(processor):
    rows = load_sft_rows(CHARTQA_SYNTH, "train", 4)
    samples = [to_sft_sample(row, SYSTEM) for row in rows]
    collator = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)
    batch = collator([dict(sample) for sample in samples])
    for i, sample in enumerate(samples):
        # 16 image tokens + <fake_token_around_image> x2 + <global-img> in the prompt
        assert count_sample_tokens(processor, sample) == batch["attention_mask"][i].sum()
    assert samples[0]["prompt"][1]["content"][0] == {"type": "image"}, "the sample was modified"

    pairs = [to_preference_sample(row, SYSTEM) for row in load_preference_rows(CHART_PREFS_SYNTH, "train", 4)]
    batch = DataCollatorForVisionPreference(processor=processor)([dict(pair) for pair in pairs])
    lengths = batch["attention_mask"].sum(dim=1)
    for i, pair in enumerate(pairs):
        assert count_sample_tokens(processor, pair) == max(lengths[i], lengths[i + len(pairs)])


def test_count_sample_tokens_reads_saved_datasets(processor, tmp_path):
    """A saved sample comes back with `text: None` in its image parts; the count is the same."""
    rows = load_sft_rows(CHARTQA_SYNTH, "train", 2)
    saved = datasets.load_from_disk(str(save_sft_dataset(rows, SYSTEM, tmp_path / "sft")))
    for row, sample in zip(rows, saved, strict=True):
        assert count_sample_tokens(processor, sample) == count_sample_tokens(processor, to_sft_sample(row, SYSTEM))
    longer = to_sft_sample({**rows[0], "answer": rows[0]["answer"] + " and more words"}, SYSTEM)
    assert count_sample_tokens(processor, longer) > count_sample_tokens(processor, to_sft_sample(rows[0], SYSTEM))


def test_count_sample_tokens_refuses_other_shapes(processor):
    with pytest.raises(KeyError, match="prompt-completion or preference"):
        count_sample_tokens(processor, {"messages": [], "images": []})


def test_saved_sft_dataset_keeps_the_question_type_as_a_string_column(tmp_path):
    rows = load_sft_rows(CHARTQA_SYNTH, "test", 3)
    untyped = dict(rows[0], question_type=None)
    saved = datasets.load_from_disk(str(save_sft_dataset([*rows, untyped], SYSTEM, tmp_path / "sft")))
    assert saved.features["question_type"].dtype == "string"
    assert saved["question_type"] == ["argmax", "count", "value", ""]
