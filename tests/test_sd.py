"""synth/sd.py: the tiny and SD1.5-layout builders, folder/file/hub loading and its errors, fingerprints."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from d4ir.synth.sd import SDLoadError, build_tiny_sd, load_sd, save_sd
from d4ir.synth.sd_configs import sd15_modules


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd(0)


def _unet_out(parts, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 4, 8, 8, generator=g)
    prompt = torch.randn(1, 5, parts.cross_attention_dim, generator=g)
    with torch.inference_mode():
        return parts.unet(z, 500, encoder_hidden_states=prompt).sample


def test_tiny_is_sd_shaped_and_frozen(tiny):
    assert tiny.model_id == "tiny"
    assert tiny.cross_attention_dim == 32
    assert tiny.vae_scale_factor == 8
    assert tiny.vae.config.latent_channels == 4
    assert tiny.unet.config.in_channels == 4
    sched = tiny.scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (sched.num_train_timesteps, sched.set_alpha_to_one, sched.steps_offset) == (1000, False, 1)
    assert (sched.clip_sample, sched.prediction_type) == (False, "epsilon")
    text = tiny.text_encoder.config
    assert (text.hidden_size, text.num_hidden_layers, text.max_position_embeddings) == (32, 2, 77)
    assert tiny.tokenizer.model_max_length == 77
    for module in (tiny.unet, tiny.vae, tiny.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    with torch.inference_mode():
        latent = tiny.vae.encode(torch.zeros(2, 3, 64, 64)).latent_dist.mean
    assert latent.shape == (2, 4, 8, 8)


def test_tiny_fingerprint_stable_and_seed_dependent(tiny):
    again = build_tiny_sd(0)
    assert len(tiny.fingerprint) == 64 and int(tiny.fingerprint, 16) >= 0
    assert again.fingerprint == tiny.fingerprint
    assert torch.equal(_unet_out(again), _unet_out(tiny))
    assert build_tiny_sd(1).fingerprint != tiny.fingerprint


def test_build_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    build_tiny_sd(3)
    assert torch.equal(torch.get_rng_state(), state)
    load_sd("tiny")
    assert torch.equal(torch.get_rng_state(), state)


def test_tiny_text_encoder_embeds_text(tiny):
    emb = tiny.encode_text(["a photo", "a hazy photo, thick fog"])
    assert emb.shape == (2, 77, 32) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert not torch.equal(emb[0], emb[1])
    torch.testing.assert_close(tiny.empty_prompt(), tiny.encode_text([""]), rtol=0, atol=0)
    assert tiny.empty_prompt(8).shape == (1, 8, 32)
    with pytest.raises(ValueError, match="exceeds the text encoder's length 77"):
        tiny.empty_prompt(78)
    with pytest.raises(TypeError, match="list of strings"):
        tiny.encode_text("rain")


def test_fingerprint_covers_the_text_encoder(tiny):
    from d4ir.synth.sd_parts import sd_fingerprint

    assert sd_fingerprint(tiny.vae, tiny.unet, tiny.scheduler) != tiny.fingerprint  # without it: another model
    other = build_tiny_sd(0)
    with torch.no_grad():
        other.text_encoder.final_layer_norm.weight[0] += 1.0  # one weight the sample reads (index 0)
    parts = (other.vae, other.unet, other.scheduler, other.text_encoder, other.tokenizer)
    assert sd_fingerprint(*parts) != tiny.fingerprint


def test_folder_without_text_encoder_loads_silently(tiny, tmp_path, recwarn):
    bare = replace(tiny, text_encoder=None, tokenizer=None)
    folder = save_sd(bare, tmp_path / "sd")
    assert not (folder / "text_encoder").exists()
    loaded = load_sd(str(folder))
    assert loaded.text_encoder is None and loaded.tokenizer is None and loaded.empty_prompt() is None
    assert not [w for w in recwarn if "text encoder" in str(w.message)]
    with pytest.raises(RuntimeError, match=r"no text encoder.*prompt embeddings \[B,L,32\]"):
        loaded.encode_text(["rain"])


def test_broken_text_encoder_is_an_error(tiny, tmp_path):
    folder = save_sd(tiny, tmp_path / "sd")
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    with pytest.raises(SDLoadError, match="text encoder in .* does not load"):
        load_sd(str(folder))
    no_tokenizer = save_sd(tiny, tmp_path / "sd2")
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(SDLoadError, match="has text_encoder/ but no tokenizer/"):
        load_sd(str(no_tokenizer))


def test_folder_round_trip(tiny, tmp_path):
    folder = save_sd(tiny, tmp_path / "sd")
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    loaded = load_sd(str(folder))
    assert loaded.model_id == str(folder)
    assert loaded.fingerprint == tiny.fingerprint  # load path is not part of the identity
    for name in ("unet", "vae", "text_encoder"):
        ref = getattr(tiny, name).state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in getattr(loaded, name).state_dict().items())
    assert {p.name for p in (folder / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt", "tokenizer_config.json"}
    assert loaded.tokenizer("a hazy photo").input_ids == tiny.tokenizer("a hazy photo").input_ids
    torch.testing.assert_close(loaded.encode_text(["a photo"]), tiny.encode_text(["a photo"]), rtol=0, atol=1e-6)
    # CPU kernels may round differently with other allocations: equal weights, near-equal outputs.
    torch.testing.assert_close(_unet_out(loaded), _unet_out(tiny), rtol=0, atol=1e-5)
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert not loaded.unet.training


def test_the_fingerprint_names_the_weights_not_the_run_dtype(tmp_path):
    """Prompts made with the SD in float32 on a CPU must serve a float16/bfloat16 synthesis on a GPU: the
    fingerprint is taken in float32 before the cast (the run's dtype is recorded in the manifest instead)."""
    full = build_tiny_sd(0)
    half = build_tiny_sd(0, dtype=torch.float16)
    assert next(half.unet.parameters()).dtype == torch.float16
    assert next(half.text_encoder.parameters()).dtype == torch.float16
    assert half.fingerprint == full.fingerprint != build_tiny_sd(1).fingerprint
    folder = save_sd(full, tmp_path / "sd")
    loaded = {dt: load_sd(str(folder), dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
    assert {p.fingerprint for p in loaded.values()} == {full.fingerprint}
    assert next(loaded[torch.bfloat16].vae.parameters()).dtype == torch.bfloat16


def test_missing_folder_error_lists_what_was_tried(tmp_path):
    missing = tmp_path / "nowhere" / "sd15"
    with pytest.raises(SDLoadError) as err:
        load_sd(str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg and "nothing is downloaded" in msg


def test_missing_hub_id_error_names_cache_path():
    with pytest.raises(SDLoadError) as err:
        load_sd("d4ir-nobody/no-such-sd-model")
    msg = str(err.value)
    assert "hub id 'd4ir-nobody/no-such-sd-model'" in msg
    assert "models--d4ir-nobody--no-such-sd-model" in msg
    assert "folder 'd4ir-nobody/no-such-sd-model': does not exist" in msg


def test_folder_without_unet_is_rejected(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(SDLoadError, match=r"missing unet/config.json"):
        load_sd(str(tmp_path))


def test_bad_single_files_are_rejected(tmp_path):
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(SDLoadError, match="cannot read SD checkpoint"):
        load_sd(str(garbage))
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"model.diffusion_model.foo": torch.zeros(2)}, str(wrong))
    with pytest.raises(SDLoadError, match="cannot load single-file SD checkpoint"):
        load_sd(str(wrong))
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(SDLoadError, match="not a .safetensors/.ckpt"):
        load_sd(str(text))
    with pytest.raises(SDLoadError, match="non-empty string"):
        load_sd("")


def test_sd15_layout_matches_the_real_model():
    # Built on the meta device: shapes only, no memory, no time.
    vae, unet = sd15_modules("meta", torch.float16)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's UNet
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD1.5's VAE
    assert unet.config.cross_attention_dim == 768
    assert next(unet.parameters()).dtype == torch.float16
