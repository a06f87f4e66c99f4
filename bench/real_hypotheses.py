"""Why the real-parts table ranks its rows as it does (issue 23): one measurement per hypothesis, on a finished
run of configs/real-derain.json (or real-dehaze.json).

1. statistics: is the generator's weather like the web rain? Every image set is cut as the synthesis cuts the
   clean photos (`synth.ccd.prepare_clean`, the round's size) and measured by pipelines/weather_sd/stats.py:
   colour (saturation, channel means) and the task's weather statistic (rain streak energy; haze dark channel).
   Sets: web clean, web degraded (M0's data), the test set's degraded and clean sides, the Procedural images,
   round 0 (stage 2 with the prompt encoder), D4IR's regenerated rounds, the ablation rounds M1-M5. For the
   synthesized sets also their change against their own clean sources (each sample's `clean` provenance, cut
   the same way) and the content kept (PSNR of the low-passes).
2. variants: the D4IR row rerun alone with one setting changed, everything else the config's: `samples-x2`
   (twice the synthesized images per round: does D4IR lack data?), `no-joint` (joint_epochs 0: round 0 only,
   no joint phase and no rounds: what do they add?). Each in its own experiments folder (--variants-out).

    python bench/real_hypotheses.py configs/real-derain.json --variants samples-x2,no-joint \
        --json bench/results/real-derain-hypotheses.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from d4ir.pipelines.experiments import load_config, run_experiments
from d4ir.pipelines.weather_sd.stats import colour_stats, content_kept, weather_stats
from d4ir.shards.folders import scan_images
from d4ir.shards.images import read_rgb
from d4ir.shards.layout import DONE_FILE, ExperimentLayout, RunLayout, round_dir, rounds_in
from d4ir.shards.reader import iter_samples
from d4ir.synth.ccd import prepare_clean
from results import write_json

STATISTIC = {"derain": "rain", "dehaze": "haze", "desnow": "snow"}
VARIANTS = {"samples-x2": "synth", "no-joint": "distill"}
MAX_IMAGES = 256  # per set: enough for a stable mean, bounded time


def _measure(images: list[torch.Tensor], weather: str) -> dict:
    """Mean colour and weather statistics of [3, S, S] images."""
    x = torch.stack(images)
    stats = {**colour_stats(x), weather: weather_stats(x)[weather]}
    return {"count": len(images), **{k: round(float(v.mean()), 4) for k, v in stats.items()}}


def _folder(folder: Path, size: int) -> list[torch.Tensor]:
    paths = scan_images(folder, min_side=1).paths[:MAX_IMAGES]
    return [prepare_clean(read_rgb(p, min_side=1), size) for p in paths]


def _round(folder: Path, size: int, weather: str) -> dict:
    """Statistics of a round's images, of their clean sources, and the content the images kept."""
    made, sources = [], []
    for i, sample in enumerate(iter_samples(folder)):
        if i >= MAX_IMAGES:
            break
        made.append(torch.from_numpy(sample["degraded"]).permute(2, 0, 1).float() / 255)
        sources.append(prepare_clean(read_rgb(sample["meta"]["clean"], min_side=1), size))
    kept = content_kept(torch.stack(made), torch.stack(sources))
    return {**_measure(made, weather), "sources": _measure(sources, weather),
            "content_psnr": round(float(kept["psnr"].mean()), 2)}


def statistics(out: Path, task: str, folders: dict[str, Path], size: int, weather: str) -> dict:
    """Part 1 of the module docstring."""
    paths = ExperimentLayout(out)
    root = paths.task(task)
    sets = {"web clean": folders["web_clean"], "web degraded (M0)": folders["web_degraded"],
            "test degraded": folders["test"] / "degraded", "test clean": folders["test"] / "clean",
            "Procedural": root / "inputs" / "procedural"}
    result = {name: _measure(_folder(f, size), weather) for name, f in sets.items() if f.is_dir()}
    run = RunLayout(root)
    rounds = {"round 0 (D4IR, prompt encoder)": round_dir(run.shards, 0)}
    d4ir = run.shards_root("main-d4ir")  # the D4IR row's regenerated rounds
    rounds |= {f"D4IR round {n}": round_dir(d4ir, n) for n in rounds_in(d4ir)}
    rounds |= {f"{m} round": round_dir(RunLayout(paths.ablation(task, m)).shards, 0) for m in
               ("M1", "M2", "M3", "M4", "M5")}
    result |= {name: _round(r, size, weather) for name, r in rounds.items() if (r / "manifest.json").is_file()}
    return result


def _score(out: Path, task: str, row: str) -> dict:
    record = json.loads((ExperimentLayout(out).row(task, "main", row) / DONE_FILE).read_text())
    scores = {}
    for test, ev in record["evals"].items():
        mean = json.loads(Path(ev["eval"]).read_text())["mean"]
        scores[test] = {k: round(mean[k], 3) for k in ("psnr", "psnr_y", "authors_psnr_y", "authors_ssim_y")}
    return {"scores": scores, "seconds": record.get("seconds")}


def variant(config_path: Path, name: str, out: Path, data: tuple[str, ...]) -> dict:
    """Part 2: the D4IR row alone with one setting changed."""
    spec = json.loads(config_path.read_text())
    scale = spec.setdefault("scale", {})
    if name == "samples-x2":
        synth = scale.setdefault("synth", {})
        synth["num_samples"] = 2 * synth.get("num_samples", 48)
    elif name == "no-joint":
        scale.setdefault("distill", {})["joint_epochs"] = 0
    else:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    (table,) = spec["tables"]
    spec["tables"] = {table: {**(spec["tables"][table] or {}), "rows": ["D4IR"]}}
    path = out / f"{name}.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2))
    t0 = time.perf_counter()
    # relative paths stay relative to the committed config's folder
    config = load_config(path, out / name, base=config_path.resolve().parent, data=data)
    run_experiments(config, progress=False)
    task = next(iter(config.tasks))
    return {**_score(out / name, task, "D4IR"), "wall_seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--out", type=Path, help="the finished run (default: the config's out)")
    ap.add_argument("--variants", default="", help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--variants-out", type=Path, default=Path("/tmp/d4ir-hypotheses"))
    ap.add_argument("--data", action="append", default=[], help="as `d4ir experiments --data`")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.out, data=tuple(args.data))
    task, tcfg = next(iter(config.tasks.items()))
    size = config.scale.stage("synth").ccd.size
    folders = {"web_clean": tcfg.web_clean, "web_degraded": tcfg.web_degraded, "test": next(iter(tcfg.test.values()))}
    weather = STATISTIC[tcfg.weather]
    result = {"config": str(args.config), "out": str(config.out), "size": size, "statistic": weather,
              "statistics": statistics(config.out, task, folders, size, weather),
              "rows": {r: _score(config.out, task, r) for r in ("Teacher", "Data", "M0", "Procedural", "D4IR")
                       if (ExperimentLayout(config.out).row(task, "main", r) / DONE_FILE).is_file()},
              "variants": {}}
    for name in filter(None, args.variants.split(",")):
        result["variants"][name] = variant(args.config, name, args.variants_out, tuple(args.data))
        write_json(args.json, result)
    write_json(args.json, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
