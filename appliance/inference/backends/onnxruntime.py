"""ONNX Runtime backend: the CPU default and the numerical reference every other engine is checked against.

Its artifacts are quantized ONNX models gated on one CPU class and ONNX Runtime version
(`engines/<model>/onnxruntime-<class>.json` beside them); it also serves the FP32 ONNX itself, the last
artifact in every chain.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from appliance.domain.errors import BackendError, ModelMismatchError
from appliance.domain.manifest import Heatmap as HeatmapSpec
from appliance.inference.artifacts import ArtifactKey, SidecarError, artifact_problem, read_sidecar, slug
from appliance.inference.backend import Backend, BackendKind, Choice, Outputs, PassedOver, TensorSpec, Why
from appliance.inference.cpu_class import detect as detect_cpu_class

log = logging.getLogger(__name__)

NAME = "onnxruntime"
TIER = 1
LEGACY_RECORD = "onnxruntime.json"  # sidecar format 1: no CPU class or runtime in its key

_ORT_DTYPES: dict[str, np.dtype] = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}


class OnnxRuntimeSettings(BaseModel):
    """`inference.threads` (as before), or `[inference.onnxruntime] threads`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threads: int = Field(0, ge=0, description="Backend intra-op threads; 0 lets the runtime choose (all cores).")


def is_available() -> str | None:
    """Always None: onnxruntime is a pinned dependency of the appliance."""
    return None


def runtime_version() -> str:
    """The installed ONNX Runtime version: part of a CPU artifact's key, as its kernels change with it."""
    return str(ort.__version__)


@dataclass(frozen=True)
class OnnxRuntimeHost:
    """This host as a CPU artifact is keyed to it: int8 kernels differ by CPU class and runtime version."""

    cpu_class: str
    onnxruntime_version: str


def probe(settings: OnnxRuntimeSettings) -> OnnxRuntimeHost:
    return OnnxRuntimeHost(detect_cpu_class(), runtime_version())


def onnxruntime_stem(cpu_class: str) -> str:
    """One CPU artifact per CPU class in a folder, so boxes with different CPUs can share one: 'onnxruntime-avx2'."""
    return f"{NAME}-{slug(cpu_class)}"


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        *,
        output_name: str,
        max_batch: int,
        threads: int = 0,
        heatmap: HeatmapSpec | None = None,
    ) -> None:
        super().__init__()
        self._path = model_path
        self._output_name = output_name
        self._heatmap = heatmap
        self._outputs = [output_name]
        self._wanted_max_batch = max_batch
        self._threads = threads
        self._session: Any = None
        self._spec: TensorSpec | None = None
        self._max_batch = 1

    def _load_impl(self) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._threads:
            options.intra_op_num_threads = self._threads
        # ONNX Runtime's pool threads spin after each run by default, waiting for the next; in the daemon
        # the decode workers need those cycles (measured: 14 ms of CPU per radiograph, a third of it all).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                self._model_bytes(), sess_options=options, providers=["CPUExecutionProvider"]
            )
            extra = {o.name for o in self._session.get_outputs()} - {self._output_name}
            if self._heatmap is None and extra:
                # Built with a heatmap that is turned off: ONNX Runtime runs every node whatever a call asks
                # for, so the branch goes (read again only here: the common loads read the file once).
                self._session = None
                self._session = ort.InferenceSession(
                    self._pruned(), sess_options=options, providers=["CPUExecutionProvider"]
                )
        except ModelMismatchError:
            raise
        except Exception as e:
            raise BackendError(f"ONNX Runtime could not load {self._path}: {e}") from e
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelMismatchError(f"{self._path} has {len(inputs)} inputs; the appliance needs exactly one.")
        inp = inputs[0]
        if inp.type not in _ORT_DTYPES:
            raise ModelMismatchError(f"{self._path}: input {inp.name!r} is {inp.type}; float or float16 needed.")
        shape = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self._spec = TensorSpec(name=inp.name, shape=shape, dtype=_ORT_DTYPES[inp.type])
        outputs = [o.name for o in self._session.get_outputs()]
        if self._output_name not in outputs:
            raise ModelMismatchError(
                f"{self._path} has no output named {self._output_name!r} (it has {', '.join(outputs)})."
            )
        if self._heatmap is not None and self._heatmap.output in outputs:
            self._outputs = [self._output_name, self._heatmap.output]
        # A fixed batch axis of 1 means the model cannot batch, whatever the manifest says.
        self._max_batch = self._wanted_max_batch if shape and shape[0] is None else max(1, shape[0] or 1)

    def _model_bytes(self) -> bytes | str:
        """The artifact as ONNX Runtime loads it: with the manifest's heatmap added when it is the float model
        and lacks it. `make engine` builds the heatmap into quantized artifacts, keeping its branch in float;
        one built before the manifest declared a heatmap is served without it."""
        if self._heatmap is None:
            return str(self._path)
        model = self._onnx()
        if any(o.name == self._heatmap.output for o in model.graph.output):
            return str(self._path)
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv") for n in model.graph.node):
            log.warning(
                "%s was built without the manifest's heatmap; results carry none until `make engine` rebuilds it",
                self._path.name,
            )
            return str(self._path)
        from appliance.inference.heatmap_graph import add_heatmap

        spec = self._heatmap
        with_map = add_heatmap(model, method=spec.method, feature=spec.feature, output_name=spec.output, copy=False)
        del model
        return with_map.SerializeToString()

    def _pruned(self) -> bytes:
        return _only_output(self._onnx(), self._output_name).SerializeToString()

    def _onnx(self) -> Any:
        import onnx

        try:
            return onnx.load(str(self._path))
        except Exception as e:
            raise BackendError(f"ONNX Runtime could not load {self._path}: {e}") from e

    def _has_heatmap_impl(self) -> bool:
        return len(self._outputs) == 2

    def _input_spec_impl(self) -> TensorSpec:
        assert self._spec is not None  # set by _load_impl; the base class checks loaded state
        return self._spec

    def _max_batch_impl(self) -> int:
        return self._max_batch

    def _artifact_impl(self) -> str:
        return str(self._path)

    def _infer_impl(self, batch: np.ndarray) -> Outputs:
        assert self._spec is not None
        try:
            out = self._session.run(self._outputs, {self._spec.name: batch})
        except Exception as e:
            raise BackendError(f"ONNX Runtime failed on a batch of {batch.shape[0]}: {e}") from e
        scores = np.asarray(out[0], dtype=np.float32).reshape(batch.shape[0], -1)
        return Outputs(scores, np.asarray(out[1], dtype=np.float32) if len(out) == 2 else None)

    def _close_impl(self) -> None:
        self._session = None


def _only_output(model: Any, keep: str) -> Any:
    """The model with one output, and only the nodes and initializers that output needs."""
    graph = model.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
        return model  # a subgraph reads outer tensors unseen here: left whole
    needed = {keep}
    nodes = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            nodes.append(node)
            needed.update(node.input)
    kept_outputs = [o for o in graph.output if o.name == keep]
    kept_inits = [i for i in graph.initializer if i.name in needed]
    del graph.output[:], graph.node[:], graph.initializer[:]
    graph.output.extend(kept_outputs)
    graph.node.extend(reversed(nodes))
    graph.initializer.extend(kept_inits)
    return model


def open_artifact(
    path: Path,
    *,
    output_name: str,
    max_batch: int,
    settings: OnnxRuntimeSettings,
    heatmap: HeatmapSpec | None = None,
) -> Backend:
    return OnnxRuntimeBackend(
        path, output_name=output_name, max_batch=max_batch, threads=settings.threads, heatmap=heatmap
    )


# --- which CPU artifact this host may serve ---------------------------------------------------------


def onnxruntime_choice(
    folder: Path, onnx_sha: str, host: OnnxRuntimeHost, onnx_path: Path
) -> tuple[Choice | None, PassedOver]:
    record = folder / f"{onnxruntime_stem(host.cpu_class)}.json"
    here = f"this {host.cpu_class} CPU with ONNX Runtime {host.onnxruntime_version}"
    if not record.exists():
        others = sorted(folder.glob(f"{NAME}-*.json"))
        gated_on = [_gated_on(path) for path in others]
        legacy = folder / LEGACY_RECORD
        if legacy.exists():
            others.append(legacy)
            gated_on.append("an unrecorded CPU class (built before CPU models were keyed to it)")
        if others:
            return None, PassedOver(
                Why.OTHER_HOST,
                f"the CPU models in {folder} were gated on {', '.join(gated_on)}, not {here} (int8 kernels differ "
                "between CPU classes); run `make engine` to build one for this CPU",
                tier=TIER,
                refuses_start=any(_names_artifact(path) for path in others),
            )
        return None, PassedOver(
            Why.NONE_BUILT, f"no quantized CPU model in {folder}; `make engine` builds one", tier=TIER
        )
    try:
        sidecar = read_sidecar(record)
    except SidecarError as e:
        return None, PassedOver(Why.DAMAGED, f"{e}; run `make engine` to rebuild it", tier=TIER)
    key = sidecar.key
    if key.cpu_class != host.cpu_class or key.onnxruntime_version != host.onnxruntime_version:
        return None, PassedOver(
            Why.OTHER_HOST,
            f"the CPU model in {folder} was gated on {_cpu_of(key)}, not {here}; run `make engine` to rebuild it",
            tier=TIER,
            refuses_start=bool(sidecar.artifact),  # a record that only says FP32 is served needs no gating
        )
    if key.onnx_sha256 != onnx_sha:
        return None, PassedOver(
            Why.STALE,
            f"the CPU model in {folder} was built from another version of {onnx_path.name}; run `make engine`",
            tier=TIER,
        )
    if not sidecar.artifact:
        reason = "`make engine` found no quantized model within the manifest's tolerance, so FP32 is served"
        return Choice(NAME, onnx_path, "fp32", reason, sidecar), PassedOver(Why.NONE_BUILT, "")
    path = folder / sidecar.artifact
    problem = artifact_problem(path, sidecar)
    if problem:
        return None, PassedOver(Why.DAMAGED, problem, tier=TIER)
    reason = f"{key.precision} CPU model that passed the accuracy gate on {here}"
    return Choice(NAME, path, key.precision, reason, sidecar, tier=TIER), PassedOver(Why.NONE_BUILT, "")


def _names_artifact(record: Path) -> bool:
    """Whether a CPU record, of any format, names a quantized artifact (unreadable: assume it does)."""
    try:
        return bool(json.loads(record.read_text(encoding="utf-8")).get("artifact", True))
    except (OSError, ValueError, AttributeError):
        return True


def _gated_on(record: Path) -> str:
    try:
        return _cpu_of(read_sidecar(record).key)
    except SidecarError:
        return f"{record.name} (unreadable)"


def _cpu_of(key: ArtifactKey) -> str:
    return f"{key.cpu_class or 'an unknown'} CPU with ONNX Runtime {key.onnxruntime_version or 'unknown'}"


KIND = BackendKind(
    name=NAME,
    is_available=is_available,
    settings=OnnxRuntimeSettings,
    open=open_artifact,
    tier=TIER,
    probe=probe,
    choose=onnxruntime_choice,
    unavailable_on=lambda host: "",
    stem=lambda host: onnxruntime_stem(host.cpu_class),
    host_key=lambda host: {"cpu_class": host.cpu_class, "onnxruntime_version": host.onnxruntime_version},
    precisions=("int8", "fp32"),  # FP16 is slower than FP32 on x86 CPUs; fp32 is the FP32 ONNX served as is
    hardware="CPU",
    serves_reference=True,
)
