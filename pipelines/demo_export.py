"""The demo's edge check: the teacher and the distilled student exported to ONNX and timed with onnxruntime.

For each model (label -> checkpoint) `export_and_time` writes RUN/export/LABEL.onnx with
`distill.export.export_model` (checked against PyTorch on bundled photos, largest difference <= 1e-4), then times
batch-1 onnxruntime passes at SIZE x SIZE on one thread (the device the student is made for has few cores) and
writes RUN/export/latency.json:

    {"size": S, "threads": 1, "reps": R,
     "models": {LABEL: {"checkpoint", "params", "onnx_bytes", "max_diff", "latencies_ms": [R], "median_ms"}},
     "student_vs_teacher": {"latency": median_s / median_t, "params": ..., "onnx_bytes": ...}}

Without the `export` extra (onnx, onnxruntime) nothing is written and the reason is returned, so the demo still
finishes; the report then says the row was not measured.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from d4ir.shards.io import atomic_write_json
from d4ir.shards.layout import RunLayout

LATENCY_FILE = "latency.json"


def export_and_time(
    layout: RunLayout, models: dict[str, Path], *, size: int = 256, reps: int = 5, threads: int = 1
) -> dict:
    """Export every model in `models` (label -> checkpoint; the labels "teacher" and "student" get the ratio
    row) and time it; returns latency.json's content, or {"skipped": reason} without onnxruntime."""
    from d4ir.distill.export import export_model, onnx_latency_ms

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        return {"skipped": f"the 'export' extra is not installed ({err})"}
    rows = {}
    for label, checkpoint in models.items():
        result = export_model(checkpoint, layout.export / f"{label}.onnx")
        times = onnx_latency_ms(result.path, size, size, threads=threads, reps=reps)
        rows[label] = {"checkpoint": str(checkpoint), "params": result.params, "onnx_bytes": result.bytes,
                       "max_diff": result.max_diff, "latencies_ms": times, "median_ms": statistics.median(times)}
    out = {"size": size, "threads": threads, "reps": reps, "models": rows}
    if {"teacher", "student"} <= rows.keys():
        t, s = rows["teacher"], rows["student"]
        out["student_vs_teacher"] = {"latency": s["median_ms"] / t["median_ms"], "params": s["params"] / t["params"],
                                     "onnx_bytes": s["onnx_bytes"] / t["onnx_bytes"]}
    atomic_write_json(layout.export / LATENCY_FILE, out)
    return out


def latency_lines(layout: RunLayout) -> list[str]:
    """The report's lines on RUN/export/latency.json (empty when the demo did not write it)."""
    path = layout.export / LATENCY_FILE
    if not path.is_file():
        return []
    import json

    data = json.loads(path.read_text())
    rows, ratio = data["models"], data.get("student_vs_teacher")
    lines = [f"Exported to ONNX and run by onnxruntime on the CPU (batch 1, {data['size']}x{data['size']}, "
             f"{data['threads']} thread, median of {data['reps']}; files in `export/`):", "",
             "| model | params (M) | ONNX (MB) | latency (ms) | largest difference from PyTorch |",
             "|---|---|---|---|---|"]
    for label, r in rows.items():
        diff = "-" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        lines.append(f"| {label} | {r['params'] / 1e6:.2f} | {r['onnx_bytes'] / 1e6:.1f} | {r['median_ms']:.0f} | "
                     f"{diff} |")
    if ratio:
        lines += ["", f"Student / teacher: latency {ratio['latency']:.2f}x, parameters {ratio['params']:.2f}x, "
                      f"file {ratio['onnx_bytes']:.2f}x."]
    return lines
