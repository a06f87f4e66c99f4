"""Stage 3 under torchrun itself: `torchrun --nproc-per-node 2 -m d4ir.pipelines.cli distill ...`, the README's
multi-GPU line with two gloo ranks on the CPU, on the tiny run (2 shards, the joint phase and one regeneration
round). Both ranks must end with equal students and encoders, having read disjoint shards, and only rank 0
writes. What the ranks end with is dumped by tests/ddp_probe.py, loaded through a sitecustomize hook."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from d4ir.shards.io import load_weights, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
SMALL = ["--batch-size", "2", "--crop", "16", "--iters-per-epoch", "2", "--feedback-batch", "1", "--epochs", "2",
         "--joint-epochs", "1", "--round-every", "1", "--device", "cpu", "--preset", "demo"]


def _torchrun() -> str:
    """The torchrun beside this interpreter (.venv/bin/torchrun), else the one on PATH."""
    local = Path(sys.executable).parent / "torchrun"
    return str(local) if local.exists() else shutil.which("torchrun") or "torchrun"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_torchrun() -> list[str]:
    """The README's torchrun command as words (continuation lines joined)."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "torchrun " in line and "d4ir.pipelines.cli" in line)
    return shlex.split(line)


def _flags(words: list[str]) -> list[str]:
    return [w for w in words if w.startswith("--")]


def test_readme_line_runs_under_torchrun(run_copy, tmp_path):
    r = run_copy
    readme = readme_torchrun()
    assert Path(readme[0]).name == "torchrun" and readme[1:5] == ["--nproc-per-node", "8", "-m", "d4ir.pipelines.cli"]
    assert readme[5] == "distill"
    wrapped = tmp_path / "teacher.pth"  # an official-style wrapper: its log line must come from rank 0 only
    torch.save({"net": load_weights(r.teacher.with_suffix(""))[0]}, wrapped)
    values = {"--run-dir": r.root, "--teacher": wrapped, "--student": "half-airnet", "--degraded": r.degraded,
              "--clean": r.clean, "--val": r.val, "--num-workers": 1}  # 2 shards feed 2 ranks x 1 worker
    assert set(_flags(readme[5:])) == set(values)  # the README's flags, each one given below
    cmd = [_torchrun(), "--nproc-per-node", str(WORLD), "-m", "d4ir.pipelines.cli", "distill"]
    cmd += [str(w) for flag, value in values.items() for w in (flag, value)] + SMALL

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('D4IR_DDP_DUMP') and 'RANK' in os.environ:\n"
        "    import ddp_probe\n    ddp_probe.install(os.environ['D4IR_DDP_DUMP'])\n"
    )
    dumps_dir = tmp_path / "dumps"
    dumps_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(hook), str(ROOT / "tests"), str(ROOT),
                                                             os.environ.get("PYTHONPATH")])),
               D4IR_DDP_DUMP=str(dumps_dir), PET_MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"distill: [\d,]+ parameters, last round 1", done.stdout), done.stdout[-2000:]
    # only rank 0 reports: one summary (no empty one from rank 1, no '; ;'), each warning once
    summaries = [line for line in done.stdout.splitlines() if line.startswith("distill: ")]
    assert len(summaries) == 1 and "; ;" not in done.stdout, done.stdout
    assert done.stderr.count("weights from the checkpoint's 'net' entry") == 1, done.stderr[-3000:]
    dumps = [torch.load(dumps_dir / f"rank{i}.pt", weights_only=True) for i in range(WORLD)]
    assert [d["world"] for d in dumps] == [WORLD, WORLD]

    # each epoch the two ranks read disjoint shards that together are the whole round
    for epoch, (a, b) in enumerate(zip(dumps[0]["shards"], dumps[1]["shards"])):
        assert len(a) == len(b) == 1 and a != b, f"epoch {epoch}: ranks read {a} and {b}"
        assert Path(a[0]).parent == Path(b[0]).parent
    assert [Path(s[0]).parent.name for s in dumps[0]["shards"]] == ["round-000", "round-001"]

    # DDP: rank 0's init is broadcast and gradients are averaged, so both ranks hold the same student
    p0, p1 = dumps[0]["params"], dumps[1]["params"]
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    # BatchNorm running statistics are per rank (DDP broadcasts rank 0's before each forward, and rank 0's
    # are the ones saved): they are the only state entries allowed to differ
    s0, s1 = dumps[0]["student"], dumps[1]["student"]
    assert all(k.endswith(("running_mean", "running_var")) for k in s0 if not torch.equal(s0[k], s1[k]))
    e0, e1 = dumps[0]["encoder"], dumps[1]["encoder"]
    assert e0 and e0.keys() == e1.keys() and all(torch.equal(e0[k], e1[k]) for k in e0)

    # only rank 0 wrote: one log line per epoch, and its student file is what both ranks ended with
    out = r.root / "students" / "half-airnet"
    assert [rec["epoch"] for rec in read_jsonl(out / "train.jsonl")] == [1, 2]
    saved, info = load_weights(out / "student")
    assert info["name"] == "half-airnet" and all(torch.equal(saved[k], s0[k]) for k in s0)
    assert json.loads((out / "shards" / "round-001" / "manifest.json").read_text())["complete"]
    assert json.loads((out / "eval.json").read_text())  # --val: rank 0 scored the student
