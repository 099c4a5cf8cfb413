"""The [inference] section: which backend serves, each backend's own settings (declared in its file), batching
and the decode workers. Read as part of the one config file (`appliance/config.py`)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, Field, SerializeAsAny, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from appliance.domain.settings import Section
from appliance.inference import registry


class InferenceConfig(Section):
    backend: str = Field(
        registry.AUTO,
        description="auto: a TensorRT plan built for this GPU, else the quantized CPU model, else the FP32 ONNX; "
        "onnxruntime: the best CPU artifact; tensorrt: a matching plan or refuse to start. Any name in "
        "appliance/inference/registry.py.",
    )
    backends: dict[str, SerializeAsAny[BaseModel]] = Field(
        default_factory=dict,
        description="Each backend's own settings, by its name, read from the flat keys its settings model declares "
        "(inference.threads, inference.device) or from an [inference.<name>] table; defaults for the rest.",
    )
    max_batch: int = Field(0, ge=0, description="Cap on the batch size; 0 uses the manifest's max_batch.")
    heatmaps: bool = Field(
        True,
        description="Compute where the model looked (the manifest's [heatmap]) in the same inference call, and "
        "send it with each result; false saves its cost on ONNX Runtime (`make bench` measures it). A TensorRT "
        "plan built with it computes it regardless.",
    )
    max_delay_ms: float = Field(
        5.0, ge=0, description="How long the batcher waits to fill a batch; a lone image never waits longer."
    )
    decode_workers: int = Field(
        0,
        ge=0,
        le=64,
        validate_default=True,  # 0 by default too becomes this host's count
        description="Workers that decode and preprocess inputs; 0: one per core this process may run on (its CPU "
        "affinity, systemd's CPUAffinity= or a container's cpuset), as many as can decode at once.",
    )
    build_on_start: bool = Field(
        False,
        description="Where no artifact is gated for this host (a new box, a new model, another ONNX Runtime), serve "
        "the FP32 model at once and run `make engine`'s build and gate in a background process at the lowest CPU "
        "priority, then swap the gated artifact in; a failed gate is not tried again until the model or host "
        "changes. true in an installed appliance's config.",
    )
    build_precision: Literal["auto", "int8", "fp16"] = Field(
        "auto",
        description="What the background build makes (make engine's PRECISION): auto serves INT8 only where it passes "
        "the gate and is faster than FP32; int8 or fp16 serves that precision wherever it passes the gate.",
    )
    build_threads: int = Field(
        1, ge=1, le=64, description="Cores the background build may use at most (its ONNX Runtime threads)."
    )
    decode_with: Literal["processes", "threads"] = Field(
        "processes",
        description="processes: faster (no GIL) and a decoder crash costs one worker, not the daemon; "
        "threads: less memory.",
    )

    def __init__(self, **data: Any) -> None:
        # Declared so that type checkers accept the flat backend keys (threads=, device=) that
        # _backend_settings hands to each backend's own settings model.
        super().__init__(**data)

    @field_validator("decode_workers")
    @classmethod
    def _workers_for_this_host(cls, workers: int) -> int:
        return workers or min(
            64, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        if name != registry.AUTO and name not in registry.names():
            raise PydanticCustomError("unknown_backend", registry.unknown(name))
        return name

    @model_validator(mode="before")
    @classmethod
    def _backend_settings(cls, data: Any) -> Any:
        """Hand each backend the keys its settings model declares: flat under [inference] as configs have
        always written them (threads, device), or in its own [inference.<name>] table, not both."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = data.pop("backends", None) or {}  # a validated config's own, passed back in
        routed: set[str] = set()
        settings: dict[str, BaseModel] = {}
        for kind in registry.kinds():
            flat = {key: data[key] for key in kind.settings.model_fields if key in data}
            routed.update(flat)
            table = data.pop(kind.name, None) or {}
            if not isinstance(table, dict):
                raise PydanticCustomError("not_a_table", "[inference.{name}] must be a table", {"name": kind.name})
            both = sorted(flat.keys() & table.keys())
            if both:
                raise PydanticCustomError(
                    "set_twice",
                    "{key} is set both as inference.{key} and in [inference.{name}]; keep one",
                    {"key": both[0], "name": kind.name},
                )
            earlier = given.get(kind.name) if isinstance(given, dict) else None
            if isinstance(earlier, BaseModel):
                earlier = earlier.model_dump()
            settings[kind.name] = _settings(kind.settings, {**(earlier or {}), **flat}, table, kind.name)
        for key in routed:
            data.pop(key)
        data["backends"] = settings
        return data

    def settings_of(self, name: str) -> BaseModel:
        """Backend `name`'s settings (its own pydantic model, declared in its file)."""
        found = self.backends.get(name)
        return found if found is not None else registry.get(name).settings()

    @property
    def device(self) -> int:
        """`inference.device`, the CUDA device, read where the GPU is probed before a backend is chosen."""
        return int(getattr(self.settings_of("tensorrt"), "device", 0))


def _settings(model: type[BaseModel], flat: dict[str, Any], table: dict[str, Any], name: str) -> BaseModel:
    """One backend's settings; a mistake is reported at the key as written (inference.device or
    inference.tensorrt.device)."""
    try:
        return model.model_validate({**flat, **table})
    except ValidationError as e:
        errors: list[InitErrorDetails] = []
        for error in e.errors():
            loc = error["loc"]
            where = (name, *loc) if loc and loc[0] in table else loc
            details: InitErrorDetails = {"type": error["type"], "loc": where, "input": error["input"]}
            if "ctx" in error:
                details["ctx"] = error["ctx"]
            errors.append(details)
        raise ValidationError.from_exception_data(e.title, errors) from None
