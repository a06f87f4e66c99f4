"""The installed package cannot clash with other packages: `pip install .` into a fresh virtualenv that already
holds unrelated packages named `synth`, `shards` and `pipelines` (stand-ins built here), then `d4ir --help` and a
short stage 1 run work from a folder outside the repository, and the stand-ins still import as themselves.

The fresh venv gets the project's dependencies (torch, diffusers, ...) from this test's own environment through a
.pth file, so nothing is downloaded; the project itself is built as a wheel and installed without its dependencies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from conftest import make_photos

ROOT = Path(__file__).resolve().parents[1]
STAND_INS = ("synth", "shards", "pipelines")


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _stand_in(site: Path, name: str) -> None:
    """An unrelated top-level package `name` whose marker says who it is."""
    (site / name).mkdir()
    (site / name / "__init__.py").write_text(f"WHO = 'stand-in {name}'\n")


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("install")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base).stdout.strip())
    for name in STAND_INS:
        _stand_in(site, name)
    # this environment's packages (torch, diffusers, ...) after the venv's own: a .pth line is appended to sys.path
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # built from a copy of the tracked files: setuptools leaves build/ and *.egg-info in the tree it builds
    source = base / "source"
    for name in _run(["git", "ls-files"], ROOT).stdout.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    wheels = base / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                  str(source)], base)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = next(wheels.glob("d4ir-*.whl"))
    done = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", str(wheel)], base)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return env_dir


@pytest.mark.slow
def test_installed_names_do_not_clash_with_other_packages(fresh_venv, tmp_path):
    py, d4ir = fresh_venv / "bin" / "python", fresh_venv / "bin" / "d4ir"
    # the wheel holds one top-level package, d4ir, with the shipped weather model inside it
    probe = _run([str(py), "-c", "import d4ir, d4ir.synth.sd as sd, synth, shards, pipelines; "
                  "print(d4ir.__file__); print(synth.WHO, shards.WHO, pipelines.WHO); "
                  "print(sd.__file__)"], tmp_path)
    assert probe.returncode == 0, probe.stderr[-2000:]
    where, who, sd_file = probe.stdout.split("\n")[:3]
    assert str(ROOT) not in where and "site-packages" in where
    assert who == "stand-in synth stand-in shards stand-in pipelines"
    assert (Path(sd_file).parent / "weights" / "weather-ldm" / "model_index.json").is_file()

    helped = _run([str(d4ir), "--help"], tmp_path)
    assert helped.returncode == 0 and "prompts" in helped.stdout and "experiments" in helped.stdout

    photos = make_photos(tmp_path / "photos")
    cmd = [str(d4ir), "prompts", "--run-dir", "run", "--degraded", str(photos["web_degraded"]), "--sd", "tiny",
           "--preset", "demo", "--device", "cpu", "--steps", "2", "--batch-size", "4", "--crop", "16",
           "--queue-size", "4", "--widths", "4,8,8", "--feat-dim", "8", "--token-rank", "4", "--embed-side", "32",
           "--prompt-tokens", "4"]
    done = _run(cmd, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "prompts: 8 images embedded" in done.stdout
    assert (tmp_path / "run" / "prompts" / "embeddings.safetensors").is_file()
