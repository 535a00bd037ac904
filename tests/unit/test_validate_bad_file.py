"""`vlmops validate` on a user's JSONL files holding bad rows of every kind.

It must exit non-zero, name each bad row and its check, write the quarantine file, and
lose no good row.
"""

import json
import random
from pathlib import Path

import yaml
from PIL import Image

from flows.cli import main
from tasks import synthetic


def _chart(folder: Path, name: str, seed: int) -> str:
    synthetic.render_chart(synthetic.sample_chart(random.Random(seed))).save(folder / name)
    return name


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _build_dataset(root: Path) -> tuple[dict[str, set[str]], set[str]]:
    """Write sft/{train,test}.jsonl and prefs/{train,test}.jsonl; return expected failures and good ids."""
    sft, prefs = root / "sft", root / "prefs"
    for folder in (sft, prefs):
        (folder / "images").mkdir(parents=True)
    (root / "outside.png").write_bytes((sft / "images" / _chart(sft / "images", "x.png", 99)).read_bytes())

    good = [{"image": f"images/{_chart(sft / 'images', f'g{i}.png', i)}", "query": f"How many bars are there? {i}",
             "label": [str(i % 4 + 1)]} for i in range(8)]
    (sft / "images" / "corrupt.png").write_bytes(b"this is not a png")
    Image.new("1", (5000, 5000)).save(sft / "images" / "bomb.png")  # 25 Mpx, a few KB on disk
    Image.new("RGB", (4, 4), "white").save(sft / "images" / "tiny.png")
    test_rows = [{"image": f"images/{_chart(sft / 'images', f't{i}.png', 1000 + i)}", "query": "Which bar is the tallest?",
                  "label": ["red"]} for i in range(3)]
    bad = [
        ({"image": good[0]["image"], "query": "   ", "label": ["1"]}, {"question_not_empty"}),
        ({"image": good[1]["image"], "query": "How many bars?", "label": [""]}, {"answer_not_empty"}),
        ({"image": "images/corrupt.png", "query": "How many bars?", "label": ["2"]}, {"image_decodes"}),
        ({"image": "images/missing.png", "query": "How many bars?", "label": ["2"]}, {"image_decodes"}),
        ({"image": "../outside.png", "query": "How many bars?", "label": ["2"]}, {"image_path_inside_dataset"}),
        ({"image": "images/bomb.png", "query": "How many bars?", "label": ["2"]}, {"image_within_pixel_budget"}),
        ({"image": "images/tiny.png", "query": "How many bars?", "label": ["2"]},
         {"image_width_in_bounds", "image_height_in_bounds"}),
        ({"image": good[2]["image"], "query": "Describe every bar in words. " * 8, "label": ["2"]},
         {"within_token_budget"}),
        (dict(good[3]), {"duplicate_in_split"}),
        ({"image": test_rows[0]["image"], "query": test_rows[0]["query"], "label": ["blue"]}, {"leaks_into_reference"}),
    ]
    train = good + [row for row, _checks in bad]
    _write_jsonl(sft / "train.jsonl", train)
    _write_jsonl(sft / "test.jsonl", test_rows)
    expected = {f"train-{len(good) + i:06d}": checks for i, (_row, checks) in enumerate(bad)}

    pref_good = [{"image": f"images/{_chart(prefs / 'images', f'p{i}.png', 2000 + i)}", "question": "How many bars are there?",
                  "chosen": str(i % 4 + 1), "rejected": "The image does not show that."} for i in range(6)]
    _write_jsonl(prefs / "train.jsonl", pref_good + [dict(pref_good[0], chosen="5", rejected="5")])
    _write_jsonl(prefs / "test.jsonl", [dict(pref_good[1], image=f"images/{_chart(prefs / 'images', 'q.png', 3000)}")])
    expected_prefs = {"train-000006": {"chosen_differs"}}
    good_ids = {f"train-{i:06d}" for i in range(len(good))}
    return {"sft/train": expected, "preference/train": expected_prefs}, good_ids


def test_validate_names_every_bad_row_and_keeps_every_good_one(tiny_model_dir, prefect_harness, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    expected, good_ids = _build_dataset(tmp_path / "data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "bad-file",
        "data": {"sft_source": str(tmp_path / "data" / "sft" / "{split}.jsonl"),
                 "preference_source": str(tmp_path / "data" / "prefs" / "{split}.jsonl")},
        "validation": {"max_image_pixels": 1_000_000},
        "sft": {"max_length": 96},
    }))

    assert main(["validate", "-c", str(recipe)]) == 1
    out = capsys.readouterr().out

    quarantine = tmp_path / "runs" / "validation" / "quarantine"
    quarantined: dict[str, set[str]] = {}
    for dataset, failures in expected.items():
        lines = [json.loads(line) for line in (quarantine / f"{dataset.replace('/', '_')}.jsonl").read_text().splitlines()]
        found: dict[str, set[str]] = {}
        for line in lines:
            found.setdefault(line["row_id"], set()).add(line["check_id"])
            assert line["source"].endswith(".jsonl") and "value" in line
        assert found == failures, dataset  # every bad row, with its check(s), and nothing else
        quarantined[dataset] = set(found)
        for row_id in failures:
            assert row_id in out, f"{row_id} not named in the report"
    assert not good_ids & quarantined["sft/train"], "a good row was quarantined"
    assert "image path escapes the dataset folder" in (quarantine / "sft_train.jsonl").read_text()
    assert "Data validation of sft/train (sft): FAILED" in out
    assert "Data validation of sft/eval (sft): PASSED" in out
