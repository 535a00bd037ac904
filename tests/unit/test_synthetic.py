"""Tests for tasks.synthetic: chart rendering, questions and split generation.

The central check decodes each rendered image back into bar colours and values
(from pixels only) and verifies the labels against that reading, so a label
that disagrees with what the image shows fails regardless of how the module
computes it internally.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
from PIL import Image

from tasks.synthetic import (
    CHARTQA_COLUMNS,
    COLOR_NAMES,
    MAX_VALUE,
    MIN_VALUE,
    PALETTE,
    PREFS_COLUMNS,
    QUESTION_KINDS,
    SPLITS,
    ChartSpec,
    ask_question,
    caption,
    question_kind,
    make_chart_prefs_split,
    make_chartqa_split,
    render_chart,
    sample_chart,
    split_of,
)

WHITE = (255, 255, 255)
MakeSplit = Callable[..., list[dict[str, Any]]]
RGB_TO_NAME = {rgb: name for name, rgb in PALETTE.items()}


# --------------------------------------------------------------------------- helpers


def bar_runs(image: Image.Image) -> list[tuple[int, int]]:
    """Column ranges [start, end) that contain any non-white pixel, left to right."""
    width, height = image.size
    px = image.load()
    occupied = [any(px[x, y] != WHITE for y in range(height)) for x in range(width)]
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for x, filled in enumerate([*occupied, False]):
        if filled and start is None:
            start = x
        elif not filled and start is not None:
            runs.append((start, x))
            start = None
    return runs


def read_bars(image: Image.Image) -> list[tuple[str, int]]:
    """(colour name, pixel height) of each bar, left to right, from pixels alone."""
    px = image.load()
    bars = []
    for start, end in bar_runs(image):
        mid = (start + end) // 2
        column = [px[mid, y] for y in range(image.size[1])]
        colored = [c for c in column if c != WHITE]
        assert len(set(colored)) == 1, "a bar must be a single flat colour"
        bars.append((RGB_TO_NAME[colored[0]], len(colored)))
    return bars


@cache
def height_to_value(image_size: int) -> dict[int, int]:
    """Calibrate pixel height -> value using single-bar charts of each value."""
    mapping = {}
    for value in range(MIN_VALUE, MAX_VALUE + 1):
        ((_, height),) = read_bars(render_chart(ChartSpec(("red",), (value,)), image_size))
        mapping[height] = value
    assert len(mapping) == MAX_VALUE - MIN_VALUE + 1, "every value needs its own bar height"
    return mapping


def decode_chart(image: Image.Image) -> ChartSpec:
    """Recover the ChartSpec an image was rendered from, using pixels only."""
    calibration = height_to_value(image.size[0])
    bars = read_bars(image)
    return ChartSpec(
        colors=tuple(color for color, _ in bars),
        values=tuple(calibration[height] for _, height in bars),
    )


def expected_answer(spec: ChartSpec, question: str) -> tuple[str, str]:
    """(kind, answer) for one of the three templated questions, derived from the spec."""
    if question == "Which bar is the tallest?":
        top = max(spec.values)
        winners = [c for c, v in zip(spec.colors, spec.values) if v == top]
        assert len(winners) == 1, f"argmax asked about a tied chart {spec}"
        return "argmax", winners[0]
    if question == "How many bars are there?":
        return "count", str(len(spec.values))
    prefix, suffix = "What is the value of the ", " bar?"
    assert question.startswith(prefix) and question.endswith(suffix), question
    color = question[len(prefix) : -len(suffix)]
    return "value", str(dict(zip(spec.colors, spec.values))[color])


def row_key(image: Image.Image, question: str) -> tuple[bytes, str]:
    return image.tobytes(), question


# --------------------------------------------------------------------------- ChartSpec


def test_chart_spec_is_frozen_and_hashable() -> None:
    spec = ChartSpec(("red", "blue"), (5, 2))
    with pytest.raises(AttributeError):
        spec.values = (1, 1)  # type: ignore[misc]
    assert {spec, ChartSpec(("red", "blue"), (5, 2))} == {spec}


@pytest.mark.parametrize(
    ("colors", "values"),
    [
        (("red", "blue"), (1,)),  # length mismatch
        (("red", "red"), (1, 2)),  # repeated colour
        (("red", "pink"), (1, 2)),  # unknown colour
        (("red", "blue"), (0, 2)),  # below range
        (("red", "blue"), (1, 10)),  # above range
        (("red", "blue"), (1, 2.5)),  # not an int
        ((), ()),  # no bars
    ],
)
def test_chart_spec_rejects_invalid_data(colors: tuple, values: tuple) -> None:
    with pytest.raises(ValueError):
        ChartSpec(colors, values)


def test_caption_lists_bars_left_to_right() -> None:
    assert caption(ChartSpec(("red", "blue", "green"), (5, 2, 7))) == "red 5, blue 2, green 7"


# --------------------------------------------------------------------------- sampling


def test_sample_chart_respects_ranges_and_is_deterministic() -> None:
    specs = [sample_chart(random.Random(i)) for i in range(300)]
    assert specs == [sample_chart(random.Random(i)) for i in range(300)]
    assert {len(s.values) for s in specs} == {2, 3, 4}
    assert {v for s in specs for v in s.values} == set(range(MIN_VALUE, MAX_VALUE + 1))
    assert {c for s in specs for c in s.colors} == set(COLOR_NAMES)
    assert all(len(set(s.colors)) == len(s.colors) for s in specs)
    # Without unique_max, ties for the maximum do occur (so the flag below matters).
    assert any(s.values.count(max(s.values)) > 1 for s in specs)


def test_sample_chart_unique_max_avoids_ties() -> None:
    rng = random.Random(0)
    specs = [sample_chart(rng, unique_max=True) for _ in range(500)]
    assert all(s.values.count(max(s.values)) == 1 for s in specs)


def test_palette_colours_are_easy_to_tell_apart() -> None:
    names = list(PALETTE)
    assert len(names) >= 6
    for i, a in enumerate(names):
        assert PALETTE[a] != WHITE
        for b in names[i + 1 :]:
            distance = sum(abs(x - y) for x, y in zip(PALETTE[a], PALETTE[b]))
            assert distance > 150, f"{a} and {b} are too similar"


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("image_size", [64, 96, 224])
def test_render_draws_one_bar_per_value_with_heights_ordered_like_values(image_size: int) -> None:
    spec = ChartSpec(("red", "blue", "green", "black"), (5, 2, 9, 5))
    image = render_chart(spec, image_size)
    assert image.mode == "RGB" and image.size == (image_size, image_size)

    bars = read_bars(image)
    assert [c for c, _ in bars] == list(spec.colors)
    heights = [h for _, h in bars]
    # Equal values -> equal heights, larger values -> strictly taller bars.
    for (vi, hi) in zip(spec.values, heights):
        for (vj, hj) in zip(spec.values, heights):
            assert (vi < vj) == (hi < hj) and (vi == vj) == (hi == hj)
    # The tallest bar in pixels is the argmax colour.
    assert bars[heights.index(max(heights))][0] == "green"
    # Heights are proportional to values (up to rounding to whole pixels).
    ratios = [h / v for h, v in zip(heights, spec.values)]
    assert max(ratios) - min(ratios) <= 1.0


def test_render_bars_have_equal_width_even_spacing_and_a_common_baseline() -> None:
    spec = ChartSpec(("orange", "purple", "blue"), (3, 8, 1))
    image = render_chart(spec)
    runs = bar_runs(image)
    widths = {end - start for start, end in runs}
    assert len(widths) == 1
    gaps = [runs[i + 1][0] - runs[i][1] for i in range(len(runs) - 1)]
    assert max(gaps) - min(gaps) <= 1 and min(gaps) >= 2
    px = image.load()
    bottoms = {max(y for y in range(64) if px[(s + e) // 2, y] != WHITE) for s, e in runs}
    assert len(bottoms) == 1


def test_render_keeps_a_white_margin_so_tall_bars_are_not_clipped() -> None:
    spec = ChartSpec(("red", "blue", "green", "orange"), (9, 9, 9, 9))
    image = render_chart(spec)
    px = image.load()
    for i in range(64):
        for edge in (0, 63):
            assert px[i, edge] == WHITE and px[edge, i] == WHITE
    assert len(bar_runs(image)) == 4


def test_render_is_pixel_identical_for_equal_specs_and_has_no_stray_colours() -> None:
    spec = ChartSpec(("purple", "black"), (4, 7))
    first, second = render_chart(spec), render_chart(spec)
    assert first.tobytes() == second.tobytes()
    assert {color for _, color in first.getcolors()} == {WHITE, PALETTE["purple"], PALETTE["black"]}


def test_render_rejects_tiny_images() -> None:
    with pytest.raises(ValueError, match="image_size"):
        render_chart(ChartSpec(("red",), (1,)), image_size=8)


# --------------------------------------------------------------------------- questions


def test_ask_question_answers_come_from_the_spec() -> None:
    rng = random.Random(1)
    kinds: Counter[str] = Counter()
    for _ in range(300):
        spec = sample_chart(rng)
        question, answer, kind = ask_question(spec, rng)
        kinds[kind] += 1
        assert expected_answer(spec, question) == (kind, answer)
    assert set(kinds) == set(QUESTION_KINDS)


def test_ask_question_never_asks_argmax_on_a_tied_chart() -> None:
    spec = ChartSpec(("red", "blue", "green"), (7, 7, 3))
    rng = random.Random(0)
    assert {ask_question(spec, rng)[2] for _ in range(100)} == {"count", "value"}
    with pytest.raises(ValueError, match="tied"):
        ask_question(spec, rng, kind="argmax")
    with pytest.raises(ValueError, match="unknown question kind"):
        ask_question(spec, rng, kind="median")


def test_ask_question_forced_kinds() -> None:
    spec = ChartSpec(("red", "blue", "green"), (5, 2, 7))
    rng = random.Random(0)
    assert ask_question(spec, rng, kind="argmax") == ("Which bar is the tallest?", "green", "argmax")
    assert ask_question(spec, rng, kind="count") == ("How many bars are there?", "3", "count")
    question, answer, kind = ask_question(spec, rng, kind="value")
    assert kind == "value" and expected_answer(spec, question) == ("value", answer)


# --------------------------------------------------------------------------- ChartQA-style splits


@pytest.fixture(scope="module")
def chartqa() -> dict[str, list[dict]]:
    sizes = {"train": 600, "validation": 150, "test": 150}
    return {split: make_chartqa_split(split, n, seed=0) for split, n in sizes.items()}


def test_chartqa_rows_have_exactly_chartqa_columns_and_types(chartqa: dict[str, list[dict]]) -> None:
    for split, rows in chartqa.items():
        for row in rows:
            assert tuple(row) == CHARTQA_COLUMNS == ("image", "query", "label", "human_or_machine")
            assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
            assert row["image"].size == (64, 64)
            assert isinstance(row["query"], str)
            assert isinstance(row["label"], list) and len(row["label"]) == 1
            assert isinstance(row["label"][0], str)
            # ChartQA ClassLabel: 1 = "machine" (templated questions).
            assert type(row["human_or_machine"]) is int and row["human_or_machine"] == 1


def test_chartqa_labels_match_what_the_image_shows(chartqa: dict[str, list[dict]]) -> None:
    for rows in chartqa.values():
        for row in rows:
            spec = decode_chart(row["image"])
            _, answer = expected_answer(spec, row["query"])
            assert row["label"] == [answer], (row["query"], spec)


def test_chartqa_kinds_are_balanced(chartqa: dict[str, list[dict]]) -> None:
    for rows in chartqa.values():
        kinds = Counter(expected_answer(decode_chart(r["image"]), r["query"])[0] for r in rows)
        assert set(kinds) == set(QUESTION_KINDS)
        assert max(kinds.values()) - min(kinds.values()) <= 1


def test_chartqa_has_no_duplicates_within_a_split(chartqa: dict[str, list[dict]]) -> None:
    for rows in chartqa.values():
        keys = [row_key(r["image"], r["query"]) for r in rows]
        assert len(set(keys)) == len(keys)


def test_chartqa_held_out_splits_do_not_leak_into_train(chartqa: dict[str, list[dict]]) -> None:
    train = {row_key(r["image"], r["query"]) for r in chartqa["train"]}
    for split in ("validation", "test"):
        held_out = {row_key(r["image"], r["query"]) for r in chartqa[split]}
        assert not train & held_out
    assert not {row_key(r["image"], r["query"]) for r in chartqa["validation"]} & {
        row_key(r["image"], r["query"]) for r in chartqa["test"]
    }


def test_every_row_belongs_to_its_split_by_the_hash_rule(chartqa: dict[str, list[dict]]) -> None:
    # Stronger than an intersection check on a sample: membership is a fixed
    # function of (chart, question), so train can never contain a test pair.
    for split, rows in chartqa.items():
        for row in rows:
            assert split_of(decode_chart(row["image"]), row["query"]) == split


def test_split_of_partitions_roughly_80_10_10() -> None:
    rng = random.Random(123)
    counts: Counter[str] = Counter()
    for _ in range(5000):
        spec = sample_chart(rng)
        counts[split_of(spec, ask_question(spec, rng)[0])] += 1
    assert 0.75 < counts["train"] / 5000 < 0.85
    assert 0.07 < counts["validation"] / 5000 < 0.13
    assert 0.07 < counts["test"] / 5000 < 0.13


def test_chartqa_is_deterministic_per_seed() -> None:
    def fingerprint(rows: list[dict]) -> list[tuple]:
        return [(r["image"].tobytes(), r["query"], r["label"], r["human_or_machine"]) for r in rows]

    a = fingerprint(make_chartqa_split("test", 60, seed=3))
    assert a == fingerprint(make_chartqa_split("test", 60, seed=3))
    assert a != fingerprint(make_chartqa_split("test", 60, seed=4))
    # A longer request extends the same stream rather than reshuffling it.
    assert fingerprint(make_chartqa_split("test", 90, seed=3))[:60] == a


def test_chartqa_image_size_parameter() -> None:
    rows = make_chartqa_split("validation", 12, seed=0, image_size=96)
    for row in rows:
        assert row["image"].size == (96, 96)
        assert row["label"] == [expected_answer(decode_chart(row["image"]), row["query"])[1]]


@pytest.mark.parametrize("make_split", [make_chartqa_split, make_chart_prefs_split])
@pytest.mark.parametrize("split", ["val", "dev", "Train", ""])
def test_unknown_splits_are_rejected_with_the_allowed_names(make_split: MakeSplit, split: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        make_split(split, 5)
    for allowed in SPLITS:
        assert allowed in str(excinfo.value)


@pytest.mark.parametrize("make_split", [make_chartqa_split, make_chart_prefs_split])
def test_bad_sizes_are_rejected(make_split: MakeSplit) -> None:
    with pytest.raises(ValueError, match="n must be"):
        make_split("train", -1)
    with pytest.raises(ValueError, match="image_size"):
        make_split("train", 1, image_size=4)
    assert make_split("train", 0) == []


def test_thousand_rows_render_quickly() -> None:
    start = time.perf_counter()
    rows = make_chartqa_split("test", 1000, seed=7)
    assert len(rows) == 1000
    assert time.perf_counter() - start < 5.0


# --------------------------------------------------------------------------- preference splits


@pytest.fixture(scope="module")
def prefs() -> dict[str, list[dict]]:
    sizes = {"train": 300, "validation": 90, "test": 90}
    return {split: make_chart_prefs_split(split, n, seed=0) for split, n in sizes.items()}


def test_prefs_rows_have_exactly_rlaif_v_columns(prefs: dict[str, list[dict]]) -> None:
    for rows in prefs.values():
        for row in rows:
            assert tuple(row) == PREFS_COLUMNS == ("image", "question", "chosen", "rejected")
            assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
            assert all(isinstance(row[k], str) for k in ("question", "chosen", "rejected"))


def test_prefs_chosen_is_correct_and_rejected_is_not(prefs: dict[str, list[dict]]) -> None:
    for rows in prefs.values():
        for row in rows:
            _, answer = expected_answer(decode_chart(row["image"]), row["question"])
            assert row["chosen"] == answer
            assert row["rejected"] != row["chosen"]


def test_prefs_rejected_mixes_wrong_answers_and_evasions(prefs: dict[str, list[dict]]) -> None:
    styles: Counter[tuple[str, str]] = Counter()
    for row in prefs["train"]:
        spec = decode_chart(row["image"])
        kind, _ = expected_answer(spec, row["question"])
        rejected = row["rejected"]
        if "image" in rejected:
            style = "evasive"
            assert rejected.endswith(".")
            if kind == "value":  # the refusal names the bar that was asked about
                assert row["question"].split()[-2] in rejected
        else:
            style = "wrong"
            if kind == "argmax":
                # A different bar of the same chart.
                assert rejected in spec.colors
            elif kind == "count":
                assert rejected.isdigit()
            else:
                assert rejected.isdigit() and MIN_VALUE <= int(rejected) <= MAX_VALUE
        styles[(kind, style)] += 1
    # Every kind gets both rejection styles, in roughly equal numbers.
    assert set(styles) == {(k, s) for k in QUESTION_KINDS for s in ("wrong", "evasive")}
    assert max(styles.values()) - min(styles.values()) <= 2


def test_prefs_are_deterministic_and_differ_from_chartqa_rows() -> None:
    def fingerprint(rows: list[dict], question: str) -> list[tuple]:
        return [(r["image"].tobytes(), r[question]) for r in rows]

    a = make_chart_prefs_split("validation", 40, seed=1)
    b = make_chart_prefs_split("validation", 40, seed=1)
    assert [(r["image"].tobytes(), r["question"], r["chosen"], r["rejected"]) for r in a] == [
        (r["image"].tobytes(), r["question"], r["chosen"], r["rejected"]) for r in b
    ]
    assert fingerprint(a, "question") != fingerprint(
        make_chart_prefs_split("validation", 40, seed=2), "question"
    )
    sft = make_chartqa_split("validation", 40, seed=1)
    assert fingerprint(a, "question") != fingerprint(sft, "query")


def test_prefs_held_out_splits_never_overlap_any_train_split(
    prefs: dict[str, list[dict]], chartqa: dict[str, list[dict]]
) -> None:
    train = {row_key(r["image"], r["question"]) for r in prefs["train"]}
    train |= {row_key(r["image"], r["query"]) for r in chartqa["train"]}
    for split in ("validation", "test"):
        for row in prefs[split]:
            assert row_key(row["image"], row["question"]) not in train
            assert split_of(decode_chart(row["image"]), row["question"]) == split


def test_question_kind_recovers_the_kind_from_the_question() -> None:
    rng = random.Random(0)
    for _ in range(60):
        spec = sample_chart(rng, unique_max=True)
        for kind in QUESTION_KINDS:
            question, _answer, got = ask_question(spec, rng, kind)
            assert question_kind(question) == got == kind
    assert question_kind("What is the value of the pink bar?") is None
    assert question_kind("How many bars are there? ") is None
    assert question_kind("Is the red bar taller than the blue one?") is None
