"""Teacher vs student on the CPU, exported to ONNX: onnxruntime and PyTorch side by side, plus dynamic INT8.

Pairs (TEACHER:STUDENT): airnet -> half-airnet and restormer-24 -> restormer-12, random-init weights (fine
for latency and memory). Every (framework, network, size, threads) runs in a fresh child process:
  latency  median of --reps batch-1 forward passes after --warmup untimed ones at the same size (PyTorch:
           no_grad, AirNet's deformable convs on distill.deform's "auto"; onnxruntime: CPUExecutionProvider,
           intra-op threads = threads, distill.export's default export, DeformConv nodes for AirNet; the
           "ort-gridsample" rows, AirNet pair at --gridsample-size and 1 thread only, use its GridSample export);
  memory   growth of the process's peak RSS (VmHWM, bench/cpu_memory.py) over its RSS just before the network or
           session is built to after the last pass (so weights count, and allocator slack: an upper bound).
Sizes are WIDTHxHEIGHT, multiples of 16 so no size policy applies. Ratios are student / teacher for the same
framework, size and threads.

INT8 row: a Half-AirNet trained briefly (`distill.teacher.train_supervised`, --train-steps steps of
--train-batch random --train-crop crops of Rain100L test pairs 1-50), exported, quantized with
`distill.export.quantize_dynamic_int8`, and run by onnxruntime in fp32 and INT8 on the first --eval-images of
pairs 51-100 at full size: PSNR (RGB) of each against the ground truth and of INT8 against fp32, and the INT8
file size and latency (onnxruntime, 1 thread, first size) against fp32.

CPU (the shared 2-core machine, about 15 minutes: AirNet at 480x320 takes most of it):
    python bench/export.py --threads 1,2 --json-out /tmp/bench_export.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cpu_memory import PeakMeter
from results import write_json

_HERE = Path(__file__).resolve().parent

_TAG = "D4IR_BENCH_EXPORT "
PAIRS = (("airnet", "half-airnet"), ("restormer-24", "restormer-12"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="480x320,256x256", help="comma-separated WIDTHxHEIGHT (multiples of 16)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--frameworks", default="ort,torch")
    p.add_argument("--gridsample-size", default="256x256", help="AirNet's GridSample export is timed here ('' skips)")
    p.add_argument("--data", type=Path, default=_HERE.parents[1] / "shared" / "data" / "rain100l_test")
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-crop", type=int, default=32)
    p.add_argument("--eval-images", type=int, default=4)
    p.add_argument("--skip-int8", action="store_true")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(spec: dict) -> dict:
    """One (framework, network, size, threads): median latency (ms) and peak RSS growth (MiB)."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    meter = PeakMeter()  # from the current RSS, not the import-time peak
    x = np.random.default_rng(0).random((1, 3, spec["height"], spec["width"]), dtype=np.float32)
    if spec["framework"] == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = spec["threads"], 1
        session = ort.InferenceSession(spec["onnx"], opts, providers=["CPUExecutionProvider"])

        def run():
            session.run(None, {"degraded": x})
    else:
        from d4ir.distill.registry import build

        torch.manual_seed(0)
        model = build(spec["arch"]).eval()
        xt = torch.from_numpy(x)

        def run():
            with torch.no_grad():
                model(xt)
    times = []
    for i in range(spec["warmup"] + spec["reps"]):
        t0 = time.perf_counter()
        run()
        if i >= spec["warmup"]:
            times.append((time.perf_counter() - t0) * 1e3)
    peak = meter.peak_mib()
    return {"latency_ms": statistics.median(times), "latencies_ms": times, "peak_mib": peak}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_TAG)]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: " + " | ".join((proc.stderr or proc.stdout).splitlines()[-4:])}
    return json.loads(lines[-1][len(_TAG):])


def _split(data: Path, root: Path, numbers) -> Path:
    """A paired folder of symlinks to Rain100L pairs `numbers` (outside the repository)."""
    for side in ("degraded", "clean"):
        (root / side).mkdir(parents=True)
        for n in numbers:
            src = next((data / side).glob(f"{n}.*"))
            (root / side / src.name).symlink_to(src.resolve())
    return root


def int8_study(args, work: Path, sizes) -> dict:
    """Train a Half-AirNet briefly, export fp32 + INT8, score both with onnxruntime on held-out pairs."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from d4ir.distill.export import export_onnx, quantize_dynamic_int8
    from d4ir.distill.metrics import psnr
    from d4ir.distill.registry import load_model
    from d4ir.distill.teacher import SupervisedConfig, train_supervised
    from d4ir.shards.pairs import find_pairs

    train = _split(args.data, work / "pairs-1-50", range(1, 51))
    test = _split(args.data, work / "pairs-51-100", range(51, 51 + args.eval_images))
    cfg = SupervisedConfig(arch="half-airnet", epochs=1, iters_per_epoch=args.train_steps,
                           batch_size=args.train_batch, crop=args.train_crop, lr=1e-3)
    t0 = time.perf_counter()
    train_supervised(train, work / "student", cfg, name="student", progress=False)
    train_s = time.perf_counter() - t0
    model, _ = load_model(work / "student" / "student")
    fp32 = export_onnx(model, work / "student.onnx")
    int8 = quantize_dynamic_int8(fp32, work / "student-int8.onnx")
    sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in
                (("fp32", fp32), ("int8", int8))}
    scores = {"fp32_vs_gt": [], "int8_vs_gt": [], "int8_vs_fp32": [], "input_vs_gt": []}
    from PIL import Image

    def load(p):
        return torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None].float() / 255

    for pair in find_pairs(test):
        x, gt = load(pair.degraded), load(pair.clean)
        out = {k: torch.from_numpy(s.run(None, {"degraded": x.numpy()})[0]).clamp(0, 1) for k, s in sessions.items()}
        scores["fp32_vs_gt"].append(float(psnr(out["fp32"], gt)))
        scores["int8_vs_gt"].append(float(psnr(out["int8"], gt)))
        scores["int8_vs_fp32"].append(float(psnr(out["int8"], out["fp32"])))
        scores["input_vs_gt"].append(float(psnr(x, gt)))
    w, h = sizes[0]
    lat = {k: run_child({"framework": "ort", "onnx": str(p), "arch": "half-airnet", "width": w, "height": h,
                         "threads": 1, "reps": args.reps, "warmup": args.warmup}) for k, p in
           (("fp32", fp32), ("int8", int8))}
    return {"images": len(scores["fp32_vs_gt"]), "train_steps": args.train_steps, "train_s": train_s,
            "psnr": {k: statistics.mean(v) for k, v in scores.items()}, "psnr_per_image": scores,
            "bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}, "latency": lat,
            "latency_size": f"{w}x{h}"}


def _fmt_ratio(r, t, key):
    return f"{r[key] / t[key]:.2f}" if "error" not in r and "error" not in t and t.get(key) else "-"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child is not None:
        print(_TAG + json.dumps(measure(json.loads(args.child))), flush=True)
        return {}
    import torch
    from d4ir.distill.export import export_onnx
    from d4ir.distill.registry import build, count_parameters

    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    load_before, t_start = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        files, params = {}, {}
        for name in dict.fromkeys(n for pair in PAIRS for n in pair):
            torch.manual_seed(0)
            model = build(name)
            params[name] = count_parameters(model)
            files[name] = export_onnx(model, Path(tmp) / f"{name}.onnx")
            if name.endswith("airnet") and args.gridsample_size:
                files[f"{name}:gs"] = export_onnx(model, Path(tmp) / f"{name}-gs.onnx", deform_op="gridsample")
        plan = [((w, h), th, fw, pair) for w, h in sizes for th in threads for fw in args.frameworks.split(",")
                for pair in PAIRS]
        if args.gridsample_size:
            plan.append((tuple(int(v) for v in args.gridsample_size.split("x")), 1, "ort-gridsample", PAIRS[0]))
        rows = []
        for (w, h), th, fw, (teacher, student) in plan:
            for name in (teacher, student):
                onnx = files[f"{name}:gs" if fw == "ort-gridsample" else name]
                spec = {"framework": "torch" if fw == "torch" else "ort", "arch": name, "onnx": str(onnx),
                        "width": w, "height": h, "threads": th, "reps": args.reps, "warmup": args.warmup}
                t0 = time.perf_counter()
                res = run_child(spec)
                rows.append({**spec, **res, "framework": fw, "teacher": teacher, "params": params[name],
                             "onnx_bytes": onnx.stat().st_size})
                shown = res.get("error") or f"{res['latency_ms']:.0f} ms, peak {res['peak_mib']:.0f} MiB"
                print(f"  {fw} {name} {w}x{h} threads {th}: {shown} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        torch.set_num_threads(1)  # the INT8 study trains in this process: one thread (a busy 2-core box)
        int8 = None if args.skip_int8 else int8_study(args, Path(tmp), sizes)
    lines = ["| size | threads | framework | network | params (M) | ONNX (MB) | latency (ms) | peak (MiB) "
             "| params ratio | latency ratio | memory ratio |", "|" + "---|" * 11]
    for r in rows:
        t = next(q for q in rows if q["arch"] == r["teacher"] and all(q[k] == r[k] for k in
                                                                   ("framework", "width", "height", "threads")))
        vals = "failed | failed" if "error" in r else f"{r['latency_ms']:.0f} | {r['peak_mib']:.0f}"
        lines.append(f"| {r['width']}x{r['height']} | {r['threads']} | {r['framework']} | {r['arch']} | "
                     f"{r['params'] / 1e6:.2f} | {r['onnx_bytes'] / 1e6:.1f} | {vals} | "
                     f"{r['params'] / t['params']:.2f} | {_fmt_ratio(r, t, 'latency_ms')} | "
                     f"{_fmt_ratio(r, t, 'peak_mib')} |")
    if int8:
        p, lat = int8["psnr"], int8["latency"]
        file_ratio = int8["bytes"]["int8"] / int8["bytes"]["fp32"]
        lines += ["", "| half-airnet (trained briefly) | images | input PSNR | fp32 PSNR | int8 PSNR "
                  "| int8 vs fp32 PSNR | int8/fp32 file | int8/fp32 latency |", "|" + "---|" * 8,
                  f"| onnxruntime, {int8['latency_size']}, 1 thread | {int8['images']} | {p['input_vs_gt']:.2f} | "
                  f"{p['fp32_vs_gt']:.2f} | {p['int8_vs_gt']:.2f} | {p['int8_vs_fp32']:.2f} | {file_ratio:.2f} | "
                  f"{_fmt_ratio(lat['int8'], lat['fp32'], 'latency_ms')} |"]
    load = {"before": load_before, "after": os.getloadavg()}
    head = (f"{platform.processor() or platform.machine()} (CPU, {os.cpu_count()} cores), torch {torch.__version__}, "
            f"median of {args.reps} after {args.warmup} warm-up, memory = peak RSS growth (VmHWM); load average "
            f"{load_before[0]:.2f} before, {load['after'][0]:.2f} after; {time.perf_counter() - t_start:.0f} s")
    print(head + "\n" + "\n".join(lines), flush=True)
    result = {"env": {"header": head, "load_average": load}, "rows": rows, "int8": int8}
    write_json(args.json_out, result)
    return result


if __name__ == "__main__":
    main()
