"""Reports comparing base, SFT and DPO on the same held-out split: a table, a bar chart, a gallery.

Plain functions on what `tasks.evaluation.evaluate_model` returns, no Prefect and no tracking:

- `comparison_table(metrics_by_model)`: one row per (model, metric, question type), the type
  `"all"` for the overall metrics; a metric key `relaxed_accuracy.count` reads as metric
  `relaxed_accuracy`, type `count`.
- `write_comparison(metrics_by_model, out_dir)`: `comparison.csv` (those rows),
  `comparison.md` (a markdown table, models as columns) and `comparison.png`, a grouped bar
  chart drawn with PIL alone: relaxed accuracy overall and per type, then preference accuracy,
  one colour per model, value labels and a legend.
- `write_gallery(eval_dataset_path, predictions_by_model, out_path)`: one self-contained HTML
  page (images inlined as base64 PNG), a row per held-out sample: image, question, label and
  each model's answer marked correct or not.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

OVERALL = "all"
# Metrics first in this order, then any others by name.
METRIC_ORDER = ("relaxed_accuracy", "preference_accuracy", "preference_margin", "eval_samples")
# Metrics on a 0..1 scale that the bar chart shows.
CHART_METRICS = ("relaxed_accuracy", "preference_accuracy")

CHART_SIZE = (960, 540)
MODEL_COLORS = (
    (66, 133, 244),  # blue
    (234, 67, 53),  # red
    (52, 168, 83),  # green
    (251, 188, 5),  # yellow
    (154, 80, 186),  # purple
    (0, 172, 193),  # teal
    (255, 112, 67),  # orange
    (120, 120, 120),  # grey
)
_TEXT = (33, 33, 33)
_GRID = (225, 225, 225)
_AXIS = (90, 90, 90)
_GALLERY_THUMBNAIL = 256  # longest edge of the inlined images, in pixels


# --- the table -----------------------------------------------------------------------------


def split_metric_key(key: str) -> tuple[str, str]:
    """`relaxed_accuracy.count` -> (`relaxed_accuracy`, `count`); `relaxed_accuracy` -> (.., `all`)."""
    metric, dot, question_type = key.partition(".")
    return metric, question_type if dot else OVERALL


def _metric_sort_key(pair: tuple[str, str]) -> tuple[int, str, int, str]:
    metric, question_type = pair
    rank = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)
    return rank, metric, question_type != OVERALL, question_type


def comparison_table(metrics_by_model: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Rows {model, metric, question_type, value} for every model x every (metric, type) any model has.

    Rows run metric by metric (overall before the types), models in the given order within
    each. A model without a metric another one has gets value None, so the table stays complete.
    """
    pairs = sorted({split_metric_key(key) for metrics in metrics_by_model.values() for key in metrics}, key=_metric_sort_key)
    rows = []
    for metric, question_type in pairs:
        key = metric if question_type == OVERALL else f"{metric}.{question_type}"
        for model, metrics in metrics_by_model.items():
            value = metrics.get(key)
            rows.append(
                {
                    "model": model,
                    "metric": metric,
                    "question_type": question_type,
                    "value": None if value is None else float(value),
                }
            )
    return rows


def _format_value(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if metric == "eval_samples":
        return str(int(value))
    return f"{value:.3f}"


def _markdown(rows: list[dict[str, Any]], models: list[str]) -> str:
    header = ["metric", "question type", *models]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---", *["---:"] * len(models)]) + "|"]
    by_pair: dict[tuple[str, str], dict[str, float | None]] = {}
    for row in rows:
        by_pair.setdefault((row["metric"], row["question_type"]), {})[row["model"]] = row["value"]
    for (metric, question_type), values in by_pair.items():
        cells = [metric, question_type, *(_format_value(metric, values.get(model)) for model in models)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(metrics_by_model: dict[str, dict[str, float]], out_dir: Path | str) -> dict[str, Path]:
    """Write comparison.csv, comparison.md and comparison.png under `out_dir`; returns {"csv"|"md"|"png": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_table(metrics_by_model)
    models = list(metrics_by_model)

    csv_path = out / "comparison.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "metric", "question_type", "value"])
        writer.writeheader()
        writer.writerows({**row, "value": "" if row["value"] is None else repr(row["value"])} for row in rows)

    md_path = out / "comparison.md"
    md_path.write_text(_markdown(rows, models), encoding="utf-8")

    png_path = out / "comparison.png"
    comparison_chart(metrics_by_model).save(png_path, format="PNG")
    return {"csv": csv_path, "md": md_path, "png": png_path}


# --- the bar chart -------------------------------------------------------------------------


def chart_groups(metrics_by_model: dict[str, dict[str, float]]) -> list[tuple[str, str]]:
    """(group label, metric key) of the chart's bar groups: relaxed accuracy overall, per type, preference accuracy."""
    keys = {key for metrics in metrics_by_model.values() for key in metrics}
    pairs = sorted(
        (split_metric_key(key) for key in keys if split_metric_key(key)[0] in CHART_METRICS), key=_metric_sort_key
    )
    groups = []
    for metric, question_type in pairs:
        key = metric if question_type == OVERALL else f"{metric}.{question_type}"
        label = {"relaxed_accuracy": "relaxed acc.", "preference_accuracy": "preference acc."}.get(metric, metric)
        groups.append((label if question_type == OVERALL else f"{label}\n{question_type}", key))
    return groups


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def comparison_chart(metrics_by_model: dict[str, dict[str, float]], size: tuple[int, int] = CHART_SIZE) -> Image.Image:
    """A grouped bar chart (RGB, `size`): one group per `chart_groups` entry, one bar and colour per model."""
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    models = list(metrics_by_model)
    groups = chart_groups(metrics_by_model)

    title = "Held-out evaluation: " + " vs ".join(models) if models else "Held-out evaluation"
    draw.text((width // 2, 12), title, fill=_TEXT, font=font, anchor="ma")

    # Legend, top right: a swatch and the model's name per model.
    legend_x = width - 20
    for index, model in reversed(list(enumerate(models))):
        text_w, _ = _text_size(draw, model, font)
        legend_x -= text_w
        draw.text((legend_x, 34), model, fill=_TEXT, font=font)
        legend_x -= 16
        draw.rectangle((legend_x, 34, legend_x + 11, 45), fill=MODEL_COLORS[index % len(MODEL_COLORS)])
        legend_x -= 18

    left, right, top, bottom = 56, width - 20, 64, height - 56
    plot_h = bottom - top
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - round(tick * plot_h)
        draw.line((left, y, right, y), fill=_GRID if tick else _AXIS)
        draw.text((left - 6, y), f"{tick:.2f}", fill=_TEXT, font=font, anchor="rm")
    draw.line((left, top, left, bottom), fill=_AXIS)

    if not groups or not models:
        draw.text(((left + right) // 2, (top + bottom) // 2), "no metrics", fill=_TEXT, font=font, anchor="mm")
        return image

    group_w = (right - left) / len(groups)
    bar_w = max(2, min(60, int(group_w * 0.8 / len(models))))
    for g, (label, key) in enumerate(groups):
        centre = left + group_w * (g + 0.5)
        start = centre - bar_w * len(models) / 2
        for m, model in enumerate(models):
            value = metrics_by_model[model].get(key)
            x0 = round(start + m * bar_w)
            x1 = round(start + (m + 1) * bar_w) - 2
            if value is None or math.isnan(value):
                draw.text(((x0 + x1) // 2, bottom - 4), "n/a", fill=_TEXT, font=font, anchor="mb")
                continue
            bar_top = bottom - round(max(0.0, min(1.0, value)) * plot_h)
            colour = MODEL_COLORS[m % len(MODEL_COLORS)]
            if bar_top < bottom:
                draw.rectangle((x0, bar_top, x1, bottom - 1), fill=colour)
            draw.text(((x0 + x1) // 2, bar_top - 3), f"{value:.2f}", fill=_TEXT, font=font, anchor="mb")
        draw.multiline_text((round(centre), bottom + 8), label, fill=_TEXT, font=font, anchor="ma", align="center")
    return image


# --- the gallery ---------------------------------------------------------------------------


def _image_data_uri(image: Image.Image) -> str:
    image = image.convert("RGB")
    if max(image.size) > _GALLERY_THUMBNAIL:
        image = image.copy()
        image.thumbnail((_GALLERY_THUMBNAIL, _GALLERY_THUMBNAIL), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _by_row(predictions: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(p.get("row_index", position)): p for position, p in enumerate(predictions)}


def _pick_rows(rows: list[int], types: dict[int, str], max_samples: int) -> list[int]:
    """Up to `max_samples` rows, taking the types in turn so each one shows; in dataset order."""
    queues: dict[str, list[int]] = {}
    for row in rows:
        queues.setdefault(types.get(row) or "", []).append(row)
    picked: list[int] = []
    while len(picked) < max_samples and any(queues.values()):
        for queue in queues.values():
            if queue and len(picked) < max_samples:
                picked.append(queue.pop(0))
    return sorted(picked)


_GALLERY_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ddd; padding: 6px 10px; vertical-align: middle; text-align: left; }
th { background: #f4f4f4; }
img { width: 128px; image-rendering: pixelated; }
td.correct { background: #e6f4ea; color: #137333; }
td.incorrect { background: #fce8e6; color: #a50e0e; }
td.missing { color: #888; }
.type { color: #666; font-size: 0.85em; }
"""


def write_gallery(
    eval_dataset_path: Path | str,
    predictions_by_model: dict[str, list[dict[str, Any]]],
    out_path: Path | str,
    max_samples: int = 40,
) -> Path:
    """Write a self-contained HTML gallery of held-out samples and each model's answer; returns `out_path`.

    `eval_dataset_path` is the formatted SFT eval dataset (datasets.save_to_disk) the predictions
    were made on; predictions join its rows by `row_index` (by position when absent). Every
    text is HTML-escaped; images are inlined as PNG data URIs, so the file needs nothing else.
    """
    import datasets  # only the gallery reads the dataset

    dataset = datasets.load_from_disk(str(eval_dataset_path))
    models = list(predictions_by_model)
    joined = {model: _by_row(predictions) for model, predictions in predictions_by_model.items()}
    rows = sorted({row for by_row in joined.values() for row in by_row if 0 <= row < len(dataset)})
    types: dict[int, str] = {}
    for by_row in joined.values():
        for row, prediction in by_row.items():
            types.setdefault(row, prediction.get("question_type") or "")
    picked = _pick_rows(rows, types, max_samples)

    esc = html.escape
    head = "".join(f"<th>{esc(model)}</th>" for model in models)
    body = []
    totals = {model: [0, 0] for model in models}
    for row in picked:
        reference = next(joined[model][row] for model in models if row in joined[model])
        images = dataset[row].get("images") or []
        image_cell = f'<img alt="sample {row}" src="{_image_data_uri(images[0])}">' if images else "no image"
        cells = []
        for model in models:
            prediction = joined[model].get(row)
            if prediction is None:
                cells.append('<td class="missing">–</td>')
                continue
            correct = bool(prediction.get("correct"))
            totals[model][0] += correct
            totals[model][1] += 1
            mark, css = ("✓", "correct") if correct else ("✗", "incorrect")
            cells.append(f'<td class="{css}">{mark} {esc(str(prediction.get("prediction", "")))}</td>')
        question_type = types.get(row) or ""
        type_line = f'<div class="type">{esc(question_type)}</div>' if question_type else ""
        body.append(
            f"<tr><td>{row}</td><td>{image_cell}</td>"
            f"<td>{esc(str(reference.get('question', '')))}{type_line}</td>"
            f"<td>{esc(str(reference.get('label', '')))}</td>{''.join(cells)}</tr>"
        )
    summary = ", ".join(f"{esc(model)}: {right}/{shown} correct" for model, (right, shown) in totals.items())
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Sample predictions</title><style>{_GALLERY_CSS}</style></head><body>\n"
        f"<h1>Sample predictions</h1>\n<p>{len(picked)} of {len(rows)} held-out samples. {summary}.</p>\n"
        f"<table><thead><tr><th>#</th><th>image</th><th>question</th><th>label</th>{head}</tr></thead>\n"
        "<tbody>\n" + "\n".join(body) + "\n</tbody></table>\n</body></html>\n"
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
