"""Stage 1 end to end on a tiny folder: files, metadata, reruns, resume, input errors; and the probe."""

import json
from dataclasses import replace
from pathlib import Path

import d4ir.synth.prompts as prompts_mod
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from d4ir.pipelines.figures import probe_plot
from d4ir.shards.embeddings import load_embeddings
from d4ir.shards.images import read_rgb, to_tensor
from d4ir.shards.io import read_jsonl, sha256_file
from d4ir.shards.state import StateError, load_state
from d4ir.synth.embed import load_prompt_encoder
from d4ir.synth.moco import MoCoConfig
from d4ir.synth.probe import probe
from d4ir.synth.prompt_encoder import PromptEncoder
from d4ir.synth.prompts import PromptsConfig
from d4ir.synth.sd import load_sd
from PIL import Image

N_IMAGES, L, D = 12, 4, 16
CFG = PromptsConfig(prompt_tokens=L, feat_dim=8, widths=(4, 8, 8), token_rank=4, steps=4, batch_size=4, crop=16,
                    moco=MoCoConfig(queue_size=8), embed_side=24, checkpoint_every=2)


def train_prompts(degraded, sd, out, resume=False, **changes):
    """synth.prompts.train_prompts with the tiny config, `changes` replacing its fields."""
    config = replace(CFG, **changes)
    return prompts_mod.train_prompts(degraded, sd, out, config, resume=resume, progress=False)


def load_checkpoint(out):
    return load_state(Path(out) / "state.pt")


class FakeSD:
    """Stand-in with the SDParts attributes stage 1 reads."""

    def __init__(self, dim: int = D, base_dim: int | None = None, text: bool = True):
        self.cross_attention_dim, self.model_id, self.fingerprint = dim, "fake/sd", "f" * 64
        self._base = torch.randn(1, 77, base_dim or dim, generator=torch.Generator().manual_seed(1)) if text else None

    def empty_prompt(self, num_tokens=None):
        return None if self._base is None else self._base[:, :num_tokens]


def _image(seed: int, h: int, w: int) -> np.ndarray:
    """A smooth gradient with seed-dependent streaks (rain-like) or speckle (snow-like)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 200, w)[None, :, None].repeat(h, 0).repeat(3, 2)
    if seed % 2:
        base[:, rng.integers(0, w, 6)] += 50
    else:
        base += rng.normal(0, 25, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def degraded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("degraded")
    for i in range(N_IMAGES):
        Image.fromarray(_image(i, 24 + 4 * (i % 3), 32)).save(root / f"img{i:02d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))  # corrupt: counted and skipped
    return root


@pytest.fixture(scope="module")
def first_run(degraded, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, train_prompts(degraded, FakeSD(), out)


def test_writes_every_file_with_shapes_and_metadata(degraded, first_run):
    out, res = first_run
    for name in ("prompt_encoder.safetensors", "prompt_encoder.json", "embeddings.safetensors", "index.jsonl",
                 "train.jsonl", "state.pt"):
        assert (out / name).is_file(), name
    assert res.num_images == N_IMAGES and res.counts["usable"] == N_IMAGES and sum(res.counts.values()) == 13
    assert [(p.name, r) for p, r in res.skipped] == [("broken.png", "not an image")]

    emb = load_embeddings(out)
    assert emb.prompt_embeds.shape == (N_IMAGES, L, D) and emb.prompt_embeds.dtype == torch.float16
    cfg = json.loads((out / "prompt_encoder.json").read_text())
    assert emb.metadata["L"] == str(L) and emb.metadata["D"] == str(D)
    assert emb.metadata["encoder_sha256"] == cfg["sha256"] == res.encoder_sha256
    assert emb.metadata["sd_model_id"] == "fake/sd" and emb.metadata["sd_fingerprint"] == "f" * 64
    assert cfg["encoder"]["prompt_dim"] == D and cfg["training"]["steps"] == 4
    assert cfg["training"]["base"] == "empty-text"
    paths = sorted(degraded.glob("img*.png"))
    assert [r["path"] for r in emb.index] == [str(p) for p in paths]
    assert emb.index[3]["sha256"] == sha256_file(paths[3])

    log = read_jsonl(out / "train.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
    assert load_checkpoint(out)["step"] == 4

    # row 3 is the reloaded encoder's prompt of the central min(H, W, 24) square of image 3
    enc = load_prompt_encoder(out)
    img = to_tensor(read_rgb(paths[3], min_side=1))
    s = min(img.shape[1], img.shape[2], 24)
    top, left = (img.shape[1] - s) // 2, (img.shape[2] - s) // 2
    want = enc.prompt(img[None, :, top : top + s, left : left + s])[0]
    torch.testing.assert_close(emb.prompt_embeds[3].float(), want, atol=2e-2, rtol=1e-2)
    # prompts start from the empty text and differ per image (prompt_strength opens the residual)
    base = FakeSD().empty_prompt(L)[0]
    assert not torch.allclose(emb.prompt_embeds[0].float(), emb.prompt_embeds[1].float())
    assert (emb.prompt_embeds.float() - base).abs().mean() < base.abs().mean()


def test_rerun_with_same_seed_is_exact(degraded, first_run, tmp_path):
    out, res = first_run
    again = train_prompts(degraded, FakeSD(), tmp_path / "again")
    assert again.encoder_sha256 == res.encoder_sha256
    assert torch.equal(load_embeddings(out).prompt_embeds, load_embeddings(tmp_path / "again").prompt_embeds)
    other = train_prompts(degraded, FakeSD(), tmp_path / "other", steps=1, seed=1)
    assert other.encoder_sha256 != res.encoder_sha256


def test_resume_after_a_crash_matches_the_uninterrupted_run(degraded, first_run, tmp_path, monkeypatch):
    out, res = first_run
    calls = {"n": 0}
    real = prompts_mod.moco_step

    def crash_on_step_4(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed after the step-2 checkpoint and the logged step 3
        return real(*args, **kw)

    monkeypatch.setattr(prompts_mod, "moco_step", crash_on_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_prompts(degraded, FakeSD(), tmp_path)
    assert load_checkpoint(tmp_path)["step"] == 2 and len(read_jsonl(tmp_path / "train.jsonl")) == 3
    assert not (tmp_path / "prompt_encoder.safetensors").exists()
    monkeypatch.setattr(prompts_mod, "moco_step", real)
    resumed = train_prompts(degraded, FakeSD(), tmp_path, resume=True)
    assert resumed.encoder_sha256 == res.encoder_sha256
    assert torch.equal(load_embeddings(out).prompt_embeds, load_embeddings(tmp_path).prompt_embeds)
    assert read_jsonl(tmp_path / "train.jsonl") == read_jsonl(out / "train.jsonl")
    with pytest.raises(StateError, match="settings changed.*lr"):
        train_prompts(degraded, FakeSD(), tmp_path, resume=True, lr=0.5)


def test_too_few_images_is_an_error_before_training(degraded, tmp_path):
    with pytest.raises(ValueError, match="12 usable degraded images.*fewer than one batch of 16"):
        train_prompts(degraded, FakeSD(), tmp_path, batch_size=16)
    assert not (tmp_path / "state.pt").exists() and not (tmp_path / "train.jsonl").exists()
    with pytest.raises(ValueError, match="0 usable"):  # every image shorter than the crop
        train_prompts(degraded, FakeSD(), tmp_path, crop=40)


def test_width_mismatch_is_an_error_before_training(degraded, first_run, tmp_path):
    out, _ = first_run
    before = (out / "train.jsonl").read_bytes()
    with pytest.raises(ValueError, match="width mismatch.*D=16.*cross_attention_dim=24"):
        train_prompts(degraded, FakeSD(dim=24), out, resume=True)
    assert (out / "train.jsonl").read_bytes() == before
    with pytest.raises(ValueError, match="width mismatch"):  # an SD whose text width is not its UNet's
        train_prompts(degraded, FakeSD(dim=24, base_dim=16), tmp_path)
    with pytest.raises(TypeError, match="cross_attention_dim"):
        train_prompts(degraded, object(), tmp_path)


def test_no_text_encoder_and_zero_strength(degraded, tmp_path):
    with pytest.warns(UserWarning, match="'fake/sd' has no text encoder: the prompt encoder's base prompt is zeros"):
        res = train_prompts(degraded, FakeSD(text=False), tmp_path / "notext", steps=1)
    assert json.loads((res.out_dir / "prompt_encoder.json").read_text())["training"]["base"] == "zeros"
    emb = load_embeddings(res.out_dir).prompt_embeds.float()
    rms = emb.pow(2).mean(-1).sqrt()  # without a base each token is layer-normed: unit RMS
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-2)
    res = train_prompts(degraded, FakeSD(), tmp_path / "zero", steps=1, prompt_strength=0.0)
    base = FakeSD().empty_prompt(L).half().expand(N_IMAGES, L, D)
    assert torch.equal(load_embeddings(res.out_dir).prompt_embeds, base)


# --- probe -----------------------------------------------------------------------------------------------


class MeanColour(torch.nn.Module):
    """Stub encoder whose feature is the crop's mean colour (the probe's reference case)."""

    def features(self, x):
        return F.normalize(x.mean(dim=(2, 3)), dim=1)


def test_probe_accuracy_and_plot(tmp_path):
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    by_type = {}
    for name, rgb in colours.items():
        by_type[name] = []
        for i in range(3):
            arr = np.clip(np.array(rgb) + np.random.default_rng(i).normal(0, 10, (20, 20, 3)), 0, 255)
            p = tmp_path / f"{name}{i}.png"
            Image.fromarray(arr.astype(np.uint8)).save(p)
            by_type[name].append(p)
    (tmp_path / "bad.png").write_bytes(b"")
    by_type["red"].append(tmp_path / "bad.png")
    res = probe(MeanColour(), by_type, crop=8, crops_per_image=2)
    probe_plot(res, tmp_path / "pca.png")
    assert res["accuracy"] == 1.0 and res["chance"] == pytest.approx(1 / 3)
    assert res["num_images"] == 9 and res["num_crops"] == 18
    assert res["skipped"] == [(tmp_path / "bad.png", "zero bytes")]
    with Image.open(tmp_path / "pca.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    # a constant feature cannot tell the types apart: every nearest neighbour is the first other image's
    const = probe(type("C", (torch.nn.Module,), {"features": lambda self, x: torch.ones(len(x), 2)})(),
                  by_type, crop=8, crops_per_image=2)
    assert const["accuracy"] < 0.5
    with pytest.raises(ValueError, match="at least 2 types|at least 2 degradation types"):
        probe(MeanColour(), {"red": by_type["red"]}, crop=8)
    with pytest.raises(ValueError, match="at least 2 usable images"):
        probe(MeanColour(), {"red": by_type["red"], "blue": by_type["blue"][:1]}, crop=8)


def test_probe_runs_on_a_prompt_encoder(tmp_path):
    paths = {}
    for t in ("rain", "snow"):
        paths[t] = []
        for i in range(2):
            p = tmp_path / f"{t}{i}.png"
            Image.fromarray(_image(2 * i + (t == "rain"), 24, 24)).save(p)
            paths[t].append(p)
    enc = PromptEncoder(prompt_dim=D, prompt_tokens=L, feat_dim=8, widths=(4, 8, 8), token_rank=4).train()
    res = probe(enc, paths, crop=16, crops_per_image=2)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["num_crops"] == 8 and res["points"].shape == (8, 2)
    assert enc.training  # mode restored


def test_the_tiny_sd_sets_the_width_and_the_empty_text_base(degraded, tmp_path, recwarn):
    sd = load_sd("tiny")
    res = train_prompts(degraded, sd, tmp_path / "full", steps=1, prompt_tokens=77, prompt_strength=0.0)
    assert not [w for w in recwarn if "prompt_tokens" in str(w.message) or "text encoder" in str(w.message)]
    emb = load_embeddings(tmp_path / "full")
    assert emb.prompt_embeds.shape == (N_IMAGES, 77, 32)  # the tiny UNet's cross_attention_dim
    assert emb.metadata["sd_model_id"] == "tiny" and len(emb.metadata["sd_fingerprint"]) == 64
    encoder = load_prompt_encoder(res.encoder_path)
    assert encoder.prompt_dim == 32 and encoder.has_base
    # strength 0: every prompt is the tiny CLIP's embedding of the empty text (stored as fp16)
    empty = sd.encode_text([""]).half().expand(N_IMAGES, 77, 32)
    assert torch.equal(emb.prompt_embeds, empty)
    # fewer tokens than the text encoder's 77 were asked for: allowed, with a warning
    with pytest.warns(UserWarning, match="prompt_tokens=4 < the text encoder's 77 tokens"):
        train_prompts(degraded, sd, tmp_path / "short", steps=1)
    assert load_embeddings(tmp_path / "short").prompt_embeds.shape == (N_IMAGES, L, 32)
