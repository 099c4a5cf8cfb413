"""`python -m bench` / `make bench`: every figure measured in one run on this host, as ratios
and percentiles (machines here are noisy; absolute timings are never pass/fail anywhere)."""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from appliance.toolkit import (
    InferenceConfig,
    LimitsConfig,
    Preparer,
    images_per_second,
    load_config,
    load_manifest,
    open_backend,
    quiet_pydicom,
)
from appliance.v1 import scoring_pb2 as pb
from bench import build_cost, cstore, heatmap_cost, series, triton
from bench.daemon_run import BenchDaemon
from bench.inputs import WORKLOADS, write_inputs
from bench.profile import Profile
from bench.report import percentiles, text, write_json, write_png
from bench.stages import naive_loop, prepare_throughput

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = {
    "mr": None,
    "radiograph": REPO / "models" / "pipeline-test",
    "series": REPO / "models" / "pipeline-test",
    "triton": REPO / "models" / "pipeline-test",
    "build": None,
}
# mr, radiograph: long enough that filling and draining the pipeline are noise; series: a CT series' slices;
# triton: per appliance, so that its four runs (seven appliances) stay within about three minutes on 2 cores
DEFAULT_COUNTS = {"mr": 200, "radiograph": 200, "series": 300, "triton": 200, "build": 100}


def shrink_first_error(fast: Preparer, exact: Preparer, paths: list[Path]) -> dict[str, float]:
    """How far shrinking stored integers first moves the model input, in display units (0..1)."""
    gain = float(np.abs(fast.preprocessor.gain).max())
    diffs = [
        np.abs(fast.prepare(p.read_bytes()).tensors[0] - exact.prepare(p.read_bytes()).tensors[0]) / gain for p in paths
    ]
    return {
        "max_abs": float(max(d.max() for d in diffs)),
        "mean_abs": float(np.mean([d.mean() for d in diffs])),
        "images": len(diffs),
    }


def host_shares(e2e: float, prepare_alone: float, infer_alone: float, timings: list[pb.Timings]) -> dict[str, float]:
    """How the host's time per file divides up over the burst. Each stage alone used the whole host, so
    per file it costs 1/its rate of host time; the daemon spends 1/e2e; what is left over is the rest
    (watching, hashing, the journal, moving files, streaming, and waits the pipeline did not hide).
    Decode and preprocess split their share as the daemon timed them. On a GPU host, inference overlaps
    the CPU's work instead of adding to it, and the rest is then understated."""
    prepare = e2e / prepare_alone
    decode = sum(t.decode_ms for t in timings)
    split = decode / max(decode + sum(t.preprocess_ms for t in timings), 1e-9)
    inference = e2e / infer_alone
    return {
        "decode": prepare * split,
        "preprocess": prepare * (1 - split),
        "inference": inference,
        "rest": max(0.0, 1.0 - prepare - inference),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--workload", choices=(*WORKLOADS, "series", "triton", "build"), default="mr",
                   help="mr (default model), radiograph, series (a CT series by DICOM, [pacs] on), triton "
                        "(appliances sending inference to one Triton server, beside the local backend), or build "
                        "(a burst of MR slices while the daemon builds its artifact in the background)")  # fmt: skip
    p.add_argument("--count", type=int, help="files in the burst (default 200), slices in the series (default 300), "
                                             "images per appliance for triton (default 200)")  # fmt: skip
    p.add_argument("--model", type=Path, help="model folder (default: mr the config's, the others pipeline-test)")
    p.add_argument("--config", type=Path, default=REPO / "appliance.toml", help="for the engines folder")
    p.add_argument("--out", type=Path, default=REPO / "bench-results", help="where the JSON and PNG go")
    p.add_argument("--idle", type=int, default=10, help="single images on an idle daemon, for latency")
    p.add_argument("--naive", type=int, default=24, help="files through the hand-written loop")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="the batcher's delay, as the daemon has it")
    p.add_argument("--no-cstore", action="store_true", help="radiograph: skip the burst sent by DCMTK's storescu")
    p.add_argument("--no-pacs", action="store_true", help="radiograph: skip the C-STORE burst with [pacs] on")
    p.add_argument("--stable-s", type=float, help="series: series.stable_s (default: the config's)")
    p.add_argument("--profile", action="store_true", help="mr, radiograph: where the daemon's CPU goes during the "
                                                          "burst, by thread and function (py-spy)")  # fmt: skip
    p.add_argument("--build-wait-s", type=float, default=build_cost.BUILD_WAIT_S,
                   help="build: how long to wait after the burst for the background build to end "
                        "(default 1800)")  # fmt: skip
    p.add_argument("--image-count", type=int, help="series: slices sent for a report per image (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_pydicom()
    config = load_config(args.config)
    model_dir = (args.model or DEFAULT_MODELS[args.workload] or config.model.dir).resolve()
    loaded = load_manifest(model_dir)
    manifest = loaded.manifest
    count = args.count or DEFAULT_COUNTS[args.workload]
    work = args.out / f".work-{args.workload}"
    shutil.rmtree(work, ignore_errors=True)
    make_daemon = functools.partial(BenchDaemon, model=model_dir, engines=config.model.engines_dir,
                                    max_delay_ms=args.max_delay_ms, backend=config.inference.backend,
                                    device=config.inference.device, heatmaps=config.inference.heatmaps)  # fmt: skip
    if args.workload == "series":
        return series_main(args, make_daemon, work, count, manifest.model.name, config.series.stable_s)
    if args.workload == "build":
        print(f"generating {count} mr inputs ...", flush=True)
        files = write_inputs(work / "inputs", "mr", count)
        built: dict[str, Any] = {"workload": "build", "count": count, "model": manifest.model.name,
                                 "cpus": os.cpu_count(), "unix_time": time.time()}  # fmt: skip
        built.update(build_cost.measure(make_daemon, work, files, args.build_wait_s))
        return _written(args.out, "build", build_cost.text(built), built, work)
    if args.workload == "triton":
        return triton_main(args, model_dir, work, count, manifest.model.name, config.inference.heatmaps)
    print(f"generating {count + args.idle} {args.workload} inputs ...", flush=True)
    paths = write_inputs(work / "inputs", args.workload, count + args.idle)
    idle_paths, burst_paths = paths[: args.idle], paths[args.idle :]
    limits = LimitsConfig()
    figures: dict[str, Any] = {
        "workload": args.workload,
        "count": count,
        "model": manifest.model.name,
        "cpus": os.cpu_count(),
        "unix_time": time.time(),
    }

    print("timing each stage alone ...", flush=True)
    preparer = Preparer(manifest, limits)
    singles, single_ms = [], []
    for path in burst_paths[:16]:  # one at a time, from the file as it lies on disk (in the page cache)
        started = time.perf_counter()
        singles.append(preparer.prepare(path.read_bytes()))
        single_ms.append((time.perf_counter() - started) * 1e3)
    samples = [t for s in singles for t in s.tensors]
    figures["single_decode_ms"] = float(np.median(single_ms))  # read + decode + preprocess
    figures["shrink_first_error"] = shrink_first_error(preparer, Preparer(manifest, limits, shrink_first=False),
                                                       burst_paths[:8])  # fmt: skip
    chosen = InferenceConfig(
        backend=config.inference.backend, device=config.inference.device, heatmaps=config.inference.heatmaps
    )

    def raw_backend() -> tuple[float, float]:
        """The backend alone at batch 1 and at its best batch: measured before and after the daemon's burst (the
        machines here drift by several percent in minutes), each ratio taken against the mean of the two."""
        backend = open_backend(loaded, chosen, config.model.engines_dir)
        try:
            figures["backend"], figures["artifact"] = backend.name, Path(backend.artifact).name
            figures["max_batch"] = backend.max_batch
            figures["served_heatmap"] = backend.has_heatmap  # an artifact built before [heatmap] serves none
            return (images_per_second(backend, samples, 1, min_seconds=2.0),
                    images_per_second(backend, samples, min_seconds=2.0))  # fmt: skip
        finally:
            backend.close()

    raw_before = raw_backend()
    figures["raw_batch1_img_s"], figures["raw_max_batch_img_s"] = raw_before
    print("inference with and without the heatmap ...", flush=True)
    figures["heatmap"] = heatmap_cost.measure(loaded, chosen, config.model.engines_dir, samples)
    figures["single_infer_ms"] = 1000 / figures["raw_batch1_img_s"]
    figures["latency_budget_ms"] = figures["single_infer_ms"] + figures["single_decode_ms"] + 5
    figures["prepare_threads_files_s"] = prepare_throughput(manifest, limits, burst_paths, "thread")
    prepare_before = prepare_throughput(manifest, limits, burst_paths, "process")
    print("the hand-written loop ...", flush=True)
    naive_before = naive_loop(manifest, loaded.onnx_path, burst_paths[: args.naive])

    print("the daemon: idle latency, then the burst ...", flush=True)
    daemon = make_daemon(root=work / "daemon")
    daemon.start()
    try:
        idle = []
        for i, path in enumerate(idle_paths):
            closed = daemon.publish(daemon.stage(path, path.name))
            daemon.wait_for(i + 1)
            idle.append((daemon.arrivals[i].at - closed) * 1e3)
            time.sleep(0.3)
        staged = [daemon.stage(path, path.name) for path in burst_paths]
        closes = {}
        profile = Profile(daemon.proc.pid, work / "py-spy.txt") if args.profile and daemon.proc else None
        if profile is not None:
            profile.start()
        cpu_before = daemon.cpu_seconds()
        first = time.time()
        for path in staged:
            closes[path.name] = daemon.publish(path)
        daemon.wait_for(len(paths))
        burst = daemon.arrivals[len(idle_paths) :]
        burst_cpu_s = daemon.cpu_seconds() - cpu_before
        burst_wall_s = max(a.at for a in burst) - first
        if profile is not None:
            figures["profile"] = profile.finish(len(burst), burst_wall_s)
        figures["peak_rss_mb"] = daemon.peak_rss_mb()
    finally:
        daemon.stop()
    print("the backend alone and the hand-written loop again ...", flush=True)
    raw_after = raw_backend()
    naive_after = naive_loop(manifest, loaded.onnx_path, burst_paths[: args.naive])
    prepare_after = prepare_throughput(manifest, limits, burst_paths, "process")
    figures["prepare_processes_before_after"] = [prepare_before, prepare_after]
    figures["prepare_processes_files_s"] = (prepare_before + prepare_after) / 2
    prepare_alone = max(figures["prepare_threads_files_s"], figures["prepare_processes_files_s"])
    figures["raw_max_batch_before_after"] = [raw_before[1], raw_after[1]]
    figures["naive_before_after"] = [naive_before, naive_after]
    figures["raw_batch1_img_s"] = (raw_before[0] + raw_after[0]) / 2
    figures["raw_max_batch_img_s"] = (raw_before[1] + raw_after[1]) / 2
    figures["naive_files_s"] = (naive_before + naive_after) / 2
    slower = min(prepare_alone, figures["raw_max_batch_img_s"])
    figures["slower_stage"] = "decode+preprocess" if prepare_alone <= figures["raw_max_batch_img_s"] else "inference"
    rejected = [a.result for a in daemon.arrivals if a.result.rejection.code]
    if rejected:
        first_bad = rejected[0]
        print(
            f"warning: {len(rejected)} inputs were rejected, e.g. {first_bad.file_name}: "
            f"{first_bad.rejection.code}: {first_bad.rejection.message}",
            file=sys.stderr,
        )
    last = max(a.at for a in burst)
    figures["e2e_files_s"] = len(burst) / (last - first)
    figures["ratio_e2e_to_raw"] = figures["e2e_files_s"] / figures["raw_max_batch_img_s"]
    figures["ratio_e2e_to_slower_stage"] = figures["e2e_files_s"] / slower
    figures["speedup_vs_naive"] = figures["e2e_files_s"] / figures["naive_files_s"]
    figures["latency_idle_ms"] = percentiles(idle)
    figures["latency_burst_ms"] = percentiles([(a.at - closes[a.file_name]) * 1e3 for a in burst])
    figures["stage_shares"] = host_shares(
        figures["e2e_files_s"], prepare_alone, figures["raw_max_batch_img_s"], [a.result.timings for a in burst]
    )
    figures["daemon_cpu_ms_per_file"] = burst_cpu_s * 1e3 / len(burst)
    if args.workload == "radiograph" and not args.no_cstore:  # the scanner's other way to send: DICOM
        # A report per scored image, and beside it its heatmap overlay where the model gives heatmaps (by default).
        per_result = 2 if figures["served_heatmap"] else 1
        figures.update(cstore.measure(make_daemon, work, idle_paths, burst_paths, figures, with_pacs=not args.no_pacs,
                                      per_result=per_result))  # fmt: skip

    report = text(figures)
    print(report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(args.out / f"{args.workload}-{stamp}.json", figures)
    write_png(args.out / f"{args.workload}-{stamp}.png", figures)
    print(f"wrote {args.out}/{args.workload}-{stamp}.json and .png")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def series_main(
    args: argparse.Namespace,
    make_daemon: functools.partial[BenchDaemon],
    work: Path,
    count: int,
    model: str,
    stable_s: float,
) -> int:
    """The series workload (bench/series.py): its own figures, no stage timings (the other workloads have them)."""
    stable_s = args.stable_s or stable_s
    image_count = min(args.image_count or count, count)
    print(f"generating one CT series of {count} slices ...", flush=True)
    files = series.write_series(work / "inputs", count)
    warm = series.write_warm(work / "warm")
    figures: dict[str, Any] = {"workload": "series", "count": count, "model": model, "cpus": os.cpu_count(),
                               "unix_time": time.time()}  # fmt: skip
    figures.update(series.measure(make_daemon, work, warm, files, stable_s, files[:image_count]))
    return _written(args.out, "series", series.text(figures), figures, work)


def triton_main(args: argparse.Namespace, model_dir: Path, work: Path, count: int, model: str, heatmaps: bool) -> int:
    """The triton workload (bench/triton.py): the local backend and one, two and four appliances on one server."""
    figures: dict[str, Any] = {"workload": "triton", "count": count, "model": model, "cpus": os.cpu_count(),
                               "unix_time": time.time()}  # fmt: skip
    figures.update(triton.measure(work, model_dir, args.config.resolve(), count, args.idle, args.max_delay_ms,
                                  heatmaps))  # fmt: skip
    return _written(args.out, "triton", triton.text(figures), figures, work)


def _written(out: Path, workload: str, report: str, figures: dict[str, Any], work: Path) -> int:
    """A workload's report printed, its figures written as JSON beside the others, its work folder removed."""
    print(report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(out / f"{workload}-{stamp}.json", figures)
    print(f"wrote {out}/{workload}-{stamp}.json")
    shutil.rmtree(work, ignore_errors=True)
    return 0
