"""The loss falls on the answer only: checked on the batches TRL's own collators build."""

import datasets
import pytest
import torch
import trl
from transformers import AutoProcessor
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from tasks.config import Recipe
from tasks.data import CHART_PREFS_SYNTH, CHARTQA_SYNTH, load_preference_rows, load_sft_rows
from tasks.formatting import to_preference_sample, to_sft_sample
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
