"""Offline, deterministic synthetic chart datasets.

This module is the offline stand-in for two hub datasets the pipeline uses
when the network is available:

* ``HuggingFaceM4/ChartQA`` (supervised fine-tuning / evaluation), produced by
  :func:`make_chartqa_split` with exactly ChartQA's columns
  ``image``, ``query``, ``label``, ``human_or_machine``;
* ``openbmb/RLAIF-V-Dataset`` (preference optimisation), produced by
  :func:`make_chart_prefs_split` with the columns the pipeline reads
  ``image``, ``question``, ``chosen``, ``rejected`` (RLAIF-V's bookkeeping
  columns such as ``ds_name`` or ``idx`` are deliberately left out).

Design
------
The charts are meant to be learnable by a *tiny* VLM (patch size 8, 64x64
input), so they are as plain as possible: white background, 2-4 vertical bars
of equal width, evenly spaced, each a distinct saturated colour from a fixed
six-colour palette, integer values 1..9 with bar height proportional to the
value and a margin so the tallest bar never touches the image edge. There is
no text in the image; everything a question asks about is visible.

Every answer is computed from the :class:`ChartSpec` that the image was
rendered from, never from the image, so labels are correct by construction.

Three question kinds exist (see :data:`QUESTION_KINDS`): ``argmax`` ("Which
bar is the tallest?" -> colour name), ``count`` ("How many bars are there?"
-> "3") and ``value`` ("What is the value of the blue bar?" -> "7"). Charts
asked an ``argmax`` question are sampled with a unique maximum so the answer
is never ambiguous. Splits cycle through the kinds, so they are balanced to
within one row.

Split hygiene
-------------
Which split a (chart, question) pair belongs to is a pure function of a
SHA-256 hash of that pair (80% train, 10% validation, 10% test) and does not
depend on the seed or on which dataset is being built. Each split generator
draws candidates from its own rng stream and keeps only those hashing into its
own bucket. Consequently no validation/test pair can ever appear in train, for
any seed, and the preference data's held-out splits cannot overlap the SFT
training split either. Exact duplicate pairs within one split are skipped.

The rng of a split is derived from ``(dataset, seed, split)``, so the same
arguments always give identical rows (including image bytes), different seeds
give different rows, and the ChartQA-style and preference datasets use
different streams so they are not the same rows.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

__all__ = [
    "PALETTE",
    "COLOR_NAMES",
    "MIN_VALUE",
    "MAX_VALUE",
    "MIN_BARS",
    "MAX_BARS",
    "QUESTION_KINDS",
    "SPLITS",
    "CHARTQA_COLUMNS",
    "PREFS_COLUMNS",
    "ChartSpec",
    "sample_chart",
    "render_chart",
    "caption",
    "ask_question",
    "answer_question",
    "question_kind",
    "split_of",
    "make_chartqa_split",
    "make_chart_prefs_split",
]

# Saturated, mutually distant colours; names are what the model must output.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "blue": (20, 60, 220),
    "green": (20, 160, 40),
    "orange": (255, 140, 0),
    "purple": (130, 30, 180),
    "black": (0, 0, 0),
}
COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)

MIN_VALUE = 1
MAX_VALUE = 9
MIN_BARS = 2
MAX_BARS = 4
MIN_IMAGE_SIZE = 16

QUESTION_KINDS: tuple[str, ...] = ("argmax", "count", "value")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

CHARTQA_COLUMNS: tuple[str, ...] = ("image", "query", "label", "human_or_machine")
PREFS_COLUMNS: tuple[str, ...] = ("image", "question", "chosen", "rejected")

# ChartQA's ``human_or_machine`` is a ClassLabel with 0 = human, 1 = machine.
# Our questions come from templates, so every row is machine-generated.
HUMAN_OR_MACHINE_MACHINE = 1

# Percent of the hash space owned by each split, in SPLITS order.
_SPLIT_SHARES: tuple[int, ...] = (80, 10, 10)

_ARGMAX_QUESTION = "Which bar is the tallest?"
_COUNT_QUESTION = "How many bars are there?"
_VALUE_QUESTION = "What is the value of the {color} bar?"

_EVASIVE_ANSWERS: dict[str, tuple[str, ...]] = {
    "argmax": (
        "The image does not show which bar is the tallest.",
        "I cannot tell which bar is the tallest from this image.",
    ),
    "count": (
        "The image does not show how many bars there are.",
        "I cannot count the bars in this image.",
    ),
    "value": (
        "The image does not show the value of the {color} bar.",
        "I cannot read the value of the {color} bar from this image.",
    ),
}

# Wrong counts offered as rejected answers; includes counts outside 2..4 so
# the model also learns to prefer the true count over implausible ones.
_WRONG_COUNT_RANGE = range(1, MAX_BARS + 3)


@dataclass(frozen=True)
class ChartSpec:
    """The data behind one bar chart: bar colours left to right and their values.

    Raises:
        ValueError: if the tuples differ in length, there are fewer than one or
            more than ``len(PALETTE)`` bars, a colour is unknown or repeated, or
            a value is not an int in ``MIN_VALUE..MAX_VALUE``.
    """

    colors: tuple[str, ...]
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.colors) != len(self.values):
            raise ValueError(
                f"colors and values differ in length: {len(self.colors)} != {len(self.values)}"
            )
        if not 1 <= len(self.colors) <= len(PALETTE):
            raise ValueError(f"a chart needs 1..{len(PALETTE)} bars, got {len(self.colors)}")
        unknown = [c for c in self.colors if c not in PALETTE]
        if unknown:
            raise ValueError(f"unknown colours {unknown}; allowed: {list(COLOR_NAMES)}")
        if len(set(self.colors)) != len(self.colors):
            raise ValueError(f"colours within a chart must be distinct, got {self.colors}")
        for v in self.values:
            # bool is an int subclass; a True bar height is certainly a bug.
            if isinstance(v, bool) or not isinstance(v, int) or not MIN_VALUE <= v <= MAX_VALUE:
                raise ValueError(f"values must be ints in {MIN_VALUE}..{MAX_VALUE}, got {self.values}")

    @property
    def n_bars(self) -> int:
        """Number of bars in the chart."""
        return len(self.values)

    def tallest(self) -> str | None:
        """Colour of the tallest bar, or None when several bars share the maximum."""
        top = max(self.values)
        winners = [c for c, v in zip(self.colors, self.values) if v == top]
        return winners[0] if len(winners) == 1 else None

    def value_of(self, color: str) -> int:
        """Value of the bar with the given colour.

        Raises:
            KeyError: if no bar has that colour.
        """
        for c, v in zip(self.colors, self.values):
            if c == color:
                return v
        raise KeyError(f"no {color} bar in chart {self.colors}")


def sample_chart(rng: random.Random, *, unique_max: bool = False) -> ChartSpec:
    """Draw a random chart: 2-4 bars, distinct palette colours, values 1..9.

    Args:
        rng: source of randomness; the result depends only on its state.
        unique_max: resample until exactly one bar has the maximum value, so
            that "Which bar is the tallest?" has a single correct answer.
    """
    while True:
        n = rng.randint(MIN_BARS, MAX_BARS)
        colors = tuple(rng.sample(COLOR_NAMES, n))
        values = tuple(rng.randint(MIN_VALUE, MAX_VALUE) for _ in range(n))
        spec = ChartSpec(colors=colors, values=values)
        if not unique_max or spec.tallest() is not None:
            return spec


def _bar_boxes(n_bars: int, values: tuple[int, ...], image_size: int) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (left, top, right, bottom), right/bottom exclusive, one per bar.

    Kept separate from drawing so the geometry is easy to reason about: a
    margin on every side keeps the tallest bar off the top edge, each bar sits
    centred in an equal-width slot, and heights are proportional to values.
    """
    margin = max(1, round(image_size / 16))
    plot = image_size - 2 * margin
    slot = plot / n_bars
    # 60% of the slot leaves clear white gaps between neighbouring bars.
    bar_w = max(1, round(slot * 0.6))
    bottom = image_size - margin
    boxes = []
    for i, value in enumerate(values):
        left = margin + round(i * slot + (slot - bar_w) / 2)
        height = max(1, round(value * plot / MAX_VALUE))
        boxes.append((left, bottom - height, left + bar_w, bottom))
    return boxes


def render_chart(spec: ChartSpec, image_size: int = 64) -> Image.Image:
    """Render ``spec`` as a square RGB bar chart with no text.

    Raises:
        ValueError: if ``image_size`` is below 16 pixels (bars would merge).
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for color, (left, top, right, bottom) in zip(
        spec.colors, _bar_boxes(spec.n_bars, spec.values, image_size)
    ):
        # PIL rectangles include their end coordinates, hence the -1.
        draw.rectangle((left, top, right - 1, bottom - 1), fill=PALETTE[color])
    return image


def caption(spec: ChartSpec) -> str:
    """Describe the chart left to right, e.g. ``"red 5, blue 2, green 7"``."""
    return ", ".join(f"{c} {v}" for c, v in zip(spec.colors, spec.values))


def answer_question(spec: ChartSpec, kind: str, color: str | None = None) -> tuple[str, str]:
    """Return ``(question, answer)`` of the given kind, answer derived from ``spec``.

    Args:
        spec: the chart being asked about.
        kind: one of :data:`QUESTION_KINDS`.
        color: bar asked about; required for ``value``, ignored otherwise.

    Raises:
        ValueError: for an unknown kind, an ``argmax`` question on a chart
            whose maximum is tied, or a ``value`` question without a colour
            or about a colour not in the chart.
    """
    if kind == "argmax":
        tallest = spec.tallest()
        if tallest is None:
            raise ValueError(f"argmax is ambiguous: the maximum of {spec.values} is tied")
        return _ARGMAX_QUESTION, tallest
    if kind == "count":
        return _COUNT_QUESTION, str(spec.n_bars)
    if kind == "value":
        if color is None or color not in spec.colors:
            raise ValueError(f"value question needs a colour from {spec.colors}, got {color!r}")
        return _VALUE_QUESTION.format(color=color), str(spec.value_of(color))
    raise ValueError(f"unknown question kind {kind!r}; allowed: {list(QUESTION_KINDS)}")


_VALUE_QUESTION_PATTERN = re.compile(
    re.escape(_VALUE_QUESTION).replace(re.escape("{color}"), "(?:" + "|".join(COLOR_NAMES) + ")")
)


def question_kind(question: str) -> str | None:
    """The kind (one of :data:`QUESTION_KINDS`) of a templated question, or None for any other text.

    ChartQA's columns have no place for the kind, so it is recovered from the question,
    whose templates are distinct per kind.
    """
    if question == _ARGMAX_QUESTION:
        return "argmax"
    if question == _COUNT_QUESTION:
        return "count"
    if _VALUE_QUESTION_PATTERN.fullmatch(question):
        return "value"
    return None


def ask_question(spec: ChartSpec, rng: random.Random, kind: str | None = None) -> tuple[str, str, str]:
    """Pick a question about ``spec`` and return ``(question, answer, kind)``.

    Args:
        spec: the chart being asked about.
        rng: chooses the kind (when not given) and the bar of a value question.
        kind: force a kind; by default one is drawn uniformly from those that
            have an unambiguous answer (``argmax`` is skipped for tied maxima).

    Raises:
        ValueError: if ``kind`` is unknown or is ``argmax`` on a tied chart.
    """
    if kind is None:
        allowed = [k for k in QUESTION_KINDS if k != "argmax" or spec.tallest() is not None]
        kind = rng.choice(allowed)
    color = rng.choice(spec.colors) if kind == "value" else None
    question, answer = answer_question(spec, kind, color)
    return question, answer, kind


def _pair_key(spec: ChartSpec, question: str) -> str:
    return f"{','.join(spec.colors)}|{','.join(map(str, spec.values))}|{question}"


def split_of(spec: ChartSpec, question: str) -> str:
    """The split that owns the (chart, question) pair, fixed for all seeds and datasets.

    A stable hash (not Python's salted ``hash``) so membership is identical
    across processes and machines.
    """
    digest = hashlib.sha256(_pair_key(spec, question).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    upper = 0
    for split, share in zip(SPLITS, _SPLIT_SHARES):
        upper += share
        if bucket < upper:
            return split
    raise AssertionError("split shares must sum to 100")  # pragma: no cover


def _check_args(split: str, n: int, image_size: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed splits: {list(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")


def _split_rng(dataset: str, seed: int, split: str) -> random.Random:
    # Hash the stream name into an int seed: explicit, and independent of
    # how random.Random happens to seed from strings.
    digest = hashlib.sha256(f"vlmops-synthetic|{dataset}|{seed}|{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class _Pair:
    """One (chart, question) candidate with its answer; ``color`` is set for value questions."""

    spec: ChartSpec
    question: str
    answer: str
    kind: str
    color: str | None


def _draw_pairs(rng: random.Random, split: str, n: int) -> list[_Pair]:
    """Draw ``n`` distinct (chart, question) pairs owned by ``split`` from ``rng``.

    Kinds cycle argmax/count/value so splits are balanced to within one row.

    Raises:
        RuntimeError: if ``n`` distinct rows cannot be found (only conceivable
            for very large ``n``).
    """
    seen: set[str] = set()
    pairs: list[_Pair] = []
    # Held-out splits own 10% of the hash space, so ~10 draws per row; the cap
    # only exists to turn an impossible request into an error, not a hang.
    max_draws = 200 * n + 1000
    draws = 0
    while len(pairs) < n:
        draws += 1
        if draws > max_draws:
            raise RuntimeError(
                f"found only {len(pairs)} of {n} distinct {split} rows after {max_draws} draws"
            )
        kind = QUESTION_KINDS[len(pairs) % len(QUESTION_KINDS)]
        spec = sample_chart(rng, unique_max=kind == "argmax")
        color = rng.choice(spec.colors) if kind == "value" else None
        question, answer = answer_question(spec, kind, color)
        key = _pair_key(spec, question)
        if key in seen or split_of(spec, question) != split:
            continue
        seen.add(key)
        pairs.append(_Pair(spec, question, answer, kind, color))
    return pairs


def make_chartqa_split(split: str, n: int, seed: int = 0, image_size: int = 64) -> list[dict[str, Any]]:
    """Build ``n`` ChartQA-style rows for ``split``.

    Each row has exactly ChartQA's columns: ``image`` (PIL RGB), ``query``
    (str), ``label`` (a one-element list of str, as in ChartQA) and
    ``human_or_machine`` (always 1, ChartQA's "machine" class, since the
    questions are templated). Rows cycle through the question kinds in order
    argmax, count, value.

    Raises:
        ValueError: if ``split`` is not one of :data:`SPLITS`, ``n`` is
            negative or ``image_size`` is below 16.
        RuntimeError: if ``n`` distinct rows cannot be found.
    """
    _check_args(split, n, image_size)
    return [
        {
            "image": render_chart(pair.spec, image_size),
            "query": pair.question,
            "label": [pair.answer],
            "human_or_machine": HUMAN_OR_MACHINE_MACHINE,
        }
        for pair in _draw_pairs(_split_rng("chartqa", seed, split), split, n)
    ]


def _wrong_answer(pair: _Pair, rng: random.Random) -> str:
    """A plausible but incorrect answer of the same kind as ``pair.answer``."""
    if pair.kind == "argmax":
        # Another bar of this chart: the hardest colour distractor.
        return rng.choice([c for c in pair.spec.colors if c != pair.answer])
    if pair.kind == "count":
        return str(rng.choice([k for k in _WRONG_COUNT_RANGE if str(k) != pair.answer]))
    return str(rng.choice([v for v in range(MIN_VALUE, MAX_VALUE + 1) if str(v) != pair.answer]))


def _evasive_answer(pair: _Pair, rng: random.Random) -> str:
    """A refusal that claims the image lacks the information (it never does)."""
    return rng.choice(_EVASIVE_ANSWERS[pair.kind]).format(color=pair.color)


def make_chart_prefs_split(
    split: str, n: int, seed: int = 0, image_size: int = 64
) -> list[dict[str, Any]]:
    """Build ``n`` RLAIF-V-style preference rows for ``split``.

    Columns: ``image`` (PIL RGB), ``question``, ``chosen`` (the bare correct
    answer, identical in form to the SFT labels) and ``rejected``. Rejected
    answers alternate deterministically between a wrong answer of the same
    kind (another colour of the chart, another count, another value) and an
    evasive refusal such as "The image does not show how many bars there
    are.". ``chosen != rejected`` always holds.

    Uses its own rng stream, so rows differ from :func:`make_chartqa_split`
    for the same seed; split membership follows the same hash rule, so prefs
    validation/test pairs never occur in either dataset's train split.

    Raises:
        ValueError: if ``split`` is not one of :data:`SPLITS`, ``n`` is
            negative or ``image_size`` is below 16.
        RuntimeError: if ``n`` distinct rows cannot be found.
    """
    _check_args(split, n, image_size)
    rng = _split_rng("prefs", seed, split)
    rows: list[dict[str, Any]] = []
    for i, pair in enumerate(_draw_pairs(rng, split, n)):
        # Period 2 against the kind cycle's period 3 covers all six
        # (kind, rejection style) combinations every six rows.
        rejected = _wrong_answer(pair, rng) if i % 2 == 0 else _evasive_answer(pair, rng)
        rows.append(
            {
                "image": render_chart(pair.spec, image_size),
                "question": pair.question,
                "chosen": pair.answer,
                "rejected": rejected,
            }
        )
    return rows
