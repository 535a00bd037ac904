"""GPU benchmark: the SmolVLM recipe's LoRA training step in bf16 against 4-bit QLoRA, at real layer shapes.

    .venv/bin/python bench/gpu_training.py                       # full depth, batch 4, 1 tile + 100 text tokens
    .venv/bin/python bench/gpu_training.py --text-layers 8 --vision-layers 9 --steps 5
    .venv/bin/python bench/gpu_training.py --dry-run-cpu         # tiny model on CPU: smoke test of this code path

Needs a CUDA GPU: without one it says so and exits 0 before importing torch (``--dry-run-cpu`` aside).

Model: a random Idefics3 with `HuggingFaceTB/SmolVLM-Instruct`'s layer shapes
(`tasks.memory.smolvlm_instruct_config`; full depth 24 text + 27 vision layers = 2.25B parameters
by default, fewer with ``--text-layers`` / ``--vision-layers``), saved once in bf16 safetensors to a
temporary folder and loaded twice through `tasks.models.load_model`, the pipeline's path:

* ``bf16 LoRA``: bf16 weights, moved to the GPU;
* ``4-bit QLoRA``: NF4 with double quantization and bf16 compute (the recipe's quantization), then
  `peft.prepare_model_for_kbit_training` as `tasks/training.py` does it. Note that this casts every
  non-quantized parameter (embeddings, lm_head, norms, biases) to float32: for SmolVLM that is
  201M embedding parameters at 4 bytes instead of 2, reported as "after prep". The adapter weights
  are then cast to bf16, as TRL's SFTTrainer does for a quantized base (PEFT makes them float32;
  the bf16 run keeps PEFT's float32 adapters, as the SFTTrainer does there).

Both get the recipe's LoRA adapter (configs/smolvlm-chartqa.yaml: r 8, alpha 8, dropout 0.1, Gaussian
init, targets q/k/v/o/gate/up/down_proj; PEFT matches q/k/v_proj in the SigLIP tower too) and
gradient checkpointing (non-reentrant, transformers 5's default), and run under bf16 autocast with
AdamW (lr 1e-4, weight decay 0.01) on the adapter's parameters, as the HF Trainer does with
``bf16: true``. The recipe also sets ``use_dora: true``; DoRA recomputes each weight's norm every
step (dequantizing the whole 4-bit weight), so it is a separate measurement: ``--use-dora``.

Sequence (per sample, stated in the output): ``--image-tiles`` 384 px frames, each
``<fake_token_around_image>`` + 81 ``<image>`` tokens ((384 / 14)^2 = 729 SigLIP patches, pixel
shuffle 3 -> 81), a closing ``<fake_token_around_image>``, then ``--text-tokens`` text tokens
(default 100), labels on the text only. Default 1 tile: 1 x 82 + 1 + 100 = 183 tokens. SmolVLM's
processor splits a real chart into up to 4 x 4 tiles of 384 px plus a global view; a 4:3 ChartQA
chart becomes 4 x 3 + 1 = 13 tiles, 1,053 image tokens (``--image-tiles 13``).

Why a plain PyTorch/PEFT loop rather than TRL's SFTTrainer: the point is the training step itself
(forward, backward, optimizer) on identical synthetic batches, so the loop times exactly that, with
``torch.cuda.synchronize()`` around each step and the peak-memory counter reset right before the
warm-up; the Trainer would add a dataloader, TRL's collator (tokenising and image processing on the
CPU), logging and callbacks to the timed path. The model side is set up the way the pipeline's
SFTTrainer gets it (same loader, same k-bit preparation, PEFT LoRA, checkpointing, bf16 autocast).

Reports per mode: tokens/s (all positions, image tokens included) and samples/s over the timed
steps, median step time, weights on the GPU after loading and after preparation (with
`tasks.memory`'s estimate beside the former), and peak `torch.cuda.max_memory_allocated` during
training; then QLoRA / bf16 ratios. Results: `bench/results/gpu_training.json` (``--json``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gpu_training.json"

# The recipe's adapter (configs/smolvlm-chartqa.yaml), written out so this script runs without it.
LORA = {
    "r": 8,
    "lora_alpha": 8,
    "lora_dropout": 0.1,
    "target_modules": ["down_proj", "o_proj", "k_proj", "q_proj", "gate_proj", "up_proj", "v_proj"],
    "init_lora_weights": "gaussian",
}
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01
# SmolVLM-Instruct's vocabulary: <fake_token_around_image> 49152, <image> 49153.
FAKE_IMAGE_TOKEN_ID, IMAGE_TOKEN_ID = 49152, 49153
MODES = ("bf16 LoRA", "4-bit QLoRA")


def _nvidia_gpu_present() -> bool:
    """An NVIDIA driver on this machine, checked without importing torch."""
    return os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-layers", type=int, default=24, help="Llama decoder layers (default 24, full depth)")
    parser.add_argument("--vision-layers", type=int, default=27, help="SigLIP encoder layers (default 27, full depth)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples a step (default 4, the recipe's)")
    parser.add_argument("--image-tiles", type=int, default=1, help="384 px frames a sample, 81 image tokens each")
    parser.add_argument("--text-tokens", type=int, default=100, help="text tokens a sample (default 100)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--use-dora", action="store_true", help="DoRA, as the recipe's use_dora: true (default off)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {list(MODES)}")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the random checkpoint (default: temp)")
    parser.add_argument("--json", type=Path, default=RESULTS, help="results file (default bench/results/gpu_training.json)")
    parser.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="tiny model (same widths' roles, toy sizes) on the CPU, 1 warm-up + 2 steps: a smoke test, no numbers",
    )
    args = parser.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {list(MODES)}")
    return args


# ---------------------------------------------------------------------------------------------
# Everything below runs only once we know there is a GPU (or --dry-run-cpu): torch is imported lazily.


def build_config(args: argparse.Namespace):
    """SmolVLM-Instruct's shapes, or a toy Idefics3 with the same vocabulary for the CPU dry run."""
    from transformers import Idefics3Config

    from tasks.memory import smolvlm_instruct_config

    if not args.dry_run_cpu:
        return smolvlm_instruct_config(args.text_layers, args.vision_layers)
    return Idefics3Config(
        text_config={
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 49155, "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "patch_size": 14, "image_size": 84,  # 6 x 6 patches, pixel shuffle 3 -> 4 image tokens
        },
        scale_factor=3,
        image_token_id=IMAGE_TOKEN_ID,
        vocab_size=49155,
        tie_word_embeddings=False,
    )


def image_seq_len(config) -> int:
    """Image tokens a frame: (image_size // patch_size)^2 patches / scale_factor^2 (Idefics3Model's formula)."""
    vision = config.vision_config
    return int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor**2)


def save_random_model(config, out_dir: Path, device: str) -> int:
    """A randomly initialised Idefics3 in bf16 safetensors (built on `device`: fast init on a GPU)."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = Idefics3ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return params


def synthetic_batch(config, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """One batch shaped like the recipe's: image frames, their tokens, text tokens with labels."""
    import torch

    generator = torch.Generator().manual_seed(0)
    batch, tiles, per_tile = args.batch_size, args.image_tiles, image_seq_len(config)
    image_part = ([FAKE_IMAGE_TOKEN_ID] + [IMAGE_TOKEN_ID] * per_tile) * tiles + [FAKE_IMAGE_TOKEN_ID]
    text = torch.randint(0, FAKE_IMAGE_TOKEN_ID, (batch, args.text_tokens), generator=generator)
    input_ids = torch.cat([torch.tensor(image_part).expand(batch, -1), text], dim=1)
    labels = input_ids.clone()
    labels[:, : len(image_part)] = -100  # no loss on the image part, as TRL's collator masks it
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch, tiles, 3, size, size, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device, torch.bfloat16),
        "labels": labels.to(device),
    }


def prepare_model(model_dir: Path, config, mode: str, args: argparse.Namespace, device: str):
    """Load the checkpoint for `mode` the pipeline's way, add the LoRA adapter, turn checkpointing on.

    Returns (peft model, memory facts in bytes: estimate, allocated after load, after preparation).
    """
    import peft
    import torch

    from tasks.config import ModelConfig, QuantizationConfig
    from tasks.memory import estimate_weight_memory
    from tasks.models import load_model

    quantization = (
        QuantizationConfig(mode="4bit", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype="bfloat16")
        if mode == "4-bit QLoRA"
        else QuantizationConfig(mode="none")
    )
    estimate = estimate_weight_memory(config, "bfloat16", quantization.mode)
    on_gpu = device == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        base_allocated = torch.cuda.memory_allocated()
    model = load_model(ModelConfig(name_or_path=str(model_dir), dtype="bfloat16"), quantization)
    if quantization.mode == "none":
        model.to(device)  # bitsandbytes places 4-bit weights on the GPU itself; plain loading stays on the CPU
    after_load = torch.cuda.memory_allocated() - base_allocated if on_gpu else None
    if quantization.mode != "none":
        # As tasks/training.py: freezes the base, casts non-4-bit parameters to float32.
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model.activation_checkpointing_enable()  # non-reentrant, transformers 5's default (the Trainer's call)
    model.enable_input_require_grads()
    lora = peft.LoraConfig(task_type="CAUSAL_LM", use_dora=args.use_dora, **LORA)
    model = peft.get_peft_model(model, lora)
    if quantization.mode != "none":
        # As TRL's SFTTrainer does for a quantized base (QLoRA paper): adapter weights in bf16,
        # DoRA's magnitude vector left in float32.
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    after_prep = torch.cuda.memory_allocated() - base_allocated if on_gpu else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, {
        "estimate_bytes": estimate.total_bytes,
        "allocated_after_load_bytes": after_load,
        "allocated_after_prep_bytes": after_prep,
        "trainable_params": trainable,
    }


def train_steps(model, batch: dict[str, Any], args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Warm-up steps, then timed steps; each step forward + backward + AdamW on the adapter."""
    import torch

    on_gpu = device == "cuda"
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
        fused=on_gpu,
    )
    model.train()

    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def step(check_gradients: bool = False) -> float:
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        if check_gradients:  # untimed in effect: only the first warm-up step, which is not counted
            missing = [name for name, p in trainable if p.grad is None]
            if missing:
                raise RuntimeError(
                    f"{len(missing)} of {len(trainable)} adapter tensors got no gradient, e.g. {missing[:3]}"
                )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()}")
        return time.perf_counter() - start

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    warmup = [step(check_gradients=i == 0) for i in range(args.warmup_steps)]
    timed = [step() for _ in range(args.steps)]
    seconds = sum(timed)
    tokens = batch["input_ids"].numel() * len(timed)
    return {
        "warmup_step_seconds": warmup,
        "step_seconds": timed,
        "median_step_seconds": sorted(timed)[len(timed) // 2],
        "tokens_per_second": tokens / seconds,
        "samples_per_second": args.batch_size * len(timed) / seconds,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if on_gpu else None,
    }


def _fmt(n: int | None) -> str:
    from tasks.memory import format_bytes

    return "n/a" if n is None else format_bytes(n)


def run(args: argparse.Namespace) -> int:
    import gc

    import torch

    device = "cpu" if args.dry_run_cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_training.py needs a CUDA GPU; torch sees none (CPU-only torch build?). Nothing measured.")
        return 0
    if args.dry_run_cpu:
        torch.set_num_threads(1)
        args.warmup_steps, args.steps = 1, 2
    config = build_config(args)
    seq_len = args.image_tiles * (1 + image_seq_len(config)) + 1 + args.text_tokens
    modes = [m for m in MODES if m in args.modes.split(",")]
    environment = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None,
        "platform": platform.platform(),
    }
    print(
        f"{environment['device']}; torch {torch.__version__}; random Idefics3 "
        f"{'at TOY SIZE (dry run)' if args.dry_run_cpu else 'at SmolVLM-Instruct shapes'}, "
        f"{config.text_config.num_hidden_layers} text + "
        f"{config.vision_config.num_hidden_layers} vision layers; batch {args.batch_size} x {seq_len} tokens "
        f"({args.image_tiles} x {image_seq_len(config)} image tokens + {args.image_tiles + 1} image delimiters + "
        f"{args.text_tokens} text); LoRA r {LORA['r']} alpha {LORA['lora_alpha']}{' DoRA' if args.use_dora else ''}; "
        f"gradient checkpointing; {args.warmup_steps} warm-up + {args.steps} timed steps",
        flush=True,
    )

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vlmops-gpu-training-", dir=args.workdir) as tmp:
        model_dir = Path(tmp)
        start = time.perf_counter()
        params = save_random_model(config, model_dir, device)
        print(f"random model: {params / 1e9:.3f}B parameters, saved in {time.perf_counter() - start:.1f} s", flush=True)
        batch = synthetic_batch(config, args, device)
        for mode in modes:
            start = time.perf_counter()
            model, memory = prepare_model(model_dir, config, mode, args, device)
            load_seconds = time.perf_counter() - start
            try:
                timing = train_steps(model, batch, args, device)
            except torch.OutOfMemoryError as error:
                timing = {"error": f"out of memory: {error}".splitlines()[0]}
            results[mode] = {"load_seconds": load_seconds, **memory, **timing}
            print(
                f"  {mode}: loaded + prepared in {load_seconds:.1f} s, "
                f"{memory['trainable_params']:,} adapter parameters; "
                + (timing["error"] if "error" in timing else
                   f"{timing['tokens_per_second']:,.0f} tokens/s, peak {_fmt(timing['peak_allocated_bytes'])}"),
                flush=True,
            )
            del model
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()

    print(
        f"\n| {'mode':<12} | {'tokens/s':>9} | {'samples/s':>9} | {'step s':>7} | {'weights':>10} | {'estimate':>10} "
        f"| {'after prep':>10} | {'peak alloc':>10} |"
    )
    print(f"|{'-' * 14}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    for mode, r in results.items():
        if "error" in r:
            print(f"| {mode:<12} | {r['error'][:80]} |")
            continue
        print(
            f"| {mode:<12} | {r['tokens_per_second']:>9,.0f} | {r['samples_per_second']:>9.2f} "
            f"| {r['median_step_seconds']:>7.3f} | {_fmt(r['allocated_after_load_bytes']):>10} "
            f"| {_fmt(r['estimate_bytes']):>10} | {_fmt(r['allocated_after_prep_bytes']):>10} "
            f"| {_fmt(r['peak_allocated_bytes']):>10} |"
        )
    ratios: dict[str, float | None] = {}
    bf16, qlora = results.get("bf16 LoRA", {}), results.get("4-bit QLoRA", {})
    if "tokens_per_second" in bf16 and "tokens_per_second" in qlora:
        ratios["tokens_per_second_qlora_over_bf16"] = qlora["tokens_per_second"] / bf16["tokens_per_second"]
        if bf16["peak_allocated_bytes"]:
            ratios["peak_memory_qlora_over_bf16"] = qlora["peak_allocated_bytes"] / bf16["peak_allocated_bytes"]
        print(
            "\nQLoRA / bf16: "
            + ", ".join(f"{k.replace('_qlora_over_bf16', '').replace('_', ' ')} {v:.3f}" for k, v in ratios.items())
        )
    if args.dry_run_cpu:
        print("dry run on CPU at toy size: the code path ran; the numbers mean nothing")

    result = {
        "config": {
            "text_layers": config.text_config.num_hidden_layers,
            "vision_layers": config.vision_config.num_hidden_layers,
            "params": params,
            "batch_size": args.batch_size,
            "image_tiles": args.image_tiles,
            "image_tokens_per_tile": image_seq_len(config),
            "text_tokens": args.text_tokens,
            "seq_len": seq_len,
            "lora": {**LORA, "use_dora": args.use_dora},
            "learning_rate": LEARNING_RATE,
            "gradient_checkpointing": True,
            "autocast": "bfloat16",
            "warmup_steps": args.warmup_steps,
            "steps": args.steps,
            "dry_run_cpu": args.dry_run_cpu,
        },
        "environment": environment,
        "modes": results,
        "ratios": ratios,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results.values()) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run_cpu and not _nvidia_gpu_present():
        print("bench/gpu_training.py needs a CUDA GPU and found none; nothing measured "
              "(--dry-run-cpu runs a CPU smoke test).")
        return 0
    sys.path.insert(0, str(ROOT))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
