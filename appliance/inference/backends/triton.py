"""A remote backend: the model served by Triton Inference Server (or any server of the KServe v2 / Open Inference
Protocol over gRPC: KServe, Seldon MLServer), on one or several servers past this box.

What it serves is what `make engine TARGET=triton REPO=dir` exported: the repository goes to the servers, and its
sidecar and self-check stay here (engines/<model>/triton-<name>.json), since a server cannot hand files back. Each
server is checked before it is used, at load and whenever it comes back or its model's version changes: ready,
its model's metadata against the manifest, and the self-check's recorded scores reproduced. A server that fails a
call leaves the rotation and is checked again later (with back-off); the batch goes to the next one. The
appliance's failover (appliance/inference/failover.py) serves the local artifact while none answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from appliance.domain.errors import (
    ArtifactRefused,
    BackendError,
    ModelMismatchError,
    ServerModelMissing,
    ServerRefusedRequest,
    ServerTimeout,
    ServerUnavailable,
)
from appliance.domain.manifest import Heatmap as HeatmapSpec
from appliance.inference.artifacts import Sidecar, SidecarError, read_sidecar
from appliance.inference.backend import Backend, BackendKind, Check, Choice, Outputs, PassedOver, TensorSpec, Why
from appliance.kserve import predict_v2_pb2 as v2
from appliance.kserve import predict_v2_pb2_grpc as v2_grpc
from appliance.kserve import triton_config_pb2 as triton_config

log = logging.getLogger(__name__)

NAME = "triton"
TIER = 9  # never tried by `auto`: a remote backend is served only where `inference.backend` names it
RECORD_PREFIX = f"{NAME}-"  # engines/<model>/triton-<its name on the server>.json
_DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype(np.float32), "FP16": np.dtype(np.float16)}
_KSERVE_DTYPE: dict[np.dtype[Any], str] = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16"}
_SEND_BYTES = 512 << 20  # a batch of 32 VGG16 inputs is 22 MB; Triton's own limit is 2 GB
# An answer holds scores and heatmaps only (a batch of 32 with 64 x 64 maps: 0.5 MB): a server cannot make the
# appliance hold more than this of its reply.
_RECEIVE_BYTES = 64 << 20
_MODEL_CONFIG = "/inference.GRPCInferenceService/ModelConfig"  # Triton's, beside the protocol's calls
# Codes that say the server (not the request) failed: it leaves the rotation and the batch goes to another.
_SERVER_FAILED = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.NOT_FOUND,  # the model was unloaded from it
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


class TritonSettings(BaseModel):
    """`[inference.triton]`: where the servers are and how to reach them."""

    model_config = ConfigDict(extra="forbid")

    endpoints: list[str] = Field(
        default_factory=list, description="The servers' gRPC addresses, host:port (Triton's 8001), one or more."
    )
    model: str = Field(
        "",
        description="The model's name on the servers; default: the one `make engine TARGET=triton` exported "
        "(engines/<model>/triton-<name>.json), where there is one.",
    )
    version: str = Field(
        "", description="The model version asked for; empty: the one each server's version policy serves."
    )
    balance: Literal["least_outstanding", "round_robin"] = Field(
        "least_outstanding", description="How batches are spread over the servers that answer."
    )
    call_timeout_s: float = Field(10.0, gt=0, description="The longest an inference call may take.")
    check_timeout_s: float = Field(5.0, gt=0, description="The longest a readiness or metadata call may take.")
    failures_before_fallback: int = Field(
        3, ge=1, description="Batches in a row that no server could run before the local artifact serves."
    )
    probe_max_s: float = Field(30.0, gt=0, description="The longest wait between checks of a server that failed.")
    tls_ca: Path | None = Field(None, description="CA certificate (PEM) the servers' certificates must chain to.")
    tls_cert: Path | None = Field(None, description="This appliance's client certificate (PEM), for mutual TLS.")
    tls_key: Path | None = Field(None, description="Its private key (PEM).")
    tls_server_name: str = Field("", description="The name the servers' certificates carry, where not the host's.")
    token_file: Path | None = Field(None, description="A file holding the token sent with every call.")
    token_header: str = Field("authorization", description="The header that carries it (e.g. 'Bearer <token>').")

    @field_validator("endpoints")
    @classmethod
    def _addresses(cls, endpoints: list[str]) -> list[str]:
        for address in endpoints:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{address!r} is not host:port")
        return endpoints


@dataclass(frozen=True)
class TritonHost:
    """What the artifact choice needs of the settings: the model's name on the servers, and whether any is set."""

    model: str
    endpoints: tuple[str, ...]


def probe(settings: TritonSettings) -> TritonHost:
    return TritonHost(settings.model, tuple(settings.endpoints))


def is_available() -> str | None:
    return None  # gRPC is the appliance's own; whether a server answers is known at load


def record_path(folder: Path, model: str) -> Path:
    return folder / f"{RECORD_PREFIX}{model}.json"


def triton_choice(folder: Path, onnx_sha: str, host: TritonHost, onnx_path: Path) -> tuple[Choice | None, PassedOver]:
    """The exported model's record here, where its key is this model's ONNX; the servers are checked at load."""
    if not host.endpoints:
        return None, PassedOver(
            Why.NO_RUNTIME, "no inference server is configured (inference.triton.endpoints)", TIER, refuses_start=True
        )
    if host.model:
        record = record_path(folder, host.model)
    else:
        found = sorted(folder.glob(f"{RECORD_PREFIX}*.json"))
        if len(found) > 1:
            names = ", ".join(p.stem.removeprefix(RECORD_PREFIX) for p in found)
            return None, PassedOver(
                Why.DAMAGED, f"{folder} holds exports of several models ({names}); name one in inference.triton.model",
                TIER, refuses_start=True,
            )  # fmt: skip
        record = found[0] if found else record_path(folder, "<name>")
    if not record.is_file():
        return None, PassedOver(
            Why.NONE_BUILT,
            f"no Triton export of this model in {folder} ({record.name}); `make engine TARGET=triton REPO=dir` "
            "writes one, and its repository goes to the servers",
            TIER,
            refuses_start=True,
        )
    try:
        sidecar = read_sidecar(record)
    except SidecarError as e:
        return None, PassedOver(Why.DAMAGED, f"{e}; export it again", TIER, refuses_start=True)
    if sidecar.key.backend != NAME or sidecar.self_check is None:
        why = "is not a Triton export" if sidecar.key.backend != NAME else "has no self-check"
        return None, PassedOver(Why.DAMAGED, f"{record} {why}; export it again", TIER, refuses_start=True)
    if sidecar.key.onnx_sha256 != onnx_sha:
        return None, PassedOver(
            Why.STALE,
            f"{record.name} was exported from another version of {onnx_path.name}; export it again and load it on "
            "the servers",
            TIER,
            refuses_start=True,
        )
    reason = f"the {sidecar.key.precision} model exported for Triton, on {', '.join(host.endpoints)}"
    return Choice(NAME, record, sidecar.key.precision, reason, sidecar, tier=TIER), PassedOver(Why.NONE_BUILT, "")


# --- one server ---------------------------------------------------------------------------------------------


@dataclass
class _Server:
    address: str
    channel: grpc.Channel
    stub: v2_grpc.GRPCInferenceServiceStub
    config_call: Callable[..., Any]
    serving: bool = False
    version: str = ""  # the model version checked; a response from another is not used
    why: str = ""  # why it is out of the rotation
    refused: bool = False  # it answers, but with a model that is not the one exported: checked again, less often
    outstanding: int = 0
    failures: int = 0  # checks failed in a row, for the back-off
    next_check: float = 0.0  # monotonic


@dataclass
class _Model:
    """What a server's metadata said of the model, once it matched the export."""

    input: TensorSpec
    outputs: list[str]
    max_batch: int
    heatmap: bool
    width: int = 0  # scores per image, where the metadata says (0: it does not)
    extra: dict[str, Any] = field(default_factory=dict)


class TritonBackend(Backend):
    name = NAME

    def __init__(
        self,
        record: Path,
        *,
        output_name: str,
        max_batch: int,
        settings: TritonSettings,
        heatmap: HeatmapSpec | None = None,
    ) -> None:
        super().__init__()
        self._record = record
        self._output_name = output_name
        self._wanted_max_batch = max_batch
        self._settings = settings
        self._heatmap = heatmap
        self._check: Check | None = None
        self._expected: TensorSpec | None = None
        self._left: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._servers: list[_Server] = []
        self._model: _Model | None = None
        self._model_name = ""
        self._next = 0  # round robin
        self._metadata: list[tuple[str, str]] = []

    # --- the Backend interface ---------------------------------------------------------------------------

    def adopt_check(self, check: Check) -> None:
        self._check = check

    def on_leave(self, listener: Callable[[], None]) -> None:
        """Called when a server leaves the rotation (the failover's watch then checks it as its back-off ends)."""
        self._left = listener

    def expect_input(self, spec: TensorSpec) -> None:
        """The input every server's model must take (the local artifact's, checked against the manifest)."""
        self._expected = spec

    def _load_impl(self) -> None:
        try:
            sidecar = read_sidecar(self._record)
        except SidecarError as e:
            raise ArtifactRefused(f"{e}.") from e
        self._model_name = str(sidecar.recipe.get("triton_model") or self._record.stem.removeprefix(RECORD_PREFIX))
        self._metadata = self._token()
        try:
            for address in self._settings.endpoints:
                self._servers.append(self._connect(address))
            for server in self._servers:
                self._verify(server, sidecar)
            if all(s.refused for s in self._servers):
                whys = "; ".join(f"{s.address}: {s.why}" for s in self._servers)
                raise ModelMismatchError(f"Triton model {self._model_name!r} was refused on every server: {whys}.")
        except BaseException:
            self._close_impl()
            raise
        # Loaded with those that answered; the others (all, where none did) are checked again (check_again).

    def _input_spec_impl(self) -> TensorSpec:
        return self._described().input

    def _max_batch_impl(self) -> int:
        return self._described().max_batch

    def _artifact_impl(self) -> str:
        servers = ",".join(self._settings.endpoints)
        return f"triton://{servers}/{self._model_name or self._record.stem.removeprefix(RECORD_PREFIX)}"

    def _has_heatmap_impl(self) -> bool:
        return self._described().heatmap

    def _infer_impl(self, batch: np.ndarray) -> Outputs:
        """On the server with the fewest calls under way (or the next in turn); a server that fails leaves the
        rotation and the batch goes to the next. BackendUnavailable once none is left."""
        tried: list[str] = []
        whys: list[str] = []
        last: type[BackendError] = ServerUnavailable
        while True:
            server = self._pick(exclude=tried)
            if server is None:
                where = "; ".join(whys) if whys else "none is in the rotation"
                raise last(f"No inference server could run the batch ({where}).")
            tried.append(server.address)
            try:
                return self._infer_on(server, batch)
            except _ServerFailed as e:
                self._leave(server, e.why, refused=e.refused)
                whys.append(f"{server.address}: {e.why}")
                last = e.kind

    def _close_impl(self) -> None:
        for server in self._servers:
            server.channel.close()
        self._servers = []

    # --- the rotation, for the failover ---------------------------------------------------------------------

    def serving(self) -> bool:
        """Whether any server is in the rotation."""
        with self._lock:
            return any(s.serving for s in self._servers)

    def out_of_rotation(self) -> list[str]:
        """One phrase per server out of the rotation, and why."""
        with self._lock:
            return [f"{s.address} ({s.why})" for s in self._servers if not s.serving]

    def leave_all(self, why: str) -> None:
        """Every server out of the rotation, to be checked again (their answers failed the batches)."""
        with self._lock:
            serving = [s for s in self._servers if s.serving]
        for server in serving:
            self._leave(server, why)

    def next_check_s(self) -> float | None:
        """Seconds until the next server out of the rotation is due to be checked again; None where all serve."""
        with self._lock:
            due = [s.next_check for s in self._servers if not s.serving]
        return None if not due else max(0.0, min(due) - time.monotonic())

    def check_again(self) -> list[str]:
        """Check each server out of the rotation whose back-off is over; returns those that came back."""
        try:
            sidecar = read_sidecar(self._record)
        except SidecarError as e:
            log.warning("Triton: cannot check the servers again: %s", e)
            return []
        now = time.monotonic()
        with self._lock:
            due = [s for s in self._servers if not s.serving and s.next_check <= now]
        back = []
        for server in due:
            self._verify(server, sidecar)
            if server.serving:
                back.append(server.address)
        return back

    # --- internals ------------------------------------------------------------------------------------------

    def _described(self) -> _Model:
        if self._model is None:
            raise BackendError("The Triton backend has no server's model description; it is not loaded.")
        return self._model

    def _token(self) -> list[tuple[str, str]]:
        path = self._settings.token_file
        if path is None:
            return []
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise BackendError(f"The inference server token file {path} cannot be read ({e.strerror}).") from e
        return [(self._settings.token_header.lower(), token)]

    def _connect(self, address: str) -> _Server:
        s = self._settings
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", _SEND_BYTES),
            ("grpc.max_receive_message_length", _RECEIVE_BYTES),
        ]
        if s.tls_ca is None and s.tls_cert is None:
            channel = grpc.insecure_channel(address, options=options)
        else:
            try:
                root = s.tls_ca.read_bytes() if s.tls_ca else None
                cert = s.tls_cert.read_bytes() if s.tls_cert else None
                key = s.tls_key.read_bytes() if s.tls_key else None
            except OSError as e:
                raise BackendError(f"A TLS file for the inference servers cannot be read: {e}.") from e
            if s.tls_server_name:
                options.append(("grpc.ssl_target_name_override", s.tls_server_name))
            credentials = grpc.ssl_channel_credentials(root, key, cert)
            channel = grpc.secure_channel(address, credentials, options=options)
        config_call = channel.unary_unary(
            _MODEL_CONFIG,
            request_serializer=triton_config.ModelConfigRequest.SerializeToString,
            response_deserializer=triton_config.ModelConfigResponse.FromString,
        )
        return _Server(address, channel, v2_grpc.GRPCInferenceServiceStub(channel), config_call)

    def _verify(self, server: _Server, sidecar: Sidecar) -> None:
        """Ready, the model's metadata matching the export and the manifest, then the self-check's scores
        reproduced on this server alone: then it joins the rotation. Whatever fails leaves it out, saying why."""
        try:
            version, model = self._describe(server, sidecar)
            with self._lock:
                known = self._model
            if known is not None and (model.input, model.outputs) != (known.input, known.outputs):
                raise ModelMismatchError("its model differs from the other servers'")
            problem = self._check(_OneServer(self, server, version, model)) if self._check is not None else ""
        except _ServerFailed as e:
            self._leave(server, e.why, refused=e.refused)
            return
        except ModelMismatchError as e:
            self._leave(server, e.message.rstrip("."), refused=True)
            return
        except BackendError as e:  # a call of its self-check failed: the server, not its model, as far as known
            self._leave(server, e.message.rstrip("."))
            return
        except Exception as e:  # a reply nothing here expected: not used until it answers as it should
            self._leave(server, f"its answer could not be read ({type(e).__name__})", refused=True)
            return
        if problem:
            self._leave(server, problem, refused=True)
            return
        with self._lock:
            if self._model is None:
                self._model = model
            else:
                self._model.max_batch = min(self._model.max_batch, model.max_batch)
            first = not server.serving and server.failures == 0 and not server.why
            server.serving, server.version, server.why, server.refused = True, version, "", False
            server.failures, server.next_check = 0, 0.0
        log.info(
            "Triton server %s %s model %s version %s (max batch %d)",
            server.address,
            "serves" if first else "serves again",
            self._model_name,
            version or "?",
            model.max_batch,
        )

    def _describe(self, server: _Server, sidecar: Sidecar) -> tuple[str, _Model]:
        name = self._model_name
        timeout = self._settings.check_timeout_s
        if not self._call(server, server.stub.ServerReady, v2.ServerReadyRequest(), timeout).ready:
            raise _ServerFailed("the server is not ready")
        pinned = self._settings.version
        ready = self._call(server, server.stub.ModelReady, v2.ModelReadyRequest(name=name, version=pinned), timeout)
        if not ready.ready:
            raise _ServerFailed(f"model {name!r} is not ready on it")
        meta = self._call(
            server, server.stub.ModelMetadata, v2.ModelMetadataRequest(name=name, version=pinned), timeout
        )
        version = pinned or (max(meta.versions, key=lambda v: (len(v), v)) if meta.versions else "")
        model = self._matching(meta, self._server_max_batch(server, sidecar))
        return version, model

    def _server_max_batch(self, server: _Server, sidecar: Sidecar) -> int:
        """Triton's max_batch_size where it says it (its ModelConfig call); else what the export recorded."""
        try:
            response = server.config_call(
                triton_config.ModelConfigRequest(name=self._model_name, version=self._settings.version),
                timeout=self._settings.check_timeout_s,
                metadata=self._metadata,
            )
            largest = int(response.config.max_batch_size)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:  # KServe and MLServer have no such call
                raise _ServerFailed(_described_error(e)) from e
            largest = sidecar.max_batch
        # 0: the model does not batch there; its input's first axis is then the model's own (1, as here).
        return max(1, min(self._wanted_max_batch, largest))

    def _matching(self, meta: v2.ModelMetadataResponse, max_batch: int) -> _Model:
        name = self._model_name
        if len(meta.inputs) != 1:
            raise ModelMismatchError(f"model {name!r} has {len(meta.inputs)} inputs there; the appliance needs one")
        tensor = meta.inputs[0]
        if tensor.datatype not in _DTYPES:
            raise ModelMismatchError(f"model {name!r}'s input is {tensor.datatype} there; FP32 or FP16 needed")
        shape = tuple(None if d < 0 else int(d) for d in tensor.shape)
        spec = TensorSpec(tensor.name, shape, _DTYPES[tensor.datatype])
        want = self._expected
        if want is not None and (spec.name, spec.shape[1:], spec.dtype) != (want.name, want.shape[1:], want.dtype):
            raise ModelMismatchError(
                f"model {name!r} takes {spec.name!r} {_shape(spec)} there; "
                f"the manifest says {want.name!r} {_shape(want)}"
            )
        outputs = {o.name: o for o in meta.outputs}
        if self._output_name not in outputs:
            raise ModelMismatchError(
                f"model {name!r} has no output {self._output_name!r} there (it has {', '.join(outputs) or 'none'})"
            )
        wanted = [self._output_name]
        if self._heatmap is not None:  # declared by the manifest and asked for: the export always carries it
            if self._heatmap.output not in outputs:
                raise ModelMismatchError(
                    f"model {name!r} has no output {self._heatmap.output!r} there, the heatmap the manifest declares; "
                    "export it again with `make engine TARGET=triton` (or set inference.heatmaps = false)"
                )
            wanted.append(self._heatmap.output)
        dims = outputs[self._output_name].shape
        width = int(dims[-1]) if len(dims) >= 2 and dims[-1] > 0 else 0
        return _Model(spec, wanted, max_batch, self._heatmap is not None, width=width)

    def _call(self, server: _Server, method: Callable[..., Any], request: Any, timeout: float) -> Any:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            code = e.code()
            if code in _SERVER_FAILED:
                raise _ServerFailed(_described_error(e), _KINDS.get(code, ServerUnavailable)) from e
            kind = ServerRefusedRequest if code == grpc.StatusCode.INVALID_ARGUMENT else BackendError
            raise kind(f"The inference server {server.address} refused the call: {_described_error(e)}.") from e

    def _pick(self, exclude: Sequence[str]) -> _Server | None:
        with self._lock:
            ready = [s for s in self._servers if s.serving and s.address not in exclude]
            if not ready:
                return None
            if self._settings.balance == "least_outstanding":  # the fewest calls under way; in turn among equals
                fewest = min(s.outstanding for s in ready)
                ready = [s for s in ready if s.outstanding == fewest]
            self._next += 1
            server = ready[self._next % len(ready)]
            server.outstanding += 1
            return server

    def _infer_on(
        self, server: _Server, batch: np.ndarray, version: str | None = None, model: _Model | None = None
    ) -> Outputs:
        """One call on one server (``_pick`` counted it under way). A response from another model version than
        the one checked is not used, nor one that does not read as the model's outputs: the server is checked
        again first."""
        try:
            model = model or self._described()
            request = v2.ModelInferRequest(model_name=self._model_name, model_version=version or self._settings.version)
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = model.input.name, _KSERVE_DTYPE[batch.dtype]
            tensor.shape.extend(batch.shape)
            request.raw_input_contents.append(batch.tobytes())
            for output in model.outputs:
                request.outputs.add().name = output
            response = self._call(server, server.stub.ModelInfer, request, self._settings.call_timeout_s)
        finally:
            with self._lock:
                server.outstanding -= 1
        if version is None and server.version and response.model_version and response.model_version != server.version:
            raise _ServerFailed(
                f"its model {self._model_name!r} changed from version {server.version} to {response.model_version}"
            )
        try:
            return Outputs(*_outputs(response, model, batch.shape[0]))
        except (BackendError, ValueError) as e:
            why = e.message.rstrip(".") if isinstance(e, BackendError) else f"{type(e).__name__} reading it"
            raise _ServerFailed(f"its answer does not read as the model's outputs: {why}", refused=True) from e

    def _leave(self, server: _Server, why: str, *, refused: bool = False, locked: bool = False) -> None:
        """Out of the rotation until checked again, after a back-off that doubles to probe_max_s (a server that
        answers with another model: the longest)."""
        if not locked:
            self._lock.acquire()
        try:
            was = server.serving or not server.why
            server.serving, server.why, server.refused = False, why, refused
            server.failures += 1
            wait = (
                self._settings.probe_max_s if refused else min(self._settings.probe_max_s, 2.0 ** (server.failures - 1))
            )
            server.next_check = time.monotonic() + wait
        finally:
            if not locked:
                self._lock.release()
        if was:
            log.warning("Triton server %s left the rotation: %s; checked again in %.0f s", server.address, why, wait)
        self._left()


class _OneServer(Backend):
    """One server of a TritonBackend as a backend of its own, for its self-check: its calls go to it alone."""

    def __init__(self, owner: TritonBackend, server: _Server, version: str, model: _Model) -> None:
        super().__init__()
        self.name = owner.name
        self._owner, self._server, self._version, self._model = owner, server, version, model
        self._loaded = True

    def _load_impl(self) -> None:
        pass

    def _input_spec_impl(self) -> TensorSpec:
        return self._model.input

    def _max_batch_impl(self) -> int:
        return self._model.max_batch

    def _artifact_impl(self) -> str:
        return f"triton://{self._server.address}/{self._owner._model_name}"

    def _infer_impl(self, batch: np.ndarray) -> Outputs:
        with self._owner._lock:
            self._server.outstanding += 1
        return self._owner._infer_on(self._server, batch, version=self._version, model=self._model)

    def _close_impl(self) -> None:
        pass


class _ServerFailed(Exception):
    """The server (not the request) failed: it leaves the rotation. ``kind``: the appliance's error for it."""

    def __init__(self, why: str, kind: type[BackendError] = ServerUnavailable, refused: bool = False) -> None:
        super().__init__(why)
        self.why = why
        self.kind = kind
        self.refused = refused  # it answered, but not as the model checked: re-checked after the longest wait


_KINDS: dict[grpc.StatusCode, type[BackendError]] = {
    grpc.StatusCode.UNAVAILABLE: ServerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServerTimeout,
    grpc.StatusCode.NOT_FOUND: ServerModelMissing,
}


def _shape(spec: TensorSpec) -> str:
    return f"[{', '.join('N' if d is None else str(d) for d in spec.shape)}] {spec.dtype}"


def _described_error(error: grpc.RpcError) -> str:
    code = error.code()
    details = (error.details() or "").strip().rstrip(".")
    return f"{code.name if code else 'UNKNOWN'}" + (f": {details[:400]}" if details else "")


def _outputs(response: v2.ModelInferResponse, model: _Model, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The scores (rows x labels) and heatmap (rows x H x W) from the raw contents, checked against their shapes
    (BackendError, or ValueError from bytes that are not whole values, where they do not read)."""
    names = model.outputs
    found: dict[str, np.ndarray] = {}
    if len(response.raw_output_contents) != len(response.outputs):
        raise BackendError("it answered without raw output contents")
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        dtype = _DTYPES.get(tensor.datatype)
        if dtype is None:
            raise BackendError(f"it answered {tensor.name} as {tensor.datatype}")
        shape = tuple(int(d) for d in tensor.shape)
        array = np.frombuffer(raw, dtype=dtype)
        if array.size != int(np.prod(shape)) or not shape or shape[0] != rows:
            raise BackendError(f"it answered {tensor.name} with {array.size} values for shape {list(shape)}")
        found[tensor.name] = array.reshape(shape).astype(np.float32)
    missing = [n for n in names if n not in found]
    if missing:
        raise BackendError(f"it left out {', '.join(missing)}")
    scores = found[names[0]].reshape(rows, -1)
    if scores.shape[1] == 0 or (model.width and scores.shape[1] != model.width):
        raise BackendError(f"it answered {scores.shape[1]} scores an image, its metadata {model.width}")
    return scores, (found[names[1]] if len(names) > 1 else None)


def open_artifact(
    path: Path,
    *,
    output_name: str,
    max_batch: int,
    settings: TritonSettings,
    heatmap: HeatmapSpec | None = None,
) -> Backend:
    return TritonBackend(path, output_name=output_name, max_batch=max_batch, settings=settings, heatmap=heatmap)


KIND = BackendKind(
    name=NAME,
    is_available=is_available,
    settings=TritonSettings,
    open=open_artifact,
    tier=TIER,
    probe=probe,
    choose=triton_choice,
    unavailable_on=lambda host: "",
    stem=lambda host: f"{RECORD_PREFIX}{host.model or 'model'}",
    host_key=lambda host: {},
    precisions=("fp32", "int8", "fp16"),  # what an export may carry; the export itself builds nothing
    hardware="inference server",
    remote=True,
)
