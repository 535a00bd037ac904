"""Benchmark: batched greedy generation (our evaluation) against one sample per `generate` call.

    VLMOPS_CACHE_DIR=/work/main/.cache/vlmops .venv/bin/python bench/generation_batching.py \
        [--samples 150] [--batch-sizes 16,32,50,150] [--max-new-tokens 8] [--repeat 3] [--adapter DIR]

Model: the offline tiny SmolVLM (``tasks.tiny_model.tiny_smolvlm_path()``, float32, no
quantization, the recipe defaults), with a PEFT adapter applied when ``--adapter`` is given.
Samples: ``--samples`` held-out rows of ``builtin:chartqa-synth`` (split "test"), formatted with
``tasks.formatting.to_sft_sample(row, "Answer with a single word or number.")``.

Two ways of getting the same greedy answers:

* per-sample loop, written out as the reference notebooks do it: for each sample, chat template,
  ``processor(text=[prompt], images=[images], return_tensors="pt")``, ``model.generate`` and decode
  the new tokens. Decoding is greedy with the same stop tokens (eos and ``<end_of_utterance>``)
  and ``max_new_tokens`` as our evaluation, so only the batching differs;
* batched: ``tasks.evaluation.generate_answers(model, processor, samples, batch_size, ...)``, left
  padding and one ``generate`` call per batch, for every size in ``--batch-sizes``.

The answers of every batched run must equal the loop's answer for answer; if any differ the script
prints the first mismatches and exits 1 (after writing the JSON). Each way is warmed up once
(untimed), then timed ``--repeat`` times on all samples; the fastest run counts, as other work on the
machine only ever adds time. Prints samples/s per way and batched / loop speed-up (aim >= 5x at
batch size 50) and writes ``bench/results/generation_batching.json`` (git-ignored).

Threads: torch runs on 1 thread unless ``--threads`` says otherwise (0 = torch's default, one per
core). On the shared 2-core development machine a 2-thread torch competing with other processes
spends most of its time in OpenMP synchronisation: one forward pass of the toy model took 0.2-0.5 s
instead of ~6 ms on 1 thread, which makes every `generate` call's fixed cost enormous and both the
timings and the ratio meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks import data, formatting  # noqa: E402
from tasks.config import ModelConfig, QuantizationConfig  # noqa: E402
from tasks.evaluation import generate_answers  # noqa: E402
from tasks.models import load_model, load_processor  # noqa: E402
from tasks.tiny_model import TINY_SMOLVLM, tiny_smolvlm_path  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "generation_batching.json"
SYSTEM_MESSAGE = "Answer with a single word or number."
SOURCE = "builtin:chartqa-synth"
SHOWN_MISMATCHES = 10


def _stop_ids(tokenizer) -> list[int]:
    """The stop tokens `generate_answers` uses: eos and SmolVLM's end of turn."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    return [i for i in {tokenizer.eos_token_id, end_of_turn} if isinstance(i, int) and i >= 0]


@torch.no_grad()
def per_sample_answers(model, processor, samples: list[dict[str, Any]], max_new_tokens: int) -> list[str]:
    """The reference notebooks' way: one processor call and one `generate` call per sample."""
    model.eval()
    tokenizer = processor.tokenizer
    stop_ids = _stop_ids(tokenizer)
    answers: list[str] = []
    for sample in samples:
        prompt = processor.apply_chat_template(sample["prompt"], add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[sample["images"]], return_tensors="pt").to(model.device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers.append(tokenizer.batch_decode(new_tokens, skip_special_tokens=True)[0].strip())
    return answers


def _timed_runs(fn: Callable[[], list[str]], repeat: int) -> tuple[list[float], list[str]]:
    """Warm up once, then time `repeat` runs; returns (seconds per run, answers), answers identical across runs."""
    answers = fn()
    seconds: list[float] = []
    for _ in range(repeat):
        start = time.perf_counter()
        again = fn()
        seconds.append(time.perf_counter() - start)
        if again != answers:
            raise AssertionError("greedy answers changed between runs of the same way")
    return seconds, answers


def _mismatches(reference: list[str], other: list[str]) -> list[dict[str, Any]]:
    return [
        {"index": i, "per_sample": a, "batched": b}
        for i, (a, b) in enumerate(zip(reference, other, strict=True))
        if a != b
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=150, help="held-out rows (default 150)")
    parser.add_argument("--batch-size", type=int, default=50, help="headline batch size (default 50)")
    parser.add_argument(
        "--batch-sizes", default="16,32,50,150", help="comma-separated batch sizes to time (the headline one is added)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per way; the fastest counts (default 3)")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder to apply (default: the bare base)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 0 keeps torch's choice (default 1: see the module docstring)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()} | {args.batch_size})
    torch.manual_seed(0)

    model_config, quantization = ModelConfig(), QuantizationConfig()
    model = load_model(model_config, quantization)
    if args.adapter:
        import peft

        model = peft.PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    processor = load_processor(model_config)
    rows = data.load_sft_rows(SOURCE, "test", args.samples)
    samples = [formatting.to_sft_sample(row, SYSTEM_MESSAGE) for row in rows]
    n = len(samples)
    print(
        f"model {TINY_SMOLVLM} ({tiny_smolvlm_path()}), adapter {args.adapter or 'none'}; {n} samples of {SOURCE} test; "
        f"max_new_tokens {args.max_new_tokens}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"fastest of {args.repeat} after a warm-up",
        flush=True,
    )

    loop_seconds, loop_answers = _timed_runs(
        lambda: per_sample_answers(model, processor, samples, args.max_new_tokens), args.repeat
    )
    print(f"  per-sample loop: {min(loop_seconds):.2f} s", flush=True)
    ways: list[dict[str, Any]] = [
        {
            "way": "per-sample loop",
            "batch_size": 1,
            "seconds": loop_seconds,
            "best_seconds": min(loop_seconds),
            "samples_per_second": n / min(loop_seconds),
            "speedup": 1.0,
            "answers_match": True,
        }
    ]
    all_mismatches: dict[str, list[dict[str, Any]]] = {}
    for size in batch_sizes:
        seconds, answers = _timed_runs(
            lambda size=size: generate_answers(model, processor, samples, size, args.max_new_tokens), args.repeat
        )
        print(f"  batched {size}: {min(seconds):.2f} s", flush=True)
        mismatches = _mismatches(loop_answers, answers)
        if mismatches:
            all_mismatches[str(size)] = mismatches
        ways.append(
            {
                "way": f"generate_answers batch {size}",
                "batch_size": size,
                "seconds": seconds,
                "best_seconds": min(seconds),
                "samples_per_second": n / min(seconds),
                "speedup": min(loop_seconds) / min(seconds),
                "answers_match": not mismatches,
            }
        )

    print()
    print(f"| {'way':<30} | {'seconds':>8} | {'samples/s':>9} | {'vs loop':>7} | answers |")
    print(f"|{'-' * 32}|{'-' * 10}|{'-' * 11}|{'-' * 9}|---------|")
    for way in ways:
        match = "same" if way["answers_match"] else "DIFFER"
        print(
            f"| {way['way']:<30} | {way['best_seconds']:>8.2f} | {way['samples_per_second']:>9.1f} "
            f"| {way['speedup']:>6.2f}x | {match:<7} |"
        )
    headline = next(w for w in ways if w["batch_size"] == args.batch_size and w["way"] != "per-sample loop")
    aim_met = headline["speedup"] >= 5.0
    print(
        f"\nbatch {args.batch_size} / per-sample loop: {headline['speedup']:.2f}x "
        f"(aim >= 5x: {'met' if aim_met else 'NOT met'})"
    )
    distinct = sorted(set(loop_answers))
    print(f"answers: {len(distinct)} distinct, e.g. {distinct[:5]}")

    result = {
        "config": {
            "model": TINY_SMOLVLM,
            "model_path": str(tiny_smolvlm_path()),
            "adapter": args.adapter,
            "dtype": model_config.dtype,
            "attn_implementation": model.config._attn_implementation,
            "source": SOURCE,
            "split": "test",
            "samples": n,
            "system_message": SYSTEM_MESSAGE,
            "max_new_tokens": args.max_new_tokens,
            "batch_sizes": batch_sizes,
            "headline_batch_size": args.batch_size,
            "repeat": args.repeat,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "device": str(model.device),
        },
        "ways": ways,
        "headline_speedup": headline["speedup"],
        "aim_met": aim_met,
        "answers_match": not all_mismatches,
        "mismatches": {size: found[:SHOWN_MISMATCHES] for size, found in all_mismatches.items()},
        "mismatch_counts": {size: len(found) for size, found in all_mismatches.items()},
        "answers": loop_answers,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")

    if all_mismatches:
        print("\nGREEDY ANSWERS DIFFER between the per-sample loop and batched generation:", file=sys.stderr)
        for size, found in all_mismatches.items():
            print(f"  batch {size}: {len(found)} of {n} differ; first ones:", file=sys.stderr)
            for item in found[:SHOWN_MISMATCHES]:
                print(
                    f"    #{item['index']}: per-sample {item['per_sample']!r} != batched {item['batched']!r}",
                    file=sys.stderr,
                )
        return 1
    print("greedy answers identical for every batch size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
