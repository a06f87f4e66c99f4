"""DFSR / DFMC data source: generator shapes, the generator's adversarial step, DFMC's contrastive term, resume."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from d4ir.distill.datafree import AdversarialSource, DataFreeConfig, DFSRGenerator
from d4ir.distill.dfmc import RandomFeatures, TeacherFeatures, contrastive_ratio
from d4ir.distill.registry import build

CROP = 16
SMALL = dict(widths=(16, 8))  # tiny generator widths for the CPU
AIRNET = dict(n_feats=8, n_groups=1, n_blocks=1, queue_size=16)
RESTORMER = dict(num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 1, 1, 1))


def _pair(arch: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(teacher frozen in eval mode, half-width student in train mode), as the trainer holds them."""
    torch.manual_seed(0)
    if arch == "airnet":
        teacher = build("airnet", **AIRNET)
        student = build("airnet", **{**AIRNET, "n_feats": 4})
    else:
        teacher = build("restormer", dim=8, **RESTORMER)
        student = build("restormer", dim=4, **RESTORMER)
    return teacher.eval().requires_grad_(False), student.train()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_generator_shapes_and_range():
    g = DFSRGenerator(z_dim=32, crop=20, widths=(16, 8))
    with torch.no_grad():
        x = g(torch.randn(3, 32))
    assert x.shape == (3, 3, 20, 20) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.std()) > 0
    src = AdversarialSource(CROP, 4, DataFreeConfig(**SMALL))
    rng = np.random.default_rng(0)
    a, b = src.next(rng, "cpu"), src.next(rng, "cpu")
    assert a.shape == (4, 3, CROP, CROP) and not a.requires_grad
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, b)  # fresh noise every batch
    with torch.device("meta"):  # shapes only: the Linear alone holds 134M weights at 256
        big = DFSRGenerator(crop=256)
    assert sum(p.numel() for p in big.parameters()) == (
        256 * 128 * 64**2 + 128 * 64**2 + 2 * 128 + 128 * 128 * 9 + 128 + 2 * 128 + 128 * 64 * 9 + 64 + 2 * 64
        + 64 * 3 * 9 + 3
    )  # the release's layout at 256: Linear 256 -> 128*64*64, norms, convs 128->128->64->3


@pytest.mark.parametrize("arch", ["airnet", "restormer"])
def test_generator_step_trains_the_generator_only(arch):
    teacher, student = _pair(arch)
    src = AdversarialSource(CROP, 2, DataFreeConfig(generator_lr=1e-4, **SMALL))
    z = torch.randn(2, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = float(src.discrepancy(student, teacher, z))
    t0, s0, g0 = _state(teacher), _state(student), _state(src.generator)
    out = src.generator_step(student, teacher, z=z)
    for model, ref in ((teacher, t0), (student, s0)):
        assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())  # weights and buffers
        assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in src.generator.parameters())
    assert out["discrepancy"] == pytest.approx(before, rel=1e-5)
    assert out["generator_loss"] == pytest.approx(-np.log1p(before), rel=1e-5)
    changed = [k for k, v in src.generator.state_dict().items() if not torch.equal(v, g0[k])]
    for key in ("project.weight", "conv1.weight", "conv2.weight", "out.weight", "out.bias", "norm2.weight"):
        assert key in changed  # the adversarial gradient reached every stage of G
    with torch.no_grad():
        after = float(src.discrepancy(student, teacher, z))
    assert after > before  # on the same z the step raised the teacher-student discrepancy (lowered L_G)


def test_generator_step_l1_norm_and_sync_hook():
    teacher, student = _pair("airnet")
    src = AdversarialSource(CROP, 2, DataFreeConfig(generator_norm="l1", **SMALL))
    z = torch.randn(2, 256)
    with torch.no_grad():
        x = src.generator(z)
        expect = float((student(x) - teacher(x)).abs().sum())
    seen = []
    out = src.generator_step(student, teacher, z=z, sync_grads=lambda g: seen.append(g.out.weight.grad.clone()))
    assert out["discrepancy"] == pytest.approx(expect, rel=1e-5)
    assert len(seen) == 1 and float(seen[0].abs().sum()) > 0  # gradients are set before the hook runs


def test_student_loss_is_kd_for_dfsr():
    src = AdversarialSource(CROP, 2, DataFreeConfig(loss="l1", **SMALL))
    s, t, x = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    assert torch.allclose(src.student_loss(s, t, x), (s - t).abs().mean())
    with pytest.raises(ValueError, match="no contrastive term"):
        src.contrastive_loss(s, t, x)


def test_contrastive_ratio_by_hand():
    a = torch.zeros(1, 3, 4, 4)
    p = torch.zeros(1, 3, 4, 4)
    p[:, 0], p[:, 1] = 0.2, -0.1
    n = torch.full((1, 3, 4, 4), 0.5)

    def features(x):  # identity and a fixed linear map (channel sum)
        return [x, x.sum(dim=1, keepdim=True)]

    # layer 1: mean|a-p| = (0.2*16 + 0.1*16) / 48 = 0.1, mean|a-n| = 0.5 -> 0.2
    # layer 2: |sum a - sum p| = 0.1 per pixel, |sum a - sum n| = 1.5 -> 1/15
    got = contrastive_ratio(a, p, n, features, weights=(1.0, 0.5), eps=0.0)
    assert float(got) == pytest.approx(0.2 + 0.5 / 15, abs=1e-6)
    assert float(contrastive_ratio(a, p, n, features, eps=0.0)) == pytest.approx((0.2 + 1 / 15) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="3 contrastive layer weights for 2"):
        contrastive_ratio(a, p, n, features, weights=(1, 1, 1))


def test_dfmc_student_loss_uses_the_teacher_encoder():
    teacher, _ = _pair("airnet")
    calls = []
    teacher.R.register_forward_hook(lambda *_: calls.append(1))
    src = AdversarialSource(CROP, 2, DataFreeConfig(method="dfmc", contrastive_weight=0.5, **SMALL), teacher=teacher)
    x = torch.rand(2, 3, CROP, CROP)
    s = torch.rand(2, 3, CROP, CROP, requires_grad=True)
    with torch.no_grad():
        t = teacher(x)
    calls.clear()
    loss = src.student_loss(s, t, x)
    assert not calls  # the hooked forward stopped after E_pre: the restorer never ran
    enc = teacher.E.E.encoder_q.E_pre
    with torch.no_grad():
        fa, fp, fn = enc(s), enc(t), enc(x)
        cr = (fa - fp).abs().mean() / ((fa - fn).abs().mean() + 1e-7)
    assert float(loss.detach()) == pytest.approx(float(((s.detach() - t) ** 2).mean() + 0.5 * cr), rel=1e-5)
    loss.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_dfmc_feature_spaces():
    teacher, _ = _pair("restormer")
    feats = TeacherFeatures(teacher, ("encoder_level1", "encoder_level2"))([torch.rand(1, 3, 16, 16)][0])
    assert [tuple(f.shape) for f in feats] == [(1, 8, 16, 16), (1, 16, 8, 8)]
    with pytest.raises(ValueError, match="not modules of the teacher"):
        TeacherFeatures(teacher, ("nope",))
    r1, r2 = RandomFeatures(3), RandomFeatures(3)
    x = torch.rand(1, 3, 16, 16)
    assert [tuple(f.shape) for f in r1(x)] == [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4)]
    assert all(torch.equal(u, v) for u, v in zip(r1(x), r2(x)))  # seeded: the same net every time
    src = AdversarialSource(CROP, 1, DataFreeConfig(method="dfmc", contrastive_features="random", **SMALL))
    assert float(src.contrastive_loss(torch.rand(1, 3, 16, 16), x, torch.rand(1, 3, 16, 16))) > 0
    with pytest.raises(ValueError, match="needs the teacher"):
        AdversarialSource(CROP, 1, DataFreeConfig(method="dfmc", **SMALL))
    with pytest.raises(ValueError, match="no default contrastive layers"):
        AdversarialSource(CROP, 1, DataFreeConfig(method="dfmc", **SMALL), teacher=torch.nn.Conv2d(3, 3, 1))


def test_state_dict_round_trip_repeats_batches_and_steps():
    teacher, student = _pair("airnet")
    cfg = DataFreeConfig(student_steps_per_generator_step=2, **SMALL)
    a = AdversarialSource(CROP, 2, cfg)
    a.generator_step(student, teacher)  # Adam has moments now
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = AdversarialSource(CROP, 2, DataFreeConfig(seed=7, student_steps_per_generator_step=2, **SMALL))
    b.load_state_dict(state)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert torch.equal(a.next(rng_a), b.next(rng_b))
    assert a.generator_step(student, teacher) == b.generator_step(student, teacher)
    assert torch.equal(a.next(rng_a), b.next(rng_b))
    wrong = AdversarialSource(24, 2, cfg)
    with pytest.raises(ValueError, match="state is for a generator"):
        wrong.load_state_dict(state)


def test_due_and_epoch_decay():
    src = AdversarialSource(CROP, 1, DataFreeConfig(student_steps_per_generator_step=3, lr_decay_every=2, **SMALL))
    assert [src.due(s) for s in range(7)] == [False, False, True, False, False, True, False]
    src.set_epoch(5)
    assert src.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1**2)
    assert DataFreeConfig().student_steps_per_generator_step == 50 and DataFreeConfig().z_dim == 256
    assert DataFreeConfig(method="dfmc").beta == 0.1 and DataFreeConfig().beta == 0
    # the default follows the method when it is set later, as the trainer does from --data
    assert replace(DataFreeConfig(), method="dfmc").beta == 0.1
    assert replace(DataFreeConfig(method="dfmc", contrastive_weight=0.3), method="dfmc").beta == 0.3
    assert DataFreeConfig(widths=[16, 8], betas=[0.5, 0.9]).widths == (16, 8)  # JSON lists become tuples


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="gan"), "method"),
        (dict(method="dfmc", contrastive_weight=-1.0), "contrastive_weight"),
        (dict(z_dim=0), "z_dim"),
        (dict(widths=(8,)), "widths"),
        (dict(generator_lr=0.0), "generator_lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(student_steps_per_generator_step=0), "student_steps_per_generator_step"),
        (dict(generator_norm="l3"), "generator_norm"),
        (dict(lr_decay=0.0), "lr_decay"),
        (dict(contrastive_features="vgg"), "contrastive_features"),
        (dict(contrastive_layer_weights=(-1.0,)), "contrastive_layer_weights"),
        (dict(loss="l9"), "unknown loss"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataFreeConfig(**kwargs)


@pytest.mark.parametrize("crop, batch, match", [(18, 2, "multiple of 4"), (4, 2, ">= 8"), (16, 0, "batch_size")])
def test_source_validation(crop, batch, match):
    with pytest.raises(ValueError, match=match):
        AdversarialSource(crop, batch, DataFreeConfig(**SMALL))


def test_a_contrastive_weight_is_dfmc():
    from d4ir.distill.trainer import DistillConfig

    with pytest.raises(ValueError, match="is DFMC"):
        AdversarialSource(CROP, 2, DataFreeConfig(contrastive_weight=0.1, **SMALL))
    with pytest.raises(ValueError, match="--data dfmc"):
        DistillConfig(data="dfsr", datafree=DataFreeConfig(contrastive_weight=0.1))
    assert DistillConfig(data="dfmc", datafree=DataFreeConfig(contrastive_weight=0.1)).datafree.beta == 0.1


@pytest.mark.parametrize("method", ["dfsr", "dfmc"])
def test_the_trainer_runs_the_gan_baselines_and_resumes_them_exactly(tiny_run, tmp_path, method):
    """`d4ir distill --data dfsr|dfmc`: the student learns from generated batches, the generator takes its steps
    (its loss is logged), and a run resumed after epoch 1 ends bit-equal to a straight one."""
    from d4ir.distill.trainer import DistillConfig, distill
    from d4ir.shards.io import load_weights, read_jsonl
    from d4ir.shards.state import load_state, save_state

    datafree = DataFreeConfig(widths=(16, 8), student_steps_per_generator_step=2)
    cfg = DistillConfig(student="half", data=method, epochs=2, joint_epochs=0, iters_per_epoch=4, batch_size=2,
                        crop=16, datafree=datafree)
    straight = tiny_run.copy_to(tmp_path / "a")
    distill(straight.root, straight.teacher, cfg, name="s", progress=False)
    log = read_jsonl(straight.root / "students" / "s" / "train.jsonl")
    assert [r["epoch"] for r in log] == [1, 2] and all(r["loss_gen"] < 0 for r in log)  # -log(1 + d) < 0
    resumed = tiny_run.copy_to(tmp_path / "b")
    distill(resumed.root, resumed.teacher, replace(cfg, epochs=1), name="s", progress=False)
    distill(resumed.root, resumed.teacher, cfg, name="s", resume=True, progress=False)
    a, _ = load_weights(straight.root / "students" / "s" / "student")
    b, _ = load_weights(resumed.root / "students" / "s" / "student")
    assert all(torch.equal(a[k], b[k]) for k in a)
    if method == "dfsr":  # the source is saved as 'adversarial'; a state of an older d4ir has it as 'generator'
        old = tiny_run.copy_to(tmp_path / "old")
        distill(old.root, old.teacher, replace(cfg, epochs=1), name="s", progress=False)
        state_path = old.root / "students" / "s" / "state.pt"
        state = load_state(state_path)
        assert "adversarial" in state["objects"] and "generator" not in state["objects"]
        objects = {("generator" if k == "adversarial" else k): v for k, v in state["objects"].items()}
        save_state(state_path, state | {"objects": objects})
        distill(old.root, old.teacher, cfg, name="s", resume=True, progress=False)
        c, _ = load_weights(old.root / "students" / "s" / "student")
        assert all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="give --iters-per-epoch"):
        distill(straight.root, straight.teacher, replace(cfg, iters_per_epoch=None), name="t", progress=False)
    if method == "dfmc":  # DFMC's contrastive term is on by default and changes what the student learns
        no_cr = replace(cfg, datafree=replace(datafree, contrastive_weight=0.0))
        distill(straight.root, straight.teacher, no_cr, name="no-cr", progress=False)
        c, _ = load_weights(straight.root / "students" / "no-cr" / "student")
        assert not all(torch.equal(a[k], c[k]) for k in a)
