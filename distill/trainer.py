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
from d4ir.shards.io import atomic_write_json, save_weights, sha256_file
from d4ir.shards.layout import (
    CONFIG_FILE,
    EVAL_FILE,
    PROMPT_ENCODER_STEM,
    STATE_FILE,
    STUDENT_STEM,
    RunLayout,
    parse_round,
)
from d4ir.shards.state import StateError, check_schema
from d4ir.shards.writer import read_manifest
from d4ir.synth.embed import encoder_record
from d4ir.synth.sd import SDSource
from d4ir.synth.worker import Distributor

from .config import DistillConfig
from .data import load_pairs
from .ddp import DistContext, average_gradients
from .epochs import EpochLoop, halved_lr
from .evaluate import evaluate_model, write_eval
from .losses import kd_loss
from .registry import build, count_parameters, save_model
from .sources import ShardBatches, open_source, round_batches
from .teachers import TeacherInfo, check_gradients, load_teacher, spec_file, student_of


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


def check_own_rounds(layout: RunLayout, name: str, config: DistillConfig) -> None:
    """A fresh run that will regenerate refuses a student folder holding rounds of an earlier run of that name.

    They were made with the earlier run's prompt encoder, so this run's regeneration would find them unlike its
    own plan and fail after a whole epoch (`shards ... do not match this run ... encoder_sha256`). With a
    state.pt there the epoch loop decides instead (resume it, or refuse and name --resume).
    """
    if (layout.student(name) / STATE_FILE).exists():
        return
    if not config.regenerates:
        return
    root = layout.shards_root(name)
    left = sorted(p.name for p in root.iterdir() if parse_round(p.name) is not None and any(p.iterdir())) \
        if root.is_dir() else []
    if not left:
        return
    # the manifest names the prompts a round was made with, and so the student that made it (a copied round)
    owners = {r: RunLayout.prompts_owner(_prompts_dir_of(root / r)) or name for r in left}
    foreign = {r: o for r, o in owners.items() if o != name}
    if foreign:
        made = ", ".join(f"{r} made by student {o!r}" for r, o in foreign.items())
        raise StateError(f"{root} holds {made} (copied here?), not by a run of {name!r}: this fresh run cannot "
                         f"use them; use another --name, or remove {root}")
    raise StateError(f"{root} holds {', '.join(left)} of an earlier run of student {name!r}, made with another "
                     f"prompt encoder than this fresh run's: continue that run with --resume (it needs its "
                     f"{STATE_FILE}), use another --name, or remove {root}")


def teacher_settings(t_info: TeacherInfo) -> dict:
    """What a resumed run must match of its teacher: its content (the file's sha256, a factory's weights'), and a
    foreign teacher's kind and factory name; never its path, so that a moved or copied run folder resumes."""
    ident = t_info.identity
    if ident is None:  # a registry network: its checkpoint file (ours may be named by its stem or its .json)
        path = spec_file(t_info.spec)
        return {"teacher_sha256": sha256_file(path if path.is_file() else path.with_suffix(".safetensors"))}
    return {"teacher_sha256": ident["sha256"], "teacher_kind": ident["kind"],
            **({"teacher_factory": ident["factory"]} if "factory" in ident else {})}


def _teacher_by_hash(old: dict) -> dict:
    """A state written before the teacher was recorded by content named it by path: its hash, if still there."""
    if "teacher" not in old or "teacher_sha256" in old:
        return old
    path = Path(str(old["teacher"]))
    return {k: v for k, v in old.items() if k != "teacher"} | {
        "teacher_sha256": sha256_file(path) if path.is_file() else f"{path} (missing)"}


def _prompts_dir_of(folder: Path) -> str | None:
    """The prompts a round was made with, as its manifest records them; None for an unreadable manifest."""
    try:
        return read_manifest(folder).prompts_dir
    except (OSError, ValueError):
        return None


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
    """
    check_inputs(config, degraded_dir=degraded_dir, clean_dir=clean_dir, original_dir=original_dir)
    val = load_pairs(val_dir) if val_dir else None  # read now: a bad pair is counted before any epoch runs
    run_ = _Training.start(RunLayout(run), teacher_path, config, name, resume=resume, device=device,
                           sd_source=sd_source, degraded_dir=degraded_dir, clean_dir=clean_dir,
                           original_dir=original_dir, teacher_key=teacher_key)
    for epoch in range(run_.epochs.start, config.epochs):
        run_.move_to_round(config.round_for_epoch(epoch), distributor, progress)
        record = run_.train_epoch(epoch, progress)
        run_.end_epoch(epoch, record, val, progress)
    return run_.finish(val, val_dir)


class _Training:
    """The state of one distillation: networks, batch source, optimizers, the epoch loop."""

    @classmethod
    def start(cls, layout: RunLayout, teacher_path: Path | str, config: DistillConfig, name: str | None, *,
              resume: bool, device: str, teacher_key: str | None = None, **data) -> _Training:
        self = cls()
        self.name = name or student_name(config.student)
        check_own_rounds(layout, self.name, config)  # before anything is loaded or trained
        self.ctx = ctx = DistContext.start(device)
        self.layout, self.config, self.device = layout, config, ctx.device
        torch.manual_seed(config.seed + ctx.rank)
        self.rng = np.random.default_rng([config.seed, ctx.rank])
        self.amp = self.device.startswith("cuda") if config.amp is None else config.amp

        # the frozen teacher and the student
        teacher, t_info = load_teacher(teacher_path, weights_key=teacher_key)
        arch, kwargs = student_of(t_info, config.student)
        check_gradients(t_info, config)
        self.teacher, self.t_info = teacher.to(self.device).eval().requires_grad_(False), t_info
        with torch.random.fork_rng(devices=[]):  # the student's init from the seed alone, whatever ran before
            torch.manual_seed(config.seed + ctx.rank)
            student = build(arch, **{**kwargs, **(config.student_kwargs or {})})
        self.student = student.to(self.device).train()
        self.out = layout.student(self.name)

        # the batches (and for D4IR the feedback loop), the optimizers, and a resumed state
        opened = open_source(layout, config, self.name, ctx, self.teacher, amp=self.amp, **data)
        self.source, self.loop, self.round, self.adversarial = opened.source, opened.loop, opened.round, \
            opened.adversarial
        self.skipped = opened.skipped
        self.opt = torch.optim.Adam(self.student.parameters(), lr=config.lr, betas=(0.9, 0.999))
        self.enc_opt = None if self.loop is None else torch.optim.Adam(self.loop.encoder.parameters(),
                                                                       lr=config.encoder_lr, betas=(0.9, 0.999))
        self.model = ctx.wrap(self.student)
        # the teacher by content, not by path: a moved or copied run folder (its default teacher inside) resumes;
        # a foreign teacher adds its kind (and factory), config.json names where it was
        self.settings = asdict(config) | {"name": self.name, **teacher_settings(t_info)}
        if teacher_key is not None:
            self.settings["teacher_key"] = teacher_key
        self.settings.pop("epochs")  # a resumed run may train longer: the schedule does not depend on the count
        self.epochs = EpochLoop(self.out, epochs=config.epochs, settings=self.settings, rng=self.rng,
                                resume=resume, writer=ctx.rank == 0, upgrade=_teacher_by_hash)
        self.epochs.restore(**self._objects())
        self.metrics = self.epochs.resumed.get("metrics", {})
        if self.epochs.resumed.get("round") not in (None, self.round):
            check_schema(self.epochs.state_path, self.epochs.resumed, {"round": int}, "extra.")
            self.round = self.epochs.resumed["round"]
            self.source = round_batches(layout, self.round, self.name, config, ctx)
        self.iters = config.iters_per_epoch or self.source.iters_per_epoch()
        return self

    def _objects(self) -> dict:
        return dict(student=self.student, optimizer=self.opt, loop=self.loop, encoder_optimizer=self.enc_opt,
                    generator=self.adversarial)

    def move_to_round(self, due: int, distributor: Distributor | None, progress: bool) -> None:
        """A regeneration round is due: rank 0 writes it with the current encoder, every rank moves to it."""
        if self.loop is None or due <= self.round:
            return
        if self.ctx.rank == 0:
            self.loop.regenerate(self.layout, due, self.name, distributor=distributor, device=self.device,
                                 progress=progress)
        self.ctx.barrier()
        self.round = due
        self.source = round_batches(self.layout, due, self.name, self.config, self.ctx)

    def train_epoch(self, epoch: int, progress: bool) -> dict:
        """`iters` KD steps (plus, in the joint phase, the encoder's feedback and L_cl; for DFSR/DFMC, the
        generator's turns); returns the epoch's log record."""
        from d4ir.shards.progress import progress_bar

        config, loop, adversarial, device = self.config, self.loop, self.adversarial, self.device
        joint = loop is not None and epoch < config.joint_epochs
        lr = halved_lr(config.lr, epoch, config.lr_halve_every)
        for g in self.opt.param_groups:
            g["lr"] = lr
        for g in self.enc_opt.param_groups if self.enc_opt is not None else []:
            g["lr"] = halved_lr(config.encoder_lr, epoch, config.lr_halve_every)
        self.source.set_epoch(epoch)
        errors_before = getattr(self.source, "decode_errors", 0)
        t0, sums = time.perf_counter(), {"kd": 0.0, "fb": 0.0, "cl": 0.0, "gen": 0.0}
        bar = progress_bar(range(self.iters), desc=f"distill {self.name} {epoch + 1}/{config.epochs}",
                           enabled=progress and not self.ctx.rank, leave=False)
        for i in bar:
            x = self.source.next(self.rng, device)  # [B, 3, crop, crop]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                with torch.no_grad():
                    target = self.teacher(x)
                student_out = self.model(x)
                loss = l_kd = kd_loss(student_out, target, config.loss) if adversarial is None else \
                    adversarial.student_loss(student_out, target, x)
                if joint:
                    l_fb = (loop.feedback_loss(self.model, self.teacher, self.rng, config.feedback_batch,
                                               config.loss, device)
                            if config.feedback_batch else torch.zeros((), device=device))
                    l_cl = loop.contrastive_loss(self.rng, config.batch_size, device) if config.gamma else l_fb * 0
                    loss = l_kd + l_fb + config.gamma * l_cl
                    sums["fb"] += float(l_fb.detach())
                    sums["cl"] += float(l_cl.detach())
            self.opt.zero_grad(set_to_none=True)
            if self.enc_opt is not None:
                self.enc_opt.zero_grad(set_to_none=True)
            loss.backward()
            if joint:
                average_gradients(loop.encoder, self.ctx)
            self.opt.step()
            if joint:
                self.enc_opt.step()
            if adversarial is not None and adversarial.due(epoch * self.iters + i):  # DFSR's min-max: G's turn
                sync = (lambda g: average_gradients(g, self.ctx)) if self.ctx.world > 1 else None
                sums["gen"] += adversarial.generator_step(self.student, self.teacher, amp=self.amp,
                                                          sync_grads=sync)["generator_loss"]
            sums["kd"] += float(l_kd.detach())
            bar.set_postfix(kd=f"{float(l_kd.detach()):.5f}")
        record = {"round": self.round, "lr": lr, "joint": joint, "seconds": time.perf_counter() - t0,
                  **{f"loss_{k}": v / self.iters for k, v in sums.items()}}
        if isinstance(self.source, ShardBatches):
            record |= {"decode_errors": self.source.decode_errors - errors_before,
                       "skipped_shards": self.source.skipped}
        return record

    def end_epoch(self, epoch: int, record: dict, val, progress: bool) -> None:
        """Rank 0: validate, log the record, write the weights, then the resumable state."""
        if self.ctx.rank:
            return
        if val:
            self.metrics = evaluate_model(self.student, val, device=self.device, reference=self.teacher,
                                          progress=False)["mean"]
            record.update({f"val_{k}": v for k, v in self.metrics.items()})

        def save() -> None:
            save_model(self.out / STUDENT_STEM, self.student, self.name)
            if self.loop is not None:
                save_weights(self.out / PROMPT_ENCODER_STEM, self.loop.encoder.state_dict(),
                             encoder_record(self.loop.encoder, self.loop.record(self.round)))

        self.epochs.end_epoch(epoch, record, save, extra={"round": self.round, "metrics": self.metrics},
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
        params = count_parameters(self.student)
        if self.ctx.rank == 0 and val:
            final = evaluate_model(self.student, val, device=self.device, reference=self.teacher, progress=False)
            write_eval(self.out / EVAL_FILE, final, model=str(self.layout.student_weights(self.name)),
                       pairs=str(val_dir), reference=self.t_info.record(), data=self.config.data, round=self.round)
        if self.ctx.rank == 0:
            atomic_write_json(self.out / CONFIG_FILE, {**asdict(self.config), **self.settings, "params": params,
                                                       "round": self.round, "teacher": self.t_info.record()})
        self.ctx.barrier()
        skipped = ([val.summary()] if val and val.skipped else []) + self.skipped
        return DistillResult(self.out, params, self.round, self.metrics, skipped)
