"""Tests for tasks.data's local sources: files with relative image paths, `{split}` patterns,
image folders, recipe column mappings, unsafe or broken image paths, and the fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from tasks.config import DataConfig
from tasks.data import (
    CHARTQA_SYNTH,
    DataSourceError,
    fingerprint_rows,
    load_preference_rows,
    load_recipe_datasets,
    load_sft_rows,
)

REPO = Path(__file__).resolve().parents[2]



def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chart_rows(n: int, folder: Path, start: int = 0) -> list[dict[str, Any]]:
    """ChartQA-style rows whose images are written under folder/images/."""
    rows = []
    for i in range(start, start + n):
        write_png(folder / "images" / f"{i}.png", (20 * i, 100, 200))
        rows.append({"image": f"images/{i}.png", "query": f"q{i}", "label": [f"a{i}"]})
    return rows


def pixel(image: Image.Image) -> tuple[int, ...]:
    return image.convert("RGB").getpixel((0, 0))


# --- file sources --------------------------------------------------------------------------


def test_jsonl_with_relative_image_paths(offline, tmp_path: Path):
    folder = tmp_path / "ds"
    source = write_jsonl(folder / "train.jsonl", chart_rows(3, folder))
    rows = load_sft_rows(str(source), "train", 10)
    assert [(r["question"], r["answer"]) for r in rows] == [("q0", "a0"), ("q1", "a1"), ("q2", "a2")]
    assert [r["row_id"] for r in rows] == ["train-000000", "train-000001", "train-000002"]
    for i, row in enumerate(rows):
        assert pixel(row["image"]) == (20 * i, 100, 200)
        assert row["image_path"] == f"images/{i}.png"
        assert row["image_error"] is None
        assert row["source"] == str(source)
        assert row["image_sha256"] == hashlib.sha256((folder / "images" / f"{i}.png").read_bytes()).hexdigest()


def test_relative_paths_start_at_the_files_folder_not_the_cwd(offline, tmp_path: Path, monkeypatch):
    folder = tmp_path / "ds"
    source = write_jsonl(folder / "train.jsonl", chart_rows(1, folder))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (row,) = load_sft_rows(str(source), "train", 1)
    assert row["image_error"] is None and pixel(row["image"]) == (0, 100, 200)


def test_loading_reads_headers_only(offline, tmp_path: Path, monkeypatch):
    # Validation refuses oversized images by their header, so loading must not decode pixels.
    folder = tmp_path / "ds"
    source = write_jsonl(folder / "train.jsonl", chart_rows(2, folder))

    def refuse_decoding(self):
        raise AssertionError("pixels decoded while loading")

    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", refuse_decoding)
        rows = load_sft_rows(str(source), "train", 2)
        assert [row["image"].size for row in rows] == [(16, 16), (16, 16)]
    assert pixel(rows[1]["image"]) == (20, 100, 200)  # decodes once asked to


def test_csv_mapped_by_the_recipe_keeps_cells_as_text(offline, tmp_path: Path):
    folder = tmp_path / "mine"
    write_png(folder / "pics" / "a.png", (1, 2, 3))
    write_png(folder / "pics" / "b.png", (4, 5, 6))
    source = folder / "data.csv"
    source.write_text("img,prompt,response,notes\npics/a.png,How many?,007,x\npics/b.png,,3.50,y\n")
    columns = {"img": "image", "prompt": "question", "response": "answer"}
    rows = load_sft_rows(str(source), "train", 5, columns=columns)
    # pandas would have made these 7 and 3.5; an empty cell stays empty for validation to flag.
    assert [(r["question"], r["answer"]) for r in rows] == [("How many?", "007"), ("", "3.50")]
    assert [pixel(r["image"]) for r in rows] == [(1, 2, 3), (4, 5, 6)]
    assert [r["image_path"] for r in rows] == ["pics/a.png", "pics/b.png"]
    assert "notes" not in rows[0]


def test_recipe_mapping_wins_over_default_names(offline, tmp_path: Path):
    # Both `question` (a default name) and `prompt` exist; the recipe says which is the question.
    folder = tmp_path / "ds"
    write_png(folder / "i.png", (9, 9, 9))
    source = write_jsonl(folder / "d.jsonl", [{"image": "i.png", "question": "old", "prompt": "new", "answer": "a"}])
    (row,) = load_sft_rows(str(source), "train", 1, columns={"prompt": "question"})
    assert (row["question"], row["answer"]) == ("new", "a")  # answer/image still by default names


def test_parquet_with_relative_image_paths(offline, tmp_path: Path):
    folder = tmp_path / "pq"
    rows = chart_rows(2, folder)
    table = pa.table({
        "image": [r["image"] for r in rows],
        "query": [r["query"] for r in rows],
        "label": [r["label"] for r in rows],
    })
    pq.write_table(table, folder / "train.parquet")
    loaded = load_sft_rows(str(folder / "train.parquet"), "train", 5)
    assert [(r["question"], r["answer"], pixel(r["image"])) for r in loaded] == [
        ("q0", "a0", (0, 100, 200)), ("q1", "a1", (20, 100, 200))
    ]


def test_parquet_with_embedded_images(offline, tmp_path: Path):
    features = offline.Features({"image": offline.Image(), "question": offline.Value("string"),
                                 "chosen": offline.Value("string"), "rejected": offline.Value("string")})
    data = {"image": [Image.new("RGB", (8, 8), (7, 8, 9))], "question": ["q"], "chosen": ["c"], "rejected": ["r"]}
    path = tmp_path / "prefs.parquet"
    offline.Dataset.from_dict(data, features=features).to_parquet(str(path))
    (row,) = load_preference_rows(str(path), "train", 5)
    assert (row["question"], row["chosen"], row["rejected"]) == ("q", "c", "r")
    assert pixel(row["image"]) == (7, 8, 9) and row["image_error"] is None


def test_split_placeholder_reads_one_file_per_split(offline, tmp_path: Path):
    folder = tmp_path / "ds"
    write_jsonl(folder / "train.jsonl", chart_rows(4, folder))
    write_jsonl(folder / "test.jsonl", chart_rows(2, folder, start=10))
    source = str(folder / "{split}.jsonl")
    assert [r["question"] for r in load_sft_rows(source, "train[:50%]", 10)] == ["q0", "q1"]
    test_rows = load_sft_rows(source, "test", 10)
    assert [r["question"] for r in test_rows] == ["q10", "q11"]
    assert test_rows[0]["row_id"] == "test-000000" and test_rows[0]["source"] == source
    with pytest.raises(DataSourceError, match=r"validation"):
        load_sft_rows(source, "validation", 1)  # no validation.jsonl


def test_one_file_is_the_train_split_and_can_be_sliced(offline, tmp_path: Path):
    folder = tmp_path / "ds"
    source = str(write_jsonl(folder / "all.jsonl", chart_rows(4, folder)))
    assert [r["question"] for r in load_sft_rows(source, "train[:50%]", 10)] == ["q0", "q1"]
    assert [r["question"] for r in load_sft_rows(source, "train[50%:]", 1)] == ["q2"]  # limit after the slice
    with pytest.raises(DataSourceError) as info:
        load_sft_rows(source, "test", 2)
    message = str(info.value)
    assert "{split}" in message and "train[80%:]" in message


def test_recipe_with_file_sources_and_column_mapping(offline, tmp_path: Path):
    folder = tmp_path / "ds"
    sft = chart_rows(6, folder)
    write_jsonl(folder / "sft.jsonl", [{"picture": r["image"], "ask": r["query"], "label": r["label"]} for r in sft])
    write_jsonl(folder / "prefs.jsonl", [
        {"image": r["image"], "question": r["query"], "chosen": "yes", "rejected": "no"} for r in sft
    ])
    cfg = DataConfig(
        sft_source=str(folder / "sft.jsonl"), preference_source=str(folder / "prefs.jsonl"),
        train_split="train[:4]", eval_split="train[4:]",
        sft_columns={"picture": "image", "ask": "question"},
        max_train_samples=10, max_preference_samples=3, max_eval_samples=10,
    )
    loaded = load_recipe_datasets(cfg)
    assert [r["question"] for r in loaded["sft/train"][1]] == ["q0", "q1", "q2", "q3"]
    assert [r["question"] for r in loaded["sft/eval"][1]] == ["q4", "q5"]
    assert [r["answer"] for r in loaded["sft/eval"][1]] == ["a4", "a5"]
    assert len(loaded["preference/train"][1]) == 3
    assert all(r["image_error"] is None for _, rows in loaded.values() for r in rows)


def test_mapping_naming_a_missing_column_says_how_to_fix_it(offline, tmp_path: Path):
    folder = tmp_path / "ds"
    source = folder / "d.csv"
    folder.mkdir()
    source.write_text("img,prompt,response\nx.png,q,a\n")
    with pytest.raises(DataSourceError) as info:
        load_sft_rows(str(source), "train", 1, columns={"picture": "image", "prompt": "question", "response": "answer"})
    message = str(info.value)
    assert str(source) in message
    assert "'picture'" in message
    assert "['img', 'prompt', 'response']" in message  # what is there
    assert "data.sft_columns" in message


def test_mapping_onto_an_unknown_internal_column_is_refused():
    with pytest.raises(DataSourceError, match=r"data.preference_columns.*'answer'.*chosen"):
        load_preference_rows(CHARTQA_SYNTH, "train", 1, columns={"label": "answer"})


def test_image_folder_with_metadata(offline, tmp_path: Path):
    folder = tmp_path / "imgs"
    for i in range(3):
        write_png(folder / f"{i}.png", (30 * i, 0, 0))
    write_jsonl(folder / "metadata.jsonl", [
        {"file_name": f"{i}.png", "question": f"q{i}", "answer": i} for i in range(3)
    ])
    rows = load_sft_rows(str(folder), "train", 10)
    by_question = {r["question"]: r for r in rows}
    assert set(by_question) == {"q0", "q1", "q2"}
    for i in range(3):
        row = by_question[f"q{i}"]
        assert row["answer"] == str(i)  # numbers become strings
        assert pixel(row["image"]) == (30 * i, 0, 0)
        assert row["image_error"] is None


# --- unsafe and broken images --------------------------------------------------------------


def test_paths_escaping_the_folder_are_never_opened(offline, tmp_path: Path):
    outside = write_png(tmp_path / "outside.png", (255, 0, 0))  # a real image: opening it would succeed
    folder = tmp_path / "ds"
    write_png(folder / "images" / "ok.png", (0, 255, 0))
    (folder / "images" / "link.png").symlink_to(outside)
    cells = ["../outside.png", str(outside), "images/../../outside.png", "images/link.png", "images/ok.png"]
    source = write_jsonl(folder / "d.jsonl", [{"image": c, "question": "q", "answer": "a"} for c in cells])
    rows = load_sft_rows(str(source), "train", 10)
    for cell, row in zip(cells[:-1], rows, strict=False):
        assert row["image"] is None, cell
        assert row["image_sha256"] is None, cell  # its bytes were not read either
        assert row["image_error"] == f"image path escapes the dataset folder: {cell}"
        assert row["image_path"] == cell
    assert rows[-1]["image_error"] is None and pixel(rows[-1]["image"]) == (0, 255, 0)


def test_missing_corrupt_and_empty_image_cells(offline, tmp_path: Path):
    folder = tmp_path / "ds"
    write_png(folder / "good.png", (1, 1, 1))
    (folder / "bad.png").write_bytes(b"not a png")
    source = folder / "d.csv"
    source.write_text("image,question,answer\ngood.png,q,a\nnope.png,q,a\nbad.png,q,a\n,q,a\n")
    good, missing, corrupt, empty = load_sft_rows(str(source), "train", 10)
    assert good["image_error"] is None
    assert (missing["image"], missing["image_error"]) == (None, "image file not found: nope.png")
    assert corrupt["image"] is None and corrupt["image_error"].startswith("image does not decode")
    assert corrupt["image_sha256"] == hashlib.sha256(b"not a png").hexdigest()
    assert empty["image"] is None and "empty" in empty["image_error"]


def test_decompression_bomb_is_refused_by_header(offline, tmp_path: Path, monkeypatch):
    folder = tmp_path / "ds"
    write_png(folder / "big.png", (0, 0, 0), size=(64, 64))
    source = write_jsonl(folder / "d.jsonl", [{"image": "big.png", "question": "q", "answer": "a"}])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises above twice this: 4096 > 2000
    (row,) = load_sft_rows(str(source), "train", 1)
    assert row["image"] is None
    assert row["image_error"].startswith("image refused before decoding")


def test_exif_orientation_is_applied(offline, tmp_path: Path):
    folder = tmp_path / "ds"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.new("RGB", (16, 8), (200, 0, 0)).save(folder / "photo.jpg", exif=exif)
    source = write_jsonl(folder / "d.jsonl", [{"image": "photo.jpg", "question": "q", "answer": "a"}])
    (row,) = load_sft_rows(str(source), "train", 1)
    assert row["image"].size == (8, 16)


def test_list_labels_numbers_and_empty_lists(offline, tmp_path: Path, caplog):
    folder = tmp_path / "ds"
    write_png(folder / "i.png", (0, 0, 0))
    source = write_jsonl(folder / "d.jsonl", [
        {"image": "i.png", "query": "q0", "label": [42, 7]},  # non-str first answer
        {"image": "i.png", "query": "q1", "label": []},  # no accepted answer
        {"image": "i.png", "query": "q2", "label": [3]},
    ])
    with caplog.at_level(logging.INFO, logger="tasks.data"):
        rows = load_sft_rows(str(source), "train", 3)
    assert [row["answer"] for row in rows] == ["42", "", "3"]
    notes = [r.getMessage() for r in caplog.records if "ChartQA-style list labels" in r.getMessage()]
    assert len(notes) == 1 and "1 of 3 rows" in notes[0]

    plain = write_jsonl(folder / "vqa.jsonl", [{"image": "i.png", "question": "q", "answer": 5}])
    assert load_sft_rows(str(plain), "train", 1)[0]["answer"] == "5"


def test_missing_local_file_is_reported(offline, tmp_path: Path):
    with pytest.raises(DataSourceError, match=r"no such file or folder"):
        load_sft_rows(str(tmp_path / "nothing.jsonl"), "train", 1)


# --- fingerprint ---------------------------------------------------------------------------


def _fingerprint_dataset(folder: Path, name: str = "d.jsonl", rows: list[dict[str, Any]] | None = None) -> str:
    if rows is not None:
        write_jsonl(folder / name, rows)
    return fingerprint_rows(load_sft_rows(str(folder / name), "train", 10))


def test_fingerprint_is_stable_and_content_based(offline, tmp_path: Path):
    folder = tmp_path / "ds"
    rows = chart_rows(3, folder)
    first = _fingerprint_dataset(folder, rows=rows)
    assert len(first) == 16 and int(first, 16) >= 0
    assert _fingerprint_dataset(folder) == first  # a second load
    # The same content in another folder: where the data lives is not part of it.
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert _fingerprint_dataset(moved) == first

    # One answer changed (a new file name: datasets caches files by path and mtime).
    changed = [dict(r) for r in rows]
    changed[1]["label"] = ["other"]
    assert _fingerprint_dataset(folder, "answer.jsonl", changed) != first
    # The same rows in another order.
    assert _fingerprint_dataset(folder, "order.jsonl", [rows[1], rows[0], rows[2]]) != first
    # One pixel changed in one image.
    image = Image.open(folder / "images" / "2.png").convert("RGB")
    image.putpixel((5, 5), (1, 2, 3))
    image.save(folder / "images" / "2.png")
    assert _fingerprint_dataset(folder) != first


def test_fingerprint_is_the_same_in_another_process(offline, tmp_path: Path):
    folder = tmp_path / "ds"
    write_jsonl(folder / "d.jsonl", chart_rows(2, folder))
    here = _fingerprint_dataset(folder)
    code = (
        "import sys; from tasks.data import fingerprint_rows, load_sft_rows; "
        "print(fingerprint_rows(load_sft_rows(sys.argv[1], 'train', 10)))"
    )
    env = os.environ | {"HF_DATASETS_CACHE": str(tmp_path / "other-cache"), "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder / "d.jsonl")], cwd=REPO, env=env,
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == here


def test_fingerprint_of_in_memory_images_and_missing_ones(offline, tmp_path: Path):
    a = load_sft_rows(CHARTQA_SYNTH, "train", 4, seed=0)
    assert fingerprint_rows(a) == fingerprint_rows(load_sft_rows(CHARTQA_SYNTH, "train", 4, seed=0))
    assert fingerprint_rows(a) != fingerprint_rows(load_sft_rows(CHARTQA_SYNTH, "train", 4, seed=1))
    # Hand-made rows without a recorded digest fall back to the pixels.
    base = {"row_id": "x", "question": "q", "answer": "a"}
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    assert fingerprint_rows([base | {"image": red}]) != fingerprint_rows([base | {"image": blue}])
    assert fingerprint_rows([base | {"image": None}]) == fingerprint_rows([base | {"image": None, "row_id": "y"}])
