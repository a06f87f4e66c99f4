"""`d4ir status`: what a run folder holds, stage by stage (the Makefile's prerequisites read `--done`)."""

from __future__ import annotations

from click.testing import CliRunner
from conftest import round_manifest
from d4ir.pipelines.cli import main
from d4ir.shards.layout import EMBEDDINGS_FILE, RunLayout
from d4ir.shards.status import run_status, stage_done
from d4ir.shards.writer import write_manifest


def _done(root) -> dict[str, bool]:
    return {s.stage: s.done for s in run_status(root)}


def test_each_stage_is_done_when_its_hand_over_file_is_written(tmp_path):
    layout = RunLayout(tmp_path / "run")
    assert _done(layout.root) == {"teacher": False, "prompts": False, "synth": False}
    layout.prompts.mkdir(parents=True)
    (layout.prompts / EMBEDDINGS_FILE).write_bytes(b"x")
    round0 = layout.round_shards(0)
    round0.mkdir(parents=True)
    write_manifest(round0, round_manifest(complete=False))
    assert _done(layout.root) == {"teacher": False, "prompts": True, "synth": False}  # an interrupted round
    write_manifest(round0, round_manifest(complete=True, images=8))
    layout.teacher_dir.mkdir()
    layout.teacher_weights.write_bytes(b"x")
    layout.student("half").mkdir(parents=True)
    status = run_status(layout.root)
    assert {s.stage: s.done for s in status} == {"teacher": True, "prompts": True, "synth": True,
                                                 "student half": False}
    assert "round 0: complete, 8 images" in next(s.detail for s in status if s.stage == "synth")
    assert stage_done(layout.root, "synth") and stage_done(layout.root, "teacher")


def test_the_command_prints_the_stages_and_answers_done_by_exit_code(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.prompts.mkdir(parents=True)
    (layout.prompts / EMBEDDINGS_FILE).write_bytes(b"x")
    runner = CliRunner()
    shown = runner.invoke(main, ["status", "--run-dir", str(layout.root)])
    assert shown.exit_code == 0 and [line.split()[:2] for line in shown.output.splitlines()] == [
        ["teacher", "missing"], ["prompts", "done"], ["synth", "missing"]]
    assert runner.invoke(main, ["status", "--run-dir", str(layout.root), "--done", "prompts"]).exit_code == 0
    done = runner.invoke(main, ["status", "--run-dir", str(layout.root), "--done", "synth"])
    assert done.exit_code == 1 and done.output == ""


def test_a_missing_run_folder_is_named_and_counts_as_nothing_done(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(main, ["status", "--run-dir", str(tmp_path / "nowhere")])
    assert listed.exit_code == 2 and f"d4ir: error: no run folder at {tmp_path / 'nowhere'}" in listed.output
    assert runner.invoke(main, ["status", "--run-dir", str(tmp_path / "nowhere"), "--done", "teacher"]).exit_code == 1
