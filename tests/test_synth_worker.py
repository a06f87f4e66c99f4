"""synth/worker.py: stage 2's shard set, reproducibility, the manifest check, the prompt-mode switches and the
`d4ir synth` command (tiny SD, 32x32). Faults (kills, retries, full disks) are in test_synth_faults.py."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import d4ir.synth.worker as worker
import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from d4ir.pipelines.cli import main
from d4ir.shards.embeddings import save_embeddings
from d4ir.shards.io import save_weights
from d4ir.shards.verify import verify_shards
from d4ir.synth.prompt_encoder import PromptEncoder
from d4ir.synth.sd import build_tiny_sd, load_sd, save_sd
from d4ir.synth.worker import synthesize
from synth_fixtures import (
    CFG,
    CLI_OVERRIDES,
    PROMPT_META,
    TINY_FINGERPRINT,
    assert_same_shards,
    make_prompts,
    rounds,
    run,
    samples,
    stats,
    tree,
)


# ------------------------------------------------------------------------------------------ the shard set
def test_samples_name_their_clean_photo_by_its_absolute_path(synth_inputs, tmp_path, monkeypatch):
    """A round made from a relative --clean names each photo as a regeneration round (which reads the manifest's
    absolute clean_dir) does, so samples of one photo match across rounds (the report's round grid)."""
    monkeypatch.chdir(synth_inputs["clean"].parent)
    root = tmp_path / "shards"
    run({**synth_inputs, "clean": Path(synth_inputs["clean"].name)}, root / "round-000")
    manifest = json.loads((root / "round-000" / "manifest.json").read_text())
    cleans = {meta["clean"] for _, meta in samples(root / "round-000").values()}
    assert cleans and all(Path(c).is_absolute() and Path(c).parent == synth_inputs["clean"] for c in cleans)
    assert manifest["clean_dir"] == str(synth_inputs["clean"])


def test_prompts_of_the_float32_sd_serve_a_bfloat16_synthesis(synth_inputs, tmp_path):
    """The prompts record the SD's fingerprint from a float32 load; a bfloat16 run of the same SD accepts them
    and records its own dtype."""
    root = tmp_path / "shards"
    result = run(synth_inputs, root / "round-000", dtype="bfloat16")
    manifest = json.loads((root / "round-000" / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["sd_fingerprint"] == TINY_FINGERPRINT
    assert result.images == 6 and verify_shards(root / "round-000") == []


def test_shard_set_is_complete_readable_and_reproducible(synth_inputs, synth_reference, tmp_path, monkeypatch):
    names = {f"{i:06d}.{ext}" for i in range(3) for ext in ("tar", "stats.json")} | {"manifest.json", "sizes.json"}
    assert set(tree(synth_reference)) == names
    manifest = json.loads((synth_reference / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["images"] == 6 and manifest["num_shards"] == 3
    assert manifest["sd"] == "tiny" and manifest["config"] == json.loads(json.dumps(asdict(CFG)))
    assert manifest["format_version"] == 2 and manifest["dtype"] == "float32"
    assert manifest["encoder_sha256"] == "e" * 64 and manifest["sd_fingerprint"] == TINY_FINGERPRINT
    assert json.loads((synth_reference / "sizes.json").read_text()) == {f"{i:06d}.tar": 2 for i in range(3)}
    assert all(s["count"] == 2 and s["failures"] == [] for s in stats(synth_reference).values())
    assert verify_shards(synth_reference) == []

    # A plain webdataset reader sees every sample: a 32x32 RGB image and its provenance.
    urls = [str(p) for p in sorted(synth_reference.glob("*.tar"))]
    read = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in read] == [f"r000-{i:07d}" for i in range(6)]
    clean_paths = {str(p) for p in synth_inputs["clean"].iterdir()}
    for s in read:
        assert s["degraded.png"].shape == (32, 32, 3) and s["degraded.png"].dtype == np.uint8
        meta = s["json"]
        assert meta["clean"] in clean_paths and 0 <= meta["prompt_row"] < 5
        assert meta["steps"] == 4 and meta["lambda"] == 0.5 and meta["round"] == 0 and meta["prompt_mode"] == "encoder"
        assert meta["encoder_sha256"] == "e" * 64
        assert s["degraded.png"].std() > 1  # an image, not a constant
    assert len({s["json"]["seed"] for s in read}) == 6  # every sample has its own noise seed

    # Equal inputs, fresh folder: byte-equal shards.
    again = rounds(tmp_path / "again")
    r = run(synth_inputs, again)
    assert (r.shards, r.already_done, r.images, r.failures) == (3, 0, 6, 0)
    assert_same_shards(synth_reference, again)
    assert (synth_reference / "manifest.json").read_bytes() == (again / "manifest.json").read_bytes()

    # Same folder again: every shard is skipped, no synthesis runs and not one byte changes.
    before = tree(again)

    def must_not_run(job):
        raise AssertionError(f"shard {job.index} was synthesized again")

    monkeypatch.setattr(worker, "synthesize_shard", must_not_run)
    r = run(synth_inputs, again)
    assert (r.shards, r.already_done, r.images) == (3, 3, 0)
    assert tree(again) == before


# ---------------------------------------------------------------------------------------- manifest check
def test_rerun_with_other_settings_into_the_same_folder_is_refused(synth_inputs, synth_reference, tmp_path):
    out = shutil.copytree(synth_reference, rounds(tmp_path / "shards"))
    before = tree(out)
    with pytest.raises(ValueError, match=r"do not match this run.*config_hash"):
        run(synth_inputs, out, replace(CFG, ccd=replace(CFG.ccd, steps=6)))
    other_sd = save_sd(build_tiny_sd(1), tmp_path / "other-sd")  # same layout, other weights
    with pytest.raises(ValueError, match=r"synthesized by SD 'tiny' \(fingerprint .*\), but this run loads .*other-sd"):
        run(synth_inputs, out, sd=str(other_sd), prompts_dir=make_prompts(
            tmp_path / "other-prompts", meta={**PROMPT_META, "sd_fingerprint": load_sd(other_sd).fingerprint}))
    other = make_prompts(tmp_path / "prompts", meta={**PROMPT_META, "encoder_sha256": "1" * 64})
    with pytest.raises(ValueError, match="encoder_sha256"):
        run(synth_inputs, out, prompts_dir=other)
    more_clean = shutil.copytree(synth_inputs["clean"], tmp_path / "clean")
    shutil.copy(more_clean / "clean0.png", more_clean / "clean9.png")
    with pytest.raises(ValueError, match="plan_hash"):  # another clean folder: another draw of the pairs
        synthesize(more_clean, out.parent, CFG, prompts_dir=synth_inputs["prompts"], progress=False)
    assert tree(out) == before


# ----------------------------------------------------------------------------------- prompt-mode switches
def test_prompt_modes_and_z0_change_the_images(synth_inputs, tmp_path):
    small = replace(CFG, num_samples=2, shard_size=2)
    enc = PromptEncoder(prompt_dim=32, prompt_tokens=4, feat_dim=8, widths=(4, 4, 4), token_rank=4)
    enc_path = save_weights(tmp_path / "enc" / "prompt_encoder", enc.state_dict(), {"arch": "PromptEncoder",
                                                                                     "encoder": enc.config})
    images = {}
    for name, config, kw in [
        ("encoder", small, {}),
        ("none", replace(small, prompt_mode="none"), {"prompts_dir": None}),
        ("text", replace(small, prompt_mode="text"), {"prompts_dir": None}),
        ("content", replace(small, prompt_mode="content"), {"prompts_dir": enc_path.parent}),
        ("noise", replace(small, ccd=replace(small.ccd, z0="noise")), {}),
    ]:
        out = rounds(tmp_path / name)
        r = run(synth_inputs, out, config, **kw)
        assert (r.images, r.failures) == (2, 0) and verify_shards(out) == []
        got = samples(out)
        assert all(meta["prompt_mode"] == config.prompt_mode and meta["z0"] == config.ccd.z0
                   for _, meta in got.values())
        images[name] = np.stack([img for img, _ in got.values()]).astype(float)
    manifest = json.loads((rounds(tmp_path / "content") / "manifest.json").read_text())
    assert len(manifest["prompt_encoder_file_sha256"]) == 64
    for name in ("none", "text", "content", "noise"):
        assert np.abs(images[name] - images["encoder"]).mean() > 0.5, name
    assert np.abs(images["text"] - images["none"]).mean() > 0.5  # the caption is not the empty text


def _sd_without_text_encoder(folder):
    return save_sd(replace(build_tiny_sd(0), text_encoder=None, tokenizer=None), folder)


def test_prompt_mode_errors_are_clear_and_early(synth_inputs, tmp_path):
    bare = _sd_without_text_encoder(tmp_path / "bare")
    with pytest.raises(ValueError, match="prompt mode 'text' needs an SD with a text encoder; .*bare has none"):
        run(synth_inputs, rounds(tmp_path / "text"), replace(CFG, prompt_mode="text"), sd=str(bare))
    shutil.rmtree(bare)
    with pytest.raises(ValueError, match="prompt mode 'content' needs the prompts folder"):
        run(synth_inputs, rounds(tmp_path / "content"), replace(CFG, prompt_mode="content"), prompts_dir=None)
    with pytest.raises(FileNotFoundError, match="no prompt encoder at"):
        run(synth_inputs, rounds(tmp_path / "c"), replace(CFG, prompt_mode="content"), prompts_dir=tmp_path / "no")
    with pytest.raises(ValueError, match="prompt mode 'encoder' needs the prompts folder"):
        run(synth_inputs, rounds(tmp_path / "encoder"), prompts_dir=None)
    with pytest.raises(ValueError, match="SynthConfig.prompt_mode must be one of encoder, none, text, content, got"):
        run(synth_inputs, rounds(tmp_path / "odd"), replace(CFG, prompt_mode="clip"))
    with pytest.raises(ValueError, match="multiple of 8"):
        run(synth_inputs, rounds(tmp_path / "size"), replace(CFG, ccd=replace(CFG.ccd, size=30)))
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_prompt_tables_that_cannot_condition_this_sd_are_refused_before_any_shard(synth_inputs, tmp_path):
    wide = tmp_path / "wide"
    save_embeddings(wide, torch.zeros(3, 4, 48), [{"path": "x.png", "sha256": "0" * 64}] * 3, PROMPT_META)
    empty = tmp_path / "empty"
    save_embeddings(empty, torch.zeros(0, 4, 32), [], PROMPT_META)
    foreign = make_prompts(tmp_path / "foreign", meta={**PROMPT_META, "sd_fingerprint": "1" * 64})
    for folder, message in ((wide, "prompts are 48 wide, but SD tiny takes 32"), (empty, "prompt table is empty"),
                            (foreign, "prompts were made for SD 'tiny' \\(fingerprint 111111111111\\)")):
        with pytest.raises(ValueError, match=message):
            run(synth_inputs, rounds(tmp_path / "out"), prompts_dir=folder)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- the CLI
def test_cli_help_and_a_demo_run_with_overrides(synth_inputs, tmp_path):
    cli = CliRunner()
    helped = cli.invoke(main, ["synth", "--help"])
    assert helped.exit_code == 0 and "--prompt-mode" in helped.output and "--workers" in helped.output

    run_dir = tmp_path / "run"
    shutil.copytree(synth_inputs["prompts"], run_dir / "prompts")
    args = ["synth", "--run-dir", str(run_dir), "--clean", str(synth_inputs["clean"]), "--sd", "tiny",
            "--preset", "demo"]
    args += [*CLI_OVERRIDES, "--device", "cpu", "--seed", "5"]
    result = cli.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "synth: 4 shards (0 already done), 8 images written, 0 failures" in result.output
    round_dir = run_dir / "shards" / "round-000"
    manifest = json.loads((round_dir / "manifest.json").read_text())
    want = {"num_samples": 8, "shard_size": 2, "batch_size": 2, "seed": 5}
    assert {k: manifest["config"][k] for k in want} == want
    assert {k: manifest["config"]["ccd"][k] for k in ("steps", "size")} == {"steps": 4, "size": 32}
    assert manifest["config"]["ccd"]["strength"] == 0.5  # from the demo preset
    assert verify_shards(round_dir) == []

    text = cli.invoke(main, [*args, "--round", "1", "--prompt-mode", "text", "--task", "dehaze"])
    assert text.exit_code == 0, text.output
    manifest = json.loads((run_dir / "shards" / "round-001" / "manifest.json").read_text())
    assert (manifest["config"]["prompt_mode"], manifest["config"]["text"]) == ("text", "a hazy photo, thick fog")
    bare = _sd_without_text_encoder(tmp_path / "bare")
    bad = cli.invoke(main, [*args, "--round", "2", "--prompt-mode", "text", "--sd", str(bare)])
    assert bad.exit_code == 2 and "d4ir: error: prompt mode 'text' needs an SD with a text encoder" in bad.output


def test_encoding_in_threads_while_the_next_batch_samples_writes_the_same_bytes(synth_inputs, synth_reference,
                                                                                 tmp_path):
    """GPU runs encode batch k's PNGs in threads while batch k+1 samples: the shards must not change by a byte,
    and a failed sample keeps its place in the order."""
    from d4ir.shards.io import sha256_file
    from d4ir.synth.plan import plan_jobs
    from d4ir.synth.sd import SDSource
    from d4ir.synth.worker import synthesize_shard

    clean = sorted(synth_inputs["clean"].iterdir())
    manifest = json.loads((synth_reference / "manifest.json").read_text())
    provenance = {k: manifest[k] for k in ("sd", "sd_config", "sd_fingerprint", "encoder_sha256")}  # as synthesize()
    jobs = plan_jobs(clean, 5, CFG, round_dir=tmp_path, sd_source=SDSource("tiny"), prompts_dir=synth_inputs["prompts"],
                     provenance=provenance)
    for job in jobs:
        stats = synthesize_shard(replace(job, encode_threads=2))
        want = json.loads((synth_reference / f"{job.index:06d}.stats.json").read_text())
        assert stats.sha256 == want["sha256"] == sha256_file(tmp_path / f"{job.index:06d}.tar")
    # a sample whose photo vanished, in the first of a shard's two batches: same place, same bytes
    job = replace(jobs[0], items=(jobs[0].items[0]._replace(clean=str(tmp_path / "gone.png"), prompt_row=0, seed=1),
                                  *jobs[0].items[1:]),
                  config=replace(CFG, batch_size=1), round_dir=str(tmp_path / "a"))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()  # the round folders `synthesize` makes before any job
    plain = synthesize_shard(job)
    threaded = synthesize_shard(replace(job, encode_threads=2, round_dir=str(tmp_path / "b")))
    assert len(plain.failures) == 1 and plain.sha256 == threaded.sha256
