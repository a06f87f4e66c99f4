"""pipelines/weather_sd and bench/train_weather_sd.py: data determinism and licences, the held-out split,
tiny VAE/UNet training steps, resumable training, and the saved diffusers folder loading with load_sd."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import skimage.data
import torch
from d4ir.pipelines.weather_sd.data import (
    CAPTIONS,
    EXCLUDED,
    HELD_OUT,
    LICENCES,
    TRAIN_PHOTOS,
    WeatherSetConfig,
    build_weather_set,
    load_photo,
)
from d4ir.pipelines.weather_sd.folder import save_weather_sd
from d4ir.pipelines.weather_sd.loop import LoopConfig, step_generator, train_loop
from d4ir.pipelines.weather_sd.text import build_weather_text
from d4ir.pipelines.weather_sd.unet import Latents, build_unet, scheduler, unet_batch_loss, unet_config
from d4ir.pipelines.weather_sd.vae import build_vae, posterior_moments, vae_batch_loss, vae_config, vae_loss
from d4ir.shards.io import read_jsonl
from d4ir.shards.state import load_state
from d4ir.synth.plan import WEATHER_TEXT as TASK_TEXT

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = dict(vae_config(4, widths=(32, 32, 32)), sample_size=32)


def _bench():
    return importlib.import_module("train_weather_sd")  # pytest puts bench/ on the path


@pytest.fixture(scope="module")
def tiny_set():
    """Two training photos, two crops each, 32x32, all four weathers: 16 items."""
    return build_weather_set(WeatherSetConfig("train", crops_per_photo=2, size=32, photos=("astronaut", "coffee")))


# ---------------------------------------------------------------- data


def test_same_seed_same_crops_and_captions(tiny_set):
    again = build_weather_set(WeatherSetConfig("train", crops_per_photo=2, size=32, photos=("astronaut", "coffee")))
    assert torch.equal(tiny_set.images, again.images)
    assert tiny_set.captions == again.captions and tiny_set.records == again.records
    other = build_weather_set(
        WeatherSetConfig("train", crops_per_photo=2, size=32, photos=("astronaut", "coffee"), seed=1)
    )
    assert not torch.equal(tiny_set.images, other.images)


def test_items_captions_and_clean_index(tiny_set):
    assert tiny_set.images.shape == (16, 3, 32, 32) and tiny_set.images.dtype == torch.uint8
    assert CAPTIONS == {"clean": "a photo", **TASK_TEXT}
    assert tiny_set.captions == [CAPTIONS[w] for w in tiny_set.weathers]
    for i, c in enumerate(tiny_set.clean_index.tolist()):
        assert tiny_set.weathers[c] == "clean"
        assert tiny_set.records[c]["photo"] == tiny_set.records[i]["photo"]
        assert tiny_set.records[c]["crop"] == tiny_set.records[i]["crop"]
        if tiny_set.weathers[i] != "clean":
            assert not torch.equal(tiny_set.images[i], tiny_set.images[c])  # the weather changed the crop


def test_licence_list_covers_every_photo_used():
    assert set(TRAIN_PHOTOS) | set(HELD_OUT) == set(LICENCES)
    assert not set(LICENCES) & set(EXCLUDED)
    for name, licence in LICENCES.items():
        assert licence.split(":")[0] in ("CC0", "CC0 1.0", "public domain"), name
        assert hasattr(skimage.data, name)
        assert load_photo(name).ndim == 3  # ships in the wheel: loads without a download
    data = build_weather_set(WeatherSetConfig("train", crops_per_photo=1, size=16))
    assert {r["photo"] for r in data.records} == set(TRAIN_PHOTOS)
    with pytest.raises(ValueError, match="licence list"):
        load_photo("coins")


def test_held_out_photos_never_appear_in_training():
    assert not set(TRAIN_PHOTOS) & set(HELD_OUT)
    with pytest.raises(ValueError, match="not in the 'train' split"):
        WeatherSetConfig("train", photos=("chelsea",))
    held = build_weather_set(WeatherSetConfig("held_out", crops_per_photo=1, size=16))
    assert {r["photo"] for r in held.records} == set(HELD_OUT)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="split"):
        WeatherSetConfig("test")
    with pytest.raises(ValueError, match="multiple of 8"):
        WeatherSetConfig(size=60)
    with pytest.raises(ValueError, match="start with 'clean'"):
        WeatherSetConfig(weathers=("derain", "clean"))


# ---------------------------------------------------------------- training


def _overfit(loss_fn, modules, steps: int = 12, lr: float = 2e-3) -> tuple[float, float]:
    """Loss of a fixed batch (the same generator every step) before and after `steps` Adam steps."""
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps + 1):
        loss = loss_fn(0, step_generator(0, 0))["loss"]
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


def test_tiny_vae_step_lowers_the_loss(tiny_set):
    vae = build_vae(TINY_VAE, seed=0)
    x = tiny_set.floats(slice(0, 4))

    def loss_fn(step, gen):
        return vae_loss(vae, x, gen, edge_weight=0.5, kl_weight=1e-6)

    first, last = _overfit(loss_fn, [vae])
    assert last < 0.8 * first


def test_vae_trains_on_random_windows(tiny_set):
    vae = build_vae(TINY_VAE, seed=0)
    loss = vae_batch_loss(tiny_set, vae, batch_size=2, edge_weight=0.5, kl_weight=1e-6, crop=16)
    out = loss(0, step_generator(0, 0))
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    with pytest.raises(ValueError, match="multiple of 8"):
        vae_batch_loss(tiny_set, vae, 2, 0.5, 1e-6, crop=12)


def test_time_capped_stage_gets_a_decay_tail_and_is_recorded(tmp_path):
    bench = _bench()
    assert bench._plan(tmp_path, 100, 0.3, cap_minutes=5.0, pause_minutes=0.0) == (100, 30, 5.0)
    assert bench._cap_reached(tmp_path, {"step": 37, "done": False}, 5.0, 0.0, tail=20)
    assert bench._plan(tmp_path, 100, 0.3, 5.0, 0.0) == (57, 20, 0.0)  # the reached step plus the decay tail
    assert not bench._cap_reached(tmp_path, {"step": 40, "done": False}, 5.0, 0.0, tail=20)  # recorded once
    paused = tmp_path / "p"
    assert not bench._cap_reached(paused, {"step": 3, "done": False}, 5.0, 1.0, tail=20)  # a pause is resumable
    assert bench._plan(paused, 100, 0.3, 5.0, 1.0) == (100, 30, 1.0)


def test_a_step_cap_replays_a_capped_stage_exactly(tiny_set, tmp_path):
    """--vae-cap-step K: the constant phase ends at step K and a `tail`-step cosine follows, as when a time cap
    reaches K (the shipped model's stages ended that way), and the result equals one uninterrupted run of that
    schedule, weight for weight."""
    import argparse
    import json

    bench = _bench()
    args = argparse.Namespace(pause_minutes=0.0, final_lr_fraction=0.05, ema_decay=0.0, seed=0, no_progress=True)

    def loss_of(vae):
        return lambda _decay_start: vae_batch_loss(tiny_set, vae, 2, 0.5, 1e-6)

    capped = build_vae(TINY_VAE, seed=0)
    r = bench._train_stage(args, tmp_path / "capped", {"vae": capped}, loss_of(capped), lr=1e-3, steps=1000,
                           decay=0.3, tail=3, cap=0.0, cap_step=4, desc="vae")
    assert r["done"] and r["step"] == 7
    plan = json.loads((tmp_path / "capped" / "finished.json").read_text())
    assert plan["capped_at"] == 4 and plan["steps"] == 7 and plan["decay_steps"] == 3
    straight = build_vae(TINY_VAE, seed=0)
    loop = LoopConfig(steps=7, lr=1e-3, seed=0, decay_steps=3, final_lr_fraction=0.05)
    train_loop(tmp_path / "straight", {"vae": straight}, loss_of(straight)(4), loop, progress=False)
    a, b = capped.state_dict(), straight.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _tiny_text():
    return build_weather_text(hidden=32, layers=1, heads=2, seed=0)


def _tiny_latents(vae, data) -> Latents:
    mean, std = posterior_moments(vae, data.floats())
    return Latents(mean, std, data.captions, data.weathers, scaling_factor=0.5)


def test_frozen_text_encoder_gives_distinct_cached_caption_embeddings():
    text = _tiny_text()
    assert list(text.parameters()) == [] and not any(p.requires_grad for p in text.model.parameters())
    emb = text.encode(["", *CAPTIONS.values(), "a photo of a dog"])  # any words: a real CLIP tokenizer
    assert emb.shape == (6, 77, 32) and not emb.requires_grad
    flat = emb.flatten(1)
    gaps = torch.cdist(flat, flat) + torch.eye(6) * 1e9
    assert float(gaps.min()) > 1.0  # every caption, the empty one included, has its own embedding
    assert torch.equal(text.encode(["a photo"])[0], emb[1])  # cached: the same tensor values again
    for p in text.model.parameters():  # rounded to the fp16 it ships in
        assert torch.equal(p, p.half().float())


def test_tiny_unet_step_with_frozen_text_lowers_the_loss(tiny_set):
    text = _tiny_text()
    vae = build_vae(TINY_VAE, seed=0)
    unet = build_unet(unet_config(32, 8, widths=(32, 32)), seed=0)
    loss_fn = unet_batch_loss(_tiny_latents(vae, tiny_set), unet, text, batch_size=4, caption_dropout=0.15,
                              t_focus=500, focus_prob=0.75)
    first, last = _overfit(loss_fn, [unet])
    assert last < 0.8 * first
    with pytest.raises(ValueError, match="t_focus"):
        unet_batch_loss(_tiny_latents(vae, tiny_set), unet, text, 4, t_focus=0)


def test_lr_schedule_warms_up_holds_and_decays():
    cfg = LoopConfig(steps=100, lr=1.0, warmup=10, decay_steps=40, final_lr_fraction=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(59) == pytest.approx(1.0) and cfg.lr_at(60) == pytest.approx(1.0)
    assert cfg.lr_at(80) == pytest.approx(0.55) and cfg.lr_at(100) == pytest.approx(0.1)
    assert all(cfg.lr_at(s) >= cfg.lr_at(s + 1) for s in range(60, 100))
    with pytest.raises(ValueError, match="decay_steps"):
        LoopConfig(steps=10, decay_steps=11)


def test_vae_logvar_init_sets_the_posterior_scale(tiny_set):
    vae = build_vae(TINY_VAE, seed=0, logvar_init=-8.0)
    with torch.no_grad():
        dist = vae.encode(tiny_set.floats(slice(0, 2)) * 2 - 1).latent_dist
    torch.testing.assert_close(dist.logvar, torch.full_like(dist.logvar, -8.0))
    plain = build_vae(TINY_VAE, seed=0)
    torch.testing.assert_close(vae.encoder.conv_in.weight, plain.encoder.conv_in.weight)  # nothing else moved


def test_training_killed_and_resumed_gives_the_same_weights_and_log(tiny_set, tmp_path):
    config = LoopConfig(steps=6, warmup=2, log_every=1, checkpoint_every=2, decay_steps=3, final_lr_fraction=0.1)

    def run(folder: Path, crash_at: int | None = None) -> dict[str, torch.Tensor]:
        vae = build_vae(TINY_VAE, seed=0)
        x = tiny_set.floats()

        def loss(step, gen):
            if step == crash_at:
                raise KeyboardInterrupt  # a kill between two checkpoints
            return vae_loss(vae, x[torch.randint(16, (2,), generator=gen)], gen, edge_weight=0.5, kl_weight=1e-6)

        result = train_loop(folder, {"vae": vae}, loss, config, progress=False)
        assert result["step"] == 6 and result["done"]
        return vae.state_dict()

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=3)
    assert load_state(tmp_path / "b" / "state.pt")["step"] == 2  # the last checkpoint, plain data (shards.state)
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "train.jsonl")] == [1, 2, 3]
    resumed = run(tmp_path / "b")
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "train.jsonl")] == [1, 2, 3, 4, 5, 6]  # step 3 once
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- the folder


def test_saved_folder_loads_with_load_sd_and_samples(tiny_set, tmp_path):
    from d4ir.synth.ccd import CCDConfig, ccd_sample
    from d4ir.synth.sd import load_sd

    text = _tiny_text()
    vae = build_vae(TINY_VAE, seed=0)
    vae.register_to_config(scaling_factor=0.7)
    unet = build_unet(unet_config(32, 8, widths=(32, 32)), seed=0)
    folder = save_weather_sd(tmp_path / "model", vae, unet, scheduler(), text, info={"note": "test"})
    for sub in ("vae", "unet", "text_encoder"):
        assert list((folder / sub).glob("*.safetensors")), sub
        assert not list((folder / sub).glob("*.bin")), sub
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    assert {p.name for p in (folder / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}
    card = (folder / "README.md").read_text()
    assert all(name in card for name in LICENCES)
    parts = load_sd(str(folder))
    assert parts.vae_scale_factor == 4 and parts.cross_attention_dim == 32
    captions = ["", *CAPTIONS.values()]
    torch.testing.assert_close(parts.encode_text(captions), text.encode(captions), rtol=0, atol=0)
    torch.testing.assert_close(parts.empty_prompt(), text.encode([""]), rtol=0, atol=0)
    assert load_sd(str(folder)).fingerprint == parts.fingerprint
    assert parts.vae.config.scaling_factor == pytest.approx(0.7)
    ref = unet.state_dict()["conv_in.weight"].half().float()
    torch.testing.assert_close(parts.unet.state_dict()["conv_in.weight"], ref)  # stored in fp16
    clean = tiny_set.floats(slice(0, 2))
    emb = parts.encode_text([TASK_TEXT["derain"]])
    out = ccd_sample(parts, clean, emb, [torch.Generator().manual_seed(i) for i in range(2)],
                     CCDConfig(steps=4, strength=0.5, size=32))
    assert out.shape == (2, 3, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1


def test_script_help_lists_its_options():
    args = _bench().parse_args(["--out", "x"])
    assert args.stage == "all" and args.factor == 4 and args.save_dtype == "float16"
    with pytest.raises(SystemExit):
        _bench().parse_args(["--out", "x", "--factor", "2"])
