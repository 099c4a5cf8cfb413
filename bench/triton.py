"""The triton workload (make bench WORKLOAD=triton): one real Triton Inference Server on this box serving one, two
and four appliances (processes) at once, beside the local backend in the same run.

The model is exported for Triton in FP32 by `make engine`'s own command (`--target triton`, into a temporary
repository and engines folder, so the local runs serve the same FP32 ONNX) and served by the test peer's Triton 2.51
(tests/peers/triton.py: its python backend running ONNX Runtime on the CPU). Every appliance scores its own burst of
small 16-bit PNGs through its watch folder: little to decode, so inference's share of each image is as large as this
model makes it. Figures, each against the local run: throughput and latency from file close to result; and per batch
where the time goes: serialization (timed here, in-process, on the same batch shapes), the round trip (the call's
time less that and the server's own) and the server's queue and compute (Triton's metrics over the burst).

All of it shares this box's CPUs: appliances, their decode workers and the server. A real deployment has the
server on a machine of its own, so here the server's work is taken from the appliances'."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from google.protobuf import text_format

from appliance.kserve import predict_v2_pb2 as v2
from appliance.kserve import triton_config_pb2 as tc
from bench.daemon_run import BenchDaemon, process_tree
from bench.report import percentiles
from tests.peers.triton import Triton, triton_missing

SIZE = 256  # the PNGs' side: pipeline-test takes 64 x 64, so decoding stays small beside inference
APPLIANCES = (1, 2, 4)
IDLE_GAP_S = 0.3  # between single images, so each meets an idle appliance (as the other workloads' idle latency)
RESULTS_WAIT_S = 300.0
SERIALIZE_MIN_S = 0.05  # per batch size, the in-process timing of building and parsing its messages
_METRIC = re.compile(r"^(nv_inference_\w+)\{([^}]*)\} (\S+)$", re.MULTILINE)
_SERVER_METRICS = {  # Triton's cumulative counters per model, read before and after each burst
    "requests": "nv_inference_request_success",
    "failures": "nv_inference_request_failure",
    "rows": "nv_inference_count",
    "executions": "nv_inference_exec_count",
    "request_us": "nv_inference_request_duration_us",
    "queue_us": "nv_inference_queue_duration_us",
    "input_us": "nv_inference_compute_input_duration_us",
    "infer_us": "nv_inference_compute_infer_duration_us",
    "output_us": "nv_inference_compute_output_duration_us",
}
_DTYPES = {tc.TYPE_FP32: ("FP32", np.float32), tc.TYPE_FP16: ("FP16", np.float16)}
_V2_DTYPES = dict(_DTYPES.values())


# --- inputs, the export, the server's metrics ---------------------------------------------------------------


def write_images(folder: Path, count: int, seed: int = 5) -> list[Path]:
    """``count`` 16-bit PNGs, SIZE a side: soft noise, every other one with the bright blurred disc pipeline-test
    finds, so decisions differ; fresh noise in each, so none is another's duplicate."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    paths = []
    for i in range(count):
        img = cv2.GaussianBlur(rng.random((SIZE, SIZE), dtype=np.float32), (0, 0), 6) * 0.4
        if i % 2:
            (cx, cy), r = rng.uniform(0.3, 0.7, 2), rng.uniform(0.08, 0.15)
            img += 0.6 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))
        img += rng.normal(0, 0.02, img.shape).astype(np.float32)
        path = folder / f"img-{i:05d}.png"
        cv2.imwrite(str(path), (np.clip(img, 0, 1) * 65535).astype(np.uint16))
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Export:
    repository: Path
    engines: Path
    name: str  # the model's name on the server
    config: tc.ModelConfig  # its config.pbtxt as Triton reads it


def export(model_dir: Path, config: Path, work: Path) -> Export:
    """The FP32 export by `make engine`'s command (`python -m build_engine --target triton`)."""
    repository, engines = work / "repository", work / "engines"
    command = [sys.executable, "-m", "build_engine", "--config", str(config), "--model", str(model_dir), "--target",
               "triton", "--repo", str(repository), "--engines", str(engines), "--precision", "fp32"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the Triton export failed (exit {done.returncode}): {done.stderr.strip()[-1000:]}")
    (folder,) = [p for p in repository.iterdir() if (p / "config.pbtxt").is_file()]
    parsed = text_format.Parse((folder / "config.pbtxt").read_text(), tc.ModelConfig())
    return Export(repository, engines, folder.name, parsed)


def server_metrics(url: str, model: str) -> dict[str, float]:
    """Triton's counters for ``model`` (summed over versions and failure reasons), by our short names."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = defaultdict(float)
    for name, labels, value in _METRIC.findall(text):
        if f'model="{model}"' in labels:
            found[name] += float(value)
    return {short: found[name] for short, name in _SERVER_METRICS.items()}


def tree_cpu_s(pid: int | None) -> float:
    """User and system CPU seconds of a process and its descendants still running (Triton and its backend stubs)."""
    if pid is None:
        return 0.0
    ticks = 0
    for member in process_tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# --- serialization, timed in-process ------------------------------------------------------------------------


def serialization_ms(config: tc.ModelConfig, batch: int, heatmap: bool) -> float:
    """Building one request of ``batch`` rows as the triton backend does (raw contents) and serializing it, then
    parsing a response of the same shapes and reading its tensors: the client's own work per call, in ms."""
    rng = np.random.default_rng(0)
    (tensor,) = config.input
    kind, dtype = _DTYPES[tensor.data_type]
    rows = rng.random((batch, *tensor.dims), dtype=np.float32).astype(dtype)
    outputs = list(config.output) if heatmap else list(config.output)[:1]  # the scores first, as the backend asks
    answer = v2.ModelInferResponse(model_name=config.name, model_version="1")
    for output in outputs:
        out_kind, out_dtype = _DTYPES[output.data_type]
        meta = answer.outputs.add(name=output.name, datatype=out_kind)
        meta.shape.extend([batch, *output.dims])
        values = rng.random((batch, *output.dims), dtype=np.float32).astype(out_dtype)
        answer.raw_output_contents.append(values.tobytes())
    wire = answer.SerializeToString()

    def once() -> None:
        request = v2.ModelInferRequest(model_name=config.name)
        sent = request.inputs.add(name=tensor.name, datatype=kind)
        sent.shape.extend(rows.shape)
        request.raw_input_contents.append(rows.tobytes())
        for output in outputs:
            request.outputs.add().name = output.name
        request.SerializeToString()
        response = v2.ModelInferResponse.FromString(wire)
        for meta, raw in zip(response.outputs, response.raw_output_contents, strict=True):
            np.frombuffer(raw, dtype=_V2_DTYPES[meta.datatype]).reshape(tuple(meta.shape)).astype(np.float32)

    once()
    runs, started = 0, time.perf_counter()
    while runs < 20 or time.perf_counter() - started < SERIALIZE_MIN_S:
        once()
        runs += 1
    return (time.perf_counter() - started) * 1e3 / runs


# --- one configuration: its appliances' bursts at once -------------------------------------------------------


def _start_all(daemons: Sequence[BenchDaemon]) -> None:
    with ThreadPoolExecutor(len(daemons)) as pool:
        list(pool.map(lambda d: d.start(), daemons))


def burst(
    daemons: Sequence[BenchDaemon],
    warm: Path,
    idle: Sequence[Path],
    files: Sequence[Path],
    server: Triton | None,
    model: str,
) -> dict[str, Any]:
    """Each appliance (started) scores one warm image, then (where one alone) the idle singles, then all score
    their bursts of ``files`` at once. Figures over every appliance's burst; the server's where one is used."""
    for daemon in daemons:  # its decode workers and its backend (the server's channel) warm
        daemon.publish(daemon.stage(warm, warm.name))
        daemon.wait_for(1, RESULTS_WAIT_S)
    idle_ms = []
    for path in idle if len(daemons) == 1 else ():
        daemon = daemons[0]
        expected = len(daemon.arrivals) + 1
        closed = daemon.publish(daemon.stage(path, path.name))
        daemon.wait_for(expected, RESULTS_WAIT_S)
        idle_ms.append((daemon.arrivals[-1].at - closed) * 1e3)
        time.sleep(IDLE_GAP_S)
    offsets = [len(d.arrivals) for d in daemons]
    staged = [[d.stage(path, path.name) for path in files] for d in daemons]
    before = server_metrics(server.metrics_url, model) if server else {}
    shim_before = len(server.batch_sizes()) if server else 0
    cpu_before = [d.cpu_seconds() for d in daemons], tree_cpu_s(server.pid if server else None)
    closes: list[dict[str, float]] = [{} for _ in daemons]
    first = time.time()
    for i in range(len(files)):  # interleaved: every appliance's burst starts at once
        for d, daemon in enumerate(daemons):
            closes[d][staged[d][i].name] = daemon.publish(staged[d][i])
    for daemon, offset in zip(daemons, offsets, strict=True):
        daemon.wait_for(offset + len(files), RESULTS_WAIT_S)
    appliance_cpu = sum(d.cpu_seconds() for d in daemons) - sum(cpu_before[0])
    server_cpu = tree_cpu_s(server.pid if server else None) - cpu_before[1]
    arrivals = [(a, closes[d]) for d, daemon in enumerate(daemons) for a in daemon.arrivals[offsets[d] :]]
    results = [a.result for a, _ in arrivals]
    images = len(results)
    scored = [r for r in results if not r.rejection.code]
    batches = sum(1 / max(r.timings.batch_size, 1) for r in scored)  # each batch's members share its timings
    sizes = Counter(r.timings.batch_size for r in scored)
    figures: dict[str, Any] = {
        "appliances": len(daemons),
        "images": images,
        "rejected": images - len(scored),
        "backends": dict(Counter(r.backend for r in scored)),  # triton, or the local fallback's name
        "img_s": images / (max(a.at for a, _ in arrivals) - first),
        "latency_burst_ms": percentiles([(a.at - close[a.file_name]) * 1e3 for a, close in arrivals]),
        "latency_idle_ms": percentiles(idle_ms) if idle_ms else None,
        "batches": batches,
        "batch_mean": len(scored) / max(batches, 1e-9),
        "batch_sizes": {int(b): round(n / b) for b, n in sorted(sizes.items())},
        "call_ms_per_batch": sum(r.timings.infer_ms / max(r.timings.batch_size, 1) for r in scored) / max(batches, 1),
        "appliance_cpu_ms_per_image": appliance_cpu * 1e3 / images,
        "server_cpu_ms_per_image": server_cpu * 1e3 / images,
    }
    if server is not None:
        after = server_metrics(server.metrics_url, model)
        delta = {k: after[k] - before[k] for k in after}
        requests = max(delta["requests"], 1.0)
        executed = server.batch_sizes()[shim_before:]
        figures["server"] = {
            **{k: delta[k] for k in ("requests", "failures", "rows", "executions")},
            **{f"{k[:-3]}_ms_per_request": delta[k] / requests / 1e3 for k in _SERVER_METRICS if k.endswith("_us")},
            "rows_per_execution": delta["rows"] / max(delta["executions"], 1.0),
            "batch_sizes": dict(sorted(Counter(executed).items())),
        }
    return figures


def _stop_all(daemons: Sequence[BenchDaemon]) -> None:
    for daemon in daemons:
        daemon.stop()


# --- the workload ---------------------------------------------------------------------------------------------


def measure(
    work: Path, model_dir: Path, config: Path, count: int, idle: int, max_delay_ms: float, heatmaps: bool
) -> dict[str, Any]:
    """{"triton": figures}, or {"triton": {"skipped": why}} where the Triton peer is not installed."""
    absent = triton_missing()
    if absent:  # the report's one line says it
        return {"triton": {"skipped": absent}}
    print("triton: exporting the model (FP32) with `python -m build_engine --target triton` ...", flush=True)
    exported = export(model_dir, config, work / "export")
    paths = write_images(work / "inputs", 1 + idle + count)
    warm, idle_paths, files = paths[0], paths[1 : 1 + idle], paths[1 + idle :]

    def appliance(name: str, backend: str, endpoints: tuple[str, ...] = ()) -> BenchDaemon:
        return BenchDaemon(root=work / name, model=model_dir, engines=exported.engines, max_delay_ms=max_delay_ms,
                            backend=backend, heatmaps=heatmaps, endpoints=endpoints)  # fmt: skip

    runs: dict[str, dict[str, Any]] = {}
    with Triton(exported.repository, [exported.name], root=work / "triton") as server:
        version = str(server.get("/v2").get("version", "?"))
        local = [appliance("local", "onnxruntime")]
        print(f"triton: the local backend: one appliance, {count} images ...", flush=True)
        _start_all(local)
        try:
            runs["local"] = burst(local, warm, idle_paths, files, None, exported.name)
        finally:
            _stop_all(local)
        for n in APPLIANCES:
            daemons = [appliance(f"triton-{n}-{i}", "triton", (server.grpc_address,)) for i in range(n)]
            print(f"triton: {n} appliance{'s' if n > 1 else ''} -> Triton, {count} images each at once ...", flush=True)
            try:
                _start_all(daemons)
                runs[f"triton_{n}"] = burst(daemons, warm, idle_paths, files, server, exported.name)
            finally:
                _stop_all(daemons)
    heatmap = heatmaps and len(exported.config.output) > 1
    for run in runs.values():  # the client's own work per call, on each run's batch sizes
        sizes = run["batch_sizes"]
        per = {b: serialization_ms(exported.config, b, heatmap) for b in sizes}
        run["serialization_ms_per_batch"] = sum(per[b] * n for b, n in sizes.items()) / max(sum(sizes.values()), 1)
        if "server" in run:
            s = run["server"]
            run["round_trip_ms_per_batch"] = (
                run["call_ms_per_batch"] - run["serialization_ms_per_batch"] - s["request_ms_per_request"]
            )
    base = runs["local"]
    for run in runs.values():
        run["ratio_img_s"] = run["img_s"] / base["img_s"]
        run["ratio_p50"] = run["latency_burst_ms"]["p50"] / base["latency_burst_ms"]["p50"]
        run["ratio_p99"] = run["latency_burst_ms"]["p99"] / base["latency_burst_ms"]["p99"]
    delay = exported.config.dynamic_batching.max_queue_delay_microseconds / 1e3
    return {
        "triton": {
            "server": f"Triton {version} (the test peer's), its python backend running ONNX Runtime on the CPU",
            "model": exported.name,
            "precision": "fp32",
            "max_batch": exported.config.max_batch_size,
            "queue_delay_ms": delay,
            "image_side": SIZE,
            "images_per_appliance": count,
            "runs": runs,
        }
    }


# --- the report ------------------------------------------------------------------------------------------------


def _sizes(sizes: dict[int, int]) -> str:
    return " ".join(f"{b}x{n}" for b, n in sizes.items()) or "none"


def text(f: dict[str, Any]) -> str:
    t = f["triton"]
    if "skipped" in t:
        return f"workload triton: skipped: {t['skipped']}"
    runs = t["runs"]
    local = runs["local"]
    lines = [
        f"workload triton: {t['model']} {t['precision']}, {t['images_per_appliance']} images ({t['image_side']}x"
        f"{t['image_side']} 16-bit PNG) per appliance, by its watch folder, {f['cpus']} CPUs",
        f"  the server: {t['server']}",
        f"    max batch {t['max_batch']}, dynamic batching within {t['queue_delay_ms']:g} ms (the export's, from "
        "inference.max_delay_ms)",
        f"  every process (the appliances, their decode workers, Triton) shares this box's {f['cpus']} CPUs;",
        "    a real deployment has the server on a machine of its own",
        "  ratios to the local run      img/s  ratio   burst p50 ms  ratio    p99 ms  ratio   idle p50 ms",
    ]
    names = {"local": "1 appliance, local"} | {f"triton_{n}": f"{n} appliance{'s' if n > 1 else ''} -> Triton"
                                               for n in APPLIANCES}  # fmt: skip
    for key, run in runs.items():
        lat, idle = run["latency_burst_ms"], run["latency_idle_ms"]
        lines.append(
            f"    {names.get(key, key):<24} {run['img_s']:7.1f}  {run['ratio_img_s']:5.2f}   {lat['p50']:12.1f}  "
            f"{run['ratio_p50']:5.2f}  {lat['p99']:8.1f}  {run['ratio_p99']:5.2f}   "
            + (f"{idle['p50']:11.1f}" if idle else f"{'-':>11}")
        )
    lines += [
        "  per batch (ms): the call as the appliance timed it = serialization (timed here) + the round trip",
        "    + the server's own (its queue + compute input/infer/output, from Triton's metrics)",
    ]
    for key, run in runs.items():
        call = run["call_ms_per_batch"]
        head = f"    {names.get(key, key):<24} {run['batch_mean']:4.1f} rows  call {call:6.2f}"
        if "server" not in run:
            lines.append(f"{head}  (in-process ONNX Runtime)")
            continue
        s = run["server"]
        lines.append(
            f"{head} ({call / local['call_ms_per_batch']:.1f}x local's) = {run['serialization_ms_per_batch']:.3f} + "
            f"{run['round_trip_ms_per_batch']:.2f} + {s['request_ms_per_request']:.2f} ({s['queue_ms_per_request']:.2f}"
            f" + {s['input_ms_per_request']:.2f}/{s['infer_ms_per_request']:.2f}/{s['output_ms_per_request']:.2f})"
        )
    lines.append("  batches: the appliances' (requests to the server), and those Triton formed of them")
    for key, run in runs.items():
        line = f"    {names.get(key, key):<24} appliances {_sizes(run['batch_sizes'])}"
        if "server" in run:
            s = run["server"]
            line += (
                f"\n    {'':<24} Triton     {_sizes(s['batch_sizes'])}  ({s['requests']:.0f} requests, "
                f"{s['executions']:.0f} executions, {s['rows_per_execution']:.1f} rows each, "
                f"{s['failures']:.0f} failed)"
            )
        lines.append(line)
    lines.append("  CPU per image (ms)           appliances   server")
    for key, run in runs.items():
        cpu = f"{run['appliance_cpu_ms_per_image']:8.1f} {run['server_cpu_ms_per_image']:8.1f}"
        lines.append(f"    {names.get(key, key):<24} {cpu}")
    for key, run in runs.items():
        off = {b: n for b, n in run["backends"].items() if b != ("onnxruntime" if key == "local" else "triton")}
        if off or run["rejected"]:
            lines.append(
                f"  note: {names.get(key, key)}: {run['rejected']} rejected, scored elsewhere: {off or 'none'}"
            )
    return "\n".join(lines)
