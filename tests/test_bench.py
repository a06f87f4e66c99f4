"""bench/ scripts: argument parsing, a tiny CPU run of bench/models.py, the ratio table, and the Rain100L-split
benchmark's experiments config (its data preparation is tested in tests/test_experiments_data.py)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str):
    """A bench script as a module (pytest puts bench/ on the path, as running it does)."""
    return importlib.import_module(name)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("script, flags", [
    ("models.py", ("--device", "--sizes", "--repeats", "--archs", "--json-out")),
    ("quality_rain100l.py", ("--scale", "--work", "--sd", "--threads", "--config-only")),
])
def test_help_exits_zero_and_lists_flags(script, flags):
    proc = _run(str(BENCH / script), "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in flags:
        assert flag in proc.stdout


@pytest.mark.parametrize("args, message", [
    (("--sizes", "32"), "WIDTHxHEIGHT"),
    (("--archs", "airnet:no-such-net"), "unknown architecture 'no-such-net'"),
    (("--repeats", "0"), "--repeats must be >= 1"),
])
def test_models_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exc:  # in-process: a subprocess would pay torch's import each time
        _load("models").parse_args(list(args))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_quality_refuses_a_work_folder_inside_the_repo():
    proc = _run(str(BENCH / "quality_rain100l.py"), "--work", str(ROOT / "runs" / "rain100l"))
    assert proc.returncode == 2
    assert "inside the repository" in proc.stderr


def test_models_cpu_smoke_prints_ratio_table(tmp_path):
    out = tmp_path / "models.json"
    proc = _run(str(BENCH / "models.py"), "--device", "cpu", "--archs", "restormer-12", "--sizes", "32x24",
                "--repeats", "1", "--warmup", "0", "--threads", "1", "--json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| size"))
    assert "latency ratio" in header and "memory ratio" in header
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| 32x24"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["restormer-12", "restormer-12"] and cells[-3:] == ["1.00", "1.00", "1.00"]
    result = json.loads(out.read_text())
    (rec,) = result["rows"]
    assert rec["arch"] == "restormer-12" and rec["width"] == 32 and rec["height"] == 24
    assert rec["latency_ms"] > 0 and len(rec["latencies_ms"]) == 1
    assert rec["params"] == sum(p.numel() for p in _restormer12().parameters())


def _restormer12():
    from d4ir.distill.registry import build

    return build("restormer-12")


def test_models_table_ratios_are_relative_to_the_teacher():
    models = _load("models")
    teacher = {"params": 8e6, "latency_ms": 200.0, "peak_mem_mib": 400.0}
    student = {"params": 2e6, "latency_ms": 50.0, "peak_mem_mib": 100.0}
    rows = [{"teacher": "airnet", "arch": name, "width": 480, "height": 320, **r, "teacher_result": teacher}
            for name, r in (("airnet", teacher), ("half-airnet", student))]
    lines = models.format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[3].endswith("| 0.25 | 0.25 | 0.25 |") and "| 2.00 |" in lines[3]
    rows[1] = {**rows[1], "error": "deformable_im2col not implemented for BFloat16"}
    for key in ("params", "latency_ms", "peak_mem_mib"):
        del rows[1][key]
    assert models.format_table(rows).splitlines()[3].endswith("| failed | failed | failed | - | - | - |")
    assert models.parse_comparisons("airnet:half-airnet, restormer") == [("airnet", "half-airnet"),
                                                                          ("restormer", None)]


@pytest.mark.parametrize("scale", ["cpu-small", "gpu"])
def test_quality_writes_a_valid_experiments_config(tmp_path, scale):
    from d4ir.pipelines.experiments import load_config

    path = _load("quality_rain100l").main(["--scale", scale, "--work", str(tmp_path), "--data", str(tmp_path),
                                           "--config-only"])
    cfg = load_config(path)
    assert cfg.out == tmp_path / scale / "exp" and list(cfg.prepare) == ["rain100l-split"]
    assert cfg.tasks["derain"].original == tmp_path / scale / "exp" / "data" / "rain100l-split" / "train"
    assert [t.rows for t in cfg.tables] == [("Input", "Teacher", "Student", "Data", "M0", "D4IR")]
    assert cfg.scale.stage("synth").ccd.size == (64 if scale == "cpu-small" else 256)


def test_cpu_peak_meter_is_not_fooled_by_a_parents_peak():
    """ru_maxrss survives fork + exec, so a measurement child of a process that once held 600 MiB reported a
    growth of 0; bench/cpu_memory.PeakMeter resets the high-water mark and measures the child's own 64 MiB."""
    code = ("from cpu_memory import PeakMeter\n"
            "m = PeakMeter()\nx = bytearray(64 * 2**20)\nx[::4096] = b'x' * len(x[::4096])\nprint(m.peak_mib())")
    held = bytearray(600 * 2**20)
    held[::4096] = b"x" * len(held[::4096])  # touch every page: resident, the parent's peak
    del held
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bench", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert 60 <= float(done.stdout) <= 120
