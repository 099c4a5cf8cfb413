"""`python -m build_engine`: the command line of `make engine`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from appliance.inference import registry
from appliance.inference.cpu_class import CLASSES
from appliance.toolkit import ApplianceError, load_config, quiet_pydicom
from build_engine import background, triton_repo
from build_engine.build import Builder, BuildOptions, clean_stale_builds
from build_engine.errors import BuildError, GateFailed

DESCRIPTION = """\
Build the fastest artifact this host can run for a model folder (model.toml + ONNX), behind an
accuracy gate against the FP32 model, and write it under the engines folder with a JSON sidecar.

On a CPU-only host: a quantized ONNX model for ONNX Runtime, with the recipe for this CPU's int8
kernels (s8 activations; s8 per-channel weights, or 7-bit weights on x86 without VNNI, whose kernels
saturate), keyed to the CPU class and the ONNX Runtime version it was gated on. Where `tensorrt` imports
and a GPU is visible: also a TensorRT plan (INT8 from a Q/DQ model, strongly typed), keyed to that GPU,
its compute capability, SM count and the TensorRT version. Each artifact stores a few of the gate's
images with its scores on them; the daemon reruns them at every load and refuses an artifact whose
scores moved. Running it again with nothing changed reuses what exists. Where model.toml declares a
[heatmap], every artifact returns it from the same call, its branch kept in float, and the gate checks
its peaks against FP32's.

Calibration and validation folders hold images as the scanner exports them (DICOM of any transfer
syntax, PNG, JPEG, 16-bit), read through the daemon's own decoding and preprocessing, in sorted order.
A validation folder is labelled by one sub-folder per label (a folder `none` for images with no
finding) or by a labels.csv with the header `file,label` (labels separated by ';', empty or `none`
for no finding). Files the daemon would reject are skipped and counted.

With --target triton --repo DIR nothing is built: the artifact `make engine` gated is exported as a Triton
model repository for a server past this host (DIR/<name>/config.pbtxt, DIR/<name>/<version>/model.onnx or
model.plan, and its sidecar and self-check), and the sidecar is also kept in the engines folder, where the
appliance checks the served model against it. --precision auto exports this host's gated INT8 CPU model where
there is one, else the FP32 ONNX (with the manifest's heatmap); --source tensorrt exports the TensorRT plan.
"""

EPILOG = """\
tolerances (model.toml [accuracy], overridable with --tolerance NAME=VALUE):
  min_agreement   share of validation images whose decision equals FP32's     (default 0.99)
  max_abs_diff    largest |score - FP32 score| on any image and label          (default 0.05)
  mean_abs_diff   mean |score - FP32 score|                                    (default 0.01)
  max_auc_drop    largest AUC loss per label, when labels exist                (default 0.01)
  min_heatmap_agreement
                  share of validation images whose heatmap peak cell is within
                  one cell of FP32's, where model.toml declares a [heatmap]    (default 0.95)

exit status: 0 built or up to date; 1 an explicitly requested precision failed the gate;
2 bad input (model, manifest, images, options) or a build error.
"""

TOLERANCES = ("min_agreement", "max_abs_diff", "mean_abs_diff", "max_auc_drop", "min_heatmap_agreement")


def _tolerance(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or name not in TOLERANCES:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(TOLERANCES)}")
    try:
        return name, float(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from e


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m build_engine",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="appliance config whose model and engines folder to use")
    p.add_argument("--model", type=Path, help="model folder (model.toml + ONNX); default: the config's model")
    p.add_argument("--calibration", type=Path, help="calibration images; default: the model's calibration/")
    p.add_argument("--calibration-count", type=int, help="calibration images used (default: model.toml, 64)")
    p.add_argument(
        "--validation", type=Path, help="validation images, labelled or not; default: the model's validation/"
    )
    p.add_argument("--validation-count", type=int, default=256, help="validation images used (default 256)")
    p.add_argument(
        "--precision",
        choices=("auto", "int8", "fp16", "fp32"),
        default="auto",
        help="auto tries int8, then fp16 (TensorRT), then fp32; an explicit one must pass the gate (default auto)",
    )
    p.add_argument(
        "--target",
        choices=(registry.AUTO, *registry.names()),
        default=registry.AUTO,
        help="auto: an artifact for every backend this host can run: the CPU artifact, and a TensorRT plan where "
        "TensorRT and a GPU are present (default auto)",
    )
    p.add_argument("--repo", type=Path, help="with --target triton: the Triton model repository folder to write into")
    p.add_argument(
        "--source",
        choices=triton_repo.SOURCES,
        default="onnxruntime",
        help="with --target triton: export the CPU model for Triton's ONNX Runtime backend, or the TensorRT plan "
        "for its TensorRT backend (default onnxruntime)",
    )
    p.add_argument(
        "--instances", type=int, default=1, help="with --target triton: model instances per server (default 1)"
    )
    p.add_argument(
        "--triton-model",
        default="",
        help="with --target triton: the model's name on the server (default: model.toml's)",
    )
    p.add_argument(
        "--triton-version", type=int, default=1, help="with --target triton: the model version folder (default 1)"
    )
    p.add_argument("--max-batch", type=int, help="largest batch (default: model.toml's batching.max_batch)")
    p.add_argument("--opt-batch", type=int, help="TensorRT: the batch size kernels are tuned for (default: max)")
    p.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT builder workspace limit (default 1024)")
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one of model.toml's [accuracy] tolerances (repeatable)",
    )
    p.add_argument("--engines", type=Path, help="output folder (default: the config's model.engines_dir)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: all cores)")
    p.add_argument(
        "--cpu-class",
        choices=CLASSES,
        help="quantize the CPU model with the recipe for this CPU class instead of this host's (to try the other "
        "class's recipe; the artifact is still gated on and keyed to this host)",
    )
    p.add_argument("--device", type=int, help="CUDA device index for TensorRT (default: the config's inference.device)")
    p.add_argument("--force", action="store_true", help="rebuild even when an up-to-date artifact exists")
    p.add_argument(
        "--background",
        action="store_true",
        help="the daemon's build while it serves (inference.build_on_start): lowest CPU priority (SCHED_IDLE, "
        "nice 19), ended with the process that started it",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log TensorRT and ONNX Runtime details")
    return p


def _export_misuse(target: str) -> str:
    """The sentence for --repo without a remote target, or a remote target without --repo."""
    if target == registry.AUTO or not registry.get(target).remote:
        return "--repo is for --target triton, which exports a Triton model repository; it builds nothing here."
    return (
        f"--target {target} writes a Triton model repository: name its folder with --repo DIR "
        f"(make engine TARGET={target} REPO=dir)."
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.background:
        background.lowest_priority()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    quiet_pydicom()
    # ONNX Runtime's quantizer nags on the root logger even after pre-processing; the report says what ran.
    logging.getLogger().addFilter(lambda record: not record.getMessage().startswith("Please consider"))
    for name, value in (
        ("max-batch", args.max_batch),
        ("opt-batch", args.opt_batch),
        ("workspace-mb", args.workspace_mb),
        ("instances", args.instances),
        ("triton-version", args.triton_version),
    ):
        if value is not None and value < 1:
            print(f"build_engine: --{name} must be at least 1.", file=sys.stderr)
            return 2
    try:
        config_path = (
            args.config
            if args.config is not None
            else (Path("appliance.toml") if Path("appliance.toml").is_file() else None)
        )
        config = load_config(config_path)
        exported = args.target != registry.AUTO and registry.get(args.target).remote
        if exported != (args.repo is not None):
            print(f"build_engine: {_export_misuse(args.target)}", file=sys.stderr)
            return 2
        if exported:
            triton_repo.export(
                triton_repo.ExportOptions(
                    model_dir=(args.model or config.model.dir).resolve(),
                    engines_dir=(args.engines or config.model.engines_dir).resolve(),
                    repo=args.repo.resolve(),
                    precision=args.precision,
                    source=args.source,
                    instances=args.instances,
                    triton_model=args.triton_model,
                    triton_version=args.triton_version,
                    max_batch=args.max_batch,
                    max_delay_ms=config.inference.max_delay_ms,
                    limits=config.limits,
                    inference=config.inference,
                )
            )
            return 0
        options = BuildOptions(
            model_dir=(args.model or config.model.dir).resolve(),
            engines_dir=(args.engines or config.model.engines_dir).resolve(),
            calibration_dir=args.calibration,
            validation_dir=args.validation,
            calibration_count=args.calibration_count,
            validation_count=args.validation_count,
            precision=args.precision,
            target=args.target,
            max_batch=args.max_batch,
            opt_batch=args.opt_batch,
            workspace_mb=args.workspace_mb,
            tolerance=dict(args.tolerance),
            force=args.force,
            threads=args.threads,
            limits=config.limits,
            recipe_class=args.cpu_class or "",
            device=config.inference.device if args.device is None else args.device,
        )
        builder = Builder(options)
        clean_stale_builds(builder.folder)
        return builder.run()
    except GateFailed as e:
        print(f"build_engine: {e}", file=sys.stderr)
        return 1
    except (BuildError, ApplianceError) as e:
        print(f"build_engine: {e}", file=sys.stderr)
        return 2
