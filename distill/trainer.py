"""Stage 3: pixel-wise knowledge distillation (Eq. 8), with the joint phase and regeneration rounds (Eq. 9).

`distill` reads top to bottom as named steps: check the inputs, load the frozen teacher, build the student,
open the data (a shard round, or image folders for the baselines) and, for D4IR, the feedback loop; then per
epoch: regenerate if a round is due, train, validate, log and save (distill/epochs.py); finally the eval.json
and config.json. Runs under torchrun with DistributedDataParallel (distill/ddp.py): shards are split by rank
and DataLoader worker, rank 0 writes files and regenerates, the others wait.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from shards.embeddings import load_embeddings
from shards.io import atomic_write_json, save_weights
from shards.layout import CONFIG_FILE, EVAL_FILE, PROMPT_ENCODER_STEM, STUDENT_STEM, RunLayout
from shards.pairs import find_pairs
from shards.writer import check_manifest, read_manifest
from synth.sd import SDSource, load_sd_cached
from synth.worker import Distributor, check_sd

from .config import DistillConfig
from .data import load_pairs
from .datafree import AdversarialSource
from .ddp import DistContext, average_gradients
from .epochs import EpochLoop, halved_lr
from .evaluate import evaluate_model, write_eval
from .feedback import FeedbackLoop, image_source, synth_config_of
from .losses import kd_loss
from .registry import build, count_parameters, half_of, load_model, save_model
from .sources import ImageBatches, ShardBatches


@dataclass
class DistillResult:
    student_dir: Path
    params: int
    round: int | None  # the round trained on last (None for the baselines, which read no shards)
    metrics: dict  # the last validation's mean metrics ({} without a validation set)


def student_name(student: str) -> str:
    """The folder name a student gets under RUN/students when none is given."""
    return "half-teacher" if student == "half" else student


def check_inputs(config: DistillConfig, degraded_dir, clean_dir, original_dir) -> None:
    """Every input error that can be found before any work starts, in one line each."""
    if config.joint and (degraded_dir is None or clean_dir is None):
        raise ValueError("the joint phase needs the web folders (--degraded, --clean); or set --joint-epochs 0, "
                         "or pin --round to train on an existing round only")
    if config.data == "web" and degraded_dir is None:
        raise ValueError("data 'web' (M0) needs the web degraded folder (--degraded)")
    if config.data == "original" and original_dir is None:
        raise ValueError("data 'original' needs the teacher's paired set (--original)")
    if config.data in ("dfsr", "dfmc") and config.iters_per_epoch is None:
        raise ValueError(f"data {config.data!r} has no dataset to count an epoch by: give --iters-per-epoch")


def _open_round(layout: RunLayout, config: DistillConfig) -> tuple[int, dict]:
    """The round training starts on (the pinned one, else round 0) and its manifest, checked to be finished and
    made with the prompts of this run."""
    start = config.round if config.round is not None else 0
    folder = layout.round_shards(start)
    manifest = read_manifest(folder)
    if not manifest.get("complete", False):
        raise ValueError(f"shard round {start} ({folder}) is incomplete (its synthesis was interrupted): "
                         "rerun `d4ir synth` for it")
    if start == 0 and (layout.prompts / "embeddings.safetensors").exists():
        check_manifest(folder, {"encoder_sha256": load_embeddings(layout.prompts).metadata.get("encoder_sha256", "")})
    return start, manifest


def _round_batches(layout: RunLayout, n: int, name: str, config: DistillConfig, ctx: DistContext) -> ShardBatches:
    folder = layout.round_shards(n, None if n == 0 or config.round is not None else name)
    return ShardBatches(folder, config, rank=ctx.rank, world=ctx.world, skip_damaged=config.skip_damaged_shards)


def distill(
    run: Path,
    teacher_path: Path,
    config: DistillConfig,
    *,
    sd_source: SDSource | str | None = None,
    degraded_dir: Path | None = None,
    clean_dir: Path | None = None,
    original_dir: Path | None = None,
    val_dir: Path | None = None,
    name: str | None = None,
    resume: bool = False,
    device: str = "cpu",
    distributor: Distributor | None = None,
    progress: bool = True,
) -> DistillResult:
    """Distil a student from the teacher into RUN/students/NAME.

    Args:
        run: the run folder (RUN/prompts from stage 1, RUN/shards/round-000 from stage 2).
        teacher_path: our checkpoint or an official .pth.
        config: see `DistillConfig`.
        sd_source: the SD the shards were made with (default: the one their manifest names); when given, it is
            loaded and a round synthesized by another SD (by fingerprint) is refused.
        degraded_dir, clean_dir: web folders (the joint phase's L_cl and feedback; data "web").
        original_dir: the teacher's paired set (data "original" uses its degraded side only).
        val_dir: paired validation set (PSNR/SSIM against the ground truth and the teacher).
        name: the student's folder under RUN/students (default: the student name, or half-teacher).
    """
    from tqdm import tqdm

    check_inputs(config, degraded_dir, clean_dir, original_dir)
    val = load_pairs(val_dir) if val_dir else None  # read now: a bad pair is counted before any epoch runs
    ctx = DistContext.start(device)
    device, layout = ctx.device, RunLayout(run)
    torch.manual_seed(config.seed + ctx.rank)
    rng = np.random.default_rng([config.seed, ctx.rank])
    amp = device.startswith("cuda") if config.amp is None else config.amp

    # ---- the frozen teacher and the student
    teacher, t_info = load_model(teacher_path)
    teacher = teacher.to(device).eval().requires_grad_(False)
    arch, kwargs = half_of(t_info) if config.student == "half" else (config.student, {})
    student = build(arch, **{**kwargs, **(config.student_kwargs or {})}).to(device).train()
    name = name or student_name(config.student)
    out = layout.student(name)

    # ---- data: a shard round (D4IR, with the feedback loop in the joint phase), an image folder (Data, M0)
    # or a generator trained against the student (DFSR, DFMC); all give source.next(rng, device)
    loop, batches, adversarial, current_round = None, None, None, None
    if config.data == "shards":
        current_round, manifest = _open_round(layout, config)
        if sd_source is not None or config.joint:
            sd_from = SDSource.of(sd_source or SDSource(manifest["sd"], manifest.get("sd_config")))
            # identity first, in the dtype the round was made in (the fingerprint covers the dtype)
            sd = load_sd_cached(sd_from, device, manifest.get("dtype", "float32"))
            check_sd(manifest, sd, sd_from, layout.round_shards(current_round))
            if config.joint:
                if not amp and sd.dtype != torch.float32:  # the surrogate runs in fp32 without autocast
                    sd = load_sd_cached(sd_from, device, "float32")
                base = read_manifest(layout.round_shards(0))
                if config.round_every and not Path(base["clean_dir"]).is_dir():
                    raise FileNotFoundError(f"round 0 was synthesized from {base['clean_dir']}, which is gone: the "
                                            "regeneration rounds need the same clean photos (or --round-every 0)")
                loop = FeedbackLoop(layout.prompts, sd, degraded_dir, clean_dir, synth_config_of(base).ccd,
                                    device=device)
        batches = _round_batches(layout, current_round, name, config, ctx)
    elif config.data in ("dfsr", "dfmc"):
        datafree = replace(config.datafree, method=config.data, loss=config.loss, seed=config.seed)
        adversarial = AdversarialSource(config.crop, config.batch_size, datafree, device, teacher=teacher,
                                        rank=ctx.rank)
    else:
        folder = degraded_dir if config.data == "web" else find_pairs(original_dir)[0].degraded.parent
        batches = ImageBatches(image_source(folder), batch_size=config.batch_size, crop=config.crop)

    opt = torch.optim.Adam(student.parameters(), lr=config.lr, betas=(0.9, 0.999))
    enc_opt = None if loop is None else torch.optim.Adam(loop.encoder.parameters(), lr=config.encoder_lr,
                                                          betas=(0.9, 0.999))
    model = ctx.wrap(student)
    settings = asdict(config) | {"teacher": str(Path(teacher_path).resolve()), "name": name}
    settings.pop("epochs")  # a resumed run may train for more epochs: the schedule does not depend on the count
    epochs = EpochLoop(out, epochs=config.epochs, settings=settings, rng=rng, resume=resume, writer=ctx.rank == 0)
    epochs.restore(student=student, optimizer=opt, loop=loop, encoder_optimizer=enc_opt, generator=adversarial)
    metrics = epochs.resumed.get("metrics", {})
    if epochs.resumed.get("round") not in (None, current_round):
        current_round = int(epochs.resumed["round"])
        batches = _round_batches(layout, current_round, name, config, ctx)
    iters = config.iters_per_epoch or batches.iters_per_epoch()
    source = adversarial or batches
    weights = config.loss

    for epoch in range(epochs.start, config.epochs):
        # ---- a regeneration round is due: rank 0 writes it with the current encoder, everyone moves to it
        due = config.round_for_epoch(epoch)
        if loop is not None and due > current_round:
            if ctx.rank == 0:
                loop.regenerate(layout, due, name, distributor=distributor, device=device, progress=progress)
            ctx.barrier()
            current_round = due
            source = batches = _round_batches(layout, current_round, name, config, ctx)
        joint = loop is not None and epoch < config.joint_epochs
        lr = halved_lr(config.lr, epoch, config.lr_halve_every)
        for g in opt.param_groups:
            g["lr"] = lr
        if enc_opt is not None:
            for g in enc_opt.param_groups:
                g["lr"] = halved_lr(config.encoder_lr, epoch, config.lr_halve_every)
        source.set_epoch(epoch)
        errors_before = getattr(source, "decode_errors", 0)

        # ---- one epoch of KD steps
        t0, sums = time.perf_counter(), {"kd": 0.0, "fb": 0.0, "cl": 0.0, "gen": 0.0}
        bar = tqdm(range(iters), desc=f"distill {name} {epoch + 1}/{config.epochs}",
                   disable=not progress or ctx.rank, leave=False)
        for i in bar:
            x = source.next(rng, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                with torch.no_grad():
                    target = teacher(x)
                student_out = model(x)
                loss = l_kd = kd_loss(student_out, target, weights) if adversarial is None else \
                    adversarial.student_loss(student_out, target, x)
                if joint:
                    l_fb = (loop.feedback_loss(model, teacher, rng, config.feedback_batch, weights, device)
                            if config.feedback_batch else torch.zeros((), device=device))
                    l_cl = loop.contrastive_loss(rng, config.batch_size, device) if config.gamma else l_fb * 0
                    loss = l_kd + l_fb + config.gamma * l_cl
                    sums["fb"] += float(l_fb.detach())
                    sums["cl"] += float(l_cl.detach())
            opt.zero_grad(set_to_none=True)
            if enc_opt is not None:
                enc_opt.zero_grad(set_to_none=True)
            loss.backward()
            if joint:
                average_gradients(loop.encoder, ctx)
            opt.step()
            if joint:
                enc_opt.step()
            if adversarial is not None and adversarial.due(epoch * iters + i):  # DFSR's min-max: G's turn
                sync = (lambda g: average_gradients(g, ctx)) if ctx.world > 1 else None
                sums["gen"] += adversarial.generator_step(student, teacher, amp=amp, sync_grads=sync)["generator_loss"]
            sums["kd"] += float(l_kd.detach())
            bar.set_postfix(kd=f"{float(l_kd.detach()):.5f}")

        # ---- end of epoch: validate, log, save (rank 0)
        record = {"round": current_round, "lr": lr, "joint": joint, "seconds": time.perf_counter() - t0,
                  **{f"loss_{k}": v / iters for k, v in sums.items()}}
        if isinstance(source, ShardBatches):
            record |= {"decode_errors": source.decode_errors - errors_before, "skipped_shards": source.skipped}
        if ctx.rank == 0:
            if val:
                metrics = evaluate_model(student, val, device=device, reference=teacher, progress=False)["mean"]
                record.update({f"val_{k}": v for k, v in metrics.items()})

            def save() -> None:
                save_model(out / STUDENT_STEM, student, name)
                if loop is not None:
                    save_weights(out / PROMPT_ENCODER_STEM, loop.encoder.state_dict(),
                                 {"arch": "PromptEncoder", "encoder": loop.encoder.config})

            epochs.end_epoch(epoch, record, save, extra={"round": current_round, "metrics": metrics},
                             student=student, optimizer=opt, loop=loop, encoder_optimizer=enc_opt,
                             generator=adversarial)
            if progress:
                shown = f", val PSNR {metrics['psnr']:.2f} (vs teacher {metrics['ref_psnr']:.2f})" if val else ""
                if record.get("decode_errors"):
                    shown += f", {record['decode_errors']} undecodable samples skipped"
                tqdm.write(f"distill {name} epoch {epoch + 1}: kd {record['loss_kd']:.5f}{shown}")

    # ---- the final evaluation and what made this student
    if ctx.rank == 0 and val:
        final = evaluate_model(student, val, device=device, reference=teacher, progress=False)
        write_eval(out / EVAL_FILE, final, model=str(layout.student_weights(name)), pairs=str(val_dir),
                   reference=str(teacher_path), data=config.data, round=current_round)
    if ctx.rank == 0:
        atomic_write_json(out / CONFIG_FILE, {**asdict(config), **settings, "params": count_parameters(student),
                                              "round": current_round})
    ctx.barrier()
    return DistillResult(out, count_parameters(student), current_round, metrics)

