"""`d4ir experiments`: the config's validation errors, a cut-down matrix (every row of Tables 1, 3, 4, 5,
desnowing and all-in-one at tiny sizes on generated photos) writing every eval.json and the report with the
published column, a rerun that trains nothing, and an interrupted row resumed with resume=True."""

from __future__ import annotations

import json
import re
from pathlib import Path

import d4ir.distill.evaluate as evaluate_mod
import d4ir.distill.trainer as trainer_mod
import d4ir.pipelines.experiments.stages as stages
import pytest
from conftest import PROMPTS, TEACHER_KWARGS, make_photos
from d4ir.pipelines.experiments import load_config, run_experiments
from d4ir.pipelines.experiments.published import PUBLISHED
from d4ir.pipelines.experiments.tables import ROWS, TABLES

pytestmark = pytest.mark.filterwarnings("ignore:prompt_tokens=4")  # the tiny prompts are shorter than SD's 77
RESTORMER = {"dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 1, 1]}
TINY_SCALE = {
    "preset": "demo",
    "teacher": {"epochs": 1, "iters_per_epoch": 2, "batch_size": 2, "crop": 16, "arch_kwargs": TEACHER_KWARGS},
    "prompts": {"prompt_tokens": PROMPTS.prompt_tokens, "feat_dim": 8, "widths": [4, 8, 8], "token_rank": 4,
                "steps": 2, "batch_size": 4, "crop": 16, "moco": {"queue_size": 4}, "embed_side": 32},
    "synth": {"num_samples": 4, "shard_size": 4, "batch_size": 4, "ccd": {"steps": 2, "strength": 0.5, "size": 32}},
    "distill": {"epochs": 2, "joint_epochs": 1, "round_every": 1, "iters_per_epoch": 1, "batch_size": 2, "crop": 16,
                "feedback_batch": 1, "datafree": {"widths": [16, 8], "student_steps_per_generator_step": 1}},
}
TABLE_NAMES = ["1", "3", "4", "5", "desnow", "all"]


def _photos(folder: Path, seed: int) -> dict[str, Path]:
    """make_photos' folders (drawn once per folder)."""
    if not folder.exists():
        make_photos(folder, seed=seed)
    return {k: folder / k for k in ("web_degraded", "web_clean", "val/clean", "original/clean")}


def _config(root: Path) -> dict:
    rain, snow = _photos(root / "rain", 0), _photos(root / "snow", 1)

    def rel(path: Path) -> str:
        return str(path.relative_to(root))

    def task(photos: dict, tests: dict) -> dict:
        return {"teacher": {"train": rel(photos["original/clean"].parent), "kwargs": TEACHER_KWARGS},
                "web_degraded": rel(photos["web_degraded"]), "web_clean": rel(photos["web_clean"]),
                "test": {name: rel(folder) for name, folder in tests.items()}}

    derain = task(rain, {"Rain100L": rain["val/clean"].parent, "SPA": snow["val/clean"].parent})
    derain["restormer_teacher"] = {"arch": "restormer", "kwargs": RESTORMER}
    return {"out": "exp", "sd": "tiny", "seed": 0, "device": "cpu", "vs_teacher": True,
            "scale": json.loads(json.dumps(TINY_SCALE)),
            "tasks": {"derain": derain, "desnow": task(snow, {"Snow100K": snow["val/clean"].parent}),
                      "all": {"mix": ["derain", "desnow"], "teacher": {"kwargs": TEACHER_KWARGS}}},
            "tables": TABLE_NAMES}


def _write(root: Path, data: dict) -> Path:
    path = root / "config.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """The cut-down matrix, run once for the module: (config file, OUT, the log lines)."""
    root = tmp_path_factory.mktemp("experiments")
    path = _write(root, _config(root))
    lines: list[str] = []
    run_experiments(load_config(path), progress=False, log=lines.append)
    return path, root / "exp", lines


# ------------------------------------------------------------------------------------- validation
def _error(tmp_path: Path, change) -> str:
    data = _config(tmp_path)
    change(data)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_config(_write(tmp_path, data))
    return str(err.value)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(bogus=1), "config: unknown field 'bogus'"),
    (lambda d: d.pop("out"), "out: name the experiments folder"),
    (lambda d: d["scale"].update(preset="huge"), "scale.preset: unknown preset 'huge'"),
    (lambda d: d["scale"]["distill"].update(epochz=2), "scale.distill: unknown field 'epochz'"),
    (lambda d: d["scale"]["distill"].update(batch_size=0), "scale.distill: batch_size must be a positive int"),
    (lambda d: d["scale"]["synth"]["ccd"].update(size=30), "scale.synth.ccd: CCDConfig.size must be"),
    (lambda d: d["scale"]["distill"].update(data="web"), "scale.distill.data: set by the experiments"),
    (lambda d: d["tasks"]["derain"].update(weather="drizzle"), "tasks.derain.weather: expected one of"),
    (lambda d: d["tasks"].update(rain={"web_clean": "x"}), "tasks.rain.weather: task 'rain' is not named"),
    (lambda d: d["tasks"]["derain"]["teacher"].update(arch="unet"), "tasks.derain.teacher.arch: unknown architecture"),
    (lambda d: d["tasks"]["derain"]["teacher"].update(checkpoint="t.pth"), "tasks.derain.teacher.give a checkpoint"),
    (lambda d: d["tasks"]["desnow"].update(teacher={}), "tasks.desnow.teacher: give a checkpoint, or the pairs"),
    (lambda d: d["tasks"]["derain"].update(teacher={"checkpoint": "t.pth", "arch": "gcanet-derain"}),
     "tasks.derain.teacher: arch and kwargs describe a teacher trained here and are not read for a checkpoint"),
    (lambda d: d["tasks"]["derain"].update(val="Rain800"), "tasks.derain.val: 'Rain800' is not one of"),
    (lambda d: d["tasks"]["all"].update(mix=["derain", "nowhere"]), "tasks.all.mix: 'nowhere' is not another"),
    (lambda d: d["tasks"]["derain"].update(web_clean="prepared:x/y"), "names dataset 'x', which `prepare` does not"),
    (lambda d: d.update(prepare={"rain200": "."}), "prepare: unknown dataset builder 'rain200'"),
    (lambda d: d.update(tables=["6"]), "tables: unknown field '6'"),
    (lambda d: d.update(tables={"1": {"rows": ["M9"]}}), "tables.1.rows: unknown row 'M9'"),
    (lambda d: d.update(tables={"1": {"teacher": "ta"}}), "tables.1.teacher: expected one of"),
    (lambda d: d.update(tables=[]), "tables: name at least one table"),
    (lambda d: d.update(seed="0"), "seed: expected an integer"),
])
def test_config_errors_name_the_field(tmp_path, change, message):
    assert message in _error(tmp_path, change)


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    from click.testing import CliRunner
    from d4ir.pipelines.cli import main

    data = _config(tmp_path)
    data["tasks"]["derain"]["test"]["SPA"] = 3
    result = CliRunner().invoke(main, ["experiments", str(_write(tmp_path, data))])
    assert result.exit_code == 2
    assert result.output.strip().endswith("tasks.derain.test.SPA: expected a non-empty string, got 3")
    assert len(result.output.strip().splitlines()) == 1


def test_config_resolves_paths_and_fills_the_mixed_task(tmp_path):
    cfg = load_config(_write(tmp_path, _config(tmp_path)))
    assert cfg.out == tmp_path / "exp"
    derain, mixed = cfg.tasks["derain"], cfg.tasks["all"]
    assert derain.original == tmp_path / "rain" / "original"  # the pairs the teacher trains on
    assert mixed.web_clean == (tmp_path / "rain" / "web_clean", tmp_path / "snow" / "web_clean")
    assert set(mixed.test) == {"Rain100L", "SPA", "Snow100K"} and mixed.original == (
        tmp_path / "rain" / "original", tmp_path / "snow" / "original")
    assert [t.name for t in cfg.tables] == TABLE_NAMES and cfg.tables[-1].tests is None
    assert cfg.scale.stage("prompts").widths == (4, 8, 8)
    missing = _config(tmp_path)
    missing["tasks"]["derain"]["web_clean"] = "nowhere"
    with pytest.raises(FileNotFoundError, match="tasks.derain.web_clean: not found"):
        run_experiments(load_config(_write(tmp_path, missing)), progress=False, log=lambda _: None)


def test_missing_parts_skip_rows_and_tables_with_the_reason(tmp_path):
    data = _config(tmp_path)
    derain = data["tasks"]["derain"]
    (tmp_path / "t.pth").write_bytes(b"")
    derain["teacher"] = {"checkpoint": "t.pth"}  # a given teacher and no original pairs: no Student, no Data
    data["tasks"]["all"]["teacher"] = {"checkpoint": "t.pth"}
    del derain["restormer_teacher"], derain["test"]["SPA"], derain["web_degraded"]
    data["tables"] = {"1": {}, "3": {"task": "all"}, "4": {}, "5": {}, "2": {}}
    lines: list[str] = []
    report = run_experiments(load_config(_write(tmp_path, data)), report_only=True, log=lines.append)
    text = report.read_text()
    for line in ("table 1, row Student: task 'derain' lacks the teacher's original paired data",
                 "table 1, row D4IR: task 'derain' lacks a web_degraded folder",
                 "table 3, row M1: weather 'all' has no text prompt",
                 "table 4: task 'derain' has no test set 'SPA' (its test sets: Rain100L)",
                 "table 5: task 'derain' has no restormer_teacher",
                 "table 2: the config has no task 'dehaze'"):
        assert line in text, line
    assert "| Teacher | Teacher | not run yet |" in text and "DFSR (GAN generator) | not run yet" in text


def test_a_factory_teacher_runs_its_rows_with_the_named_student(tmp_path, monkeypatch):
    """A teacher from outside the registry in the config (package.module:callable@WEIGHTS, the weights relative to
    the config): its rows distil the named registry student, record the factory and its weights' sha256 as the
    teacher; without a student the config is refused in one line before anything runs."""
    from d4ir.shards.io import sha256_file
    from teacher_fixtures import write_factory

    monkeypatch.syspath_prepend(str(tmp_path))
    weights = write_factory(tmp_path)
    data = _config(tmp_path)
    derain = data["tasks"]["derain"]
    derain["original"] = derain["teacher"]["train"]
    derain["teacher"] = {"checkpoint": f"tinynet:make@{weights.name}"}
    del derain["restormer_teacher"]
    data["tasks"] = {"derain": derain}
    data["tables"] = {"1": {"rows": ["Teacher", "Student", "Data"], "tests": ["Rain100L"]}}
    with pytest.raises(ValueError, match="tasks.derain.teacher: a factory teacher cannot be halved"):
        run_experiments(load_config(_write(tmp_path, data)), progress=False, log=lambda _: None)
    derain["teacher"] |= {"student": "airnet", "student_kwargs": dict(TEACHER_KWARGS, n_feats=4)}
    run_experiments(load_config(_write(tmp_path, data)), progress=False, log=lambda _: None)
    out = tmp_path / "exp" / "derain"
    identity = {"kind": "factory", "factory": "tinynet:make", "weights": str(weights), "sha256": sha256_file(weights)}
    for row in ("Teacher", "Student", "Data"):
        assert json.loads((out / "rows/main" / row / "done.json").read_text())["settings"]["teacher"] == identity
    for student in ("main-student", "main-data"):
        kwargs = json.loads((out / "students" / student / "student.json").read_text())["kwargs"]
        assert kwargs["n_feats"] == 4 and "encoder_first" not in kwargs  # derived from n_feats, not recorded
    teacher_eval = json.loads((out / "rows/main/Teacher/Rain100L/eval.json").read_text())
    assert teacher_eval["model"] == identity and teacher_eval["params"] == 8 * 3 * 9 + 8 + 3 * 8 * 9 + 3
    assert "every student is airnet" in (tmp_path / "exp" / "report.md").read_text()


# ------------------------------------------------------------------------------------- the matrix
def _evals(out: Path) -> dict[tuple[str, str, str, str], dict]:
    found = {}
    for path in out.glob("*/rows/*/*/*/eval.json"):
        e = json.loads(path.read_text())
        found[(e["task"], path.parts[-4], e["row"], e["test"])] = e
    return found


def test_matrix_writes_every_eval_and_the_report(matrix):
    _, out, lines = matrix
    evals = _evals(out)
    expected = set()
    for name in TABLE_NAMES:
        t = TABLES[name]
        tests = {"all": ("Rain100L", "SPA", "Snow100K")}.get(name, t.tests)
        who = "restormer" if t.teacher == "restormer_teacher" else "main"
        expected |= {(t.task, who, row, test) for row in t.rows for test in tests}
    assert set(evals) == expected
    for key, e in evals.items():
        assert e["count"] == 6 and 0 < e["mean"]["psnr"] < 100 and 0 < e["mean"]["ssim_y"] <= 1, key
        assert e["method"] == ROWS[key[2]].label and ("ref_psnr" in e["mean"]) == (key[2] != "Teacher")
    # Table 5's student is the Restormer teacher at half width (dim 8 -> 4), Table 1's an AirNet
    assert json.loads((out / "derain/students/restormer-student/student.json").read_text())["kwargs"]["dim"] == 4
    assert evals[("derain", "restormer", "Student", "Rain100L")]["params"] < evals[
        ("derain", "restormer", "Teacher", "Rain100L")]["params"]
    # the ablations synthesized their own rounds with their switches; D4IR regenerated a round of its own
    for m, (z0, mode) in {"M1": ("noise", "text"), "M3": ("noise", "content"), "M4": ("ccd", "none")}.items():
        manifest = json.loads((out / f"derain/ablations/{m}/shards/round-000/manifest.json").read_text())
        assert (manifest["config"]["ccd"]["z0"], manifest["config"]["prompt_mode"]) == (z0, mode)
    assert (out / "derain/students/main-d4ir/shards/round-001/manifest.json").exists()
    assert not (out / "derain/ablations/M2/students/main-m2/shards").exists()  # no joint phase, no rounds
    # shared rows ran once: Table 4's D4IR is Table 1's, scored on both test sets
    assert sum("derain: D4IR (main teacher)" == line[3:] for line in lines) == 1
    report = (out / "report.md").read_text()
    for name in TABLE_NAMES:
        assert f"## {TABLES[name].title}" in report
        assert (out / "samples" / f"table-{name}.png").stat().st_size > 0
    t1 = PUBLISHED["1"]["D4IR"]  # Params, CPU ms, PSNR, SSIM, PSNR Y, SSIM Y, gap, vs teacher (2), the paper's 3, time
    row = r"\| KD \| D4IR [^|]*\| [\d.]+ \| [\d.]+ \|( [\d.]+ \|){4} [-+][\d.]+ \|( [\d.]+ \|){2} "
    assert re.search(row + rf"{t1[0]:.2f} \| {t1[1]:.3f} \| {t1[2]:.2f} \| \d+ \|", report)
    # the gap to the teacher is the row's PSNR minus the teacher's, on the same test set
    d4ir, teacher = (evals[("derain", "main", k, "Rain100L")]["mean"]["psnr"] for k in ("D4IR", "Teacher"))
    assert f"| {d4ir - teacher:+.2f} |" in report
    student_params, teacher_params = (evals[("derain", "main", k, "Rain100L")]["params"] for k in ("D4IR", "Teacher"))
    ratio = student_params / teacher_params
    assert re.search(rf"On Rain100L, each student has {ratio:.2f}x its parameters and [\d.]+x its CPU latency\.",
                     report)
    # every architecture's latency was measured once: teacher and student of each teacher
    assert len(json.loads((out / "latency.json").read_text())) == 4
    # the rows that synthesize show their rounds beside their clean sources, with the colour statistics
    assert "### D4IR: synthesized images of each round" in report and "round 1: synthesized (" in report
    assert (out / "samples" / "rounds-derain-d4ir.png").stat().st_size > 0 and "### M4: synthesized" in report
    assert "| web degraded |" in report and "| test degraded |" in report
    assert "no published column" in report and "not run yet" not in report and "## Caveat" in report
    assert (out / "figures" / "curves-derain.png").exists() and "## Time per step" in report


def test_rerun_trains_nothing_and_an_interrupted_row_resumes(matrix, monkeypatch):
    path, out, _ = matrix

    def refuse(*args, **kwargs):
        raise AssertionError("a finished row was run again")

    for name in ("train_supervised", "distill", "train_prompts", "synthesize", "evaluate"):
        monkeypatch.setattr(stages, name, refuse)
    before = (out / "report.md").read_text()
    lines: list[str] = []
    run_experiments(load_config(path), progress=False, log=lines.append)
    assert not any(line.startswith("== ") for line in lines)
    assert (out / "report.md").read_text() == before

    # a row killed after its last epoch (state.pt written, no done marker) resumes: distill with resume=True
    marker = out / "derain/rows/main/Data/done.json"
    marker.unlink()
    calls = []
    real_distill, real_evaluate = trainer_mod.distill, evaluate_mod.evaluate

    def spy(*args, **kwargs):
        calls.append(kwargs["resume"])
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(stages, "distill", spy)
    monkeypatch.setattr(stages, "evaluate", real_evaluate)
    run_experiments(load_config(path), only=["1"], progress=False, log=lambda _: None)
    assert calls == [True] and marker.exists()
    assert json.loads(marker.read_text())["evals"].keys() == {"Rain100L"}  # only Table 1 ran
    assert "| KD | Data (the teacher's degraded inputs) | not run yet |" in (out / "report.md").read_text()
    # Table 4 then scores the finished row on SPA without training it again
    run_experiments(load_config(path), only=["4"], progress=False, log=lambda _: None)
    assert calls == [True] and json.loads(marker.read_text())["evals"].keys() == {"Rain100L", "SPA"}
    assert "not run yet" not in (out / "report.md").read_text()


def test_the_caveat_names_what_the_sd_can_say():
    from d4ir.pipelines.experiments.report_rows import TINY_SD_NOTE, WEATHER_SD_NOTE, sd_caveat

    assert sd_caveat("tiny") == TINY_SD_NOTE and "structured noise" in TINY_SD_NOTE
    assert sd_caveat("weather") == WEATHER_SD_NOTE and "weather LDM" in WEATHER_SD_NOTE
    other = sd_caveat("/models/stable-diffusion-v1-5")
    assert "`/models/stable-diffusion-v1-5`" in other and "noise" not in other
