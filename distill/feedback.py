"""The prompt-encoder feedback loop of the joint phase (paper Eq. 9; docs/design.md "The feedback loop").

L_kd must reach the prompt encoder Enc_DP, but the shards were synthesized offline by 35 DDIM steps of a
frozen SD, which no gradient can cross. The surrogate: on a small feedback batch,

    prompt = Enc_DP(web degraded crop)                          [b, L, D]   (grad)
    x_hat  = Dec(x0_pred(UNet(z_T', T', prompt)))               [b, 3, S, S] (one UNet call, grad through
                                                                 SD's activations; SD weights frozen)
    L_fb   = L_kd(N_S(x_hat), N_T(x_hat))

where z_T' is a web clean image's latent noised to the CCD start step by Eq. (6) and x0_pred is the DDIM
step's own prediction of the clean latent (`synth.ccd.feedback_surrogate`). This is the first step of the
sampler with its remaining 34 steps replaced by their x0 estimate: it shows the encoder how its prompt
moves the synthesized image and so the teacher-student discrepancy. L_cl (Eq. 3) keeps the features
degradation-aware: MoCo on two crops of a web degraded image with stage 1's MoCo settings, a momentum key
encoder (started as a copy of the encoder) and a fresh queue. Every R epochs the real sampler regenerates
the shards with the updated encoder (`regenerate`), so the improved prompts reach the student through the
data; those rounds belong to the student (shards.layout). `open_loop` loads the SD for it (checked to be the one the
shards were made by) and builds it.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from d4ir.shards.folders import check_files, scan_images
from d4ir.shards.images import read_rgb
from d4ir.shards.layout import RunLayout
from d4ir.shards.records import RoundManifest
from d4ir.shards.writer import read_manifest
from d4ir.synth.ccd import CCDConfig, feedback_surrogate, prepare_clean
from d4ir.synth.embed import EncoderTraining, export_prompts, load_prompt_encoder
from d4ir.synth.inputs import check_sd
from d4ir.synth.moco import MoCoQueue, moco_step
from d4ir.synth.plan import SynthConfig
from d4ir.synth.sd import SDSource, load_sd_cached
from d4ir.synth.sd_parts import SDParts
from d4ir.synth.worker import Distributor, synthesize
from torch import nn

from .config import DistillConfig
from .data import random_crop, to_batch
from .losses import kd_loss


def round0_photos(base: RoundManifest, *, verify: bool = True) -> list:
    """Round 0's clean photos as its manifest records them ([name, bytes, sha256] under its clean_dir), checked to
    be all there and unchanged (with `verify`; `synthesize` checks them itself when it draws a plan from them): a
    regeneration round is drawn from exactly these, never from what the folder holds now (a photo added or
    removed since would change every sample's draw)."""
    folder = Path(base.clean_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"round 0 was synthesized from {folder}, which is gone: the regeneration rounds need "
                                "the same clean photos (or --round-every 0)")
    if base.clean_files is None:
        raise ValueError("round 0's manifest does not name its clean photos (it was synthesized before d4ir recorded "
                         "them): synthesize round 0 again to regenerate from it, or pass --round-every 0")
    if verify:
        check_files(folder, base.clean_files, "round 0's clean photos",
                    "the regeneration rounds are made from exactly these; restore them, or pass --round-every 0")
    return base.clean_files


def synth_config_of(manifest: RoundManifest) -> SynthConfig:
    """The SynthConfig a round's manifest records."""
    cfg = dict(manifest.config)
    return SynthConfig(**{**cfg, "ccd": CCDConfig(**cfg["ccd"])})


class FeedbackLoop(nn.Module):
    """The trainable prompt encoder with its MoCo key encoder and queue, and the data its losses need.

    Args:
        prompts_dir: stage 1's prompts folder (its encoder is the starting point; its MoCo settings are used).
        sd: the frozen SD used by the surrogate.
        degraded_dir, clean_dir: the web degraded / clean folders.
        ccd: the sampler settings of the shards (the surrogate noises to the same start step).
        device: where the encoders live.
        seed: the MoCo queue's random start, from its own generator: the global RNG is whatever loading the SD
            left it at, which differs between a folder, a single file and a hub id of one model.
    """

    def __init__(
        self, prompts_dir: Path, sd: SDParts, degraded_dir: Path, clean_dir: Path, ccd: CCDConfig, *,
        device: str = "cpu", seed: int = 0,
    ) -> None:
        super().__init__()
        self.training = EncoderTraining.read(prompts_dir)  # stage 1's crop, MoCo settings and embedding rule
        self.encoder = load_prompt_encoder(prompts_dir, device=device).train()
        self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.queue = MoCoQueue(self.encoder.feat_dim, self.training.moco.queue_size,
                               generator=torch.Generator().manual_seed(seed)).to(device)
        self.sd, self.ccd = sd, ccd
        self.degraded_paths = scan_images(degraded_dir, min_side=1).paths
        self.clean_paths = scan_images(clean_dir, min_side=1).paths
        if not self.degraded_paths or not self.clean_paths:
            raise ValueError(f"the feedback loop needs web images: {degraded_dir} and {clean_dir} hold none usable")
        self.degraded_dir, self.clean_dir = Path(degraded_dir), Path(clean_dir)
        self._degraded = [read_rgb(p, min_side=1) for p in self.degraded_paths]
        self._clean = [prepare_clean(read_rgb(p, min_side=1), ccd.size) for p in self.clean_paths]

    def contrastive_loss(self, rng: np.random.Generator, batch: int, device: str) -> torch.Tensor:
        """L_cl, Eq. (3): query and positive are two crops of one web degraded image."""
        picks = rng.integers(0, len(self._degraded), batch)
        crop = self.training.crop
        xq = to_batch([random_crop(rng, crop, self._degraded[i])[0] for i in picks], device)
        xk = to_batch([random_crop(rng, crop, self._degraded[i])[0] for i in picks], device)
        return moco_step(self.encoder, self.key_encoder, self.queue, xq, xk, self.training.moco)[0]

    def feedback_loss(
        self, student: nn.Module, teacher: nn.Module, rng: np.random.Generator, batch: int, weights: dict,
        device: str,
    ) -> torch.Tensor:
        """L_kd on surrogate images x_hat (differentiable w.r.t. the encoder through the frozen SD)."""
        d = rng.integers(0, len(self._degraded), batch)
        c = rng.integers(0, len(self._clean), batch)
        side = min(self.training.embed_side, *(min(self._degraded[i].shape[:2]) for i in d))
        prompt_src = to_batch([random_crop(rng, side, self._degraded[i])[0] for i in d], device)
        prompt = self.encoder.prompt(prompt_src).to(self.sd.dtype)  # [b, L, D]
        clean = torch.stack([self._clean[i] for i in c]).to(device)
        gens = [torch.Generator(device=self.sd.device).manual_seed(int(s)) for s in rng.integers(0, 2**31, batch)]
        x_hat = feedback_surrogate(self.sd, clean.to(self.sd.dtype), prompt, gens, config=self.ccd).float()
        return kd_loss(student(x_hat), teacher(x_hat), weights)

    def record(self, round_number: int) -> EncoderTraining:
        """The training record of the encoder as it is now, for round `round_number`: stage 1's, with this run's
        web degraded images (the prompts are computed from them)."""
        return replace(self.training, round=round_number, degraded_dir=str(self.degraded_dir.resolve()),
                       num_images=len(self.degraded_paths))

    def regenerate(
        self, layout: RunLayout, round_number: int, student: str, *, distributor: Distributor | None = None,
        device: str = "cpu", progress: bool = True,
    ) -> Path:
        """Write the student's round `round_number`: embed the web degraded images with the current encoder,
        then synthesize round 0's plan (exactly its clean photos, checked; its prompt rows, seeds, SD, dtype and
        settings)."""
        prompts_dir = layout.round_prompts(round_number, student)
        export_prompts(self.encoder, self.degraded_paths, prompts_dir, self.sd, training=self.record(round_number),
                       device=device)
        base = read_manifest(layout.round_shards(0))
        config = replace(synth_config_of(base), round=round_number)
        result = synthesize(
            Path(base.clean_dir),
            layout.shards_root(student),
            config,
            sd_source=SDSource(base.provenance.sd, base.provenance.sd_config),
            prompts_dir=prompts_dir,
            device=device,
            dtype=base.dtype,
            distributor=distributor,
            progress=progress,
            clean_files=round0_photos(base, verify=False),  # synthesize hashes each photo once, not twice
        )
        return result.round_dir


def open_loop(layout: RunLayout, config: DistillConfig, first: tuple[int, RoundManifest] | None, device: str, *,
              amp: bool, sd_source: SDSource | str | None = None, degraded_dir: Path | None = None,
              clean_dir: Path | None = None) -> FeedbackLoop | None:
    """D4IR's side of stage 3 that needs the frozen SD: with `sd_source` (or for the joint phase) the SD is loaded
    and checked to be the one round `first` (`distill.sources.open_round`) was made by; for the joint phase
    (`config.joint`) the feedback loop is built on it. None when nothing trains the encoder."""
    if first is None or (sd_source is None and not config.joint):
        return None
    current, manifest = first
    made = manifest.provenance
    sd_from = SDSource.of(sd_source or SDSource(made.sd, made.sd_config))
    # in the dtype the round was made in, so that its regeneration rounds compute as it did
    sd = load_sd_cached(sd_from, device, manifest.dtype)
    check_sd(manifest, sd, sd_from, layout.round_shards(current))
    if not config.joint:
        return None
    if not amp and sd.dtype != torch.float32:  # the surrogate runs in fp32 without autocast
        sd = load_sd_cached(sd_from, device, "float32")
    base = read_manifest(layout.round_shards(0))
    if config.regenerates:
        round0_photos(base)  # before any training: a regeneration would fail epochs later
    return FeedbackLoop(layout.prompts, sd, degraded_dir, clean_dir, synth_config_of(base).ccd, device=device,
                        seed=config.seed)
