"""Train the embedded weather LDM (pipelines/weather_sd) on the CPU: seeded, resumable, in stages.

Stages (--stage; `all` = vae, unet, export), each resumable by rerunning the same command:

    speed        steps/s of one VAE and one UNet training step per downsampling factor (nothing saved)
    compare-vae  train OUT/vae-4x and OUT/vae-8x for --compare-steps each and evaluate both on held-out crops
                 (PSNR overall and per weather, weather survival): OUT/vae_compare.json
    vae          train OUT/vae-<f>x up to --vae-steps (continues a compare-vae run), OUT/vae-<f>x/eval.json
    unet         encode the training set with that VAE, set its scaling_factor, train the UNet and the
                 stand-in text encoder jointly (caption dropout), EMA: OUT/unet/
    export       write the diffusers folder OUT/model (safetensors), reload it with synth.sd.load_sd, run the
                 CCD probe (pipelines/weather_sd/probe.py) and write the measurements into its model card

PHASE-1 STAND-IN: the text encoder here (`StandInTextEncoder`) is a randomly initialised
transformers.CLIPTextModel from a small CLIPTextConfig with a word-level caption -> ids map; it trains jointly
with the UNet. Phase 2 replaces it with synth/text_encoder.py (a CLIPTextModel with a real CLIPTokenizer).

Time caps: --vae-minutes / --unet-minutes end a stage at the step it reached (OUT/<stage>/finished.json,
so reruns and export accept it); --pause-minutes stops every stage resumably instead. Measured rates and
results are in docs/weather_sd.md (1 thread, shared 2-core CPU: VAE 1.9 steps/s at batch 16 on 32x32 windows,
UNet 1.0-1.1 steps/s at batch 32 on 16x16 latents).

Short end-to-end run (about 13 minutes):
    python bench/train_weather_sd.py --out runs/weather_sd --vae-steps 5000 --vae-minutes 5 --unet-steps 5000 \
        --unet-minutes 6
Final run (about an hour):
    python bench/train_weather_sd.py --out runs/weather_sd --vae-steps 100000 --vae-minutes 18 \
        --unet-steps 100000 --unet-minutes 38
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from pipelines.weather_sd.data import CAPTIONS, WeatherSet, WeatherSetConfig, build_weather_set  # noqa: E402
from pipelines.weather_sd.folder import save_weather_sd, weights_mb, write_card  # noqa: E402
from pipelines.weather_sd.loop import LoopConfig, load_ema_into, train_loop  # noqa: E402
from pipelines.weather_sd.probe import ccd_probe  # noqa: E402
from pipelines.weather_sd.unet import Latents, build_unet, evaluate_unet, scheduler, unet_batch_loss, unet_config  # noqa: E402
from pipelines.weather_sd.vae import (  # noqa: E402
    build_vae,
    evaluate_vae,
    latent_scaling_factor,
    posterior_moments,
    vae_batch_loss,
    vae_config,
)

STAGES = ("speed", "compare-vae", "vae", "unet", "export", "all")


# ------------------------------------------------------------------ PHASE-1 STAND-IN text encoder


class StandInTokenizer:
    """PHASE-1 STAND-IN: word-level ids for the captions; <bos>=0, <eos>=1 (also the padding), words from 2."""

    def __init__(self, captions: list[str], max_length: int = 77) -> None:
        words = sorted({w for c in captions for w in c.replace(",", " , ").split()})
        self.vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(words)}}
        self.model_max_length = max_length

    def ids(self, texts: list[str]) -> torch.Tensor:
        """[B, max_length] int64: bos, word ids, eos, eos padding."""
        rows = []
        for t in texts:
            words = t.replace(",", " , ").split()
            unknown = [w for w in words if w not in self.vocab]
            if unknown:
                raise ValueError(f"stand-in tokenizer: words {unknown} are not in its caption vocabulary")
            row = [0] + [self.vocab[w] for w in words][: self.model_max_length - 2] + [1]
            rows.append(row + [1] * (self.model_max_length - len(row)))
        return torch.tensor(rows, dtype=torch.int64)

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "stand_in_vocab.json").write_text(json.dumps(self.vocab, indent=1) + "\n")


class StandInTextEncoder(torch.nn.Module):
    """PHASE-1 STAND-IN for synth/text_encoder.py: captions -> CLIPTextModel last hidden states [B, 77, D].

    Args:
        captions: every caption it must encode ("" is always allowed).
        hidden: D, the width of a token.
        layers, heads: transformer depth and heads.
        seed: initial weights.
    """

    def __init__(self, captions: list[str], hidden: int = 64, layers: int = 2, heads: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.tokenizer = StandInTokenizer(captions)
        config = CLIPTextConfig(
            vocab_size=len(self.tokenizer.vocab), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = CLIPTextModel(config)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer.ids(list(texts)).to(next(self.model.parameters()).device)
        return self.model(input_ids=ids).last_hidden_state  # [B, 77, D]


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
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-crop", type=int, default=32,
                   help="VAE training window side (64: whole images; 32 reached the same PSNR 2.5x sooner)")
    p.add_argument("--edge-weight", type=float, default=0.5, help="weight of the gradient-L1 term")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight (SD's convention and value)")
    p.add_argument("--unet-steps", type=int, default=7000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=3e-4)
    p.add_argument("--unet-widths", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--caption-dropout", type=float, default=0.15)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--text-dim", type=int, default=64, help="D of the stand-in text encoder")
    p.add_argument("--vae-minutes", type=float, default=0.0,
                   help="time cap of the VAE stage: reaching it ends the stage at that step (0: no cap)")
    p.add_argument("--unet-minutes", type=float, default=0.0, help="the same for the UNet stage")
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


def _capped(folder: Path, steps: int, cap_minutes: float, pause_minutes: float) -> tuple[int, float]:
    """(target steps, budget minutes) of a stage: a stage that hit its time cap ends at the step it reached."""
    marker = folder / "finished.json"
    if marker.is_file():
        return int(json.loads(marker.read_text())["steps"]), 0.0
    budgets = [m for m in (cap_minutes, pause_minutes) if m > 0]
    return steps, min(budgets) if budgets else 0.0


def _finish_if_capped(folder: Path, result: dict, cap_minutes: float, pause_minutes: float) -> dict:
    """Record a time-capped stage as finished at its step (`finished.json`), so reruns and export accept it."""
    capped = cap_minutes > 0 and (pause_minutes <= 0 or cap_minutes <= pause_minutes)
    if not result["done"] and capped:
        (folder / "finished.json").write_text(json.dumps({"steps": result["step"], "cap_minutes": cap_minutes}))
        result = {**result, "done": True}
    return result


def _vae(args, train: WeatherSet, factor: int, steps: int, cap_minutes: float = 0.0):
    folder = args.out / f"vae-{factor}x"
    steps, budget = _capped(folder, steps, cap_minutes, args.pause_minutes)
    vae = build_vae(vae_config(factor), seed=args.seed)
    loop = LoopConfig(steps=steps, lr=args.vae_lr, seed=args.seed, budget_minutes=budget)
    loss = vae_batch_loss(train, vae, args.vae_batch, args.edge_weight, args.kl_weight, args.vae_crop)
    result = train_loop(folder, {"vae": vae}, loss, loop, progress=not args.no_progress, desc=f"vae {factor}x")
    return vae, _finish_if_capped(folder, result, cap_minutes, args.pause_minutes)


def _text_encoder(args) -> StandInTextEncoder:
    return StandInTextEncoder(list(CAPTIONS.values()), hidden=args.text_dim, seed=args.seed)


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
            ("unet", {"m": torch.nn.ModuleDict({"u": unet, "t": text})},
             unet_batch_loss(lat, unet, text, args.unet_batch, args.caption_dropout)),
        ):
            folder = args.out / "speed" / f"{name}-{factor}x"
            (folder / "state.pt").unlink(missing_ok=True)
            train_loop(folder, modules, loss, LoopConfig(steps=3, seed=args.seed), progress=False)  # warm-up
            (folder / "state.pt").unlink()
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
    vae, r = _vae(args, train, args.factor, args.vae_steps, args.vae_minutes)
    if not r["done"]:
        raise SystemExit(f"the VAE stage stopped at step {r['step']} of {args.vae_steps}: rerun to continue it")
    lat, text, unet = _unet_parts(args, vae, train)
    folder = args.out / "unet"
    steps, budget = _capped(folder, args.unet_steps, args.unet_minutes, args.pause_minutes)
    loop = LoopConfig(steps=steps, lr=args.unet_lr, ema_decay=args.ema_decay, seed=args.seed, budget_minutes=budget)
    denoiser = torch.nn.ModuleDict({"unet": unet, "text_encoder": text})  # one EMA over both
    loss = unet_batch_loss(lat, unet, text, args.unet_batch, args.caption_dropout)
    result = train_loop(folder, {"denoiser": denoiser}, loss, loop, ema_of="denoiser",
                        progress=not args.no_progress, desc="unet", load_only=not train_it)
    if train_it:
        result = _finish_if_capped(folder, result, args.unet_minutes, args.pause_minutes)
    load_ema_into(denoiser, result["ema"])
    held_lat = _latents(vae, held, lat.scaling_factor, args.seed)
    return vae, unet, text, result, evaluate_unet(unet, text, held_lat, seed=args.seed)


def stage_export(args, train: WeatherSet, held: WeatherSet, trained: tuple | None = None) -> dict:
    from synth.sd import load_sd

    vae, unet, text, result, unet_eval = trained or stage_unet(args, train, held, train_it=False)
    if not result["done"]:
        raise SystemExit(f"the UNet stage stopped at step {result['step']} of {args.unet_steps}: rerun to continue it")
    info = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_items": len(train), "held_out_items": len(held),
        "scaling_factor": vae.config.scaling_factor,
        "vae_eval": _vae_eval(args, vae, held),
        "unet_eval": unet_eval,
        "unet_steps_per_s": _rate(args.out / "unet" / "train.jsonl"),
        "vae_steps_per_s": _rate(args.out / f"vae-{args.factor}x" / "train.jsonl"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "text_encoder": "PHASE-1 STAND-IN (bench/train_weather_sd.py StandInTextEncoder), replaced in phase 2",
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
        vae, r = _vae(args, train, args.factor, args.vae_steps, args.vae_minutes)
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
