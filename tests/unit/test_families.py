"""The formatting is family-generic: SmolVLM (Idefics3), Qwen2-VL and LLaVA, on TRL's own collators.

For each family, on the batches TRL builds: the SFT labels cover exactly the answer plus that
family's end-of-turn text, DPO's completion mask covers exactly chosen / rejected, the model
takes the batch (pixel values, image grids and image tokens line up) and gives a finite
loss, and `count_sample_tokens` predicts each collated row's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import torch
import trl
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from tasks.config import Recipe
from tasks.data import CHART_PREFS_SYNTH, CHARTQA_SYNTH, load_preference_rows, load_sft_rows
from tasks.formatting import count_sample_tokens, to_preference_sample, to_sft_sample
from tasks.models import load_model
from tasks.training import lora_config, sft_arguments

import tiny_families  # in tests/, which pytest puts on sys.path for tests/conftest.py

SYSTEM = "Answer with a single word or number."


@dataclass(frozen=True)
class Family:
    image_token: str
    completion: str  # what a completion renders to with this family's chat template; {} is the answer
    image_tokens_per_image: int


FAMILIES = {
    # SmolVLM: "...<end_of_utterance>\nAssistant:" then " answer<end_of_utterance>\n"
    "idefics3": Family("<image>", " {}<end_of_utterance>\n", 16),
    # ChatML: "...<|im_start|>assistant\n" then "answer<|im_end|>\n" (no leading space)
    "qwen2-vl": Family("<|image_pad|>", "{}<|im_end|>\n", 16),
    # llava-hf's template: "... ASSISTANT:" then " answer " -- no end-of-turn token at all
    "llava": Family("<image>", " {} ", 16),
}


@pytest.fixture(scope="session", params=list(FAMILIES))
def family_dir(request, tmp_path_factory) -> tuple[str, Path]:
    """(family name, saved model + processor folder), built once per session."""
    name = request.param
    if name == "idefics3":
        return name, request.getfixturevalue("tiny_model_dir")
    return name, tiny_families.build_family(name, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def family(family_dir):
    """(name, Family, processor), the processor loaded back from the saved folder."""
    name, path = family_dir
    return name, FAMILIES[name], tiny_families.load_processor(path)


@pytest.fixture(scope="session")
def sft_rows():
    return load_sft_rows(CHARTQA_SYNTH, "train", 4)


@pytest.fixture(scope="session")
def preference_rows():
    return load_preference_rows(CHART_PREFS_SYNTH, "train", 4)


@pytest.fixture(scope="session")
def sft_trainer_and_batch(family_dir, family, sft_rows, tmp_path_factory):
    """The SFTTrainer our training code configures, and the batch its own collator builds."""
    name, path = family_dir
    _, _, processor = family
    recipe = Recipe()
    recipe.model.name_or_path = str(path)
    samples = [to_sft_sample(row, SYSTEM) for row in sft_rows]
    trainer = trl.SFTTrainer(
        model=load_model(recipe.model, recipe.quantization),
        args=sft_arguments(recipe, tmp_path_factory.mktemp(f"sft-{name}"), ["none"]),
        train_dataset=datasets.Dataset.from_list(samples),
        processing_class=processor,
        peft_config=lora_config(recipe),
    )
    # The collator rewrites the samples it is given: hand it copies.
    return trainer, trainer.data_collator([dict(sample) for sample in samples])


@pytest.fixture(scope="session")
def dpo_batch(family, preference_rows):
    _, _, processor = family
    samples = [to_preference_sample(row, SYSTEM) for row in preference_rows]
    return DataCollatorForVisionPreference(processor=processor)([dict(sample) for sample in samples])


def test_sft_labels_cover_exactly_the_answer_and_the_end_of_turn(family, sft_trainer_and_batch, sft_rows):
    name, spec, processor = family
    _, batch = sft_trainer_and_batch
    image_token = processor.tokenizer.convert_tokens_to_ids(spec.image_token)
    for i, row in enumerate(sft_rows):
        assert (batch["input_ids"][i] == image_token).sum() == spec.image_tokens_per_image, name
        labels = batch["labels"][i]
        assert processor.tokenizer.decode(labels[labels != -100]) == spec.completion.format(row["answer"])
        assert not (labels == image_token).any()


def test_dpo_completion_mask_covers_exactly_chosen_and_rejected(family, dpo_batch, preference_rows):
    name, spec, processor = family
    half = len(preference_rows)
    for i, row in enumerate(preference_rows):
        for offset, text in ((0, row["chosen"]), (half, row["rejected"])):
            ids = dpo_batch["input_ids"][i + offset][dpo_batch["completion_mask"][i + offset].bool()]
            assert processor.tokenizer.decode(ids) == spec.completion.format(text), name
    image_token = processor.tokenizer.convert_tokens_to_ids(spec.image_token)
    assert ((dpo_batch["input_ids"] == image_token).sum(dim=1) == spec.image_tokens_per_image).all()


def test_model_takes_the_collated_batches(sft_trainer_and_batch, dpo_batch):
    """Pixel values, image grids and image tokens line up: the forward pass would raise otherwise."""
    trainer, batch = sft_trainer_and_batch
    model = trainer.model
    with torch.no_grad():
        loss = model(**batch).loss
        # DPO's forward takes the batch without its completion mask (which only weights the log-probs).
        logits = model(**{key: value for key, value in dpo_batch.items() if key != "completion_mask"}).logits
    assert torch.isfinite(loss) and loss > 0
    assert logits.shape[:2] == dpo_batch["input_ids"].shape and torch.isfinite(logits).all()


def test_count_sample_tokens_is_the_collated_length(
    family, sft_trainer_and_batch, dpo_batch, sft_rows, preference_rows
):
    _, _, processor = family
    _, batch = sft_trainer_and_batch
    for i, row in enumerate(sft_rows):
        assert count_sample_tokens(processor, to_sft_sample(row, SYSTEM)) == batch["attention_mask"][i].sum()
    half = len(preference_rows)
    lengths = dpo_batch["attention_mask"].sum(dim=1)
    for i, row in enumerate(preference_rows):
        sample = to_preference_sample(row, SYSTEM)
        assert count_sample_tokens(processor, sample) == max(lengths[i], lengths[i + half])


@pytest.mark.parametrize("target_modules", ["all-linear", ["q_proj", "v_proj"]])
def test_language_model_only_keeps_adapters_off_the_vision_tower(family_dir, target_modules):
    """`lora.language_model_only` finds each family's language model itself (no module names hard-coded)."""
    import peft

    name, path = family_dir
    adapted_modules = {}
    for language_model_only in (False, True):
        recipe = Recipe()
        recipe.model.name_or_path = str(path)
        recipe.lora.target_modules = target_modules
        recipe.lora.language_model_only = language_model_only
        model = load_model(recipe.model, recipe.quantization)
        decoder_prefix = next(n for n, module in model.named_modules() if module is model.get_decoder())
        peft_model = peft.get_peft_model(model, lora_config(recipe, model))
        adapted_modules[language_model_only] = [
            n for n, module in peft_model.base_model.model.named_modules() if hasattr(module, "lora_A")
        ]
        assert adapted_modules[language_model_only], f"{name}: no module got an adapter"
    outside = [n for n in adapted_modules[False] if not n.startswith(decoder_prefix + ".")]
    # Qwen2-VL's vision blocks fuse q/k/v into one `qkv` layer: q_proj/v_proj only exist in its language model.
    fused_vision_attention = name == "qwen2-vl" and target_modules != "all-linear"
    assert outside or fused_vision_attention, f"{name}: no {target_modules} module outside the language model"
    assert all(n.startswith(decoder_prefix + ".") for n in adapted_modules[True]), adapted_modules[True]
    assert set(adapted_modules[True]) == set(adapted_modules[False]) - set(outside)
