"""Supervised training on paired data: the teacher (and the paper's "Student" baseline, the same loop).

Loss: L1(restored, clean), plus AirNet's contrastive term (InfoNCE of its MoCo degradation encoder, weight
`cl_weight`, 0.1 as in the official recipe) when the network is an AirNet. Random crops and flips, Adam.
Each epoch ends with validation (when a paired set is given), a line in train.jsonl, the model written as
NAME.safetensors + NAME.json, and the resumable state (distill/epochs.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from d4ir.shards.checks import check_positive_ints, check_rate

from .airnet import AirNet
from .data import load_pairs, random_crop, to_batch
from .epochs import EpochLoop, halved_lr
from .evaluate import evaluate_model
from .families import settings_without_encoder_first
from .registry import build, count_parameters, save_model


@dataclass(frozen=True)
class SupervisedConfig:
    """Supervised training on pairs (defaults: the scale the benchmarks train an official-width teacher at).

    Args:
        arch: registry name (`d4ir models`).
        arch_kwargs: constructor overrides of the architecture, e.g. n_feats=16,n_groups=2.
        epochs: passes of iters_per_epoch batches.
        iters_per_epoch: batches per epoch (default: one pass over the pairs).
        batch_size: random crops per batch.
        crop: side of the random training crops (with flips).
        lr: Adam learning rate.
        lr_halve_every: halve the learning rate every this many epochs (0: constant).
        cl_weight: weight of AirNet's contrastive loss (ignored for other networks).
        seed: seeds the weights, crops and flips: CPU runs at the same thread count repeat exactly.
    """

    arch: str = "airnet"
    arch_kwargs: dict | None = None
    epochs: int = 100
    iters_per_epoch: int | None = None
    batch_size: int = 8
    crop: int = 128
    lr: float = 2e-4
    lr_halve_every: int = 30
    cl_weight: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_ints(self, ("epochs", "batch_size", "crop"))
        if self.iters_per_epoch is not None and self.iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {self.iters_per_epoch}")
        check_rate("lr", self.lr)
        if self.lr_halve_every < 0 or self.cl_weight < 0:
            raise ValueError(f"lr_halve_every and cl_weight must be >= 0, got {self.lr_halve_every} and "
                             f"{self.cl_weight}")


@dataclass
class SupervisedResult:
    weights: Path  # NAME.safetensors
    params: int
    epochs: int
    metrics: dict  # the last validation's mean metrics ({} without a validation set)
    skipped: list[str] = field(default_factory=list)  # a line per paired set with skipped pairs (PairSet.summary)


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
) -> SupervisedResult:
    """Train `config.arch` on the pairs under `pairs_dir` into `out_dir`.

    Writes OUT/NAME.safetensors + NAME.json (the model), OUT/train.jsonl (one line per epoch) and
    OUT/state.pt (`resume=True` continues after the last finished epoch).
    """
    from d4ir.shards.progress import progress_bar, report

    out_dir = Path(out_dir)
    data = load_pairs(pairs_dir)  # every pair read now: bad ones are skipped and counted before any training
    val = load_pairs(val_dir) if val_dir else None
    torch.manual_seed(config.seed)
    model = build(config.arch, **(config.arch_kwargs or {})).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.999))
    rng = np.random.default_rng(config.seed)
    settings = settings_without_encoder_first(asdict(config), "arch_kwargs")
    settings.pop("epochs")  # a resumed run may train for more epochs: nothing else depends on the count
    loop = EpochLoop(out_dir, epochs=config.epochs, settings=settings, rng=rng, resume=resume,
                     upgrade=lambda old: old | {"settings": settings_without_encoder_first(old["settings"],
                                                                                           "arch_kwargs")})
    loop.restore(model=model, optimizer=opt)
    metrics = loop.resumed.get("metrics", {})
    is_airnet = isinstance(model, AirNet)
    iters = config.iters_per_epoch or max(len(data) // config.batch_size, 1)
    for epoch in range(loop.start, config.epochs):
        lr = halved_lr(config.lr, epoch, config.lr_halve_every)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        t0, total = time.perf_counter(), 0.0
        bar = progress_bar(range(iters), desc=f"{name} epoch {epoch + 1}/{config.epochs}", enabled=progress,
                           leave=False)
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
        record = {"loss": total / iters, "lr": lr, "seconds": time.perf_counter() - t0}
        if val:
            metrics = evaluate_model(model, val, device=device, progress=False)["mean"]
            record.update({f"val_{k}": v for k, v in metrics.items()})
        loop.end_epoch(epoch, record, lambda: save_model(out_dir / name, model, config.arch),
                       extra={"metrics": metrics}, model=model, optimizer=opt)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items())
        report(f"{name} epoch {epoch + 1}: {shown}", progress)
    skipped = [s.summary() for s in (data, val) if s is not None and s.skipped]
    return SupervisedResult(out_dir / f"{name}.safetensors", count_parameters(model), config.epochs, metrics,
                            skipped)
