"""AirNet's deformable convolution: torchvision's deform_conv2d vs distill.deform's "gather" and "sample"
formulations, side by side in one run, on the op and on the whole AirNet KD step.

* op: one modulated deformable conv 3x3 at AirNet's shapes (C_in = C_out = 64 and 32, SIZE x SIZE, batch
  --op-batch), random offsets of std 1 px and sigmoid-like masks: no-grad forward (the teacher's case) and
  forward + backward (the student's), median of --reps after an untimed call on a 16x16 input.
* kd: the trainer's plain KD step (distill.losses.kd_loss, l2): AirNet teacher (n_feats 64) forward without
  grad + Half-AirNet student forward and backward + Adam, SIZE x SIZE crops, batch --kd-batch, after one
  untimed step on 32x32 crops. Both networks are random-init with their offset/mask convs drawn at std 0.02
  (the official zero init would put every tap on an integer; trained offsets are fractional).
Every (measurement, implementation, threads) runs in a fresh child process, implementations interleaved, so
its peak memory is its own: CUDA torch.cuda.max_memory_allocated; CPU the growth of the process's peak RSS
(VmHWM, bench/cpu_memory.py) over its RSS just before the timed calls (inputs, weights and optimizer state already
allocated), which counts allocator slack too. Ratios are implementation / torchvision. "auto" is measured on
the op only; its per-shape choices are printed. --profile (CUDA) adds a torch.profiler top-kernel table of one
KD step per implementation. Prints markdown tables; --json-out writes everything.

CPU (about 12 minutes on the shared 2-core machine; torchvision's KD steps take most of it):
    python bench/deform.py --device cpu --threads 1,2 --json-out /tmp/bench_deform_cpu.json
GPU:
    python bench/deform.py --device cuda --op-batch 8 --kd-batch 8 --reps 10 --profile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cpu_memory import PeakMeter
from results import write_json

_TAG = "D4IR_BENCH_DEFORM "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch intra-op thread counts (CPU)")
    p.add_argument("--size", type=int, default=256, help="square crop side")
    p.add_argument("--op-batch", type=int, default=1)
    p.add_argument("--kd-batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default: 2 op / 1 kd "
                   "on the CPU, 10 on CUDA)")
    p.add_argument("--op-impls", default="torchvision,gather,sample,auto")
    p.add_argument("--kd-impls", default="torchvision,gather,sample")
    p.add_argument("--channels", default="64,32", help="op widths")
    p.add_argument("--skip", choices=("op", "kd"), default=None, help="leave one measurement out")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto: on CUDA)")
    p.add_argument("--profile", action="store_true", help="CUDA: top kernels of one KD step per implementation")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class _Meter:
    """Peak memory growth over the state at construction: CUDA allocator peak, or the CPU peak RSS."""

    def __init__(self, device):
        import torch

        self.cuda, self.device = device.type == "cuda", device
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            self.cpu = PeakMeter()

    def peak_mib(self) -> float:
        import torch

        if self.cuda:
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        return self.cpu.peak_mib()


def _timer(device):
    import torch

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def measure_op(spec: dict) -> dict:
    """One op measurement: no-grad forward and forward + backward seconds, peak memory of the latter."""
    import torch
    from d4ir.distill import deform

    device = torch.device(spec["device"])
    g = torch.Generator().manual_seed(0)
    b, c, s = spec["batch"], spec["channels"], spec["size"]

    def inputs(side: int):
        x = torch.randn(b, c, side, side, generator=g)
        off = torch.randn(b, 18, side, side, generator=g)  # std 1 px: fractional, some taps outside the image
        w = torch.randn(c, c, 3, 3, generator=g) / (3 * c**0.5)
        m = torch.rand(b, 9, side, side, generator=g)
        return [t.to(device) for t in (x, off, w, m)]

    impl, now = spec["impl"], _timer(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["amp"]):
        warm = [t.requires_grad_() for t in inputs(16)]
        deform.deform_conv3x3(*warm, impl=impl).sum().backward()
        tensors = inputs(s)
        if impl == "auto":  # let auto measure this shape (forward-only and with gradients) before timing
            with torch.no_grad():
                deform.deform_conv3x3(*tensors, impl=impl)
            warm = [t.detach().requires_grad_() for t in tensors]
            deform.deform_conv3x3(*warm, impl=impl).sum().backward()
        fwd = []
        for _ in range(spec["reps"]):
            t0 = now()
            with torch.no_grad():
                deform.deform_conv3x3(*tensors, impl=impl)
            fwd.append(now() - t0)
        leaves = [t.requires_grad_() for t in tensors]
        meter, both = _Meter(device), []
        for _ in range(spec["reps"]):
            t0 = now()
            out = deform.deform_conv3x3(*leaves, impl=impl)
            out.backward(torch.ones_like(out))
            both.append(now() - t0)
            del out
    return {"fwd_s": statistics.median(fwd), "fwd_bwd_s": statistics.median(both), "fwd_bwd_all_s": both,
            "peak_mib": meter.peak_mib(), "auto": deform.auto_choices() if impl == "auto" else None}


def measure_kd(spec: dict) -> dict:
    """The whole KD step: teacher AirNet forward (no grad), Half-AirNet forward + backward, Adam."""
    import torch
    from d4ir.distill.airnet import DCNLayer
    from d4ir.distill.losses import kd_loss
    from d4ir.distill.registry import build

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    teacher, student = build("airnet", deform=spec["impl"]), build("half-airnet", deform=spec["impl"])
    for net in (teacher, student):
        for m in net.modules():
            if isinstance(m, DCNLayer):
                torch.nn.init.normal_(m.conv_offset_mask.weight, std=0.02)
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = student.to(device).train()
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)

    def step(x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["amp"]):
            with torch.no_grad():
                target = teacher(x)
            loss = kd_loss(student(x), target, {"l2": 1.0})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    b, s, now = spec["batch"], spec["size"], _timer(device)
    step(torch.rand(b, 3, 32, 32, device=device))
    x = torch.rand(b, 3, s, s, device=device)
    meter, times = _Meter(device), []
    for _ in range(spec["reps"]):
        t0 = now()
        step(x)
        times.append(now() - t0)
    result = {"step_s": statistics.median(times), "step_all_s": times, "peak_mib": meter.peak_mib()}
    if spec.get("profile") and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(x)
            torch.cuda.synchronize(device)
        result["profile"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
    return result


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env_threads = {"OMP_NUM_THREADS": str(spec["threads"])} if spec.get("threads") else {}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env_threads})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_TAG)]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1][len(_TAG):])


def _ratio(r: dict, ref: dict | None, key: str) -> str:
    if ref is None or "error" in r or "error" in ref or not ref.get(key):
        return "-"
    return f"{r[key] / ref[key]:.2f}"


def tables(rows: list[dict]) -> str:
    """Markdown tables of the op and KD rows; ratios are implementation / torchvision of the same setting."""
    def ref_of(r):
        return next((q for q in rows if q["what"] == r["what"] and q["impl"] == "torchvision"
                     and all(q.get(k) == r.get(k) for k in ("threads", "channels"))), None)

    out = []
    ops = [r for r in rows if r["what"] == "op"]
    if ops:
        out += ["| threads | C | impl | fwd (s) | fwd+bwd (s) | fwd ratio | fwd+bwd ratio | peak (MiB) | mem ratio |",
                "|" + "---|" * 9]
        for r in ops:
            ref = ref_of(r)
            vals = ("failed | failed" if "error" in r else f"{r['fwd_s']:.3f} | {r['fwd_bwd_s']:.3f}")
            peak = "failed" if "error" in r else f"{r['peak_mib']:.0f}"
            out.append(f"| {r['threads']} | {r['channels']} | {r['impl']} | {vals} | {_ratio(r, ref, 'fwd_s')} | "
                       f"{_ratio(r, ref, 'fwd_bwd_s')} | {peak} | {_ratio(r, ref, 'peak_mib')} |")
    kds = [r for r in rows if r["what"] == "kd"]
    if kds:
        out += ["", "| threads | impl | KD step (s) | speed-up vs torchvision | peak (MiB) | mem ratio |",
                "|" + "---|" * 6]
        for r in kds:
            ref = ref_of(r)
            speed = "-" if "error" in r or ref is None or "error" in ref else f"{ref['step_s'] / r['step_s']:.2f}x"
            vals = "failed | - | failed" if "error" in r else f"{r['step_s']:.2f} | {speed} | {r['peak_mib']:.0f}"
            out.append(f"| {r['threads']} | {r['impl']} | {vals} | {_ratio(r, ref, 'peak_mib')} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        import torch

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        result = measure_op(spec) if spec["what"] == "op" else measure_kd(spec)
        print(_TAG + json.dumps(result), flush=True)
        return {}
    import torch
    from d4ir.synth.sd import default_device

    device = default_device(args.device)
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    amp = cuda if args.amp == "auto" else args.amp == "on"
    threads = [None] if cuda else [int(t) for t in args.threads.split(",")]
    specs = []
    for th in threads:
        if args.skip != "op":
            for c in (int(v) for v in args.channels.split(",")):
                specs += [{"what": "op", "impl": i, "channels": c, "batch": args.op_batch,
                           "reps": args.reps or (10 if cuda else 2)} for i in args.op_impls.split(",")]
        if args.skip != "kd":
            specs += [{"what": "kd", "impl": i, "batch": args.kd_batch, "reps": args.reps or (10 if cuda else 1),
                       "profile": args.profile} for i in args.kd_impls.split(",")]
        for s in specs:
            s.setdefault("threads", th)
    rows, load_before = [], os.getloadavg()
    for spec in specs:
        spec.update(device=device, size=args.size, amp=amp)
        t0 = time.perf_counter()
        result = run_child(spec)
        rows.append({**spec, **result})
        shown = result.get("error") or (f"{result['fwd_bwd_s']:.3f} s" if spec["what"] == "op"
                                        else f"{result['step_s']:.2f} s/step")
        print(f"  {spec['what']} {spec['impl']} C{spec.get('channels', '-')} threads {spec['threads']}: {shown} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(torch.device(device)) if cuda else platform.processor() or platform.machine()
    memory = "torch.cuda.max_memory_allocated" if cuda else "peak RSS growth (VmHWM)"
    print(f"{name} ({device}), {args.size}x{args.size}, op batch {args.op_batch}, KD batch {args.kd_batch}, "
          f"amp {amp}, memory = {memory}, torch {torch.__version__}")
    print(tables(rows))
    for r in rows:
        if r.get("auto"):
            for key, v in r["auto"].items():
                secs = ", ".join(f"{k} {t:.3f} s" for k, t in v["seconds"].items())
                print(f"auto (threads {r['threads']}) {key}: {v['choice']} ({secs})")
        if r.get("profile"):
            print(f"\nprofile of one KD step, {r['impl']}:\n{r['profile']}")
    load = {"before": load_before, "after": os.getloadavg()}  # 1/5/15-minute load: other work on the machine
    print(f"load average before {load_before[0]:.2f}, after {load['after'][0]:.2f} (on {os.cpu_count()} cores)")
    result = {"env": {"device": device, "device_name": name, "torch": torch.__version__, "amp": amp,
                      "size": args.size, "memory": memory, "load_average": load, "cores": os.cpu_count()},
              "rows": rows}
    write_json(args.json_out, result)
    return result


if __name__ == "__main__":
    main()
