"""Tests for tasks.data: builtin and hub-layout sources mapped onto the internal row schema.

File sources (JSONL / CSV / Parquet, image folders), image paths and fingerprints: test_sources.py.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tasks.config import DataConfig
from tasks.data import (
    CHART_PREFS_SYNTH,
    CHARTQA_SYNTH,
    DataSourceError,
    load_preference_rows,
    load_recipe_datasets,
    load_sft_rows,
)
from tasks.synthetic import make_chart_prefs_split, make_chartqa_split

BOOKKEEPING = {"source", "image_path", "image_error", "image_sha256"}
SFT_KEYS = {"row_id", "image", "question", "answer", "question_type"} | BOOKKEEPING
PREFERENCE_KEYS = {"row_id", "image", "question", "chosen", "rejected"} | BOOKKEEPING


def image_bytes(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


# --- builtin sources -------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_builtin_sft_rows_map_to_internal_schema(split: str):
    n, seed = 6, 3
    rows = load_sft_rows(CHARTQA_SYNTH, split, n, seed=seed)
    source = make_chartqa_split(split, n, seed=seed)
    assert len(rows) == n
    for row, src in zip(rows, source, strict=True):
        assert set(row) == SFT_KEYS
        assert isinstance(row["answer"], str)
        assert row["answer"] == src["label"][0]
        assert row["question"] == src["query"]
        assert isinstance(row["image"], Image.Image)
        assert image_bytes(row["image"]) == image_bytes(src["image"])
    assert len({row["row_id"] for row in rows}) == n


def test_builtin_sft_rows_carry_their_question_type():
    rows = load_sft_rows(CHARTQA_SYNTH, "test", 9, seed=1)
    # make_chartqa_split cycles argmax, count, value.
    assert [row["question_type"] for row in rows] == ["argmax", "count", "value"] * 3
    for row in rows:
        if row["question_type"] == "value":
            assert row["question"].startswith("What is the value of the ")
    assert all("question_type" not in row for row in load_preference_rows(CHART_PREFS_SYNTH, "test", 3))


def test_question_type_is_an_optional_source_column(offline, tmp_path: Path):
    import json

    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "a.png")
    cells = [{"question_type": "count"}, {"question_type": ""}, {}, {"kind": "yes/no"}]
    lines = [{"image": "a.png", "question": f"q{i}", "answer": "1"} | extra for i, extra in enumerate(cells)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = load_sft_rows(str(tmp_path / "train.jsonl"), "train", 4)
    assert [row["question_type"] for row in rows] == ["count", None, None, None]
    mapped = load_sft_rows(str(tmp_path / "train.jsonl"), "train", 4, columns={"kind": "question_type"})
    assert [row["question_type"] for row in mapped] == [None, None, None, "yes/no"]


def test_unknown_question_type_leaves_the_fingerprint_as_before_types():
    from tasks.data import fingerprint_rows

    rows = load_sft_rows(CHARTQA_SYNTH, "test", 3)
    untyped = [{key: value for key, value in row.items() if key != "question_type"} for row in rows]
    assert fingerprint_rows([row | {"question_type": None} for row in rows]) == fingerprint_rows(untyped)
    assert fingerprint_rows(rows) != fingerprint_rows(untyped)


def test_builtin_sft_rows_follow_seed():
    a = load_sft_rows(CHARTQA_SYNTH, "train", 6, seed=0)
    b = load_sft_rows(CHARTQA_SYNTH, "train", 6, seed=1)
    assert [(r["question"], r["answer"], image_bytes(r["image"])) for r in a] != [
        (r["question"], r["answer"], image_bytes(r["image"])) for r in b
    ]


@pytest.mark.parametrize("split", ["train", "test"])
def test_builtin_preference_rows_map_to_internal_schema(split: str):
    n, seed = 6, 2
    rows = load_preference_rows(CHART_PREFS_SYNTH, split, n, seed=seed)
    source = make_chart_prefs_split(split, n, seed=seed)
    assert len(rows) == n
    for row, src in zip(rows, source, strict=True):
        assert set(row) == PREFERENCE_KEYS
        for key in ("question", "chosen", "rejected"):
            assert row[key] == src[key]
        assert row["chosen"] != row["rejected"]
        assert image_bytes(row["image"]) == image_bytes(src["image"])
    assert len({row["row_id"] for row in rows}) == n


@pytest.mark.parametrize("loader", [load_sft_rows, load_preference_rows])
def test_unknown_builtin_names_the_allowed_ones(loader):
    with pytest.raises(DataSourceError) as info:
        loader("builtin:chartqa-synthh", "train", 2)
    message = str(info.value)
    assert "builtin:chartqa-synthh" in message
    assert CHARTQA_SYNTH in message
    assert CHART_PREFS_SYNTH in message


def test_preference_loader_rejects_sft_source():
    # ChartQA-style rows have no chosen/rejected: the mapping must say so, not pass them on.
    with pytest.raises(DataSourceError, match=r"chosen.*rejected"):
        load_preference_rows(CHARTQA_SYNTH, "train", 2)


# --- hub-style sources (datasets.load_dataset), offline --------------------------------



def _colour_image(i: int) -> Image.Image:
    return Image.new("RGB", (16, 12), (40 * i % 256, 200, 30))


def write_hub_folder(datasets, folder: Path, columns: dict[str, list[Any]], features=None) -> Path:
    """A local dataset in the hub's layout: data/<split>-00000-of-00001.parquet."""
    (folder / "data").mkdir(parents=True)
    for split in ("train", "test"):
        ds = datasets.Dataset.from_dict(columns, features=features)
        ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def chartqa_folder(datasets, folder: Path) -> Path:
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "query": datasets.Value("string"),
            "label": datasets.Sequence(datasets.Value("string")),
            "human_or_machine": datasets.ClassLabel(names=["human", "machine"]),
        }
    )
    columns = {
        "image": [_colour_image(i) for i in range(4)],
        "query": [f"What is bar {i}?" for i in range(4)],
        "label": [["7", "seven"], ["12"], ["blue", "Blue"], ["3"]],
        "human_or_machine": [0, 1, 1, 0],
    }
    return write_hub_folder(datasets, folder, columns, features)


def test_hub_sft_rows_are_mapped(offline, tmp_path: Path):
    folder = chartqa_folder(offline, tmp_path / "chartqa")
    rows = load_sft_rows(str(folder), "train", 2)
    assert len(rows) == 2  # the limit is respected
    for row in rows:
        assert set(row) == SFT_KEYS
        assert isinstance(row["image"], Image.Image)
        assert row["image"].size == (16, 12)
    assert [row["question"] for row in rows] == ["What is bar 0?", "What is bar 1?"]
    # ChartQA's `label` list: the first accepted answer becomes `answer`, as a str.
    assert [row["answer"] for row in rows] == ["7", "12"]
    assert len({row["row_id"] for row in rows}) == 2

    test_rows = load_sft_rows(str(folder), "test", 3)
    assert [row["answer"] for row in test_rows] == ["7", "12", "blue"]


def test_hub_preference_rows_are_mapped(offline, tmp_path: Path):
    # RLAIF-V's own bookkeeping columns (ds_name, origin_dataset, idx ...) are dropped.
    columns = {
        "ds_name": ["x"] * 3,
        "image": [_colour_image(i) for i in range(3)],
        "question": ["q0", "q1", "q2"],
        "chosen": ["c0", "c1", "c2"],
        "rejected": ["r0", "r1", "r2"],
        "origin_dataset": ["y"] * 3,
        "idx": [0, 1, 2],
    }
    features = offline.Features(
        {
            "ds_name": offline.Value("string"),
            "image": offline.Image(),
            "question": offline.Value("string"),
            "chosen": offline.Value("string"),
            "rejected": offline.Value("string"),
            "origin_dataset": offline.Value("string"),
            "idx": offline.Value("int64"),
        }
    )
    folder = write_hub_folder(offline, tmp_path / "rlaifv", columns, features)
    rows = load_preference_rows(str(folder), "train", 2)
    assert len(rows) == 2
    for i, row in enumerate(rows):
        assert set(row) == PREFERENCE_KEYS
        assert (row["question"], row["chosen"], row["rejected"]) == (f"q{i}", f"c{i}", f"r{i}")
        assert isinstance(row["image"], Image.Image)


def test_hub_source_missing_column_is_reported(offline, tmp_path: Path):
    columns = {"image": [_colour_image(i) for i in range(2)], "query": ["q0", "q1"]}
    features = offline.Features({"image": offline.Image(), "query": offline.Value("string")})
    folder = write_hub_folder(offline, tmp_path / "nolabel", columns, features)
    with pytest.raises(DataSourceError) as info:
        load_sft_rows(str(folder), "train", 2)
    message = str(info.value)
    assert str(folder) in message
    assert "row 0" in message
    assert "'answer'" in message
    assert "Rename the columns" in message and "'label'" in message
    assert "data.sft_columns" in message  # the recipe key that maps a column of another name


def test_missing_preference_column_is_reported(offline, tmp_path: Path):
    columns = {"image": [_colour_image(0)], "question": ["q"], "chosen": ["c"]}
    features = offline.Features(
        {"image": offline.Image(), "question": offline.Value("string"), "chosen": offline.Value("string")}
    )
    folder = write_hub_folder(offline, tmp_path / "norejected", columns, features)
    with pytest.raises(DataSourceError, match=r"row 0: missing column\(s\) \['rejected'\]") as info:
        load_preference_rows(str(folder), "train", 1)
    assert "data.preference_columns" in str(info.value)


# --- slicing and limits on a hub-layout folder ----------------------------------------


def test_split_slice_passes_through_and_limit_takes_the_first_rows(offline, tmp_path: Path):
    folder = chartqa_folder(offline, tmp_path / "chartqa")  # 4 rows a split
    half = load_sft_rows(str(folder), "train[:50%]", 10)
    assert [row["question"] for row in half] == ["What is bar 0?", "What is bar 1?"]
    # The limit applies after the slice, also when the slice already bounds the rows.
    tail = load_sft_rows(str(folder), "test[2:]", 1)
    assert [row["question"] for row in tail] == ["What is bar 2?"]
    assert tail[0]["row_id"] == "test[2:]-000000"
    assert tail[0]["answer"] == "blue"


def test_hub_rows_carry_source_digest_and_no_error(offline, tmp_path: Path):
    folder = chartqa_folder(offline, tmp_path / "chartqa")
    rows = load_sft_rows(str(folder), "train", 4)
    assert {row["source"] for row in rows} == {str(folder)}
    assert all(row["image_error"] is None for row in rows)
    assert all(len(row["image_sha256"]) == 64 for row in rows)
    # Distinct images, distinct digests (the digest is of each row's own bytes).
    assert len({row["image_sha256"] for row in rows}) == 4
    assert image_bytes(rows[1]["image"]) == image_bytes(_colour_image(1))


def test_corrupt_image_in_hub_layout_fails_its_row_only(offline, tmp_path: Path):
    features = offline.Features({"image": offline.Image(), "query": offline.Value("string"),
                                 "label": offline.Sequence(offline.Value("string"))})
    png = io.BytesIO()
    _colour_image(0).save(png, format="PNG")
    columns = {
        "image": [{"bytes": png.getvalue(), "path": None}, {"bytes": b"not a png", "path": "broken.png"}],
        "query": ["q0", "q1"],
        "label": [["a"], ["b"]],
    }
    folder = write_hub_folder(offline, tmp_path / "broken", columns, features)
    good, bad = load_sft_rows(str(folder), "train", 2)
    assert isinstance(good["image"], Image.Image) and good["image_error"] is None
    assert bad["image"] is None
    assert bad["image_error"].startswith("image does not decode")
    assert bad["image_path"] == "broken.png"


def test_unreachable_hub_id_is_a_data_source_error(offline):
    with pytest.raises(DataSourceError) as info:
        load_sft_rows("someone/chartqa-that-is-not-here", "train", 2)
    assert "someone/chartqa-that-is-not-here" in str(info.value)
    assert "'train'" in str(info.value)


def test_builtin_source_refuses_a_slice():
    with pytest.raises(DataSourceError, match=r"max_train_samples"):
        load_sft_rows(CHARTQA_SYNTH, "train[:10%]", 2)


# --- every dataset a recipe uses --------------------------------------------------------


def test_load_recipe_datasets_names_kinds_and_sizes():
    cfg = DataConfig(max_train_samples=5, max_preference_samples=4, max_eval_samples=3)
    loaded = load_recipe_datasets(cfg)
    expected = {
        "sft/train": ("sft", 5, SFT_KEYS),
        "sft/eval": ("sft", 3, SFT_KEYS),
        "preference/train": ("preference", 4, PREFERENCE_KEYS),
        "preference/eval": ("preference", 3, PREFERENCE_KEYS),
    }
    assert set(loaded) == set(expected)
    for name, (kind, size, keys) in expected.items():
        got_kind, rows = loaded[name]
        assert got_kind == kind, name
        assert len(rows) == size, name
        assert all(set(row) == keys for row in rows), name
    # Train and held-out splits are different rows.
    train_q = {(r["question"], image_bytes(r["image"])) for r in loaded["sft/train"][1]}
    test_q = {(r["question"], image_bytes(r["image"])) for r in loaded["sft/eval"][1]}
    assert not train_q & test_q


def test_load_recipe_datasets_follows_split_names_and_seed():
    cfg = DataConfig(
        eval_split="validation", max_train_samples=2, max_preference_samples=2, max_eval_samples=2, seed=5
    )
    loaded = load_recipe_datasets(cfg)
    assert set(loaded) == {"sft/train", "sft/eval", "preference/train", "preference/eval"}
    expected = make_chartqa_split("validation", 2, seed=5)
    assert [r["answer"] for r in loaded["sft/eval"][1]] == [s["label"][0] for s in expected]
    assert [r["question"] for r in loaded["sft/eval"][1]] == [s["query"] for s in expected]

    for name, split in (("preference/train", "train"), ("preference/eval", "validation")):
        expected_prefs = make_chart_prefs_split(split, 2, seed=5)
        got = [(r["question"], r["chosen"], r["rejected"]) for r in loaded[name][1]]
        assert got == [(s["question"], s["chosen"], s["rejected"]) for s in expected_prefs], name


def test_load_recipe_datasets_refuses_one_split_for_train_and_eval():
    cfg = DataConfig(eval_split="train", max_train_samples=2, max_preference_samples=2, max_eval_samples=2)
    with pytest.raises(DataSourceError, match=r"train\[:80%\]"):
        load_recipe_datasets(cfg)
    same_preference_split = DataConfig(preference_eval_split="train", max_train_samples=2,
                                       max_preference_samples=2, max_eval_samples=2)
    with pytest.raises(DataSourceError, match="evaluation would run on training rows"):
        load_recipe_datasets(same_preference_split)


def test_preference_splits_can_differ_from_the_sft_splits():
    cfg = DataConfig(preference_eval_split="validation", max_train_samples=2, max_preference_samples=2,
                     max_eval_samples=2, seed=5)
    loaded = load_recipe_datasets(cfg)
    expected = make_chart_prefs_split("validation", 2, seed=5)
    assert [r["chosen"] for r in loaded["preference/eval"][1]] == [s["chosen"] for s in expected]
    assert [r["answer"] for r in loaded["sft/eval"][1]] == [s["label"][0] for s in make_chartqa_split("test", 2, seed=5)]


def test_load_recipe_datasets_loads_only_the_roles_asked_for():
    cfg = DataConfig(max_train_samples=5, max_preference_samples=4, max_eval_samples=3)
    held_out = load_recipe_datasets(cfg, roles=("sft/eval", "preference/eval"))
    assert {name: (kind, len(rows)) for name, (kind, rows) in held_out.items()} == {
        "sft/eval": ("sft", 3), "preference/eval": ("preference", 3),
    }
    assert [r["question"] for r in held_out["sft/eval"][1]] == [
        r["question"] for r in load_recipe_datasets(cfg)["sft/eval"][1]
    ]
