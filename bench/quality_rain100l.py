"""Restoration quality on the Rain100L-split protocol: Input, Teacher, Student, Data, M0 and D4IR as in the
paper's Table 1 (Type | Method | Params (M) | PSNR | SSIM, RGB and Y), as one `d4ir experiments` config.

The protocol itself (pairs 1-50 of rain100l_test train the teacher, 51-100 are the test set, web folders from
the other shared sets with every test image left out) is the `rain100l-split` dataset builder of
pipelines/experiments/datasets.py; this script only writes the config of a scale and runs it:

  WORK/<scale>/config.json    the experiments config (run it again with `d4ir experiments`)
  WORK/<scale>/exp/           prepared data, runs, rows (eval.json per row), report.md
Every row is skipped when finished (an interrupted one resumes), so a killed run is rerun with the same command.

D4IR synthesizes with the shipped 64x64 weather LDM (synth/weights/weather-ldm) unless --sd names another.
Scales: cpu-small (a tiny AirNet, short schedules: 14 minutes measured on the shared 2-core machine with
--threads 1 with the tiny SD, before the move into the experiments package), cpu-hour (the same networks
trained about 3x longer), gpu (official AirNet width, paper-like settings; needs --sd naming a real SD for
meaningful D4IR images).

  python bench/quality_rain100l.py --scale cpu-small --threads 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_HERE = Path(__file__).resolve().parent

_TINY_AIRNET = {"n_feats": 16, "n_groups": 1, "n_blocks": 1, "queue_size": 256}
_SMALL_PROMPTS = {"steps": 60, "batch_size": 16, "crop": 32, "moco": {"queue_size": 64}, "embed_side": 64,
                  "checkpoint_every": 20}
# Per scale: the `scale` of the experiments config (preset paper, then these overrides of each stage's fields).
SCALES: dict[str, dict] = {
    "cpu-small": {
        "teacher": {"arch_kwargs": _TINY_AIRNET, "epochs": 4, "iters_per_epoch": 60, "batch_size": 4, "crop": 48,
                    "lr": 2e-3, "lr_halve_every": 2},
        "prompts": _SMALL_PROMPTS,
        "synth": {"num_samples": 48, "shard_size": 16, "batch_size": 16,
                  "ccd": {"steps": 10, "strength": 0.5, "size": 64}},
        "distill": {"epochs": 4, "joint_epochs": 1, "round_every": 1, "iters_per_epoch": 100, "batch_size": 4,
                    "crop": 48, "lr": 2e-3, "encoder_lr": 1e-5, "lr_halve_every": 2, "feedback_batch": 1},
    },
    "cpu-hour": {
        "teacher": {"arch_kwargs": _TINY_AIRNET, "epochs": 12, "iters_per_epoch": 75, "batch_size": 4, "crop": 48,
                    "lr": 2e-3, "lr_halve_every": 4},
        "prompts": {**_SMALL_PROMPTS, "steps": 200},
        "synth": {"num_samples": 128, "shard_size": 32, "batch_size": 16,
                  "ccd": {"steps": 10, "strength": 0.5, "size": 96}},
        "distill": {"epochs": 10, "joint_epochs": 3, "round_every": 1, "iters_per_epoch": 150, "batch_size": 4,
                    "crop": 48, "lr": 2e-3, "encoder_lr": 1e-5, "lr_halve_every": 4, "feedback_batch": 1},
    },
    "gpu": {
        "teacher": {"arch_kwargs": {**_TINY_AIRNET, "n_feats": 64, "n_groups": 5,
                                    "n_blocks": 5}, "epochs": 100, "iters_per_epoch": 100, "batch_size": 8,
                    "crop": 128, "lr": 2e-4, "lr_halve_every": 30},
        "prompts": {"steps": 2000, "batch_size": 32, "crop": 64, "moco": {"queue_size": 64}},
        "synth": {"num_samples": 2048, "shard_size": 128, "batch_size": 64,
                  "ccd": {"steps": 70, "strength": 0.5, "size": 256}},
        "distill": {"epochs": 60, "joint_epochs": 15, "round_every": 5, "iters_per_epoch": 200, "batch_size": 8,
                    "crop": 256, "lr": 1e-3, "encoder_lr": 1e-5, "lr_halve_every": 15, "feedback_batch": 2},
    },
}
ROWS = ["Input", "Teacher", "Student", "Data", "M0", "D4IR"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu-small", help="widths, schedules and sizes")
    p.add_argument("--data", type=Path, default=_HERE.parents[1] / "shared" / "data",
                   help="the shared benchmark images (rain100l_test and the other sets)")
    p.add_argument("--work", type=Path, default=Path("/tmp/d4ir_rain100l"), help="work folder (outside the repo)")
    p.add_argument("--sd", default="weather",
                   help="the frozen SD for D4IR (weather: the shipped LDM; tiny, a diffusers folder, a file)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config-only", action="store_true", help="write WORK/<scale>/config.json and stop")
    args = p.parse_args(argv)
    if args.work.resolve().is_relative_to(_HERE.parent):
        p.error(f"--work {args.work} is inside the repository; the benchmark images must not be copied into it")
    return args


def experiment_config(args: argparse.Namespace) -> dict:
    """The experiments config of the Rain100L-split protocol at `args.scale`."""
    split = "prepared:rain100l-split"
    return {
        "description": f"bench/quality_rain100l.py --scale {args.scale}",
        "out": str((args.work / args.scale / "exp").resolve()), "sd": args.sd, "seed": args.seed,
        "device": args.device, "threads": args.threads,
        "scale": {"preset": "paper", **SCALES[args.scale]},
        "prepare": {"rain100l-split": str(args.data.resolve())},
        "tasks": {"derain": {"teacher": {"train": f"{split}/train"}, "web_degraded": f"{split}/web_degraded",
                             "web_clean": f"{split}/web_clean", "test": {"Rain100L": f"{split}/test"}}},
        "tables": {"1": {"rows": ROWS}},
    }


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    path = args.work / args.scale / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(experiment_config(args), indent=2) + "\n")
    print(f"config: {path}", flush=True)
    if args.config_only:
        return path
    from d4ir.pipelines.experiments import load_config, run_experiments

    return run_experiments(load_config(path))


if __name__ == "__main__":
    main()
