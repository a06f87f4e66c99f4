"""Reliability, third pass (docs/reliability.md, cases 25 and up): a damaged shard that a rerun repairs, a run
folder that moves, messages that name what they are about. Each test asserts the exact outcome."""

from __future__ import annotations

from click.testing import CliRunner
from conftest import synth_config
from d4ir.pipelines.cli import main
from d4ir.shards.verify import verify_shards
from d4ir.shards.writer import read_manifest, read_stats, shard_done
from d4ir.synth.worker import synthesize


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ----------------------------------------------------------------- 25. a damaged shard is redone by a rerun
def test_a_shard_with_a_flipped_byte_is_not_done_and_a_synth_rerun_redoes_it(tiny_run, tmp_path):
    r = tiny_run.copy_to(tmp_path / "run")
    shards, round0 = r.root / "shards", r.root / "shards" / "round-000"
    tar = round0 / "000001.tar"
    original = tar.read_bytes()
    damaged = bytearray(original)
    damaged[600] ^= 0xFF  # same size, one byte changed
    tar.write_bytes(bytes(damaged))
    altered = "000001.tar: altered: sha256 differs from the one in its stats file"
    assert verify_shards(round0) == [altered]
    assert not shard_done(round0, 1) and shard_done(round0, 0)
    res = synthesize(r.clean, shards, synth_config(), prompts_dir=r.root / "prompts", progress=False)
    assert (res.skipped, res.images) == (1, 4)  # the advice "rerun `d4ir synth` to redo it" is true
    assert tar.read_bytes() == original and read_stats(round0, 1)["count"] == 4
    assert read_manifest(round0)["complete"] is True and verify_shards(round0) == []
