"""Which artifacts the daemon may serve, best first: each backend's best artifact for this host, in the
registry's tier order (a TensorRT plan built for this GPU, then the quantized CPU model gated on this CPU
class and ONNX Runtime version), then the FP32 ONNX.

Every artifact passed over gets one sentence that says what to run. An explicit backend refuses to start
instead of falling back where its own file says so (`PassedOver.refuses_start`): `tensorrt` without a
usable plan, `onnxruntime` with only CPU artifacts gated on another CPU class or runtime, `triton` without
an export of this model or a server to send to. A remote backend (`triton`) is never chosen by `auto`; named, it
comes first with this host's own chain behind it, which the loader serves beside it as its fallback. The loader
tries the chain in order and moves on when a load or its self-check fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from appliance.domain.errors import BackendUnavailable, ModelMismatchError
from appliance.domain.manifest import LoadedManifest
from appliance.inference import registry
from appliance.inference.artifacts import engines_folder, sha256_file
from appliance.inference.backend import BackendKind, Choice, Facts, PassedOver, Why
from appliance.inference.settings import InferenceConfig


@dataclass
class Selection:
    chain: list[Choice]  # best first; the last one is served if all before it fail to load
    passed_over: list[PassedOver] = field(default_factory=list)


@dataclass(frozen=True)
class Host:
    """What artifact keys are checked against: each backend's own facts about this host, by its name."""

    facts: Mapping[str, Any]

    @staticmethod
    def probe(inference: InferenceConfig | None = None) -> Host:
        """Every backend's facts, each probed with its settings (the GPU `inference.device` names, say)."""
        inference = inference or InferenceConfig()
        return Host({kind.name: kind.probe(inference.settings_of(kind.name)) for kind in registry.kinds()})

    def of(self, kind: BackendKind[Facts]) -> Facts:
        """Backend `kind`'s facts, of the type its own file declares."""
        return cast(Facts, self.facts[kind.name])


def choose_artifact(
    loaded: LoadedManifest, inference: InferenceConfig, engines_dir: Path, host: Host | None = None
) -> Selection:
    host = host or Host.probe(inference)
    folder = engines_folder(engines_dir, loaded.manifest.model.name)
    onnx_sha = sha256_file(loaded.onnx_path)
    selection = Selection(chain=[])
    named = inference.backend != registry.AUTO
    kinds = [registry.get(inference.backend)] if named else [k for k in registry.by_tier() if not k.remote]
    for kind in kinds:
        choice, passed = kind.choose(folder, onnx_sha, host.of(kind), loaded.onnx_path)
        if choice is not None:
            selection.chain.append(choice)
        elif named and passed.refuses_start:
            sentence = passed.reason[0].upper() + passed.reason[1:] + "."
            raise BackendUnavailable(sentence) if passed.why is Why.NO_RUNTIME else ModelMismatchError(sentence)
        else:
            selection.passed_over.append(passed)
    reference = registry.reference()
    if named and kinds[0].remote:
        # The servers first; behind them, this host's own best artifact as `auto` chooses it, for when none answers.
        behind = choose_artifact(loaded, inference.model_copy(update={"backend": registry.AUTO}), engines_dir, host)
        return Selection(selection.chain + behind.chain, selection.passed_over + behind.passed_over)
    if named and kinds[0] is not reference:
        return selection  # the one backend named has its artifact, and nothing else may stand in for it
    if not selection.chain or selection.chain[-1].path != loaded.onnx_path:
        why = "no artifact before it may be served here" if selection.passed_over else "the FP32 model, the reference"
        selection.chain.append(Choice(reference.name, loaded.onnx_path, "fp32", why))
    return selection
