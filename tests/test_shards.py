"""Shard writer, reader, verifier and grid (floor 1): round trips, reproducibility, faults."""

from __future__ import annotations

import errno
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import round_manifest
from d4ir.pipelines.grid import sample_grid
from d4ir.shards import writer
from d4ir.shards.io import OutputFolderError, atomic_write_json
from d4ir.shards.layout import round_dir, rounds_in
from d4ir.shards.reader import (
    CountingHandler,
    ShardList,
    iter_samples,
    shard_dataset,
    shard_urls,
)
from d4ir.shards.verify import check_shard_files, verify_shards
from d4ir.shards.writer import (
    check_manifest,
    read_manifest,
    read_stats,
    shard_done,
    shard_name,
    write_manifest,
    write_shard,
    write_sizes,
)
from PIL import Image


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _samples(shard: int, n: int = 3, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed * 1000 + shard)
    out = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(6 + i, 9, 3), dtype=np.uint8)
        meta = {"clean_source": f"clean/{shard}_{i}.png", "prompt_row": i, "seed": shard * 100 + i}
        out.append({"__key__": f"{shard:06d}_{i:06d}", "degraded.png": _png(arr), "json": meta, "_pixels": arr})
    return out


def _write(directory: Path, n_shards: int, n: int = 3) -> dict[str, dict]:
    """Write n_shards shards; return key -> original sample."""
    expected = {}
    for s in range(n_shards):
        samples = _samples(s, n)
        write_shard(directory, s, samples)
        expected.update({x["__key__"]: x for x in samples})
    return expected


def test_round_trip_shard_dataset_plain_webdataset_and_iter_samples(tmp_path):
    expected = _write(tmp_path, 2)
    urls = shard_urls(tmp_path)
    assert [Path(u).name for u in urls] == ["000000.tar", "000001.tar"]

    got = list(shard_dataset(urls, shuffle_shards=False))
    assert [g["key"] for g in got] == list(expected)  # shard order, then tar order
    for g in got:
        want = expected[g["key"]]
        assert g["degraded"].dtype == np.uint8 and g["degraded"].shape == want["_pixels"].shape
        np.testing.assert_array_equal(g["degraded"], want["_pixels"])
        assert g["meta"] == want["json"]

    plain = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb"))
    assert len(plain) == len(expected)
    for p in plain:
        want = expected[p["__key__"]]
        np.testing.assert_array_equal(np.round(p["degraded.png"] * 255).astype(np.uint8), want["_pixels"])
        assert p["json"] == want["json"]

    seq = list(iter_samples(tmp_path))
    assert [s["key"] for s in seq] == list(expected)
    np.testing.assert_array_equal(seq[-1]["degraded"], expected[seq[-1]["key"]]["_pixels"])

    shuffled = list(shard_dataset(urls, shuffle_buffer=4, seed=3))
    assert sorted(g["key"] for g in shuffled) == sorted(expected)


def test_rewrite_is_byte_identical_when_clock_changes(tmp_path, monkeypatch):
    stats_a = write_shard(tmp_path / "a", 0, _samples(0))
    real_time, real_ns = time.time, time.time_ns
    monkeypatch.setattr(time, "time", lambda: real_time() + 1e6)
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + 10**15)
    # Same samples with their fields in another order must not change the bytes either.
    reordered = [dict(reversed(list(s.items()))) for s in _samples(0)]
    stats_b = write_shard(tmp_path / "b", 0, reordered)
    a, b = (tmp_path / "a" / "000000.tar").read_bytes(), (tmp_path / "b" / "000000.tar").read_bytes()
    assert a == b
    assert stats_a.sha256 == stats_b.sha256 and stats_a.bytes == len(a)
    other = write_shard(tmp_path / "c", 0, _samples(0, seed=1))
    assert other.sha256 != stats_a.sha256


def test_key_with_dot_rejected_and_nothing_left(tmp_path):
    bad = _samples(0)
    bad[1]["__key__"] = "000000.1"
    with pytest.raises(ValueError, match="contains a dot"):
        write_shard(tmp_path, 0, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    dup = _samples(0)
    dup[2]["__key__"] = dup[0]["__key__"]
    with pytest.raises(ValueError, match="duplicate"):
        write_shard(tmp_path, 0, dup)
    with pytest.raises(TypeError, match="field 'x'"):
        write_shard(tmp_path, 0, [{"__key__": "k", "x": 1.5}])
    with pytest.raises(ValueError, match="core stats"):
        write_shard(tmp_path, 0, _samples(0), extra_stats={"count": 7})


def test_stats_written_last_and_rerun_fixes_a_killed_shard(tmp_path, monkeypatch):
    real_write_json = writer.atomic_write_json
    seen = {}

    def checking_write_json(path, obj):
        # At the moment the stats are written the final tar must already be complete and renamed.
        tar = Path(path).with_name(obj["shard"])
        seen["tar_size"] = tar.stat().st_size
        seen["tmp_exists"] = tar.with_name(tar.name + ".tmp").exists()
        real_write_json(path, obj)

    monkeypatch.setattr(writer, "atomic_write_json", checking_write_json)
    stats = write_shard(tmp_path, 0, _samples(0), extra_stats={"seconds": 0.5})
    assert seen == {"tar_size": stats.bytes, "tmp_exists": False}
    assert stats.extra == {"seconds": 0.5}
    assert json.loads((tmp_path / "000000.stats.json").read_text()) == stats.to_json()
    assert read_stats(tmp_path, 0) == stats

    def killed(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path, 1, _samples(1))
    assert not shard_done(tmp_path, 1)
    assert not (tmp_path / "000001.tar").exists() and not (tmp_path / "000001.stats.json").exists()

    # A hard kill cannot clean up: tar present, stats absent. The shard does not count until rerun.
    monkeypatch.setattr(writer, "atomic_write_json", real_write_json)
    write_shard(tmp_path, 1, _samples(1))
    (tmp_path / "000001.stats.json").unlink()
    assert not shard_done(tmp_path, 1)
    assert [Path(u).name for u in shard_urls(tmp_path)] == ["000000.tar"]
    assert any("000001.tar: unfinished" in p for p in check_shard_files(tmp_path))
    write_shard(tmp_path, 1, _samples(1))
    assert shard_done(tmp_path, 1) and check_shard_files(tmp_path) == []


def test_bad_samples_are_counted_and_a_failing_source_fails_the_shard(tmp_path):
    """A sample the source marks bad (`__error__`, e.g. an unreadable clean photo) is counted and the shard is
    complete without it; an exception from the source itself (a crashed sampler, an out-of-memory) fails the
    whole shard: it propagates, and neither a tar nor a stats file nor a temporary is left."""
    samples = _samples(0, 4)
    samples[2] = {"__key__": samples[2]["__key__"], "__error__": "ImageSkipped: clean/broken.png: truncated"}
    stats = write_shard(tmp_path, 0, samples)
    assert stats.count == 3 and stats.accounted == 4
    assert stats.failures == ({"key": samples[2]["__key__"], "error": "ImageSkipped: clean/broken.png: truncated"},)
    assert [s["key"] for s in iter_samples(tmp_path)] == [samples[i]["__key__"] for i in (0, 1, 3)]
    assert check_shard_files(tmp_path) == []

    def generator():
        yield samples[0]
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        write_shard(tmp_path, 1, generator())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("000001")) == []
    assert not shard_done(tmp_path, 1)


def test_verify_names_truncated_altered_missing_and_leftovers(tmp_path):
    _write(tmp_path, 4)
    write_sizes(tmp_path)
    # hand-edited manifests (raw JSON): verify reads what is on disk, whatever wrote it
    atomic_write_json(tmp_path / "manifest.json", {"sd": {"model_id": "tiny"}, "num_shards": 5})
    assert check_shard_files(tmp_path) == ["manifest.json: lists 000004.tar, which does not exist"]
    atomic_write_json(tmp_path / "manifest.json", {"sd": {"model_id": "tiny"}, "shards": ["000000.tar", "000007.tar"]})
    assert check_shard_files(tmp_path) == ["manifest.json: lists 000007.tar, which does not exist"]
    atomic_write_json(tmp_path / "manifest.json", {"sd": {"model_id": "tiny"}, "num_shards": 4})
    assert check_shard_files(tmp_path) == []
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    (tmp_path / "sizes.json").write_text(json.dumps({**sizes, "000001.tar": 9}))
    assert check_shard_files(tmp_path) == ["sizes.json: gives 000001.tar 9 samples, its stats say 3"]
    write_sizes(tmp_path)

    t0 = tmp_path / "000000.tar"
    t0.write_bytes(t0.read_bytes()[:-700])
    t1 = tmp_path / "000001.tar"
    data = bytearray(t1.read_bytes())
    data[512 + 40] ^= 0xFF  # inside the first member's PNG bytes (after its 512-byte header)
    t1.write_bytes(bytes(data))
    (tmp_path / "000002.tar").unlink()
    (tmp_path / "000009.tar.tmp").write_bytes(b"half")
    (tmp_path / "000003.stats.json").write_text('{"count": 3}')
    problems = check_shard_files(tmp_path)
    text = "\n".join(problems)
    assert "000000.tar: truncated" in text
    assert "000001.tar: altered" in text
    assert "000002.tar: missing" in text
    assert "000009.tar.tmp: leftover" in text
    assert "000003.stats.json: lacks ['bytes', 'sha256']" in text
    assert len(problems) == 5, problems
    # each finding names its shard as data, not only in its text (a reader skipping damaged shards uses it)
    assert sorted(p.shard for p in problems) == ["000000.tar", "000001.tar", "000002.tar", "000003.tar", "000009.tar"]
    atomic_write_json(tmp_path / "manifest.json", {"num_shards": 4, "format_version": 2})
    assert [(p, p.shard) for p in verify_shards(tmp_path) if "manifest.json" in p][0] == (
        "manifest.json: the round is not complete (its synthesis was interrupted or failed)", None)
    # A shard gone entirely (tar and stats) is caught through sizes.json and the manifest.
    (tmp_path / "000002.stats.json").unlink()
    text = "\n".join(check_shard_files(tmp_path))
    assert "sizes.json: lists 000002.tar, which does not exist" in text
    assert "manifest.json: lists 000002.tar, which does not exist" in text
    assert check_shard_files(tmp_path / "nope") == [f"{tmp_path / 'nope'}: shard folder does not exist"]


def test_reader_skips_a_truncated_tar_and_counts_it(tmp_path):
    expected = _write(tmp_path, 2)
    t0 = tmp_path / "000000.tar"
    t0.write_bytes(t0.read_bytes()[:700])  # cut inside the first member's data
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    handler = CountingHandler()
    with pytest.warns(RuntimeWarning, match="skipped unreadable"):
        got = list(shard_dataset(urls, shuffle_shards=False, handler=handler))
    assert handler.errors >= 1
    assert [g["key"] for g in got] == [k for k in expected if k.startswith("000001")]


def test_manifest_check_names_mismatching_keys(tmp_path):
    manifest = round_manifest(sd="sd-1.5", config={"round": 0, "ccd": {"strength": 0.5, "steps": 70}})
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    assert check_manifest(tmp_path, {"sd": "sd-1.5", "config": {"ccd": {"strength": 0.5}}}) == manifest
    with pytest.raises(ValueError) as info:
        check_manifest(tmp_path, {"config": {"ccd": {"strength": 0.3}}, "encoder_sha256": "e" * 64, "steps": 70})
    msg = str(info.value)
    assert "config.ccd.strength: shards were made with 0.5, the run asks for 0.3" in msg
    assert "steps: missing" in msg and "encoder_sha256" not in msg
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(tmp_path / "empty")


def test_unwritable_or_full_folder_raises_output_folder_error(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() != 0:  # root ignores permission bits
        out.chmod(0o500)
        try:
            with pytest.raises(OutputFolderError, match=str(out)):
                write_shard(out, 0, _samples(0))
        finally:
            out.chmod(0o700)
        assert list(out.iterdir()) == []

    real_open = open

    class _FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(writer, "open", lambda *a, **k: _FullDisk(real_open(*a, **k)), raising=False)
    with pytest.raises(OutputFolderError, match=f"output folder {out}: No space left"):
        write_shard(out, 0, _samples(0))
    assert list(out.iterdir()) == []

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(writer, "open", denied, raising=False)
    with pytest.raises(OutputFolderError) as info:
        write_shard(out, 0, _samples(0))
    assert info.value.errno == errno.EACCES and str(out) in str(info.value)
    assert list(out.iterdir()) == []


def test_split_by_worker_reads_every_sample_once(tmp_path):
    expected = _write(tmp_path, 4, n=2)
    urls = shard_urls(tmp_path)
    for workers in (0, 2):
        ds = shard_dataset(urls, seed=1)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        keys = [s["key"] for s in loader]
        assert sorted(keys) == sorted(expected), f"num_workers={workers}"


def test_split_by_node_gives_disjoint_halves(tmp_path, monkeypatch):
    expected = _write(tmp_path, 4, n=2)
    urls = shard_urls(tmp_path)
    halves = [{s["key"] for s in shard_dataset(urls, seed=5, rank=r, world_size=2)} for r in (0, 1)]
    assert halves[0].isdisjoint(halves[1]) and halves[0] | halves[1] == set(expected)
    assert len(halves[0]) == len(halves[1]) == 4
    # torchrun's environment gives the same split as the explicit arguments.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert {s["key"] for s in shard_dataset(urls, seed=5)} == halves[1]
    with pytest.raises(ValueError, match="both rank and world_size"):
        list(shard_dataset(urls, rank=0))


def test_shard_shuffle_is_seeded_by_seed_plus_epoch():
    urls = [f"/x/{i:06d}.tar" for i in range(12)]
    order = ShardList(urls, seed=3, epoch=0, rank=0, world_size=1).ordered()
    assert sorted(order) == urls and order != urls
    assert ShardList(urls, seed=3, epoch=0, rank=0, world_size=1).ordered() == order
    assert ShardList(urls, seed=2, epoch=1, rank=0, world_size=1).ordered() == order  # same seed + epoch
    assert ShardList(urls, seed=3, epoch=1, rank=0, world_size=1).ordered() != order
    ds = shard_dataset(urls, seed=3, rank=0, world_size=1)
    ds.set_epoch(1)
    assert ds.shard_list.ordered() == ShardList(urls, seed=4, rank=0, world_size=1).ordered()


def test_sizes_rounds_and_shard_names(tmp_path):
    _write(tmp_path, 2, n=3)
    write_shard(tmp_path, 2, _samples(2, 1))
    (tmp_path / "000003.tar").write_bytes(b"unfinished")
    assert write_sizes(tmp_path) == {"000000.tar": 3, "000001.tar": 3, "000002.tar": 1}
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"000000.tar": 3, "000001.tar": 3, "000002.tar": 1}
    assert shard_name(12) == "000012.tar"
    with pytest.raises(ValueError):
        shard_name(-1)

    root = tmp_path / "shards"
    assert rounds_in(root) == []
    for n in (0, 2, 3):
        round_dir(root, n).mkdir(parents=True)
    for n in (0, 2):
        write_manifest(round_dir(root, n), round_manifest(config={"round": n}))
    assert rounds_in(root) == [0, 2]  # round 3 has no manifest: its synthesis never started
    assert round_dir(root, 7).name == "round-007"
    with pytest.raises(ValueError):
        round_dir(root, -1)


def test_sample_grid_writes_a_labelled_png(tmp_path):
    rng = np.random.default_rng(0)
    rows = [[rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(3)] for _ in range(2)]
    rows[1][2] = np.full((16, 16), 255, np.uint8)  # gray is accepted
    path = sample_grid(rows, tmp_path / "g" / "grid.png", labels=["clean", "prompt", "synth"], cell=32)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == (3 * 32 + 4 * 2, 16 + 2 + 2 * 32 + 3 * 2)
        pixels = np.asarray(img)
    # The gray image fills its cell (square, so no letterbox): cell of row 1, column 2 is white.
    top = 16 + 2 + 2 + 32 + 2
    assert (pixels[top : top + 32, 2 + 2 * 34 : 2 + 2 * 34 + 32] == 255).all()
    with pytest.raises(ValueError, match="2 labels for 3 columns"):
        sample_grid(rows, tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="uint8"):
        sample_grid([[np.zeros((4, 4, 3), np.float32)]], tmp_path / "x.png")
