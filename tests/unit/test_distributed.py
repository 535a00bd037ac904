"""DDP scale-out: SFT on 2 CPU processes (gloo) under torchrun, and a failing launch."""

import hashlib
import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tasks.config import recipe_from_dict
from tasks.data import CHARTQA_SYNTH, load_sft_rows
from tasks.distributed import DistributedTrainingError, failure_summary, launch_training, read_rank_reports
from tasks.formatting import save_sft_dataset

SYSTEM = "Answer with a single word or number."
MAX_STEPS = 3


def _saved_adapter_digest(adapter_dir: Path) -> str:
    """tasks.training.adapter_digest recomputed from the saved file.

    The digest runs over the live model's trainable parameters by name; PEFT saves them
    without the adapter name ("lora_A.weight" for the parameter "lora_A.default.weight").
    """
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora_key = re.compile(r"\.(lora_[AB]|lora_embedding_[AB])\.")
    named = {lora_key.sub(r".\1.default.", key): value for key, value in weights.items()}
    digest = hashlib.sha256()
    for name in sorted(named):
        digest.update(name.encode())
        digest.update(named[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    return save_sft_dataset(load_sft_rows(CHARTQA_SYNTH, "train", 16), SYSTEM, tmp_path_factory.mktemp("ddp") / "sft")


def _recipe(**overrides):
    return recipe_from_dict({
        "quantization": {"mode": "4bit"},
        "resources": {"num_processes": 2},
        "sft": {"max_steps": MAX_STEPS, "per_device_train_batch_size": 2, "logging_steps": 1},
        **overrides,
    })


def test_sft_on_two_processes_ends_with_identical_adapters(tiny_model_dir, sft_data, tmp_path):
    # tiny_model_dir builds the model once here, so the two ranks only load it.
    adapter_dir = launch_training("sft", _recipe(), tmp_path / "out", train_path=sft_data)

    reports = [json.loads((tmp_path / "out" / "ranks" / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(p.name for p in (tmp_path / "out" / "ranks").iterdir()) == ["rank-0.json", "rank-1.json"]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["global_step"] for r in reports] == [MAX_STEPS, MAX_STEPS]
    assert reports[0]["adapter_sha256"] == reports[1]["adapter_sha256"]
    # Rank 0 alone saved, once: one adapter folder, holding the weights both ranks agreed on.
    assert adapter_dir == tmp_path / "out" / "adapter"
    assert [p.parent for p in (tmp_path / "out").rglob("adapter_config.json")] == [adapter_dir]
    assert _saved_adapter_digest(adapter_dir) == reports[0]["adapter_sha256"]


def test_a_failing_worker_raises_with_its_error(tiny_model_dir, tmp_path):
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(DistributedTrainingError) as raised:
        launch_training("sft", _recipe(), tmp_path / "out", train_path=missing)
    message = str(raised.value)
    assert "exited with code 1" in message
    assert str(missing) in message  # the worker's own error, carried from its traceback


def _write_ranks(folder: Path, *reports: dict) -> Path:
    folder.mkdir()
    for report in reports:
        (folder / f"rank-{report['rank']}.json").write_text(json.dumps(report))
    return folder


def _rank(rank: int, world_size: int = 2, global_step: int = 3, adapter_sha256: str = "aa") -> dict:
    return {"rank": rank, "world_size": world_size, "global_step": global_step, "adapter_sha256": adapter_sha256}


@pytest.mark.parametrize(("second", "expected"), [
    (_rank(1, adapter_sha256="bb"), "DDP desync"),
    (_rank(1, global_step=2), "different optimizer steps"),
    (_rank(1, world_size=1), "expected world size 2"),
    (None, r"ranks \[1\] of 2 wrote no summary"),
])
def test_rank_reports_that_disagree_are_refused(tmp_path, second, expected):
    ranks = _write_ranks(tmp_path / "ranks", _rank(0), *([second] if second else []))
    with pytest.raises(DistributedTrainingError, match=expected):
        read_rank_reports(ranks, 2)


def test_rank_reports_that_agree_come_back_in_rank_order(tmp_path):
    ranks = _write_ranks(tmp_path / "ranks", _rank(1), _rank(0))
    assert [r["rank"] for r in read_rank_reports(ranks, 2)] == [0, 1]


def test_failure_summary_is_torchruns_root_cause_block_or_the_log_tail():
    log = [f"line {i}" for i in range(100)]
    assert failure_summary(log) == log[-30:]
    with_cause = log + ["Root Cause (first observed failure):", "  rank : 1", "  ValueError: boom"]
    assert failure_summary(with_cause) == with_cause[-3:]
