"""Stage 3: pixel-wise knowledge distillation (Eq. 8), with the joint phase and regeneration rounds (Eq. 9).

`distill` reads top to bottom as named steps: check the inputs, start (load the frozen teacher, build the
student, open the batch source and, for D4IR, the feedback loop, resume), then per epoch: move to the round due,
train one epoch, end it (validate, log, save: distill/epochs.py); finally the eval.json and config.json. Runs
under torchrun with DistributedDataParallel (distill/ddp.py): shards are split by rank and DataLoader worker,
rank 0 writes files and regenerates, the others wait.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from d4ir.shards.io import atomic_write_json, save_weights
from d4ir.shards.layout import (
    CONFIG_FILE,
    EVAL_FILE,
    PROMPT_ENCODER_STEM,
    STUDENT_STEM,
    RunLayout,
)
from d4ir.shards.state import check_schema
from d4ir.synth.embed import encoder_record
from d4ir.synth.sd import SDSource
from d4ir.synth.worker import Distributor
from torch import nn

from .config import DistillConfig
from .data import load_pairs
from .ddp import DistContext, average_gradients
from .epochs import EpochLoop, halved_lr
from .evaluate import evaluate_model, write_eval
from .feedback import FeedbackLoop, open_loop
from .losses import kd_loss
from .registry import build, count_parameters, save_model
from .resume import check_own_rounds, run_settings, upgrade_state
from .sources import Opened, ShardBatches, open_round, open_source, round_batches
from .teachers import TeacherInfo, check_gradients, load_teacher, student_of


@dataclass
class DistillResult:
    student_dir: Path
    params: int
    round: int | None  # the round trained on last (None for the baselines, which read no shards)
    metrics: dict  # the last validation's mean metrics ({} without a validation set)
    skipped: list[str] = field(default_factory=list)  # a line per input with skipped files (val pairs, images)


def student_name(student: str) -> str:
    """The folder name a student gets under RUN/students when none is given."""
    return "half-teacher" if student == "half" else student


def check_inputs(config: DistillConfig, *, degraded_dir: Path | None, clean_dir: Path | None,
                 original_dir: Path | None) -> None:
    """Every error of the input folders `config` needs that can be found before any work starts (the input-check
    contract: docs/architecture.md)."""
    if config.joint and (degraded_dir is None or clean_dir is None):
        raise ValueError("the joint phase needs the web folders (--degraded, --clean); or set --joint-epochs 0, "
                         "or pin --round to train on an existing round only")
    if config.data == "web" and degraded_dir is None:
        raise ValueError("data 'web' (M0) needs the web degraded folder (--degraded)")
    if config.data == "original" and original_dir is None:
        raise ValueError("data 'original' needs the teacher's paired set (--original)")
    if config.data in ("dfsr", "dfmc") and config.iters_per_epoch is None:
        raise ValueError(f"data {config.data!r} has no dataset to count an epoch by: give --iters-per-epoch")


def distill(
    run: Path,
    teacher_path: Path | str,
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
    teacher_key: str | None = None,
    teacher_arch: str | None = None,
) -> DistillResult:
    """Distil a student from the teacher into RUN/students/NAME.

    Args:
        run: the run folder (RUN/prompts from stage 1, RUN/shards/round-000 from stage 2).
        teacher_path: any teacher `distill.teachers.load_teacher` reads: our checkpoint, an official .pth, a
            TorchScript or torch.export (.pt2) file, or package.module:callable@weights.
        config: see `DistillConfig`.
        sd_source: the SD the shards were made with (default: the one their manifest names); when given, it is
            loaded and a round synthesized by another SD (by fingerprint) is refused.
        degraded_dir, clean_dir: web folders (the joint phase's L_cl and feedback; data "web").
        original_dir: the teacher's paired set (data "original" uses its degraded side only).
        val_dir: paired validation set (PSNR/SSIM against the ground truth and the teacher).
        name: the student's folder under RUN/students (default: the student name, or half-teacher).
        teacher_key: the entry of an official teacher .pth holding its weights (default: params_ema first).
        teacher_arch: the registry name of an official teacher .pth whose keys cannot tell its variant (GCANet's
            output rule: gcanet-derain); recorded with the run.
    """
    check_inputs(config, degraded_dir=degraded_dir, clean_dir=clean_dir, original_dir=original_dir)
    val = load_pairs(val_dir) if val_dir else None  # read now: a bad pair is counted before any epoch runs
    run_ = _Training.start(RunLayout(run), teacher_path, config, name, resume=resume, device=device,
                           sd_source=sd_source, degraded_dir=degraded_dir, clean_dir=clean_dir,
                           original_dir=original_dir, teacher_key=teacher_key, teacher_arch=teacher_arch)
    for epoch in range(run_.epoch_loop.start, config.epochs):
        run_.move_to_round(config.round_for_epoch(epoch), distributor, progress)
        record = run_.train_epoch(epoch, progress)
        run_.end_epoch(epoch, record, val, progress)
    return run_.finish(val, val_dir)


@dataclass
class Networks:
    """The frozen teacher (on the device, eval mode) with what identifies it, and the student: `student` the bare
    network (saved, evaluated), `model` the same network as trained (wrapped by DDP under torchrun)."""

    teacher: nn.Module
    teacher_info: TeacherInfo
    student: nn.Module
    model: nn.Module


@dataclass
class Optimizers:
    """Adam for the student and, with D4IR's feedback loop, for the prompt encoder (None otherwise)."""

    student: torch.optim.Adam
    encoder: torch.optim.Adam | None


@dataclass
class _Training:
    """The state of one distillation, in named parts that `start` builds in this order.

    name, out: the student's name and folder (RUN/students/NAME); ctx, rng, amp: the torchrun context, the run's
    generator and whether the steps autocast; nets: teacher and student; data: the batch source and the round it
    reads (`distill.sources.Opened`); feedback: D4IR's feedback loop (None for the baselines and a pinned round);
    optim: the optimizers; epoch_loop: resume, log and state (`distill.epochs.EpochLoop`); settings: what a resume
    must match; metrics: the last validation's; iters: steps per epoch.
    """

    layout: RunLayout
    config: DistillConfig
    name: str
    out: Path
    ctx: DistContext
    rng: np.random.Generator
    amp: bool
    nets: Networks
    data: Opened
    feedback: FeedbackLoop | None
    optim: Optimizers
    epoch_loop: EpochLoop
    settings: dict
    metrics: dict = field(default_factory=dict)
    iters: int = 0

    @property
    def device(self) -> str:
        return self.ctx.device

    @classmethod
    def start(cls, layout: RunLayout, teacher_path: Path | str, config: DistillConfig, name: str | None, *,
              resume: bool, device: str, teacher_key: str | None = None, teacher_arch: str | None = None,
              sd_source=None, degraded_dir=None,
              clean_dir=None, original_dir=None) -> _Training:
        name = name or student_name(config.student)
        check_own_rounds(layout, name, config)  # before anything is loaded or trained
        ctx = DistContext.start(device)
        torch.manual_seed(config.seed + ctx.rank)
        rng = np.random.default_rng([config.seed, ctx.rank])
        amp = ctx.device.startswith("cuda") if config.amp is None else config.amp

        # the frozen teacher and the student
        teacher, t_info = load_teacher(teacher_path, arch=teacher_arch, weights_key=teacher_key)
        arch, kwargs = student_of(t_info, config.student)
        check_gradients(t_info, config)
        teacher = teacher.to(ctx.device).eval().requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # the student's init from the seed alone, whatever ran before
            torch.manual_seed(config.seed + ctx.rank)
            student = build(arch, **{**kwargs, **(config.student_kwargs or {})})
        student = student.to(ctx.device).train()

        # D4IR's first round, its SD and feedback loop; the batches; the optimizers
        first = open_round(layout, config)
        feedback = open_loop(layout, config, first, ctx.device, amp=amp, sd_source=sd_source,
                             degraded_dir=degraded_dir, clean_dir=clean_dir)
        data = open_source(layout, config, name, ctx, teacher, first_round=None if first is None else first[0],
                           degraded_dir=degraded_dir, original_dir=original_dir)
        optim = Optimizers(
            torch.optim.Adam(student.parameters(), lr=config.lr, betas=(0.9, 0.999)),
            None if feedback is None else torch.optim.Adam(feedback.encoder.parameters(), lr=config.encoder_lr,
                                                           betas=(0.9, 0.999)))
        nets = Networks(teacher, t_info, student, ctx.wrap(student))

        # what a resume must match, and the resumed state
        settings = run_settings(config, name, t_info, teacher_key, teacher_arch)
        epoch_loop = EpochLoop(layout.student(name), epochs=config.epochs, settings=settings, rng=rng,
                               resume=resume, writer=ctx.rank == 0, upgrade=upgrade_state)
        self = cls(layout, config, name, layout.student(name), ctx, rng, amp, nets, data, feedback, optim,
                   epoch_loop, settings)
        epoch_loop.restore(**self._objects())
        self.metrics = epoch_loop.resumed.get("metrics", {})
        if epoch_loop.resumed.get("round") not in (None, data.round):
            check_schema(epoch_loop.state_path, epoch_loop.resumed, {"round": int}, "extra.")
            data.round = epoch_loop.resumed["round"]
            data.source = round_batches(layout, data.round, name, config, ctx)
        self.iters = config.iters_per_epoch or data.source.iters_per_epoch()
        return self

    def _objects(self) -> dict:
        """The objects whose state dicts the resumable state holds, by their key in it."""
        return dict(student=self.nets.student, optimizer=self.optim.student, loop=self.feedback,
                    encoder_optimizer=self.optim.encoder, adversarial=self.data.adversarial)

    def move_to_round(self, due: int, distributor: Distributor | None, progress: bool) -> None:
        """A regeneration round is due: rank 0 writes it with the current encoder, every rank moves to it."""
        if self.feedback is None or due <= self.data.round:
            return
        if self.ctx.rank == 0:
            self.feedback.regenerate(self.layout, due, self.name, distributor=distributor, device=self.device,
                                     progress=progress)
        self.ctx.barrier()
        self.data.round = due
        self.data.source = round_batches(self.layout, due, self.name, self.config, self.ctx)

    def train_epoch(self, epoch: int, progress: bool) -> dict:
        """`iters` KD steps (plus, in the joint phase, the encoder's feedback and L_cl; for DFSR/DFMC, the
        generator's turns); returns the epoch's log record."""
        from d4ir.shards.progress import progress_bar

        config, nets, optim, source, loop, device = (self.config, self.nets, self.optim, self.data.source,
                                                     self.feedback, self.device)
        adversarial = self.data.adversarial
        joint = loop is not None and epoch < config.joint_epochs
        lr = halved_lr(config.lr, epoch, config.lr_halve_every)
        for g in optim.student.param_groups:
            g["lr"] = lr
        for g in optim.encoder.param_groups if optim.encoder is not None else []:
            g["lr"] = halved_lr(config.encoder_lr, epoch, config.lr_halve_every)
        source.set_epoch(epoch)
        errors_before = getattr(source, "decode_errors", 0)
        t0, sums = time.perf_counter(), {"kd": 0.0, "fb": 0.0, "cl": 0.0, "gen": 0.0}
        bar = progress_bar(range(self.iters), desc=f"distill {self.name} {epoch + 1}/{config.epochs}",
                           enabled=progress and not self.ctx.rank, leave=False)
        for i in bar:
            x = source.next(self.rng, device)  # [B, 3, crop, crop]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                with torch.no_grad():
                    target = nets.teacher(x)
                student_out = nets.model(x)
                loss = l_kd = kd_loss(student_out, target, config.loss) if adversarial is None else \
                    adversarial.student_loss(student_out, target, x)
                if joint:
                    l_fb = (loop.feedback_loss(nets.model, nets.teacher, self.rng, config.feedback_batch,
                                               config.loss, device)
                            if config.feedback_batch else torch.zeros((), device=device))
                    l_cl = loop.contrastive_loss(self.rng, config.batch_size, device) if config.gamma else l_fb * 0
                    loss = l_kd + l_fb + config.gamma * l_cl
                    sums["fb"] += float(l_fb.detach())
                    sums["cl"] += float(l_cl.detach())
            optim.student.zero_grad(set_to_none=True)
            if optim.encoder is not None:
                optim.encoder.zero_grad(set_to_none=True)
            loss.backward()
            if joint:
                average_gradients(loop.encoder, self.ctx)
            optim.student.step()
            if joint:
                optim.encoder.step()
            if adversarial is not None and adversarial.due(epoch * self.iters + i):  # DFSR's min-max: G's turn
                sync = (lambda g: average_gradients(g, self.ctx)) if self.ctx.world > 1 else None
                sums["gen"] += adversarial.generator_step(nets.student, nets.teacher, amp=self.amp,
                                                          sync_grads=sync)["generator_loss"]
            sums["kd"] += float(l_kd.detach())
            bar.set_postfix(kd=f"{float(l_kd.detach()):.5f}")
        record = {"round": self.data.round, "lr": lr, "joint": joint, "seconds": time.perf_counter() - t0,
                  **{f"loss_{k}": v / self.iters for k, v in sums.items()}}
        if isinstance(source, ShardBatches):
            record |= {"decode_errors": source.decode_errors - errors_before,
                       "skipped_shards": source.skipped}
        return record

    def end_epoch(self, epoch: int, record: dict, val, progress: bool) -> None:
        """Rank 0: validate, log the record, write the weights, then the resumable state."""
        if self.ctx.rank:
            return
        if val:
            self.metrics = evaluate_model(self.nets.student, val, device=self.device, reference=self.nets.teacher,
                                          progress=False)["mean"]
            record.update({f"val_{k}": v for k, v in self.metrics.items()})

        def save() -> None:
            save_model(self.out / STUDENT_STEM, self.nets.student, self.name)
            if self.feedback is not None:
                save_weights(self.out / PROMPT_ENCODER_STEM, self.feedback.encoder.state_dict(),
                             encoder_record(self.feedback.encoder, self.feedback.record(self.data.round)))

        self.epoch_loop.end_epoch(epoch, record, save, extra={"round": self.data.round, "metrics": self.metrics},
                                  **self._objects())
        if progress:
            from d4ir.shards.progress import report

            m = self.metrics
            shown = f", val PSNR {m['psnr']:.2f} (vs teacher {m['ref_psnr']:.2f})" if val else ""
            if record.get("decode_errors"):
                shown += f", {record['decode_errors']} undecodable samples skipped"
            report(f"distill {self.name} epoch {epoch + 1}: kd {record['loss_kd']:.5f}{shown}")

    def finish(self, val, val_dir: Path | None) -> DistillResult:
        """The final evaluation (eval.json) and what made this student (config.json)."""
        nets, last = self.nets, self.data.round
        params = count_parameters(nets.student)
        if self.ctx.rank == 0 and val:
            final = evaluate_model(nets.student, val, device=self.device, reference=nets.teacher, progress=False)
            write_eval(self.out / EVAL_FILE, final, model=str(self.layout.student_weights(self.name)),
                       pairs=str(val_dir), reference=nets.teacher_info.record(), data=self.config.data, round=last)
        if self.ctx.rank == 0:
            atomic_write_json(self.out / CONFIG_FILE, {**asdict(self.config), **self.settings, "params": params,
                                                       "round": last, "teacher": nets.teacher_info.record()})
        self.ctx.barrier()
        skipped = ([val.summary()] if val and val.skipped else []) + self.data.skipped
        return DistillResult(self.out, params, last, self.metrics, skipped)
