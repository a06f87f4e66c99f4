"""The records that cross stages, typed: what a round is made of and what it holds.

A round folder's JSON files are written from, and read back into, these dataclasses only: stage 2 writes them,
stage 3, the report and `d4ir status`/`shards show` read them. Each `from_json` checks the fields it needs and
raises one ValueError naming the file and the field, so a damaged file never surfaces as a KeyError deep in a
stage. `shards.verify` stays a validator of untrusted files: it reads the raw JSON to name *every* problem of a
damaged round, where a reader stops at the first.

    Provenance       what made a round's samples (the SD as named and the hashes that identify the inputs)
    RoundManifest    manifest.json: the plan (config, shards and their planned sizes, clean photos), provenance,
                     completion; the JSON layout is that of SHARD_FORMAT (flat provenance keys)
    ShardStats       NNNNNN.stats.json: the completion marker of one shard (count, failures, sha256, bytes)
    PlannedSample    one planned sample of a shard job: (key, clean photo, prompt row, noise seed)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from d4ir.shards.layout import MANIFEST_FILE, shard_name

# Version of the round format (fields, manifest keys); version 1 named the image field "input.png".
SHARD_FORMAT = 2


def need(d: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """d[key] checked to be of `kind` (a bool is no int here; absent reads as None), else one ValueError naming
    `where` and the field: the field check of every record's `from_json`."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    value = d.get(key)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ValueError(f"{where}: field {key!r} must be {names}, got {value!r}")
    return value


@dataclass(frozen=True)
class Provenance:
    """What made a round: the SD as the user named it (to load it again; a path may move) and the hashes that
    identify the inputs (what a resumed or reused round is checked against).

    Args:
        sd, sd_config: the SD spec and, for a single file, its config source.
        sd_fingerprint: sha256 over the SD's weights (`synth.sd_parts.sd_fingerprint`).
        encoder_sha256: stage 1's prompt encoder (prompt mode "encoder").
        prompt_encoder_file_sha256: the encoder file applied to the clean photos (prompt mode "content").
    """

    sd: str
    sd_config: str | None
    sd_fingerprint: str
    encoder_sha256: str | None = None
    prompt_encoder_file_sha256: str | None = None

    _HASHES = ("sd_fingerprint", "encoder_sha256", "prompt_encoder_file_sha256")

    def identity(self) -> dict[str, str]:
        """The hashes a round must match to be resumed or reused (never the spec: a moved SD is the same SD)."""
        return {k: getattr(self, k) for k in self._HASHES if getattr(self, k) is not None}

    def to_json(self) -> dict[str, Any]:
        """Flat keys, as every manifest and every sample's JSON carries them."""
        return {"sd": self.sd, "sd_config": self.sd_config, **self.identity()}

    @classmethod
    def from_json(cls, d: dict, where: str) -> Provenance:
        return cls(sd=need(d, "sd", str, where), sd_config=need(d, "sd_config", (str, type(None)), where),
                   sd_fingerprint=need(d, "sd_fingerprint", str, where),
                   encoder_sha256=need(d, "encoder_sha256", (str, type(None)), where),
                   prompt_encoder_file_sha256=need(d, "prompt_encoder_file_sha256", (str, type(None)), where))


class PlannedSample(NamedTuple):
    """One sample a shard job plans: its key, the clean photo, the prompt row and the noise seed."""

    key: str
    clean: str
    prompt_row: int
    seed: int


@dataclass(frozen=True)
class RoundManifest:
    """manifest.json of a round (written by `synth.worker.synthesize`, first incomplete, then complete).

    Args:
        config: the SynthConfig as plain data; config_hash and plan_hash identify it and the drawn plan.
        shards: {shard file name: samples planned for it}; `num_shards` is its length.
        clean_dir, prompts_dir: absolute folders the round was drawn from.
        clean_scan: the clean folder's scan counts; clean_files: [name, bytes, sha256] of every photo drawn from
            (a regeneration round is drawn from exactly round 0's).
        provenance: see `Provenance`.
        dtype: the SD's dtype when sampling; cpu_threads: the CPU thread count its shards are computed with.
        complete: every shard finished; images: the images the shards hold (from sizes.json, when complete).
    """

    config: dict
    config_hash: str
    plan_hash: str
    shards: dict[str, int]
    clean_dir: str
    prompts_dir: str | None
    clean_scan: dict
    clean_files: list | None  # None in rounds written before d4ir recorded them
    provenance: Provenance
    dtype: str
    cpu_threads: int | None = None
    complete: bool = False
    images: int | None = None
    format_version: int = field(default=SHARD_FORMAT)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def round(self) -> int | None:
        value = self.config.get("round")
        return value if isinstance(value, int) else None

    def to_json(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "dtype": self.dtype, "config": self.config,
                "config_hash": self.config_hash, "plan_hash": self.plan_hash, "num_shards": self.num_shards,
                "shards": self.shards, "clean_dir": self.clean_dir, "prompts_dir": self.prompts_dir,
                "clean_scan": self.clean_scan, "clean_files": self.clean_files, **self.provenance.to_json(),
                "cpu_threads": self.cpu_threads, "complete": self.complete, "images": self.images}

    @classmethod
    def from_json(cls, d: Any, where: str | Path) -> RoundManifest:
        """The manifest of file `where`; a round of another format or a missing/ill-typed field is one
        ValueError naming the file (and the field)."""
        where = str(where)
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if (why := format_problem(d)) is not None:
            raise ValueError(f"{where}: {why}")
        shards = need(d, "shards", dict, where)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in shards.values()):
            raise ValueError(f"{where}: field 'shards' must map shard names to sample counts")
        return cls(config=need(d, "config", dict, where), config_hash=need(d, "config_hash", str, where),
                   plan_hash=need(d, "plan_hash", str, where), shards=dict(shards),
                   clean_dir=need(d, "clean_dir", str, where),
                   prompts_dir=need(d, "prompts_dir", (str, type(None)), where),
                   clean_scan=need(d, "clean_scan", dict, where),
                   clean_files=need(d, "clean_files", (list, type(None)), where),
                   provenance=Provenance.from_json(d, where), dtype=need(d, "dtype", str, where),
                   cpu_threads=need(d, "cpu_threads", (int, type(None)), where),
                   complete=d.get("complete") is True, images=need(d, "images", (int, type(None)), where))

    @classmethod
    def read(cls, directory: str | Path) -> RoundManifest:
        """The manifest of round folder `directory`; missing is a FileNotFoundError naming the folder."""
        from d4ir.shards.io import read_json_object

        path = Path(directory) / MANIFEST_FILE
        if not path.exists():
            raise FileNotFoundError(f"no {MANIFEST_FILE} in {directory} (the round was not finished)")
        raw = read_json_object(path)
        if (why := format_problem(raw)) is not None:  # the round as a whole, not a field of its file
            raise ValueError(f"{directory} {why}")
        return cls.from_json(raw, path)


@dataclass(frozen=True)
class ShardStats:
    """NNNNNN.stats.json, written last by `shards.writer.write_shard`: the shard's completion marker.

    Args:
        shard, index: the tar's file name and number.
        count: samples written; failures: [{"key", "error"}] of samples that could not be made.
        sha256, bytes: of the tar as written.
        extra: whatever the writer's caller added (e.g. seconds).
    """

    shard: str
    index: int
    count: int
    failures: tuple[dict, ...]
    sha256: str
    bytes: int
    extra: dict = field(default_factory=dict)

    CORE = ("shard", "index", "count", "failures", "sha256", "bytes")

    @property
    def accounted(self) -> int:
        """Samples the shard accounts for: written plus failed."""
        return self.count + len(self.failures)

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "index": self.index, "count": self.count, "failures": list(self.failures),
                "sha256": self.sha256, "bytes": self.bytes, **self.extra}

    @classmethod
    def from_json(cls, d: Any, where: str | Path) -> ShardStats:
        where = str(where)
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        failures = need(d, "failures", list, where)
        return cls(shard=need(d, "shard", str, where), index=need(d, "index", int, where),
                   count=need(d, "count", int, where), failures=tuple(failures),
                   sha256=need(d, "sha256", str, where), bytes=need(d, "bytes", int, where),
                   extra={k: v for k, v in d.items() if k not in cls.CORE})


def format_problem(manifest: dict) -> str | None:
    """Why this d4ir cannot read a round with this (raw) manifest: its format version is another; else None.

    Readers check this first: a round of another format fails sample by sample otherwise (version 1 named the
    image field differently), and a resumed synthesis would mix its shards with new ones.
    """
    have = manifest.get("format_version")
    if have == SHARD_FORMAT and not isinstance(have, bool):
        return None
    made = "has no format_version (not written by `d4ir synth`)" if have is None else \
        f"is a round of format version {have!r}"
    return f"{made}; this d4ir reads version {SHARD_FORMAT}: synthesize it again"


def planned_sizes(manifest: dict) -> dict[str, int]:
    """{shard name: samples planned for it} of a raw manifest ({} when it says neither): its "shards", or, for
    rounds written before the manifest listed them, what plan_jobs cut num_samples into (shard_size pieces)."""
    listed = manifest.get("shards")
    if isinstance(listed, dict):
        return {str(name): n for name, n in listed.items() if isinstance(n, int)}
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    total, size = config.get("num_samples"), config.get("shard_size")
    if not (isinstance(total, int) and isinstance(size, int) and total > 0 and size > 0):
        return {}
    return {shard_name(i): min(size, total - i * size) for i in range(-(-total // size))}
