"""The model manifest (`models/<name>/model.toml`): what the model expects and how to read its output."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


def _code_text(what: str, text: str, longest: int) -> str:
    # A DICOM code value is SH (16 characters) and its meaning LO (64): a longer value is written as Long Code
    # Value, which many PACS do not read. Neither may hold a backslash (the value separator) or a control code.
    if not 1 <= len(text) <= longest or any(c == "\\" or ord(c) < 32 for c in text):
        raise ValueError(
            f"a code {what} must be 1 to {longest} characters, without backslashes or control codes: {text!r} is not"
        )
    return text


class LabelCode(_Strict):
    """A label's concept in a standard coding scheme, given in full (scheme, value and meaning)."""

    scheme: str = Field(description="Coding Scheme Designator, one in pydicom's code dictionary (e.g. SCT, DCM).")
    value: str = Field(description="Code Value, at most 16 characters.")
    meaning: str = Field(description="Code Meaning, at most 64 characters.")

    @field_validator("scheme")
    @classmethod
    def _standard_scheme(cls, scheme: str) -> str:
        # Only schemes the standard defines: a DICOM object must declare any other one, and the reports
        # declare only the appliance's own.
        known = _code_schemes()
        if scheme not in known:
            raise ValueError(f"the coding scheme {scheme!r} is not one pydicom knows ({', '.join(sorted(known))})")
        return scheme

    @field_validator("value")
    @classmethod
    def _value(cls, value: str) -> str:
        return _code_text("value", value, 16)

    @field_validator("meaning")
    @classmethod
    def _meaning(cls, meaning: str) -> str:
        return _code_text("meaning", meaning, 64)


def _code_schemes() -> list[str]:
    from pydicom.sr.codedict import codes  # imported on use: it takes a quarter of a second

    return list(codes.schemes())


def _look_up_code(label: str, given: str) -> dict[str, str]:
    """'SCT:52988006' or 'SCT:Lesion' (pydicom's keyword) as the code pydicom's code dictionary holds."""
    from pydicom.sr.codedict import codes

    scheme, _, key = given.partition(":")
    found = None
    if scheme in codes.schemes() and key:
        collection = getattr(codes, scheme)
        found = collection.concepts.get(key) or next(
            (code for code in collection.concepts.values() if code.value == key), None
        )
    if found is None:
        raise ValueError(
            f"label {label!r}: {given!r} is not in pydicom's code dictionary; name one it holds as "
            "'SCHEME:value' or 'SCHEME:keyword' (e.g. 'SCT:52988006' or 'SCT:Lesion'), or give the code in full "
            "as { scheme = ..., value = ..., meaning = ... }"
        )
    if len(found.value) > 16 or len(found.meaning) > 64:
        raise ValueError(
            f"label {label!r}: {given!r} has a value over 16 or a meaning over 64 characters, which a report "
            "cannot carry plainly; give the code in full with a shorter meaning"
        )
    return {"scheme": found.scheme_designator, "value": found.value, "meaning": found.meaning}


class Output(_Strict):
    name: str = Field(description="Name of the ONNX output tensor (N x labels).")
    activation: Literal["none", "softmax", "sigmoid"] = Field(
        "none", description="Applied to the raw output; 'none' when the model already outputs probabilities."
    )
    labels: list[str] = Field(min_length=1, description="One name per output column, in order.")
    # Left out of the manifest's dump: `make engine` hashes that dump to decide whether a built artifact can
    # be reused, and what a report calls a label does not change an engine.
    codes: dict[str, LabelCode] = Field(
        default_factory=dict,
        exclude=True,
        description="A label's concept in the DICOM reports, e.g. { lesion = 'SCT:52988006' } (checked against "
        "pydicom's code dictionary) or { lesion = { scheme = 'SCT', value = '...', meaning = '...' } }; labels "
        "without one get the appliance's private code.",
    )

    @field_validator("codes", mode="before")
    @classmethod
    def _look_up_codes(cls, raw: object) -> object:
        if not isinstance(raw, dict):
            return raw
        return {label: _look_up_code(label, c) if isinstance(c, str) else c for label, c in raw.items()}

    @model_validator(mode="after")
    def _codes_name_labels(self) -> Output:
        unknown = sorted(set(self.codes) - set(self.labels))
        if unknown:
            raise ValueError(f"output.codes names labels the model does not have: {unknown}")
        return self


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


class Heatmap(_Strict):
    """Where the model looked: an output `make engine` and the loader add to the graph (inference/heatmap_graph.py)."""

    method: Literal["gradcam", "cam"] = Field(
        description="gradcam: the decided class's logit's gradient, taken back through the head to the feature "
        "maps; cam: class activation maps, for a global-average-pooling head with one linear layer."
    )
    feature: str = Field(description="The ONNX tensor holding the last feature maps, N x C x H x W.")
    output: str = Field("heatmap", description="Name of the heatmap output added to the graph.")
    stride: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="The input's pixels from one cell of the feature maps to the next (the product of the strides "
        "before them: VGG16's five pools make 32). Needed where the input is not a whole number of cells (VGG16: "
        "240 px, 7 cells of 32 and 16 px the last pool drops); `make engine` checks it against the graph.",
    )

    def cell(self, input_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int]:
        """The input pixels a cell spans (rows, columns); ValueError, one sentence, where the grid cannot be
        placed on the input: no stride is declared and the input is not a whole number of cells, or the grid at
        that stride overruns the input or leaves a whole cell of it uncovered."""
        out = []
        for axis, size, cells in (("rows", input_hw[0], grid_hw[0]), ("columns", input_hw[1], grid_hw[1])):
            stride = self.stride or (size // cells if cells and size % cells == 0 else 0)
            if not stride:
                raise ValueError(
                    f"the input's {size} {axis} are not a whole number of the heatmap's {cells} cells: declare "
                    "heatmap.stride, the input pixels from one cell to the next"
                )
            if not size - stride < cells * stride <= size:
                raise ValueError(
                    f"heatmap.stride {stride} puts the heatmap's {cells} cells over {cells * stride} of the input's "
                    f"{size} {axis}: only {size // (cells + 1) + 1} to {size // cells} fit (`make engine` reads the "
                    "graph's own)"
                )
            out.append(stride)
        return out[0], out[1]


class Series(_Strict):
    """How a DICOM series' image scores combine into its series result, and which images it shows."""

    combine: Literal["max", "top_k_mean", "at_least"] = Field(
        "max",
        description="Each label's series score: max: its best image's score; top_k_mean: the mean of its top_k best; "
        "at_least: its at_least-th best score, so a threshold decides 'at least n images positive'.",
    )
    top_k: int = Field(3, ge=1, le=64, description="top_k_mean: how many of the best images are averaged.")
    at_least: int = Field(2, ge=1, le=64, description="at_least: how many images must reach the threshold.")
    key_images: int = Field(
        3,
        ge=0,
        le=16,
        description="The top-scoring images for the decided label kept as the series' key images (referenced by its "
        "Key Object Selection, each with its heatmap as a Secondary Capture).",
    )

    @property
    def k(self) -> int:
        """The rank the combination reads per label."""
        return {"max": 1, "top_k_mean": self.top_k, "at_least": self.at_least}[self.combine]

    @property
    def kept(self) -> int:
        """How many best images per label the series must keep to combine and choose its key images."""
        return max(self.k, self.key_images, 1)

    def describe(self) -> str:
        if self.combine == "max":
            return "max"
        if self.combine == "top_k_mean":
            return f"mean of top {self.top_k}"
        return f"at least {self.at_least} images"


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
    min_heatmap_agreement: float = Field(
        0.95,
        ge=0.0,
        le=1.0,
        description="Share of validation images whose heatmap peak cell must lie within one cell (in any "
        "direction, diagonals included) of FP32's; checked where the manifest declares a [heatmap].",
    )
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
    heatmap: Heatmap | None = Field(None, description="Where the model looked; a model that declares none has none.")
    batching: Batching = Field(default_factory=Batching)
    series: Series = Field(default_factory=Series)
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
        if self.heatmap is not None and self.heatmap.output == self.output.name:
            raise ValueError(f"heatmap.output {self.heatmap.output!r} is the scores' output name; choose another")
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
