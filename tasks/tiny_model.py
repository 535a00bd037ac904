"""`builtin:tiny-smolvlm`: SmolVLM's architecture at toy size, built offline.

No machine here reaches a model hub, yet the default run must exercise the same code path
as `HuggingFaceTB/SmolVLM-Instruct`. So this module builds, deterministically and once,
a model of the very same classes (transformers' Idefics3: SigLIP-style vision tower, pixel
shuffle connector, Llama text model) with:

- a byte-level BPE tokenizer trained locally with `tokenizers` on the chart vocabulary,
  carrying SmolVLM's special tokens (`<|im_start|>`, `<end_of_utterance>`, `<image>`,
  `<fake_token_around_image>`, `<global-img>`) and SmolVLM's chat template;
- an Idefics3 processor at 64x64 pixels without image splitting: patch 8 gives 64
  patches, pixel shuffle (scale factor 2) gives 16 image tokens;
- weights briefly pretrained to caption synthetic charts ("red 5, blue 2, green 7"), so a
  LoRA adapter adapts a base that can already see. The base then captions instead of
  answering questions, which gives fine-tuning something to teach.

The result is cached under `$VLMOPS_CACHE_DIR` (default `~/.cache/vlmops`) in a folder
named after the build version; a second run reuses it. Building is written by hand
because no library ships a toy SmolVLM.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedTokenizerFast,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from tasks import synthetic

logger = logging.getLogger(__name__)

TINY_SMOLVLM = "builtin:tiny-smolvlm"
# Bump when anything below changes what is built: the cache folder is named after it.
BUILD_VERSION = "v2"

IMAGE_SIZE = 64
PATCH_SIZE = 8
SCALE_FACTOR = 2
# image tokens = (64 / 8)^2 patches / 2^2 pixel-shuffle = 16
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
VOCAB_SIZE = 512
PRETRAIN_STEPS = 500
PRETRAIN_BATCH = 32
PRETRAIN_LR = 1e-3
PRETRAIN_CHARTS = 3000
CAPTION_PROMPT = "Describe the chart."

SPECIAL_TOKENS = [
    "<|endoftext|>",  # padding
    "<|im_start|>",
    "<end_of_utterance>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
]

# SmolVLM-Instruct's chat template (transformers' smolvlm DEFAULT_CHAT_TEMPLATE without the video branch).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def cache_root() -> Path:
    """Folder holding built offline models; `VLMOPS_CACHE_DIR` moves it."""
    return Path(os.environ.get("VLMOPS_CACHE_DIR", Path.home() / ".cache" / "vlmops"))


def tiny_smolvlm_path() -> Path:
    """Return the folder of the built tiny SmolVLM, building it first if it is not cached.

    A file lock keeps two processes (two test workers, say) from building it at once.
    """
    target = cache_root() / f"tiny-smolvlm-{BUILD_VERSION}"
    if (target / "vlmops_build.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".tiny-smolvlm-{BUILD_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "vlmops_build.json").is_file():
            staging = target.parent / f".{target.name}.building"
            shutil.rmtree(staging, ignore_errors=True)
            build_tiny_smolvlm(staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    return target


def _tokenizer_corpus(rng: random.Random) -> list[str]:
    texts = [CAPTION_PROMPT, "Answer with a single word or number.", "System", "User", "Assistant"]
    for _ in range(3000):
        spec = synthetic.sample_chart(rng)
        question, answer, _kind = synthetic.ask_question(spec, rng)
        texts += [synthetic.caption(spec), question, answer]
    for row in synthetic.make_chart_prefs_split("train", 200, seed=12345):
        texts += [row["question"], row["chosen"], row["rejected"]]
    return texts


def build_tokenizer(rng: random.Random) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the chart vocabulary; any text still tokenizes (bytes)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(rng), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=512,
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Idefics3Processor:
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> Idefics3Config:
    return Idefics3Config(
        vision_config=dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        ),
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ),
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _caption_batches(processor: Idefics3Processor, rng: random.Random):
    """Pre-process PRETRAIN_CHARTS captioned charts once; training then samples from them.

    The prompt (chat turn with the image) is identical in length for every chart, so
    prompts stack without padding; captions are right-padded, and their padding and the
    whole prompt are masked out of the loss.
    """
    specs = [synthetic.sample_chart(rng) for _ in range(PRETRAIN_CHARTS)]
    images = [[synthetic.render_chart(spec, IMAGE_SIZE)] for spec in specs]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}],
        add_generation_prompt=True,
    )
    prompt_batch = processor(text=[prompt] * len(specs), images=images, return_tensors="pt")
    captions = [" " + synthetic.caption(spec) + "<end_of_utterance>" for spec in specs]
    caption_batch = processor.tokenizer(captions, padding=True, return_tensors="pt", add_special_tokens=False)
    input_ids = torch.cat([prompt_batch["input_ids"], caption_batch["input_ids"]], dim=1)
    attention_mask = torch.cat([prompt_batch["attention_mask"], caption_batch["attention_mask"]], dim=1)
    labels = input_ids.clone()
    labels[:, : prompt_batch["input_ids"].shape[1]] = -100
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, prompt_batch["pixel_values"], labels


def build_tiny_smolvlm(out_dir: Path, steps: int = PRETRAIN_STEPS, seed: int = 0) -> Path:
    """Build tokenizer, processor and caption-pretrained weights into `out_dir`."""
    started = time.perf_counter()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(rng)
    processor = build_processor(tokenizer)
    model = Idefics3ForConditionalGeneration(build_config(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    input_ids, attention_mask, pixel_values, labels = _caption_batches(processor, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        batch = torch.randint(0, len(input_ids), (PRETRAIN_BATCH,), generator=generator)
        loss = model(
            input_ids=input_ids[batch], attention_mask=attention_mask[batch],
            pixel_values=pixel_values[batch], labels=labels[batch],
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if step % 100 == 0 or step == steps - 1:
            logger.info("tiny-smolvlm pretraining step %d/%d caption loss %.3f", step + 1, steps, loss_value)

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    build_facts = {
        "build_version": BUILD_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_steps": steps,
        "final_caption_loss": round(loss_value, 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / "vlmops_build.json").write_text(json.dumps(build_facts, indent=2))
    logger.info("built tiny-smolvlm in %s: %s", out_dir, build_facts)
    return out_dir
