"""bench/ scripts: argument parsing, a tiny CPU run of bench/models.py, the ratio table, and the Rain100L-split
data preparation (split, web folders, leakage check) on a fake data folder."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("script, flags", [
    ("models.py", ("--device", "--sizes", "--repeats", "--archs", "--json-out")),
    ("quality_rain100l.py", ("--scale", "--work", "--sd", "--out", "--json-out")),
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
    from distill.registry import build

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


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_quality_prepare_data_splits_and_excludes_test_images(tmp_path):
    q = _load("quality_rain100l")
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    test_imgs = {}
    for n in range(1, 101):  # a fake 100-pair rain100l_test at 480x320 would be slow: tiny images do
        clean = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        _png(root / "rain100l_test" / "clean" / f"{n}.png", clean)
        _png(root / "rain100l_test" / "degraded" / f"{n}.png", np.maximum(clean, 200))
        test_imgs[n] = clean
    for name in q.WEB_CLEAN_SETS:
        (root / name / "clean").mkdir(parents=True)
        (root / name / "degraded").mkdir(parents=True)
    photo = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    _png(root / "hsts_synthetic" / "clean" / "a.png", photo)
    _png(root / "hazerd_samples" / "clean" / "b_1.png", photo[:30])
    _png(root / "hazerd_samples" / "clean" / "b_2.png", photo[:30])  # byte-identical duplicate
    _png(root / "spa_data_samples" / "degraded" / "r.png", np.maximum(photo, 180))
    _png(root / "spa_data_samples" / "clean" / "r.png", photo[5:])
    leaked = test_imgs[56]  # a test image stored as a "web" image: must not reach the web folders
    _png(root / "rain100l_fullsize_samples" / "clean" / "norain-56.png", leaked)
    _png(root / "rain100l_fullsize_samples" / "degraded" / "norain-56.png", np.maximum(leaked, 200))

    info = q.prepare_data(root, tmp_path / "work", seed=0)
    work = tmp_path / "work"
    assert sorted(int(p.stem) for p in (work / "train" / "clean").iterdir()) == list(range(1, 51))
    assert sorted(int(p.stem) for p in (work / "test" / "degraded").iterdir()) == list(range(51, 101))
    assert (work / "test" / "clean" / "60.png").read_bytes() == (root / "rain100l_test/clean/60.png").read_bytes()
    assert info["counts"] == {"web_clean": 3, "synthetic_rain": 3 * q.RAIN_PER_PHOTO, "real_rain": 1,
                              "duplicates": 1}
    assert sorted(Path(e["path"]).parent.name for e in info["excluded"]) == ["clean", "degraded"]
    assert not any("norain-56" in p.name for p in (work / "web_clean").iterdir())
    assert not any("norain-56" in p.name for p in (work / "web_degraded").iterdir())
    syn = np.asarray(Image.open(work / "web_degraded" / "syn-hsts_synthetic-a-0.png"))
    assert syn.shape == photo.shape and (syn.astype(int) >= photo.astype(int) - 1).all()  # rain only brightens
    # a finished data folder is reused as it is
    (work / "web_clean" / "marker").write_text("kept")
    assert q.prepare_data(root, work, seed=0) == info and (work / "web_clean" / "marker").exists()
    with pytest.raises(SystemExit, match="with seed 0"):  # other web renders: never mixed with these
        q.prepare_data(root, work, seed=1)
