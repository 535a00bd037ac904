"""builtin:tiny-smolvlm: SmolVLM's classes, tokens and template; deterministic; cached; it can see."""

import random

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Idefics3ForConditionalGeneration

from tasks import synthetic, tiny_model
from tasks.evaluation import generate_answers

SMOLVLM_TOKENS = ["<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>", "<global-img>"]


def test_is_smolvlm_architecture_with_its_special_tokens(tiny_model_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert isinstance(model, Idefics3ForConditionalGeneration)
    vocab = processor.tokenizer.get_vocab()
    for token in SMOLVLM_TOKENS:
        assert token in vocab, token
    assert model.config.image_token_id == vocab["<image>"]


def test_chat_template_and_image_tokens_match_smolvlm(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars are there?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>System: Be brief.<end_of_utterance>\n"
        "User:<image>How many bars are there?<end_of_utterance>\nAssistant:"
    )
    image = synthetic.render_chart(synthetic.ChartSpec(("red", "blue"), (3, 8)))
    ids = processor(text=[prompt], images=[[image]], return_tensors="pt")["input_ids"][0].tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    start = tokens.index("<fake_token_around_image>")
    expected = ["<fake_token_around_image>", "<global-img>"] + ["<image>"] * tiny_model.IMAGE_SEQ_LEN + ["<fake_token_around_image>"]
    assert tokens[start : start + len(expected)] == expected


def test_build_is_deterministic(tmp_path):
    first = tiny_model.build_tiny_smolvlm(tmp_path / "a", steps=3)
    second = tiny_model.build_tiny_smolvlm(tmp_path / "b", steps=3)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_second_use_reuses_the_cache(tiny_model_dir, monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError("the cached tiny model was rebuilt")

    monkeypatch.setattr(tiny_model, "build_tiny_smolvlm", must_not_build)
    assert tiny_model.tiny_smolvlm_path() == tiny_model_dir


def test_pretrained_base_captions_the_charts_it_sees(tiny_model_dir):
    """The caption pretraining worked: the base names the bars' colours of unseen charts."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    rng = random.Random(2024)
    specs = [synthetic.sample_chart(rng) for _ in range(40)]
    samples = [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": tiny_model.CAPTION_PROMPT}]}],
            "images": [synthetic.render_chart(spec)],
        }
        for spec in specs
    ]
    captions = generate_answers(model, processor, samples, batch_size=20, max_new_tokens=24)
    right_colours = sum(
        sorted(part.split()[0] for part in caption.split(", ") if part) == sorted(spec.colors)
        for caption, spec in zip(captions, specs)
    )
    assert right_colours >= 0.7 * len(specs), list(zip(captions[:5], specs[:5]))
