"""AirNet / Restormer: official key layouts load strictly, parameter counts, registry, save/load, MoCo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from d4ir.distill.airnet import AirNet, MoCo, airnet_kwargs_from_state_dict
from d4ir.distill.registry import ARCHITECTURES, build, count_parameters, load_model, save_model
from d4ir.distill.restormer import Restormer

_ROOT = Path(__file__).resolve().parents[1]
_NOTE_DIRS = [Path(os.environ.get("D4IR_NOTES", "/nonexistent")), _ROOT / "shared" / "notes",
              _ROOT.parent / "shared" / "notes"]


def _key_list(name: str) -> dict[str, list[int]]:
    """Parse 'key [d0, d1, ...]' lines of a key list file from the notes folder (skip when absent)."""
    for d in _NOTE_DIRS:
        if (d / name).is_file():
            out = {}
            for line in (d / name).read_text().splitlines():
                key, shape = line.split(" ", 1)
                out[key] = json.loads(shape)
            return out
    pytest.skip(f"{name} not found in {[str(d) for d in _NOTE_DIRS]}")


def _fake_checkpoint(keys: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Random tensors of the listed shapes; counters (BN num_batches_tracked, queue_ptr) are int64."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in keys.items():
        if k.endswith(("num_batches_tracked", "queue_ptr")):
            sd[k] = torch.randint(0, 100, shape, generator=g, dtype=torch.long)
        else:
            sd[k] = torch.randn(shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def airnet() -> AirNet:
    return AirNet()


@pytest.fixture(scope="module")
def restormer() -> Restormer:
    return Restormer()


def test_airnet_official_keys_load_strictly(airnet):
    keys = _key_list("airnet_all_state_dict_keys.txt")
    assert list(airnet.state_dict()) == list(keys)  # same names in the same order
    sd = _fake_checkpoint(keys)
    airnet.load_state_dict(sd, strict=True)
    loaded = airnet.state_dict()
    for k in ("E.E.queue", "R.body.3.body.2.dgm2.dcn.weight", "E.E.encoder_k.mlp.2.bias"):
        assert torch.equal(loaded[k], sd[k])
    assert loaded["E.E.queue_ptr"].dtype == torch.long and loaded["E.E.queue"].shape == (256, 1280)
    assert airnet_kwargs_from_state_dict(sd) == dict(
        n_feats=64, queue_size=1280, n_groups=5, n_blocks=5
    )


def test_restormer_official_keys_load_strictly(restormer):
    keys = _key_list("restormer_deraining_state_dict_keys.txt")
    assert list(restormer.state_dict()) == list(keys)
    sd = _fake_checkpoint(keys)
    restormer.load_state_dict(sd, strict=True)
    assert torch.equal(restormer.state_dict()["latent.7.ffn.project_out.weight"], sd["latent.7.ffn.project_out.weight"])


def test_parameter_counts(airnet, restormer):
    assert count_parameters(airnet) == 8_930_313
    assert count_parameters(build("half-airnet")) == 4_464_553
    assert count_parameters(restormer) == 26_126_644
    bias_free = Restormer(layernorm_type="BiasFree")
    assert count_parameters(bias_free) == 26_111_668
    assert len(bias_free.state_dict()) == 406 and not any(".norm1.body.bias" in k for k in bias_free.state_dict())


def test_airnet_width_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="encoder_first == n_feats"):
        build("airnet", n_feats=32, encoder_first=64)  # a config of an older d4ir that disagrees with itself
    with pytest.raises(KeyError, match="unknown architecture"):
        build("unet")


def test_airnet_encoder_width_is_derived_and_old_configs_still_load(tmp_path):
    """E_pre's width follows n_feats (no encoder_first to pass); a checkpoint whose JSON still carries it loads, and
    an official state dict whose E_pre width differs is refused naming both widths."""
    model = AirNet(n_feats=8, queue_size=4, n_groups=1, n_blocks=1)
    assert model.state_dict()["E.E.encoder_q.E_pre.backbone.0.weight"].shape[0] == 8
    assert model.config == dict(n_feats=8, queue_size=4, n_groups=1, n_blocks=1)
    stem = tmp_path / "old"
    save_model(stem, model, "airnet")
    config = json.loads(stem.with_suffix(".json").read_text())
    config["kwargs"]["encoder_first"] = 8  # as d4ir wrote it before the width was derived
    stem.with_suffix(".json").write_text(json.dumps(config))
    loaded, info = load_model(stem.with_suffix(".safetensors"))
    assert _same_state(loaded, model) and info["kwargs"] == model.config
    wide = AirNet(n_feats=8, queue_size=4, n_groups=1, n_blocks=1).state_dict()
    wide["R.head.0.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save(wide, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="encoder_first=8, n_feats=16"):
        load_model(tmp_path / "odd.pth")


def test_forward_shapes_for_every_registry_entry():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8)  # tiny: the full-size models are only built, never run on big images
    for name in ARCHITECTURES:
        model = build(name).eval()
        with torch.no_grad():
            y = model(x)
        assert y.shape == (1, 3, 8, 8) and torch.isfinite(y).all(), name
    small = build("airnet", n_feats=16, n_groups=2, n_blocks=2)
    assert small.eval()(torch.rand(2, 3, 20, 28)).shape == (2, 3, 20, 28)  # AirNet takes any size
    with pytest.raises(ValueError, match="multiples of 8"):
        build("restormer-12")(torch.rand(1, 3, 30, 32))


def _tiny_airnet(queue_size: int = 5) -> AirNet:
    return AirNet(n_feats=8, queue_size=queue_size, n_groups=1, n_blocks=2)


def test_airnet_train_forward_moco_terms_and_gradients():
    torch.manual_seed(0)
    model = _tiny_airnet(queue_size=7).train()
    moco = model.E.E
    xq, xk = torch.rand(3, 3, 24, 24), torch.rand(3, 3, 24, 24)
    queue_before = moco.queue.clone()
    with torch.no_grad():
        q = F.normalize(moco.encoder_q(xq)[1], dim=1)
    restored, logits, labels = model(xq, xk)
    assert restored.shape == (3, 3, 24, 24) and logits.shape == (3, 8)
    assert labels.dtype == torch.long and torch.equal(labels, torch.zeros(3, dtype=torch.long))
    # negatives are the queue as it was before this batch's keys were enqueued
    torch.testing.assert_close(logits[:, 1:], q @ queue_before / 0.07, atol=1e-4, rtol=1e-4)
    assert int(moco.queue_ptr) == 3
    torch.testing.assert_close(moco.queue[:, :3].norm(dim=0), torch.ones(3))
    loss = F.l1_loss(restored, xq) + F.cross_entropy(logits, labels)
    loss.backward()
    assert model.E.E.encoder_q.E_pre.backbone[0].weight.grad is not None
    assert model.R.head[0].weight.grad is not None
    assert all(p.grad is None for p in moco.encoder_k.parameters())
    # eval mode ignores x_key and returns only the restored image
    assert model.eval()(xq, xk).shape == (3, 3, 24, 24)


def test_moco_momentum_update():
    moco = MoCo(first=8, queue_size=4)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)
    k_before = [p.clone() for p in moco.encoder_k.parameters()]
    q_now = [p.clone() for p in moco.encoder_q.parameters()]
    moco(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    for kb, qn, kn in zip(k_before, q_now, moco.encoder_k.parameters()):
        torch.testing.assert_close(kn, 0.999 * kb + 0.001 * qn)


def test_queue_wraps_when_batch_does_not_divide_k():
    moco = MoCo(first=8, queue_size=5)
    keys = torch.arange(1, 13, dtype=torch.float32).view(4, 3).repeat_interleave(64, dim=1)  # [4,192]
    moco.queue = torch.zeros(192, 5)
    moco._enqueue(keys[:3])  # columns 0,1,2
    moco._enqueue(keys[:4])  # columns 3,4 then wraps to 0,1
    assert int(moco.queue_ptr) == 2
    expect = torch.stack([keys[2], keys[3], keys[2], keys[0], keys[1]], dim=1)
    assert torch.equal(moco.queue, expect)
    moco._enqueue(torch.cat([keys, keys]))  # 8 keys > K: the newest 5 land, pointer advances by 5
    assert int(moco.queue_ptr) == 2
    assert torch.equal(moco.queue[:, [2, 3, 4, 0, 1]], torch.cat([keys, keys])[-5:].t())


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 24)
    for name, model in (("tiny-airnet", _tiny_airnet()), ("restormer-12", build("restormer-12"))):
        model.eval()
        path = save_model(tmp_path / name, model, name)
        assert path == tmp_path / f"{name}.safetensors" and path.exists()
        cfg = json.loads((tmp_path / f"{name}.json").read_text())
        assert cfg["name"] == name and cfg["kwargs"] == model.config
        for spec in (tmp_path / name, path, tmp_path / f"{name}.json"):
            loaded, info = load_model(spec)
            assert type(loaded) is type(model) and info["source"] == "d4ir" and not loaded.training
            with torch.no_grad():
                assert torch.equal(loaded(x), model(x))
    assert cfg["arch"] == "restormer"
    with pytest.raises(ValueError, match="airnet network"):
        load_model(tmp_path / "tiny-airnet", arch="restormer")


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_pth_files_load(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16)
    # AirNet Derain/Dehaze checkpoints: a bare state_dict with a [256, 256] queue
    src = AirNet(queue_size=256).eval()
    torch.save(src.state_dict(), tmp_path / "Derain.pth")
    model, info = load_model(tmp_path / "Derain.pth")
    assert isinstance(model, AirNet) and info["arch"] == "airnet" and info["source"] == "official"
    assert model.config == dict(n_feats=64, queue_size=256, n_groups=5, n_blocks=5)
    assert _same_state(model, src) and not model.training
    # Restormer: BasicSR {'params': sd}; a DataParallel `module.` prefix is stripped
    for kwargs in (dict(dim=12), dict(dim=24, layernorm_type="BiasFree")):
        src = Restormer(**kwargs).eval()
        params = {f"module.{k}": v for k, v in src.state_dict().items()}
        torch.save({"params": params}, tmp_path / "deraining.pth")
        model, info = load_model(tmp_path / "deraining.pth", arch="restormer")
        assert info["container"] == "params" and model.config == src.config and _same_state(model, src)
        with torch.no_grad():
            assert torch.equal(model(x), src(x))
    with pytest.raises(ValueError, match="holds a restormer"):
        load_model(tmp_path / "deraining.pth", arch="airnet")


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing")
    torch.save({"net": {"conv.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        load_model(tmp_path / "other.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_model(tmp_path / "garbage.pth")
    sd = _tiny_airnet().state_dict()
    del sd["R.tail.0.bias"]
    torch.save(sd, tmp_path / "truncated.pth")
    with pytest.raises(ValueError, match="does not match"):
        load_model(tmp_path / "truncated.pth")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_matches_cpu():
    """torchvision's CUDA deform_conv2d and the attention path agree with the CPU reference."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 40)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # cuDNN convs default to TF32 (~1e-3 relative per layer)
    try:
        _compare_cuda_cpu(x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _compare_cuda_cpu(x: torch.Tensor) -> None:
    for model in (_tiny_airnet(), build("restormer-12")):
        model.eval()
        with torch.no_grad():
            # non-zero offsets so the deformable sampling itself is compared, not a plain conv
            for m in model.modules():
                if hasattr(m, "conv_offset_mask"):
                    torch.nn.init.normal_(m.conv_offset_mask.weight, std=0.05)
            cpu = model(x)
            gpu = model.cuda()(x.cuda()).cpu()
        torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)
