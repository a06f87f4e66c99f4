"""Train the embedded weather LDM (pipelines/weather_sd) on the CPU: seeded, resumable, in stages.

Stages (--stage; `all` = vae, unet, export), each resumable by rerunning the same command:

    speed        steps/s of one VAE and one UNet training step per downsampling factor (nothing saved)
    compare-vae  train OUT/vae-4x and OUT/vae-8x for --compare-steps each and evaluate both on held-out crops
                 (PSNR overall and per weather, weather survival): OUT/vae_compare.json
    vae          train OUT/vae-<f>x up to --vae-steps (continues a compare-vae run), OUT/vae-<f>x/eval.json
    unet         encode the training set with that VAE, set its scaling_factor, train the UNet against the
                 frozen CLIP text encoder (pipelines/weather_sd/text.py; caption dropout), EMA: OUT/unet/
    export       write the diffusers folder OUT/model (safetensors, text_encoder/ and tokenizer/ included),
                 reload it with synth.sd.load_sd, run the CCD probe (pipelines/weather_sd/probe.py) and write
                 the measurements into its model card

Learning rate: linear warm-up, constant, then a cosine down to --final-lr-fraction. Time caps: --vae-minutes /
--unet-minutes end a stage's constant phase at the step reached, and the stage then runs --vae-tail /
--unet-tail more steps of cosine decay (the new end is recorded in OUT/<stage>/finished.json, so reruns and
export follow it); --pause-minutes stops every stage resumably instead. With --vae-whole-tail the VAE's decay
steps train on whole 64x64 images instead of 32x32 windows (GroupNorm then sees whole images, as in use).

Final run (docs/benchmarks.md, the model card synth/weights/weather-ldm/README.md), about an hour:
    python bench/train_weather_sd.py --out /tmp/wsd --vae-steps 100000 --vae-minutes 15 --vae-tail 300 \
        --vae-whole-tail --no-vae-attention --unet-steps 100000 --unet-minutes 28 --unet-tail 300
Measured then shipped with `python bench/weather_ldm.py --sd /tmp/wsd/model --train-dir /tmp/wsd --ship`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from d4ir.pipelines.weather_sd.data import WeatherSet, WeatherSetConfig, build_weather_set
from d4ir.pipelines.weather_sd.folder import save_weather_sd, weights_mb, write_card
from d4ir.pipelines.weather_sd.loop import LoopConfig, load_ema_into, train_loop
from d4ir.pipelines.weather_sd.probe import ccd_probe
from d4ir.pipelines.weather_sd.text import WeatherText, build_weather_text
from d4ir.pipelines.weather_sd.unet import Latents, build_unet, evaluate_unet, scheduler, unet_batch_loss, unet_config
from d4ir.pipelines.weather_sd.vae import (
    build_vae,
    evaluate_vae,
    latent_scaling_factor,
    posterior_moments,
    vae_batch_loss,
    vae_config,
)
from d4ir.shards.layout import LOG_FILE, STATE_FILE

STAGES = ("speed", "compare-vae", "vae", "unet", "export", "all")


# ------------------------------------------------------------------ stages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="work folder (states, logs, the model folder)")
    p.add_argument("--stage", choices=STAGES, default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on the shared 2-core machine 2 threads ran 3-4x slower)")
    p.add_argument("--factor", type=int, choices=(4, 8), default=4, help="the VAE downsampling factor to ship")
    p.add_argument("--crops-per-photo", type=int, default=96, help="training crops per photo (x4 weathers)")
    p.add_argument("--held-out-crops", type=int, default=16, help="held-out crops per held-out photo")
    p.add_argument("--compare-steps", type=int, default=250, help="VAE steps per factor in compare-vae")
    p.add_argument("--vae-steps", type=int, default=1800)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-crop", type=int, default=32,
                   help="VAE training window side (64: whole images; 32 reached the same PSNR 2.5x sooner)")
    p.add_argument("--edge-weight", type=float, default=0.5, help="weight of the gradient-L1 term")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight (SD's convention and value)")
    p.add_argument("--unet-steps", type=int, default=7000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=8e-4)
    p.add_argument("--unet-widths", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--caption-dropout", type=float, default=0.15)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--text-dim", type=int, default=64, help="D of the frozen CLIP text encoder (cross_attention_dim)")
    p.add_argument("--t-focus", type=int, default=500, help="timesteps below this get --focus-prob of the samples")
    p.add_argument("--focus-prob", type=float, default=0.75,
                   help="share of UNet samples with t < --t-focus (CCD at lambda 0.5 visits only t <= 451)")
    p.add_argument("--vae-logvar-init", type=float, default=-8.0,
                   help="initial posterior log-variance of the VAE (0 keeps diffusers' init, log-variance about 0)")
    p.add_argument("--vae-decay", type=float, default=0.3, help="cosine-decay share of --vae-steps (no cap hit)")
    p.add_argument("--unet-decay", type=float, default=0.3, help="cosine-decay share of --unet-steps (no cap hit)")
    p.add_argument("--vae-tail", type=int, default=300, help="cosine-decay steps run after the VAE time cap")
    p.add_argument("--unet-tail", type=int, default=300, help="cosine-decay steps run after the UNet time cap")
    p.add_argument("--vae-whole-tail", action="store_true",
                   help="train the VAE's decay steps on whole 64x64 images (same pixels per step) instead of windows")
    p.add_argument("--no-vae-attention", action="store_true",
                   help="no self-attention in the VAE's mid block (it is trained on windows, used on whole images)")
    p.add_argument("--final-lr-fraction", type=float, default=0.05, help="lr at the end of the cosine, x peak")
    p.add_argument("--vae-minutes", type=float, default=0.0,
                   help="time cap of the VAE stage: reaching it ends the stage at that step (0: no cap)")
    p.add_argument("--unet-minutes", type=float, default=0.0, help="the same for the UNet stage")
    p.add_argument("--vae-cap-step", type=int, default=0,
                   help="end the VAE's constant phase at this step, as a time cap that reached it would (exact replay)")
    p.add_argument("--unet-cap-step", type=int, default=0, help="the same for the UNet stage")
    p.add_argument("--pause-minutes", type=float, default=0.0,
                   help="stop every training stage after this long, resumably (rerun to continue); 0: never")
    p.add_argument("--save-dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--probe-images", type=int, default=16, help="held-out crops in the CCD probe")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _sets(args: argparse.Namespace) -> tuple[WeatherSet, WeatherSet]:
    show = not args.no_progress
    train = build_weather_set(WeatherSetConfig("train", args.crops_per_photo, 64, args.seed), progress=show)
    held = build_weather_set(WeatherSetConfig("held_out", args.held_out_crops, 64, args.seed), progress=show)
    return train, held


def _plan(folder: Path, steps: int, decay_fraction: float, cap_minutes: float,
          pause_minutes: float) -> tuple[int, int, float]:
    """(steps, cosine-decay steps, budget minutes) of a stage. Before its time cap: --*-steps with the last
    `decay_fraction` decayed, the budget the smaller of cap and pause; after the cap (`finished.json`): the end
    recorded there (the step the cap reached plus the decay tail), budget the pause only."""
    marker = folder / "finished.json"
    if marker.is_file():
        plan = json.loads(marker.read_text())
        return int(plan["steps"]), int(plan.get("decay_steps", 0)), max(pause_minutes, 0.0)
    budgets = [m for m in (cap_minutes, pause_minutes) if m > 0]
    return steps, min(steps, int(round(decay_fraction * steps))), min(budgets) if budgets else 0.0


def _cap_reached(folder: Path, result: dict, cap_minutes: float, pause_minutes: float, tail: int,
                 cap_step: int = 0) -> bool:
    """When the time cap or the step cap (not a pause) stopped a stage, record its new end, the step reached plus
    a cosine decay of `tail` steps, in `finished.json` (reruns and export read it) and return True."""
    by_step = cap_step > 0 and result["step"] >= cap_step
    by_time = cap_minutes > 0 and (pause_minutes <= 0 or cap_minutes <= pause_minutes)
    if result["done"] or not (by_step or by_time) or (folder / "finished.json").is_file():
        return False
    plan = {"steps": result["step"] + tail, "decay_steps": tail, "capped_at": result["step"],
            "cap_minutes": cap_minutes, "cap_step": cap_step}
    (folder / "finished.json").write_text(json.dumps(plan))
    return True


def _train_stage(args, folder: Path, modules: dict, make_loss, *, lr: float, steps: int, decay: float, tail: int,
                 cap: float, cap_step: int = 0, ema_of: str | None = None, desc: str, load_only: bool = False) -> dict:
    """One resumable training stage with its time cap and decay tail (see `_plan`); make_loss(decay start step)
    builds the loss_fn."""
    def run() -> dict:
        n, decay_steps, budget = _plan(folder, steps, decay, cap, args.pause_minutes)
        stop = 0 if (folder / "finished.json").is_file() else cap_step  # after the cap: the tail
        loop = LoopConfig(steps=n, lr=lr, seed=args.seed, budget_minutes=budget, stop_step=stop,
                          decay_steps=decay_steps, final_lr_fraction=args.final_lr_fraction,
                          ema_decay=args.ema_decay if ema_of else 0.0)
        return train_loop(folder, modules, make_loss(n - decay_steps), loop, ema_of=ema_of,
                          progress=not args.no_progress, desc=desc, load_only=load_only)

    result = run()
    if not load_only and _cap_reached(folder, result, cap, args.pause_minutes, tail, cap_step):
        result = run()
    return result


def _vae(args, train: WeatherSet, factor: int, steps: int, cap_minutes: float = 0.0, cap_step: int = 0):
    folder = args.out / f"vae-{factor}x"
    config = vae_config(factor, mid_attention=not args.no_vae_attention)
    vae = build_vae(config, seed=args.seed, logvar_init=args.vae_logvar_init or None)
    def make_loss(decay_start: int):
        whole_from = decay_start if args.vae_whole_tail else None
        return vae_batch_loss(train, vae, args.vae_batch, args.edge_weight, args.kl_weight, args.vae_crop, whole_from)

    result = _train_stage(args, folder, {"vae": vae}, make_loss, lr=args.vae_lr, steps=steps, decay=args.vae_decay,
                          tail=args.vae_tail, cap=cap_minutes, cap_step=cap_step, desc=f"vae {factor}x")
    return vae, result


def _text_encoder(args) -> WeatherText:
    return build_weather_text(hidden=args.text_dim, seed=args.seed)


def _latents(vae, data: WeatherSet, scaling: float | None, seed: int) -> Latents:
    mean, std = posterior_moments(vae, data.floats())
    if scaling is None:
        scaling = latent_scaling_factor(mean, std, torch.Generator().manual_seed(seed))
    return Latents(mean, std, data.captions, data.weathers, scaling)


def _unet_parts(args, vae, train: WeatherSet):
    lat = _latents(vae, train, None, args.seed)
    vae.register_to_config(scaling_factor=lat.scaling_factor)
    text = _text_encoder(args)
    cfg = unet_config(text.hidden_size, 64 // args.factor, tuple(args.unet_widths))
    unet = build_unet(cfg, seed=args.seed)
    return lat, text, unet


def stage_speed(args, train: WeatherSet) -> dict:
    out = {}
    for factor in (4, 8):
        vae = build_vae(vae_config(factor), seed=args.seed)
        text = _text_encoder(args)
        unet = build_unet(unet_config(text.hidden_size, 64 // factor, tuple(args.unet_widths)), seed=args.seed)
        lat = _latents(vae, train, None, args.seed)
        for name, modules, loss in (
            ("vae", {"vae": vae}, vae_batch_loss(train, vae, args.vae_batch, args.edge_weight, args.kl_weight)),
            ("unet", {"unet": unet}, unet_batch_loss(lat, unet, text, args.unet_batch, args.caption_dropout)),
        ):
            folder = args.out / "speed" / f"{name}-{factor}x"
            (folder / STATE_FILE).unlink(missing_ok=True)
            train_loop(folder, modules, loss, LoopConfig(steps=3, seed=args.seed), progress=False)  # warm-up
            (folder / STATE_FILE).unlink()
            r = train_loop(folder, modules, loss, LoopConfig(steps=20, seed=args.seed), progress=False)
            n = sum(p.numel() for m in modules.values() for p in m.parameters())
            out[f"{name}-{factor}x"] = {"steps_per_s": round(r["steps_per_s"], 3), "params_M": round(n / 1e6, 3)}
            print(f"{name} {factor}x: {r['steps_per_s']:.2f} steps/s, {n / 1e6:.2f}M params", flush=True)
    return out


def stage_compare(args, train: WeatherSet, held: WeatherSet) -> dict:
    results = {}
    for factor in (4, 8):
        t0 = time.perf_counter()
        vae, r = _vae(args, train, factor, args.compare_steps)
        ev = evaluate_vae(vae, held)
        seconds = time.perf_counter() - t0
        params = sum(p.numel() for p in vae.parameters()) / 1e6
        results[f"{factor}x"] = {"steps": r["step"], "steps_per_s": r["steps_per_s"], "seconds": seconds,
                                 "params_M": params, "batch": args.vae_batch, "crop": args.vae_crop,
                                 "lr": args.vae_lr, "edge_weight": args.edge_weight, **ev}
    (args.out / "vae_compare.json").write_text(json.dumps(results, indent=1) + "\n")
    print("| factor | steps | PSNR | clean | rain | haze | snow | rain kept | haze kept | snow kept |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for f, r in results.items():
        by, sv = r["psnr_by_weather"], r["survival"]
        print(f"| {f} | {r['steps']} | {r['psnr']:.2f} | {by['clean']:.2f} | {by['derain']:.2f} | {by['dehaze']:.2f} "
              f"| {by['desnow']:.2f} | {sv['derain']['survival']:.2f} | {sv['dehaze']['survival']:.2f} "
              f"| {sv['desnow']['survival']:.2f} |")
    return results


def stage_unet(args, train: WeatherSet, held: WeatherSet, train_it: bool = True):
    vae, r = _vae(args, train, args.factor, args.vae_steps, args.vae_minutes, args.vae_cap_step)
    if not r["done"]:
        raise SystemExit(f"the VAE stage stopped at step {r['step']} of {args.vae_steps}: rerun to continue it")
    lat, text, unet = _unet_parts(args, vae, train)
    folder = args.out / "unet"
    loss = unet_batch_loss(lat, unet, text, args.unet_batch, args.caption_dropout, args.t_focus, args.focus_prob)
    result = _train_stage(args, folder, {"unet": unet}, lambda _: loss, lr=args.unet_lr, steps=args.unet_steps,
                          decay=args.unet_decay, tail=args.unet_tail, cap=args.unet_minutes,
                          cap_step=args.unet_cap_step, ema_of="unet",
                          desc="unet", load_only=not train_it)
    load_ema_into(unet, result["ema"])
    held_lat = _latents(vae, held, lat.scaling_factor, args.seed)
    return vae, unet, text, result, evaluate_unet(unet, text, held_lat, seed=args.seed)


def stage_export(args, train: WeatherSet, held: WeatherSet, trained: tuple | None = None) -> dict:
    from d4ir.synth.sd import load_sd

    vae, unet, text, result, unet_eval = trained or stage_unet(args, train, held, train_it=False)
    if not result["done"]:
        raise SystemExit(f"the UNet stage stopped at step {result['step']} of {args.unet_steps}: rerun to continue it")
    info = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_items": len(train), "held_out_items": len(held),
        "scaling_factor": vae.config.scaling_factor,
        "vae_eval": _vae_eval(args, vae, held),
        "unet_eval": unet_eval,
        "unet_steps_per_s": _rate(args.out / "unet" / LOG_FILE),
        "vae_steps_per_s": _rate(args.out / f"vae-{args.factor}x" / LOG_FILE),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "text_encoder": (f"frozen CLIPTextModel (D {text.hidden_size}, 2 layers, seed {args.seed}, fp16-rounded) with "
                         "the project's offline CLIPTokenizer (synth/text_encoder.py; pipelines/weather_sd/text.py)"),
    }
    folder = save_weather_sd(args.out / "model", vae, unet, scheduler(), text,
                             dtype=getattr(torch, args.save_dtype), info=info)
    parts = load_sd(str(folder))
    info["probe"] = ccd_probe(parts, text, held, n_images=args.probe_images, seed=args.seed)
    info["size_mb"] = round(weights_mb(folder), 3)
    write_card(folder, info)
    print(json.dumps({"folder": str(folder), "size_mb": info["size_mb"], "unet_eval": unet_eval,
                      "probe": info["probe"]}, indent=1))
    return info


def _vae_eval(args, vae, held: WeatherSet) -> dict:
    """The VAE stage's eval.json (computed and written when missing)."""
    path = args.out / f"vae-{args.factor}x" / "eval.json"
    if not path.is_file():
        path.write_text(json.dumps(evaluate_vae(vae, held), indent=1))
    return json.loads(path.read_text())


def _rate(log: Path) -> float | None:
    """Median steps/s of a train.jsonl."""
    rates = sorted(json.loads(line)["steps_per_s"] for line in log.read_text().splitlines() if line.strip())
    return rates[len(rates) // 2] if rates else None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train, held = _sets(args)
    if args.stage == "speed":
        (args.out / "speed.json").write_text(json.dumps(stage_speed(args, train), indent=1) + "\n")
        return
    if args.stage == "compare-vae":
        stage_compare(args, train, held)
        return
    if args.stage in ("vae", "all"):
        vae, r = _vae(args, train, args.factor, args.vae_steps, args.vae_minutes, args.vae_cap_step)
        ev = evaluate_vae(vae, held)
        (args.out / f"vae-{args.factor}x" / "eval.json").write_text(json.dumps({"steps": r["step"], **ev}, indent=1))
        print(f"VAE {args.factor}x at step {r['step']}: PSNR {ev['psnr']:.2f} dB, {ev['psnr_by_weather']}")
        if not r["done"]:
            return
    trained = None
    if args.stage in ("unet", "all"):
        trained = stage_unet(args, train, held)
        result, unet_eval = trained[3], trained[4]
        (args.out / "unet" / "eval.json").write_text(json.dumps({"steps": result["step"], **unet_eval}, indent=1))
        print(f"UNet at step {result['step']}: {result['steps_per_s']:.2f} steps/s, held-out eps-MSE {unet_eval}")
        if not result["done"]:
            return
    if args.stage in ("export", "all"):
        stage_export(args, train, held, trained)


if __name__ == "__main__":
    main()
