"""Forward latency and peak memory of the teachers and their students, with ratios to the teacher.

Each comparison is TEACHER:STUDENT (default: AirNet vs Half-AirNet, Restormer-24 vs Restormer-12, which is
the paper's Table 5 pair, and full Restormer vs Restormer-24); a bare NAME is measured alone (its own
reference). Every (network, size) is measured in a fresh child process so that its peak memory is its own:
  latency  median of --repeats forward passes after --warmup untimed ones (`distill.inference.restore`,
           i.e. each network's official pad/crop policy, no_grad, batch --batch);
  memory   CUDA: torch.cuda.max_memory_allocated (weights + input + activations);
           CPU: growth of the process's peak RSS (VmHWM, bench/cpu_memory.py) from just before the network is
           built to after the last pass, so it also counts allocator slack (an upper bound).
Sizes are WIDTHxHEIGHT (480x320 is a landscape Rain100L image). Prints a markdown table; --json-out writes
every measurement.

CPU (about 6 minutes on the shared 2-core machine; AirNet's deformable convs dominate):
    python bench/models.py --device cpu --threads 1
GPU (about 2 minutes, mostly process start-up):
    python bench/models.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cpu_memory import PeakMeter
from results import write_json

DEFAULT_ARCHS = "airnet:half-airnet,restormer-24:restormer-12,restormer:restormer-24"
DEFAULT_SIZES = "256x256,480x320"
DTYPES = ("float32", "float16", "bfloat16")
_RESULT_TAG = "D4IR_BENCH_RESULT "  # the child's result line on stdout


def parse_size(text: str) -> tuple[int, int]:
    """'480x320' -> (width 480, height 320)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 480x320; got {text!r}") from None
    if w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small (each side >= 8)")
    return w, h


def parse_comparisons(text: str) -> list[tuple[str, str | None]]:
    """'airnet:half-airnet,restormer' -> [("airnet", "half-airnet"), ("restormer", None)], names checked."""
    from d4ir.distill.registry import ARCHITECTURES

    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        teacher, _, student = item.partition(":")
        for name in (teacher, student):
            if name and name not in ARCHITECTURES:
                raise argparse.ArgumentTypeError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
        out.append((teacher, student or None))
    if not out:
        raise argparse.ArgumentTypeError("--archs names no architecture")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated WIDTHxHEIGHT list")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per measurement (default: 1 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed passes first (default: 0 CPU, 3 GPU)")
    p.add_argument("--archs", default=DEFAULT_ARCHS,
                   help="comma-separated TEACHER:STUDENT comparisons or bare NAMEs (registry names, `d4ir models`)")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU (default: torch's)")
    p.add_argument("--json-out", default=None, help="write every measurement here as JSON")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    args = p.parse_args(argv)
    if args.child is None:
        try:
            args.comparisons = parse_comparisons(args.archs)
            args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        except argparse.ArgumentTypeError as err:
            p.error(str(err))
        if not args.size_list:
            p.error("--sizes names no size")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if (args.warmup is not None and args.warmup < 0) or args.batch < 1:
        p.error("--warmup must be >= 0 and --batch >= 1")
    return args


def measure(spec: dict) -> dict:
    """One (network, size) measurement in this process: {latency_ms, latencies_ms, peak_mem_mib, params}.

    Args:
        spec: {"arch", "width", "height", "device", "dtype", "batch", "repeats", "warmup", "threads"}.
    """
    import torch
    from d4ir.distill.inference import restore
    from d4ir.distill.registry import build, count_parameters

    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        meter = PeakMeter()
    torch.manual_seed(0)
    model = build(spec["arch"]).to(device=device, dtype=dtype).eval()
    x = torch.rand(spec["batch"], 3, spec["height"], spec["width"], device=device, dtype=dtype)  # [B,3,H,W]
    times = []
    for i in range(spec["warmup"] + spec["repeats"]):
        sync()
        t0 = time.perf_counter()
        restore(model, x, clamp=False)
        sync()
        if i >= spec["warmup"]:
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak_mib = meter.peak_mib()
    return {"latency_ms": statistics.median(times), "latencies_ms": times, "peak_mem_mib": peak_mib,
            "params": count_parameters(model)}


def run_child(spec: dict) -> dict:
    """Run `measure(spec)` in a fresh interpreter (its own peak RSS / CUDA context); errors are raised."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"measuring {spec['arch']} at {spec['width']}x{spec['height']} failed "
                           f"(exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1][len(_RESULT_TAG):])


def _ratio(r: dict, t: dict, key: str) -> str:
    return f"{r[key] / t[key]:.2f}" if key in r and t.get(key, 0) > 0 else "-"


def format_table(rows: list[dict]) -> str:
    """Markdown: one row per (comparison, network, size); ratios are network / its teacher; a network whose
    measurement failed shows "failed" (its error is in the JSON)."""
    head = ("| size (WxH) | teacher | network | params (M) | latency (ms) | peak mem (MiB) "
            "| params ratio | latency ratio | memory ratio |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        t = r["teacher_result"]
        values = (f"{r['params'] / 1e6:.2f} | {r['latency_ms']:.1f} | {r['peak_mem_mib']:.0f}" if "error" not in r
                  else "failed | failed | failed")
        lines.append(
            f"| {r['width']}x{r['height']} | {r['teacher']} | {r['arch']} | {values} | {_ratio(r, t, 'params')} "
            f"| {_ratio(r, t, 'latency_ms')} | {_ratio(r, t, 'peak_mem_mib')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child is not None:  # a measurement process started by run_child
        print(_RESULT_TAG + json.dumps(measure(json.loads(args.child))), flush=True)
        return {}
    import torch
    from d4ir.synth.sd import default_device

    device = default_device(args.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    # CPU default: one timed pass, no warm-up (AirNet's deformable convs take minutes per 480x320 image there)
    repeats = args.repeats or (20 if device.startswith("cuda") else 1)
    warmup = args.warmup if args.warmup is not None else (3 if device.startswith("cuda") else 0)
    names = list(dict.fromkeys(n for pair in args.comparisons for n in pair if n))  # each measured once per size
    measured: dict[tuple[str, int, int], dict] = {}
    for w, h in args.size_list:
        for name in names:
            spec = {"arch": name, "width": w, "height": h, "device": device, "dtype": args.dtype,
                    "batch": args.batch, "repeats": repeats, "warmup": warmup, "threads": args.threads}
            t0 = time.perf_counter()
            try:
                measured[(name, w, h)] = run_child(spec)
                done = f"{measured[(name, w, h)]['latency_ms']:.1f} ms"
            except RuntimeError as err:  # e.g. no bfloat16 deformable conv: keep measuring the others
                measured[(name, w, h)], done = {"error": str(err)}, f"FAILED: {err}"
            print(f"  {name} {w}x{h}: {done} ({time.perf_counter() - t0:.1f} s with start-up)", file=sys.stderr,
                  flush=True)
    rows = []
    for w, h in args.size_list:
        for teacher, student in args.comparisons:
            for name in (teacher, student) if student else (teacher,):
                rows.append({"teacher": teacher, "arch": name, "role": "teacher" if name == teacher else "student",
                             "width": w, "height": h, **measured[(name, w, h)],
                             "teacher_result": measured[(teacher, w, h)]})
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    env = {"device": device, "device_name": gpu or platform.processor() or platform.machine(),
           "torch": torch.__version__, "dtype": args.dtype, "batch": args.batch, "repeats": repeats,
           "warmup": warmup, "threads": args.threads or torch.get_num_threads(),
           "memory": "torch.cuda.max_memory_allocated" if gpu else "peak RSS growth (VmHWM)"}
    print(f"{env['device_name']} ({device}), {args.dtype}, batch {args.batch}, median of {repeats} after "
          f"{warmup} warm-up, memory = {env['memory']}")
    print(format_table(rows), flush=True)
    result = {"env": env, "rows": [{k: v for k, v in r.items() if k != "teacher_result"} for r in rows]}
    write_json(args.json_out, result)
    return result


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main().get("rows", [])) else 0)
