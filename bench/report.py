"""The bench's figures as text, JSON (for comparisons over time) and a PNG drawn with OpenCV."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench import heatmap_cost, profile


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def text(figures: dict[str, Any]) -> str:
    f = figures
    lines = [
        f"workload {f['workload']}: {f['count']} files, model {f['model']} on {f['backend']} "
        f"({f['artifact']}), {f['cpus']} CPUs",
        f"  raw backend            batch 1: {f['raw_batch1_img_s']:8.1f} img/s   batch {f['max_batch']}: "
        f"{f['raw_max_batch_img_s']:8.1f} img/s   (no I/O; mean of "
        + " and ".join(f"{v:.1f}" for v in f.get("raw_max_batch_before_after", []))
        + " before and after the burst)",
        f"  decode+preprocess      threads: {f['prepare_threads_files_s']:8.1f} files/s   processes: "
        f"{f['prepare_processes_files_s']:8.1f} files/s   (alone, whole host; processes: mean of "
        + " and ".join(f"{v:.1f}" for v in f.get("prepare_processes_before_after", []))
        + ")",
        f"  end to end (daemon)    {f['e2e_files_s']:8.1f} files/s   first drop to last result",
        f"  ratio e2e / raw backend (max batch)           {f['ratio_e2e_to_raw']:.2f}",
        f"  ratio e2e / slower stage ({f['slower_stage']}) {f['ratio_e2e_to_slower_stage']:.2f}",
        f"  hand-written loop      {f['naive_files_s']:8.1f} files/s   daemon speed-up {f['speedup_vs_naive']:.2f}x"
        "   (mean of " + " and ".join(f"{v:.2f}" for v in f.get("naive_before_after", [])) + ")",
        "  latency close->stream  idle   p50 {p50:7.1f}  p95 {p95:7.1f}  p99 {p99:7.1f} ms".format(
            **f["latency_idle_ms"]
        ),
        "                         burst  p50 {p50:7.1f}  p95 {p95:7.1f}  p99 {p99:7.1f} ms".format(
            **f["latency_burst_ms"]
        ),
        f"  idle p50 budget        raw batch-1 inference {f['single_infer_ms']:.1f} + read+decode "
        f"{f['single_decode_ms']:.1f} + 5 ms = {f['latency_budget_ms']:.1f} ms",
        "  host time per file     " + "  ".join(f"{k} {v:.0%}" for k, v in f["stage_shares"].items()),
        f"  CPU per file           {f['daemon_cpu_ms_per_file']:.1f} ms   (daemon and decode workers, burst)",
        f"  peak RSS              {f['peak_rss_mb']:.0f} MiB   (daemon and decode workers, sum of each one's peak)",
    ]
    if "shrink_first_error" in f:
        e = f["shrink_first_error"]
        lines.append(
            f"  shrink-first vs full-res float: max |diff| {e['max_abs']:.4f}, mean {e['mean_abs']:.5f} "
            f"(display units 0..1, on {e['images']} images)"
        )
    if "profile" in f:
        lines.append(profile.text(f["profile"]))
    return "\n".join(lines + heatmap_cost.text(f) + cstore_text(f))


def cstore_text(f: dict[str, Any]) -> list[str]:
    """The C-STORE runs (bench/cstore.py), each against the run before it in this same bench."""
    if "cstore" not in f:
        return []
    c = f["cstore"]
    if "skipped" in c:
        return [f"  C-STORE                skipped: {c['skipped']}"]
    lines = [
        f"  C-STORE (DCMTK storescu on this host -> the DICOM receiver, one association, the same {f['count']} files)",
        f"    end to end           {c['e2e_files_s']:8.1f} files/s   ratio to the folder's e2e "
        f"{c['ratio_e2e_to_folder']:.2f}   (storescu's start to the last result)",
        f"    latency              first file sent to last result {c['latency_s']:.2f} s; storescu had every "
        f"acknowledgement after {c['storescu_s']:.2f} s",
        f"                         ratio {c['ratio_storescu_to_latency']:.2f} (the scanner's wait / the whole)",
        f"    CPU per file         {c['daemon_cpu_ms_per_file']:.1f} ms   ratio to the folder's "
        f"{c['ratio_cpu_to_folder']:.2f}",
    ]
    if "cstore_pacs" in f:
        p = f["cstore_pacs"]
        after = p["last_report_after_last_result_s"]
        lines += [
            "  C-STORE with [pacs] on: the same burst, each scored image's Enhanced SR (and heatmap overlay, where the",
            "    model has one) made on the finisher thread and sent by the outbox to a stand-in PACS (a pynetdicom",
            "    Storage SCP in the bench that keeps nothing)",
            f"    end to end           {p['e2e_files_s']:8.1f} files/s   ratio to C-STORE without PACS "
            f"{p['ratio_e2e_to_cstore']:.2f}",
            f"    CPU per file         {p['daemon_cpu_ms_per_file']:.1f} ms   ratio to C-STORE without PACS "
            f"{p['ratio_cpu_to_cstore']:.2f}",
            f"    objects delivered    {p['reports_received']} of {p['reports_expected']}"
            + (f", the last {after:.2f} s after the last result" if after is not None else ""),
        ]
    return lines


def write_json(path: Path, figures: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def write_png(path: Path, figures: dict[str, Any]) -> None:
    """Latency percentiles (idle, burst) as bars, and the stage shares as one stacked bar."""
    width, height = 900, 420
    img = np.full((height, width, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    title = f"{figures['workload']}: {figures['e2e_files_s']:.1f} files/s end to end"
    cv2.putText(img, title, (20, 30), font, 0.7, (0, 0, 0), 2)
    groups = [("idle", figures["latency_idle_ms"]), ("burst", figures["latency_burst_ms"])]
    top = max(max(g.values()) for _, g in groups) or 1.0
    colours = {"p50": (180, 120, 40), "p95": (40, 140, 220), "p99": (40, 40, 200)}
    x = 40
    base = 360
    for name, values in groups:
        for key, value in values.items():
            h = int(260 * value / top)
            cv2.rectangle(img, (x, base - h), (x + 40, base), colours[key], -1)
            cv2.putText(img, f"{value:.0f}", (x, base - h - 5), font, 0.4, (0, 0, 0), 1)
            cv2.putText(img, key, (x + 5, base + 18), font, 0.45, (0, 0, 0), 1)
            x += 50
        cv2.putText(img, f"{name} latency (ms)", (x - 150, base + 40), font, 0.5, (0, 0, 0), 1)
        x += 40
    # Stage shares: one stacked horizontal bar on the right.
    shares = figures["stage_shares"]
    palette = [(90, 180, 90), (200, 160, 60), (60, 90, 200), (160, 160, 160)]
    left, bar_top, bar_width = 520, 80, 340
    cv2.putText(img, "share of host time per file", (left, bar_top - 15), font, 0.5, (0, 0, 0), 1)
    offset = left
    for i, (name, share) in enumerate(shares.items()):
        w = int(bar_width * share)
        cv2.rectangle(img, (offset, bar_top), (offset + w, bar_top + 40), palette[i % len(palette)], -1)
        offset += w
        cv2.rectangle(img, (left, bar_top + 60 + 25 * i), (left + 15, bar_top + 75 + 25 * i), palette[i % 4], -1)
        cv2.putText(img, f"{name} {share:.0%}", (left + 25, bar_top + 73 + 25 * i), font, 0.5, (0, 0, 0), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
