"""Benchmark: data validation and formatting against a plain image-decode pass.

    .venv/bin/python bench/validate_format.py [--rows 10000]

Builds ``--rows`` synthetic ChartQA rows in the internal schema
(``tasks.data.load_sft_rows("builtin:chartqa-synth", "train", n)``), encodes every image to PNG
once (not timed) and re-opens each lazily, as the loader hands files over (header read, pixels
not decoded). Then times:

* decode: ``Image.open(BytesIO(png)).convert("RGB")`` for every image: the least any stage that
  looks at the pixels must spend;
* validate: ``validate_rows`` on the lazily opened rows (decodes each image once, hashes its
  pixels, builds the metadata frame, runs the GX suite, writes the GX result, Data Docs page
  and quarantine), with the time split into metadata frame / GX suite / Data Docs / the rest;
* GX fixed overhead: ``validate_rows`` on 10 rows, which is almost all GX bookkeeping;
* format: ``tasks.formatting.save_sft_dataset(kept_rows, "sys", tmpdir)``.

Prints a table (rows/s; validation time / decode time, aim <= 2x) and writes
``bench/results/validate_format.json`` (git-ignored). Timings are wall clock, after a warm-up
that imports GX; each is the fastest of ``--repeat`` runs (default 3), as other work on the
machine only ever adds time. Every run validates freshly opened images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks import data, formatting, validation  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "validate_format.json"


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _lazy_rows(rows: list[dict[str, Any]], pngs: list[bytes]) -> list[dict[str, Any]]:
    """The rows with their images replaced by lazily opened PNGs (header only, as the loader does)."""
    return [row | {"image": Image.open(io.BytesIO(png))} for row, png in zip(rows, pngs, strict=True)]


def _timed(timings: dict[str, float], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - start

    return wrapper


def _validate(rows: list[dict[str, Any]], out_dir: Path, dataset: str) -> tuple[float, dict[str, float], Any]:
    """validate_rows on ``rows``; returns (seconds, breakdown, (kept, report))."""
    parts: dict[str, float] = {}
    originals = {
        name: getattr(validation, name) for name in ("build_metadata_frame", "_run_suite", "_write_data_docs")
    }
    for name, fn in originals.items():
        setattr(validation, name, _timed(parts, name, fn))
    try:
        start = time.perf_counter()
        result = validation.validate_rows(rows, "sft", dataset, validation.ValidationSettings(), out_dir)
        seconds = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(validation, name, fn)
    breakdown = {
        "metadata_frame_s": parts["build_metadata_frame"],
        "gx_suite_s": parts["_run_suite"],
        "data_docs_s": parts["_write_data_docs"],
    }
    breakdown["rest_s"] = seconds - sum(breakdown.values())
    return seconds, breakdown, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing; the fastest counts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n = args.rows

    start = time.perf_counter()
    rows = data.load_sft_rows(data.CHARTQA_SYNTH, "train", n)
    generate_s = time.perf_counter() - start
    pngs = [_png_bytes(row["image"]) for row in rows]

    with tempfile.TemporaryDirectory(prefix="vlmops-bench-") as tmp:
        tmpdir = Path(tmp)

        # Warm-up: import GX and render one Data Docs page, so one-off costs are not timed below.
        start = time.perf_counter()
        validation.validate_rows(rows[:2], "sft", "warmup", validation.ValidationSettings(), tmpdir / "warm")
        warmup_s = time.perf_counter() - start

        decode_s = decode_in_memory_s = fixed_s = validate_s = format_s = float("inf")
        for run in range(args.repeat):
            start = time.perf_counter()
            for png in pngs:
                Image.open(io.BytesIO(png)).convert("RGB")
            decode_s = min(decode_s, time.perf_counter() - start)

            start = time.perf_counter()
            for row in rows:
                row["image"].convert("RGB")
            decode_in_memory_s = min(decode_in_memory_s, time.perf_counter() - start)

            seconds, breakdown, _ = _validate(_lazy_rows(rows[:10], pngs[:10]), tmpdir / "fixed", "bench/fixed")
            if seconds < fixed_s:
                fixed_s, fixed_parts = seconds, breakdown

            lazy = _lazy_rows(rows, pngs)
            seconds, breakdown, (kept, report) = _validate(lazy, tmpdir / "validate", "bench/train")
            if seconds < validate_s:
                validate_s, parts = seconds, breakdown

            start = time.perf_counter()
            formatting.save_sft_dataset(kept, "sys", tmpdir / f"formatted-{run}")
            format_s = min(format_s, time.perf_counter() - start)

    results = {
        "rows": n,
        "repeat": args.repeat,
        "kept_rows": len(kept),
        "validation_passed": report.passed,
        "n_checks": len(report.checks),
        "image_size": list(rows[0]["image"].size) if rows else None,
        "generate_rows_s": generate_s,
        "warmup_s": warmup_s,
        "decode_png_s": decode_s,
        "decode_in_memory_convert_s": decode_in_memory_s,
        "validate_s": validate_s,
        "validate_breakdown": parts,
        "gx_fixed_overhead_s": fixed_s,
        "gx_fixed_overhead_breakdown": fixed_parts,
        "format_s": format_s,
        "validate_rows_per_s": n / validate_s,
        "format_rows_per_s": n / format_s,
        "decode_rows_per_s": n / decode_s,
        "validate_over_decode": validate_s / decode_s,
        "validate_minus_gx_fixed_over_decode": (validate_s - fixed_s) / decode_s,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "pillow": Image.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"{n} rows, {results['image_size'][0]}x{results['image_size'][1]} PNG, {os.cpu_count()} CPUs")
    print(f"{'stage':<34}{'seconds':>9}{'rows/s':>10}")
    table = [
        ("decode (open + convert RGB)", decode_s),
        ("validate_rows", validate_s),
        ("  metadata frame (decode + hash)", parts["metadata_frame_s"]),
        ("  GX suite", parts["gx_suite_s"]),
        ("  Data Docs page", parts["data_docs_s"]),
        ("  rest (GX JSON, quarantine)", parts["rest_s"]),
        ("GX fixed overhead (10 rows)", fixed_s),
        ("format (save_sft_dataset)", format_s),
    ]
    for label, seconds in table:
        rate = f"{n / seconds:>10.0f}" if not label.startswith(("  ", "GX fixed")) else f"{'':>10}"
        print(f"{label:<34}{seconds:>9.3f}{rate}")
    print(f"validate / decode: {results['validate_over_decode']:.2f}x "
          f"({results['validate_minus_gx_fixed_over_decode']:.2f}x without GX's fixed overhead)")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
