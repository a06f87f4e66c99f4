"""Train the demo's shipped deraining teacher (distill/weights/demo-derain) on the demo's original split.

The demo distils a teacher that restores: this script trains it once, here, so that `make demo` spends no time
on it. Data: `build_demo_data` (scikit-image photos, no download; pipelines/demo_data.py), task derain: the 48
pairs of `original/` (photos astronaut, coffee, immunohistochemistry, grass, coins; light rain) train it, the 16
pairs of `test/` (chelsea, camera, brick; never in the teacher's split nor in the web pool) measure its gain over
its own input. Network: PRN (distill/prenet.py: PReNet's progressive stages without the ConvLSTM, which trains
several times slower per step on the CPU) at the width and stage count given; the demo's students are the same
network at half the channels (`half_kwargs`: about a quarter of the parameters).

    python bench/train_demo_teacher.py --out /tmp/demo-teacher            # train and measure
    python bench/train_demo_teacher.py --out /tmp/demo-teacher --ship     # also copy it into the package

--ship writes distill/weights/demo-derain/{teacher.safetensors, teacher.json, training.json, README.md} (the
model card: command, data, seconds, measured gain). Resumable: rerunning the same command continues training.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from d4ir.distill.evaluate import IDENTITY, evaluate
from d4ir.distill.registry import build, count_parameters, half_of, load_model
from d4ir.distill.teacher import SupervisedConfig, train_supervised
from d4ir.pipelines.demo_data import SPLITS, build_demo_data

SHIP = Path(__file__).resolve().parents[1] / "distill" / "weights" / "demo-derain"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50, help="batches per epoch")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--halve-every", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ship", action="store_true", help=f"copy the teacher and its card into {SHIP}")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = build_demo_data(args.out / "data", tasks=("derain",), seed=0, progress=False)
    pairs, test = data / "derain" / "original", data / "derain" / "test"
    cfg = SupervisedConfig(arch="prn", arch_kwargs={"channels": args.channels, "stages": args.stages},
                           epochs=args.epochs, iters_per_epoch=args.iters, batch_size=args.batch, crop=args.crop,
                           lr=args.lr, lr_halve_every=args.halve_every, seed=args.seed)
    t0 = time.perf_counter()
    result = train_supervised(pairs, args.out / "teacher", cfg, resume=(args.out / "teacher").exists(),
                              progress=False)
    seconds = round(time.perf_counter() - t0, 1)
    scores = {}
    for label, model in (("input", IDENTITY), ("teacher", result.weights)):
        scores[label] = evaluate(model, test, args.out / f"eval-{label}.json", progress=False)["mean"]
    arch, half = half_of(load_model(result.weights)[1])
    record = {
        "command": "python " + " ".join(["bench/train_demo_teacher.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "ship")},
        "train_seconds_this_call": seconds, "train_seconds": _train_seconds(args.out / "teacher"),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads, torch "
                   f"{torch.__version__}",
        "params": result.params, "student": {"arch": arch, "kwargs": half,
                                             "params": count_parameters(build(arch, **half))},
        "data": {"pairs": "demo derain original/ (48 pairs)", "test": "demo derain test/ (16 pairs)",
                 "photos": {k: list(v) for k, v in SPLITS.items() if k in ("original", "test")}},
        "test": {"input_psnr": scores["input"]["psnr"], "teacher_psnr": scores["teacher"]["psnr"],
                 "gain_db": scores["teacher"]["psnr"] - scores["input"]["psnr"],
                 "input_ssim": scores["input"]["ssim"], "teacher_ssim": scores["teacher"]["ssim"]},
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["test"]), f"{record['train_seconds']} s", flush=True)
    if args.ship:
        SHIP.mkdir(parents=True, exist_ok=True)
        for name in ("teacher.safetensors", "teacher.json"):
            shutil.copy2(args.out / "teacher" / name, SHIP / name)
        (SHIP / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        (SHIP / "README.md").write_text(card(record))
    return record


def _train_seconds(folder: Path) -> float:
    """The seconds of every epoch trained into `folder` (train.jsonl), resumed calls included."""
    lines = (folder / "train.jsonl").read_text().splitlines()
    return round(sum(json.loads(line)["seconds"] for line in lines), 1)


def card(r: dict) -> str:
    t, c = r["test"], r["config"]
    return f"""# Demo deraining teacher (D4IR embedded teacher)

A PRN (distill/prenet.py: PReNet without its ConvLSTM; {c['channels']} channels, {c['stages']} stages,
{r['params']:,} parameters) trained by this project on the demo's original split, so that `make demo` distils a
teacher that restores and spends no time training it. Load it with
`d4ir.distill.shipped.shipped_teacher("demo-derain")` (a path to `teacher.safetensors`) or name it
`shipped:demo-derain` in an experiments config (configs/demo.json).

## Training command

```
{r['command']}
```

{r['train_seconds']} s of training (the sum of its epochs in train.jsonl) on {r['machine']}, a 2-core CPU shared
with other jobs (load average 3-7 while it ran: on a quiet machine the same steps take a fraction of that).
Adam, lr {c['lr']}, {c['epochs']} epochs of {c['iters']} batches of {c['batch']} random {c['crop']}x{c['crop']}
crops with flips, L1 loss, seed {c['seed']}. The script is bench/train_demo_teacher.py; training.json holds the
record. As run: the same command with `--epochs 12` was stopped after epoch 5 (the gain was reached), then the
command above resumed it, trained nothing more and measured and shipped it; every epoch is seeded, so the
command above from scratch trains the same five epochs.

## Data

`pipelines/demo_data.py` (`build_demo_data`, seed 0, 96x96 crops of scikit-image sample photos, light rain of
pipelines/weather.py): the 48 pairs of `derain/original/` (photos
{', '.join(r['data']['photos']['original'])}). Measured on the 16 pairs of `derain/test/` (photos
{', '.join(r['data']['photos']['test'])}), which are in neither the teacher's split nor the demo's web pool.
Licences: the photos' own, listed in pipelines/demo_data.py.

## Measured

| on the demo test set (RGB) | PSNR (dB) | SSIM |
|---|---|---|
| degraded input | {t['input_psnr']:.2f} | {t['input_ssim']:.3f} |
| this teacher | {t['teacher_psnr']:.2f} | {t['teacher_ssim']:.3f} |

Gain over its input: **{t['gain_db']:+.2f} dB**. Its half-width student (`{r['student']['arch']}`,
{r['student']['kwargs']}) has {r['student']['params']:,} parameters, {r['student']['params'] / r['params']:.2f}x the
teacher's.

## What it cannot do

It knows the light rain of the demo's renderer on 96x96 crops of five photos; it is not a deraining model for
real photos (use a published teacher: docs/design.md, configs/real-derain.json).
"""


if __name__ == "__main__":
    main()
