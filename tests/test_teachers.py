"""Any teacher (distill/teachers.py, distill/probe.py): TorchScript and torch.export programs of a registry network
teach exactly like the network; a Python factory teaches through `d4ir distill` with the feedback loop; a teacher
that breaks the contract (size, NaN, gradients), a file of the wrong kind, or a program that would be unpickled is
refused in one line."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from cli_helpers import cli, one_line_error
from d4ir.distill.config import DistillConfig
from d4ir.distill.deform import using
from d4ir.distill.registry import load_model
from d4ir.distill.teachers import check_gradients, load_teacher
from d4ir.distill.trainer import distill
from d4ir.shards.io import load_weights, read_jsonl, sha256_file
from safetensors.torch import load_file, save_file
from teacher_fixtures import write_factory

TINY = dict(batch_size=2, crop=16, iters_per_epoch=2, feedback_batch=1, num_workers=0, epochs=1, joint_epochs=1,
            round_every=0)
# the registry student for a foreign teacher: tests/conftest.py's teacher at half width
STUDENT_KWARGS = dict(n_feats=4, n_groups=1, n_blocks=1, queue_size=16)
STUDENT_ARGS = ("--student", "airnet", "--student-kwargs",
                ",".join(f"{k}={v}" for k, v in STUDENT_KWARGS.items()))
CLI_TINY = ("--epochs", 1, "--joint-epochs", 1, "--round-every", 0, "--iters-per-epoch", 2, "--batch-size", 2,
            "--crop", 16, "--feedback-batch", 1, "--device", "cpu")

@pytest.fixture
def factory(tmp_path, monkeypatch) -> Path:
    """tinynet.py on sys.path and its weights (tmp_path/tinynet.safetensors)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_factory(tmp_path)


def _programs(teacher_path: Path, out: Path) -> dict[str, Path]:
    """A TorchScript trace and a torch.export program (dynamic batch, height and width) of the registry teacher.

    AirNet's deformable conv is captured with the torchvision kernel: the "gather" and "sample" kernels pick
    their chunking from the input's shape in Python, so torch.export specialises batch and size on them."""
    net = load_model(teacher_path)[0].eval().set_deform("torchvision").requires_grad_(False)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ts, pt2 = out / "teacher.jit", out / "teacher.pt2"  # suffixes are not how they are recognised
    torch.jit.trace(net, x).save(str(ts))
    b, h, w = (torch.export.Dim(n, min=1 if n == "b" else 16, max=4096) for n in "bhw")
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: b, 2: h, 3: w},)), str(pt2))
    return {"registry": teacher_path, "torchscript": ts, "export": pt2}


def test_torchscript_and_export_teach_like_the_network(run_copy, tmp_path):
    """The same KD and feedback losses, epoch by epoch, and the same distilled student (joint phase with the
    feedback loop, one short seeded run) from the network, its TorchScript and its torch.export program; the
    foreign ones record their kind and sha256 as the teacher."""
    r = run_copy
    specs = _programs(r.teacher, tmp_path)
    logs, students = {}, {}
    with using(impl="torchvision"):  # one kernel for every run: the comparison is exact up to float rounding
        for kind, spec in specs.items():
            cfg = DistillConfig(student="airnet", student_kwargs=STUDENT_KWARGS, **TINY)
            distill(r.root, spec, cfg, degraded_dir=r.degraded, clean_dir=r.clean, val_dir=r.val, name=kind,
                    progress=False)
            out = r.root / "students" / kind
            logs[kind] = read_jsonl(out / "train.jsonl")
            students[kind] = load_weights(out / "student")[0]
            config = json.loads((out / "config.json").read_text())
            if kind != "registry":
                assert config["teacher"] == {"kind": kind, "path": str(spec.resolve()), "sha256": sha256_file(spec)}
                assert json.loads((out / "eval.json").read_text())["reference"] == config["teacher"]
    assert logs["registry"][0]["loss_kd"] > 0 and logs["registry"][0]["loss_fb"] > 0
    for kind in ("torchscript", "export"):
        for ours, theirs in zip(logs["registry"], logs[kind]):
            for key in ("loss_kd", "loss_fb", "loss_cl", "val_psnr", "val_ref_psnr"):
                assert theirs[key] == pytest.approx(ours[key], rel=1e-5, abs=1e-7), (kind, key)
        assert students[kind].keys() == students["registry"].keys()
        for key, value in students["registry"].items():
            torch.testing.assert_close(students[kind][key], value, msg=f"{kind}: {key}")
    # moving the program moves the devices its graph names too (AirNet's deform bias: zeros(..., device=cpu))
    moved = load_teacher(specs["export"])[0].to("meta")
    devices = [n.kwargs["device"] for n in moved.net.graph.nodes if "device" in n.kwargs]
    assert devices and all(torch.device(d).type == "meta" for d in devices)


def test_factory_teacher_through_cli(run_copy, factory):
    """`d4ir distill --teacher tinynet:make@W` with the feedback loop: the student trains, the factory and its
    weights' sha256 are recorded in config.json, state.pt's settings and eval.json; a resume with other weights is
    refused; "half" of a foreign teacher is one line naming --student."""
    r = run_copy
    spec = f"tinynet:make@{factory}"
    args = ("distill", "--run-dir", r.root, "--teacher", spec, "--degraded", r.degraded, "--clean", r.clean,
            "--val", r.val, "--name", "fac", *CLI_TINY)
    one_line_error(cli(*args), "cannot be halved", "--student")
    result = cli(*args, *STUDENT_ARGS)
    assert result.exit_code == 0, result.output
    out = r.root / "students" / "fac"
    identity = {"kind": "factory", "factory": "tinynet:make", "weights": str(factory.resolve()),
                "sha256": sha256_file(factory)}
    assert json.loads((out / "config.json").read_text())["teacher"] == identity
    settings = torch.load(out / "state.pt", weights_only=True)["settings"]  # by content: a moved run resumes
    assert {k: settings[k] for k in ("teacher_sha256", "teacher_kind", "teacher_factory")} == {
        "teacher_sha256": identity["sha256"], "teacher_kind": "factory", "teacher_factory": "tinynet:make"}
    assert json.loads((out / "eval.json").read_text())["reference"] == identity
    log = read_jsonl(out / "train.jsonl")
    assert log[0]["joint"] and log[0]["loss_fb"] > 0  # the feedback loss ran through the factory's network
    assert load_weights(out / "student")[1]["kwargs"]["n_feats"] == 4
    # `d4ir eval --run-dir --student` scores against the teacher the student recorded, not RUN/teacher
    scored = cli("eval", "--run-dir", r.root, "--student", "fac", "--pairs", r.val, "--out", out / "again.json")
    assert scored.exit_code == 0 and "against the reference" in scored.output, scored.output
    assert json.loads((out / "again.json").read_text())["reference"] == identity
    # the same weights at the same path resume; other weights there are another teacher
    assert cli(*args, *STUDENT_ARGS, "--epochs", 2, "--resume").exit_code == 0
    state = load_file(str(factory))
    save_file({k: v + 0.01 for k, v in state.items()}, str(factory))
    one_line_error(cli(*args, *STUDENT_ARGS, "--epochs", 3, "--resume"), "other settings", "teacher_sha256")


@pytest.mark.parametrize("make, needles", [
    ("make_half", ("turns a 2x3x32x32 RGB batch in [0, 1] into 2x3x16x16", "its input's size")),
    ("make_nan", ("returns NaN or infinite values",)),
    ("make_detached", ("not differentiable", "carries no gradient", "feedback", "--feedback-batch 0")),
])
def test_broken_teacher_refused_in_one_line(tiny_run, factory, tmp_path, make, needles):
    r = tiny_run.copy_to(tmp_path / "run")
    result = cli("distill", "--run-dir", r.root, "--teacher", f"tinynet:{make}@{factory}", "--degraded", r.degraded,
                 "--clean", r.clean, *STUDENT_ARGS, *CLI_TINY)
    one_line_error(result, f"tinynet:{make}@", *needles)
    assert not (r.root / "students").exists()


def test_non_differentiable_teacher_runs_what_needs_no_gradient(factory, tiny_run, tmp_path):
    """A teacher without input gradients is refused for the feedback loss and DFSR/DFMC only: the baselines
    (and the joint phase without the feedback loss) accept it, and `d4ir eval` scores it."""
    _, info = load_teacher(f"tinynet:make_detached@{factory}")
    assert not info.differentiable
    for ok in (dict(data="original"), dict(data="web"), dict(feedback_batch=0), dict(joint_epochs=0), dict(round=0)):
        check_gradients(info, DistillConfig(**ok))
    for refused in (dict(), dict(data="dfsr", iters_per_epoch=1), dict(data="dfmc", iters_per_epoch=1)):
        with pytest.raises(ValueError, match="not differentiable"):
            check_gradients(info, DistillConfig(**refused))
    assert load_teacher(f"tinynet:make@{factory}")[1].differentiable
    out = tmp_path / "eval.json"
    result = cli("eval", "--model", f"tinynet:make_detached@{factory}", "--pairs", tiny_run.val, "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["model"]["sha256"] == sha256_file(factory)


def test_registry_networks_pass_the_probe(tiny_run):
    _, info = load_teacher(tiny_run.teacher)
    assert (info.kind, info.differentiable, info.identity) == ("registry", True, None)


def _conv_program(path: Path, dynamic: bool) -> Path:
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    x = torch.rand(2, 3, 32, 32)
    dims = ({0: torch.export.Dim("b"), 2: torch.export.Dim("h"), 3: torch.export.Dim("w")},) if dynamic else None
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=dims), str(path))
    return path


def test_wrong_files_refused_in_one_line(tmp_path, tiny_run, factory):
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip")
    other = tmp_path / "teacher.onnx"
    other.write_bytes(b"\x08\x01")
    static = _conv_program(tmp_path / "static.pt2", dynamic=False)
    pickled = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(_conv_program(tmp_path / "ok.pt2", dynamic=True)) as src, zipfile.ZipFile(pickled, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true')
            dst.writestr(item, data)
    torch.save({"a.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    cases = [
        (garbage, ("garbage.pt2 is not a torch.export file",)),
        (tmp_path / "missing.pt2", ("teacher not found", "missing.pt2")),
        (other, ("teacher.onnx is not a teacher d4ir reads",)),
        (static, ("static.pt2 fails on a 1x3x32x48",)),
        (pickled, ("pickled.pt2: refused", "unpickled")),
        ("tinynet:make", ("needs its weights",)),
        (f"tinynet:nowhere@{factory}", ("has no 'nowhere'",)),
        (f"tinynet:make@{tmp_path / 'wrong.pth'}", ("does not match tinynet:make()",)),
        (f"no_such_pkg.mod:make@{factory}", ("cannot import no_such_pkg.mod",)),
    ]
    for spec, needles in cases:
        one_line_error(cli("eval", "--model", spec, "--pairs", tiny_run.val, "--out", tmp_path / "e.json"), *needles)
    assert load_teacher(tmp_path / "ok.pt2")[1].kind == "export"


def test_factory_weights_as_a_state_dict(tmp_path, factory):
    """Factory weights may be a torch.save'd state dict (read with weights_only=True, training-code wrappers and
    DataParallel's `module.` prefix removed): the same network as from safetensors; a pickled object is refused."""
    state = load_file(str(factory))
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours, theirs = (load_teacher(f"tinynet:make@{w}")[0] for w in (factory, wrapped))
    assert torch.equal(ours(x), theirs(x))
    pickled = tmp_path / "pickled.pth"
    torch.save({"a.weight": torch.zeros(1), "extra": Path("x")}, pickled)  # a Python object: needs unpickling
    with pytest.raises(ValueError, match="pickled.pth: refused"):
        load_teacher(f"tinynet:make@{pickled}")


def test_an_official_gcanet_deraining_file_is_distilled_as_deraining(tiny_run, tmp_path):
    """GCANet's official files share one key layout; only the name says the output rule (deraining: the network's
    output itself; dehazing: output + input). Stage 3 takes the name with --teacher-arch, builds the matching
    half student and records the name with the run; without it the file is read as dehazing, as `d4ir eval`."""
    from d4ir.distill.registry import build

    teacher = tmp_path / "wacv_gcanet_derain.pth"
    torch.save(build("gcanet-derain", channels=8).state_dict(), teacher)  # an official file: a bare state dict
    r = tiny_run.copy_to(tmp_path / "run")
    args = ("--teacher", teacher, "--data", "original", "--original", r.original, "--epochs", 1, "--joint-epochs", 0,
            "--iters-per-epoch", 1, "--batch-size", 2, "--crop", 16, "--device", "cpu")
    result = cli("distill", "--run-dir", r.root, "--teacher-arch", "gcanet-derain", "--name", "derain", *args)
    assert result.exit_code == 0, result.output
    student = json.loads((r.root / "students" / "derain" / "student.json").read_text())
    assert student["kwargs"] == {"channels": 4, "residual": False}
    state = torch.load(r.root / "students" / "derain" / "state.pt", weights_only=True)
    assert state["settings"]["teacher_arch"] == "gcanet-derain"
    result = cli("distill", "--run-dir", r.root, "--name", "dehaze", *args)
    assert result.exit_code == 0, result.output
    student = json.loads((r.root / "students" / "dehaze" / "student.json").read_text())
    assert student["kwargs"] == {"channels": 4, "residual": True}
