"""What the tools (`make engine`: build_engine/, `make bench`: bench/) may use of the daemon: read a config
and a manifest, prepare an image as the daemon does, open a backend and run batches, decide. Everything here
is the daemon's own code, so what the tools measure and gate is what the daemon serves; nothing else of the
daemon's inside is theirs to reach into.

`make engine` also writes the artifacts the daemon loads, so it shares their contract with the loader:
`appliance.inference.artifacts` (names, sidecar), `self_check` (the load-time check), `cpu_class`,
`heatmap_graph` (the heatmap branch both add to the FP32 model), and the backend registry with each
backend's build-side helpers. Those modules are that contract, not internals.
"""

from appliance.config import Config, InferenceConfig, LimitsConfig, load_config
from appliance.domain.errors import ApplianceError, InputRejected
from appliance.domain.manifest import Accuracy, Heatmap, LoadedManifest, Manifest, load_manifest
from appliance.inference.backend import Backend
from appliance.inference.loader import expected_sample_shape, open_backend
from appliance.inference.postprocess import decide
from appliance.inference.runs import images_per_second, rows_in_batches
from appliance.logging_setup import quiet_pydicom
from appliance.prepare.pool import init_worker, prepare_file, worker_initargs
from appliance.prepare.preparer import Prepared, Preparer

__all__ = [
    "Accuracy",
    "ApplianceError",
    "Backend",
    "Config",
    "Heatmap",
    "InferenceConfig",
    "InputRejected",
    "LimitsConfig",
    "LoadedManifest",
    "Manifest",
    "Prepared",
    "Preparer",
    "decide",
    "expected_sample_shape",
    "images_per_second",
    "init_worker",
    "load_config",
    "load_manifest",
    "open_backend",
    "prepare_file",
    "quiet_pydicom",
    "rows_in_batches",
    "worker_initargs",
]
