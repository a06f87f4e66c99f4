"""Supervised training on paired data: the teacher (and the paper's "Student" baseline, the same loop).

Loss: L1(restored, clean), plus AirNet's contrastive term (InfoNCE of its MoCo degradation encoder, weight
`cl_weight`, 0.1 as in the official recipe) when the network is an AirNet. Random crops and flips, Adam.
Each epoch ends with validation (when a paired set is given), a line in train.jsonl, the model written as
`teacher.safetensors` + `teacher.json`, and a resumable state (`state.pt`, written atomically).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shards.io import append_jsonl, atomic_torch_save
from shards.pairs import find_pairs

from .airnet import AirNet
from .data import load_pairs, random_crop, to_batch
from .evaluate import evaluate_model
from .registry import build, count_parameters, save_model


@dataclass
class SupervisedConfig:
    """Args:
    arch: registry name (`d4ir models`); arch_kwargs override its constructor arguments.
    epochs: passes over `iters_per_epoch` batches (default: one pass over the pairs).
    batch_size, crop: batch of random crop x crop windows (with flips).
    lr: Adam learning rate, halved every `lr_halve_every` epochs (0: constant).
    cl_weight: weight of AirNet's contrastive loss (ignored for other networks).
    seed: seeds the weights, crops and flips: CPU runs repeat exactly.
    """

    arch: str = "airnet"
    arch_kwargs: dict | None = None
    epochs: int = 10
    iters_per_epoch: int | None = None
    batch_size: int = 4
    crop: int = 128
    lr: float = 2e-4
    lr_halve_every: int = 0
    cl_weight: float = 0.1
    seed: int = 0


def train_supervised(
    pairs_dir: Path,
    out_dir: Path,
    config: SupervisedConfig,
    *,
    val_dir: Path | None = None,
    name: str = "teacher",
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Train `config.arch` on the pairs under `pairs_dir`; returns the last validation metrics.

    Writes OUT/NAME.safetensors + NAME.json (the model), OUT/train.jsonl (one line per epoch) and
    OUT/state.pt (model, optimizer and RNG state: `resume=True` continues after the last finished epoch).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_pairs(find_pairs(pairs_dir))
    val = find_pairs(val_dir) if val_dir else None
    torch.manual_seed(config.seed)
    model = build(config.arch, **(config.arch_kwargs or {})).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.999))
    rng = np.random.default_rng(config.seed)
    start, metrics = 0, {}
    state_path = out_dir / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["config"] != asdict(config):
            raise ValueError(f"{state_path} was written with another config; start a new --out or drop --resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start, metrics = state["epoch"], state.get("metrics", {})
    is_airnet = isinstance(model, AirNet)
    iters = config.iters_per_epoch or max(len(data) // config.batch_size, 1)
    for epoch in range(start, config.epochs):
        lr = config.lr * (0.5 ** (epoch // config.lr_halve_every) if config.lr_halve_every else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        t0, total = time.perf_counter(), 0.0
        bar = tqdm(range(iters), desc=f"{name} epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for _ in bar:
            picks = rng.integers(0, len(data), config.batch_size)
            crops = [random_crop(rng, config.crop, data[i][1], data[i][2]) for i in picks]
            degraded = to_batch([c[0] for c in crops], device)
            clean = to_batch([c[1] for c in crops], device)
            if is_airnet:
                # the key view: another crop of the same degraded images (MoCo positive)
                keys = to_batch([random_crop(rng, config.crop, data[i][1])[0] for i in picks], device)
                restored, logits, labels = model(degraded, keys)
                loss = F.l1_loss(restored, clean) + config.cl_weight * F.cross_entropy(logits, labels)
            else:
                loss = F.l1_loss(model(degraded), clean)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        record = {"epoch": epoch + 1, "loss": total / iters, "lr": lr, "seconds": time.perf_counter() - t0}
        if val:
            metrics = evaluate_model(model, val, device=device, progress=False)["mean"]
            record.update({f"val_{k}": v for k, v in metrics.items()})
        append_jsonl(out_dir / "train.jsonl", record)
        save_model(out_dir / name, model, config.arch)
        atomic_torch_save(
            state_path,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch + 1,
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "config": asdict(config),
                "metrics": metrics,
            },
        )
        if progress:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch")
            tqdm.write(f"{name} epoch {epoch + 1}: {shown}")
    return {"params": count_parameters(model), **metrics}
