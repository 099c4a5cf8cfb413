"""The model manifest (`models/<name>/model.toml`): what the model expects and how to read its output."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.domain.errors import ManifestError, ModelMissingError

MANIFEST_NAME = "model.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Strict):
    name: str = Field(description="Short stable name; results carry it.")
    version: str = Field(description="The model's version; results carry it.")
    onnx: str = Field("model.onnx", description="ONNX file, relative to the model folder.")
    description: str = Field("", description="One line for `ListModels`.")


class InputSpec(_Strict):
    name: str = Field(description="Name of the ONNX input tensor.")
    layout: Literal["NCHW", "NHWC"] = Field("NCHW", description="Axis order of the input tensor.")
    height: int = Field(gt=0, le=8192, description="Input height in pixels.")
    width: int = Field(gt=0, le=8192, description="Input width in pixels.")
    channels: Literal[1, 3] = Field(1, description="1 (grayscale) or 3 (colour; grayscale images are replicated).")
    color_order: Literal["rgb", "bgr"] = Field("rgb", description="Channel order when channels is 3.")
    dtype: Literal["float32", "float16"] = Field("float32", description="Element type of the input tensor.")


class Preprocess(_Strict):
    resize: Literal["stretch", "letterbox"] = Field(
        "stretch", description="stretch: scale each axis to fit; letterbox: keep aspect ratio and pad."
    )
    interpolation: Literal["nearest", "linear", "cubic", "area", "lanczos"] = Field(
        "area", description="OpenCV interpolation used when resizing."
    )
    pad_value: float = Field(0.0, ge=0.0, le=1.0, description="Letterbox padding, in display units 0..1.")
    dicom_window: Literal["voi", "min_max"] = Field(
        "voi",
        description="DICOM intensities: voi = the file's VOI LUT or first window (min/max if it has none); "
        "min_max = stretch each image's own range.",
    )
    raster_window: Literal["dtype_range", "min_max"] = Field(
        "dtype_range",
        description="PNG/JPEG/TIFF intensities: dtype_range maps 0..255 (or 0..65535) to 0..1; "
        "min_max stretches each image's own range.",
    )
    scale: tuple[float, float] = Field(
        (0.0, 1.0), description="Value range the display range 0..1 is mapped to, e.g. [0, 255]."
    )
    mean: list[float] = Field(default_factory=lambda: [0.0], description="Subtracted after scaling.")
    std: list[float] = Field(default_factory=lambda: [1.0], description="Divided by after the mean.")

    @model_validator(mode="after")
    def _check(self) -> Preprocess:
        if any(s == 0 for s in self.std):
            raise ValueError("preprocess.std must not contain 0")
        return self


class Output(_Strict):
    name: str = Field(description="Name of the ONNX output tensor (N x labels).")
    activation: Literal["none", "softmax", "sigmoid"] = Field(
        "none", description="Applied to the raw output; 'none' when the model already outputs probabilities."
    )
    labels: list[str] = Field(min_length=1, description="One name per output column, in order.")


class Decision(_Strict):
    rule: Literal["argmax", "threshold"] = Field(
        "argmax",
        description="argmax: the top label is the finding; threshold: every label at or above the threshold is.",
    )
    threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="argmax: the top score must reach it, else the result is indeterminate; "
        "threshold: the per-label cut-off.",
    )
    negative_labels: list[str] = Field(
        default_factory=list, description="Labels that mean 'nothing found' (e.g. 'notumor')."
    )


class Batching(_Strict):
    max_batch: int = Field(8, ge=1, le=1024, description="Largest batch the daemon sends to the backend.")


class Accuracy(_Strict):
    """How far a quantized or reduced-precision artifact may drift from the FP32 model (`make engine`'s gate)."""

    min_agreement: float = Field(
        0.99, ge=0.0, le=1.0, description="Share of validation images whose decision must equal FP32's."
    )
    max_abs_diff: float = Field(0.05, ge=0.0, le=1.0, description="Largest allowed |score - FP32 score|.")
    mean_abs_diff: float = Field(0.01, ge=0.0, le=1.0, description="Largest allowed mean |score - FP32 score|.")
    max_auc_drop: float = Field(0.01, ge=0.0, le=1.0, description="Largest allowed AUC loss per label (with labels).")
    require_labels: bool = Field(False, description="Refuse to gate without labelled validation images.")


class Calibration(_Strict):
    """Where `make engine` finds its images by default, relative to the model folder."""

    images: str = Field("calibration", description="Folder of calibration images (DICOM/PNG/JPEG).")
    validation: str = Field("validation", description="Folder of validation images, labelled or not.")
    count: int = Field(64, ge=1, le=100_000, description="Calibration images used, in sorted order.")
    min_count: int = Field(16, ge=1, description="Fewer usable calibration images than this stop the build.")


class Manifest(_Strict):
    model: ModelInfo
    input: InputSpec
    preprocess: Preprocess = Field(default_factory=Preprocess)
    output: Output
    decision: Decision = Field(default_factory=Decision)
    batching: Batching = Field(default_factory=Batching)
    accuracy: Accuracy = Field(default_factory=Accuracy)
    calibration: Calibration = Field(default_factory=Calibration)

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        for field in ("mean", "std"):
            values = getattr(self.preprocess, field)
            if len(values) not in (1, self.input.channels):
                raise ValueError(f"preprocess.{field} needs 1 or {self.input.channels} values")
        unknown = set(self.decision.negative_labels) - set(self.output.labels)
        if unknown:
            raise ValueError(f"decision.negative_labels names unknown labels: {sorted(unknown)}")
        return self


class LoadedManifest(BaseModel):
    """A manifest together with the folder it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    manifest: Manifest
    folder: Path

    @property
    def onnx_path(self) -> Path:
        return self.folder / self.manifest.model.onnx


def load_manifest(model_dir: Path, *, require_onnx: bool = True) -> LoadedManifest:
    """Read and validate ``model_dir/model.toml``; raise ManifestError with one clear sentence."""
    path = model_dir / MANIFEST_NAME
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ManifestError(f"No manifest at {path}.") from e
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{path} is not valid TOML: {e}.") from e
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ManifestError(f"{path}: {where}: {first['msg']}.") from e
    loaded = LoadedManifest(manifest=manifest, folder=model_dir)
    if require_onnx and not loaded.onnx_path.is_file():
        raise ModelMissingError(f"The model file {loaded.onnx_path} is missing; run `make model` to fetch it.")
    return loaded
