"""Real Stable Diffusion layouts as users have them (tests/real_sd_fixtures.py: SD1.5 and SD2.1 at narrow
widths, random weights) through every loader and a tiny pipeline: a diffusers folder, a CompVis single file
with its configs from a folder or the hub cache (`--sd FILE --sd-config ...`), and a hub-cache snapshot under
a temporary HF_HOME with HF_HUB_OFFLINE=1. The three sources are one model (equal fingerprints and weights);
the prompts start from the empty text at the UNet's width (768 / 1024); prompt mode "text", the feedback
surrogate and a regeneration round run; SD2.1's v-prediction matches diffusers' own img2img pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from d4ir.shards.embeddings import load_embeddings
from d4ir.shards.layout import RunLayout
from d4ir.shards.verify import verify_shards
from d4ir.synth.ccd import CCDConfig, ccd_sample, feedback_surrogate
from d4ir.synth.embed import load_prompt_encoder, prompt_encoder_info
from d4ir.synth.moco import MoCoConfig
from d4ir.synth.plan import WEATHER_TEXT, SynthConfig
from d4ir.synth.prompts import PromptsConfig, train_prompts
from d4ir.synth.sd import SDLoadError, SDSource, load_sd, load_sd_cached
from d4ir.synth.worker import synthesize
from real_sd_fixtures import make_images, save_folder, to_compvis, to_hub_cache

ROOT = Path(__file__).resolve().parents[1]
WIDTH = {"sd15": 768, "sd21": 1024}
PREDICTION = {"sd15": "epsilon", "sd21": "v_prediction"}
CCD = CCDConfig(steps=4, strength=0.5, size=64)  # 2 UNet calls per image
PROMPTS = PromptsConfig(feat_dim=8, widths=(4, 8, 8), token_rank=4, steps=2, batch_size=4, crop=16,
                        moco=MoCoConfig(queue_size=4), embed_side=32)  # prompt_tokens: the default 77


@dataclass(frozen=True)
class Stored:
    kind: str
    folder: Path  # (a) diffusers folder
    file: Path  # (b) CompVis single file
    hub_id: str  # (c) in the cache under hf_home
    hf_home: Path

    def sources(self) -> dict[str, SDSource]:
        return {"folder": SDSource(self.folder), "hub": SDSource(self.hub_id),
                "file": SDSource(self.file, config=self.hub_id if self.kind == "sd21" else str(self.folder))}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Both layouts in all three forms, the hub cache made the process's cache (offline) for the module."""
    root = tmp_path_factory.mktemp("real-sd")
    hf_home = root / "hf_home"
    out = {}
    for kind in WIDTH:
        folder = save_folder(kind, root / kind)
        to_compvis(folder, kind, root / f"{kind}-compvis.safetensors")
        to_hub_cache(folder, hf_home, f"d4ir-test/{kind}-narrow")
        out[kind] = Stored(kind, folder, root / f"{kind}-compvis.safetensors", f"d4ir-test/{kind}-narrow", hf_home)
    import huggingface_hub.constants as hub_constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(hf_home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"))  # read at import time from HF_HOME
        yield out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return {"degraded": make_images(root / "degraded", 8, seed=1), "clean": make_images(root / "clean", 4, seed=2)}


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", list(WIDTH))
def test_three_sources_are_one_model(stored, kind):
    s = stored[kind]
    loaded = {name: load_sd(source) for name, source in s.sources().items()}
    folder = loaded["folder"]
    assert folder.cross_attention_dim == WIDTH[kind] and folder.text_encoder.config.hidden_size == WIDTH[kind]
    assert loaded["hub"].model_id == s.hub_id and loaded["file"].model_id == str(s.file)
    for name, parts in loaded.items():
        assert parts.scheduler.config.prediction_type == PREDICTION[kind], name
        assert parts.text_encoder is not None and parts.tokenizer is not None, name
        assert parts.fingerprint == folder.fingerprint, name
        for module in ("unet", "vae", "text_encoder"):  # the CompVis conversion is exact, weight for weight
            assert _states_equal(getattr(parts, module), getattr(folder, module)), (name, module)
    emb = {name: parts.encode_text([WEATHER_TEXT["dehaze"], ""]) for name, parts in loaded.items()}
    assert emb["folder"].shape == (2, 77, WIDTH[kind]) and torch.isfinite(emb["folder"]).all()
    for name in ("hub", "file"):
        torch.testing.assert_close(emb[name], emb["folder"], rtol=0, atol=1e-5)
    pad = folder.tokenizer.pad_token
    assert pad == ("!" if kind == "sd21" else "<|endoftext|>")


def test_single_file_text_encoder_needs_its_configs(stored, tmp_path):
    s = stored["sd21"]
    bare = shutil.copytree(s.folder, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.rmtree(bare / "text_encoder")
    with pytest.raises(SDLoadError, match="holds a text encoder, but its configs .* have no text_encoder/"):
        load_sd(SDSource(s.file, config=str(bare)))
    with pytest.raises(SDLoadError, match="'v2' checkpoint; only SD1.x single files load without a config"):
        load_sd(str(s.file))
    from d4ir.synth.sd_files import _single_file_text
    from safetensors.torch import load_file

    state = load_file(str(stored["sd15"].file))  # an SD1.x file without configs: UNet/VAE only, said loudly
    with pytest.warns(UserWarning, match="holds a text encoder, but its config and tokenizer are not in the file"):
        assert _single_file_text(state, stored["sd15"].file, None, torch.float32) == (None, None)


@pytest.mark.parametrize("kind", list(WIDTH))
def test_a_tiny_pipeline_on_the_real_layout(stored, photos, kind, tmp_path):
    s = stored[kind]
    source = s.sources()["file" if kind == "sd21" else "hub"]  # SD2.1: the single file with hub configs
    sd = load_sd_cached(source, "cpu", "float32")
    layout = RunLayout(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no zero base, no truncated prompts: nothing to warn about
        train_prompts(photos["degraded"], sd, layout.prompts, PROMPTS, progress=False)
    emb = load_embeddings(layout.prompts)
    assert emb.prompt_embeds.shape == (8, 77, WIDTH[kind])
    encoder = load_prompt_encoder(layout.prompts)
    assert prompt_encoder_info(layout.prompts)["training"]["base"] == "empty-text"
    torch.testing.assert_close(encoder.base_prompt, sd.encode_text([""]).float(), rtol=0, atol=0)

    config = SynthConfig(num_samples=2, shard_size=2, batch_size=2, ccd=CCD)
    r = synthesize(photos["clean"], layout.shards, config, sd_source=source, prompts_dir=layout.prompts,
                   progress=False)
    assert (r.images, r.failures) == (2, 0) and verify_shards(r.round_dir) == []
    manifest = json.loads((r.round_dir / "manifest.json").read_text())
    assert manifest["sd_fingerprint"] == sd.fingerprint and manifest["sd_config"] == source.config
    text = synthesize(photos["clean"], tmp_path / "text", replace(config, prompt_mode="text"), sd_source=source,
                      progress=False)
    assert (text.images, text.failures) == (2, 0)

    # stage 3's feedback loop on this SD: the surrogate's gradient reaches the encoder, then a new round
    from d4ir.distill.feedback import FeedbackLoop
    from d4ir.distill.registry import build

    loop = FeedbackLoop(layout.prompts, sd, photos["degraded"], photos["clean"], CCD)
    small = dict(n_feats=8, n_groups=1, n_blocks=1, queue_size=4)
    student, teacher = build("airnet", **small), build("airnet", **small).eval()
    loss = loop.feedback_loss(student, teacher, np.random.default_rng(0), 1, {"l2": 1.0}, "cpu")
    loss.backward()
    assert torch.isfinite(loss) and loop.encoder.prompt_gain.grad.abs().sum() > 0
    regenerated = loop.regenerate(layout, 1, "student", progress=False)
    assert verify_shards(regenerated) == []
    assert json.loads((regenerated / "manifest.json").read_text())["sd_fingerprint"] == sd.fingerprint


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_v_prediction_matches_diffusers(stored):
    from d4ir.synth.reference import diffusers_img2img, diffusers_x0

    sd = load_sd_cached(stored["sd21"].sources()["hub"], "cpu", "float32")
    assert sd.scheduler.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(3)
    clean, prompts = torch.rand(2, 3, 64, 64, generator=g), sd.encode_text(["a photo", WEATHER_TEXT["desnow"]])
    ours = ccd_sample(sd, clean, prompts, _gens(7, 8), CCD)
    ref = diffusers_img2img(sd)(image=clean, prompt_embeds=prompts, strength=CCD.strength,
                                num_inference_steps=CCD.steps, guidance_scale=1.0, eta=0.0, generator=_gens(7, 8),
                                output_type="pt").images
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    assert (ours - clean).abs().mean() > 0.05
    # the feedback surrogate's x0 is DDIM's own v-prediction pred_original_sample
    ours = feedback_surrogate(sd, clean[:1], prompts[:1], _gens(9), config=CCD)
    want = diffusers_x0(sd, clean[:1], prompts[:1], torch.Generator().manual_seed(9), CCD)
    torch.testing.assert_close(ours.detach(), want, rtol=0, atol=1e-4)


def test_cli_takes_an_sd2_single_file_with_hub_configs(stored, photos, tmp_path):
    """`d4ir prompts --sd FILE --sd-config HUB_ID` in a fresh process whose only cache is HF_HOME, offline."""
    s = stored["sd21"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(s.hf_home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "d4ir.pipelines.cli", "prompts", "--run-dir", str(tmp_path / "run"), "--degraded",
           str(photos["degraded"]), "--sd", str(s.file), "--sd-config", s.hub_id, "--preset", "demo", "--device",
           "cpu", "--steps", "2", "--batch-size", "4", "--crop", "16", "--queue-size", "4", "--widths", "4,8,8",
           "--feat-dim", "8", "--token-rank", "4", "--embed-side", "32"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "prompts: 8 images embedded" in done.stdout
    emb = load_embeddings(tmp_path / "run" / "prompts")
    assert emb.prompt_embeds.shape == (8, 77, 1024)  # the demo preset keeps the text encoder's 77 tokens
    assert emb.metadata["sd_fingerprint"] == load_sd(s.sources()["folder"]).fingerprint
