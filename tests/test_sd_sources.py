"""One SD however it is stored: a diffusers folder, a CompVis single file and a hub-cache id of the narrow SD1.5
layout (tests/real_sd_fixtures.py) give byte-identical rounds and students, because every random draw after
loading the SD comes from a stage's own seeded generator; a file with only the UNet and VAE takes its text
encoder from --sd-config; a file that does not fit its configs, and prompts made with another SD, are one
readable line naming what differs."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import d4ir.distill.feedback as feedback_mod
import d4ir.synth.sd as sd_mod
import pytest
import torch
from d4ir.distill.registry import build, save_model
from d4ir.distill.trainer import DistillConfig, distill
from d4ir.shards.embeddings import save_embeddings
from d4ir.shards.layout import RunLayout
from d4ir.synth.ccd import CCDConfig
from d4ir.synth.moco import MoCoConfig
from d4ir.synth.plan import SynthConfig
from d4ir.synth.prompts import PromptsConfig, train_prompts
from d4ir.synth.sd import SDLoadError, SDSource, load_sd, load_sd_cached
from d4ir.synth.worker import synthesize
from real_sd_fixtures import make_images, save_folder, to_compvis, to_hub_cache
from safetensors.torch import load_file, save_file

CCD = CCDConfig(steps=4, strength=0.5, size=64)
PROMPTS = PromptsConfig(feat_dim=8, widths=(4, 8, 8), token_rank=4, steps=2, batch_size=4, crop=16,
                        moco=MoCoConfig(queue_size=4), embed_side=32)
SYNTH = SynthConfig(num_samples=2, shard_size=1, batch_size=1, ccd=CCD)
TEACHER = dict(n_feats=8, n_groups=1, n_blocks=1, queue_size=4)
DISTILL = DistillConfig(student="half", batch_size=2, crop=16, iters_per_epoch=2, feedback_batch=1, num_workers=0,
                        epochs=2, joint_epochs=1, round_every=1)
HUB_ID = "d4ir-test/sd15-narrow"


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """The narrow SD1.5 as a folder, a CompVis file, a hub id (offline cache made the process's for the module),
    and the SD2.1 folder; web photos."""
    root = tmp_path_factory.mktemp("sd-sources")
    folder = save_folder("sd15", root / "sd15")
    file = to_compvis(folder, "sd15", root / "sd15.safetensors")
    hf_home = root / "hf_home"
    to_hub_cache(folder, hf_home, HUB_ID)
    import huggingface_hub.constants as hub_constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(hf_home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hub_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
        yield {"folder": folder, "file": file, "root": root,
               "sources": {"folder": SDSource(folder), "file": SDSource(file, config=str(folder)),
                           "hub": SDSource(HUB_ID)},
               "degraded": make_images(root / "degraded", 8, seed=1), "clean": make_images(root / "clean", 2, seed=2)}


def _pipeline(s: dict, source: SDSource, run: Path) -> dict[str, bytes]:
    """prompts -> round 0 -> distill (joint phase, one regeneration round) from `source`; every file's bytes."""
    layout = RunLayout(run)
    train_prompts(s["degraded"], load_sd_cached(source, "cpu", "float32"), layout.prompts, PROMPTS, progress=False)
    synthesize(s["clean"], layout.shards, SYNTH, sd_source=source, prompts_dir=layout.prompts, progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = save_model(layout.teacher_dir / "teacher", build("airnet", **TEACHER))
    sd_mod._CACHE.clear()  # stage 3 loads the SD itself, as its own process (`d4ir distill`) does
    distill(run, teacher, DISTILL, degraded_dir=s["degraded"], clean_dir=s["clean"], progress=False)
    files = [p for p in sorted(run.rglob("*")) if p.suffix in (".tar", ".safetensors")]
    return {str(p.relative_to(run)): _content(p) for p in files}


def _content(path: Path) -> dict[str, bytes]:
    """What a file holds besides provenance (which names the source: a path or a hub id): every tensor's bytes,
    or every tar member but the samples' JSON."""
    if path.suffix == ".safetensors":
        return {k: v.numpy().tobytes() for k, v in load_file(str(path)).items()}
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg() and not m.name.endswith(".json")}


def test_folder_file_and_hub_id_give_byte_identical_rounds_and_students(sd15, tmp_path):
    runs = {name: _pipeline(sd15, source, tmp_path / name) for name, source in sd15["sources"].items()}
    folder = runs["folder"]  # tensors and images byte for byte (provenance names each source: not compared)
    assert "students/half-teacher/student.safetensors" in folder
    assert "students/half-teacher/shards/round-001/000001.tar" in folder and "shards/round-000/000000.tar" in folder
    for name in ("file", "hub"):
        assert runs[name].keys() == folder.keys(), name
        differ = [k for k in folder if runs[name][k] != folder[k]]
        assert not differ, (name, differ)


def test_the_student_does_not_depend_on_the_global_rng_after_loading(tmp_path, run_copy, monkeypatch):
    """A library that draws from (or reseeds) torch's global RNG while the SD loads leaves the student as it was."""
    original = feedback_mod.load_sd_cached
    students = []
    for i, disturb in enumerate((lambda: None, lambda: torch.randn(1234), lambda: torch.manual_seed(999))):
        def loading(*args, _disturb=disturb, **kw):
            parts = original(*args, **kw)
            _disturb()
            return parts

        monkeypatch.setattr(feedback_mod, "load_sd_cached", loading)
        r = run_copy
        distill(r.root, r.teacher, DISTILL, degraded_dir=r.degraded, clean_dir=r.clean, name=f"s{i}",
                progress=False)
        out = r.root / "students" / f"s{i}"
        students.append([(out / f).read_bytes() for f in ("student.safetensors", "prompt_encoder.safetensors")])
    assert students[1] == students[0] and students[2] == students[0]


def test_a_file_with_unet_and_vae_only_takes_the_text_encoder_from_its_configs(sd15, tmp_path):
    full = load_sd(sd15["sources"]["folder"])
    state = load_file(str(sd15["file"]))
    bare = tmp_path / "unet-vae.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}, str(bare))
    with pytest.warns(UserWarning, match="holds no text encoder: the text encoder and tokenizer come from"):
        parts = load_sd(SDSource(bare, config=str(sd15["folder"])))
    assert parts.text_encoder is not None and parts.tokenizer is not None
    assert parts.fingerprint == full.fingerprint
    torch.testing.assert_close(parts.encode_text([""]), full.encode_text([""]), rtol=0, atol=0)


def test_a_file_that_does_not_fit_its_configs_is_one_short_line(sd15, tmp_path):
    sd21 = save_folder("sd21", tmp_path / "sd21")  # other widths: every UNet tensor mismatches
    with pytest.raises(SDLoadError) as err:
        load_sd(SDSource(sd15["file"], config=str(sd21)))
    text = str(err.value)
    assert len(text) < 1200 and "\n" not in text, len(text)
    assert "size mismatches: conv_in.weight [32, 4, 3, 3] in the checkpoint vs [40, 4, 3, 3] in the model" in text
    assert "more" in text and "Pass config=<diffusers folder> matching the file" in text


def test_prompts_of_another_sd_name_both_models(sd15, tmp_path):
    sd21_folder = save_folder("sd21", tmp_path / "sd21")
    sd15_parts = load_sd_cached(sd15["sources"]["folder"], "cpu", "float32")
    prompts = tmp_path / "prompts"
    meta = {"encoder_sha256": "e" * 64, "sd_fingerprint": sd15_parts.fingerprint,
            "sd_model_id": sd15_parts.model_id}
    save_embeddings(prompts, torch.zeros(2, 4, 768), [{"path": "x.png", "sha256": "0" * 64}] * 2, meta)
    with pytest.raises(ValueError) as err:
        synthesize(sd15["clean"], tmp_path / "shards", SYNTH, sd_source=SDSource(sd21_folder), prompts_dir=prompts,
                   progress=False)
    text = str(err.value)
    assert f"made for SD '{sd15['folder']}' (fingerprint {sd15_parts.fingerprint[:12]})" in text
    assert f"this run loads SD {sd21_folder} (fingerprint" in text and "768 wide vs 1024" in text
    shutil.rmtree(sd21_folder)
