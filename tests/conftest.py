"""Shared fixtures: a tiny finished run folder (stages 1 and 2 done, a teacher saved) for the stage-3 tests.

`tiny_run` is built once per session (about 10 s on the CPU): web degraded/clean photos and a paired
val set drawn with PIL, `train_prompts` with the tiny SD, one shard round of 8 images in 2 shards, and a
small AirNet teacher. Tests that write into a run (students, regeneration rounds) take `run_copy`, a
private copy, so the session's run stays as built.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SIDE = 32  # every drawn photo is SIDE x SIDE (the synth size: no resizing)
TEACHER_KWARGS = dict(n_feats=8, n_groups=1, n_blocks=1, queue_size=16)
SYNTH = dict(num_samples=8, shard_size=4, batch_size=4, steps=4, strength=0.5, size=32)
CCD_KEYS = ("steps", "strength", "size", "guidance_scale", "z0", "eta")


def synth_config(**overrides):
    """A SynthConfig from the flat SYNTH settings (the sampler's keys go into its nested CCDConfig)."""
    from d4ir.synth.ccd import CCDConfig
    from d4ir.synth.plan import SynthConfig

    flat = {**SYNTH, **overrides}
    ccd = CCDConfig(**{k: flat.pop(k) for k in CCD_KEYS if k in flat})
    return SynthConfig(ccd=ccd, **flat)


def make_brightened_pairs(root: Path, count: int, shape: tuple[int, int]) -> Path:
    """`count` paired random photos of `shape` (H, W) under root/{clean,degraded}/i.png, the degraded side
    brightened by 40 levels (a simple "haze" a network learns in a few steps)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        clean = rng.integers(0, 200, (*shape, 3), dtype=np.uint8)
        degraded = np.clip(clean.astype(int) + 40, 0, 255).astype(np.uint8)
        for name, img in (("clean", clean), ("degraded", degraded)):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def round_manifest(sd: str = "tiny", shards: dict | None = None, **changes):
    """A complete, valid RoundManifest for tests that need one on disk (fields as `synthesize` writes them)."""
    from dataclasses import replace

    from d4ir.shards.records import Provenance, RoundManifest

    shards = {"000000.tar": 2} if shards is None else shards
    made = Provenance(sd, None, "f" * 64, encoder_sha256="e" * 64)
    base = RoundManifest(config={"round": 0, "num_samples": sum(shards.values())}, config_hash="c" * 16,
                         plan_hash="p" * 16, shards=shards, clean_dir="/clean", prompts_dir=None,
                         clean_scan={"usable": 1}, clean_files=[], provenance=made, dtype="float32")
    return replace(base, **changes)


def _prompts_config():
    from d4ir.synth.moco import MoCoConfig
    from d4ir.synth.prompts import PromptsConfig

    return PromptsConfig(prompt_tokens=4, feat_dim=8, widths=(4, 8, 8), token_rank=4, steps=2, batch_size=4,
                         crop=16, moco=MoCoConfig(queue_size=4), embed_side=32)


PROMPTS = _prompts_config()


def pytest_configure(config) -> None:
    """One intra-op thread unless OMP_NUM_THREADS says otherwise: the tests' tensors are tiny, and on a
    shared 2-core machine two spinning OpenMP threads per op made the tiny SD 20x slower, not faster."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


@dataclass(frozen=True)
class TinyRun:
    """Paths of the session's tiny run (RUN/prompts, RUN/shards/round-000) and of its input folders."""

    root: Path  # RUN
    teacher: Path  # RUN/teacher/teacher.safetensors
    degraded: Path  # web degraded photos
    clean: Path  # web clean photos
    val: Path  # paired set: val/degraded, val/clean
    original: Path  # the teacher's "private" paired set (data "original" reads its degraded side)

    def copy_to(self, dest: Path) -> TinyRun:
        """A private copy of RUN (the web folders are shared: nothing writes to them)."""
        shutil.copytree(self.root, dest)
        teacher = dest / self.teacher.relative_to(self.root)
        return TinyRun(dest, teacher, self.degraded, self.clean, self.val, self.original)


def _photo(rng: np.random.Generator) -> Image.Image:
    """A clean-ish photo: a colour gradient with a few random rectangles and ellipses."""
    y, x = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    t = (0.5 * x + 0.5 * y)[..., None]
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, SIDE - 8, 2)
        box = [int(x0), int(y0), int(x0 + rng.integers(6, 20)), int(y0 + rng.integers(6, 20))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=fill)
    return img


def _rain(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Bright slanted streaks and a slight haze: a stand-in for the demo's physical rain."""
    a = np.asarray(img, dtype=np.float32)
    streaks = np.zeros(a.shape[:2], np.float32)
    for _ in range(30):
        x, y = rng.integers(0, SIDE, 2)
        for k in range(int(rng.integers(4, 10))):
            if 0 <= y + k < SIDE and 0 <= x + k // 3 < SIDE:
                streaks[y + k, x + k // 3] = 1.0
    a = 0.85 * a + 0.15 * 200 + 120 * streaks[..., None]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_photos(root: Path, seed: int = 0) -> dict[str, Path]:
    """web_degraded (8), web_clean (8), and val/ and original/ (6 degraded/clean pairs each): SIDE x SIDE PNGs."""
    rng = np.random.default_rng(seed)
    names = ("web_degraded", "web_clean", "val/degraded", "val/clean", "original/degraded", "original/clean")
    folders = {k: root / k for k in names}
    for f in folders.values():
        f.mkdir(parents=True)
    for i in range(8):
        _rain(_photo(rng), rng).save(folders["web_degraded"] / f"w{i}.png")
        _photo(rng).save(folders["web_clean"] / f"c{i}.png")
    for split in ("val", "original"):
        for i in range(6):
            clean = _photo(rng)
            clean.save(folders[f"{split}/clean"] / f"{split[0]}{i}.png")
            _rain(clean, rng).save(folders[f"{split}/degraded"] / f"{split[0]}{i}.png")
    return folders


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    import torch
    from d4ir.distill.registry import build, save_model
    from d4ir.shards.layout import RunLayout
    from d4ir.synth.prompts import train_prompts
    from d4ir.synth.sd import load_sd_cached
    from d4ir.synth.worker import synthesize

    base = tmp_path_factory.mktemp("tiny")
    photos = make_photos(base / "photos")
    run = RunLayout(base / "run")
    train_prompts(photos["web_degraded"], load_sd_cached("tiny", "cpu", "float32"), run.prompts, PROMPTS,
                  progress=False)
    synthesize(photos["web_clean"], run.shards, synth_config(), sd_source="tiny", prompts_dir=run.prompts,
               progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = build("airnet", **TEACHER_KWARGS)
    teacher_path = save_model(run.teacher_dir / "teacher", teacher)
    run = run.root
    photo_root = base / "photos"
    return TinyRun(run, teacher_path, photos["web_degraded"], photos["web_clean"], photo_root / "val",
                   photo_root / "original")


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> TinyRun:
    """A private copy of the tiny run for a test that writes students or regeneration rounds."""
    return tiny_run.copy_to(tmp_path / "run")


@pytest.fixture(scope="module")
def synth_inputs(tmp_path_factory) -> dict:
    """Clean photos of several shapes and a random prompt table for the stage-2 tests."""
    from synth_fixtures import make_clean, make_prompts

    root = tmp_path_factory.mktemp("inputs")
    return {"clean": make_clean(root / "clean"), "prompts": make_prompts(root / "prompts"), "root": root}


@pytest.fixture(scope="module")
def synth_reference(synth_inputs) -> Path:
    """One uninterrupted stage-2 run with synth_fixtures.CFG: what every other run of CFG equals byte for byte."""
    from d4ir.synth.worker import synthesize
    from synth_fixtures import CFG

    inputs = synth_inputs
    r = synthesize(inputs["clean"], inputs["root"] / "reference", CFG, prompts_dir=inputs["prompts"], progress=False)
    return r.round_dir
