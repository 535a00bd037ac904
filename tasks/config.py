"""The recipe: one pydantic model for the whole pipeline, read from a YAML file.

A recipe holds only fields the code reads. Unknown keys are an error that names the key
and the file, so a typo (`learnin_rate`) cannot silently fall back to a default. Fields
that TRL, PEFT or bitsandbytes already define keep those libraries' names and meaning and
are passed straight through to them.

Overrides come from the command line as dotted paths: `--set sft.learning_rate=1e-4`.
Values are parsed as YAML scalars, so `1e-4`, `true`, `null` and `[q_proj, v_proj]` work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from transformers.training_args import OptimizerNames
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A recipe that cannot be read: unknown key, wrong type, bad override."""


class _Section(BaseModel):
    # extra="forbid" is what makes a misspelt key an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DataConfig(_Section):
    """Where the training and evaluation data come from.

    A source is `builtin:chartqa-synth` / `builtin:chart-prefs-synth`, a hub dataset id
    (`HuggingFaceM4/ChartQA`), a local JSONL / CSV / Parquet file whose image column holds
    paths relative to the file's folder, or a local folder (an image folder with a
    metadata file, or a dataset in the hub's layout).
    """

    sft_source: str = Field(
        "builtin:chartqa-synth",
        description="SFT data: builtin:chartqa-synth, a hub id, a JSONL/CSV/Parquet file or a folder.",
    )
    preference_source: str = Field(
        "builtin:chart-prefs-synth",
        description="Preference pairs for DPO: builtin:chart-prefs-synth, a hub id, a file or a folder.",
    )
    train_split: str = Field("train", description="Split used for training; slicing works: `train[:10%]`.")
    eval_split: str = Field("test", description="Held-out split every model is evaluated on (ChartQA: `val` or `test`).")
    preference_train_split: str | None = Field(
        None, description="Split of the preference source to train DPO on; None uses train_split."
    )
    preference_eval_split: str | None = Field(
        None, description="Held-out split of the preference source; None uses eval_split (RLAIF-V: slice train)."
    )
    sft_columns: dict[str, str] | None = Field(
        None,
        description="Source column -> internal column (question, answer, image), e.g. {query: question, label: answer}. "
        "None uses ChartQA's names.",
    )
    validation_split: str | None = Field(
        None,
        description="Split of the SFT source the trainer evaluates on during training (eval loss, early "
        "stopping); ChartQA: `val`. Never the held-out eval split. None: no evaluation during training.",
    )
    preference_validation_split: str | None = Field(
        None, description="Split of the preference source DPO evaluates on during training; None: none."
    )
    preference_columns: dict[str, str] | None = Field(
        None,
        description="Source column -> internal column (question, chosen, rejected, image). None uses RLAIF-V's names.",
    )
    image_longest_edge: int | None = Field(
        None, ge=8, description="Images are resized (aspect kept) so their longest edge is at most this many pixels."
    )
    max_train_samples: int = Field(1200, ge=1, description="SFT training rows to use.")
    max_preference_samples: int = Field(600, ge=1, description="DPO training pairs to use.")
    max_eval_samples: int = Field(150, ge=1, description="Held-out rows (and pairs) to evaluate on.")
    seed: int = Field(0, description="Seed of the synthetic data generators.")
    system_message: str = Field(
        "Answer with a single word or number.",
        description="System message put in front of every question (SFT, DPO and evaluation).",
    )


class ValidationConfig(_Section):
    """Great Expectations checks run before any model is loaded."""

    max_failed_fraction: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Rows failing a check are quarantined; above this share the run stops.",
    )
    mostly: dict[str, float] = Field(
        default_factory=dict,
        description="Per-check limit (GX `mostly`): check id -> share of rows that must pass, else the run "
        "stops, e.g. {image_decodes: 0.99}. Failing rows are quarantined either way.",
    )
    max_question_chars: int = Field(512, ge=1, description="Longer questions fail the check.")
    max_answer_chars: int = Field(256, ge=1, description="Longer answers (chosen / rejected) fail the check.")
    min_image_side: int = Field(8, ge=1, description="Images with a side shorter than this (pixels) fail.")
    max_image_side: int = Field(4096, ge=1, description="Images with a side longer than this (pixels) fail.")
    max_image_pixels: int = Field(
        16_777_216, ge=1, description="Width x height read from the header; larger images are refused undecoded."
    )
    min_split_rows: int = Field(1, ge=0, description="A split with fewer rows fails.")
    max_split_rows: int | None = Field(None, ge=1, description="A split with more rows fails; None for no limit.")


    @field_validator("mostly")
    @classmethod
    def _known_checks(cls, mostly: dict[str, float]) -> dict[str, float]:
        from tasks.validation import ROW_CHECK_IDS  # the check ids live with the checks

        unknown = sorted(set(mostly) - set(ROW_CHECK_IDS))
        if unknown:
            raise ValueError(f"unknown check id(s) {unknown}; valid: {sorted(ROW_CHECK_IDS)}")
        return mostly


class ModelConfig(_Section):
    """The base model. Hub id, local path or `builtin:tiny-smolvlm`."""

    name_or_path: str = Field("builtin:tiny-smolvlm", description="Hub id, local path or builtin:tiny-smolvlm.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the weights that are not quantized."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; None lets transformers choose (sdpa where supported)."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Off unless you trust it."
    )


class QuantizationConfig(_Section):
    """How the base weights are loaded; `bnb_*` fields are BitsAndBytesConfig's own."""

    mode: Literal["none", "8bit", "4bit"] = Field("none", description="none (dtype above), 8bit or 4bit (QLoRA).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: NF4 (QLoRA's) or FP4.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bit/param saved).")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Dtype 4-bit weights are dequantized to for each matmul."
    )
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8",
        description="Dtype the packed 4-bit weights are stored in; FSDP / DeepSpeed ZeRO-3 QLoRA need it equal to "
        "the model's dtype (e.g. bfloat16) so the shards flatten together.",
    )


class LoraConfig(_Section):
    """PEFT LoraConfig fields, passed through unchanged."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    lora_alpha: int = Field(16, ge=1, description="Scaling: the update is multiplied by lora_alpha / r.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field("all-linear", description="`all-linear` or a list of module names.")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (slower, often better at low rank).")
    init_lora_weights: bool | Literal["gaussian"] = Field(
        True, description="true: PEFT's default (Kaiming A, zero B); gaussian: Gaussian A."
    )
    # Ours, not PEFT's: turned into PEFT's `exclude_modules` for the loaded model (tasks/training.py).
    language_model_only: bool = Field(
        False,
        description="Adapters on the language model only: the vision tower and the connector get none and "
        "stay frozen as pretrained.",
    )


# transformers' optimizer names; the bitsandbytes ones (adamw_bnb_8bit, paged_adamw_8bit,
# paged_adamw_32bit) also run on CPU with bitsandbytes 0.50, where "paged" has no effect.
OPTIMIZERS = tuple(name.value for name in OptimizerNames)


class TrainerConfig(_Section):
    """transformers TrainingArguments fields shared by SFT and DPO, passed through unchanged.

    Exception: `early_stopping_patience` is ours (transformers' EarlyStoppingCallback takes it).
    """

    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    max_steps: int = Field(-1, description="Optimizer steps; -1 means use num_train_epochs.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the training data (when max_steps is -1).")
    # effective batch = per_device_train_batch_size x gradient_accumulation_steps x processes
    per_device_train_batch_size: int = Field(
        8, ge=1, description="Samples per forward pass on each device (lowered on out-of-memory)."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Forward passes per optimizer step: effective batch = per-device batch x this x processes."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a share of all steps.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field(
        "adamw_torch",
        description="A transformers optimizer name: adamw_torch, adamw_bnb_8bit (8-bit states), paged_adamw_8bit, ...",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    bf16: bool = Field(False, description="bf16 mixed precision (needs a GPU with bf16, or a recent CPU).")
    fp16: bool = Field(False, description="fp16 mixed precision (GPU only).")
    logging_steps: int = Field(10, ge=1, description="Log loss and learning rate every this many steps.")
    eval_strategy: Literal["no", "steps", "epoch"] = Field(
        "no", description="Evaluate on data.validation_split during training."
    )
    eval_steps: int | None = Field(None, ge=1, description="With eval_strategy steps: evaluate every this many steps.")
    save_strategy: Literal["no", "steps", "epoch"] = Field(
        "no", description="Checkpoints; a rerun of a killed run resumes from the last one."
    )
    save_steps: int = Field(500, ge=1, description="Checkpoint every this many optimizer steps.")
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints kept on disk.")
    ddp_find_unused_parameters: bool | None = Field(
        None, description="Under torchrun: false skips DDP's search for unused parameters (faster) when none are."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a lower validation loss."
    )
    seed: int = Field(42, description="Seed of the trainer (adapter init, data order, dropout).")

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, optim: str) -> str:
        if optim not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optim!r}; e.g. adamw_torch, adamw_bnb_8bit, paged_adamw_8bit")
        return optim

    @model_validator(mode="after")
    def _early_stopping_needs_evaluation(self) -> TrainerConfig:
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if self.bf16 and self.fp16:
            raise ValueError("set bf16 or fp16 mixed precision, not both")
        if self.early_stopping_patience is not None:
            if self.eval_strategy == "no":
                raise ValueError("early_stopping_patience needs eval_strategy 'steps' or 'epoch' (and a validation split)")
            if self.save_strategy != self.eval_strategy:
                raise ValueError(
                    "early stopping keeps the best checkpoint, so save_strategy must equal eval_strategy "
                    f"(got save_strategy={self.save_strategy!r}, eval_strategy={self.eval_strategy!r})"
                )
        return self


class SFTConfig(TrainerConfig):
    """TRL SFTConfig fields. The loss always falls on the answer only (completion_only_loss)."""

    max_length: int | None = Field(
        None, description="Token limit; None never truncates (truncation could cut image tokens)."
    )


class DPOConfig(TrainerConfig):
    """TRL DPOConfig fields. DPO starts from the SFT adapter, whose policy is the reference."""

    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (DPO wants it far below SFT's).")
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference (SFT) policy.")
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "apo_zero",
        "apo_down", "sigmoid_norm",
    ] = Field("sigmoid", description="TRL's DPO loss: sigmoid is the paper's; ipo, robust, apo_zero, ... are variants.")
    max_length: int | None = Field(
        None, description="Token limit per prompt + answer; None never truncates (validation checks the budget)."
    )


class ResourcesConfig(_Section):
    """Where training runs."""

    num_processes: int = Field(
        1, ge=1,
        description="Training processes on this machine; above 1 SFT and DPO run under torchrun (DDP), one per GPU.",
    )
    min_per_device_train_batch_size: int = Field(
        1, ge=1,
        description="On out-of-memory the per-device batch is halved (accumulation doubled) down to this size.",
    )
    sft_timeout_minutes: float | None = Field(None, gt=0, description="Fail the SFT task after this long; None: no limit.")
    dpo_timeout_minutes: float | None = Field(None, gt=0, description="Fail the DPO task after this long; None: no limit.")
    evaluation_timeout_minutes: float | None = Field(
        None, gt=0, description="Fail each model's evaluation after this long; None: no limit."
    )


class EvaluationConfig(_Section):
    """How base, SFT and DPO models are evaluated on the held-out split."""

    max_new_tokens: int = Field(8, ge=1, description="Greedy decoding, this many new tokens at most.")
    batch_size: int = Field(32, ge=1, description="Samples per `generate` call (left padding).")
    relaxed_tolerance: float = Field(0.05, ge=0, description="ChartQA relaxed accuracy: numeric answers within 5%.")


class RegistryConfig(_Section):
    """Where MLflow records the run and registers the adapter."""

    experiment_name: str = Field("vlmops", description="MLflow experiment of the runs.")
    registered_model_name: str = Field("vlmops-adapter", description="Registered model that receives the adapter.")
    candidate_alias: str = Field("candidate", description="Alias every new version gets.")


class PromotionConfig(_Section):
    """The gate a new adapter version must pass to become the registered model's champion."""

    enabled: bool = Field(True, description="Run the gate after registering; off leaves the version a candidate only.")
    primary_metric: str = Field("relaxed_accuracy", description="Evaluation metric that must improve.")
    min_improvement: float = Field(
        0.01, ge=0, description="The primary metric must beat the champion's by at least this much."
    )
    guard_metrics: dict[str, float] = Field(
        default_factory=lambda: {"preference_accuracy": 0.02},
        description="Metric -> largest drop allowed against the champion, e.g. {preference_accuracy: 0.02}.",
    )
    min_primary: float = Field(
        0.0, description="Absolute floor: the first version (no champion yet) is promoted only at or above it."
    )
    champion_alias: str = Field("champion", description="Alias of the version in production.")
    previous_alias: str = Field("previous", description="Alias the replaced champion gets (what rollback returns to).")


class Recipe(_Section):
    """A whole fine-tuning run: data, checks, model, quantization, LoRA, SFT, DPO, evaluation, registry."""

    name: str = Field("demo", description="Short name of the recipe, used in run names.")
    output_dir: str = Field("runs", description="Where run outputs (datasets, adapters, reports) are written.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training, validation and held-out data.")
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="Data checks run before any model loads."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig, description="How the base weights load: none, 8-bit or 4-bit."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The LoRA / DoRA adapter (PEFT).")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning (TRL SFTTrainer).")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Preference optimisation from the SFT adapter.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Processes, batch floor, timeouts.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Held-out evaluation.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow experiment and model.")
    promotion: PromotionConfig = Field(
        default_factory=PromotionConfig, description="The gate from candidate to champion."
    )

    @model_validator(mode="after")
    def _evaluation_during_training_needs_a_validation_split(self) -> Recipe:
        for stage, split_field in (("sft", "validation_split"), ("dpo", "preference_validation_split")):
            split = getattr(self.data, split_field)
            if getattr(self, stage).eval_strategy != "no" and split is None:
                raise ValueError(
                    f"{stage}.eval_strategy is {getattr(self, stage).eval_strategy!r} but data.{split_field} is not set: "
                    f"name the split to evaluate on during training (ChartQA: val), or set {stage}.eval_strategy: no"
                )
        held_out = {self.data.eval_split.strip(), (self.data.preference_eval_split or self.data.eval_split).strip()}
        for split_field in ("validation_split", "preference_validation_split"):
            split = getattr(self.data, split_field)
            if split is not None and split.strip() in held_out:
                raise ValueError(
                    f"data.{split_field} is the held-out eval split {split!r}: choosing checkpoints on it would "
                    "leak it into the final evaluation; use a separate split (ChartQA: val for validation, test for eval)"
                )
        return self


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `dotted.key=value` override applied.

    Raises ConfigError for an override without `=`. Unknown keys are caught later by
    validation, which names them.
    """
    merged = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} is not KEY=VALUE (e.g. --set sft.learning_rate=1e-4)")
        node = merged
        *parents, leaf = key.strip().split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
            node = child
        node[leaf] = yaml.safe_load(value)
    return merged


def _describe_errors(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}' (check its spelling; see tasks/config.py for the fields)")
        elif item["type"] == "value_error" and isinstance(item.get("input"), dict):
            # a check across fields: echoing the whole section back would bury the message
            lines.append(f"  {key}: {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    """Validate a recipe held in a dict. Raises ConfigError naming `source` and each bad key."""
    merged = apply_overrides(raw, overrides or [])
    try:
        return Recipe.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_describe_errors(error, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe and apply `--set` overrides.

    Raises ConfigError when the file is missing, is not a mapping, or holds an unknown or
    invalid key; the message names the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    return recipe_from_dict(raw, source=str(path), overrides=overrides)
