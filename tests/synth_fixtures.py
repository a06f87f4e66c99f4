"""Shared inputs and helpers of the stage-2 tests (test_synth_worker.py, test_synth_faults.py): clean photos,
random prompt tables, one reference round, and byte-level comparisons of rounds."""

from __future__ import annotations

import json
import tarfile
from io import BytesIO
from pathlib import Path

import d4ir.synth.worker as worker
import numpy as np
import torch
from d4ir.shards.embeddings import save_embeddings
from d4ir.synth.ccd import CCDConfig
from d4ir.synth.plan import SynthConfig
from d4ir.synth.sd import build_tiny_sd
from d4ir.synth.worker import synthesize
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# 6 samples in 3 shards of 2, one UNet call per 2 images; 4 DDIM steps at strength 0.5 -> 2 denoising steps.
CFG = SynthConfig(num_samples=6, shard_size=2, batch_size=2, ccd=CCDConfig(steps=4, strength=0.5, size=32), seed=3)
# Prompts made for the tiny SD: stage 2 refuses prompts whose recorded SD fingerprint is another model's.
TINY_FINGERPRINT = build_tiny_sd(0).fingerprint
PROMPT_META = {"encoder_sha256": "e" * 64, "sd_fingerprint": TINY_FINGERPRINT, "sd_model_id": "tiny"}
# `d4ir synth` at the demo preset, shrunk: 8 images in 4 shards of 2 at 32x32.
CLI_OVERRIDES = ["--num-samples", "8", "--shard-size", "2", "--batch-size", "2", "--steps", "4", "--size", "32"]


def make_clean(folder: Path, sizes=((40, 48), (64, 36), (32, 32), (50, 70))) -> Path:
    """Random-noise clean photos of several shapes (prepare_clean crops each to 32x32)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"clean{i}.png")
    return folder


def make_prompts(folder: Path, n: int = 5, tokens: int = 4, seed: int = 0, meta: dict = PROMPT_META) -> Path:
    """An embeddings file of random prompts [n, tokens, 32] (the tiny UNet's cross_attention_dim)."""
    embeds = torch.randn(n, tokens, 32, generator=torch.Generator().manual_seed(seed))
    sources = [{"path": f"degraded{i}.png", "sha256": "0" * 64} for i in range(n)]
    save_embeddings(folder, embeds, sources, meta)
    return folder


def run(inputs: dict, round_dir: Path, config: SynthConfig = CFG, **kw) -> worker.SynthResult:
    """Synthesize round `config.round` into `round_dir` (its parent is the shards root)."""
    assert round_dir.name == f"round-{config.round:03d}", round_dir
    kw.setdefault("prompts_dir", inputs["prompts"])
    return synthesize(inputs["clean"], round_dir.parent, config, sd_source=kw.pop("sd", "tiny"), progress=False, **kw)


def rounds(path: Path) -> Path:
    """Round 0's folder under the shards root `path`."""
    return path / "round-000"


def tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def stats(folder: Path) -> dict[str, dict]:
    """Every stats file without its wall-clock `seconds` and the errors of earlier attempts (`retries`)."""
    out = {}
    for p in sorted(folder.glob("*.stats.json")):
        s = json.loads(p.read_text())
        s.pop("seconds")
        s.pop("retries", None)
        out[p.name] = s
    return out


def assert_same_shards(a: Path, b: Path) -> None:
    tars_a, tars_b = sorted(a.glob("*.tar")), sorted(b.glob("*.tar"))
    assert [p.name for p in tars_a] == [p.name for p in tars_b] and tars_a
    for pa, pb in zip(tars_a, tars_b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    assert stats(a) == stats(b)
    assert (a / "sizes.json").read_bytes() == (b / "sizes.json").read_bytes()


def samples(folder: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """key -> (synthesized image [S,S,3] uint8, provenance json) over every tar of a round."""
    out: dict[str, dict] = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar:
                key, _, field = info.name.partition(".")
                out.setdefault(key, {})[field] = tar.extractfile(info).read()
    return {
        k: (np.asarray(Image.open(BytesIO(v["degraded.png"]))), json.loads(v["json"])) for k, v in sorted(out.items())
    }
