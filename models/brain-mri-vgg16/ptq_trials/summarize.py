"""Print /work/ptq/out/gate-results.json (gate.py's record) as a Markdown table."""

import json
import sys
from pathlib import Path

path = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/ptq/out/gate-results.json")
rows = json.loads(path.read_text())
print(
    "| model | agreement | max abs diff | mean abs diff | AUC drop | heatmap peaks | gate | speed vs FP32 (img/s, batch 8) |"
)
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for name, r in rows.items():
    if "error" in r:
        print(f"| {name} | error: {r['error']} | | | | | | |")
        continue
    drops = [a["drop"] for a in r["auc"].values() if a["drop"] is not None]
    auc = f"{max(drops):+.4f}" if drops else "n/a (all notumor)"
    hm = r["images"] - r["heatmap_disagreements"]
    s = r["speed"]
    fp32 = "/".join(f"{x:.2f}" for x in s["fp32_img_s"])
    print(
        f"| {name} | {r['images'] - r['disagreements']}/{r['images']} | {r['max_abs_diff']:.4f} | "
        f"{r['mean_abs_diff']:.4f} | {auc} | {hm}/{r['images']} | {'PASS' if r['passed'] else 'fail'} | "
        f"{s['ratio']:.2f}x ({s['int8_img_s']:.2f} vs {fp32}) |"
    )
