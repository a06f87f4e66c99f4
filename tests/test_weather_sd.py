"""pipelines/weather_sd and bench/train_weather_sd.py: data determinism and licences, the held-out split,
tiny VAE/UNet training steps, resumable training, and the saved diffusers folder loading with load_sd."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import skimage.data
import torch

from pipelines.weather_sd.data import (
    CAPTIONS,
    EXCLUDED,
    HELD_OUT,
    LICENCES,
    TRAIN_PHOTOS,
    WeatherSetConfig,
    build_weather_set,
    load_photo,
)
from pipelines.weather_sd.folder import save_weather_sd
from pipelines.weather_sd.loop import LoopConfig, step_generator, train_loop
from pipelines.weather_sd.unet import Latents, build_unet, scheduler, unet_batch_loss, unet_config
from pipelines.weather_sd.vae import build_vae, posterior_moments, vae_batch_loss, vae_config, vae_loss
from synth.plan import WEATHER_TEXT as TASK_TEXT

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = dict(vae_config(4, widths=(32, 32, 32)), sample_size=32)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train_weather_sd", ROOT / "bench" / "train_weather_sd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_time_capped_stage_is_recorded_as_finished(tmp_path):
    bench = _bench()
    assert bench._capped(tmp_path, 100, cap_minutes=5.0, pause_minutes=0.0) == (100, 5.0)
    result = bench._finish_if_capped(tmp_path, {"step": 37, "done": False}, 5.0, 0.0)
    assert result["done"] and bench._capped(tmp_path, 100, 5.0, 0.0) == (37, 0.0)
    paused = bench._finish_if_capped(tmp_path / "p", {"step": 3, "done": False}, 5.0, 1.0)
    assert not paused["done"]  # a pause (shorter than the cap) is resumable, not the end


def _tiny_text(bench):
    return bench.StandInTextEncoder(list(CAPTIONS.values()), hidden=32, layers=1, heads=2, seed=0)


def _tiny_latents(vae, data) -> Latents:
    mean, std = posterior_moments(vae, data.floats())
    return Latents(mean, std, data.captions, data.weathers, scaling_factor=0.5)


def test_tiny_unet_step_with_stand_in_text_lowers_the_loss(tiny_set):
    bench = _bench()
    text = _tiny_text(bench)
    emb = text.encode(["a photo", ""])
    assert emb.shape == (2, 77, 32)
    with pytest.raises(ValueError, match="not in its caption vocabulary"):
        text.encode(["a photo of a dog"])
    vae = build_vae(TINY_VAE, seed=0)
    unet = build_unet(unet_config(32, 8, widths=(32, 32)), seed=0)
    loss_fn = unet_batch_loss(_tiny_latents(vae, tiny_set), unet, text, batch_size=4, caption_dropout=0.15)
    first, last = _overfit(loss_fn, [unet, text])
    assert last < 0.8 * first


def test_training_resumes_to_the_same_weights(tiny_set, tmp_path):
    def run(folder: Path, stops: list[int]) -> dict[str, torch.Tensor]:
        vae = build_vae(TINY_VAE, seed=0)
        x = tiny_set.floats()
        loss = lambda step, gen: vae_loss(vae, x[torch.randint(16, (2,), generator=gen)], gen,  # noqa: E731
                                          edge_weight=0.5, kl_weight=1e-6)
        for stop in stops:
            result = train_loop(folder, {"vae": vae}, loss, LoopConfig(steps=stop, warmup=2), progress=False)
        assert result["step"] == stops[-1] and result["done"]
        return vae.state_dict()

    straight = run(tmp_path / "a", [4])
    resumed = run(tmp_path / "b", [2, 4])
    assert (tmp_path / "b" / "state.pt").is_file() and (tmp_path / "b" / "train.jsonl").is_file()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- the folder


def test_saved_folder_loads_with_load_sd_and_samples(tiny_set, tmp_path):
    from synth.ccd import CCDConfig, ccd_sample
    from synth.sd import load_sd

    bench = _bench()
    text = _tiny_text(bench)
    vae = build_vae(TINY_VAE, seed=0)
    vae.register_to_config(scaling_factor=0.7)
    unet = build_unet(unet_config(32, 8, widths=(32, 32)), seed=0)
    folder = save_weather_sd(tmp_path / "model", vae, unet, scheduler(), text, info={"note": "test"})
    for sub in ("vae", "unet", "text_encoder"):
        assert list((folder / sub).glob("*.safetensors")), sub
        assert not list((folder / sub).glob("*.bin")), sub
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    assert (folder / "tokenizer" / "stand_in_vocab.json").is_file()
    card = (folder / "README.md").read_text()
    assert all(name in card for name in LICENCES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stand-in tokenizer is not a CLIPTokenizer: text encoder skipped
        parts = load_sd(str(folder))
    assert parts.vae_scale_factor == 4 and parts.cross_attention_dim == 32
    assert parts.vae.config.scaling_factor == pytest.approx(0.7)
    ref = unet.state_dict()["conv_in.weight"].half().float()
    torch.testing.assert_close(parts.unet.state_dict()["conv_in.weight"], ref)  # stored in fp16
    clean = tiny_set.floats(slice(0, 2))
    with torch.no_grad():
        emb = text.encode([TASK_TEXT["derain"]])
    out = ccd_sample(parts, clean, emb, [torch.Generator().manual_seed(i) for i in range(2)],
                     CCDConfig(steps=4, strength=0.5, size=32))
    assert out.shape == (2, 3, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1


def test_script_help_lists_its_options():
    args = _bench().parse_args(["--out", "x"])
    assert args.stage == "all" and args.factor == 4 and args.save_dtype == "float16"
    with pytest.raises(SystemExit):
        _bench().parse_args(["--out", "x", "--factor", "2"])
