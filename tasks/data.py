"""Data sources: load a split and map its columns onto the pipeline's internal schema.

Internal schema, whatever the source:
- SFT rows: `row_id`, `image` (PIL), `question`, `answer`, `question_type` (optional in the
  source, None when it has none; builtin:chartqa-synth derives argmax / count / value);
- preference rows: `row_id`, `image` (PIL), `question`, `chosen`, `rejected`;
- and on every row: `source` (the source string), `image_path` (the image's path as the
  data names it, None for in-memory images), `image_error` (None, or why `image` is None)
  and `image_sha256` (digest of the image file's bytes, or of the pixels for in-memory
  images; None without an image).

`row_id` is `<split>-<index>`, the index counting rows of the split as loaded (after slicing).

Sources (`resolve_source`):
- `builtin:chartqa-synth` / `builtin:chart-prefs-synth`: offline synthetic charts in
  ChartQA's and RLAIF-V's columns (tasks/synthetic.py). They generate `limit` rows of a
  named split; slicing (`train[:10%]`) is refused, use the `max_*_samples` limits.
- a local `.jsonl` / `.json` / `.csv` / `.parquet` file. One file is one split, named
  `train`: slice it for a held-out part (`train_split: train[:80%]`,
  `eval_split: train[80%:]`). For one file per split, put `{split}` in the path:
  `data/{split}.jsonl` reads `data/train.jsonl` for `train[:10%]` (the placeholder takes the
  split's name without the slice). The image column holds paths relative to the file's
  folder; CSV cells are read as text (`007` stays `007`).
- a local folder: an image folder when it holds `metadata.jsonl|csv|parquet` (at the top or
  in its split subfolders), else a dataset in the hub's layout (`data/train-*.parquet`).
- anything else: a hub dataset id (`HuggingFaceM4/ChartQA`), read by `datasets.load_dataset`.

The split string goes to `datasets` as written, so its slice syntax works; `limit` then keeps
the first `limit` rows of what it returns.

Images are opened from their bytes with PIL reading only the header: pixels decode on first
use, so validation can refuse an oversized image by its header before decoding it. An image
that cannot be used leaves `image=None` and says why in `image_error`: a path that escapes
the dataset's folder (`../x.png`, an absolute path elsewhere, a symlink out) is never read,
a missing file, bytes PIL does not recognise, or PIL's own decompression-bomb guard.

Columns: each source column is mapped to an internal one by ChartQA's and RLAIF-V's names
(`SFT_COLUMNS`, `PREFERENCE_COLUMNS`); the recipe's `data.sft_columns` /
`data.preference_columns` (source column -> internal column) override them for the internal
columns they name. ChartQA's `label` is a list of accepted answers: the first one becomes
`answer`. Numbers in text columns become strings.

`fingerprint_rows` hashes loaded rows (text and image bytes, in order) for caching and lineage.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import ExifTags, Image, ImageOps

from tasks import synthetic
from tasks.config import DataConfig

logger = logging.getLogger(__name__)

CHARTQA_SYNTH = "builtin:chartqa-synth"
CHART_PREFS_SYNTH = "builtin:chart-prefs-synth"

# Source column -> internal column, by the names the reference datasets use.
SFT_COLUMNS = {
    "query": "question",
    "question": "question",
    "label": "answer",
    "answer": "answer",
    "image": "image",
    "question_type": "question_type",
}
# Internal columns a source may leave out: they read as None. `question_type` (value, count, ...)
# lets evaluation report accuracy per type; builtin:chartqa-synth derives it from its templates.
OPTIONAL_COLUMNS = {"sft": ("question_type",), "preference": ()}
PREFERENCE_COLUMNS = {"question": "question", "chosen": "chosen", "rejected": "rejected", "image": "image"}
RECIPE_KEYS = {"sft": "data.sft_columns", "preference": "data.preference_columns"}

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
SPLIT_PLACEHOLDER = "{split}"
# A split as `datasets` writes it: a name, optionally sliced (`train`, `train[:10%]`, `test[5:]`).
_ONE_SPLIT = re.compile(r"(?P<name>[\w.-]+)(?:\[[^\]]*\])?")


class DataSourceError(ValueError):
    """A source that cannot be read or lacks a column the pipeline needs."""


# --- which loader reads a source ---------------------------------------------------------


@dataclass(frozen=True)
class ResolvedSource:
    """How one split of a source is read."""

    kind: Literal["builtin", "file", "imagefolder", "folder", "hub"]
    location: str  # the builtin name, file, folder or hub id
    split: str  # the split string as the recipe writes it, slice included
    image_root: Path | None  # local sources: the folder image paths must stay inside


def split_name(split: str) -> str:
    """The split's name without its slice: `train[:10%]` -> `train`. Raises DataSourceError."""
    match = _ONE_SPLIT.fullmatch(split.strip())
    if not match:
        raise DataSourceError(
            f"split {split!r}: expected one split name, optionally sliced, such as 'train' or 'train[:10%]'"
        )
    return match["name"]


def resolve_source(source: str, split: str) -> ResolvedSource:
    """Decide how `source` is read for `split` (rules in the module docstring). Raises DataSourceError."""
    if source.startswith("builtin:"):
        return ResolvedSource("builtin", source, split, None)
    if SPLIT_PLACEHOLDER in source:
        path = Path(source.replace(SPLIT_PLACEHOLDER, split_name(split))).expanduser()
        if not path.is_file():
            raise DataSourceError(f"{source}: split {split!r} reads {path}, which is not a file")
        return _file_source(source, path, split)
    path = Path(source).expanduser()
    if path.is_file():
        if split_name(split) != "train":
            raise DataSourceError(
                f"{source} is one file, read as the split 'train', and the recipe asks for split {split!r}. "
                f"Either keep one file per split and write the source as a pattern "
                f"({path.with_name('{split}' + path.suffix)} reads {path.with_name('train' + path.suffix)}, "
                f"{path.with_name('test' + path.suffix)}), or slice this file: "
                "train_split: 'train[:80%]', eval_split: 'train[80%:]'."
            )
        return _file_source(source, path, split)
    if path.is_dir():
        root = path.resolve()
        has_metadata = any(
            (root / name).is_file() or any(root.glob(f"*/{name}")) for name in IMAGEFOLDER_METADATA
        )
        return ResolvedSource("imagefolder" if has_metadata else "folder", str(path), split, root)
    if path.suffix.lower() in FILE_BUILDERS or source.startswith(("/", "./", "../", "~")):
        raise DataSourceError(f"{source}: no such file or folder (relative paths start at {Path.cwd()})")
    return ResolvedSource("hub", source, split, None)


def _file_source(source: str, path: Path, split: str) -> ResolvedSource:
    if path.suffix.lower() not in FILE_BUILDERS:
        raise DataSourceError(f"{source}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_BUILDERS)}")
    split_name(split)  # a file split takes no `+` combinations
    return ResolvedSource("file", str(path), split, path.parent.resolve())


# --- reading raw rows --------------------------------------------------------------------


def _read_raw_rows(resolved: ResolvedSource, limit: int, seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The first `limit` rows of the split in the source's own columns, and those column names."""
    if resolved.kind == "builtin":
        rows = _builtin_rows(resolved, limit, seed)
        return rows, list(rows[0]) if rows else []
    import datasets  # imported here: only real sources need it

    loaded = _load_dataset(datasets, resolved)
    loaded = loaded.select(range(min(limit, len(loaded))))
    # Images are decoded here, not by datasets: one bad image must not stop the whole load,
    # and datasets decodes every pixel up front (validation wants to refuse by header first).
    for name, feature in loaded.features.items():
        if isinstance(feature, datasets.Image):
            loaded = loaded.cast_column(name, datasets.Image(decode=False))
    return list(loaded), list(loaded.column_names)


def _builtin_rows(resolved: ResolvedSource, limit: int, seed: int) -> list[dict[str, Any]]:
    makers = {CHARTQA_SYNTH: synthetic.make_chartqa_split, CHART_PREFS_SYNTH: synthetic.make_chart_prefs_split}
    if resolved.location not in makers:
        raise DataSourceError(
            f"unknown builtin data source {resolved.location!r}; choose {CHARTQA_SYNTH} or {CHART_PREFS_SYNTH}"
        )
    if split_name(resolved.split) != resolved.split:
        raise DataSourceError(
            f"{resolved.location} generates rows of a named split and cannot slice {resolved.split!r}; "
            "give the split's name and set data.max_train_samples / max_eval_samples instead"
        )
    try:
        return makers[resolved.location](resolved.split, limit, seed=seed)
    except ValueError as err:
        raise DataSourceError(f"{resolved.location}: {err}") from err


def _load_dataset(datasets: Any, resolved: ResolvedSource) -> Any:
    try:
        if resolved.kind == "file":
            path = Path(resolved.location)
            builder = FILE_BUILDERS[path.suffix.lower()]
            options = _csv_options(datasets, path) if builder == "csv" else {}
            data_files = {split_name(resolved.split): str(path)}
            return datasets.load_dataset(builder, data_files=data_files, split=resolved.split, **options)
        if resolved.kind == "imagefolder":
            return datasets.load_dataset("imagefolder", data_dir=resolved.location, split=resolved.split)
        return datasets.load_dataset(resolved.location, split=resolved.split)  # local hub layout or hub id
    except Exception as err:  # datasets raises ValueError, OSError, its own errors...: all mean "cannot read"
        raise DataSourceError(
            f"cannot load split {resolved.split!r} of {resolved.location}: {type(err).__name__}: {err}"
        ) from err


def _csv_options(datasets: Any, path: Path) -> dict[str, Any]:
    """Read every CSV column as text: pandas would turn an answer `007` into 7 and `3.50` into 3.5."""
    with path.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False}  # an empty cell stays "", not None


# --- images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LoadedImage:
    image: Image.Image | None
    path: str | None  # as the data names it
    error: str | None
    sha256: str | None


def _load_image(value: Any, root: Path | None) -> _LoadedImage:
    """Open one image cell: a PIL image, a path (str), or datasets' {"bytes", "path"} struct."""
    if isinstance(value, Image.Image):
        return _LoadedImage(value, None, None, _pixels_sha256(value))
    path = value.get("path") if isinstance(value, dict) else value
    if isinstance(value, dict) and value.get("bytes") is not None:
        return _open_bytes(value["bytes"], path)
    if isinstance(value, dict) and path and root is None:
        return _decode_hub_file(value)
    if path is None or path == "":
        return _LoadedImage(None, None, "no image: the image column is empty", None)
    if not isinstance(path, str):
        return _LoadedImage(None, None, f"unsupported image value of type {type(path).__name__}", None)
    if root is None:  # a hub dataset naming a path: nothing on this machine is its to read
        return _LoadedImage(None, path, f"image path in a hub dataset is not read: {path}", None)
    data, error = _read_image_file(path, root)
    if data is None:
        return _LoadedImage(None, path, error, None)
    return _open_bytes(data, path)


def _read_image_file(path_text: str, root: Path | None) -> tuple[bytes | None, str | None]:
    """The bytes of an image file named in the data, or (None, why not). Never reads outside `root`."""
    path = Path(path_text).expanduser()
    if root is not None:
        path = root / path  # an absolute path replaces root, and is then checked like any other
        if not path.resolve().is_relative_to(root):  # resolve() follows symlinks and `..`
            return None, f"image path escapes the dataset folder: {path_text}"
    if not path.is_file():
        return None, f"image file not found: {path_text}"
    try:
        return path.read_bytes(), None
    except OSError as err:
        return None, f"image file cannot be read: {path_text}: {err}"


def _open_bytes(data: bytes, path: str | None) -> _LoadedImage:
    # The bytes are read into memory rather than PIL keeping the file open: a lazily opened
    # file holds a descriptor until decoded, and a large split would run out of them.
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = Image.open(io.BytesIO(data))  # header only; pixels decode on first use
        image = _upright(image)
    except Image.DecompressionBombError as err:
        return _LoadedImage(None, path, f"image refused before decoding: {err}", digest)
    except (OSError, ValueError, SyntaxError) as err:  # UnidentifiedImageError is an OSError
        return _LoadedImage(None, path, f"image does not decode: {err}", digest)
    return _LoadedImage(image, path, None, digest)


def _upright(image: Image.Image) -> Image.Image:
    """Apply an EXIF orientation as datasets does (phone photos), only when the header carries one.

    Asking a PNG for its EXIF decodes it when the header has none, hence the `info` check; and
    an image past PIL's pixel guard stays undecoded for validation to refuse.
    """
    if "exif" not in image.info:
        return image
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation == 1 or image.width * image.height > (Image.MAX_IMAGE_PIXELS or math.inf):
        return image
    return ImageOps.exif_transpose(image)


def _decode_hub_file(value: dict[str, Any]) -> _LoadedImage:
    """A hub dataset's image stored as a path (cache file or hf:// URL): datasets reads it."""
    import datasets

    try:
        image = datasets.Image().decode_example(value)
    except Exception as err:  # any failure to fetch or decode one image is that row's problem
        return _LoadedImage(None, value["path"], f"image does not decode: {type(err).__name__}: {err}", None)
    return _LoadedImage(image, value["path"], None, _pixels_sha256(image))


def _pixels_sha256(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}|{image.width}x{image.height}|".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


# --- columns -------------------------------------------------------------------------------


def _column_mapping(kind: str, recipe_columns: dict[str, str] | None, source: str) -> dict[str, str]:
    """Source column -> internal column: the recipe's entries, then the defaults for internal columns it leaves out."""
    defaults = SFT_COLUMNS if kind == "sft" else PREFERENCE_COLUMNS
    if not recipe_columns:
        return dict(defaults)
    internal = set(defaults.values())
    unknown = {src: dst for src, dst in recipe_columns.items() if dst not in internal}
    if unknown:
        raise DataSourceError(
            f"{source}: {RECIPE_KEYS[kind]} maps {unknown} onto unknown internal column(s); "
            f"the internal columns are {sorted(internal)}"
        )
    overridden = set(recipe_columns.values())
    return dict(recipe_columns) | {src: dst for src, dst in defaults.items() if dst not in overridden}


def _check_recipe_columns(
    kind: str, recipe_columns: dict[str, str] | None, available: list[str], source: str, split: str
) -> None:
    missing = [column for column in recipe_columns or {} if column not in available]
    if missing and available:  # an empty split has no columns to check
        raise DataSourceError(
            f"{source} [{split}]: column(s) {missing} named in {RECIPE_KEYS[kind]} are not in the data; "
            f"its columns are {available}. Fix {RECIPE_KEYS[kind]} in the recipe "
            "(source column -> internal column)."
        )


def _as_text(value: Any) -> Any:
    # Numbers become strings ("42"); anything else stays as is for validation to judge.
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _optional_text(value: Any) -> str | None:
    """An optional text column's value: None for a missing or blank cell, else its text."""
    if value is None:
        return None
    text = str(_as_text(value)).strip()
    return text or None


def _map_rows(
    raw_rows: list[dict[str, Any]], mapping: dict[str, str], kind: str, resolved: ResolvedSource, source: str
) -> list[dict[str, Any]]:
    split = resolved.split
    optional = OPTIONAL_COLUMNS[kind]
    wanted = set(mapping.values()) - set(optional)
    mapped, list_labels, several_labels = [], 0, 0
    for index, row in enumerate(raw_rows):
        item: dict[str, Any] = {}
        for column, value in row.items():
            if column in mapping and mapping[column] not in item:
                item[mapping[column]] = value
        missing = wanted - item.keys()
        if missing:
            accepted = {dst: sorted(src for src, d in mapping.items() if d == dst) for dst in sorted(missing)}
            raise DataSourceError(
                f"{source} [{split}] row {index}: missing column(s) {sorted(missing)}; the row has {sorted(row)}. "
                f"Rename the columns to one of {accepted}, or map yours in the recipe: "
                f"{RECIPE_KEYS[kind]}: {{your_column: {sorted(missing)[0]}}}."
            )
        if isinstance(item.get("answer"), list):
            labels = item["answer"]
            list_labels += 1
            several_labels += len(labels) > 1
            item["answer"] = labels[0] if labels else ""
        loaded = _load_image(item.pop("image"), resolved.image_root)
        out = {"row_id": f"{split}-{index:06d}", "image": loaded.image}
        out |= {column: _as_text(value) for column, value in item.items()}
        for column in optional:
            out[column] = _optional_text(out.get(column))
        if kind == "sft" and out["question_type"] is None and resolved.location == CHARTQA_SYNTH:
            out["question_type"] = synthetic.question_kind(out["question"])
        out |= {
            "source": source,
            "image_path": loaded.path,
            "image_error": loaded.error,
            "image_sha256": loaded.sha256,
        }
        mapped.append(out)
    if list_labels:
        logger.info(
            "%s [%s]: ChartQA-style list labels: using the first label as the answer "
            "(%d of %d rows list more than one accepted answer)",
            source, split, several_labels, list_labels,
        )
    return mapped


# --- public API ----------------------------------------------------------------------------


def _load_rows(
    kind: str, source: str, split: str, limit: int, seed: int, columns: dict[str, str] | None
) -> list[dict[str, Any]]:
    mapping = _column_mapping(kind, columns, source)
    resolved = resolve_source(source, split)
    raw_rows, available = _read_raw_rows(resolved, limit, seed)
    _check_recipe_columns(kind, columns, available, source, split)
    return _map_rows(raw_rows, mapping, kind, resolved, source)


def load_sft_rows(
    source: str, split: str, limit: int, seed: int = 0, *, columns: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Load up to `limit` SFT rows of `split` in the internal schema.

    `columns` (source column -> internal column) overrides the default names. Raises
    DataSourceError for a source, split or column that cannot be read; a bad image does not
    raise: its row has `image=None` and `image_error`.
    """
    return _load_rows("sft", source, split, limit, seed, columns)


def load_preference_rows(
    source: str, split: str, limit: int, seed: int = 0, *, columns: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Load up to `limit` preference pairs of `split` in the internal schema; as `load_sft_rows`."""
    return _load_rows("preference", source, split, limit, seed, columns)


ROLES = ("sft/train", "sft/eval", "preference/train", "preference/eval")


def recipe_roles(data: DataConfig) -> tuple[str, ...]:
    """The roles a recipe uses: always ROLES, plus `*/validation` where a validation split is named."""
    optional = (("sft/validation", data.validation_split), ("preference/validation", data.preference_validation_split))
    return ROLES + tuple(role for role, split in optional if split is not None)


def load_recipe_datasets(
    data: DataConfig, roles: tuple[str, ...] | None = None
) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """The datasets a run uses, named by role (`sft/train`, `sft/eval`, `preference/train`, `preference/eval`,
    and `sft/validation` / `preference/validation` when the recipe names those splits).

    Values are (kind, rows); `roles` picks a subset (evaluation needs only the held-out ones),
    None takes every role of the recipe.
    Raises DataSourceError when a source's train and eval splits are the same (evaluation
    would run on training rows) or a source cannot be read.
    """
    preference_train = data.preference_train_split or data.train_split
    preference_eval = data.preference_eval_split or data.eval_split
    for train, held_out in ((data.train_split, data.eval_split), (preference_train, preference_eval)):
        if train.strip() == held_out.strip():
            raise DataSourceError(
                f"train and eval splits are both {train!r}: evaluation would run on training rows. "
                "Slice one split into two, e.g. train_split: 'train[:80%]', eval_split: 'train[80%:]'."
            )
    sft, prefs = data.sft_columns, data.preference_columns
    loaders = {
        "sft/train": lambda: load_sft_rows(
            data.sft_source, data.train_split, data.max_train_samples, data.seed, columns=sft),
        "sft/eval": lambda: load_sft_rows(
            data.sft_source, data.eval_split, data.max_eval_samples, data.seed, columns=sft),
        "preference/train": lambda: load_preference_rows(
            data.preference_source, preference_train, data.max_preference_samples, data.seed, columns=prefs),
        "preference/eval": lambda: load_preference_rows(
            data.preference_source, preference_eval, data.max_eval_samples, data.seed, columns=prefs),
        "sft/validation": lambda: load_sft_rows(
            data.sft_source, data.validation_split, data.max_eval_samples, data.seed, columns=sft),
        "preference/validation": lambda: load_preference_rows(
            data.preference_source, data.preference_validation_split, data.max_eval_samples, data.seed, columns=prefs),
    }
    return {role: (role.split("/")[0], loaders[role]()) for role in (roles or recipe_roles(data))}


def fingerprint_rows(rows: list[dict[str, Any]]) -> str:
    """A content hash of loaded rows, stable across runs and processes: 16 hex characters.

    Covers, in row order, each row's text columns (everything but the bookkeeping keys
    `row_id`, `source`, `image_path`, `image_error`, `image_sha256` and the image itself) and
    its image: the digest of the bytes it was read from (`image_sha256`, no re-encoding), else
    of its mode, size and pixels. Order matters; where the rows came from does not.
    """
    bookkeeping = {"row_id", "image", "source", "image_path", "image_error", "image_sha256"}
    digest = hashlib.sha256(b"vlmops-rows-v1\n")
    for row in rows:
        text = {key: value for key, value in row.items() if key not in bookkeeping}
        if text.get("question_type", "") is None:  # an unknown type leaves the hash as it was before types
            del text["question_type"]
        image_part = row.get("image_sha256")
        if image_part is None:
            image = row.get("image")
            image_part = _pixels_sha256(image) if isinstance(image, Image.Image) else "none"
        line = json.dumps([text, image_part], sort_keys=True, ensure_ascii=False, default=str)
        digest.update(line.encode() + b"\n")  # one JSON line a row: no two rows' parts can run together
    return digest.hexdigest()[:16]
