"""The registered adapter as an MLflow pyfunc model (models from code; nothing pickled).

`mlflow.pyfunc.load_model("models:/NAME@candidate").predict(frame)` takes a frame with
`image` (base64-encoded PNG/JPEG) and `question` columns and returns one answer a row.
`mlflow models serve --env-manager local` serves the same model: POST
`{"dataframe_split": {"columns": ["image", "question"], "data": [[...], ...]}}` to
`/invocations`, get `{"predictions": [...]}`.

It loads the base model (from the model's own artifacts for a builtin base, else by hub
id), applies the LoRA adapter, takes the processor saved beside the adapter, and answers
with the greedy batched decoding the evaluation uses (tasks/evaluation.py): the same
answers for the same rows in the same batches, however often it is asked. Images go
through the training formatting (RGB, `image_longest_edge`); nothing here needs
torchvision.

Model config keys read (written by tasks/tracking.py::register_adapter): base_model,
revision, dtype, quantization, system_message, trust_remote_code; optional:
max_new_tokens (16), batch_size (16), image_longest_edge (None), attn_implementation (None).
"""

from __future__ import annotations

import base64
import binascii
import io

import mlflow
import pandas as pd
from PIL import Image, UnidentifiedImageError

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_NEW_TOKENS = 16


def decode_image(encoded: str, row: int) -> Image.Image:
    """A base64 PNG/JPEG string -> PIL image, fully read; ValueError naming the row otherwise."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        image.load()
    except (binascii.Error, TypeError, ValueError, UnidentifiedImageError, OSError) as error:
        raise ValueError(f"row {row}: `image` must be a base64-encoded PNG or JPEG ({error})") from error
    return image


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
            attn_implementation=config.get("attn_implementation"),
            trust_remote_code=config.get("trust_remote_code", False),
        )
        self.base = load_model(model_settings, QuantizationConfig(**config["quantization"]))
        self.model = peft.PeftModel.from_pretrained(self.base, context.artifacts["adapter"])
        self.model.eval()  # no LoRA dropout: the same input always gives the same answer
        # The processor saved with the adapter is the one training used (chat template included).
        self.processor = AutoProcessor.from_pretrained(
            context.artifacts["adapter"], trust_remote_code=config.get("trust_remote_code", False)
        )
        self.system_message = config["system_message"]
        self.max_new_tokens = int(config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        self.batch_size = int(config.get("batch_size") or DEFAULT_BATCH_SIZE)
        self.image_longest_edge = config.get("image_longest_edge")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        """One greedy answer per row; ValueError if a column is missing or an image does not decode."""
        from tasks.evaluation import generate_answers
        from tasks.formatting import to_sft_sample

        missing = {"image", "question"} - set(model_input.columns)
        if missing:
            raise ValueError(f"the input needs columns `image` and `question`; missing {sorted(missing)}")
        samples = [
            to_sft_sample(
                {"image": decode_image(image, row), "question": str(question), "answer": ""},
                self.system_message,
                self.image_longest_edge,
            )
            for row, (image, question) in enumerate(zip(model_input["image"], model_input["question"]))
        ]
        if not samples:
            return []
        return generate_answers(self.model, self.processor, samples, self.batch_size, self.max_new_tokens)


mlflow.models.set_model(VLMAdapterModel())
