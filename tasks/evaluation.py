"""Evaluation: the same held-out data, the same decoding, for base, SFT and DPO models.

- Answers come from greedy decoding, batched: prompts are left-padded and each batch is
  one `generate` call (the reference notebooks generate one sample at a time).
- The decoding configuration is fixed (`DECODING`, plus the recipe's max_new_tokens and batch
  size): `decoding_config(recipe)` gives it whole, for the run to record next to the metrics.
- ChartQA relaxed accuracy scores them (tasks/metrics.py), overall and, where the held-out
  samples carry a `question_type` (value, count, argmax, ...), per type: `relaxed_accuracy.<type>`
  with `eval_samples.<type>`, so the overall accuracy is the sample-weighted mean of the types'
  when every sample has a type.
- Preference accuracy: the share of held-out pairs where the model gives the chosen
  answer a higher log-likelihood than the rejected one, and the mean margin between the
  two (sum of completion-token log-probabilities). The same definition serves every
  model, base included, so the three are comparable. The batches come from TRL's own
  preference collator, so the tokens scored are exactly the tokens DPO trained on.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import datasets
import peft
import torch
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from tasks.config import Recipe
from tasks.metrics import relaxed_accuracy, relaxed_match
from tasks.models import load_model, load_processor

logger = logging.getLogger(__name__)

# Greedy decoding, the same for every model: explicit here so a model's own generation_config
# (sampling, beams, penalties) can never change what is compared.
DECODING: dict[str, Any] = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0}
STOP_TOKENS = ("eos_token", "<end_of_utterance>")  # the tokenizer's eos token, the end of an assistant turn
OVERALL = "all"  # the question type of the overall metrics in reports


def decoding_config(recipe: Recipe) -> dict[str, Any]:
    """Everything that fixes the generated answers, flat, for logging as run parameters."""
    settings = recipe.evaluation
    return {
        **DECODING,
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,
        "padding_side": "left",
        "stop_tokens": ",".join(STOP_TOKENS),
    }


def type_metric_key(metric: str, question_type: str) -> str:
    """`relaxed_accuracy.count`: the metric for one question type, a valid MLflow metric name."""
    return f"{metric}.{re.sub(r'[^A-Za-z0-9_./ -]', '_', question_type)}"


def per_type_metrics(predictions: list[dict[str, Any]]) -> dict[str, float]:
    """`relaxed_accuracy.<type>` and `eval_samples.<type>` for each type present (typeless samples skipped)."""
    by_type: dict[str, list[bool]] = {}
    for prediction in predictions:
        if prediction.get("question_type"):
            by_type.setdefault(prediction["question_type"], []).append(bool(prediction["correct"]))
    metrics: dict[str, float] = {}
    for question_type in sorted(by_type):
        correct = by_type[question_type]
        metrics[type_metric_key("relaxed_accuracy", question_type)] = sum(correct) / len(correct)
        metrics[type_metric_key("eval_samples", question_type)] = float(len(correct))
    return metrics


def _answer_text(completion: list[dict[str, Any]]) -> str:
    return "".join(part["text"] for part in completion[0]["content"] if part["type"] == "text")


def _question_text(prompt: list[dict[str, Any]]) -> str:
    user = next(message for message in prompt if message["role"] == "user")
    return "".join(part["text"] or "" for part in user["content"] if part["type"] == "text")


@torch.no_grad()
def generate_answers(model, processor, samples: list[dict[str, Any]], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers (`DECODING`) for formatted SFT samples (prompt + images), one `generate` call per batch."""
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
            **DECODING,
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

    metrics: relaxed_accuracy, preference_accuracy, preference_margin, eval_samples, and per
    question type present: relaxed_accuracy.<type>, eval_samples.<type>.
    predictions: one dict per held-out question, in dataset order (row_index, question_type
    (None when unknown), question, label, prediction, correct).
    """
    settings = recipe.evaluation
    model, processor = load_for_evaluation(recipe, adapter_dir)
    samples = list(datasets.load_from_disk(eval_path))
    pairs = list(datasets.load_from_disk(preference_eval_path))

    answers = generate_answers(model, processor, samples, settings.batch_size, settings.max_new_tokens)
    labels = [_answer_text(sample["completion"]) for sample in samples]
    chosen, rejected = preference_log_likelihoods(model, processor, pairs, settings.batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]

    predictions = [
        {
            "row_index": index,
            "question_type": sample.get("question_type") or None,
            "question": _question_text(sample["prompt"]),
            "label": label,
            "prediction": answer,
            "correct": relaxed_match(answer, label, settings.relaxed_tolerance),
        }
        for index, (sample, label, answer) in enumerate(zip(samples, labels, answers))
    ]
    metrics = {
        "relaxed_accuracy": relaxed_accuracy(answers, labels, settings.relaxed_tolerance),
        "preference_accuracy": sum(m > 0 for m in margins) / len(margins),
        "preference_margin": sum(margins) / len(margins),
        "eval_samples": float(len(samples)),
        **per_type_metrics(predictions),
    }
    logger.info("evaluated %s: %s", adapter_dir or "base", metrics)
    return metrics, predictions
