"""How many torch threads a KD step should use on a small CPU that other jobs share.

Times one knowledge-distillation step (the teacher's forward without gradients, the student's forward and
backward, an Adam step) of a registry teacher/student pair at each thread count, side by side in one run, first on
an idle machine and then with `--busy N` processes spinning on the CPU (a stand-in for other users' jobs). With
OpenMP, a parallel region waits for its slowest thread; when a busy process holds one of two cores, every region
waits for the scheduler, and a step of many small convolutions (PReNet's recurrent stages) slows by an order of
magnitude.

    python bench/kd_threads.py --threads 1,2 --busy 1 --json bench/results/kd-threads.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch
from d4ir.distill.registry import build
from results import write_json


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def step_seconds(teacher: str, student: str, threads: int, batch: int, crop: int, steps: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t, s = build(teacher).eval().requires_grad_(False), build(student)
    opt = torch.optim.Adam(s.parameters(), 1e-3)
    x = torch.rand(batch, 3, crop, crop)
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        with torch.no_grad():
            y = t(x)
        loss = (s(x) - y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="prenet")
    ap.add_argument("--student", default="half-prenet")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--busy", type=int, default=1, help="spinning processes in the loaded run (0: idle run only)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=40)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    counts = [int(n) for n in args.threads.split(",")]
    result = {"setting": vars(args), "idle": {}, "busy": {}}
    for n in counts:
        result["idle"][n] = step_seconds(args.teacher, args.student, n, args.batch, args.crop, args.steps)
    if args.busy:
        stop = mp.Event()
        procs = [mp.Process(target=_spin, args=(stop,)) for _ in range(args.busy)]
        for p in procs:
            p.start()
        try:
            for n in counts:
                result["busy"][n] = step_seconds(args.teacher, args.student, n, args.batch, args.crop, args.steps)
        finally:
            stop.set()
            for p in procs:
                p.join()
    write_json(args.json, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
