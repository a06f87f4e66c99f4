"""Restoration quality on the Rain100L-split protocol: Teacher, Student, Data, M0, D4IR and Input, as in the
paper's Table 1 (Type | Method | Params (M) | PSNR | SSIM), on RGB and on Y (BT.601).

The protocol (docs/design.md, "Real data"), on the images under --data (shared/data):
  private  pairs 1-50 of rain100l_test train the teacher (AirNet, width per --scale) and the "Student"
           (half width, with ground truth); "Data" distils the half-width student on their degraded side.
  test     pairs 51-100; every row is scored on all of them at full size (480x320).
  web      clean = the clean photos of the OTHER sets (sots_*, hsts, hazerd, test1200, test2800, spa,
           rain100l_fullsize/train_sample), duplicates dropped; degraded = the project's synthetic light
           rain (`pipelines.weather.add_rain`, RAIN_PER_PHOTO renders per clean photo) plus the real rainy
           images of spa, test1200, test2800 and rain100l_fullsize/train_sample. Any web image whose full
           frame or top-left 480x320 crop is pixel-identical to a rain100l_test image (either side) is
           left out and listed in data.json: rain100l_fullsize holds test pairs 1 and 56 uncropped.
  M0       distils on the web degraded images directly; D4IR runs prompts -> synth (the shipped 64x64 weather
           LDM, synth/weights/weather-ldm, unless --sd names another) -> distill with its joint phase and
           regeneration rounds.

Layout (WORK = --work, default /tmp/d4ir_rain100l; nothing is written into the repository):
  WORK/data/{train,test}/{degraded,clean}/  WORK/data/{web_clean,web_degraded}/  WORK/data/data.json
  WORK/<scale>/teacher/  WORK/<scale>/student/  WORK/<scale>/run/{prompts,shards,students/{data,m0,d4ir}}
  WORK/<scale>/eval/<row>.json  WORK/<scale>/table.md (or --out)  WORK/<scale>/results.json (or --json-out)
Every step is skipped when its output exists (training steps resume after their last finished epoch), so
a killed run is rerun with the same command; WORK/<scale>/settings.json refuses a rerun with other settings.

Scales: cpu-small (a tiny AirNet, short schedules, 64x64 synthesis: 14 minutes measured on the shared 2-core
machine with --threads 1 with the tiny SD), cpu-hour (the same networks trained about 3x longer, within an
hour; 96x96 synthesis, above the weather LDM's training size), gpu (official AirNet width, paper-like settings,
256x256: needs --sd naming a real SD for meaningful D4IR images).

  python bench/quality_rain100l.py --scale cpu-small --threads 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

# Run as a script, Python puts bench/ first on the path, where bench/synth.py would shadow the `synth`
# package: drop bench/ and put the project root first.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

_TINY_AIRNET = {"n_feats": 16, "encoder_first": 16, "n_groups": 1, "n_blocks": 1, "queue_size": 256}
_SMALL_PROMPTS = {"steps": 60, "batch_size": 16, "crop": 32, "queue_size": 64, "prompt_tokens": 8,
                  "embed_side": 64, "checkpoint_every": 20}
# Per scale: the teacher's width, the supervised schedule (teacher and Student), and stages 1-3.
SCALES: dict[str, dict] = {
    "cpu-small": {
        "teacher_kwargs": _TINY_AIRNET,
        "supervised": {"epochs": 4, "iters_per_epoch": 60, "batch_size": 4, "crop": 48, "lr": 2e-3,
                       "lr_halve_every": 2},
        "prompts": _SMALL_PROMPTS,
        "synth": {"num_samples": 48, "shard_size": 16, "batch_size": 16, "steps": 10, "strength": 0.5, "size": 64},
        "distill": {"epochs": 4, "joint_epochs": 1, "round_every": 1, "iters_per_epoch": 100, "batch_size": 4,
                    "crop": 48, "lr": 2e-3, "encoder_lr": 1e-5, "lr_halve_every": 2, "feedback_batch": 1},
    },
    "cpu-hour": {
        "teacher_kwargs": _TINY_AIRNET,
        "supervised": {"epochs": 12, "iters_per_epoch": 75, "batch_size": 4, "crop": 48, "lr": 2e-3,
                       "lr_halve_every": 4},
        "prompts": {**_SMALL_PROMPTS, "steps": 200},
        "synth": {"num_samples": 128, "shard_size": 32, "batch_size": 16, "steps": 10, "strength": 0.5,
                  "size": 96},
        "distill": {"epochs": 10, "joint_epochs": 3, "round_every": 1, "iters_per_epoch": 150, "batch_size": 4,
                    "crop": 48, "lr": 2e-3, "encoder_lr": 1e-5, "lr_halve_every": 4, "feedback_batch": 1},
    },
    "gpu": {
        "teacher_kwargs": {"n_feats": 64, "encoder_first": 64, "n_groups": 5, "n_blocks": 5, "queue_size": 256},
        "supervised": {"epochs": 100, "iters_per_epoch": 100, "batch_size": 8, "crop": 128, "lr": 2e-4,
                       "lr_halve_every": 30},
        "prompts": {"steps": 2000, "batch_size": 32, "crop": 64, "queue_size": 64, "prompt_tokens": 77},
        "synth": {"num_samples": 2048, "shard_size": 128, "batch_size": 64, "steps": 70, "strength": 0.5,
                  "size": 256},
        "distill": {"epochs": 60, "joint_epochs": 15, "round_every": 5, "iters_per_epoch": 200, "batch_size": 8,
                    "crop": 256, "lr": 1e-3, "encoder_lr": 1e-5, "lr_halve_every": 15, "feedback_batch": 2},
    },
}

TEST_SET = "rain100l_test"
PRIVATE, TEST = range(1, 51), range(51, 101)
WEB_CLEAN_SETS = ("sots_outdoor_samples", "sots_indoor_samples", "hsts_synthetic", "hazerd_samples",
                  "test1200_samples", "test2800_samples", "spa_data_samples", "rain100l_fullsize_samples",
                  "rain100l_train_sample")
WEB_RAINY_SETS = ("spa_data_samples", "test1200_samples", "test2800_samples", "rain100l_fullsize_samples",
                  "rain100l_train_sample")
RAIN_PER_PHOTO = 2  # synthetic rain renders per web clean photo
ROWS = (  # (key, Type, Method) in table order
    ("teacher", "Teacher", "AirNet"), ("student", "Student", "Half-AirNet"), ("data", "KD", "Data (Half-AirNet)"),
    ("m0", "KD", "M0, web degraded (Half-AirNet)"), ("d4ir", "KD", "D4IR (Half-AirNet)"), ("input", "Input", "-"),
)


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
    p.add_argument("--out", type=Path, default=None, help="markdown table (default WORK/<scale>/table.md)")
    p.add_argument("--json-out", type=Path, default=None, help="all results (default WORK/<scale>/results.json)")
    args = p.parse_args(argv)
    if args.work.resolve().is_relative_to(_HERE.parent):
        p.error(f"--work {args.work} is inside the repository; the benchmark images must not be copied into it")
    return args


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pixels_key(arr) -> str:
    from shards.io import sha256_bytes

    return f"{arr.shape}:{sha256_bytes(arr.tobytes())}"


def prepare_data(data_root: Path, out: Path, seed: int) -> dict:
    """Copy the Rain100L split and build the web folders under `out`; returns data.json's content."""
    import numpy as np

    from pipelines.weather import add_rain
    from shards.images import read_rgb, save_png
    from shards.io import atomic_write_json, sha256_file
    from shards.pairs import find_pairs

    if (out / "data.json").exists():  # written last: the folders are complete
        info = json.loads((out / "data.json").read_text())
        if (info["source"], info["seed"], info["rain_per_photo"]) != (str(data_root), seed, RAIN_PER_PHOTO):
            raise SystemExit(f"{out} was built from {info['source']} with seed {info['seed']}; "
                             f"pass another --work for {data_root} with seed {seed}")
        return info
    if out.exists():
        shutil.rmtree(out)  # a half-built folder from a killed run
    pairs = {int(p.name): p for p in find_pairs(data_root / TEST_SET)}
    if sorted(pairs) != list(range(1, 101)):
        raise ValueError(f"{data_root / TEST_SET} must hold pairs 1..100, found {len(pairs)}")
    protected = set()  # pixel keys of every Rain100L test image: no web image may be one of them
    for split, numbers in (("train", PRIVATE), ("test", TEST)):
        for n in numbers:
            for side in ("degraded", "clean"):
                src = getattr(pairs[n], side)
                (out / split / side).mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out / split / side / f"{n}{src.suffix}")
                protected.add(_pixels_key(read_rgb(src, min_side=1)))

    def overlap(arr) -> bool:
        views = [arr, arr[:320, :480], arr[:480, :320]]
        return any(_pixels_key(np.ascontiguousarray(v)) in protected for v in views)

    excluded, seen, counts = [], set(), {"web_clean": 0, "synthetic_rain": 0, "real_rain": 0, "duplicates": 0}
    for folder in ("web_clean", "web_degraded"):
        (out / folder).mkdir(parents=True)
    for set_index, (set_name, side, kind) in enumerate(
            [(s, "clean", "clean") for s in WEB_CLEAN_SETS] + [(s, "degraded", "rain") for s in WEB_RAINY_SETS]):
        for i, src in enumerate(sorted((data_root / set_name / side).iterdir())):
            digest = sha256_file(src)
            if digest in seen:  # hazerd and sots_indoor store one ground truth under several names
                counts["duplicates"] += 1
                continue
            seen.add(digest)
            arr = read_rgb(src, min_side=1)  # [H, W, 3] uint8
            if overlap(arr):
                excluded.append({"path": str(src), "reason": "pixel-identical to a rain100l_test image"})
                continue
            name = f"{set_name}-{src.stem}"
            if kind == "rain":
                shutil.copy2(src, out / "web_degraded" / f"real-{name}{src.suffix}")
                counts["real_rain"] += 1
                continue
            shutil.copy2(src, out / "web_clean" / f"{name}{src.suffix}")
            counts["web_clean"] += 1
            for k in range(RAIN_PER_PHOTO):
                rng = np.random.default_rng([seed, set_index, i, k])
                rainy = add_rain(arr.astype(np.float32) / 255.0, rng, level="light")  # [H, W, 3] in [0, 1]
                save_png(out / "web_degraded" / f"syn-{name}-{k}.png", np.round(rainy * 255).astype(np.uint8))
                counts["synthetic_rain"] += 1
    info = {"source": str(data_root), "seed": seed, "rain_per_photo": RAIN_PER_PHOTO, "counts": counts,
            "excluded": excluded, "private_pairs": "1-50", "test_pairs": "51-100"}
    atomic_write_json(out / "data.json", info)
    return info


def _config(stage: str, flat: dict, **extra):
    """The paper config of `stage` with this scale's values (sampler and MoCo keys go to their sub-configs)."""
    from dataclasses import fields, is_dataclass, replace

    from pipelines.presets import preset

    base = preset("paper", stage)
    values = {**flat, **extra}
    nested = {f.name: getattr(base, f.name) for f in fields(base) if is_dataclass(getattr(base, f.name))}
    for name, sub in nested.items():
        mine = {k: values.pop(k) for k in list(values) if k in sub.__dataclass_fields__}
        values[name] = replace(sub, **mine)
    return replace(base, **values)


def train_supervised_step(pairs: Path, out: Path, name: str, arch_kwargs: dict, cfg: dict, device: str) -> Path:
    """The teacher or the half-width Student on the private pairs (resumes after its last epoch)."""
    from distill.teacher import train_supervised
    from shards.layout import STATE_FILE

    config = _config("teacher", cfg, arch="airnet", arch_kwargs=arch_kwargs)
    train_supervised(pairs, out, config, name=name, resume=(out / STATE_FILE).exists(), device=device, progress=False)
    return out / f"{name}.safetensors"


def run_d4ir_stages(args: argparse.Namespace, scale: dict, data: Path, run: Path, device: str) -> None:
    """Stage 1 (prompts) and stage 2 (round 0 of the shards), each skipped when finished."""
    from shards.layout import EMBEDDINGS_FILE, MANIFEST_FILE, RunLayout
    from synth.prompts import train_prompts
    from synth.sd import load_sd_cached
    from synth.worker import synthesize

    layout = RunLayout(run)
    if not (layout.prompts / EMBEDDINGS_FILE).exists():
        _log("stage 1: prompts")
        train_prompts(data / "web_degraded", load_sd_cached(args.sd, device, "float32"), layout.prompts,
                      _config("prompts", scale["prompts"], seed=args.seed), resume=True, device=device,
                      progress=False)
    manifest = layout.round_shards(0) / MANIFEST_FILE
    if not manifest.exists() or not json.loads(manifest.read_text()).get("complete"):
        _log("stage 2: synth round 0")
        synthesize(data / "web_clean", layout.shards, _config("synth", scale["synth"], seed=args.seed),
                   sd_source=args.sd, prompts_dir=layout.prompts, device=device, progress=False)


def distill_step(args, scale: dict, data: Path, run: Path, teacher: Path, key: str, device: str) -> Path:
    """One KD student (data 'original', 'web' or 'shards') into RUN/students/KEY; skipped when finished."""
    from distill.trainer import distill
    from shards.layout import CONFIG_FILE, STATE_FILE, RunLayout

    layout = RunLayout(run)
    source = {"data": "original", "m0": "web", "d4ir": "shards"}[key]
    if not (layout.student(key) / CONFIG_FILE).exists():  # written at the very end of `distill`
        _log(f"stage 3: distill {key} (data {source})")
        config = _config("distill", scale["distill"], student="half", data=source, seed=args.seed)
        distill(run, teacher, config, sd_source=args.sd, degraded_dir=data / "web_degraded",
                clean_dir=data / "web_clean", original_dir=data / "train", name=key,
                resume=(layout.student(key) / STATE_FILE).exists(), device=device, progress=False)
    return layout.student_weights(key)


def evaluate_row(model_path: Path | None, test: Path, out: Path, device: str) -> dict:
    """eval.json of one row on the test pairs; reused while the model file is unchanged."""
    from distill.evaluate import evaluate_model, write_eval
    from distill.registry import load_model
    from shards.io import sha256_file
    from shards.pairs import find_pairs

    digest = sha256_file(model_path) if model_path else None
    if out.exists():
        cached = json.loads(out.read_text())
        if cached.get("model_sha256") == digest:
            return cached
    model = load_model(model_path)[0].to(device) if model_path else None
    result = evaluate_model(model, find_pairs(test), device=device, progress=False)
    write_eval(out, result, model=str(model_path) if model_path else "identity", model_sha256=digest,
               pairs=str(test))
    return json.loads(out.read_text())


def check_settings(path: Path, settings: dict) -> None:
    """Resuming is only sound with the settings that made the finished steps: refuse others, clearly."""
    from shards.io import atomic_write_json

    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from the file
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            changed = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
            raise SystemExit(f"{path.parent} was made with other settings ({', '.join(changed)}); "
                             f"delete it or pass another --work")
    else:
        atomic_write_json(path, settings)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from distill.evaluate import format_table
    from shards.io import atomic_write_json, atomic_write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scale, root = SCALES[args.scale], args.work / args.scale
    data, run, seconds, t_start = args.work / "data", args.work / args.scale / "run", {}, time.perf_counter()

    def step(name: str, fn, *a):
        t0 = time.perf_counter()
        result = fn(*a)
        seconds[name] = round(time.perf_counter() - t0, 1)
        _log(f"{name}: {seconds[name]} s")
        return result

    check_settings(root / "settings.json", {"scale": args.scale, **scale, "sd": args.sd, "seed": args.seed})
    info = step("prepare data", prepare_data, args.data, data, args.seed)
    _log(f"web data: {info['counts']}, excluded {len(info['excluded'])}")
    teacher_kwargs = dict(scale["teacher_kwargs"])
    half = {**teacher_kwargs, "n_feats": teacher_kwargs["n_feats"] // 2,
            "encoder_first": teacher_kwargs["encoder_first"] // 2}
    models: dict[str, Path | None] = {"input": None}
    models["teacher"] = step("teacher", train_supervised_step, data / "train", root / "teacher", "teacher",
                             teacher_kwargs, scale["supervised"], device)
    models["student"] = step("student", train_supervised_step, data / "train", root / "student", "student",
                             half, scale["supervised"], device)
    for key in ("data", "m0"):
        models[key] = step(key, distill_step, args, scale, data, run, models["teacher"], key, device)
    step("prompts+synth", run_d4ir_stages, args, scale, data, run, device)
    models["d4ir"] = step("d4ir", distill_step, args, scale, data, run, models["teacher"], "d4ir", device)
    evals = {k: step(f"eval {k}", evaluate_row, models[k], data / "test", root / "eval" / f"{k}.json", device)
             for k, _, _ in ROWS}

    blocks = f"{teacher_kwargs['n_groups']}x{teacher_kwargs['n_blocks']} blocks"
    names = {"AirNet": f"AirNet (n_feats {teacher_kwargs['n_feats']}, {blocks})",
             "Half-AirNet": f"Half-AirNet, n_feats {half['n_feats']}"}
    rows = [(kind, names["AirNet"] if key == "teacher" else method.replace("Half-AirNet", names["Half-AirNet"]),
             evals[key]) for key, kind, method in ROWS]
    notes = [f"Rain100L split: trained on pairs 1-50, scored on pairs 51-100 (full 480x320 images); scale "
             f"{args.scale}, device {device}, SD {args.sd}.",
             "Params count every parameter, AirNet's MoCo key encoder included (as its published 8.93M); the "
             "degradation encoder's 128/256 channels do not shrink with n_feats.",
             f"Wall time of this invocation {time.perf_counter() - t_start:.0f} s (finished steps are skipped)."]
    if args.sd == "tiny":
        notes.insert(1, "D4IR ran with the tiny random SD: its synthesized images are noise-like; this row tests "
                        "the plumbing, not the method.")
    elif args.sd == "weather":
        notes.insert(1, "D4IR ran with the shipped weather LDM (synth/weights/weather-ldm): 64x64, trained for "
                        "an hour on a CPU on 11 photos; it keeps the photo's layout and adds some weather, far "
                        "from a real Stable Diffusion (see its model card).")
    table = (f"RGB\n\n{format_table(rows)}\n\nY (BT.601)\n\n{format_table(rows, y_channel=True)}\n\n"
             + "\n".join(f"- {n}" for n in notes) + "\n")
    print(table, flush=True)
    out = args.out or root / "table.md"
    atomic_write_text(out, table)
    result = {"scale": args.scale, "settings": scale, "sd": args.sd, "device": device, "threads":
              torch.get_num_threads(), "data": info, "seconds": seconds,
              "wall_seconds": round(time.perf_counter() - t_start, 1),
              "rows": {k: {"type": kind, "method": m, "params": evals[k]["params"], "mean": evals[k]["mean"],
                           "model": evals[k]["model"]} for (k, kind, m) in ROWS},
              "evals": evals}
    atomic_write_json(args.json_out or root / "results.json", result)
    _log(f"wrote {out} and {args.json_out or root / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
