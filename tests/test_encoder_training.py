"""The prompt encoder's training record (synth.embed.EncoderTraining): one typed shape written by stage 1 and by
every regeneration round, read back without defaults of its own; records written before it was typed still read."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from d4ir.shards.io import save_weights
from d4ir.synth.embed import ENCODER_TRAINING_FORMAT, EncoderTraining, encoder_record
from d4ir.synth.moco import MoCoConfig
from d4ir.synth.prompt_encoder import PromptEncoder

RECORD = EncoderTraining(crop=16, embed_side=32, moco=MoCoConfig(queue_size=4), degraded_dir="/web/rainy",
                         num_images=12, steps=4, batch_size=4, lr=1e-3, seed=0, base="empty-text",
                         base_sha256="a" * 64, prompt_strength=0.25)
# what stage 1 wrote before the record was typed: its resume arguments (the encoder's architecture among them)
# without the image list, then the export settings; no format_version, no round
OLD_STAGE1 = {"prompt_tokens": 4, "feat_dim": 16, "widths": [4, 8, 16], "token_rank": 4, "batch_size": 4, "crop": 16,
              "moco": {"queue_size": 4, "tau": 0.07, "momentum": 0.999}, "lr": 0.001, "seed": 0, "prompt_dim": 8,
              "base_sha256": None, "base": "zeros", "steps": 4, "prompt_strength": 0.25, "embed_side": 32,
              "num_images": 12, "degraded_dir": "/web/rainy"}
# what a regeneration round wrote before: only what the feedback loop knew
OLD_ROUND = {"embed_side": 32, "round": 2, "degraded_dir": "web/rainy", "crop": 16,
             "moco": {"queue_size": 4, "tau": 0.07, "momentum": 0.999}}


def test_round_trip_through_json():
    raw = json.loads(json.dumps(RECORD.to_json()))
    assert raw["format_version"] == ENCODER_TRAINING_FORMAT and raw["moco"]["queue_size"] == 4
    assert EncoderTraining.from_json(raw, "x.json") == RECORD


def test_records_written_before_the_version_still_read():
    stage1 = EncoderTraining.from_json(OLD_STAGE1, "old.json")
    assert (stage1.crop, stage1.embed_side, stage1.moco, stage1.round) == (16, 32, MoCoConfig(queue_size=4), 0)
    assert (stage1.steps, stage1.base, stage1.num_images) == (4, "zeros", 12)
    regenerated = EncoderTraining.from_json(OLD_ROUND, "old.json")
    assert (regenerated.crop, regenerated.embed_side, regenerated.round) == (16, 32, 2)
    assert regenerated.steps is None and regenerated.num_images is None and regenerated.prompt_strength is None


@pytest.mark.parametrize("change, message", [
    ({"format_version": 2}, "format version 2"),
    ({"crop": None}, "field 'crop' must be int"),
    ({"embed_side": "256"}, "field 'embed_side' must be int"),
    ({"moco": {"queue": 4}}, "field 'moco' is not a MoCo config"),
    ({"round": True}, "field 'round' must be int"),
])
def test_a_damaged_record_is_one_line_naming_file_and_field(change, message):
    raw = RECORD.to_json() | change
    with pytest.raises(ValueError, match=message) as err:
        EncoderTraining.from_json(raw, "RUN/prompts/prompt_encoder.json")
    assert "RUN/prompts/prompt_encoder.json" in str(err.value) and "\n" not in str(err.value)


def test_read_from_a_prompts_folder(tmp_path):
    """The one reader: the record beside the encoder's weights; a file without one is refused, not defaulted."""
    enc = PromptEncoder(prompt_dim=8, prompt_tokens=4, feat_dim=16, widths=(4, 8, 16), token_rank=4)
    save_weights(tmp_path / "new" / "prompt_encoder", enc.state_dict(), encoder_record(enc, replace(RECORD, round=3)))
    assert EncoderTraining.read(tmp_path / "new") == replace(RECORD, round=3)
    save_weights(tmp_path / "old" / "prompt_encoder", enc.state_dict(),
                 {"arch": "PromptEncoder", "encoder": enc.config, "training": OLD_ROUND})
    assert EncoderTraining.read(tmp_path / "old").round == 2
    save_weights(tmp_path / "bare" / "prompt_encoder", enc.state_dict(),
                 {"arch": "PromptEncoder", "encoder": enc.config})
    with pytest.raises(ValueError, match="no training record"):
        EncoderTraining.read(tmp_path / "bare")
