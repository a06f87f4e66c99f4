"""`d4ir experiments NAME` from an installed package: the named configs ship as package data (the wheel holds
configs/*.json), `--list` names them, and a shipped config's relative paths resolve against the current folder,
its datasets' sources against --data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from cli_helpers import cli, one_line_error
from d4ir.pipelines.experiments import load_config
from d4ir.pipelines.experiments.shipped import find_config, shipped_configs

ROOT = Path(__file__).resolve().parents[1]


def test_the_named_configs_are_the_repositorys(monkeypatch, tmp_path):
    assert set(shipped_configs()) == {p.stem for p in (ROOT / "configs").glob("*.json")} >= {"cpu-matrix", "demo"}
    listed = cli("experiments", "--list")
    assert listed.exit_code == 0 and listed.output.startswith("cpu-matrix ") and "on the CPU" in listed.output
    assert "\ndemo " in listed.output
    monkeypatch.chdir(tmp_path)
    path, shipped = find_config("cpu-matrix")
    assert shipped and json.loads(path.read_text())["prepare"] == {"weather-matrix": "../../shared/data"}
    by_file = load_config(ROOT / "configs" / "cpu-matrix.json")  # a file: relative to the file
    assert by_file.prepare["weather-matrix"] == (ROOT / "configs" / "../../shared/data").resolve()
    (tmp_path / "data").mkdir()
    by_name = load_config(path, base=Path.cwd(), data=("data",))  # a name: --data relative to the current folder
    assert by_name.prepare["weather-matrix"] == tmp_path / "data"
    assert by_name.tasks == load_config(path, base=Path.cwd(), data=("weather-matrix=data",)).tasks
    assert by_name.tasks["derain"].test == by_file.tasks["derain"].test  # prepared:... sits under OUT either way
    one_line_error(cli("experiments", "cpu-matrix", "--out", tmp_path / "out"), "datasets have no source folder",
                   "give --data DIR")
    one_line_error(cli("experiments", "cpu-matrix", "--data", "snow=x"), "the config prepares no 'snow'")
    one_line_error(cli("experiments", "matrix"), "no shipped config of that name; shipped: cpu-matrix")


@pytest.mark.slow
def test_an_installed_package_lists_and_loads_them(tmp_path):
    """A wheel built from the repository, installed into a folder of its own, run from another folder."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (the wheel is built from its files)")
    src = tmp_path / "src"
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]  # what a commit would hold
    files = subprocess.run(listing, cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "wheel",
                            src], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "wheel").glob("d4ir-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "d4ir/configs/cpu-matrix.json" in names and "d4ir/configs/demo.json" in names
    assert {"d4ir/distill/weights/demo-derain/teacher.safetensors", "d4ir/distill/weights/demo-derain/README.md"} <= \
        set(names)
    site = tmp_path / "site"
    done = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp_path / "elsewhere"
    (work / "data").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    code = ("import d4ir, sys\nfrom d4ir.pipelines.cli import main\nprint(d4ir.__file__)\n"
            "main(sys.argv[1:])")
    listed = subprocess.run([sys.executable, "-c", code, "experiments", "--list"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert listed.stdout.startswith(str(site / "d4ir" / "__init__.py")) and "\ncpu-matrix " in listed.stdout
    report = subprocess.run([sys.executable, "-c", code, "experiments", "cpu-matrix", "--data", "data", "--out", "out",
                             "--report-only"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-3000:]
    assert (work / "out" / "report.md").is_file()
