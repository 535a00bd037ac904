"""The registered adapter served for real: in-process pyfunc and `mlflow models serve` agree.

A 4-step QLoRA SFT adapter on the tiny model is registered through a real tracking server
(tests/integration/conftest.py), loaded back as `models:/NAME@candidate`, then served by
`mlflow models serve --env-manager local` on loopback and asked the same questions over HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from servers import http_post_json, start_model_server

from tasks import synthetic
from tasks.config import recipe_from_dict
from tasks.data import CHARTQA_SYNTH, load_sft_rows
from tasks.formatting import save_sft_dataset
from tasks.tracking import register_adapter, start_pipeline_run
from tasks.training import train_sft

SYSTEM = "Answer with a single word or number."


def chart_frame(n: int) -> pd.DataFrame:
    """`n` held-out chart questions as the model's input: base64 PNG + question."""
    images, questions = [], []
    for row in synthetic.make_chartqa_split("test", n):
        buffer = io.BytesIO()
        row["image"].save(buffer, format="PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode())
        questions.append(row["query"])
    return pd.DataFrame({"image": images, "question": questions})


@pytest.fixture(scope="module")
def registered(mlflow_server, tiny_model_dir, tmp_path_factory) -> str:
    """Train a tiny adapter and register it on the server; returns `models:/NAME@candidate`."""
    tmp = tmp_path_factory.mktemp("serving")
    recipe = recipe_from_dict({
        "data": {"system_message": SYSTEM},
        "quantization": {"mode": "4bit"},
        "sft": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3},
    })
    data = save_sft_dataset(load_sft_rows(CHARTQA_SYNTH, "train", 16), SYSTEM, tmp / "sft")
    adapter = train_sft(recipe, data, tmp / "out")
    run_id = start_pipeline_run(recipe)
    name, version = register_adapter(run_id, recipe, adapter, Path(tiny_model_dir), {"some": "tag"})
    assert mlflow.MlflowClient().get_model_version(name, version).tags["some"] == "tag"
    return f"models:/{name}@{recipe.registry.candidate_alias}"


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return chart_frame(6)


@pytest.fixture(scope="module")
def pyfunc_answers(registered, frame) -> list[str]:
    model = mlflow.pyfunc.load_model(registered)
    answers = list(model.predict(frame))
    assert list(model.predict(frame)) == answers, "greedy answers changed between two calls"
    return answers


def test_pyfunc_model_answers_one_string_per_row(pyfunc_answers, frame):
    assert len(pyfunc_answers) == len(frame)
    assert all(isinstance(answer, str) for answer in pyfunc_answers)
    assert any(pyfunc_answers), "every answer is empty: prompt or stop tokens are wrong"


def test_model_server_answers_like_the_pyfunc_model(mlflow_server, registered, frame, pyfunc_answers, tmp_path):
    started = time.monotonic()
    server = start_model_server(
        registered, mlflow_server.url, log_path=tmp_path / "model-server.log",
        extra_env={"TMPDIR": str(tmp_path)},  # the downloaded model goes there, not to /tmp
        cwd=tmp_path,  # `tasks` must come from the model's code paths / install, not the cwd
    )
    try:
        print(f"model server answered /ping after {time.monotonic() - started:.1f} s")
        split = {"dataframe_split": frame.to_dict(orient="split")}
        status, body = http_post_json(f"{server.url}/invocations", json.dumps(split).encode())
        assert status == 200, body[:2000]
        assert json.loads(body)["predictions"] == pyfunc_answers

        records = {"dataframe_records": frame.to_dict(orient="records")}
        status, body = http_post_json(f"{server.url}/invocations", json.dumps(records).encode())
        assert status == 200, body[:2000]
        assert json.loads(body)["predictions"] == pyfunc_answers

        bad = {"dataframe_records": [{"image": "bm90IGFuIGltYWdl", "question": "How many bars are there?"}]}
        status, body = http_post_json(f"{server.url}/invocations", json.dumps(bad).encode())
        assert status >= 400 and b"row 0" in body, (status, body[:2000])
    finally:
        server.stop()
    assert not server.group_alive(), f"model server processes survive: {server.group_members()}"
    assert server.process.returncode is not None
