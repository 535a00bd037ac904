"""The registered adapter as an MLflow pyfunc model (models from code; nothing pickled).

`mlflow.pyfunc.load_model("models:/NAME@candidate").predict(frame)` takes a frame with
`image` (base64-encoded PNG/JPEG) and `question` columns and returns one answer a row.
It loads the base model (from the model's own artifacts for a builtin base, else by hub
id), applies the LoRA adapter, and answers with the same greedy batched decoding the
evaluation uses.
"""

from __future__ import annotations

import base64
import io

import mlflow
import pandas as pd
from PIL import Image


class VLMAdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import peft
        from transformers import AutoProcessor

        from tasks.config import ModelConfig, QuantizationConfig
        from tasks.models import load_model

        config = context.model_config
        base = context.artifacts.get("base_model") or config["base_model"]
        model_settings = ModelConfig(
            name_or_path=base, revision=config.get("revision"), dtype=config["dtype"],
            trust_remote_code=config.get("trust_remote_code", False),
        )
        self.base = load_model(model_settings, QuantizationConfig(**config["quantization"]))
        self.model = peft.PeftModel.from_pretrained(self.base, context.artifacts["adapter"])
        self.processor = AutoProcessor.from_pretrained(context.artifacts["adapter"])
        self.system_message = config["system_message"]
        self.max_new_tokens = int(config.get("max_new_tokens", 16))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        from tasks.evaluation import generate_answers
        from tasks.formatting import to_sft_sample

        samples = [
            to_sft_sample(
                {"image": Image.open(io.BytesIO(base64.b64decode(row.image))), "question": row.question, "answer": ""},
                self.system_message,
            )
            for row in model_input.itertuples()
        ]
        return generate_answers(self.model, self.processor, samples, batch_size=16, max_new_tokens=self.max_new_tokens)


mlflow.models.set_model(VLMAdapterModel())
