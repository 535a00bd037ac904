"""Scale-out: run the same SFT / DPO entry point under torchrun (DDP) and check the ranks agreed.

`launch_training` starts

    python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node N \\
        -m tasks.distributed {sft,dpo} --recipe recipe.json --output-dir ... --train-path ...

with the interpreter that runs this code (so the same virtual environment), streams the
launcher's output line by line to this module's logger and into `output_dir/torchrun.log`,
and afterwards reads the per-rank summaries that `tasks.training` writes
(`output_dir/ranks/rank-{rank}.json`: rank, world_size, global_step, adapter_sha256). DDP
keeps replicas identical by all-reducing gradients; identical adapter hashes on every rank
prove it did, and a mismatch is reported as a desync rather than silently saving rank 0.

The backend follows the hardware: on CPU `tasks.training` forces `ddp_backend="gloo"`; on
GPUs the HF Trainer picks NCCL. The command is the same on both.

FSDP and DeepSpeed configurations live in `infra/` and are passed through `accelerate
launch`, not through this module: this module only does plain data-parallel replicas
(one full model per process), which is what a LoRA adapter on a small base needs.
`accelerate launch --cpu --num_processes 2` started a single process on this machine,
which is why plain torchrun is used here.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from torch.distributed.elastic.multiprocessing.errors import record

if TYPE_CHECKING:
    # tasks.config pulls in transformers and peft (about 10 s of CPU here); the workers import
    # it only after checking their inputs, so that a bad path fails in seconds.
    from tasks.config import Recipe

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL_LINES = 30
# torchrun closes a failed job with this block, holding the first failing rank's traceback.
ROOT_CAUSE_MARKER = "Root Cause (first observed failure):"
Stage = Literal["sft", "dpo"]


class DistributedTrainingError(RuntimeError):
    """A torchrun training job failed, or its ranks finished in disagreement."""


def torchrun_command(stage: Stage, num_processes: int, worker_args: list[str]) -> list[str]:
    """The torchrun command line that runs `python -m tasks.distributed <stage> ...` on every rank."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        # --standalone: a c10d rendezvous store on a free local port, so parallel jobs never collide.
        "--standalone", "--nnodes", "1", "--nproc_per_node", str(num_processes),
        "-m", "tasks.distributed", stage, *worker_args,
    ]


def _worker_args(
    recipe_path: Path,
    output_dir: Path,
    train_path: Path,
    sft_adapter_dir: Path | None,
    eval_path: Path | None,
    report_to: list[str] | None,
) -> list[str]:
    args = ["--recipe", str(recipe_path), "--output-dir", str(output_dir), "--train-path", str(train_path)]
    if sft_adapter_dir is not None:
        args += ["--sft-adapter", str(sft_adapter_dir)]
    if eval_path is not None:
        args += ["--eval-path", str(eval_path)]
    if report_to:
        args += ["--report-to", *report_to]
    return args


def _child_env(num_processes: int, extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # torchrun would set OMP_NUM_THREADS=1 (with a warning) when it is unset; sharing the
    # cores the job may use between the ranks instead keeps a many-core CPU machine busy
    # without oversubscribing it.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // num_processes)))
    env["PYTHONUNBUFFERED"] = "1"  # the launcher's own messages arrive as they happen
    # Progress bars redrawn through a pipe become one log line per redraw; the Trainer still
    # prints its metrics every logging_steps without them.
    env.setdefault("TQDM_DISABLE", "1")
    # `-m tasks.distributed` must import this checkout, from any working directory, even when
    # the package is not installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def _run_streaming(command: list[str], env: dict[str, str], log_path: Path) -> tuple[int, list[str]]:
    """Run `command`, logging each output line; returns (exit code, last lines of output).

    The child runs in its own process group so that an interrupted parent (a cancelled
    Prefect task, Ctrl-C) takes every rank down with it instead of leaving orphans.
    """
    tail: collections.deque[str] = collections.deque(maxlen=10 * LOG_TAIL_LINES)
    with log_path.open("w", encoding="utf-8") as log_file:
        # The caller's working directory, not the repository's: relative paths in the recipe or
        # the environment (a local model folder, MLflow's default sqlite:///mlflow.db) must
        # mean in the workers what they mean here. PYTHONPATH makes `tasks` importable.
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                line = line.rstrip("\n")
                log_file.write(line + "\n")
                log_file.flush()
                tail.append(line)
                logger.info("%s", line)
            return process.wait(), list(tail)
        except BaseException:
            _stop_process_group(process)
            raise


def failure_summary(tail: list[str]) -> list[str]:
    """The part of a failed job's output that explains it.

    torchrun's root-cause block when present (it carries the failing rank's traceback, recorded
    by @record on `main`), else the last LOG_TAIL_LINES lines.
    """
    starts = [i for i, line in enumerate(tail) if ROOT_CAUSE_MARKER in line]
    return tail[starts[-1]:] if starts else tail[-LOG_TAIL_LINES:]


def _stop_process_group(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    # torchrun forwards SIGTERM to its workers; SIGKILL the group only if that is ignored.
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def read_rank_reports(ranks_dir: Path, num_processes: int) -> list[dict]:
    """The per-rank summaries, checked to agree. Raises DistributedTrainingError otherwise.

    Every rank must have reported, all with the same world size (= num_processes), the same
    optimizer step count and the same adapter hash: DDP averages gradients across ranks, so
    diverging weights mean the replicas were not synchronised.
    """
    reports = {}
    for path in sorted(ranks_dir.glob("rank-*.json")):
        report = json.loads(path.read_text())
        reports[report["rank"]] = report
    missing = sorted(set(range(num_processes)) - set(reports))
    if missing:
        raise DistributedTrainingError(
            f"ranks {missing} of {num_processes} wrote no summary under {ranks_dir} "
            f"(found {sorted(reports)}); did training.py run with world size {num_processes}?"
        )
    ordered = [reports[rank] for rank in range(num_processes)]

    def disagree(key: str) -> dict[int, object] | None:
        values = {r["rank"]: r[key] for r in ordered}
        return values if len(set(values.values())) > 1 else None

    world_sizes = {r["rank"]: r["world_size"] for r in ordered}
    if set(world_sizes.values()) != {num_processes}:
        raise DistributedTrainingError(f"expected world size {num_processes}, ranks report {world_sizes}")
    if steps := disagree("global_step"):
        raise DistributedTrainingError(f"ranks stopped at different optimizer steps: {steps}")
    if hashes := disagree("adapter_sha256"):
        raise DistributedTrainingError(f"DDP desync: the ranks finished with different adapter weights: {hashes}")
    return ordered


def launch_training(
    stage: Stage,
    recipe: Recipe,
    output_dir: Path,
    *,
    train_path: Path,
    sft_adapter_dir: Path | None = None,
    eval_path: Path | None = None,
    report_to: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Path:
    """Train `stage` with `recipe.resources.num_processes` DDP ranks; returns the adapter folder.

    `train_path` is the SFT dataset for "sft" and the preference dataset for "dpo" (which
    also needs `sft_adapter_dir`). `env` entries are added to the workers' environment,
    e.g. MLFLOW_RUN_ID / MLFLOW_TRACKING_URI so the Trainer's MLflow callback on rank 0 logs
    into the caller's run.

    With num_processes 1 it still works (one rank, nothing to compare), though calling
    tasks.training directly saves the torchrun start.

    Raises DistributedTrainingError when torchrun exits non-zero (the message carries the
    exit code and the end of the log, where torchrun repeats the failing rank's traceback),
    when a rank wrote no summary, when the ranks disagree, or when no adapter was saved.
    """
    if stage == "dpo" and sft_adapter_dir is None:
        raise ValueError("DPO starts from an SFT adapter: pass sft_adapter_dir")
    num_processes = recipe.resources.num_processes
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    ranks_dir = output_dir / "ranks"
    # Summaries left by an earlier attempt (a Prefect retry) must not vouch for this one.
    for stale in ranks_dir.glob("rank-*.json"):
        stale.unlink()

    recipe_path = output_dir / "recipe.json"
    recipe_path.write_text(json.dumps(recipe.model_dump(mode="json"), indent=2))
    worker_args = _worker_args(
        recipe_path,
        output_dir,
        Path(train_path).resolve(),
        Path(sft_adapter_dir).resolve() if sft_adapter_dir is not None else None,
        Path(eval_path).resolve() if eval_path is not None else None,
        report_to,
    )
    command = torchrun_command(stage, num_processes, worker_args)
    log_path = output_dir / "torchrun.log"
    logger.info("%s on %d processes: %s", stage.upper(), num_processes, " ".join(command))

    exit_code, tail = _run_streaming(command, _child_env(num_processes, env), log_path)
    if exit_code != 0:
        summary = "\n".join(failure_summary(tail))
        raise DistributedTrainingError(
            f"torchrun {stage} exited with code {exit_code} (full log: {log_path}):\n{summary}"
        )

    # A single process has nothing to agree with, and training.py writes no summary for it.
    reports = read_rank_reports(ranks_dir, num_processes) if num_processes > 1 else None
    adapter_dir = output_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DistributedTrainingError(f"torchrun {stage} finished but saved no adapter in {adapter_dir}")
    if reports:
        logger.info(
            "%s done on %d ranks: %d steps, adapter sha256 %s -> %s",
            stage.upper(), num_processes, reports[0]["global_step"], reports[0]["adapter_sha256"][:12], adapter_dir,
        )
    return adapter_dir


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.distributed", description="One DDP rank of SFT or DPO.")
    parser.add_argument("stage", choices=["sft", "dpo"])
    parser.add_argument("--recipe", type=Path, required=True, help="recipe JSON written by launch_training")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--train-path", type=Path, required=True, help="SFT dataset, or preference dataset for dpo")
    parser.add_argument("--sft-adapter", type=Path, default=None, help="SFT adapter folder (dpo only)")
    parser.add_argument("--eval-path", type=Path, default=None)
    parser.add_argument("--report-to", nargs="+", default=None)
    args = parser.parse_args(argv)
    if args.stage == "dpo" and args.sft_adapter is None:
        parser.error("dpo needs --sft-adapter")
    return args


def _check_inputs_exist(args: argparse.Namespace) -> None:
    """Fail before the slow imports and the model load when an input folder is missing."""
    for option, path in (("--recipe", args.recipe), ("--train-path", args.train_path),
                         ("--sft-adapter", args.sft_adapter), ("--eval-path", args.eval_path)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{option} {path} does not exist")


# @record writes the failing rank's traceback to the file torchrun reads, so torchrun's
# closing summary (the end of the log) names the root cause.
@record
def main(argv: list[str] | None = None) -> None:
    """Entry point of every rank: load the recipe, then train like the single-process path."""
    args = _parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    _check_inputs_exist(args)
    from tasks import training
    from tasks.config import Recipe

    recipe = Recipe.model_validate(json.loads(args.recipe.read_text()))
    if args.stage == "sft":
        training.train_sft(
            recipe, args.train_path, args.output_dir, report_to=args.report_to, eval_path=args.eval_path
        )
    else:
        training.train_dpo(
            recipe, args.sft_adapter, args.train_path, args.output_dir,
            report_to=args.report_to, eval_path=args.eval_path,
        )


if __name__ == "__main__":
    main()
