"""Stage 3: pixel-wise knowledge distillation (Eq. 8), with the joint phase and regeneration rounds (Eq. 9).

Read top to bottom: set up (teacher, student, data, feedback loop, optimizers, resume) -> for each epoch:
regenerate if a round is due, train `iters_per_epoch` steps, validate, log, checkpoint. The teacher is
frozen (eval mode, no gradient to its weights). Runs under torchrun with DistributedDataParallel: shards
are split by rank and DataLoader worker, rank 0 writes files and regenerates, the others wait.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shards.embeddings import load_embeddings
from shards.io import append_jsonl, atomic_torch_save, atomic_write_json, save_weights
from shards.pairs import find_pairs
from shards.reader import latest_round, round_dir
from shards.writer import check_manifest, read_manifest
from synth.worker import Distributor, SynthConfig, cached_sd

from .data import random_crop, to_batch
from .evaluate import evaluate_model, write_eval
from .feedback import FeedbackLoop, image_source
from .losses import kd_loss, parse_weights
from .registry import build, count_parameters, load_model, save_model
from .sources import ShardBatches

DATA_SOURCES = ("shards", "original", "web")
DIST_TIMEOUT = datetime.timedelta(hours=6)


@dataclass
class DistillConfig:
    """Args:
    student: registry name (`d4ir models`) or "half" (the teacher's architecture at half width);
        student_kwargs override its constructor arguments.
    data: "shards" (D4IR), "original" (the paper's "Data": the teacher's own degraded inputs, no ground
        truth) or "web" (M0: the web degraded images directly).
    epochs, joint_epochs: total epochs and how many of the first are the joint phase (paper: 200, 50).
    regen_every: R, regenerate the shards every R epochs of the joint phase (0: never).
    iters_per_epoch: steps per epoch (default: one pass over the round's images).
    batch_size, crop: random crop x crop windows with flips (paper: 256).
    lr, encoder_lr: Adam (0.9, 0.999) learning rates of student and prompt encoder (paper: 1e-3, 1e-5),
        halved every lr_halve_every epochs (default: 15 of 200, scaled to `epochs`).
    gamma: weight of L_cl in the joint phase (Eq. 9, paper 0.5).
    loss: KD terms and weights, e.g. {"l2": 1.0} (Eq. 8) or {"l1": 1, "ssim": 0.1}.
    feedback_batch: images per step through the differentiable surrogate (0 disables the L_kd feedback).
    round: the shard round to train on (default: the newest).
    """

    student: str = "half-airnet"
    student_kwargs: dict | None = None
    data: str = "shards"
    epochs: int = 200
    joint_epochs: int = 50
    regen_every: int = 10
    iters_per_epoch: int | None = None
    batch_size: int = 8
    crop: int = 256
    lr: float = 1e-3
    encoder_lr: float = 1e-5
    lr_halve_every: int | None = None
    gamma: float = 0.5
    loss: dict | None = None
    feedback_batch: int = 2
    round: int | None = None
    seed: int = 0
    amp: bool | None = None
    num_workers: int = 0

    def halve_every(self) -> int:
        return self.lr_halve_every or max(1, round(15 * self.epochs / 200))


def half_of(teacher: torch.nn.Module, info: dict) -> tuple[str, dict]:
    """The teacher's architecture with feature channels halved (AirNet n_feats, Restormer dim)."""
    kwargs = dict(info.get("kwargs") or getattr(teacher, "config", {}))
    if info["arch"] == "airnet":
        kwargs.update(n_feats=kwargs["n_feats"] // 2, encoder_first=kwargs["encoder_first"] // 2)
    else:
        kwargs.update(dim=kwargs["dim"] // 2)
    return info["arch"], kwargs


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def rounds_due(epoch: int, cfg: DistillConfig) -> int:
    """Regeneration rounds that must exist before epoch `epoch` (0-based) starts."""
    if not cfg.regen_every or cfg.data != "shards":
        return 0
    return min(epoch, cfg.joint_epochs) // cfg.regen_every


def distill(
    run: Path,
    teacher_path: Path,
    config: DistillConfig,
    *,
    sd: str = "tiny",
    degraded_dir: Path | None = None,
    clean_dir: Path | None = None,
    original_dir: Path | None = None,
    val_dir: Path | None = None,
    name: str | None = None,
    resume: bool = False,
    device: str = "cpu",
    distributor: Distributor | None = None,
    progress: bool = True,
) -> dict:
    """Distil a student from the teacher into RUN/students/NAME; returns the last validation metrics.

    Args:
        run: the run folder (RUN/prompts from stage 1, RUN/shards/round-NNN from stage 2).
        teacher_path: our checkpoint or an official .pth.
        config: see `DistillConfig`.
        sd: the SD the shards were made with; a round whose manifest names another is refused.
        degraded_dir, clean_dir: web folders (the joint phase's L_cl/feedback, and data "web").
        original_dir: the teacher's paired set (data "original" uses its degraded side only).
        val_dir: paired validation set (PSNR/SSIM against the ground truth and the teacher).
    """
    from tqdm import tqdm

    rank, world, local_rank = _dist_info()
    if world > 1 and not dist.is_initialized():
        # a long timeout: the other ranks wait in a barrier while rank 0 regenerates a whole shard round,
        # which can take far longer than the default (10 min for NCCL)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=DIST_TIMEOUT)
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{local_rank}"
    if config.data not in DATA_SOURCES:
        raise ValueError(f"data must be one of {DATA_SOURCES}, got {config.data!r}")
    run = Path(run)
    torch.manual_seed(config.seed + rank)
    rng = np.random.default_rng([config.seed, rank])
    amp = device.startswith("cuda") if config.amp is None else config.amp

    teacher, t_info = load_model(teacher_path)
    teacher = teacher.to(device).eval().requires_grad_(False)
    arch, kwargs = half_of(teacher, t_info) if config.student == "half" else (config.student, {})
    student = build(arch, **{**kwargs, **(config.student_kwargs or {})}).to(device).train()
    name = name or (config.student if config.student != "half" else "half-teacher")
    out = run / "students" / name
    out.mkdir(parents=True, exist_ok=True)
    weights = parse_weights(config.loss)

    # ---- data and (for D4IR) the feedback loop
    loop, shards_root, current_round = None, run / "shards", None
    if config.data == "shards":
        current_round = config.round if config.round is not None else _newest_complete_round(shards_root)
        base = read_manifest(round_dir(shards_root, 0 if config.round is None else config.round))
        manifest = check_manifest(round_dir(shards_root, current_round), {"sd": sd})
        if not manifest.get("complete", True):
            raise ValueError(
                f"shard round {current_round} in {shards_root} is incomplete (its synthesis was interrupted): "
                "rerun `d4ir synth` for it, or pick a finished round"
            )
        prompts = run / "prompts"
        if current_round == 0 and (prompts / "embeddings.safetensors").exists():
            check_manifest(
                round_dir(shards_root, 0),
                {"encoder_sha256": load_embeddings(prompts).metadata.get("encoder_sha256", "")},
            )
        joint = config.joint_epochs > 0 and (config.gamma > 0 or config.feedback_batch > 0)
        if joint and config.round is None:
            if degraded_dir is None or clean_dir is None:
                raise ValueError(
                    "the joint phase needs degraded_dir and clean_dir (the web folders); "
                    "or set joint_epochs=0, or pin config.round to train on an existing round only"
                )
            parts = cached_sd(sd, device, "float32" if not amp else base.get("dtype", "float32"))
            ccd = SynthConfig(**base["config"]).ccd()
            loop = FeedbackLoop(
                prompts,
                parts,
                degraded_dir,
                clean_dir,
                ccd,
                device=device,
                crop=int(FeedbackLoop.encoder_config_training(prompts).get("crop", 64)),
            )
        batches = ShardBatches(round_dir(shards_root, current_round), config, rank=rank, world=world)
    else:
        folder = degraded_dir if config.data == "web" else _degraded_side(original_dir)
        images = image_source(folder)
        batches = None
    if config.round is not None or config.data != "shards":
        config = dataclasses.replace(config, regen_every=0)

    opt = torch.optim.Adam(student.parameters(), lr=config.lr, betas=(0.9, 0.999))
    enc_opt = (
        torch.optim.Adam(loop.encoder.parameters(), lr=config.encoder_lr, betas=(0.9, 0.999))
        if loop is not None
        else None
    )
    # find_unused_parameters: the KD forward `student(x)` leaves parameters without a gradient (AirNet runs
    # only E_pre of its MoCo encoders); plain DDP would wait for them and fail at the next step.
    model = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=True) if world > 1 else student
    start, metrics, state_path = 0, {}, out / "state.pt"
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        if loop is not None:
            loop.load_state_dict(state["loop"])
            enc_opt.load_state_dict(state["encoder_optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start, metrics, current_round = state["epoch"], state["metrics"], state["round"]
        if batches is not None:
            batches = ShardBatches(round_dir(shards_root, current_round), config, rank=rank, world=world)
    val = find_pairs(val_dir) if val_dir else None
    iters = config.iters_per_epoch or (
        batches.iters_per_epoch() if batches else max(len(images) // config.batch_size, 1)
    )

    for epoch in range(start, config.epochs):
        # ---- a regeneration round is due: rank 0 writes it with the current encoder, everyone moves to it
        due = rounds_due(epoch, config)
        if loop is not None and due > current_round:
            if rank == 0:
                loop.regenerate(
                    shards_root,
                    run / "prompts" / "rounds",
                    due,
                    distributor=distributor,
                    device=device,
                    progress=progress,
                )
            if world > 1:
                dist.barrier()
            current_round = due
            batches = ShardBatches(round_dir(shards_root, current_round), config, rank=rank, world=world)
        joint = loop is not None and epoch < config.joint_epochs
        lr = config.lr * 0.5 ** (epoch // config.halve_every())
        for g in opt.param_groups:
            g["lr"] = lr
        if enc_opt is not None:
            for g in enc_opt.param_groups:
                g["lr"] = config.encoder_lr * 0.5 ** (epoch // config.halve_every())
        if batches is not None:
            batches.set_epoch(epoch)
        t0, sums = time.perf_counter(), {"kd": 0.0, "fb": 0.0, "cl": 0.0}
        bar = tqdm(
            range(iters), desc=f"distill {name} {epoch + 1}/{config.epochs}", disable=not progress or rank, leave=False
        )
        for _ in bar:
            if batches is not None:
                x = batches.next(rng, device)
            else:
                picks = rng.integers(0, len(images), config.batch_size)
                x = to_batch([random_crop(rng, config.crop, images[i])[0] for i in picks], device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                with torch.no_grad():
                    target = teacher(x)
                loss = l_kd = kd_loss(model(x), target, weights)
                if joint:
                    l_fb = (
                        loop.feedback_loss(model, teacher, rng, config.feedback_batch, weights, device)
                        if config.feedback_batch
                        else torch.zeros((), device=device)
                    )
                    l_cl = loop.contrastive_loss(rng, config.batch_size, device) if config.gamma else l_fb * 0
                    loss = l_kd + l_fb + config.gamma * l_cl
                    sums["fb"] += float(l_fb.detach())
                    sums["cl"] += float(l_cl.detach())
            opt.zero_grad(set_to_none=True)
            if enc_opt is not None:
                enc_opt.zero_grad(set_to_none=True)
            loss.backward()
            if joint and world > 1:
                _allreduce_grads(loop.encoder, world)
            opt.step()
            if joint:
                enc_opt.step()
            kd = float(l_kd.detach())
            sums["kd"] += kd
            bar.set_postfix(kd=f"{kd:.5f}")

        # ---- end of epoch: validate, log, checkpoint (rank 0)
        record = {
            "epoch": epoch + 1,
            "round": current_round,
            "lr": lr,
            "joint": joint,
            "seconds": time.perf_counter() - t0,
            **{f"loss_{k}": v / iters for k, v in sums.items()},
        }
        if rank == 0:
            if val:
                res = evaluate_model(student, val, device=device, reference=teacher, progress=False)
                metrics = res["mean"]
                record.update({f"val_{k}": v for k, v in metrics.items()})
            append_jsonl(out / "train.jsonl", record)
            save_model(out / "student", student, name)
            if loop is not None:
                save_weights(
                    out / "encoder",
                    loop.encoder.state_dict(),
                    {"arch": "PromptEncoder", "encoder": loop.encoder.config},
                )
            atomic_torch_save(
                state_path,
                {
                    "student": student.state_dict(),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch + 1,
                    "round": current_round,
                    "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "metrics": metrics,
                    "config": asdict(config),
                    "loop": loop.state_dict() if loop is not None else None,
                    "encoder_optimizer": enc_opt.state_dict() if enc_opt is not None else None,
                },
            )
            if progress:
                tqdm.write(
                    f"distill {name} epoch {epoch + 1}: kd {record['loss_kd']:.5f}"
                    + (f", val PSNR {metrics['psnr']:.2f} (vs teacher {metrics['ref_psnr']:.2f})" if val else "")
                )
    if rank == 0 and val:
        final = evaluate_model(student, val, device=device, reference=teacher, progress=False)
        write_eval(
            out / "eval.json",
            final,
            model=str(out / "student.safetensors"),
            pairs=str(val_dir),
            reference=str(teacher_path),
            data=config.data,
            round=current_round,
        )
    if rank == 0:
        atomic_write_json(
            out / "config.json",
            {
                **asdict(config),
                "teacher": str(teacher_path),
                "sd": sd,
                "params": count_parameters(student),
                "round": current_round,
            },
        )
    if world > 1:
        dist.barrier()
    return {"params": count_parameters(student), "round": current_round, **metrics}


def _round_number(path: Path) -> int:
    return int(path.name.split("-")[-1])


def _newest_complete_round(shards_root: Path) -> int:
    """The newest round whose synthesis finished; a round killed half-way (manifest "complete": false) is
    passed over (a resumed run regenerates it when it is due)."""
    newest = _round_number(latest_round(shards_root))
    for n in range(newest, -1, -1):
        path = round_dir(shards_root, n)
        if (path / "manifest.json").is_file() and read_manifest(path).get("complete", True):
            return n
    raise FileNotFoundError(f"no finished shard round under {shards_root}: run `d4ir synth` first")


def _degraded_side(pairs_dir: Path | None) -> Path:
    if pairs_dir is None:
        raise ValueError("data 'original' needs the teacher's paired set (--original)")
    pairs = find_pairs(pairs_dir)
    return pairs[0].degraded.parent


def _allreduce_grads(module: torch.nn.Module, world: int) -> None:
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
