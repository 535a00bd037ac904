"""Evaluation: the same held-out data, the same decoding, for base, SFT and DPO models.

- Answers come from greedy decoding, batched: prompts are left-padded and each batch is
  one `generate` call (the reference notebooks generate one sample at a time).
- ChartQA relaxed accuracy scores them (tasks/metrics.py).
- Preference accuracy: the share of held-out pairs where the model gives the chosen
  answer a higher log-likelihood than the rejected one, and the mean margin between the
  two (sum of completion-token log-probabilities). The same definition serves every
  model, base included, so the three are comparable. The batches come from TRL's own
  preference collator, so the tokens scored are exactly the tokens DPO trained on.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import peft
import torch
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from tasks.config import Recipe
from tasks.metrics import relaxed_accuracy, relaxed_match
from tasks.models import load_model, load_processor

logger = logging.getLogger(__name__)


def _answer_text(completion: list[dict[str, Any]]) -> str:
    return "".join(part["text"] for part in completion[0]["content"] if part["type"] == "text")


def _question_text(prompt: list[dict[str, Any]]) -> str:
    user = next(message for message in prompt if message["role"] == "user")
    return "".join(part["text"] or "" for part in user["content"] if part["type"] == "text")


@torch.no_grad()
def generate_answers(model, processor, samples: list[dict[str, Any]], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers for formatted SFT samples (prompt + images), one `generate` call per batch."""
    model.eval()
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    stop_ids = [i for i in {tokenizer.eos_token_id, end_of_turn} if isinstance(i, int) and i >= 0]
    answers: list[str] = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        prompts = [processor.apply_chat_template(s["prompt"], add_generation_prompt=True) for s in batch]
        inputs = processor(
            text=prompts,
            images=[s["images"] for s in batch],
            padding=True,
            padding_side="left",  # generation continues from the right end of every row
            return_tensors="pt",
            add_special_tokens=False,
        ).to(model.device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


@torch.no_grad()
def preference_log_likelihoods(model, processor, pairs: list[dict[str, Any]], batch_size: int) -> tuple[list[float], list[float]]:
    """Summed completion log-probabilities of chosen and of rejected answers, pair by pair."""
    model.eval()
    collator = DataCollatorForVisionPreference(processor=processor)
    chosen: list[float] = []
    rejected: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = [dict(pair) for pair in pairs[start : start + batch_size]]  # the collator edits its input
        inputs = collator(batch)
        completion_mask = inputs.pop("completion_mask")
        inputs = {key: value.to(model.device) for key, value in inputs.items()}
        logits = model(**inputs).logits[:, :-1].float()
        targets = inputs["input_ids"][:, 1:]
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        sums = (token_logps * completion_mask[:, 1:].to(token_logps.device)).sum(dim=1).cpu()
        # The collator stacks all chosen completions first, then all rejected ones.
        half = len(batch)
        chosen += sums[:half].tolist()
        rejected += sums[half:].tolist()
    return chosen, rejected


def load_for_evaluation(recipe: Recipe, adapter_dir: str | None):
    """Base model (quantized as in training) with the adapter applied, or the bare base for None."""
    model = load_model(recipe.model, recipe.quantization)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    return model, load_processor(recipe.model)


def evaluate_model(
    recipe: Recipe, adapter_dir: str | None, eval_path: str, preference_eval_path: str
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score one model on the held-out split: returns (metrics, predictions).

    metrics: relaxed_accuracy, preference_accuracy, preference_margin, eval_samples.
    predictions: one dict per held-out question (question, label, prediction, correct).
    """
    settings = recipe.evaluation
    model, processor = load_for_evaluation(recipe, adapter_dir)
    samples = list(datasets.load_from_disk(eval_path))
    pairs = list(datasets.load_from_disk(preference_eval_path))

    answers = generate_answers(model, processor, samples, settings.batch_size, settings.max_new_tokens)
    labels = [_answer_text(sample["completion"]) for sample in samples]
    chosen, rejected = preference_log_likelihoods(model, processor, pairs, settings.batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]

    metrics = {
        "relaxed_accuracy": relaxed_accuracy(answers, labels, settings.relaxed_tolerance),
        "preference_accuracy": sum(m > 0 for m in margins) / len(margins),
        "preference_margin": sum(margins) / len(margins),
        "eval_samples": float(len(samples)),
    }
    predictions = [
        {
            "question": _question_text(sample["prompt"]),
            "label": label,
            "prediction": answer,
            "correct": relaxed_match(answer, label, settings.relaxed_tolerance),
        }
        for sample, label, answer in zip(samples, labels, answers)
    ]
    logger.info("evaluated %s: %s", adapter_dir or "base", metrics)
    return metrics, predictions
